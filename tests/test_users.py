"""What users see: the same predictions from files as from the dataset (the task's input record is followed), the
ecosystem's layouts, one-line warnings, `predict --top`, `train --val-fraction`."""
import json
import re

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


# -- layouts ----------------------------------------------------------------------------------------------------
def _folder(root, classes=("cat", "dog"), n=2):
    for c, color in zip(classes, (200, 30)):
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (40, 36), (color, color, 90)).save(root / c / f"{i}.png")
    return root


def test_class_folders_directly_are_one_split_train_and_splits_stay(tmp_path):
    flat = _folder(tmp_path / "pets")
    assert subcache.data.default_split(flat) == "train" and subcache.data.default_split(flat, "val") == "train"
    source = subcache.open_source(str(flat), "train")
    assert source.classes == ["cat", "dog"] and source.source_keys()[0] == "cat/0.png"
    with pytest.raises(subcache.errors.DataError, match="class folders directly .* one split, train"):
        subcache.open_source(str(flat), "test")
    split = _folder(tmp_path / "split" / "test", ("a", "b"))
    assert subcache.data.default_split(split.parent) == "test"
    assert subcache.open_source(str(split.parent), "test").classes == ["a", "b"]


def test_a_flat_folder_of_images_is_named_unlabelled(tmp_path):
    for i in range(2):
        Image.new("L", (28, 28), 40 * i).save(tmp_path / f"{i}.png")
    source = subcache.open_source(str(tmp_path), "test")
    assert source.split == "unlabelled" and source.classes == [] and (source.labels == -1).all()


def test_a_missing_image_file_is_said_to_be_missing(gray):
    r = CliRunner().invoke(main, ["predict", "--task", gray["task"], "--data", "missing.png"])
    assert r.exit_code == 1 and r.output.strip() == "Error: missing.png: file or folder not found"


def test_predict_says_why_a_labelled_folder_gets_no_accuracy(gray, tmp_path):
    out, err = _predict(gray, str(_folder(tmp_path / "pets")), "train")
    assert out["accuracy"] == {}
    assert "no accuracy for task: its classes (0, 1, 2, 3) are not the data's (cat, dog)" in err


def test_predict_top_k_lists_the_most_probable_classes(gray):
    out, _ = _predict(gray, gray["npz"], "test", "--top", "3", "--limit", "6")
    task = subcache.load_task(gray["task"])
    x = torch.stack([task.transform()(im) for im in gray["x_test"][:6]])
    with torch.no_grad():
        model = subcache.MultiTaskModel.from_tasks(gray["backbone"], [task], include_original=False)
        probs = next(iter(model(x).values())).softmax(1)
    for row, p in zip(out["predictions"], probs):
        top = torch.topk(p, 3)
        assert [c for c, _ in row["task_top"]] == [task.meta["classes"][i] for i in top.indices]
        np.testing.assert_allclose([q for _, q in row["task_top"]], top.values.numpy(), atol=1e-5)
        assert row["task_top"][0] == [row["task"], row["task_prob"]]


# -- warnings ---------------------------------------------------------------------------------------------------
def test_an_epoch_of_few_steps_warns_once(gray, tmp_path):
    def run(*args):
        r = CliRunner().invoke(main, ["train", "--cache", gray["cache"], "--blocks", "none", "--epochs", "2",
                                      "--out", str(tmp_path / "t"), "--overwrite", "--json", *args])
        assert r.exit_code == 0, r.output
        return [line for line in r.stderr.splitlines() if line.startswith("warning")]

    lines = run("--examples", "64", "--batch-size", "32")
    assert len(lines) == 1 and "64 training examples at batch 32 make 2 optimiser steps per epoch" in lines[0]
    assert run("--examples", "64", "--batch-size", "6") == []  # 11 steps


def test_active_learning_warns_once_per_round_size_of_few_steps(gray, tmp_path):
    """Every round of every seed and strategy trains on few examples: one line per labelled-set size, not per run."""
    r = CliRunner().invoke(main, ["al", "--cache", gray["cache"], "--blocks", "none", "--budgets", "16,24",
                                  "--strategy", "margin,random", "--repeats", "2", "--epochs", "1", "--batch-size",
                                  "256", "--out", str(tmp_path / "al"), "--json"])
    assert r.exit_code == 0, r.output
    lines = [line for line in r.stderr.splitlines() if line.startswith("warning")]
    assert len(lines) == 2 and "16 training examples" in lines[0] and "24 training examples" in lines[1]


def test_a_best_window_within_the_seeds_noise_warns():
    from subcache.advice import within_noise

    summary = [{"blocks": "7", "width": 1, "runs": 2, "mean": 0.80, "std": 0.02},
               {"blocks": "8", "width": 1, "runs": 2, "mean": 0.79, "std": 0.005},
               {"blocks": "none", "width": 0, "runs": 2, "mean": 0.90, "std": 0.0}]
    assert "best window 7 (test 0.8000) is within noise of the runner-up 8" in within_noise(summary, summary[0])
    apart = [dict(summary[0], mean=0.85), *summary[1:]]
    assert within_noise(apart, apart[0]) is None
    one_seed = [dict(s, runs=1, std=0.0) for s in summary]
    assert within_noise(one_seed, one_seed[0]) is None


