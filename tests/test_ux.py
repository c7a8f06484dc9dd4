"""What a user meets around the library: progress in logs, packaging, paths, plots, permissions, option names."""
import io
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from rich.console import Console

import subcache
from subcache.cli.main import main
from subcache.progress import BarProgress, LineProgress, progress_bar, rate_text

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
EPOCH_LINE = re.compile(r"^t epoch (\d+)/3 loss \d+\.\d{4} acc \d\.\d{4} [\d,.]+ samples/s$")


# -- progress --------------------------------------------------------------------------------------------------
def test_rates_never_print_as_zero():
    assert rate_text(1234.4, "img/s") == "1,234 img/s"
    assert rate_text(2.5, "runs/s") == "2.5 runs/s"
    assert rate_text(0.25, "runs/s") == "4.0 s/run"
    assert rate_text(1 / 300, "rounds/s") == "5.0 min/round"
    assert rate_text(0.5, "img/s") == "2.0 s/img"
    assert rate_text(0, "runs/s") == "– runs/s"


def test_bars_on_a_terminal_lines_elsewhere():
    terminal = Console(file=io.StringIO(), force_terminal=True)
    assert isinstance(progress_bar(True, console=terminal), BarProgress)
    log = io.StringIO()
    lines = progress_bar(True, console=Console(file=log, force_terminal=False))
    assert isinstance(lines, LineProgress)
    with lines as bar:
        task = bar.add_task("train → block 6", total=200, completed=100)  # resumed half-way
        for _ in range(100):
            bar.advance(task)
    written = log.getvalue().splitlines()
    assert [w.split()[4] for w in written] == ["120/200", "140/200", "160/200", "180/200", "200/200"]  # every 10 %
    assert all(w.endswith("img/s") for w in written)
    quiet = io.StringIO()
    with progress_bar(False, console=Console(file=quiet, force_terminal=False)) as bar:
        bar.advance(bar.add_task("x", total=2), 2)
    assert quiet.getvalue() == ""


TRAIN = ["train", "--blocks", "7", "--epochs", "3", "--batch-size", "64", "--json"]
SLOW_AFTER_FIRST_EPOCH = textwrap.dedent("""
    import sys, time
    import subcache.progress as p
    original = p.LineProgress.line
    def line_then_wait(self, text):
        original(self, text)
        if text.startswith("t epoch 1/"):  # the run's name (its --out folder), then the epoch
            time.sleep(2)  # the test reads this line while the job still runs
    p.LineProgress.line = line_then_wait
    from subcache.cli.main import main
    main(sys.argv[1:])
""")


