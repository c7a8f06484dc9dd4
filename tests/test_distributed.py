"""torchrun (gloo, CPU) builds and DDP training; caches in object storage (a local S3 server); writer locks."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import zarr

import subcache
from subcache.errors import StoreError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
BUILD = ["build", "--model", "resnet18", "--weights", "none", "--image-size", "32", "--layer", "6",
         "--batch-size", "8", "--chunk-mb", "0.02"]  # 16-sample chunks: 192 = 12 chunks, 96 = 6 chunks


def torchrun(n, *args, script=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n)]
    cmd += [script] if script else ["-m", "subcache"]
    return subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, env=ENV, cwd=ROOT,
                          timeout=180)


def same_arrays(a, b):
    ga, gb = zarr.open_group(a, mode="r"), zarr.open_group(b, mode="r")
    for split in ("train", "test"):
        for name in ("x", "y", "id"):
            np.testing.assert_array_equal(ga[f"{split}/{name}"][:], gb[f"{split}/{name}"][:])
    assert gb.attrs["status"] == "complete"


@pytest.fixture(scope="module")
def single(tmp_path_factory, npz_path):
    out = str(tmp_path_factory.mktemp("single") / "c.zarr")
    done = subprocess.run([sys.executable, "-m", "subcache", *BUILD, "--data", npz_path, "--out", out], env=ENV,
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return out


@pytest.mark.parametrize("ranks", [2, 3])  # 18 units over 2 or 3 ranks; 12 + 6 chunks: no even split per split
def test_torchrun_build_is_bit_identical(single, npz_path, tmp_path, ranks):
    out = str(tmp_path / "c.zarr")
    done = torchrun(ranks, *BUILD, "--data", npz_path, "--out", out, "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["images"] == 288  # no duplicates, none missing
    same_arrays(single, out)


KILL_RANK_1 = textwrap.dedent("""
    import os, signal, sys
    import subcache.build as b
    calls, original = [0], b._write_unit
    def write(*args):
        calls[0] += 1
        if os.environ["RANK"] == "1" and calls[0] == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        original(*args)
    b._write_unit = write
    from subcache.cli.main import main
    main(sys.argv[1:])
""")


def test_a_rank_killed_mid_build_resumes_correctly(single, npz_path, tmp_path):
    script = tmp_path / "kill.py"
    script.write_text(KILL_RANK_1)
    out = str(tmp_path / "c.zarr")
    killed = torchrun(2, *BUILD, "--data", npz_path, "--out", out, script=str(script))
    assert killed.returncode != 0
    with pytest.raises(subcache.IncompleteStoreError):
        subcache.open_cache(out)
    resumed = torchrun(2, *BUILD, "--data", npz_path, "--out", out, "--resume", "--json")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads(resumed.stdout.strip().splitlines()[-1])["resumed_units"] >= 2
    same_arrays(single, out)


DDP_TRAIN = textwrap.dedent("""
    import os, sys, torch, subcache
    cache, out = sys.argv[1], sys.argv[2]
    backbone = subcache.load_backbone("resnet18", "none", image_size=32)
    config = subcache.TrainConfig(blocks="7-8", epochs=2, batch_size=32, device="cpu", loader="memory")
    model = subcache.train(cache, config, backbone=backbone, out=os.path.join(out, "task")).model
    trained = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    torch.save(trained, os.path.join(out, f"rank{os.environ['RANK']}.pt"))
""")
DDP_CONFIG = subcache.TrainConfig(blocks="7-8", epochs=2, batch_size=32, device="cpu", loader="memory")


class GlobalBatches:
    """What the two ranks see together: step k's batch is rank 0's k-th local batch followed by rank 1's."""

    def __init__(self, loaders):
        self.loaders = loaders
        self.steps_per_epoch = loaders[0].steps_per_epoch
        self.num_samples = sum(lo.num_samples for lo in loaders)
        self.bridged = loaders[0].bridged

    def epoch(self, epoch):
        for parts in zip(*(lo.epoch(epoch) for lo in self.loaders), strict=True):
            assert len({len(p[2]) for p in parts}) == 1  # equal local batches: DDP's mean of means = global mean
            yield torch.cat([p[0] for p in parts]), None, torch.cat([p[2] for p in parts])


