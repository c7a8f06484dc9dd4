"""Properties a user would notice, each guarded by one test that fails when the property breaks (issue 19)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import subcache
from subcache.evaluation import cached_logits, open_task


def _frozen_state(backbone):
    """Every parameter and buffer of the backbone: (a copy of its value, its strides)."""
    tensors = dict(backbone.model.named_parameters()) | dict(backbone.model.named_buffers())
    return {k: (v.detach().clone(), v.stride()) for k, v in tensors.items()}


def _resnet_cache(tmp_path_factory, npz_path, resnet18, layer: str, dtype: str) -> str:
    """`resnet_cache`'s data cached at ``layer`` in ``dtype``."""
    out = str(tmp_path_factory.mktemp(f"r18_{layer}_{dtype}") / "c.zarr")
    subcache.build_cache(subcache.BuildConfig(out=out, layers=(layer,), model="resnet18", weights="none",
                                              data=npz_path, image_size=32, dtype=dtype, batch_size=32),
                         backbone=resnet18)
    return out


@pytest.fixture(scope="module")
def early_cache(tmp_path_factory, npz_path, resnet18):
    """The same data as `resnet_cache`, cached one block earlier (block 5's input), float32."""
    return _resnet_cache(tmp_path_factory, npz_path, resnet18, "5", "float32")


@pytest.fixture(scope="module")
def task7(resnet_cache, resnet18, tmp_path_factory):
    """A task tuning block 7, trained on the block-6 cache."""
    out = str(tmp_path_factory.mktemp("task7") / "t")
    subcache.train(resnet_cache, subcache.TrainConfig(blocks="7", epochs=1, batch_size=32, device="cpu"),
                   out=out, backbone=resnet18)
    return out


# --- 1. real defects ------------------------------------------------------------------------------------------
def test_a_task_evaluates_on_a_cache_built_before_its_own_layer(task7, resnet_cache, early_cache, resnet18):
    """A task trained at block 6's input runs on a block-5 cache (block 5 runs frozen on the fly): same logits."""
    _, cache6, model6, _ = open_task(task7, resnet_cache, "cpu", resnet18)
    _, cache5, model5, _ = open_task(task7, early_cache, "cpu", resnet18)
    assert model5.start == 5
    torch.testing.assert_close(cached_logits(model5, cache5, "test"), cached_logits(model6, cache6, "test"),
                               rtol=1e-4, atol=1e-4)
    assert subcache.load_task(task7).model(resnet18, start=5).start == 5  # without the cache's shape: probed


def test_channels_last_runs_never_change_the_shared_frozen_blocks(resnet_cache, resnet18):
    """Runs on one backbone with channels_last on (CUDA's default, forced here on the CPU): every frozen
    parameter and buffer keeps its value and its memory layout, so a later run sees what an earlier one saw."""
    before = _frozen_state(resnet18)
    results = []
    for blocks in ("7", "6,8", "7"):
        config = subcache.TrainConfig(blocks=blocks, epochs=1, batch_size=32, seed=3, device="cpu", limit=64,
                                      channels_last=True)
        results.append(subcache.train(resnet_cache, config, backbone=resnet18))
    assert results[0].model.block(7).conv1.weight.is_contiguous(memory_format=torch.channels_last)  # it was on
    after = _frozen_state(resnet18)
    assert before.keys() == after.keys()
    for key, (value, stride) in before.items():
        assert after[key][1] == stride, key
        assert torch.equal(after[key][0], value), key
    first, last = results[0].model.task_state(), results[2].model.task_state()
    assert all(torch.equal(first[k], last[k]) for k in first)  # the same run twice: the same result


