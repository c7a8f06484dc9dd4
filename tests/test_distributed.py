"""torchrun (gloo, CPU) builds and DDP training; caches in object storage (a local S3 server); writer locks."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
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


def test_ddp_training_reaches_single_process_accuracy(single, tmp_path):
    args = ["train", "--cache", single, "--blocks", "7-8", "--epochs", "4", "--batch-size", "32", "--json"]
    one = subprocess.run([sys.executable, "-m", "subcache", *args, "--out", tmp_path / "one"], env=ENV,
                         capture_output=True, text=True, cwd=ROOT)
    two = torchrun(2, *args, "--out", tmp_path / "two")
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    a, b = json.loads(one.stdout), json.loads(two.stdout.strip().splitlines()[-1])
    assert b["num_samples"] == 192 and b["test_accuracy"] >= a["test_accuracy"] - 0.1
    assert json.loads((tmp_path / "two" / "task.json").read_text())["world_size"] == 2


def test_a_second_writer_is_refused_and_a_stale_lock_taken_over(npz_path, tmp_path, resnet18):
    out = str(tmp_path / "c.zarr")
    config = subcache.BuildConfig(out=out, layers=("6",), model="resnet18", weights="none", data=npz_path,
                                  splits=("test",), image_size=32)
    lock = tmp_path / "c.zarr.lock"
    lock.write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename}))
    with pytest.raises(StoreError, match="another build .* is writing"):
        subcache.build_cache(config, backbone=resnet18)
    assert not os.path.exists(out)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(json.dumps({"pid": int(dead.stdout), "host": os.uname().nodename}))
    subcache.build_cache(config, backbone=resnet18)
    assert subcache.open_cache(out).status == "complete" and not lock.exists()


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A real S3-compatible server (moto) on loopback; credentials only through the environment."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                                            "AWS_ENDPOINT_URL")}
    os.environ.update(AWS_ACCESS_KEY_ID="subcache-key-id", AWS_SECRET_ACCESS_KEY="subcache-secret",
                      AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=f"http://{host}:{port}")
    import boto3

    boto3.client("s3").create_bucket(Bucket="caches")
    yield "s3://caches"
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


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
    assert result.test_accuracy is not None
    scores = subcache.score_pool(url, str(tmp_path / "task"), backbone=resnet18)
    assert len(scores.ids) == 192
    profile = subcache.profile_blocks(url, subcache.ProfileConfig(blocks="8-8", probe=False,
                                                                  train=subcache.TrainConfig(epochs=1)),
                                      backbone=resnet18)
    assert len(profile.rows) == 1
    with pytest.raises(subcache.StoreExistsError):
        subcache.build_cache(config, backbone=resnet18)
