"""Multi-task serving, exactly, on a hand-made backbone whose blocks are distinguishable: each task's logits equal
the task run alone whatever its fork and merge points, predictions as rows / CSV, the accuracy notes, the grouped
rewrite (each test kills mutants that `examples/mutation.sh multitask` found surviving)."""
from __future__ import annotations

import csv
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from subcache.backbones.core import Backbone, Fn, Preprocess
from subcache.errors import TaskError
from subcache.multitask import (GroupedPairModel, MultiTaskModel, Predictions, TaskBranch, _accuracy, _names,
                                _paired, input_record)

from conftest import quick_task

PRE = Preprocess(4, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


class Step(nn.Module):
    def __init__(self, k: float):
        super().__init__()
        self.k = nn.Parameter(torch.tensor(float(k)))

    def forward(self, h):
        return torch.tanh(h * 1.5 + self.k)


def toy(n=5) -> Backbone:
    stem = Fn(nn.Identity(), lambda m, x: x[:, 0, 0, :], "stem")  # (B, 4)
    return Backbone.from_modules(stem, [Step(k / 10) for k in range(1, n + 1)], Fn(nn.Identity(), lambda m, h: h * 3,
                                 "neck"), PRE, nn.Linear(4, 3))


def _alone(bb, branch, x):
    h = bb.stem(x)
    for i in range(1, bb.num_blocks + 1):
        h = (branch.blocks[str(i)] if i in branch.tuned else bb.block(i))(h)
    f = bb.neck(h)
    if branch.siamese:
        f = torch.cat([f, bb.neck(bb.run_blocks(bb.stem(x), 1, bb.num_blocks))], -1)
    return branch.head(f)


def _branch(blocks, siamese=False, classes=2):
    torch.manual_seed(sum(blocks) + 7 * siamese)
    return TaskBranch({i: Step(float(i)) for i in blocks}, nn.Linear(4 * (2 if siamese else 1), classes), siamese)


@pytest.mark.parametrize("include_original", [True, False])
def test_every_task_equals_itself_alone_whatever_its_fork_and_merge(include_original):
    bb = toy()
    branches = {"late": _branch([4, 5]), "mid.v2": _branch([2, 3]), "probe": _branch([]), "one": _branch([1]),
                "twin": _branch([3], siamese=True)}
    model = MultiTaskModel(bb, branches, include_original)
    x = torch.randn(3, 3, 4, 4)
    with torch.no_grad():
        out = model(x)
        assert list(out) == (["original"] if include_original else []) + list(branches)
        if include_original:
            assert torch.allclose(out["original"], bb(x), atol=1e-6)
        for name, branch in branches.items():
            assert torch.allclose(out[name], _alone(bb, branch, x), atol=1e-6), name
    assert model.branch("mid.v2") is branches["mid.v2"] and "1_mid_v2" in model.branches


@pytest.mark.parametrize("forks", [([2, 3], [4]), ([4], [2]), ([1, 2], [2, 3]), ([5], [1, 5])])
def test_without_the_original_the_trunk_is_dropped_once_no_task_needs_it(forks):
    bb = toy()
    branches = {f"t{i}": _branch(b) for i, b in enumerate(forks)}
    model = MultiTaskModel(bb, branches, include_original=False)
    assert model._keep_original_until == max(b[0] for b in forks) - 1
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        out = model(x)
        assert list(out) == list(branches)
        for name, branch in branches.items():
            assert torch.allclose(out[name], _alone(bb, branch, x), atol=1e-6)
    assert MultiTaskModel(bb, {**branches, "p": _branch([])}, False)._keep_original_until == bb.num_blocks
    assert MultiTaskModel(bb, branches, True)._keep_original_until == bb.num_blocks


def test_the_frozen_tail_runs_once_per_task_without_the_original():
    """Forks at 2 and 4, no original output: after block 3 nothing needs the original branch, so frozen block 4 runs
    on task 0's rows alone and block 5 on both tasks' (rows per call, batch 2)."""
    bb = toy()
    rows = {i: [] for i in range(1, 6)}
    for i in rows:
        bb.block(i).register_forward_hook(lambda m, args, out, i=i: rows[i].append(args[0].shape[0]))
    model = MultiTaskModel(bb, {"t0": _branch([2, 3]), "t1": _branch([4])}, include_original=False)
    with torch.no_grad():
        model(torch.randn(2, 3, 4, 4))
    assert rows == {1: [2], 2: [2], 3: [2], 4: [2], 5: [4]}


def test_branch_first_last_and_an_empty_model():
    assert (_branch([3, 1]).first, _branch([3, 1]).last, _branch([3, 1]).tuned) == (1, 3, (1, 3))
    assert (_branch([]).first, _branch([]).last) == (-1, -1)
    with pytest.raises(TaskError) as e:
        MultiTaskModel(toy(), {})
    assert str(e.value) == "MultiTaskModel needs at least one task"


def _predictions(**kw):
    probs = np.array([[0.1, 0.7, 0.2], [0.5, 0.25, 0.25], [0.3, 0.3, 0.4]])
    base = dict(ids=np.array([10, 11, 12]), keys=np.array(["a.png", "b.png", "2"]), labels=np.array([1, -1, 0]),
                classes=["cat", "dog"], preds={"t": probs.argmax(1)}, probs={"t": probs.max(1)},
                task_classes={"t": ["x", "y", "z"]}, accuracy={}, images_per_second=1.0, probabilities={"t": probs})
    return Predictions(**{**base, **kw})


def test_predictions_rows_top_and_csv(tmp_path):
    p = _predictions()
    assert p.top("t", 2) == [[("y", 0.7), ("z", 0.2)], [("x", 0.5), ("y", 0.25)], [("z", 0.4), ("x", 0.3)]]
    assert p.rows() == [{"id": 10, "key": "a.png", "label": "dog", "t": "y", "t_prob": 0.7},
                        {"id": 11, "key": "b.png", "label": "", "t": "x", "t_prob": 0.5},
                        {"id": 12, "key": "2", "label": "cat", "t": "z", "t_prob": 0.4}]
    top = p.rows(top=2)
    assert top[0]["t_top"] == [["y", 0.7], ["z", 0.2]] and "t_top" not in p.rows(top=1)[0]
    assert _predictions(labels=np.array([2, 0, 1])).rows()[0]["label"] == ""  # outside the data's classes
    many = np.full((1, 40), 0.5 / 39)
    many[0, 5] = 0.5
    tied = _predictions(probabilities={"t": many}, task_classes={"t": [f"c{i}" for i in range(40)]})
    assert [c for c, _ in tied.top("t", 5)[0]] == ["c5", "c0", "c1", "c2", "c3"]  # ties keep class order
    third = np.array([[1 / 3, 2 / 3, 0.0]] * 3)  # probabilities as written: 6 decimals
    thirds = _predictions(probs={"t": third.max(1)}, preds={"t": third.argmax(1)}, probabilities={"t": third})
    assert thirds.rows()[0]["t_prob"] == 0.666667 and thirds.rows(top=2)[0]["t_top"] == [["y", 0.666667],
                                                                                         ["x", 0.333333]]
    p.save(tmp_path / "out" / "deep" / "p.csv")  # folders made as needed
    with open(tmp_path / "out" / "deep" / "p.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows == [["id", "key", "label", "t", "t_prob"], ["10", "a.png", "dog", "y", "0.7"],
                    ["11", "b.png", "", "x", "0.5"], ["12", "2", "cat", "z", "0.4"]]


def test_accuracy_only_for_tasks_trained_on_the_datas_labels_and_why_not():
    source = SimpleNamespace(classes=["a", "b", "c", "d", "e"], labels=np.array([0, 1, 2, -1]))
    tasks = {"same": SimpleNamespace(meta={"labels": None, "classes": ["a", "b", "c", "d", "e"]}),
             "set": SimpleNamespace(meta={"labels": "coarse", "classes": ["a", "b", "c", "d", "e"]}),
             "other": SimpleNamespace(meta={"labels": None, "classes": ["p", "q"]})}
    preds = {"same": np.array([0, 1, 0, 3]), "set": np.array([0, 0, 0, 0]), "other": np.array([0, 1, 1, 0])}
    accuracy, why = _accuracy(tasks, preds, source)
    assert accuracy == {"same": 0.5}
    assert why == {"set": "no accuracy for set: it was trained on label set 'coarse'",
                   "other": "no accuracy for other: its classes (p, q) are not the data's (a, b, c, d, … (5 in all))"}
    unlabelled = SimpleNamespace(classes=["a"], labels=np.array([-1, -1]))
    assert _accuracy({"set": tasks["set"]}, preds, unlabelled) == ({}, {})
    assert _accuracy(tasks, {**preds, "same": np.array([0, 1, 2, 0])}, source)[0] == {"same": 0.75}
    class_zero = SimpleNamespace(classes=source.classes, labels=np.array([0, -1]))  # labelled: one item, class 0
    assert list(_accuracy({"set": tasks["set"]}, preds, class_zero)[1]) == ["set"]
    assert _accuracy({"set": tasks["set"]}, preds, SimpleNamespace(classes=[], labels=np.array([0]))) == ({}, {})
    assert _names(["a", "b", "c", "d"]) == "a, b, c, d" and _names([1, 2, 3], show=2) == "1, 2, … (3 in all)"


def test_input_record_must_agree_across_tasks():
    rec = {"image_size": 32, "resize": "frame", "crop_pct": 1.0, "interpolation": "bilinear", "mean": [0.5] * 3,
           "std": [0.2] * 3, "source": "array"}
    tasks = [SimpleNamespace(input_record=rec, path="/a"), SimpleNamespace(input_record={**rec, "source": "file"},
                                                                          path="/b")]
    assert input_record(tasks) is rec
    with pytest.raises(TaskError, match=r"tasks /a and /b .* \(frame vs crop resize\)"):  # the second differs
        input_record([tasks[0], SimpleNamespace(input_record={**rec, "resize": "crop"}, path="/b")])
    for key, value in [("image_size", 64), ("resize", "crop"), ("crop_pct", 0.9), ("interpolation", "bicubic"),
                       ("mean", [0.4] * 3), ("std", [0.3] * 3)]:
        with pytest.raises(TaskError) as e:
            input_record([*tasks, SimpleNamespace(input_record={**rec, key: value}, path="/c")])
        assert str(e.value) == (f"tasks /a and /c were trained on inputs made differently (frame vs "
                                f"{value if key == 'resize' else 'frame'} resize); predict them separately")


class Res(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=True)
        self.bn = nn.BatchNorm2d(c)
        self.inner = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.ReLU())

    def forward(self, h):
        return h + self.inner(self.bn(self.conv(h)))


