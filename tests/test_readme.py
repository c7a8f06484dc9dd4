"""The README's promises: its test command is what CI runs; every example runs (in tiny mode)."""
import json
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_commands():
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text())


def test_ci_runs_the_readme_test_command():
    main_job, tests = readme_commands()[:2]
    assert "examples/quickstart.sh" in main_job
    assert tests in (ROOT / ".ci" / "run").read_text().splitlines()


def run_example(name, out):
    """Run examples/NAME in its tiny mode (QUICK=1) with its outputs under ``out``."""
    env = {**os.environ, "QUICK": "1", "OUT": str(out)}
    done = subprocess.run(["bash", str(ROOT / "examples" / name)], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


@pytest.mark.slow  # EfficientNet-Lite0 ImageNet weights + Fashion-MNIST
def test_quickstart_example_runs_in_tiny_mode(tmp_path):
    done = run_example("quickstart.sh", tmp_path)
    assert "linear probe" in done.stdout and "SubTuning" in done.stdout


@pytest.mark.slow  # runs the quickstart first: Lite0 ImageNet weights + Fashion-MNIST
def test_profile_example_runs_in_tiny_mode(tmp_path):
    run_example("profile.sh", tmp_path)
    assert (tmp_path / "profile" / "profile.png").is_file() and (tmp_path / "greedy" / "greedy.csv").is_file()


@pytest.mark.slow  # EfficientNet-Lite0 ImageNet weights + Fashion-MNIST
def test_deploy_example_runs_in_tiny_mode(tmp_path):
    done = run_example("deploy.sh", tmp_path)
    assert "siamese" in done.stdout and "prune-0.75" in done.stdout
    assert (tmp_path / "deploy" / "predictions.csv").is_file()


def test_the_layout_names_every_module():
    text = (ROOT / "README.md").read_text()
    layout = text[text.index("## Layout"):text.index("## License")]
    for package in ("subcache", "subcache/backbones", "subcache/selection", "cli"):
        for module in sorted((ROOT / package).glob("*.py")):
            assert f"`{module.stem}`" in layout, f"README's Layout does not name {package}/{module.name}"


def test_select_example_runs_in_tiny_mode(tmp_path):
    done = run_example("select.sh", tmp_path)
    table = json.loads((tmp_path / "select.json").read_text())
    assert set(table) == {"tops", "coarse"}
    assert "select 1 seed 0: picks" in done.stdout and "halving: picks" in done.stdout
    for task in table.values():
        assert task["select"]["1"][0]["pick"] in task["windows"] and task["best"] in task["tied"]
    assert (tmp_path / "coarse" / "rank" / "rank.png").is_file()
    tops = np.load(tmp_path / "tops.npz")  # the class subset: five classes, relabelled 0..4
    assert sorted(set(tops["y_train"].tolist())) == [0, 1, 2, 3, 4]