# -- train --val-fraction ------------------------------------------------------------------------------------------
def test_validation_monitoring_keeps_the_best_epoch_not_the_last():
    from subcache.train import Best

    model = torch.nn.Linear(2, 2)
    model.task_state = model.state_dict
    scores = iter([0.5, 0.9, 0.7])
    best = Best(model, lambda: next(scores))
    kept = {}
    for epoch in (1, 2, 3):
        with torch.no_grad():
            model.weight.fill_(epoch)
        best({"epoch": epoch})
        kept[epoch] = model.weight.clone()
    best.restore()
    assert best.epoch == 2 and best.best == 0.9 and torch.equal(model.weight, kept[2])


def test_train_val_fraction_holds_out_monitors_and_reports_the_chosen_epoch(gray, tmp_path):
    r = CliRunner().invoke(main, ["train", "--cache", gray["cache"], "--blocks", "none", "--epochs", "3",
                                  "--batch-size", "8", "--val-fraction", "0.25", "--eval-every", "1",
                                  "--out", str(tmp_path / "t"), "--json"])
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)
    history = json.loads((tmp_path / "t" / "task.json").read_text())["history"]
    vals = [h["val_accuracy"] for h in history]
    assert m["best_epoch"] == 1 + vals.index(max(vals)) and m["val_accuracy"] == max(vals)
    assert m["num_samples"] == 48  # 64 training examples less 16 held out
    epoch_lines = [line for line in r.stderr.splitlines() if re.match(r"\S+ epoch \d", line)]
    assert len(epoch_lines) == 3 and all(line.startswith("t epoch ") and " val " in line for line in epoch_lines)


# -- progress ---------------------------------------------------------------------------------------------------
def test_halving_lines_count_its_runs_and_name_each():
    from subcache.selection.halving import ProfileConfig, planned_runs, run_note

    config = ProfileConfig(seeds=2, eta=3, train=subcache.TrainConfig(epochs=3))
    assert planned_runs(7, 1, config) == 7 * 2 + 3 * 2  # rung 0: 7 windows × 1 epoch; rung 1: 3 × 3 epochs
    assert planned_runs(1, 1, config) == 2 * 2  # rung 0, then the lone survivor straight to the last rung
    assert planned_runs(4, 3, config) == 4 * 2  # already at the final epochs: one rung
    row = {"rung": 1, "epochs": 3, "blocks": "13-14", "seed": 0, "val_accuracy": 0.8125, "test_accuracy": None}
    assert run_note(row) == "rung 1 (3 epochs) blocks 13-14 seed 0: val 0.8125 test –"


def test_a_single_step_prints_a_line_once_it_runs_long_and_its_time(capsys):
    from subcache.progress import stage

    with stage("export onnx", after=0.0):
        import time

        time.sleep(0.2)
    with stage("quick", after=5.0):
        pass
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "export onnx …" and re.fullmatch(r"export onnx done in 0\.\d s", lines[1])
    assert re.fullmatch(r"quick done in 0\.0 s", lines[2]) and len(lines) == 3


def test_a_profile_warns_of_few_steps_once_not_per_run(gray, tmp_path):
    r = CliRunner().invoke(main, ["profile", "--cache", gray["cache"], "--range", "8-8", "--repeats", "2", "--epochs",
                                  "1", "--examples", "64", "--batch-size", "32", "--out", str(tmp_path / "p")])
    assert r.exit_code == 0, r.output
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning: 64 training examples")]
    assert len(warnings) == 1


def test_a_task_trained_on_files_crops_arrays_as_it_cropped_its_files(gray, tmp_path):
    """The reverse: a task whose cache came from image files (short side + center crop) is served the same images
    as arrays; they are cropped the same way and give the files' probabilities."""
    npz = np.load(gray["npz"])
    x, y = npz["x_test"][:16], npz["y_test"][:16]
    for i, (im, label) in enumerate(zip(x, y)):
        (tmp_path / "files" / "train" / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(tmp_path / "files" / "train" / str(label) / f"{i:03d}.png")
    cache, task = str(tmp_path / "f.zarr"), str(tmp_path / "ftask")
    subcache.build_cache(subcache.BuildConfig(out=cache, layers=("6",), model="resnet18", weights="none",
                                              data=str(tmp_path / "files"), splits=("train",), image_size=32,
                                              dtype="float32"), backbone=gray["backbone"], progress=False)
    subcache.train(cache, subcache.TrainConfig(blocks="none", epochs=1, batch_size=8, test_split=None),
                   backbone=gray["backbone"], out=task)
    assert subcache.load_task(task).input_record["resize"] == "crop"
    np.savez(tmp_path / "arrays.npz", x=x, y=y)
    files = subcache.predict([task], str(tmp_path / "files"), split="train", backbone=gray["backbone"], device="cpu")
    arrays = subcache.predict([task], str(tmp_path / "arrays.npz"), split="train", backbone=gray["backbone"],
                              device="cpu")
    order = [int(k.split("/")[-1][:3]) for k in files.keys]
    np.testing.assert_allclose(arrays.probabilities["ftask"][order], files.probabilities["ftask"], atol=1e-5)
