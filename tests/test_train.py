import importlib
import json
import math
import threading
import time

import numpy as np
import pytest
import torch

import subcache
from subcache.augment import apply, batch_crop, batch_flip, default_pad, mirror
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


@pytest.mark.parametrize("blocks, moved", [("none", ("head.",)), ("7", ("tuned_blocks.7.", "head.")),
                                            ("8", ("tuned_blocks.8.", "head."))])
def test_only_the_chosen_blocks_and_the_head_move(resnet_cache, resnet18, monkeypatch, blocks, moved):
    """Which parameters training changed: every one it owns, and nothing else (the backbone stays bit-identical)."""
    train_module = importlib.import_module("subcache.train")
    real_fit, before = train_module.Run.fit, {}

    def spy(run, *args, **kwargs):
        before.update({k: v.detach().clone() for k, v in run.model.named_parameters()})
        return real_fit(run, *args, **kwargs)

    monkeypatch.setattr(train_module.Run, "fit", spy)
    backbone_before = {k: v.clone() for k, v in resnet18.model.state_dict().items()}
    model = subcache.train(resnet_cache, subcache.TrainConfig(blocks=blocks, epochs=1, batch_size=32),
                           backbone=resnet18).model
    after = dict(model.named_parameters())
    changed = {k for k in before if not torch.equal(before[k], after[k].detach())}
    expected = {k for k in before if k.startswith(moved)}
    assert expected and {k.split(".")[0] for k in expected} >= {"head"}
    assert changed == expected
    assert all(torch.equal(v, resnet18.model.state_dict()[k]) for k, v in backbone_before.items())


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


@pytest.mark.parametrize("kind", ["stream", "memory"])
def test_each_epoch_is_a_new_order_over_every_selected_sample_once(resnet_cache, kind):
    cache = subcache.open_cache(resnet_cache)
    indices = balanced_subset(cache.read_y("train").numpy(), 100, seed=0)
    positions = torch.from_numpy(indices)  # the "labels" are the positions: each batch says which rows it holds
    if kind == "stream":
        loader = StreamLoader(cache, "train", indices, positions, 16, 0, torch.device("cpu"), window=2)
    else:
        loader = DeviceLoader.from_cache(cache, "train", indices, positions, 16, 0, torch.device("cpu"))
    full = cache.read_x("train")
    orders = []
    for epoch in range(3):
        batches = list(loader.epoch(epoch))
        for x, _, rows in batches:
            assert torch.equal(x, full[rows])  # each row's activations travel with its label
        order = torch.cat([rows for _, _, rows in batches]).tolist()
        assert sorted(order) == indices.tolist()  # every selected sample exactly once
        orders.append(order)
    assert orders[0] != orders[1] and orders[1] != orders[2] and orders[0] != orders[2]
    assert [b[2].tolist() for b in loader.epoch(1)] == [b[2].tolist() for b in loader.epoch(1)]  # seeded


@pytest.mark.parametrize("limit", [None, 100])  # whole chunks (read without a copy) and partly kept chunks
def test_stream_batches_do_not_depend_on_how_many_readers_decode_chunks(chunked_cache, limit):
    cache = chunked_cache  # 12 chunks of 16: readers run ahead of the consumer
    assert len(cache.split("train")) // cache.split("train").chunk_len >= 8
    y = cache.read_y("train")
    indices = balanced_subset(y.numpy(), limit, seed=0)
    labels = y if indices is None else y[torch.from_numpy(indices)]

    def batches(readers, delay=0.0):
        loader = StreamLoader(cache, "train", indices, labels, 16, 0, torch.device("cpu"), window=2, readers=readers)
        read = loader._chunk
        loader._chunk = lambda split, c: time.sleep(delay * (c % 2)) or read(split, c)  # odd chunks finish last
        return [b for epoch in range(2) for b in loader.epoch(epoch)]

    one, two = batches(1), batches(2, delay=0.02)
    assert len(one) == len(two) > 0
    for (x1, _, y1), (x2, _, y2) in zip(one, two):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_stream_keeps_repeated_positions_like_the_memory_loader(chunked_cache):
    cache = chunked_cache
    rows = torch.arange(len(cache.split("train")))  # label = row: a batch names its rows
    positions = np.array([0, 0] + list(range(1, 15)))  # a bootstrap draw: row 0 twice, row 15 not drawn
    loader = StreamLoader(cache, "train", positions, rows[torch.from_numpy(positions)], 16, 0, torch.device("cpu"))
    assert sorted(int(v) for _, _, y in loader.epoch(0) for v in y) == sorted(positions.tolist())


