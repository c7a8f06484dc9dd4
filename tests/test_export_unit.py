"""Export, exactly: the record written with a model, the in-graph preprocessing, folding a task into the plain
model, and the messages (each test kills mutants that `examples/mutation.sh export` found surviving)."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import subcache
from subcache.backbones.core import Backbone, Preprocess
from subcache.errors import TaskError
from subcache.export import Deployable, Normalised, _fold, export, fold_state, metadata
from subcache.inputs import describe, resizing

from conftest import quick_task

PRE = Preprocess(4, (0.5, 0.25, 0.125), (0.5, 0.5, 0.25))


@pytest.fixture(scope="module")
def task(resnet_cache, resnet18, tmp_path_factory):
    return quick_task(resnet_cache, resnet18, tmp_path_factory.mktemp("export-unit") / "probe", "8")


class Two(nn.Module):
    names = ["b", "a"]

    def forward(self, x):
        return {"a": x.sum((1, 2, 3)), "b": x.mean((1, 2, 3)), "c": x}


def test_deployable_returns_logits_in_task_order():
    x = torch.randn(2, 3, 4, 4)
    model = Deployable(Two())
    assert model.names == ["b", "a"]
    b, a = model(x)
    assert torch.equal(b, x.mean((1, 2, 3))) and torch.equal(a, x.sum((1, 2, 3)))


def test_normalised_scales_and_normalises_uint8_images_in_the_graph():
    seen = []
    inner = Deployable(Two())
    inner.forward = lambda x: seen.append(x) or (x,)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # the buffers are float32 whatever the default
    try:
        model = Normalised(inner, PRE.mean, PRE.std)
    finally:
        torch.set_default_dtype(default)
    assert model.names == ["b", "a"]
    for buffer in (model.mean, model.std):
        assert buffer.shape == (1, 3, 1, 1) and buffer.dtype == torch.float32
    images = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    model(images)
    want = (images.float() / 255 - torch.tensor(PRE.mean).view(1, 3, 1, 1)) / torch.tensor(PRE.std).view(1, 3, 1, 1)
    assert torch.allclose(seen[0], want, atol=1e-6)
    assert {k for k, _ in model.named_buffers()} == {"mean", "std"}


def _rec(size=4):
    return {**PRE.to_dict(), "image_size": size, "source": "array", "resize": "frame", "antialias": True}


def test_metadata_records_tasks_outputs_input_and_backbone():
    tasks = [SimpleNamespace(meta={"classes": ["x", "y"]}, blocks=(3, 4), path="/t/one"),
             SimpleNamespace(meta={"classes": ["p"]}, blocks=(), path="/t/two")]
    model = SimpleNamespace(names=["one", "two"])
    backbone = SimpleNamespace(identity=lambda: {"model": "m"})
    rec = _rec()
    assert metadata(model, tasks, rec, backbone) == {
        "format": "subcache-export", "outputs": ["one", "two"],
        "tasks": {"one": {"classes": ["x", "y"], "blocks": [3, 4], "path": "/t/one"},
                  "two": {"classes": ["p"], "blocks": [], "path": "/t/two"}},
        "input": {"name": "images", "shape": ["batch", 3, 4, 4], "dtype": "float32", "preprocess": rec,
                  "how": describe(rec), "normalised_in_model": False},
        "backbone": {"model": "m"}}
    pre = metadata(model, tasks, rec, backbone, preprocess=True)["input"]
    assert pre["dtype"] == "uint8" and pre["normalised_in_model"] is True and pre["shape"] == ["batch", 3, 4, 4]
    assert pre["how"] == (f"RGB (gray repeated, alpha dropped) uint8; {resizing(rec)}; layout (batch, 3, 4, 4) uint8 "
                          "(the model scales and normalises)")


def test_export_messages(task, tmp_path):
    with pytest.raises(TaskError) as e:
        export([task], "tflite", tmp_path / "m")
    assert str(e.value) == "unknown export format 'tflite'; allowed: onnx, pt2, torchscript, timm"
    with pytest.raises(TaskError) as e:
        export([], "onnx", tmp_path / "m.onnx")
    assert str(e.value) == "export needs at least one --task"
    assert not (tmp_path / "m.onnx").exists()


def test_a_torchscript_export_with_preprocess_takes_uint8_images(task, resnet18, tmp_path):
    plain = export([task], "torchscript", tmp_path / "f.pt", backbone=resnet18)
    meta = export([task], "torchscript", tmp_path / "u.pt", backbone=resnet18, preprocess=True)
    files = {"subcache.json": ""}
    uint8 = torch.jit.load(str(tmp_path / "u.pt"), _extra_files=files)
    assert json.loads(files["subcache.json"]) == meta and meta["input"]["dtype"] == "uint8"
    assert plain["input"]["dtype"] == "float32" and plain["outputs"] == meta["outputs"] == ["probe"]
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    rec = meta["input"]["preprocess"]
    x = (images.float() / 255 - torch.tensor(rec["mean"]).view(1, 3, 1, 1)) / torch.tensor(rec["std"]).view(1, 3, 1, 1)
    float32 = torch.jit.load(str(tmp_path / "f.pt"))
    with torch.no_grad():
        assert torch.allclose(uint8(images)[0], float32(x)[0], atol=1e-4)
    with pytest.raises(subcache.errors.OutputExistsError):
        export([task], "torchscript", tmp_path / "u.pt", backbone=resnet18)
    assert export([task], "timm", tmp_path / "u.pt", backbone=resnet18, overwrite=True)["format"] == "subcache-timm"


def _toy(head: nn.Module | None = nn.Linear(3, 2)) -> Backbone:
    return Backbone.from_modules(nn.Identity(), [nn.Linear(3, 3), nn.Linear(3, 3)], nn.Identity(), PRE, head,
                                 model_id="toy")


def test_fold_state_takes_the_tuned_blocks_and_head_and_copies_the_rest():
    backbone = _toy()
    block, head = nn.Linear(3, 3), nn.Linear(3, 2)
    state = fold_state(backbone, {2: block}, head)
    assert list(state) == list(backbone.model.state_dict())
    for key, want in [("blocks.0.weight", backbone.block(1).weight), ("blocks.1.weight", block.weight),
                      ("blocks.1.bias", block.bias), ("head.weight", head.weight), ("head.bias", head.bias)]:
        assert torch.equal(state[key], want) and state[key].data_ptr() != want.data_ptr()
        assert not state[key].requires_grad and state[key].is_contiguous()


def test_fold_state_messages():
    with pytest.raises(TaskError) as e:
        fold_state(_toy(head=None), {}, nn.Linear(3, 2))
    assert str(e.value) == ("toy has no original classifier for the task's head to replace; export it as onnx, pt2 "
                            "or torchscript")
    with pytest.raises(TaskError) as e:
        fold_state(_toy(), {1: nn.Linear(3, 3, bias=False)}, nn.Linear(3, 2))
    assert str(e.value) == "the task's Linear has no bias; it cannot replace blocks.0.bias in the plain model"


def test_fold_refuses_several_siamese_or_pruned_tasks(tmp_path):
    one = SimpleNamespace(meta={}, path="/t/a")
    with pytest.raises(TaskError) as e:
        _fold([one, one], _toy(), tmp_path / "x.pth")
    assert str(e.value) == "--format timm folds one task into the plain model; got 2 tasks"
    for meta in ({"siamese": True}, {"pruned_shapes": {"x": [1]}}):
        with pytest.raises(TaskError) as e:
            _fold([SimpleNamespace(meta=meta, path="/t/s")], _toy(), tmp_path / "x.pth")
        assert str(e.value) == ("task /t/s is siamese or pruned: its blocks or head do not fit the plain model; export "
                                "it as onnx, pt2 or torchscript")
    assert not (tmp_path / "x.pth").exists()


def test_timm_export_writes_a_state_dict_as_pth_or_safetensors(task, resnet18, tmp_path):
    from safetensors import safe_open

    meta = export([task], "timm", tmp_path / "m.pth", backbone=resnet18)
    loaded = subcache.load_task(task)
    assert meta == {"format": "subcache-timm", "model": resnet18.model_id, "num_classes": 4,
                    "classes": loaded.meta["classes"], "preprocess": loaded.input_record}
    pth = torch.load(tmp_path / "m.pth")
    assert export([task], "timm", tmp_path / "m.safetensors", backbone=resnet18) == meta
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["subcache"]) == meta
        assert sorted(f.keys()) == sorted(pth) and torch.equal(f.get_tensor("fc.weight"), pth["fc.weight"])
    assert pth["fc.weight"].shape == (4, 512)


def test_onnx_names_its_dynamic_axis_batch_and_carries_the_record(task, resnet18, tmp_path):
    import onnx

    meta = export([task], "onnx", tmp_path / "m.onnx", backbone=resnet18)
    proto = onnx.load(str(tmp_path / "m.onnx"))
    axes = {v.name: v.type.tensor_type.shape.dim[0].dim_param for v in [*proto.graph.input, *proto.graph.output]}
    assert axes == {"images": "batch", "probe": "batch"}
    assert json.loads({p.key: p.value for p in proto.metadata_props}["subcache"]) == meta


def test_pt2_carries_the_record_and_takes_a_batch_of_one(task, resnet18, tmp_path):
    meta = export([task], "pt2", tmp_path / "m.pt2", backbone=resnet18)
    files = {"subcache.json": ""}
    program = torch.export.load(str(tmp_path / "m.pt2"), extra_files=files)
    assert json.loads(files["subcache.json"]) == meta
    run = program.module()
    with torch.no_grad():
        assert [run(torch.randn(b, 3, 32, 32))[0].shape[0] for b in (1, 3)] == [1, 3]