def single_process_over_the_same_global_batches(cache, monkeypatch):
    """`train` in this process, fed each step's global batch; each half runs its own forward (BatchNorm batch
    statistics are per rank under DDP), the loss is the mean over the whole batch."""
    import torch.nn.parallel

    from subcache.distributed import Dist

    train_module = sys.modules["subcache.train"]
    real = train_module._training_loader
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", lambda module, **_: module)

    def global_loader(cache, config, model, indices, labels, device, augments, ranks, bank):
        ranked = [real(cache, config, model, indices, labels, device, augments, Dist(r, 2), bank) for r in (0, 1)]
        step = ranked[0][1]
        halves = lambda x: torch.cat([step(h) for h in x.chunk(2)])  # noqa: E731
        return GlobalBatches([r[0] for r in ranked]), halves

    monkeypatch.setattr(train_module, "_training_loader", global_loader)
    backbone = subcache.load_backbone("resnet18", "none", image_size=32)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank (OMP_NUM_THREADS=1): the same kernels, the same float rounding
    try:
        model = subcache.train(cache, DDP_CONFIG, backbone=backbone).model
    finally:
        torch.set_num_threads(threads)
    return {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}


def test_ddp_ranks_end_identical_and_equal_to_one_process_over_the_global_batches(single, tmp_path, monkeypatch):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_TRAIN)
    done = torchrun(2, single, tmp_path, script=str(script))
    assert done.returncode == 0, done.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert rank0.keys() == rank1.keys() and any(k.startswith("tuned_blocks.7.") for k in rank0)
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key  # gradients were all-reduced: the ranks never diverge
    reference = single_process_over_the_same_global_batches(single, monkeypatch)
    assert reference.keys() == rank0.keys()
    for key in rank0:
        torch.testing.assert_close(rank0[key], reference[key], rtol=1e-4, atol=1e-5, msg=key)
    meta = json.loads((tmp_path / "task" / "task.json").read_text())
    assert meta["world_size"] == 2 and meta["metrics"]["num_samples"] == 192


def test_a_second_writer_is_refused_and_a_stale_lock_taken_over(npz_path, tmp_path, resnet18):
    out = str(tmp_path / "c.zarr")
    config = subcache.BuildConfig(out=out, layers=("6",), model="resnet18", weights="none", data=npz_path,
                                  splits=("test",), image_size=32)
    from subcache.distributed import WriterLock

    with WriterLock(out):  # a live writer (an OS lock: flock)
        with pytest.raises(StoreError, match=f"another build \\(pid {os.getpid()} on .*\\) is writing"):
            subcache.build_cache(config, backbone=resnet18)
    assert not os.path.exists(out)
    code = f"from subcache.distributed import WriterLock; import os; WriterLock({out!r}).__enter__(); os._exit(9)"
    dead = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert dead.returncode == 9  # died holding the lock: the kernel released it
    subcache.build_cache(config, backbone=resnet18)
    assert subcache.open_cache(out).status == "complete"


def test_build_train_score_against_s3(s3, npz_path, resnet18, tmp_path):
    url = f"{s3}/run1/c.zarr"
    config = subcache.BuildConfig(out=url, layers=("6",), model="resnet18", weights="none", data=npz_path,
                                  image_size=32)
    subcache.build_cache(config, backbone=resnet18)
    cache = subcache.open_cache(url)
    attrs = json.dumps(cache.attrs)
    assert cache.status == "complete" and "subcache-secret" not in attrs and "subcache-key-id" not in attrs
    result = subcache.train(url, subcache.TrainConfig(blocks="7-8", epochs=2, batch_size=32, loader="stream"),
                            backbone=resnet18, out=str(tmp_path / "task"))
    assert result.test_accuracy > 0.7  # 4 classes: chance is 0.25
    assert subcache.evaluate_task(str(tmp_path / "task"), url, backbone=resnet18) == result.test_accuracy
    scores = subcache.score_pool(url, str(tmp_path / "task"), backbone=resnet18)
    assert len(scores.ids) == 192
    profile = subcache.profile_blocks(url, subcache.ProfileConfig(blocks="8-8", probe=False,
                                                                  train=subcache.TrainConfig(epochs=1)),
                                      backbone=resnet18)
    assert len(profile.rows) == 1
    with pytest.raises(subcache.StoreExistsError):
        subcache.build_cache(config, backbone=resnet18)