def _conv_backbone(c=2, n=4):
    torch.manual_seed(1)
    blocks = [Res(c) for _ in range(n)]
    for b in blocks:
        b.bn.running_mean.uniform_(-1, 1)
        b.bn.running_var.uniform_(0.5, 2)
    stem = Fn(nn.Identity(), lambda m, x: x[:, :c], "stem")
    return Backbone.from_modules(stem, blocks, Fn(nn.Identity(), lambda m, h: h.mean((2, 3)), "neck"), PRE,
                                 nn.Linear(c, 3))


@pytest.mark.parametrize("window", [[2], [2, 3], [4]])
def test_the_grouped_rewrite_equals_the_task_and_the_original(window):
    bb = _conv_backbone()
    torch.manual_seed(2)
    tuned = {i: Res(2).eval() for i in window}
    for b in tuned.values():
        b.bn.running_mean.uniform_(-1, 1)
    head = nn.Linear(2, 5)
    model = GroupedPairModel(bb, tuned, head).eval()
    x = torch.randn(2, 3, 4, 4)  # a batch other than the channel count
    with torch.no_grad():
        out = model(x)
        assert torch.allclose(out["original"], bb(x), atol=1e-5)
        branch = TaskBranch(tuned, head, False)
        assert torch.allclose(out["task"], _alone(bb, branch, x), atol=1e-5)


