"""Dataset objects in (torchvision, Hugging Face, sequences, hf:PATH) and traceable results out: every split keeps
each item's source key, and predict/score/al name items by key and classes by name."""
import csv
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import subcache
from subcache.cli.main import main
from subcache.data import to_input


def cli(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r


def test_torchvision_dataset_object(resnet18, tmp_path):
    from torchvision.datasets import FakeData

    ds = FakeData(size=12, image_size=(3, 20, 24), num_classes=3, random_offset=5)
    config = subcache.BuildConfig(out=str(tmp_path / "c.zarr"), layers=("3",), dtype="float32", batch_size=5)
    subcache.build_cache(config, backbone=resnet18, data=ds)
    cache = subcache.open_cache(config.out)
    assert cache.splits == ["train"] and cache.attrs["data"] == "python:FakeData"
    assert cache.read_y("train").tolist() == [ds[i][1] for i in range(12)]
    assert cache.read_keys("train").tolist() == [str(i) for i in range(12)]
    images = subcache.open_source(ds, "train").take(np.array([7]), resnet18.preprocess)
    with torch.inference_mode():
        want = resnet18.prefix(to_input(images, resnet18.preprocess), 3)
    assert torch.allclose(cache.read_x("train", 7, 8), want, atol=1e-6)


def test_a_sequence_of_arrays_and_labels_with_two_splits(resnet18, tmp_path):
    rng = np.random.default_rng(0)
    train = [(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8), i % 2) for i in range(6)]
    test = [(rng.integers(0, 255, (16, 16), dtype=np.uint8), 1) for _ in range(3)]  # gray
    config = subcache.BuildConfig(out=str(tmp_path / "c.zarr"), layers=("2",))
    subcache.build_cache(config, backbone=resnet18, data={"train": train, "test": test})
    cache = subcache.open_cache(config.out)
    assert cache.splits == ["train", "test"] and cache.read_y("train").tolist() == [0, 1, 0, 1, 0, 1]
    assert cache.classes == ["0", "1"]


def _hf_dataset(n, seed):
    import datasets

    rng = np.random.default_rng(seed)
    labels = [i % 3 for i in range(n)]
    images = [Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)) for _ in labels]
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["ant", "bee", "cat"])})
    return datasets.Dataset.from_dict({"img": images, "label": labels}, features=features)


def test_hugging_face_dataset_saved_to_disk_from_the_cli(tmp_path):
    import datasets

    ddict = datasets.DatasetDict({"train": _hf_dataset(9, 0), "test": _hf_dataset(6, 1)})
    ddict.save_to_disk(str(tmp_path / "hfds"))
    out = tmp_path / "c.zarr"
    cli("build", "--model", "resnet18", "--weights", "none", "--image-size", 32, "--data", f"hf:{tmp_path / 'hfds'}",
        "--layer", 3, "--out", out, "--json")
    cache = subcache.open_cache(out)
    assert cache.classes == ["ant", "bee", "cat"]
    assert cache.read_y("test").tolist() == [0, 1, 2, 0, 1, 2] and len(cache.split("train")) == 9
    ddict["train"].to_parquet(str(tmp_path / "pq" / "train-00000.parquet"))  # the Hub's parquet layout
    source = subcache.open_source(f"hf:{tmp_path / 'pq'}", "train")
    assert source.classes == ["ant", "bee", "cat"] and len(source) == 9
    r = CliRunner().invoke(main, ["build", "--data", f"hf:{tmp_path / 'pq'}", "--split", "test", "--model",
                                  "resnet18", "--weights", "none", "--layer", 3, "--out", tmp_path / "d.zarr"])
    assert r.exit_code == 1 and "test-*.parquet" in r.output and "Traceback" not in r.output


COLOURS = {"blue": (20, 40, 230), "red": (230, 30, 20)}


