"""Evaluation, exactly: which logits, on which rows, in which mode, with which labels (each test kills mutants that
`examples/mutation.sh evaluation` found surviving)."""
from __future__ import annotations

import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import subcache
from subcache.bank import ActivationBank
from subcache.errors import DataError
from subcache.evaluation import (_batched, accuracy, cached_logits, evaluate, evaluate_task, labels_for, load_tasks,
                                 open_task, scorer)
from subcache.tuned import TunedModel

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def cache(resnet_cache):
    return subcache.open_cache(resnet_cache)


@pytest.fixture(scope="module")
def model(cache, resnet18):
    torch.manual_seed(3)
    m = TunedModel(resnet18, cache.layer, (8,), 4, cache.sample_shape)
    with torch.no_grad():  # BatchNorm statistics unlike a fresh one's: eval and train mode differ
        for mod in m.tuned_blocks.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-1, 1)
                mod.running_var.uniform_(0.5, 2)
    return m


def _reference(model, x):
    was = model.training
    model.eval()
    with torch.no_grad():
        out = model(x.float())
    model.train(was)
    return out


def test_labels_for_accepts_0_to_n_minus_1_and_names_the_range_otherwise():
    def fake(y, classes=("a", "b", "c")):
        return SimpleNamespace(read_y=lambda split: torch.tensor(y), classes=list(classes), path="/c.zarr")

    y, n = labels_for(fake([0, 2, 1]), "train", None)
    assert y.tolist() == [0, 2, 1] and n == 3
    assert labels_for(fake([]), "test", None)[1] == 3
    for bad, found in (([0, 3], "0..3"), ([-1, 2], "-1..2")):
        with pytest.raises(DataError) as e:
            labels_for(fake(bad), "val", None)
        assert str(e.value) == (f"cache /c.zarr split val has labels outside 0..2 (found {found}); rebuild it or fix "
                                "the label set")


def test_labels_for_reads_a_named_label_set(labelled_task):
    store, _ = labelled_task
    cache = subcache.open_cache(store)
    y, n = labels_for(cache, "train", "pq")
    assert n == 2 and y.tolist() == [int(i) % 2 for i in cache.split("train").id[:]]


@pytest.mark.parametrize("batch", [1024, 40])
def test_cached_logits_are_the_eval_mode_logits_of_every_item_in_order(cache, model, batch):
    model.train()
    got = cached_logits(model, cache, "train", CPU, batch=batch)
    assert model.training  # mode restored
    want = _reference(model, cache.read_x("train"))
    assert got.dtype == torch.float32 and got.shape == (len(cache.split("train")), 4)
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(cached_logits(model, cache, "test", batch=batch), _reference(model, cache.read_x("test")),
                          atol=1e-5)  # device: the head's


def test_cached_logits_from_a_bank_equal_those_from_the_cache(cache, model, resnet18):
    bank = ActivationBank(cache, resnet18, CPU)
    model.train()
    got = cached_logits(model, cache, "test", CPU, batch=40, bank=bank)
    assert model.training
    assert torch.allclose(got, _reference(model, cache.read_x("test")), atol=1e-5)


def test_batched_runs_every_slice_in_eval_mode_and_restores_the_mode():
    seen = []
    net = torch.nn.Identity()

    def forward(x):
        seen.append((x.dtype, len(x), net.training))
        return x * 2

    x = torch.arange(10, dtype=torch.float16).view(10, 1)
    net.train()
    assert torch.equal(_batched(forward, x, 4, net), x.float() * 2)
    assert seen == [(torch.float32, 4, False), (torch.float32, 4, False), (torch.float32, 2, False)] and net.training
    net.eval()
    _batched(forward, x, 4, net)
    assert not net.training
    mod = torch.nn.Linear(1, 1).train()
    _batched(mod, x, 3)  # without `model`, the forward itself is put in eval mode and back
    assert mod.training


def test_evaluate_and_accuracy_count_exact_matches(cache, model, capsys):
    logits = _reference(model, cache.read_x("test"))
    pred = logits.argmax(1)
    y = cache.read_y("test")
    assert evaluate(model, cache, "test", device=CPU, batch=40) == pytest.approx((pred == y).sum().item() / len(y))
    flipped = (pred + 1) % 4
    flipped[:10] = pred[:10]
    assert evaluate(model, cache, "test", labels=flipped, device=CPU) == pytest.approx(10 / len(y))
    capsys.readouterr()
    assert evaluate(model, cache, labels=flipped) == pytest.approx(10 / len(y))  # the test split by default
    assert capsys.readouterr().err == ""  # no progress by default
    x = cache.read_x("test").float()
    model.train()
    assert accuracy(model, x, flipped, model, batch=40) == pytest.approx(10 / len(y)) and model.training