def test_redirected_train_writes_a_line_per_epoch_while_it_runs(resnet_cache, tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", SLOW_AFTER_FIRST_EPOCH, *TRAIN, "--cache", resnet_cache, "--out",
                             str(tmp_path / "t")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    seen = []
    for line in proc.stderr:
        seen.append((line.rstrip("\n"), proc.poll() is None))
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, seen
    epochs = [(text, running) for text, running in seen if text.startswith("t epoch")]
    assert [EPOCH_LINE.match(text).group(1) for text, _ in epochs] == ["1", "2", "3"], seen
    assert epochs[0][1], "the first epoch's line arrived only after the job ended"
    assert json.loads(out)["test_accuracy"] is not None and len(out.strip().splitlines()) == 1  # stdout: the JSON


def test_runs_and_rounds_get_a_line_each_in_logs(resnet_cache, resnet18, tmp_path, capsys):
    config = subcache.TrainConfig(epochs=1, batch_size=64)
    subcache.profile_blocks(resnet_cache, subcache.ProfileConfig(blocks="7-8", train=config), backbone=resnet18,
                            progress=True)
    err = capsys.readouterr().err.splitlines()
    assert [line.split(":")[0] for line in err] == ["profile 1/3 (33%) blocks none seed 0",
                                                    "profile 2/3 (67%) blocks 7 seed 0",
                                                    "profile 3/3 (100%) blocks 8 seed 0"]
    assert all(re.search(r"test accuracy \d\.\d{4} [\d.,]+ (runs/s|s/run)$", line) for line in err), err
    subcache.active_learning(resnet_cache, subcache.ALConfig(blocks="none", budgets=(20, 40), train=config),
                             out=tmp_path / "al", backbone=resnet18, progress=True)
    err = capsys.readouterr().err.splitlines()
    assert [line.split(":")[0] for line in err] == ["active learning (margin) 1/2 (50%) seed 0, 20 labelled",
                                                    "active learning (margin) 2/2 (100%) seed 0, 40 labelled"]


def test_score_and_evaluate_report_progress_and_json_stays_clean(resnet_cache, tmp_path):
    task = tmp_path / "t"
    assert CliRunner().invoke(main, [*TRAIN, "--cache", resnet_cache, "--out", str(task)]).exit_code == 0
    r = CliRunner().invoke(main, ["evaluate", "--task", str(task), "--cache", resnet_cache])
    assert r.exit_code == 0 and "inference on test 96/96 (100%)" in r.stderr
    r = CliRunner().invoke(main, ["score", "--task", str(task), "--cache", resnet_cache, "--out",
                                  str(tmp_path / "s.csv")])
    assert r.exit_code == 0 and "inference on train 192/192 (100%)" in r.stderr
    r = CliRunner().invoke(main, ["evaluate", "--task", str(task), "--cache", resnet_cache, "--json"])
    out = json.loads(r.stdout)  # stdout: the JSON only; progress stays on stderr
    assert out["test_accuracy"] == out["accuracy"] == json.loads((task / "task.json").read_text())[
        "metrics"]["test_accuracy"]
    assert "inference on test 96/96 (100%)" in r.stderr


# -- packaging -------------------------------------------------------------------------------------------------
def test_python_dash_m_subcache_is_the_command():
    done = subprocess.run([sys.executable, "-m", "subcache", "--version"], capture_output=True, text=True, env=ENV,
                          cwd=ROOT)
    assert done.returncode == 0 and done.stdout.strip() == f"subcache, version {subcache.__version__}"


def test_install_puts_the_cli_under_the_package(tmp_path):
    source, target = tmp_path / "src", tmp_path / "site"  # a clean copy: no stale build/ from earlier builds
    skip = shutil.ignore_patterns(".git", ".evidence*", "build", "*.egg-info", "__pycache__", "runs")
    shutil.copytree(ROOT, source, ignore=skip, symlinks=True)
    done = subprocess.run([sys.executable, "-m", "pip", "install", str(source), "--target", str(target), "--no-deps",
                           "--no-build-isolation", "--no-index", "-q"], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not (target / "cli").exists() and (target / "subcache" / "cli" / "main.py").is_file()
    entry = next(target.glob("subcache-*.dist-info")) / "entry_points.txt"
    assert "subcache = subcache.cli.main:main" in entry.read_text()
    env = {**os.environ, "PYTHONPATH": str(target)}
    done = subprocess.run([sys.executable, "-m", "subcache", "--help"], capture_output=True, text=True, env=env,
                          cwd=tmp_path)
    assert done.returncode == 0 and "Usage: python -m subcache" in done.stdout
    where = subprocess.run([sys.executable, "-c", "import subcache.cli.main as m; print(m.__file__)"],
                           capture_output=True, text=True, env=env, cwd=tmp_path)
    assert where.stdout.strip() == str(target / "subcache" / "cli" / "main.py")


# -- paths, permissions --------------------------------------------------------------------------------------------
def test_every_path_argument_takes_pathlib(tmp_path, npz_path, resnet18):
    from subcache.export import export

    out = tmp_path / "c.zarr"
    subcache.build_cache(subcache.BuildConfig(out=out, layers=("6",), model="resnet18", weights="none",
                                              data=Path(npz_path), image_size=32, limit=64, batch_size=64),
                         backbone=resnet18)
    cache = subcache.open_cache(out)
    assert cache.attrs["data"] == npz_path
    config = subcache.TrainConfig(blocks="7", epochs=1, batch_size=32)
    subcache.train(out, config, out=tmp_path / "task", backbone=resnet18)
    assert subcache.load_task(tmp_path / "task").blocks == (7,)
    assert 0 <= subcache.evaluate_task(tmp_path / "task", out, backbone=resnet18) <= 1
    subcache.profile_blocks(out, subcache.ProfileConfig(blocks="7-7", probe=False, train=config),
                            out=tmp_path / "profile", backbone=resnet18)
    assert (tmp_path / "profile" / "profile.png").is_file()
    subcache.compare_strategies(out, subcache.ALConfig(blocks="none", budgets=(10, 20), train=config), ("random",),
                                out=tmp_path / "al", backbone=resnet18)
    assert (tmp_path / "al" / "al.png").is_file()
    preds = subcache.predict([tmp_path / "task"], Path(npz_path), limit=8, backbone=resnet18)
    preds.save(tmp_path / "p.csv")
    assert len(preds.ids) == 8 and (tmp_path / "p.csv").is_file()
    export([tmp_path / "task"], "torchscript", tmp_path / "m.pt", backbone=resnet18)
    assert (tmp_path / "m.pt").is_file()


def test_checkpoints_get_ordinary_permissions(resnet_cache, resnet18, tmp_path):
    before = os.umask(0o022)
    try:
        subcache.train(resnet_cache, subcache.TrainConfig(blocks="7", epochs=1, batch_size=64), out=tmp_path / "t",
                       backbone=resnet18)
        os.umask(0o027)
        subcache.train(resnet_cache, subcache.TrainConfig(blocks="none", epochs=1, batch_size=64),
                       out=tmp_path / "g", backbone=resnet18)
    finally:
        os.umask(before)
    for name in ("task.safetensors", "task.json"):
        assert (tmp_path / "t" / name).stat().st_mode & 0o777 == 0o644, name
        assert (tmp_path / "g" / name).stat().st_mode & 0o777 == 0o640, name


# -- plots ---------------------------------------------------------------------------------------------------------
@pytest.fixture()
def other_backend():
    """A backend other than Agg: plotting must leave it (and pyplot's figure list) alone."""
    import matplotlib
    import matplotlib.pyplot as plt

    before = matplotlib.get_backend()
    matplotlib.use("pdf")
    yield
    after, figures = matplotlib.get_backend(), plt.get_fignums()
    matplotlib.use(before)
    assert after == "pdf" and figures == []


def test_profile_plot_marks_the_best_window_and_the_probe_band(resnet_cache, other_backend, tmp_path):
    from subcache.selection import ProfileConfig, ProfileResult
    from subcache.selection import plot_profile

    rows = [{"blocks": b, "first": f, "width": w, "seed": s, "test_accuracy": a, "trainable_params": 1,
             "seconds": 1.0} for b, f, w, s, a in [("none", 0, 0, 0, 0.50), ("none", 0, 0, 1, 0.60),
                                                   ("7", 7, 1, 0, 0.70), ("7", 7, 1, 1, 0.72),
                                                   ("8", 8, 1, 0, 0.90), ("8", 8, 1, 1, 0.80)]]
    config = ProfileConfig(blocks="7-8", seeds=2, train=subcache.TrainConfig(epochs=4, limit=100))
    fig = plot_profile(ProfileResult(rows), tmp_path / "p.png", subcache.open_cache(resnet_cache), config)
    ax = fig.axes[0]
    assert "quadrants.npz" in ax.get_title() and "100 training examples" in ax.get_title()
    assert "4 epochs" in ax.get_title() and "2 seeds" in ax.get_title()
    best = [line for line in ax.get_lines() if line.get_gid() == "best-window"]
    assert len(best) == 1 and list(best[0].get_xdata()) == [8] and best[0].get_ydata()[0] == pytest.approx(0.85)
    band = [p for p in ax.patches if p.get_gid() == "probe-band"]
    sd = np.std([0.5, 0.6], ddof=1)
    assert len(band) == 1 and band[0].get_y() == pytest.approx(0.55 - sd)
    assert band[0].get_y() + band[0].get_height() == pytest.approx(0.55 + sd)
    assert (tmp_path / "p.png").stat().st_size > 10_000


def test_al_ticks_are_the_budgets_and_greedy_counts_steps(resnet_cache, other_backend):
    from subcache.active import plot_curves
    from subcache.selection import GreedyConfig, GreedyResult
    from subcache.selection.greedy import plot_greedy

    curve = [{"budget": b, "accuracy": 0.5 + b / 1000, "strategy": "margin", "seed": s}
             for b in (20, 50, 100, 400) for s in (0, 1)]
    ax = plot_curves({"margin": curve, "random": curve}, None, "Active learning").axes[0]
    assert list(ax.get_xticks()) == [20, 50, 100, 400]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["20", "50", "100", "400"]
    path = [{"step": i, "blocks": b, "score": 0.5 + i / 10, "change": "+"} for i, b in enumerate(["none", "8", "7-8"])]
    config = GreedyConfig(train=subcache.TrainConfig(epochs=3))
    ax = plot_greedy(GreedyResult(path, (7, 8), 0.7), None, subcache.open_cache(resnet_cache), config).axes[0]
    assert list(ax.get_xticks()) == [0, 1, 2] and "3 epochs" in ax.get_title() and "seed 0" in ax.get_title()


# -- one meaning per option ------------------------------------------------------------------------------------------
def test_each_option_name_means_one_thing(resnet_cache, tmp_path):
    r = CliRunner().invoke(main, ["train", "--cache", resnet_cache, "--blocks", "7", "--limit", "0", "--out",
                                  str(tmp_path / "t")])  # the old spelling of --examples still reaches it
    assert r.exit_code == 1 and r.stderr.splitlines() == ["note: --limit is now --examples",
                                                          "Error: --examples must be at least 1 training example, "
                                                          "got 0"]
    for option in ("--examples", "--limit"):  # al picks its own examples: it refuses what it would ignore
        r = CliRunner().invoke(main, ["al", "--cache", resnet_cache, "--blocks", "none", "--budgets", "20,40",
                                      option, "50", "--out", str(tmp_path / "al")])
        assert r.exit_code == 2 and option in r.output and not (tmp_path / "al").exists()
    assert "al trains on the examples it picks" in r.output
    r = CliRunner().invoke(main, ["profile", "--cache", resnet_cache, "--blocks", "7,8", "--out",
                                  str(tmp_path / "p")])  # the old spelling still works, and the refusal says why
    assert r.exit_code == 1 and "--range bounds the windows" in r.output and "train's --blocks" in r.output
