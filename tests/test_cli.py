"""The command line: thin over the library; bad input → one line, non-zero exit, no traceback."""
import json

import pytest
from click.testing import CliRunner

from subcache.cli.main import main


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result


def one_line_error(result, fragment):
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    assert result.stdout == "", result.stdout  # errors go to stderr only
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.output
    assert fragment in lines[0], lines[0]


def test_build_info_train_evaluate_round_trip(tmp_path, npz_path):
    out, task = tmp_path / "c.zarr", tmp_path / "task"
    r = run("build", "--model", "resnet18", "--weights", "none", "--data", npz_path, "--image-size", 32,
            "--layer", "layer3.1", "--out", out, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["layers"] == [6]
    info = json.loads(run("info", out, "--json").stdout)
    assert info["status"] == "complete" and info["layer"]["index"] == 6 and info["compression_ratio"] > 1
    assert info["splits"]["train"]["x"]["shape"] == [192, 256, 2, 2]
    r = run("train", "--cache", out, "--blocks", "7-8", "--epochs", 2, "--batch-size", 64, "--out", task, "--json")
    assert r.exit_code == 0, r.output
    metrics = json.loads(r.stdout)
    assert {"test_accuracy", "train_seconds", "trainable_params", "samples_per_second"} <= metrics.keys()
    r = run("evaluate", "--task", task, "--cache", out, "--json")
    assert json.loads(r.stdout)["accuracy"] == metrics["test_accuracy"]
    blocks = json.loads(run("blocks", "resnet50", "--image-size", 64, "--json").stdout)
    assert blocks["num_blocks"] == 16 and blocks["blocks"][12]["name"] == "layer3.5"


def test_human_output_goes_to_stderr_and_json_to_stdout():
    r = run("blocks", "resnet18", "--image-size", 32)
    assert r.exit_code == 0
    assert "layer4.1" in r.stderr and r.stdout == ""  # tables on stderr: stdout stays clean for pipes
    r = run("blocks", "resnet18", "--image-size", 32, "--json")
    assert r.exit_code == 0 and r.stderr == ""
    assert json.loads(r.stdout)["blocks"][7]["name"] == "layer4.1"


@pytest.mark.parametrize("args, fragment", [
    (["blocks", "resnet9000"], "known: efficientnet_lite0"),
    (["build", "--model", "resnet18", "--weights", "none", "--layer", "layer5", "--out", "{tmp}/x.zarr",
      "--data", "{npz}"], "valid: layer1.0 … layer4.1 or 1-8"),
    (["build", "--model", "resnet18", "--weights", "none", "--layer", "9", "--out", "{tmp}/x.zarr",
      "--data", "{npz}"], "out of range (1 to 8)"),
    (["build", "--model", "resnet50", "--layer", "3", "--out", "{tmp}/x.zarr", "--data", "{npz}"],
     "resnet50 IMAGENET1K_V2 weights are not available offline: place resnet50-11ad3fa6.pth in {tmp}/hub/hub"),
    (["build", "--model", "resnet18", "--weights", "none", "--layer", "3", "--out", "{tmp}/x.zarr",
      "--data", "{tmp}/nope.npz"], "does not exist"),
    (["build", "--model", "resnet18", "--weights", "none", "--layer", "3", "--out", "/proc/forbidden/x.zarr",
      "--data", "{npz}", "--image-size", "32"], "No such file or directory: '/proc/forbidden'"),
    (["info", "{tmp}"], "not a subcache cache"),
    (["train", "--cache", "{tmp}/missing.zarr", "--blocks", "3", "--out", "{tmp}/t"], "does not exist"),
    (["evaluate", "--task", "{tmp}", "--cache", "{tmp}"], "not a task directory"),
])
def test_bad_input_is_one_clear_line(tmp_path, npz_path, monkeypatch, args, fragment):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))  # an empty hub: independent of this machine's downloads
    args = [a.format(tmp=tmp_path, npz=npz_path) for a in args]
    one_line_error(run(*args), fragment.format(tmp=tmp_path))
    assert not (tmp_path / "x.zarr").exists()  # nothing half-written


def test_existing_and_incomplete_outputs(tmp_path, npz_path, resnet_cache):
    args = ["build", "--model", "resnet18", "--weights", "none", "--data", npz_path, "--image-size", 32,
            "--layer", "6", "--out", resnet_cache]
    one_line_error(run(*args), "exists; pass --resume")
    import zarr

    incomplete = tmp_path / "half.zarr"
    run("build", "--model", "resnet18", "--weights", "none", "--data", npz_path, "--image-size", 32, "--layer", 6,
        "--split", "test", "--out", incomplete)
    zarr.open_group(str(incomplete), mode="r+").attrs["status"] = "building"
    one_line_error(run("train", "--cache", incomplete, "--blocks", 7, "--out", tmp_path / "t"), "--resume")
    one_line_error(run("train", "--cache", resnet_cache, "--blocks", "3", "--out", tmp_path / "t"),
                   "earliest block this cache can train is 6")
    one_line_error(run("train", "--cache", resnet_cache, "--blocks", "7", "--examples", 0, "--out", tmp_path / "t"),
                   "--examples")
    one_line_error(run("train", "--cache", resnet_cache, "--blocks", "7", "--augment", "rotate", "--out",
                       tmp_path / "t"), "allowed: flip, crop")


def test_corrupt_chunk_is_one_clear_line(tmp_path, npz_path):
    out = tmp_path / "c.zarr"
    run("build", "--model", "resnet18", "--weights", "none", "--data", npz_path, "--image-size", 32, "--layer", 6,
        "--out", out)
    chunk = next(f for f in (out / "train" / "x" / "c").rglob("*") if f.is_file())
    chunk.write_bytes(b"garbage" * 10)
    one_line_error(run("train", "--cache", out, "--blocks", 7, "--out", tmp_path / "t"), "corrupt")


def test_build_from_a_cache_keeps_its_dtype_and_refuses_image_options(tmp_path, resnet_cache):
    import subcache

    r = run("build", "--from", resnet_cache, "--layer", 8, "--out", tmp_path / "a.zarr", "--json")
    assert r.exit_code == 0, r.output
    assert subcache.open_cache(str(tmp_path / "a.zarr")).dtype == "float32"  # the source's, not build's float16
    r = run("build", "--from", resnet_cache, "--layer", 8, "--dtype", "bfloat16", "--out", tmp_path / "b.zarr")
    assert r.exit_code == 0, r.output
    assert subcache.open_cache(str(tmp_path / "b.zarr")).dtype == "bfloat16"
    for option, value in (("--image-size", 64), ("--data", "cifar10"), ("--flip-views", None), ("--limit", 10),
                          ("--model", "resnet18"), ("--split", "test")):
        extra = [option] if value is None else [option, value]
        one_line_error(run("build", "--from", resnet_cache, "--layer", 8, *extra, "--out", tmp_path / "c.zarr"),
                       f"{option} cannot be used with --from")
    assert not (tmp_path / "c.zarr").exists()