def test_scorer_scores_exactly_the_rows_asked_with_and_without_a_bank(cache, model, resnet18):
    logits = _reference(model, cache.read_x("train"))
    labels = logits.argmax(1)
    rows = np.array([17, 3, 40, 41, 90])
    labels[torch.tensor([3, 40])] = (labels[torch.tensor([3, 40])] + 1) % 4  # two of the five rows are wrong
    labels[[0, 1, 2]] = (labels[[0, 1, 2]] + 1) % 4  # rows outside the selection: never counted
    bank = ActivationBank(cache, resnet18, CPU)
    for b in (None, bank):
        assert scorer(model, cache, "train", labels, rows, b, CPU)() == pytest.approx(3 / 5)
    whole = (logits.argmax(1) == labels).float().mean().item()
    assert scorer(model, cache, "train", labels, None, None, CPU)() == pytest.approx(whole)
    assert scorer(model, cache, "train", labels, None, bank, CPU)() == pytest.approx(whole)


@pytest.fixture(scope="module")
def labelled_task(resnet_cache, resnet18, tmp_path_factory):
    """A block-8 task trained on label set `pq` (both splits) of a copy of the cache."""
    root = tmp_path_factory.mktemp("labelled")
    store = str(shutil.copytree(resnet_cache, root / "c.zarr"))
    for split in ("train", "test"):
        ids = subcache.open_cache(store).split(split).id[:]
        (root / "l.csv").write_text("id,label\n" + "".join(f"{i},{'pq'[i % 2]}\n" for i in ids))
        subcache.add_labels(store, "pq", root / "l.csv", split=split)
    out = str(root / "t")
    subcache.train(store, subcache.TrainConfig(blocks="8", epochs=1, batch_size=64, limit=64, device="cpu",
                                               labels="pq"), out=out, backbone=resnet18)
    return store, out


def test_open_task_and_load_tasks(labelled_task, resnet18):
    store, out = labelled_task
    task, cache, model, dev = open_task(out, store, "cpu", resnet18)
    assert task.path == subcache.load_task(out).path and cache.path == subcache.open_cache(store).path
    assert dev == CPU and model.start == cache.layer and model.tuned == (8,)
    assert open_task(out, cache, "cpu", resnet18)[1] is cache
    want = (cached_logits(model, cache, "train").argmax(1) == labels_for(cache, "train", "pq")[0]).float().mean()
    assert evaluate_task(out, store, split="train", device="cpu") == pytest.approx(want.item())  # own backbone
    tasks, backbone, dev = load_tasks([task, out], "cpu", identity=cache.backbone)
    assert [t.path for t in tasks] == [task.path, task.path] and dev == CPU
    assert backbone.identity() == resnet18.identity()


def test_evaluate_task_defaults_auto_device_no_progress_and_the_given_backbone(labelled_task, resnet18, monkeypatch,
                                                                               capsys):
    import subcache.evaluation as evaluation

    store, out = labelled_task  # a task trained on a label set is scored on that set, not on y
    _, cache, model, _ = open_task(out, store, "cpu", resnet18)
    pred = cached_logits(model, cache, "test").argmax(1)
    want = (pred == labels_for(cache, "test", "pq")[0]).float().mean().item()
    assert want != pytest.approx((pred == cache.read_y("test")).float().mean().item())
    asked = []
    monkeypatch.setattr(evaluation, "resolve_device", lambda device: asked.append(device) or CPU)
    monkeypatch.setattr(evaluation, "backbone_for", lambda *a: pytest.fail("the given backbone must be used"))
    capsys.readouterr()
    acc = evaluate_task(out, store, backbone=resnet18)
    assert acc == pytest.approx(want) and asked == ["auto"] and capsys.readouterr().err == ""
    open_task(out, store, backbone=resnet18)
    load_tasks([out], backbone=resnet18)
    assert asked == ["auto"] * 3
    assert evaluate_task(out, store, backbone=resnet18, progress=True) == acc
    assert "inference on test" in capsys.readouterr().err


def test_load_tasks_builds_the_backbone_from_the_cache_or_the_first_task(labelled_task, resnet18, monkeypatch):
    import subcache.evaluation as evaluation

    _, out = labelled_task
    first, second = subcache.load_task(out), subcache.load_task(out)
    second.meta, second.path = {**second.meta, "backbone": {"model": "other"}}, "/elsewhere/t"
    asked = []
    monkeypatch.setattr(evaluation, "backbone_for", lambda identity, what: asked.append((identity, what)) or resnet18)
    load_tasks([first, second], "cpu")
    load_tasks([first, second], "cpu", identity={"model": "cache's"})
    assert asked == [(first.meta["backbone"], f"task {first.path}"), ({"model": "cache's"}, "the cache")]