def test_a_skip_fails_the_suite_unless_the_test_is_marked_gpu(tmp_path):
    """The suite's own conftest on planted tests: a plain skip and a module skipped whole fail; a `gpu` test's skip
    and an expected failure do not."""
    (tmp_path / "test_a.py").write_text(textwrap.dedent("""
        import pytest
        def test_skipped(): pytest.skip("no thing")
        @pytest.mark.gpu
        def test_gpu(): pytest.skip("no cuda")
        @pytest.mark.xfail(reason="known")
        def test_expected(): assert False
        def test_ok(): pass
        """))
    (tmp_path / "test_b.py").write_text("import pytest\npytest.importorskip('no_such_module_xyz')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    run = subprocess.run([sys.executable, "-m", "pytest", "-p", "conftest", "-c", os.devnull, "-q", "-p",
                          "no:cacheprovider", "--continue-on-collection-errors", "-W", "ignore", str(tmp_path)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert "1 failed, 1 passed, 1 skipped, 1 xfailed, 1 error" in run.stdout, run.stdout[-2000:]
    assert "FAILED" in run.stdout and "test_skipped - unexpected skip" in run.stdout


# --- 2. properties no test guarded ----------------------------------------------------------------------------
def _flip_first_chunk_byte(store: Path, split: str, array: str) -> None:
    """Flip one byte in chunk 0 of ``split/array`` (a path inside the split: ``x``, ``labels/NAME``)."""
    chunk = store / split / array / "c"
    while chunk.is_dir():
        chunk = chunk / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def full_store(tmp_path_factory, npz_path, resnet18):
    """A small int8 cache with every kind of array: x, x_flip, x_scale, y, id, key and a label set."""
    out = tmp_path_factory.mktemp("full") / "full.zarr"
    subcache.build_cache(subcache.BuildConfig(out=str(out), layers=("3",), model="resnet18", weights="none",
                                              data=npz_path, image_size=32, batch_size=16, limit=32,
                                              dtype="int8", flip_views=True), backbone=resnet18)
    ids = subcache.open_cache(out).group["train/id"][:]
    csv = tmp_path_factory.mktemp("labels") / "parity.csv"
    csv.write_text("id,label\n" + "".join(f"{i},{'odd' if i % 2 else 'even'}\n" for i in ids))
    subcache.add_labels(out, "parity", csv)
    return out


def test_verify_names_a_damaged_chunk_in_every_array(full_store, tmp_path):
    from subcache.verify import verify_cache

    arrays = ["x", "x_flip", "x_scale", "y", "id", "key", "labels/parity"]
    assert verify_cache(str(full_store))["ok"]
    for name in arrays:
        damaged = Path(shutil.copytree(full_store, tmp_path / name.replace("/", "_")))
        _flip_first_chunk_byte(damaged, "train", name)
        report = verify_cache(str(damaged))
        assert not report["ok"], name
        assert [(b["split"], b["array"], b["chunk"]) for b in report["bad"]] == [("train", name, 0)]


@pytest.fixture(scope="module")
def int8_cache(tmp_path_factory, npz_path, resnet18):
    """`resnet_cache`'s data and layer (block 6's input), stored in int8."""
    return _resnet_cache(tmp_path_factory, npz_path, resnet18, "6", "int8")


def test_evaluate_score_and_train_on_an_int8_cache_equal_the_float32_cache(task7, resnet_cache, int8_cache,
                                                                           resnet18):
    """int8 codes are dequantized everywhere a split is scored: the same task gives the same accuracy and the same
    predictions on both caches, and training on either reports the same test accuracy."""
    from subcache.evaluation import evaluate_task

    accuracy = {c: evaluate_task(task7, c, device="cpu", backbone=resnet18) for c in (resnet_cache, int8_cache)}
    assert accuracy[int8_cache] == accuracy[resnet_cache]
    scores = {c: subcache.score_pool(c, task7, split="test", device="cpu", backbone=resnet18)
              for c in (resnet_cache, int8_cache)}
    np.testing.assert_array_equal(scores[int8_cache].pred, scores[resnet_cache].pred)
    np.testing.assert_allclose(scores[int8_cache].prob, scores[resnet_cache].prob, atol=0.02)
    config = subcache.TrainConfig(blocks="7", epochs=1, batch_size=32, seed=5, device="cpu", limit=64)
    trained = {c: subcache.train(c, config, backbone=resnet18).test_accuracy for c in (resnet_cache, int8_cache)}
    assert trained[int8_cache] == trained[resnet_cache]


@pytest.mark.parametrize("zstd, lz4, raw, want", [
    (86, 100, 1000, "lz4"),  # zstd saves 14 % over lz4: the fast codec
    (85, 100, 1000, "zstd"),  # 15 %: zstd
    (84, 100, 1000, "zstd"),
    (860, 1000, 1000, "none"),  # lz4 saves nothing over raw, zstd 14 %: raw
    (850, 1001, 1000, "zstd"),  # zstd 15 % over raw (lz4 larger than raw)
])
def test_codec_auto_keeps_zstd_only_where_it_saves_15_percent_over_the_fast_choice(monkeypatch, zstd, lz4, raw,
                                                                                   want):
    """The rule on measured sizes (a stand-in Blosc reports them): zstd where it is ≤ 85 % of min(lz4, raw), else
    lz4 where lz4 saves anything over raw, else none."""
    import numcodecs

    from subcache.store import choose_codec

    class Sized:
        SHUFFLE = numcodecs.Blosc.SHUFFLE

        def __init__(self, cname, clevel, shuffle):
            self.size = {"zstd": zstd, "lz4": lz4}[cname]

        def encode(self, data):
            return b"\0" * self.size

    monkeypatch.setattr(numcodecs, "Blosc", Sized)
    codec, measured = choose_codec(np.zeros(raw, np.uint8))
    assert codec == want
    assert measured == {"raw_bytes": raw, "zstd_bytes": zstd, "lz4_bytes": lz4}


def test_fisher_pp_is_the_windows_fisher_over_its_parameter_count(resnet_cache, resnet18):
    """Blocks 6-8 of resnet18 differ in size (layer3.1: 1.2 M parameters, layer4.0: 2.1 M, layer4.1: 4.7 M)."""
    from subcache.selection.rank import RankConfig, rank_windows

    config = RankConfig(blocks="6-8", widths=(1, 2, 3), methods=("fisher", "fisher_pp"), samples=16,
                        train=subcache.TrainConfig(device="cpu", limit=32))
    result = rank_windows(resnet_cache, config, backbone=resnet18)
    params = {b: sum(p.numel() for p in resnet18.block(b).parameters()) for b in (6, 7, 8)}
    assert len(set(params.values())) == 3
    assert len(result.ranking) == 6
    for row in result.ranking:
        fisher = sum(result.blocks[b]["fisher"] for b in row["window"])
        assert row["fisher"] == pytest.approx(fisher, rel=1e-9)
        assert row["fisher_pp"] == pytest.approx(fisher / sum(params[b] for b in row["window"]), rel=1e-9)
    for b, scores in result.blocks.items():
        assert scores["fisher_pp"] == pytest.approx(scores["fisher"] / params[b], rel=1e-9)


@pytest.fixture(scope="module")
def planted_cache(tmp_path_factory):
    """test_rank's planted cache: four 3-channel 1×1-conv blocks at 8 px (fast to rank and train)."""
    from test_rank import planted_backbone, planted_npz

    root = tmp_path_factory.mktemp("planted")
    backbone, out = planted_backbone(), str(root / "planted.zarr")
    subcache.build_cache(subcache.BuildConfig(out=out, layers=("1",), model="planted", weights="none",
                                              data=planted_npz(root / "planted.npz"), image_size=8,
                                              dtype="float32"), backbone=backbone)
    return out, backbone


def test_halving_keeps_the_best_ceil_n_over_eta_of_each_rung(planted_cache, monkeypatch):
    """Runs stubbed with distinct validation scores that change from rung to rung: each rung keeps exactly its best
    ⌈n/η⌉, and the pick is the last rung's best."""
    import subcache.selection.halving as profiling

    cache, backbone = planted_cache
    base = {"1": 0.30, "2": 0.90, "3": 0.50, "4": 0.10, "1-2": 0.70, "2-3": 0.60, "3-4": 0.80}
    flipped = {"1-2": 0.1, "3-4": 0.2, "2": 0.3, "2-3": 0.4}  # rung 1 (2 epochs): another order

    def stub(cache, config, backbone, bank, split):
        val = (flipped if config.epochs == 2 else base)[config.blocks] + config.seed / 1000
        return {"test_accuracy": val / 2, "trainable_params": 1, "seconds": 0.0, "val_accuracy": val}

    monkeypatch.setattr(profiling, "run_windows", lambda cache, configs, backbone, bank, split, batch_runs="off":
                        [stub(cache, c, backbone, bank, split) for c in configs])
    train = subcache.TrainConfig(epochs=4, batch_size=32, device="cpu")
    config = profiling.ProfileConfig(widths=(1, 2), halving=True, eta=2, min_epochs=1, seeds=2, train=train,
                                     val_fraction=0.25)
    result = profiling.halving_profile(cache, config, backbone=backbone)
    assert [(r["epochs"], len(r["windows"])) for r in result.rungs] == [(1, 7), (2, 4), (4, 2)]
    assert sorted(result.rungs[0]["kept"]) == sorted(["2", "3-4", "1-2", "2-3"])  # ⌈7/2⌉ = 4 best of base
    assert sorted(result.rungs[1]["kept"]) == sorted(["2-3", "2"])  # ⌈4/2⌉ = 2 best of the rung-1 scores
    assert result.rungs[2]["kept"] == ["2"] and result.best["blocks"] == "2"  # base: 2 (0.9) beats 2-3 (0.6)
    assert result.best["val_accuracy"] == pytest.approx(0.9005)  # the mean over seeds


def test_validation_accuracy_is_computed_on_exactly_the_validation_positions(resnet_cache, resnet18, tmp_path,
                                                                            monkeypatch):
    """In a copy of the cache each validation item holds the activations of an item of the next class, so a trained
    model gets them (nearly) all wrong and the rest mostly right: a run's val_accuracy equals the accuracy computed
    by hand on exactly the validation positions, with and without the shared activation bank."""
    import zarr

    from subcache.bank import ActivationBank
    from subcache.selection import validation_split

    moved = str(shutil.copytree(resnet_cache, tmp_path / "moved.zarr"))
    config = subcache.TrainConfig(blocks="8", epochs=1, batch_size=32, device="cpu", seed=2)
    cache = subcache.open_cache(moved)
    fit, val = validation_split(cache, config, 0.25)
    y = cache.read_y("train")
    x = zarr.open_array(f"{moved}/train/x", mode="r+")
    donor = {c: fit[y.numpy()[fit] == (c + 1) % 4][0] for c in range(4)}
    x[np.sort(val)] = x[:][[donor[int(c)] for c in y.numpy()[np.sort(val)]]]
    models = []
    import subcache.batched as batched  # a run's training goes through batched.train_many

    real_train = batched.train
    monkeypatch.setattr(batched, "train", lambda *a, **kw: models.append(real_train(*a, **kw)) or models[-1])

    def accuracy_on(model, rows):
        with torch.no_grad():
            pred = model(cache.read_x("train")[torch.from_numpy(rows)].float()).argmax(1)
        return (pred == y[torch.from_numpy(rows)]).float().mean().item()

    for bank in (None, ActivationBank(cache, resnet18, torch.device("cpu"))):
        row = batched.run_windows(cache, [config], resnet18, bank, (fit, val))[0]
        model = models[-1].model.eval()
        assert row["val_accuracy"] == pytest.approx(accuracy_on(model, val), abs=1e-9)
        assert row["val_accuracy"] < 0.2 and accuracy_on(model, fit) > 0.7  # the planted difference is there


def test_rank_never_reads_the_validation_positions(planted_cache, tmp_path):
    """The validation items' activations are NaN in a copy of the cache: rank with that --val-fraction still scores
    every window finitely (reading one of them would make a score NaN, which rank refuses)."""
    import zarr

    from subcache.errors import TrainingError
    from subcache.selection import validation_split
    from subcache.selection.rank import RankConfig, rank_windows

    cache_path, backbone = planted_cache
    poisoned = str(shutil.copytree(cache_path, tmp_path / "poisoned.zarr"))
    train = subcache.TrainConfig(device="cpu")
    val = validation_split(subcache.open_cache(poisoned), train, 0.25)[1]
    x = zarr.open_array(f"{poisoned}/train/x", mode="r+")
    x[np.sort(val)] = np.nan
    config = RankConfig(val_fraction=0.25, samples=64, train=train)
    result = rank_windows(poisoned, config, backbone=backbone)
    assert len(result.ranking) == 4 and result.ranking[0]["blocks"] == "3"
    with pytest.raises(TrainingError, match="non-finite"):  # the poison works: without the split it is read
        rank_windows(poisoned, RankConfig(samples=64, train=train), backbone=backbone)


def _small_build(out, data, **kw):
    return subcache.BuildConfig(out=str(out), data=str(data), layers=("2",), model="resnet18", weights="none",
                                image_size=32, dtype="float32", batch_size=16, limit=8, **kw)


def test_an_out_that_contains_the_source_or_lies_inside_it_is_refused(tmp_path, npz_path, resnet18):
    """Both directions of overlap, for `build` (an .npz source) and `build --from` (a cache source), even with
    --overwrite: the source is never touched."""
    from subcache.derive import DeriveConfig, derive_cache
    from subcache.errors import ConfigError

    outer = tmp_path / "outer.zarr"
    subcache.build_cache(_small_build(outer, npz_path), backbone=resnet18)
    inner = outer / "inner.zarr"  # a store inside a store: the source lies inside the --out
    subcache.build_cache(_small_build(inner, npz_path), backbone=resnet18)
    data = Path(shutil.copy(npz_path, outer / "data.npz"))
    before = {p: p.read_bytes() for p in sorted(outer.rglob("*")) if p.is_file()}
    attempts = [lambda: derive_cache(DeriveConfig(source=str(inner), out=str(outer), layers=("4",), overwrite=True),
                                     backbone=resnet18),  # --out contains the source
                lambda: derive_cache(DeriveConfig(source=str(outer), out=str(inner / "d.zarr"), layers=("4",),
                                                  overwrite=True), backbone=resnet18),  # --out inside the source
                lambda: subcache.build_cache(_small_build(outer, data, overwrite=True), backbone=resnet18),
                lambda: subcache.build_cache(_small_build(outer, data, resume=True), backbone=resnet18)]
    for attempt in attempts:
        with pytest.raises(ConfigError, match="overlaps the build's source"):
            attempt()
    assert {p: p.read_bytes() for p in sorted(outer.rglob("*")) if p.is_file()} == before
    from PIL import Image

    folder = tmp_path / "images"  # an ImageFolder source with --out inside it
    for split in ("train", "test"):
        for c in ("a", "b"):
            (folder / split / c).mkdir(parents=True)
            Image.new("RGB", (32, 32), (9, 9, 9)).save(folder / split / c / "0.png")
    with pytest.raises(ConfigError, match="overlaps the build's source"):
        subcache.build_cache(_small_build(folder / "c.zarr", folder), backbone=resnet18)
    assert sorted(p.name for p in folder.rglob("*") if p.is_file()) == ["0.png"] * 4  # no lock file left inside
    assert not (folder / "c.zarr").exists()


def test_score_exclude_keeps_each_ids_own_prediction_and_probability(task7, resnet_cache, resnet18):
    everything = subcache.score_pool(resnet_cache, task7, split="train", device="cpu", backbone=resnet18)
    assert len(set(everything.pred.tolist())) > 1  # predictions differ between items
    excluded = everything.ids[::3]
    some = subcache.score_pool(resnet_cache, task7, split="train", exclude=excluded, device="cpu", backbone=resnet18)
    assert sorted(some.ids.tolist()) == sorted(set(everything.ids.tolist()) - set(excluded.tolist()))
    row = {int(i): k for k, i in enumerate(everything.ids)}
    for k, i in enumerate(some.ids):
        j = row[int(i)]
        columns = ("pred", "prob", "score", "keys", "positions")
        assert [getattr(some, c)[k] for c in columns] == [getattr(everything, c)[j] for c in columns]


@pytest.mark.parametrize("norm, removed", [("l1", {0, 1}), ("l2", {2, 3})])
def test_prune_norm_removes_the_channels_with_the_smallest_norm(norm, removed):
    """A tuned block 4 → 8 → 4 (1×1 convs) whose 8 hidden channels have known norms: channels 0-1 have the
    smallest L1 norms, 2-3 the smallest L2 norms (the output convolution's columns are all alike, so only the first
    convolution's rows decide). Pruning a quarter removes exactly those."""
    from torch import nn

    from subcache.backbones import Backbone, Preprocess
    from subcache.pruning import PruneConfig, prune_tuned_blocks
    from subcache.tuned import TunedModel

    block = nn.Sequential(nn.Conv2d(4, 8, 1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    rows = torch.tensor([[2.5, 0, 0, 0], [2.6, 0, 0, 0], [0.9] * 4, [0.95] * 4,  # L1 2.5, 2.6, 3.6, 3.8;
                         [4.0] * 4, [4.1] * 4, [4.2] * 4, [4.3] * 4])  # L2 2.5, 2.6, 1.8, 1.9; then larger
    with torch.no_grad():
        block[0].weight.copy_(rows.view(8, 4, 1, 1))
        block[0].bias.zero_()
        block[2].weight.fill_(0.5)
    pre = Preprocess(image_size=4, mean=(0.0,) * 3, std=(1.0,) * 3, interpolation="bilinear", crop_pct=1.0)
    backbone = Backbone.from_modules(nn.Conv2d(3, 4, 1), [block, nn.Identity()],
                                     nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()), pre, model_id="norms")
    model = TunedModel(backbone, 1, (1,), 2, (4, 4, 4))
    prune_tuned_blocks(model, (4, 4, 4), PruneConfig(0.25, norm))
    kept = model.tuned_blocks["1"][0].weight.detach().view(-1, 4)
    assert kept.shape == (6, 4)
    kept_rows = {next(i for i in range(8) if torch.equal(rows[i], r)) for r in kept}
    assert set(range(8)) - kept_rows == removed


def test_lr_follows_one_cosine_over_all_steps_and_weight_decay_reaches_the_optimiser(resnet_cache, tmp_path,
                                                                                      monkeypatch):
    """Through the CLI: the learning rate of every optimiser step, over all epochs, is one cosine from --lr down to
    near 0, and every parameter group decays by --weight-decay (not AdamW's default)."""
    import importlib
    import math

    from click.testing import CliRunner

    from subcache.cli.main import main

    train_module = importlib.import_module("subcache.step")  # where a run's AdamW is made

    seen = []
    real = train_module.optimizer

    def spy(*args, **kwargs):
        opt = real(*args, **kwargs)
        opt.register_step_pre_hook(lambda o, a, k: seen.append([(g["lr"], g["weight_decay"]) for g in o.param_groups]))
        return opt

    monkeypatch.setattr(train_module, "optimizer", spy)
    result = CliRunner().invoke(main, ["train", "--cache", resnet_cache, "--blocks", "none", "--epochs", "2",
                                       "--batch-size", "32", "--lr", "0.004", "--weight-decay", "0.123", "--device", "cpu", "--out",
                                       str(tmp_path / "t"), "--json"])
    assert result.exit_code == 0, result.output
    steps = 2 * 192 // 32
    assert len(seen) == steps
    for k, groups in enumerate(seen):
        for lr, decay in groups:
            assert lr == pytest.approx(0.004 * (1 + math.cos(math.pi * k / steps)) / 2, rel=1e-9, abs=1e-12)
            assert decay == 0.123
    assert seen[-1][0][0] < 0.02 * 0.004


def test_a_label_file_in_any_row_order_labels_each_id(full_store, tmp_path):
    from subcache.labels import label_classes, read_labels

    store = str(shutil.copytree(full_store, tmp_path / "c.zarr"))
    ids = subcache.open_cache(store).group["train/id"][:]
    want = {int(i): f"k{int(i) * 7 % 5}" for i in ids}
    order = np.random.default_rng(4).permutation(len(ids))
    assert not np.array_equal(order, np.arange(len(ids)))
    (tmp_path / "shuffled.csv").write_text("label,id\n" + "".join(f"{want[int(ids[p])]},{ids[p]}\n" for p in order))
    subcache.add_labels(store, "sevens", tmp_path / "shuffled.csv")
    cache = subcache.open_cache(store)
    values, count = read_labels(cache, "train", "sevens")
    names = label_classes(cache, "train", "sevens")
    assert count == 5 and [names[v] for v in values.tolist()] == [want[int(i)] for i in ids]


@pytest.fixture(scope="module")
def forking_tasks(task7, resnet_cache, resnet18, tmp_path_factory):
    """Tasks on the block-6 cache forking at blocks 8, 6 and 7 (in that order)."""
    root = tmp_path_factory.mktemp("forks")
    dirs = []
    for blocks in ("8", "6"):
        dirs.append(str(root / f"t{blocks}"))
        subcache.train(resnet_cache, subcache.TrainConfig(blocks=blocks, epochs=1, batch_size=32, device="cpu"),
                       out=dirs[-1], backbone=resnet18)
    return [*dirs, task7]


def _alone(task_dir, backbone, x):
    """A task run by itself: its own TunedModel on the prefix's output at its cache layer."""
    task = subcache.load_task(task_dir)
    with torch.no_grad():
        return task.model(backbone)(backbone.prefix(x, task.start))


def test_multitask_predict_and_export_without_the_original_equal_each_task_alone(forking_tasks, resnet18, npz_path,
                                                                                tmp_path):
    from subcache.data import open_source, to_input
    from subcache.export import export
    from subcache.multitask import MultiTaskModel, predict

    source = open_source(npz_path, "test", limit=12)
    x = to_input(source.load(0, 12, resnet18.preprocess), resnet18.preprocess)
    alone = {Path(d).name: _alone(d, resnet18, x) for d in forking_tasks}
    model = MultiTaskModel.from_tasks(resnet18, forking_tasks, include_original=False)
    with torch.no_grad():
        together = model(x)
    assert set(together) == set(alone)
    for name, logits in alone.items():
        torch.testing.assert_close(together[name], logits, rtol=1e-5, atol=1e-5)
    got = predict(forking_tasks, npz_path, limit=12, device="cpu", backbone=resnet18)
    for name, logits in alone.items():
        probs = logits.softmax(1).max(1)
        np.testing.assert_array_equal(got.preds[name], probs.indices.numpy())
        np.testing.assert_allclose(got.probs[name], probs.values.numpy(), rtol=1e-5)
    meta = export(forking_tasks, "torchscript", tmp_path / "m.pt", backbone=resnet18)
    outputs = torch.jit.load(str(tmp_path / "m.pt"))(x)
    for name, logits in zip(meta["outputs"], outputs):
        torch.testing.assert_close(logits, alone[name], rtol=1e-5, atol=1e-5)
