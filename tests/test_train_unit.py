"""train.py's parts, exactly and fast (each test kills mutants that `examples/mutation.sh train` found surviving the
end-to-end training tests)."""
from __future__ import annotations

import importlib
import json
import shutil
from types import SimpleNamespace

import pytest
import torch
import zarr

import subcache
from subcache.errors import TrainingError
from subcache.train import Best, Run, Trainable, TrainResult, task_record

train_mod = importlib.import_module("subcache.train")  # `subcache.train` the attribute is the function


def clockwork(*values) -> SimpleNamespace:
    """A stand-in for train's `time` module: each perf_counter() call returns the next scripted value."""
    return SimpleNamespace(perf_counter=iter(values).__next__)


def result(**changes) -> TrainResult:
    return TrainResult(**{"model": None, "test_accuracy": 0.5, "train_accuracy": 0.75, "train_seconds": 1.234567,
                          "trainable_params": 10, "samples_per_second": 123.456, "blocks": (3, 4), "num_samples": 64,
                          **changes})


def test_a_result_s_metrics_name_every_figure_and_the_chosen_epoch_only_under_validation():
    plain = {"test_accuracy": 0.5, "train_accuracy": 0.75, "train_seconds": 1.2346, "trainable_params": 10,
             "samples_per_second": 123.5, "num_samples": 64, "blocks": [3, 4], "loader": "memory",
             "param_fraction": 1.0}
    assert result().metrics() == plain
    assert result(val_accuracy=0.6, best_epoch=2, loader="stream").metrics() == {
        "val_accuracy": 0.6, "best_epoch": 2, **plain, "loader": "stream"}


class Weights:
    """A model stand-in: its task state is one tensor; load_state_dict records what it was given."""

    def __init__(self):
        self.w, self.loaded = torch.zeros(1), []

    def task_state(self):
        return {"w": self.w}

    def load_state_dict(self, state, strict=True):
        self.loaded.append((state, strict))


def test_validation_keeps_the_first_best_epoch_s_weights():
    model, scores = Weights(), iter([0.5, 0.7, 0.7, 0.6])
    best = Best(model, lambda: next(scores))
    rows = []
    for epoch in range(1, 5):
        model.w = torch.tensor([float(epoch)])
        rows.append({"epoch": epoch})
        best(rows[-1])
    assert [r["val_accuracy"] for r in rows] == [0.5, 0.7, 0.7, 0.6] and (best.best, best.epoch) == (0.7, 2)
    best.restore()
    assert model.loaded == [({"w": torch.tensor([2.0])}, False)]
    zero = Best(Weights(), lambda: 0.0)  # an epoch scoring 0 is still the best so far
    zero({"epoch": 1})
    assert (zero.best, zero.epoch) == (0.0, 1) and Best(Weights(), lambda: 0.0).epoch == 0


def test_a_failed_run_saves_its_last_good_weights_as_incomplete_only_with_a_saver():
    model, saved = Weights(), []
    run = SimpleNamespace(model=model, saver=lambda **kw: saved.append(kw) or "task-dir")
    good = {"w": torch.ones(1)}
    error = Run.stopped(run, TrainingError("the loss became nan"), good)
    assert str(error) == "the loss became nan; the last good weights are in task-dir (marked incomplete)"
    assert saved == [{"metrics": {}, "complete": False, "stopped": "the loss became nan"}]
    assert model.loaded == [(good, False)]
    exc = TrainingError("x")
    assert Run.stopped(run, exc, None) is exc and Run.stopped(SimpleNamespace(saver=None), exc, good) is exc


def test_the_trainable_part_is_what_ddp_wraps():
    part = SimpleNamespace(trainable_part=lambda x: x * 2)
    assert Trainable.forward(SimpleNamespace(model=part), torch.ones(2)).tolist() == [2.0, 2.0]


def test_a_task_records_its_cache_blocks_and_how_its_inputs_were_made(int8_store, resnet18, tmp_path):
    from subcache.inputs import recorded

    out = shutil.copytree(int8_store, tmp_path / "c.zarr")
    group = zarr.open_group(str(out), mode="r+")
    old = {k: v for k, v in group.attrs["preprocess"].items() if k not in ("resize", "source", "antialias")}
    group.attrs["preprocess"] = old  # a cache from before `resize` was recorded: derived from its data (an .npz)
    cache = subcache.open_cache(out)
    config = subcache.TrainConfig(blocks="3-4", epochs=1, test_split=None)
    model = SimpleNamespace(tuned=(3, 4))
    record = task_record(cache, resnet18, model, config, {"m": 1}, complete=True, extra=5)
    assert record["preprocess"] == recorded(old, cache.attrs["data"]) and record["preprocess"]["source"] == "array"
    assert {k: record[k] for k in ("complete", "cache", "cache_layer", "cache_layer_name", "sample_shape", "blocks",
                                   "block_names", "labels", "metrics", "extra")} == {
        "complete": True, "cache": cache.path, "cache_layer": 3, "cache_layer_name": "layer2.0",
        "sample_shape": list(cache.sample_shape), "blocks": [3, 4], "block_names": ["layer2.0", "layer2.1"],
        "labels": None, "metrics": {"m": 1}, "extra": 5}
    assert record["config"] == json.loads(json.dumps(record["config"])) and record["config"]["blocks"] == "3-4"


