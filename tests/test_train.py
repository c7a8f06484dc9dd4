import json
import math

import numpy as np
import pytest
import torch

import subcache
from subcache.augment import batch_crop, batch_flip, mirror
from subcache.errors import BlockError, DataError, ForeignStoreError, TaskError, TrainingError
from subcache.loader import DeviceLoader, StreamLoader, batch_order
from subcache.train import balanced_subset, train_reference


def bn_stats(backbone):
    return {k: v.clone() for k, v in backbone.model.state_dict().items() if "running" in k or "num_batches" in k}


@pytest.mark.parametrize("blocks", ["6-7", "7", "6,8", "none"])
def test_training_from_the_cache_equals_training_through_the_frozen_prefix(resnet_cache, npz_path, resnet18, blocks):
    config = subcache.TrainConfig(blocks=blocks, epochs=2, batch_size=32, seed=1, device="cpu")
    before = bn_stats(resnet18)
    from_cache = subcache.train(resnet_cache, config, backbone=resnet18)
    source = subcache.open_source(npz_path, "train")
    reference, history, _ = train_reference(source, resnet18, 6, config, num_classes=4)
    got, want = from_cache.model.task_state(), reference.task_state()
    assert got.keys() == want.keys() and len(got) > 0
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5, msg=key)
    assert math.isclose(from_cache.history[-1]["loss"], history[-1]["loss"], rel_tol=1e-4)
    after = bn_stats(resnet18)
    assert all(torch.equal(before[k], after[k]) for k in before)  # frozen BatchNorm statistics never move


def test_a_float16_cache_matches_a_rounded_live_prefix(tmp_path, npz_path, resnet18):
    out = str(tmp_path / "h.zarr")
    subcache.build_cache(subcache.BuildConfig(out=out, layers=("6",), model="resnet18", weights="none",
                                              data=npz_path, image_size=32), backbone=resnet18)
    config = subcache.TrainConfig(blocks="7-8", epochs=1, batch_size=48, device="cpu")
    got = subcache.train(out, config, backbone=resnet18).model.task_state()
    reference, _, _ = train_reference(subcache.open_source(npz_path, "train"), resnet18, 6, config, 4,
                                      round_to=torch.float16)
    for key, value in reference.task_state().items():
        torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_tuned_blocks_learn_and_the_task_reloads_to_the_same_accuracy(resnet_cache, resnet18, tmp_path):
    out = str(tmp_path / "task")
    result = subcache.train(resnet_cache, subcache.TrainConfig(blocks="7-8", epochs=8, batch_size=32, lr=3e-3,
                                                               augment="flip,crop"), out=out, backbone=resnet18)
    assert result.test_accuracy > 0.5  # 4 classes: chance is 0.25
    meta = json.loads((tmp_path / "task" / "task.json").read_text())
    assert meta["complete"] and meta["blocks"] == [7, 8] and meta["block_names"] == ["layer4.0", "layer4.1"]
    assert meta["metrics"]["test_accuracy"] == result.test_accuracy
    from safetensors import safe_open

    with safe_open(str(tmp_path / "task" / "task.safetensors"), "pt") as f:
        assert all(k.startswith(("tuned_blocks.", "head.")) for k in f.keys())
    assert subcache.evaluate_task(out, resnet_cache, backbone=resnet18) == result.test_accuracy


def test_stream_loader_visits_each_selected_sample_once_per_epoch(resnet_cache):
    cache = subcache.open_cache(resnet_cache)
    y = cache.read_y("train")
    indices = balanced_subset(y.numpy(), 100, seed=0)
    loader = StreamLoader(cache, "train", indices, y[torch.from_numpy(indices)], 16, 0, torch.device("cpu"),
                          window=2)
    full = cache.read_x("train")
    for epoch in range(2):
        seen = []
        for x, _, yb in loader.epoch(epoch):
            rows = [int(torch.nonzero((full == r).flatten(1).all(1))[0]) for r in x]
            assert torch.equal(y[rows], yb)
            seen += rows
        assert sorted(seen) == indices.tolist()


def test_device_loader_batches_follow_the_seeded_permutation():
    x, y = torch.arange(10.0)[:, None], torch.arange(10)
    loader = DeviceLoader(x, y, batch_size=4, seed=3)
    batches = [b[2] for b in loader.epoch(0)]
    assert [len(b) for b in batches] == [4, 4, 2]
    assert torch.equal(torch.cat(batches), torch.cat(batch_order(10, 4, 3, 0)))
    assert len(batch_order(9, 4, 0, 0)) == 2  # a lone last sample is dropped (BatchNorm needs two)