@pytest.fixture
def colour_folder(tmp_path):
    """An ImageFolder (train/ and test/) whose class is the image's colour, with shuffled file names."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 6)):
        for i in range(n):
            name = ("red", "blue")[rng.integers(0, 2)]
            folder = tmp_path / "colours" / split / name
            folder.mkdir(parents=True, exist_ok=True)
            pixels = np.clip(np.array(COLOURS[name]) + rng.integers(-20, 20, (20, 20, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"img{rng.integers(1000):03d}_{i}.png")
    return tmp_path / "colours"


def test_predictions_name_each_path_and_class(colour_folder, tmp_path):
    out, task = tmp_path / "c.zarr", tmp_path / "probe"
    cli("build", "--model", "resnet18", "--weights", "none", "--image-size", 32, "--data", colour_folder,
        "--layer", 8, "--dtype", "float32", "--out", out)
    keys = subcache.open_cache(out).read_keys("test").tolist()
    assert all(k.startswith("test/") and k.endswith(".png") for k in keys) and len(keys) == 6
    cli("train", "--cache", out, "--blocks", "none", "--epochs", 30, "--lr", 0.05, "--out", task)
    r = cli("predict", "--task", task, "--data", colour_folder, "--out", tmp_path / "p.csv", "--json")
    rows = json.loads(r.stdout)["predictions"]
    assert {row["key"] for row in rows} == set(keys)
    for row in rows:  # the class folder in the path is the truth: the right path got the right class
        assert row["label"] == row["key"].split("/")[1] == row["probe"] and 0.5 < row["probe_prob"] <= 1
    with open(tmp_path / "p.csv") as f:
        assert [r["key"] for r in csv.DictReader(f)] == [row["key"] for row in rows]
    single = next((colour_folder / "test" / "red").iterdir())
    row = json.loads(cli("predict", "--task", task, "--data", single, "--json").stdout)["predictions"]
    assert row == [{"id": 0, "key": single.name, "label": "", "probe": "red", "probe_prob": row[0]["probe_prob"]}]
    loose = tmp_path / "loose"  # an unlabelled folder: images straight in it
    loose.mkdir()
    for name in ("a.png", "b.png"):
        Image.fromarray(np.full((20, 20, 3), COLOURS["blue"], np.uint8)).save(loose / name)
    rows = json.loads(cli("predict", "--task", task, "--data", loose, "--json").stdout)["predictions"]
    assert [(r["key"], r["probe"]) for r in rows] == [("a.png", "blue"), ("b.png", "blue")]

    r = cli("score", "--cache", out, "--task", task, "--split", "test", "--top", 3, "--out", tmp_path / "s.csv",
            "--json")
    top = json.loads(r.stdout)["top"]
    assert len(top) == 3 and all(t["key"] in keys and t["pred"] == t["key"].split("/")[1] for t in top)
    with open(tmp_path / "s.csv") as f:
        assert all(r["pred"] == r["key"].split("/")[1] for r in csv.DictReader(f))


def test_to_label_names_items_by_key(colour_folder, tmp_path):
    from subcache.active import ALConfig, active_learning

    out = tmp_path / "c.zarr"
    cli("build", "--model", "resnet18", "--weights", "none", "--image-size", 32, "--data", colour_folder,
        "--layer", 8, "--out", out)
    config = ALConfig(blocks="none", budgets=(4, 8), oracle=str(tmp_path / "oracle.csv"),
                      train=subcache.TrainConfig(epochs=1, batch_size=4))
    result = active_learning(str(out), config, out=str(tmp_path / "al"))
    keys = subcache.open_cache(out).read_keys("train")
    with open(result.waiting) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and all(r["key"] == keys[int(r["id"])] for r in rows)
    with open(tmp_path / "oracle.csv", "w") as f:  # answered by class name, read from the key's folder
        f.write("id,label\n" + "".join(f"{r['id']},{r['key'].split('/')[1]}\n" for r in rows))
    assert active_learning(str(out), config, out=str(tmp_path / "al")).waiting  # next round asks again
