"""What users see: the same predictions from files as from the dataset (the task's input record is followed), the
ecosystem's layouts, one-line warnings, `predict --top`, `train --val-fraction`."""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import subcache
from subcache.cli.main import main

from conftest import make_npz


@pytest.fixture(scope="module")
def gray(tmp_path_factory):
    """A Fashion-like .npz (gray 28 px N×H×W), a resnet18 cache of it at 32 px (whole-frame resize) and a task."""
    root = tmp_path_factory.mktemp("users")
    npz = root / "gray.npz"
    make_npz(npz, n_train=64, n_test=24, size=28, channels=1)
    data = dict(np.load(npz))
    np.savez(npz, **{k: v.squeeze(-1) if k.startswith("x") else v for k, v in data.items()})
    backbone = subcache.load_backbone("resnet18", "none", image_size=32)
    cache = str(root / "c.zarr")
    subcache.build_cache(subcache.BuildConfig(out=cache, layers=("6",), model="resnet18", weights="none",
                                              data=str(npz), image_size=32, dtype="float32"), backbone=backbone)
    task = str(root / "task")
    subcache.train(cache, subcache.TrainConfig(blocks="7-8", epochs=1, batch_size=16), backbone=backbone, out=task)
    return {"npz": str(npz), "cache": cache, "task": task, "backbone": backbone, "root": root,
            "x_test": np.load(npz)["x_test"]}


def _save(images, folder, suffix, **kw):
    folder.mkdir(exist_ok=True)
    for i, x in enumerate(images):
        Image.fromarray(x).save(folder / f"{i:03d}{suffix}", **kw)
    return str(folder)


def _predict(gray, data, split="test", *extra):
    r = CliRunner().invoke(main, ["predict", "--task", gray["task"], "--data", data, "--split", split, "--json",
                                  "--device", "cpu", *extra])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout), r.stderr


def test_the_cache_records_how_its_inputs_were_made(gray):
    rec = subcache.load_task(gray["task"]).input_record
    assert (rec["source"], rec["resize"], rec["antialias"], rec["image_size"]) == ("array", "frame", True, 32)
    assert subcache.open_cache(gray["cache"]).attrs["preprocess"]["resize"] == "frame"


def test_png_and_jpeg_files_predict_as_the_dataset_items(gray):
    """The dataset's own test items saved as PNG give its probabilities; as JPEG, its classes (mostly)."""
    items = gray["x_test"]
    want, _ = _predict(gray, gray["npz"])
    png, note = _predict(gray, _save(items, gray["root"] / "png", ".png"))
    jpeg, _ = _predict(gray, _save(items, gray["root"] / "jpeg", ".jpg", quality=95))
    probs = [p["task_prob"] for p in want["predictions"]]
    assert [p["key"] for p in png["predictions"]] == [f"{i:03d}.png" for i in range(len(items))]
    assert [p["task"] for p in png["predictions"]] == [p["task"] for p in want["predictions"]]
    np.testing.assert_allclose([p["task_prob"] for p in png["predictions"]], probs, atol=1e-5)
    same = np.mean([a["task"] == b["task"] for a, b in zip(jpeg["predictions"], want["predictions"])])
    assert same >= 0.9
    assert note.count("trained on arrays") == 1 and "whole frame" in note


def test_python_loading_makes_inputs_as_the_cache_did(gray):
    task, backbone = subcache.load_task(gray["task"]), gray["backbone"]
    x = gray["x_test"][:3]
    got = torch.stack([task.transform()(Image.fromarray(im)) for im in x])
    source = subcache.open_source(gray["npz"], "test")
    want = subcache.data.to_input(source.load(0, 3, backbone.preprocess), backbone.preprocess)
    torch.testing.assert_close(got, want)


def test_onnx_export_names_the_task_record_and_can_normalise_in_graph(gray, tmp_path):
    import onnx
    import onnxruntime

    out = tmp_path / "m.onnx"
    r = CliRunner().invoke(main, ["export", "--task", gray["task"], "--format", "onnx", "--out", str(out),
                                  "--preprocess", "--json"])
    assert r.exit_code == 0, r.output
    meta = json.loads({p.key: p.value for p in onnx.load(str(out)).metadata_props}["subcache"])
    assert meta == json.loads(r.stdout)
    assert meta["input"]["preprocess"]["resize"] == "frame" and "whole frame" in meta["input"]["how"]
    assert meta["input"]["dtype"] == "uint8" and meta["input"]["normalised_in_model"]
    images = torch.from_numpy(np.stack([gray["x_test"][:5]] * 3, 1))  # gray → RGB
    images = torch.nn.functional.pad(images, (2, 2, 2, 2))  # 32 px: nothing to resize
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": images.numpy()})[0]
    task, backbone = subcache.load_task(gray["task"]), gray["backbone"]
    with torch.no_grad():
        want = subcache.MultiTaskModel.from_tasks(backbone, [task], include_original=False)(
            subcache.data.to_input(images, backbone.preprocess))
    np.testing.assert_allclose(got, next(iter(want.values())).numpy(), rtol=1e-4, atol=1e-4)
