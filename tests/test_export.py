"""`subcache export`: the multi-task model with a dynamic batch (ONNX via onnxruntime, pt2, TorchScript) equal to
PyTorch at batch 1, 3 and 7; `--format timm` folds a task into the plain model's state dict."""
import json

import numpy as np
import pytest
import torch
import torchvision
from click.testing import CliRunner

import subcache
from subcache.cli.main import main
from subcache.multitask import MultiTaskModel


@pytest.fixture(scope="module")
def tasks(tmp_path_factory, npz_path):
    """Two resnet18 tasks (blocks 3-4 and 6-8, one a different fork point) and a linear probe."""
    backbone = subcache.load_backbone("resnet18", "none", image_size=32)
    root = tmp_path_factory.mktemp("export")
    cache = str(root / "c.zarr")
    subcache.build_cache(subcache.BuildConfig(out=cache, layers=("3",), model="resnet18", weights="none",
                                              data=npz_path, image_size=32, dtype="float32", splits=("train",),
                                              limit=64), backbone=backbone)
    dirs = []
    for blocks in ("3-4", "6-8", "none"):
        d = str(root / f"t{blocks}")
        subcache.train(cache, subcache.TrainConfig(blocks=blocks, epochs=1, batch_size=32, test_split=None),
                       backbone=backbone, out=d)
        dirs.append(d)
    return backbone, dirs


def _expected(backbone, dirs, x):
    model = MultiTaskModel.from_tasks(backbone, dirs, include_original=False)
    with torch.no_grad():
        out = model(x)
    return [out[n].numpy() for n in model.names]


BATCHES = (1, 3, 7)


def _export(fmt, dirs, out):
    r = CliRunner().invoke(main, ["export", *[a for d in dirs for a in ("--task", d)], "--format", fmt,
                                  "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_onnx_has_a_dynamic_batch_and_equals_pytorch(tasks, tmp_path):
    import onnx
    import onnxruntime

    backbone, dirs = tasks
    meta = _export("onnx", dirs[:2], tmp_path / "m.onnx")
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert json.loads(props["subcache"])["input"]["preprocess"]["mean"] == list(backbone.preprocess.mean)
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == meta["outputs"]
    for batch in BATCHES:
        x = torch.randn(batch, 3, 32, 32)
        got = session.run(None, {"images": x.numpy()})
        for g, want in zip(got, _expected(backbone, dirs[:2], x), strict=True):
            assert g.shape == want.shape
            np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt", ["pt2", "torchscript"])
def test_pt2_and_torchscript_equal_pytorch_at_any_batch(tasks, tmp_path, fmt):
    backbone, dirs = tasks
    path = tmp_path / f"m.{fmt}"
    _export(fmt, dirs, path)  # two tuned tasks and a linear probe
    if fmt == "pt2":
        run = torch.export.load(str(path)).module()
    else:
        files = {"subcache.json": ""}
        run = torch.jit.load(str(path), _extra_files=files)
        assert json.loads(files["subcache.json"])["outputs"] == [d.split("/")[-1] for d in dirs]
    for batch in BATCHES:
        x = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            got = run(x)
        for g, want in zip(got, _expected(backbone, dirs, x), strict=True):
            np.testing.assert_allclose(g.numpy(), want, rtol=1e-5, atol=1e-5)


def test_timm_format_folds_a_task_into_the_plain_model(tasks, tmp_path):
    backbone, dirs = tasks
    meta = _export("timm", dirs[1:2], tmp_path / "r18.safetensors")
    from safetensors.torch import load_file

    plain = torchvision.models.resnet18(num_classes=meta["num_classes"]).eval()
    plain.load_state_dict(load_file(str(tmp_path / "r18.safetensors")), strict=True)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        np.testing.assert_allclose(plain(x).numpy(), _expected(backbone, dirs[1:2], x)[0], rtol=1e-5, atol=1e-5)
    r = CliRunner().invoke(main, ["export", "--task", dirs[0], "--task", dirs[1], "--format", "timm", "--out",
                                  str(tmp_path / "two.pth")])
    assert r.exit_code == 1 and r.output.startswith("Error: --format timm folds one task")