def test_the_grouped_rewrite_refuses_other_windows_and_blocks():
    bb = _conv_backbone()
    for window in ([1, 3], [1, 2, 3]):
        with pytest.raises(TaskError) as e:
            GroupedPairModel(bb, {i: Res(2) for i in window}, nn.Linear(2, 5))
        assert str(e.value) == "the grouped-convolution rewrite handles one window of at most 2 consecutive blocks"
    with pytest.raises(TaskError) as e:
        _paired(nn.Linear(2, 2), nn.Linear(2, 2))
    assert str(e.value) == "the grouped-convolution rewrite supports ResNet blocks only, not Linear"
    with pytest.raises(TaskError) as e:
        _paired(Step(1.0), Step(2.0))
    assert str(e.value) == "the grouped-convolution rewrite supports ResNet blocks only, not Step"
    conv = nn.Conv2d(2, 4, 3, stride=2, padding=1, dilation=1, groups=2, bias=False)
    paired = _paired(conv, nn.Conv2d(2, 4, 3, stride=2, padding=1, groups=2, bias=False))
    assert (paired.in_channels, paired.out_channels, paired.stride, paired.padding, paired.groups, paired.bias) == (
        4, 8, (2, 2), (1, 1), 4, None)
    bn = nn.BatchNorm2d(2, eps=1e-3, momentum=0.2)
    pair = _paired(bn, nn.BatchNorm2d(2))
    assert (pair.num_features, pair.eps, pair.momentum) == (4, 1e-3, 0.2)