def test_a_task_on_a_label_set_records_its_classes(int8_store, resnet18):
    cache = subcache.open_cache(int8_store)
    config = subcache.TrainConfig(blocks="3", epochs=1, labels="parity", siamese=True)
    record = task_record(cache, resnet18, SimpleNamespace(tuned=(3,)), config, {}, complete=False)
    assert (record["classes"], record["labels"], record["siamese"]) == (["even", "odd"], "parity", True)
    assert task_record(cache, resnet18, SimpleNamespace(tuned=(3,)), subcache.TrainConfig(blocks="3"), {},
                       complete=False)["classes"] == cache.classes == ["0", "1", "2", "3"]


def test_a_task_records_its_pruned_shapes_only_when_pruned_and_the_versions(int8_store, resnet18, monkeypatch):
    cache, model = subcache.open_cache(int8_store), SimpleNamespace(tuned=(3,))
    monkeypatch.setattr(train_mod, "pruned_shapes", lambda m: {"of": m.tuned})
    pruned = task_record(cache, resnet18, model, subcache.TrainConfig(blocks="3", prune=0.5), {}, complete=True)
    plain = task_record(cache, resnet18, model, subcache.TrainConfig(blocks="3"), {}, complete=True)
    assert (pruned["pruned_shapes"], plain["pruned_shapes"]) == ({"of": (3,)}, None)
    assert plain["versions"] == {"subcache": subcache.__version__, "torch": torch.__version__,
                                 "zarr": zarr.__version__}