def test_stream_visits_chunks_in_a_new_order_each_epoch(chunked_cache):
    cache = chunked_cache  # one chunk per window below, so the chunk order shows
    clen = cache.split("train").chunk_len
    positions = torch.arange(len(cache.split("train")))  # labels = positions: a batch names its rows
    loader = StreamLoader(cache, "train", None, positions, clen, 0, torch.device("cpu"), window=1)
    orders = [[int(rows[0]) // clen for _, _, rows in loader.epoch(epoch)] for epoch in range(4)]
    assert all(sorted(o) == list(range(len(o))) for o in orders)  # every chunk once per epoch
    assert len({tuple(o) for o in orders}) == 4


def test_an_abandoned_stream_epoch_ends_its_reader_threads(chunked_cache):
    cache = chunked_cache
    y = cache.read_y("train")
    before = threading.active_count()
    loader = StreamLoader(cache, "train", None, y, 16, 0, torch.device("cpu"), window=1, depth=1, readers=2)
    epoch = loader.epoch(0)
    next(epoch)  # the readers are now blocked on a full queue
    assert threading.active_count() > before
    epoch.close()  # a training error or a break ends the epoch early
    deadline = time.monotonic() + 5
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert threading.active_count() == before


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
    tokens = torch.arange(5 * 2.0).view(1, 5, 2)  # class token + a 2×2 patch grid
    assert mirror(tokens)[0, :, 0].tolist() == [0.0, 4.0, 2.0, 8.0, 6.0]
    assert torch.equal(mirror(mirror(x)), x)


def test_crop_translates_each_map_by_its_drawn_offset():
    """Values, not shapes: each sample equals its window of the reflect-padded map at the offset drawn for it."""
    x = torch.randn(32, 3, 8, 8)
    pad = default_pad(x.shape[1:])
    assert pad == 1
    cropped = apply(x, ("crop",), torch.Generator().manual_seed(5), pad=pad)
    draws = torch.Generator().manual_seed(5)
    dy, dx = (torch.randint(0, 2 * pad + 1, (32,), generator=draws) for _ in range(2))
    padded = torch.nn.functional.pad(x, (pad,) * 4, mode="reflect")
    for i in range(32):
        window = padded[i, :, dy[i]:dy[i] + 8, dx[i]:dx[i] + 8]
        assert torch.equal(cropped[i], window), i
    moved = (dy != pad) | (dx != pad)
    assert moved.sum() > 16 and not (cropped[moved] == x[moved]).flatten(1).all(1).any()  # the content shifted
    # by hand, one sample: a shift right by one pixel repeats column 1 (reflection) then columns 0..6
    one = torch.arange(16.0).view(1, 1, 4, 4)
    gen = torch.Generator().manual_seed(0)
    while True:  # find a seed whose draw is (dy, dx) = (1, 0): no vertical shift, one pixel right
        state = gen.get_state()
        d = [torch.randint(0, 3, (1,), generator=gen).item() for _ in range(2)]
        if d == [1, 0]:
            break
    gen.set_state(state)
    assert batch_crop(one, gen, pad=1)[0, 0].tolist() == [[1.0, 0.0, 1.0, 2.0], [5.0, 4.0, 5.0, 6.0],
                                                          [9.0, 8.0, 9.0, 10.0], [13.0, 12.0, 13.0, 14.0]]


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