def test_from_tasks_names_each_task_by_its_folder_uniquely(monkeypatch):
    import subcache.multitask as multitask

    bb = toy()

    def fake(path):
        tuned = {3: Step(0.3)}
        model = SimpleNamespace(tuned_blocks={"3": tuned[3]}, head=nn.Linear(8, 2))
        meta = {"siamese": True} if path.endswith("s") else {}  # a task record without the key: not siamese
        return SimpleNamespace(path=path, blocks=(3,), meta=meta, model=lambda b: model)

    monkeypatch.setattr(multitask, "load_task", fake)
    model = MultiTaskModel.from_tasks(bb, ["/r/t", "/q/t", "/r/original", "/r/t_", "/r/s"], include_original=False)
    assert model.names == ["t", "t_", "original_", "t__", "s"] and not model.training
    assert model.branch("s").siamese and not model.branch("t").siamese and model.branch("t").tuned == (3,)
    assert not model.include_original and MultiTaskModel.from_tasks(bb, ["/r/t"]).include_original
    assert MultiTaskModel.from_tasks(bb, ["/", "/"]).names == ["task", "task_"]  # a path with no folder name


@pytest.fixture(scope="module")
def probe(resnet_cache, resnet18, tmp_path_factory):
    return quick_task(resnet_cache, resnet18, tmp_path_factory.mktemp("predict-unit") / "probe", "none")


def test_predict_defaults_and_what_it_passes_on(probe, resnet18, npz_path, monkeypatch, capsys):
    """Default split test, device auto, batches of 128, no progress; the given backbone, limit and workers are
    used; the note names "the task" or "the tasks"."""
    import subcache.data as data
    import subcache.evaluation as evaluation
    import subcache.inputs as inputs
    import subcache.multitask as multitask
    import subcache.pipeline as pipeline
    from subcache.multitask import predict

    seen = {"device": [], "split": [], "what": [], "piece": [], "workers": []}
    monkeypatch.setattr(evaluation, "resolve_device", lambda d: seen["device"].append(d) or torch.device("cpu"))
    monkeypatch.setattr(evaluation, "backbone_for", lambda *a: pytest.fail("the given backbone must be used"))
    real_split, real_ordered = data.default_split, pipeline.ordered
    monkeypatch.setattr(data, "default_split", lambda spec, *a: seen["split"].append(spec) or real_split(spec, *a))
    monkeypatch.setattr(inputs, "note_mismatch", lambda rec, src, what: seen["what"].append(what))
    monkeypatch.setattr(pipeline, "default_workers", lambda device: 3 if device == torch.device("cpu") else 7)
    monkeypatch.setattr(pipeline, "decodes", lambda source: len(source) == 3)  # 3 items: as photos, decoded by workers

    def ordered(load, units, *, workers, piece, pin):
        seen["piece"].append(piece)
        seen["workers"].append(workers)
        return real_ordered(load, units, workers=0, piece=piece, pin=pin)

    monkeypatch.setattr(pipeline, "ordered", ordered)
    capsys.readouterr()
    one = predict([probe], npz_path, limit=5, backbone=resnet18)
    assert capsys.readouterr().err == ""
    assert len(one.ids) == 5 and one.split == "test" and list(one.preds) == ["probe"]
    two = predict([probe, probe], npz_path, split="train", limit=3, backbone=resnet18, workers=2)
    assert len(two.ids) == 3 and two.split == "train" and list(two.preds) == ["probe", "probe_"]
    assert seen["device"] == ["auto", "auto"] and seen["split"] == [npz_path] and seen["piece"] == [128, 128]
    predict([probe], npz_path, limit=3, backbone=resnet18)
    assert seen["what"] == ["the task", "the tasks", "the task"]
    assert seen["workers"] == [0, 2, 3]  # arrays: the main process; photos: as asked, by default for the device
    with pytest.raises(Exception, match="--workers must be 0"):
        predict([probe], npz_path, limit=2, backbone=resnet18, workers=-1)
    clock = iter([100.0, 100.5])  # predicting takes 0.5 s
    monkeypatch.setattr(multitask, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    shown = predict([probe], npz_path, limit=2, backbone=resnet18, progress=True)
    assert "predict test 2/2 (100%)" in capsys.readouterr().err
    assert shown.images_per_second == 4.0
    assert shown.probabilities["probe"].shape == (2, 4) and np.allclose(shown.probabilities["probe"].sum(1), 1)
