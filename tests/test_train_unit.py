"""train.py's parts, exactly and fast (each test kills mutants that `examples/mutation.sh train` found surviving the
end-to-end training tests)."""
from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
import zarr

import subcache
from subcache.errors import TrainingError
from subcache.train import Best, Run, Trainable, TrainResult, task_record


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
    import sys

    cache, model = subcache.open_cache(int8_store), SimpleNamespace(tuned=(3,))
    monkeypatch.setattr(sys.modules["subcache.train"], "pruned_shapes", lambda m: {"of": m.tuned})
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
    import sys

    from subcache.distributed import Dist
    from subcache.train import alone, this_process

    monkeypatch.setattr(Dist, "from_env", classmethod(lambda cls: cls(3, 4, 1)))
    assert this_process() == Dist(3, 4, 1)
    with alone():
        assert this_process() == Dist(0, 1, 1)
    assert this_process() == Dist(3, 4, 1) and sys.modules["subcache.train"]._ALONE.get() is False


def test_the_clock_sums_the_scoring_seconds_of_every_call(monkeypatch):
    import sys

    from subcache.train import Clock

    now = iter([10.0, 12.5, 20.0, 21.0])
    monkeypatch.setattr(sys.modules["subcache.train"].time, "perf_counter", lambda: next(now))
    clock = Clock()
    timed = clock.timed(lambda: 0.75)
    assert clock.timed(None) is None and timed() == 0.75 and timed() == 0.75
    assert clock.scoring == 3.5 and clock.steps == 0.0


def test_blocks_before_the_cache_s_layer_are_refused_naming_the_first(resnet_cache, resnet18):
    from subcache.errors import BlockError
    from subcache.train import check_blocks

    cache = subcache.open_cache(resnet_cache)
    check_blocks((6, 7), cache, resnet18)
    with pytest.raises(BlockError) as e:
        check_blocks((4, 5, 6), cache, resnet18)
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
    import sys

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
        monkeypatch.setattr(sys.modules["subcache.train"], "memory_budget", lambda device, b=budget: b)
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