@pytest.mark.parametrize("siamese", [False, True])
def test_with_a_limit_the_cache_and_the_live_prefix_train_on_the_same_balanced_subset(resnet_cache, npz_path,
                                                                                      resnet18, siamese):
    from subcache.train import train_reference

    config = subcache.TrainConfig(blocks="7", epochs=1, batch_size=16, seed=2, limit=40, device="cpu",
                                  siamese=siamese)
    from_cache = subcache.train(resnet_cache, config, backbone=resnet18)
    reference, history, _ = train_reference(subcache.open_source(npz_path, "train"), resnet18, 6, config, 4)
    assert from_cache.num_samples == 40
    for key, value in reference.task_state().items():
        torch.testing.assert_close(from_cache.model.task_state()[key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_under_validation_the_result_is_the_best_epoch_s(resnet_cache, resnet18):
    import numpy as np

    from subcache.train import TrainData

    config = subcache.TrainConfig(blocks="none", epochs=4, batch_size=32, lr=0.05, seed=0, device="cpu")
    data = TrainData(positions=np.arange(64), val_positions=np.arange(150, 190))
    result = subcache.train(resnet_cache, config, data, backbone=resnet18)
    vals = [row["val_accuracy"] for row in result.history]
    best = vals.index(max(vals)) + 1
    assert len(set(vals)) > 1 and result.best_epoch == best and result.val_accuracy == max(vals)
    assert result.train_accuracy == result.history[best - 1]["train_accuracy"]
    assert (result.num_samples, result.trainable_params, result.param_fraction) == (
        64, result.model.trainable_params(), 1.0)
    assert result.test_accuracy is not None and result.loader == "device"
    assert result.samples_per_second == pytest.approx(4 * 64 / result.train_seconds)


def test_a_cache_without_a_test_split_trains_unscored(resnet_cache, resnet18):
    config = subcache.TrainConfig(blocks="none", epochs=1, batch_size=64, limit=64, device="cpu", test_split=None)
    assert subcache.train(resnet_cache, config, backbone=resnet18).test_accuracy is None


def test_inside_alone_a_torchrun_rank_trains_as_a_world_of_its_own(monkeypatch):
    from subcache.distributed import Dist
    from subcache.train import alone, this_process

    monkeypatch.setattr(Dist, "from_env", classmethod(lambda cls: cls(3, 4, 1)))
    assert this_process() == Dist(3, 4, 1)
    with alone():
        assert this_process() == Dist(0, 1, 1)
    assert this_process() == Dist(3, 4, 1) and train_mod._ALONE.get() is False


def test_the_clock_sums_the_scoring_seconds_of_every_call(monkeypatch):
    from subcache.train import Clock

    monkeypatch.setattr(train_mod, "time", clockwork(10.0, 12.5, 20.0, 21.0))
    clock = Clock()
    timed = clock.timed(lambda: 0.75)
    assert clock.timed(None) is None and timed() == 0.75 and timed() == 0.75
    assert clock.scoring == 3.5 and clock.steps == 0.0


def test_blocks_before_the_cache_s_layer_are_refused_naming_the_first(resnet_cache, resnet18):
    from subcache.errors import BlockError
    from subcache.train import check_blocks

    cache = subcache.open_cache(resnet_cache)
    check_blocks((6, 7), cache)
    with pytest.raises(BlockError) as e:
        check_blocks((4, 5, 6), cache)
    assert str(e.value) == ("block 4 comes before this cache's layer: the earliest block this cache can train is 6 "
                            "(layer3.1); rebuild with --layer 4")


@pytest.fixture
def flip_store(tmp_path, npz_path, resnet18):
    out = tmp_path / "flip.zarr"
    subcache.build_cache(subcache.BuildConfig(out=str(out), layers=("3",), model="resnet18", weights="none",
                                              data=npz_path, image_size=32, limit=8, splits=("train",),
                                              flip_views=True), backbone=resnet18, progress=False)
    return subcache.open_cache(out)


def test_the_loader_is_the_one_asked_for_with_mirrored_views_only_for_flip(flip_store, monkeypatch):
    from subcache.errors import ConfigError
    from subcache.loader import DeviceLoader, StreamLoader, split_nbytes
    from subcache.train import make_loader

    model, labels, cpu = SimpleNamespace(start=3, first_trainable=3), flip_store.read_y("train"), torch.device("cpu")

    def loader(mode, augments=("flip",)):
        return make_loader(flip_store, subcache.TrainConfig(loader=mode), model, None, labels, cpu, augments)

    memory, stream = loader("memory"), loader("stream")
    assert type(memory) is DeviceLoader and memory.x_flip is not None
    assert type(stream) is StreamLoader and stream.flip_views is True
    assert loader("memory", ("crop",)).x_flip is None and loader("stream", ("crop",)).flip_views is False
    assert type(loader("auto")) is DeviceLoader  # 8 items fit
    need = split_nbytes(flip_store, "train", len(labels))
    for budget, chosen in ((2 * need, DeviceLoader), (2 * need - 1, StreamLoader)):  # resident within half the budget
        monkeypatch.setattr(train_mod, "memory_budget", lambda device, b=budget: b)
        assert type(loader("auto")) is chosen and type(loader("memory")) is DeviceLoader
    with pytest.raises(ConfigError) as e:
        loader("disk")
    assert str(e.value) == "unknown loader 'disk'; allowed: auto, memory, stream"


def test_streaming_the_training_split_trains_the_same_weights_as_keeping_it_resident(resnet_cache, resnet18):
    runs = {mode: subcache.train(resnet_cache, subcache.TrainConfig(blocks="7", epochs=1, batch_size=16, limit=40,
                                                                    seed=3, loader=mode, device="cpu"),
                                 backbone=resnet18) for mode in ("memory", "stream")}
    assert (runs["memory"].loader, runs["stream"].loader) == ("device", "stream")
    assert runs["stream"].num_samples == 40
    for key, value in runs["memory"].model.task_state().items():
        torch.testing.assert_close(runs["stream"].model.task_state()[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_without_augmentation_the_frozen_bridge_runs_once_before_training(resnet_cache, resnet18):
    from subcache.train import make_loader, new_model

    cache = subcache.open_cache(resnet_cache)
    labels, cpu = cache.read_y("train"), torch.device("cpu")
    model, _ = new_model(cache, resnet18, (7,), 4, subcache.TrainConfig(blocks="7"), cpu)  # block 6: the bridge
    config = subcache.TrainConfig(blocks="7", loader="memory")
    plain = make_loader(cache, config, model, None, labels, cpu, ())
    assert plain.bridged and plain.decode is None and plain.x.shape[1:] == resnet18.input_shape(7)
    torch.testing.assert_close(plain.x, model.frozen_part(cache.read_x("train").float()))
    assert not make_loader(cache, config, model, None, labels, cpu, ("flip",)).bridged  # augmented: per batch


def test_training_applies_the_augmentation_it_is_asked_for(resnet_cache, resnet18):
    def weights(augment):
        config = subcache.TrainConfig(blocks="7", epochs=1, batch_size=16, limit=32, seed=4, augment=augment,
                                      device="cpu")
        return subcache.train(resnet_cache, config, backbone=resnet18).model.task_state()

    plain, flipped, again = weights(""), weights("flip"), weights("flip")
    assert all(torch.equal(flipped[k], again[k]) for k in plain)  # seeded
    assert any(not torch.equal(plain[k], flipped[k]) for k in plain)


# -- Run.fit and Run.epoch with stand-in parts: rows, sums, scores, lines and seconds, exactly ----------------------
class Bar:
    """A progress bar stand-in recording how fit uses it."""

    def __init__(self, log, enabled, unit, every):
        self.log = log
        log.append(("bar", enabled, unit, every))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def add_task(self, description, total=None):
        self.log.append(("task", description, total))
        return 7

    def advance(self, task):
        self.log.append(("advance", task))

    def line(self, text):
        self.log.append(("line", text))


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(2))

    def task_state(self):
        return {"w": self.w.detach()}


def fake_run(monkeypatch, steps, *, epochs=3, score=None, eval_every=1, saver=None, augments=(), flip=False):
    """A Run over a loader of two batches (3 + 2 items) per epoch whose step returns the scripted (loss sum,
    correct) pairs in turn (a callable in ``steps`` may change the weights first)."""
    from subcache.train import TrainConfig

    log, model, steps = [], Net(), iter(steps)

    class Loader:
        steps_per_epoch, num_samples = 2, 5

        def epoch(self, epoch):
            for n in (3, 2):
                yield torch.full((n, 1), float(epoch)), (torch.ones(n, 1) if flip else None), torch.zeros(n)

    def step(x, y):
        value = next(steps)
        if callable(value):
            value = value(model)
        log.append(("step", len(y)))
        return torch.tensor(value, dtype=torch.float64)

    monkeypatch.setattr(train_mod, "progress_bar", lambda enabled, unit, every: Bar(log, enabled, unit, every))
    config = TrainConfig(epochs=epochs, eval_every=eval_every, lr=0.01, device="cpu")
    return Run(config, torch.device("cpu"), model, Loader(), step, score, saver, augments, 2), log


def test_fit_keeps_a_row_per_epoch_scores_every_eval_every_and_writes_one_line_each(monkeypatch):

    steps = [(3.0, 1), (1.0, 2)] * 3
    scores = iter([0.25, 0.5])
    run, log = fake_run(monkeypatch, steps, epochs=3, score=lambda: next(scores), eval_every=2 + 1)
    # three epochs of 2.5004, 3 and 5 seconds (start, end per epoch)
    monkeypatch.setattr(train_mod, "time", clockwork(10.0, 12.5004, 20.0, 23.0, 30.0, 35.0))
    monkeypatch.setattr(train_mod, "CLOCK", train_mod.Clock(steps=1.0))
    seen = []
    history, seconds = run.fit("run A", on_epoch=seen.append)
    row = {"loss": 4.0 / 5, "train_accuracy": 3 / 5}
    assert history == [{"epoch": 1, **row, "seconds": 2.5}, {"epoch": 2, **row, "seconds": 5.5},
                       {"epoch": 3, **row, "seconds": 10.5, "test_accuracy": 0.25}]  # every 3rd epoch: the 3rd
    assert seen == history and seen[0] is history[0] and seconds == pytest.approx(10.5004)
    assert train_mod.CLOCK.steps == pytest.approx(11.5004)
    assert log[:2] == [("bar", "run A", "steps/s", None), ("task", "training", 6)]
    assert [e for e in log[2:] if e[0] != "line"] == [("step", 3), ("advance", 7), ("step", 2), ("advance", 7)] * 3
    lines = [e[1] for e in log if e[0] == "line"]
    assert lines == [f"run A {train_mod.epoch_line(history[0], 3, 5 / 2.5004)}",
                     f"run A {train_mod.epoch_line(history[1], 3, 10 / 5.5004)}",
                     f"run A {train_mod.epoch_line(history[2], 3, 15 / 10.5004)}"]
    assert lines[2] == "run A epoch 3/3 loss 0.8000 acc 0.6000 test 0.2500 1.4 samples/s"


def test_fit_without_a_name_or_progress_writes_bare_lines_to_a_disabled_bar(monkeypatch):

    run, log = fake_run(monkeypatch, [(1.0, 0)] * 2, epochs=1, score=lambda: 0.5, eval_every=0)
    monkeypatch.setattr(train_mod, "time", clockwork(0.0, 0.5))
    history, _ = run.fit()
    assert log[0] == ("bar", False, "steps/s", None) and "test_accuracy" not in history[0]  # eval_every 0: never
    assert log[-1] == ("line", "epoch 1/1 loss 0.4000 acc 0.0000 10 samples/s")
    run, log = fake_run(monkeypatch, [(1.0, 0)] * 2, epochs=1, score=None)
    # no time at all: no division by 0
    monkeypatch.setattr(train_mod, "time", clockwork(0.0, 0.0))
    assert "test_accuracy" not in run.fit(True)[0][0] and log[-1][1].startswith("epoch 1/1 loss 0.4000 acc 0.0000 ")


def test_an_epoch_sums_in_float64_counts_items_and_hands_augmentation_its_views(monkeypatch):

    calls = []
    monkeypatch.setattr(train_mod, "apply_augment", lambda x, augments, gen, x_flip, pad: calls.append(
        (augments, gen, None if x_flip is None else x_flip.tolist(), pad)) or x + 1)
    run, log = fake_run(monkeypatch, [(2.0 ** 24 + 1, 3), (2.0, 1)], augments=("flip",), flip=True)
    gen = torch.Generator()
    row, took = run.epoch(0, gen, lambda: log.append("advance"))
    assert row == {"epoch": 1, "loss": (2.0 ** 24 + 3) / 5, "train_accuracy": 4 / 5, "seconds": 0.0}
    assert calls == [(("flip",), gen, [[1.0]] * 3, 2), (("flip",), gen, [[1.0]] * 2, 2)]
    assert log.count("advance") == 2 and took >= 0
    calls.clear()
    run, _ = fake_run(monkeypatch, [(1.0, 0)] * 2)
    run.epoch(0, gen, lambda: None)
    assert [c[2] for c in calls] == [None, None]  # no mirrored views: none handed on


@pytest.mark.parametrize("saver", [False, True])
def test_non_finite_loss_or_weights_stop_training_naming_the_epoch_and_the_learning_rate(monkeypatch, saver):
    def blow_up(model):
        model.w.data[0] = float("nan")
        return (1.0, 0)

    saved = []
    run, _ = fake_run(monkeypatch, [(1.0, 0), (1.0, 0), (1.0, 0), blow_up],
                      saver=(lambda **kw: saved.append((kw, run.model.w.detach().clone())) or "dir") if saver else None)
    run.model.w.data[:] = 5.0
    with pytest.raises(TrainingError) as e:
        run.fit()
    message = "the weights stopped being finite in epoch 2; lower --lr (now 0.01)"
    assert str(e.value) == (message + "; the last good weights are in dir (marked incomplete)" if saver else message)
    if saver:  # the weights after epoch 1 (not the nan ones) are saved, marked incomplete
        assert saved[0][0] == {"metrics": {}, "complete": False, "stopped": message}
        assert saved[0][1].tolist() == [5.0, 5.0]
    run, _ = fake_run(monkeypatch, [(1.0, 0), (float("inf"), 0)])
    with pytest.raises(TrainingError) as e:
        run.epoch(1, torch.Generator(), lambda: None)
    assert str(e.value) == "the training loss became inf in epoch 2; lower --lr (now 0.01)"


def test_an_epoch_row_averages_over_the_items_seen():
    from subcache.train import _epoch_row

    assert _epoch_row(0, torch.tensor([3.0, 1.0], dtype=torch.float64), 1, 1.23456, 0.1) == {
        "epoch": 1, "loss": 3.0, "train_accuracy": 1.0, "seconds": 1.235}
    assert _epoch_row(4, torch.zeros(2, dtype=torch.float64), 0, 0.0, 0.1) == {
        "epoch": 5, "loss": 0.0, "train_accuracy": 0.0, "seconds": 0.0}


# -- how a run is put together: Run.make, _scorer, _training_loader, make_loader, new_model, train ----------------
def test_a_balanced_subset_takes_each_class_s_share_and_all_is_none():
    import numpy as np

    from subcache.errors import DataError
    from subcache.train import balanced_subset

    y = np.array([0, 1, 1, 1, 2, 2, 2, 2, 2, 2])
    for seed in range(8):
        got = balanced_subset(y, 5, seed=seed)
        assert np.bincount(y[got], minlength=3).tolist() == [1, 2, 2] and got.tolist() == sorted(set(got.tolist()))
    assert balanced_subset(y, 1, seed=0).tolist() in ([1], [2], [3], [4], [5], [6], [7], [8], [9], [0])
    assert len(balanced_subset(y, 9, seed=0)) == 9
    assert balanced_subset(y, 10, seed=0) is None and balanced_subset(y, None, seed=0) is None
    with pytest.raises(DataError) as e:
        balanced_subset(y, 0, seed=0)
    assert str(e.value) == "--examples must be at least 1 training example, got 0"


def test_open_for_training_keeps_the_given_cache_and_backbone_else_loads_the_recorded_one(resnet_cache, resnet18):
    from subcache.train import open_for_training

    cache = subcache.open_cache(resnet_cache)
    assert open_for_training(cache, resnet18) == (cache, resnet18)
    opened, backbone = open_for_training(resnet_cache, None)
    assert opened.path == cache.path and backbone is not resnet18 and backbone.identity() == resnet18.identity()


def test_a_record_naming_code_is_refused_naming_the_cache(resnet_cache, monkeypatch):
    from subcache.train import open_for_training

    cache = subcache.open_cache(resnet_cache)
    monkeypatch.setattr(type(cache), "backbone", property(lambda self: {**self.attrs["backbone"],
                                                                        "model": "evil.module:factory"}))
    with pytest.raises(Exception) as e:
        open_for_training(cache, None)
    assert f"cache {cache.path}" in str(e.value)


@pytest.fixture
def recorded_scorers(monkeypatch):
    calls = []
    monkeypatch.setattr(train_mod, "scorer", lambda *args: calls.append(args) or (lambda: 0.5))
    return calls


def test_a_run_is_scored_on_held_out_positions_or_the_test_split_with_its_labels(int8_store, recorded_scorers):
    import numpy as np

    from subcache.train import TrainConfig, TrainData, _scorer

    cache, dev, held = subcache.open_cache(int8_store), torch.device("cpu"), np.array([1, 2])
    train_labels = torch.arange(24) % 4
    held_out = TrainData(eval_positions=held, bank="bank")
    assert _scorer("model", cache, TrainConfig(), train_labels, held_out, dev)() == 0.5
    _scorer("model", cache, TrainConfig(labels="parity", test_split="train"), train_labels, TrainData(bank="bank"), dev)
    assert _scorer("model", cache, TrainConfig(test_split="val"), train_labels, TrainData(), dev) is None
    (a, b) = recorded_scorers
    assert a[:4] == ("model", cache, "train", train_labels) and a[4] is held and a[5:] == ("bank", dev)
    parity = subcache.labels.read_labels(cache, "train", "parity")[0]
    assert b[:3] == ("model", cache, "train") and b[3].tolist() == parity.tolist() and b[4:] == (None, "bank", dev)


def test_make_wires_labels_positions_monitor_saver_and_padding(int8_store, resnet18, recorded_scorers, tmp_path,
                                                              monkeypatch):
    import numpy as np
    from functools import partial

    from subcache.train import TrainConfig, TrainData

    cache = subcache.open_cache(int8_store)
    config = TrainConfig(blocks="3", epochs=1, batch_size=4, device="cpu", labels="parity", test_split="train")
    given = torch.arange(24) % 2
    data = TrainData(positions=np.array([0, 2, 4, 6]), labels=given, val_positions=np.array([1, 3]))
    run = Run.make(cache, config, data, str(tmp_path / "task"), resnet18)
    assert run.loader.num_samples == 4 and run.loader.y.tolist() == [0, 0, 0, 0]  # the given labels, positions
    assert run.pad == 1 and run.monitor is not None and run.monitor.score() == 0.5 and run.score() == 0.5
    val, test = recorded_scorers
    assert val[:3] == (run.model, cache, "train") and val[3] is given and val[4].tolist() == [1, 3]
    assert val[5:] == (None, torch.device("cpu")) and test[2] == "train"
    assert isinstance(run.saver, partial) and run.saver.func is train_mod._save
    assert run.saver.args == (str(tmp_path / "task"), cache, resnet18, run.model, config)
    plain = Run.make(cache, TrainConfig(blocks="3", epochs=1, device="cpu", labels="parity", test_split=None),
                     TrainData())
    assert plain.monitor is None and plain.saver is None and plain.model.head.out_features == 2  # parity: 2 classes
    labels = subcache.labels.read_labels(cache, "train", "parity")[0]
    assert plain.loader.y.tolist() == labels.tolist()
    assert Run.make(cache, TrainConfig(blocks="3", device="cpu"), TrainData()).model.head.out_features == 4
    asked, shapes = [], []
    bank = SimpleNamespace(input_of=lambda split, block: asked.append((split, block)) or torch.zeros(24, 1))
    monkeypatch.setattr(train_mod, "default_pad", lambda shape: shapes.append(shape) or 3)
    recorded_scorers.clear()
    banked = Run.make(cache, TrainConfig(blocks="3", device="cpu", test_split=None),
                      TrainData(bank=bank, val_positions=np.array([5]), eval_positions=np.array([7])))
    assert asked == [("train", 3)] and banked.loader.bridged and banked.pad == 3 and shapes == [cache.sample_shape]
    (val, held) = recorded_scorers  # monitored on the validation positions, scored on the held-out ones: both banked
    assert val[4].tolist() == [5] and held[4].tolist() == [7] and val[5] is bank and held[5] is bank
    assert held[3].tolist() == cache.read_y("train").tolist()


def test_a_rank_of_a_ddp_run_trains_its_shard_at_its_share_of_the_batch(monkeypatch):
    import numpy as np

    import torch.nn.parallel

    from subcache.train import TrainConfig, _training_loader

    made, wrapped = [], []
    monkeypatch.setattr(train_mod, "make_loader", lambda *args: made.append(args) or "loader")
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel",
                        lambda module, device_ids: wrapped.append((module, device_ids)) or "ddp")
    model, config = SimpleNamespace(trainable_part=lambda x: x), TrainConfig(batch_size=10, seed=5)
    ranks = SimpleNamespace(active=True, rank=1, world=3)
    labels = torch.arange(11) * 10
    got = _training_loader("cache", config, model, None, labels, torch.device("cpu"), ("flip",), ranks, "bank")
    assert got == ("loader", "ddp")
    (cache, local, m, shard, shard_labels, device, augments), = made
    assert shard.tolist() == [1, 4, 7] and shard_labels.tolist() == [10, 40, 70]  # 11 // 3 items each, equal shards
    assert (cache, m, device, augments) == ("cache", model, torch.device("cpu"), ("flip",))
    assert (local.batch_size, local.seed) == (3, 6) and local.epochs == config.epochs  # 10 // 3: whole items
    assert isinstance(wrapped[0][0], Trainable) and wrapped[0][0].model is model and wrapped[0][1] is None
    made.clear()
    _training_loader("cache", TrainConfig(batch_size=4), model, np.array([9, 3, 5, 7, 8, 0]), labels,
                     torch.device("cpu"), (), SimpleNamespace(active=True, rank=0, world=3), None)
    assert made[0][3].tolist() == [7, 9] and made[0][1].batch_size == 2  # never below 2


def test_a_bank_feeds_the_loader_past_the_frozen_blocks_unless_augmenting(monkeypatch):
    import numpy as np

    from subcache.train import TrainConfig, _training_loader

    asked = []
    bank = SimpleNamespace(input_of=lambda split, block: asked.append((split, block)) or torch.arange(10.0)[:, None])
    model, ranks = SimpleNamespace(first_trainable=8), SimpleNamespace(active=False)
    labels = torch.arange(10) % 3
    config = TrainConfig(batch_size=2, seed=4, train_split="train")
    loader, forward = _training_loader("cache", config, model, np.array([1, 5, 6]), labels, torch.device("cpu"), (),
                                       ranks, bank)
    assert forward is None and asked == [("train", 8)] and loader.bridged
    assert loader.x.flatten().tolist() == [1.0, 5.0, 6.0] and loader.y.tolist() == [1, 2, 0]
    assert (loader.batch_size, loader.seed) == (2, 4)
    everything, _ = _training_loader("cache", config, model, None, labels, torch.device("cpu"), (), ranks, bank)
    assert everything.x.flatten().tolist() == list(map(float, range(10))) and everything.y.tolist() == labels.tolist()
    made = []
    monkeypatch.setattr(train_mod, "make_loader", lambda *args: made.append(args) or "from cache")
    assert _training_loader("cache", config, model, None, labels, torch.device("cpu"), ("crop",), ranks, bank) == (
        "from cache", None)
    assert made[0][3] is None and made[0][4] is labels and made[0][6] == ("crop",)


def test_a_resident_bridge_is_kept_in_the_dtype_the_budget_allows(resnet_cache, resnet18, monkeypatch):
    from subcache.train import TrainConfig, make_loader, new_model

    asked = []
    monkeypatch.setattr(train_mod, "resident_dtype", lambda nbytes, stored, device: asked.append(
        (nbytes, stored, device)) or torch.float16)
    cache = subcache.open_cache(resnet_cache)
    config = TrainConfig(blocks="7-8", device="cpu", batch_size=32, loader="auto")
    model, _ = new_model(cache, resnet18, (7, 8), 4, config, torch.device("cpu"))
    labels = cache.read_y("train")
    loader = make_loader(cache, config, model, None, labels, torch.device("cpu"), ())
    n = len(labels) * int(torch.tensor(cache.sample_shape).prod())
    assert asked == [(n * 4 * 2, torch.float32, torch.device("cpu"))] and loader.x.dtype == torch.float16
    assert type(loader).__name__ == "DeviceLoader" and loader.bridged


def test_a_pruned_run_prunes_its_tuned_blocks_as_configured(resnet_cache, resnet18, monkeypatch):
    from subcache.train import TrainConfig, new_model

    seen = []
    monkeypatch.setattr(train_mod, "prune_tuned_blocks", lambda model, shape, cfg: seen.append((model, shape, cfg)) or
                        0.4)
    cache = subcache.open_cache(resnet_cache)
    config = TrainConfig(blocks="7", prune=0.5, prune_norm="l1", prune_scope="global")
    model, kept = new_model(cache, resnet18, (7,), 4, config, torch.device("cpu"))
    assert kept == 0.4 and seen[0][0] is model and seen[0][1] == cache.sample_shape
    assert (seen[0][2].ratio, seen[0][2].norm, seen[0][2].scope) == (0.5, "l1", "global")


def test_train_saves_a_complete_task_under_its_lock_and_refuses_a_finished_one(resnet_cache, resnet18, tmp_path,
                                                                              capsys):
    from subcache.distributed import WriterLock
    from subcache.errors import OutputExistsError, StoreError
    from subcache.train import TrainConfig

    config = TrainConfig(blocks="8", epochs=2, batch_size=64, limit=64, device="cpu")
    rows = []
    result = subcache.train(resnet_cache, config, out=tmp_path / "task", backbone=resnet18, on_epoch=rows.append)
    assert result.model.backbone is resnet18  # the backbone given, not one rebuilt from the record
    assert capsys.readouterr().err == "" and [r["epoch"] for r in rows] == [1, 2]  # quiet unless asked
    record = json.loads((tmp_path / "task" / "task.json").read_text())
    assert record["complete"] is True and record["metrics"] == json.loads(json.dumps(result.metrics()))
    assert record["history"] == rows and record["world_size"] == 1
    assert record["backbone"] == subcache.open_cache(resnet_cache).backbone
    assert record["block_names"] == [resnet18.block_names[7]] == ["layer4.1"]
    with pytest.raises(OutputExistsError, match="already holds a task"):
        subcache.train(resnet_cache, config, out=tmp_path / "task", backbone=resnet18)
    subcache.train(resnet_cache, config, out=tmp_path / "task", backbone=resnet18, overwrite=True, progress=True)
    err = capsys.readouterr().err
    assert "epoch 2/2 loss" in err and "warning: 64 training examples at batch 64 make 1 optimiser step" in err
    with WriterLock(str(tmp_path / "other"), what="train"):
        with pytest.raises(StoreError) as e:
            subcache.train(resnet_cache, config, out=tmp_path / "other", backbone=resnet18)
    assert str(e.value).startswith("another train (pid ")


def test_the_reference_run_trains_every_item_without_a_limit_and_rounds_as_asked(npz_path, resnet18, monkeypatch):
    from subcache.train import TrainConfig, train_reference

    made = []

    class Loader:
        def __init__(self, *args):
            made.append(args)
            self.steps_per_epoch, self.num_samples, self.bridged = 0, 0, False

        def epoch(self, epoch):
            return iter(())

    monkeypatch.setattr(train_mod, "ImageLoader", Loader)
    source = subcache.open_source(npz_path, "train")
    train_reference(source, resnet18, 6, TrainConfig(blocks="7", epochs=1, batch_size=8, seed=3), 4,
                    round_to=torch.float16)
    (src, backbone, layer, indices, labels, batch, seed, device, round_to), = made
    assert (src, backbone, layer, indices, batch, seed, round_to) == (source, resnet18, 6, None, 8, 3, torch.float16)
    assert labels.tolist() == source.labels.tolist() and device == torch.device("cpu")


def test_a_result_counts_the_samples_of_every_rank():
    run = SimpleNamespace(monitor=None, score=None, ranks=SimpleNamespace(main=True, world=2, broadcast=lambda v: v),
                          loader=SimpleNamespace(num_samples=30), config=SimpleNamespace(epochs=3), param_fraction=1.0,
                          model=SimpleNamespace(trainable_params=lambda: 5, tuned=(7,)))
    got = Run.result(run, [{"train_accuracy": 0.5}], 2.0)
    assert (got.num_samples, got.samples_per_second, got.blocks, got.test_accuracy) == (60, 90.0, (7,), None)
