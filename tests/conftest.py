"""Shared fixtures: tiny, seeded, offline datasets and caches (random-init backbones at 32 px)."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import zarr

import subcache


def make_npz(path, n_train=192, n_test=96, size=32, classes=4, seed=0, channels=3):
    """Images whose class decides which quadrant is bright: learnable from any reasonable features."""
    rng = np.random.default_rng(seed)

    def split(n):
        y = rng.integers(0, classes, n)
        x = rng.integers(0, 90, (n, size, size, channels), dtype=np.uint8)
        h = size // 2
        for i, c in enumerate(y):
            r, q = divmod(int(c), 2)
            x[i, r * h:(r + 1) * h, q * h:(q + 1) * h] += 150
        return x, y

    x_train, y_train = split(n_train)
    x_test, y_test = split(n_test)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return str(path)


def _unexpected_skip(report, item=None) -> bool:
    """A skip that is not an expected failure (xfail) nor a test marked `gpu` (skipped without CUDA)."""
    if not report.skipped or hasattr(report, "wasxfail"):
        return False
    return item is None or item.get_closest_marker("gpu") is None


def _fail_skip(report) -> None:
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = f"unexpected skip (only tests marked gpu may skip; install what the test needs): {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A skipped test is a missing test: every skip fails the suite, except a `gpu` test's."""
    report = (yield).get_result()
    if _unexpected_skip(report, item):
        _fail_skip(report)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """A module skipped whole (a module-level ``importorskip``) fails the suite too."""
    report = (yield).get_result()
    if _unexpected_skip(report):
        _fail_skip(report)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def npz_path(tmp_path_factory):
    return make_npz(tmp_path_factory.mktemp("data") / "quadrants.npz")


@pytest.fixture(scope="session")
def resnet18():
    return subcache.load_backbone("resnet18", "none", image_size=32)


@pytest.fixture(scope="session")
def resnet_cache(tmp_path_factory, npz_path, resnet18):
    """resnet18 (random init, 32 px) cache at block 6's input, float32 so tests can compare exactly."""
    out = str(tmp_path_factory.mktemp("caches") / "r18.zarr")
    config = subcache.BuildConfig(out=out, layers=("6",), model="resnet18", weights="none", data=npz_path,
                                  image_size=32, dtype="float32", batch_size=32)
    subcache.build_cache(config, backbone=resnet18)
    return out


def quick_task(cache, backbone, out, blocks: str) -> str:
    """A task trained for one epoch on 64 items of ``cache`` (tuned ``blocks``; "none": the probe), saved at ``out``."""
    out = str(out)
    subcache.train(cache, subcache.TrainConfig(blocks=blocks, epochs=1, batch_size=64, limit=64, device="cpu",
                                               test_split=None), out=out, backbone=backbone)
    return out


@pytest.fixture(scope="session")
def chunked_cache(tmp_path_factory, npz_path, resnet18):
    """float32 resnet18 cache at block 6 in 16-sample chunks: 12 chunks in the training split (stream tests)."""
    out = str(tmp_path_factory.mktemp("chunked") / "c.zarr")
    subcache.build_cache(subcache.BuildConfig(out=out, layers=("6",), model="resnet18", weights="none",
                                              data=npz_path, image_size=32, dtype="float32", chunk_mb=0.04,
                                              splits=("train",)), backbone=resnet18)
    return subcache.open_cache(out)


@pytest.fixture
def int8_store(tmp_path_factory, npz_path, resnet18):
    """A tiny int8 cache (24 items a split in several chunks) with keys and a label set, built for each test (under
    mutmut a session fixture's build would count only for the first test that asked for it)."""
    out = tmp_path_factory.mktemp("store") / "i8.zarr"
    subcache.build_cache(subcache.BuildConfig(out=str(out), layers=("3",), model="resnet18", weights="none",
                                              data=npz_path, image_size=32, batch_size=16, limit=24, dtype="int8",
                                              chunk_mb=1 / 64), backbone=resnet18)
    ids = zarr.open_group(str(out))["train/id"][:]
    csv = tmp_path_factory.mktemp("labels") / "parity.csv"
    csv.write_text("id,label\n" + "".join(f"{i},{'odd' if i % 2 else 'even'}\n" for i in ids))
    subcache.add_labels(out, "parity", csv)
    return out


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A real S3-compatible server (moto) on loopback, one per session (fsspec caches its S3 filesystems, so a
    second server on another port would meet a cached client of the first); credentials only through the
    environment."""
    import s3fs
    from moto.server import ThreadedMotoServer

    s3fs.S3FileSystem.clear_instance_cache()  # a client cached by an earlier session in this process (mutmut)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                                            "AWS_ENDPOINT_URL")}
    os.environ.update(AWS_ACCESS_KEY_ID="subcache-key-id", AWS_SECRET_ACCESS_KEY="subcache-secret",
                      AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=f"http://{host}:{port}")
    import boto3

    boto3.client("s3").create_bucket(Bucket="caches")
    yield "s3://caches"
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