def test_balanced_subset_is_seeded_and_balanced():
    y = np.repeat(np.arange(5), [50, 50, 50, 50, 3])
    a, b = balanced_subset(y, 40, 0), balanced_subset(y, 40, 0)
    assert np.array_equal(a, b) and len(a) == 40 and len(set(a)) == 40
    assert sorted(np.bincount(y[a]).tolist()) == [3, 9, 9, 9, 10]
    assert balanced_subset(y, None, 0) is None
    with pytest.raises(DataError, match="at least 1"):
        balanced_subset(y, 0, 0)


def test_feature_space_augmentations():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 5, 5)
    flipped = batch_flip(x, gen)
    same = (flipped == x).flatten(1).all(1)
    assert 10 < same.sum() < 54 and torch.equal(flipped[~same], x[~same].flip(-1))
    exact = torch.full_like(x, 7.0)
    mixed = batch_flip(x, gen, exact)
    assert set(mixed[~(mixed == x).flatten(1).all(1)].unique().tolist()) == {7.0}  # exact views, not mirrors
    cropped = batch_crop(x, gen, pad=1)
    assert cropped.shape == x.shape
    tokens = torch.arange(5 * 2.0).view(1, 5, 2)  # class token + a 2×2 patch grid
    assert mirror(tokens)[0, :, 0].tolist() == [0.0, 4.0, 2.0, 8.0, 6.0]
    assert torch.equal(mirror(mirror(x)), x)


def test_bad_training_inputs(resnet_cache, resnet18, tmp_path):
    with pytest.raises(BlockError, match="earliest block this cache can train is 6 \\(layer3.1\\)"):
        subcache.train(resnet_cache, subcache.TrainConfig(blocks="4-6"), backbone=resnet18)
    with pytest.raises(BlockError, match="out of range"):
        subcache.train(resnet_cache, subcache.TrainConfig(blocks="9"), backbone=resnet18)
    with pytest.raises(DataError, match="--examples"):
        subcache.train(resnet_cache, subcache.TrainConfig(blocks="7", limit=0), backbone=resnet18)
    other = subcache.load_backbone("resnet18", "none", image_size=32, seed=1)
    with pytest.raises(ForeignStoreError, match="was built with resnet18"):
        subcache.train(resnet_cache, subcache.TrainConfig(blocks="7"), backbone=other)
    task = str(tmp_path / "t")
    subcache.train(resnet_cache, subcache.TrainConfig(blocks="8", epochs=1), out=task, backbone=resnet18)
    with pytest.raises(TaskError, match="was trained on resnet18"):
        subcache.load_task(task).model(other)


def test_non_finite_loss_stops_and_keeps_the_last_good_weights(resnet_cache, resnet18, tmp_path):
    out = tmp_path / "t"
    with pytest.raises(TrainingError, match="became nan.*lower --lr.*last good weights"):
        subcache.train(resnet_cache, subcache.TrainConfig(blocks="8", epochs=3, lr=1e30), out=str(out),
                       backbone=resnet18)
    meta = json.loads((out / "task.json").read_text())
    assert meta["complete"] is False and "nan" in meta["stopped"]
    with pytest.raises(TaskError, match="incomplete"):
        subcache.load_task(str(out))
    state = subcache.load_task(str(out), allow_incomplete=True).state
    assert all(torch.isfinite(v.float()).all() for v in state.values())


def test_flip_uses_the_exact_mirrored_views_when_the_cache_has_them(tmp_path, npz_path, resnet18):
    out = str(tmp_path / "f.zarr")
    subcache.build_cache(subcache.BuildConfig(out=out, layers=("6",), model="resnet18", weights="none",
                                              data=npz_path, image_size=32, dtype="float32", flip_views=True),
                         backbone=resnet18)
    cache = subcache.open_cache(out)
    y = cache.read_y("train")
    for loader in (DeviceLoader.from_cache(cache, "train", None, y, 32, 0, torch.device("cpu"), flip_views=True),
                   StreamLoader(cache, "train", None, y, 32, 0, torch.device("cpu"), flip_views=True)):
        x, x_flip, _ = next(iter(loader.epoch(0)))
        rows = [int(torch.nonzero((cache.read_x("train") == r).flatten(1).all(1))[0]) for r in x]
        torch.testing.assert_close(x_flip, cache.read_x("train", flip=True)[rows])
        assert not torch.allclose(x_flip, mirror(x))  # exact views, not mirrored maps
    result = subcache.train(out, subcache.TrainConfig(blocks="7-8", epochs=1, augment="flip"), backbone=resnet18)
    assert result.loader == "device"
