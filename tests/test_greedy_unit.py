"""Greedy block selection, exactly: which sets it tries, keeps and stops at, what it trains the choice on, what it
saves and draws (each test kills mutants that `examples/mutation.sh selection/greedy` found surviving).

Training is replaced by a stub with known accuracies per block set, on the planted cache of test_rank (blocks 1-4)."""
from __future__ import annotations

import json

import numpy as np
import pytest

import subcache
from subcache.errors import BlockError
from subcache.selection import validation_split
from subcache.train import TrainConfig
from test_rank import planted  # noqa: F401  (the fixture)
from test_selection_unit import TRAIN, relabelled  # noqa: F401  (a fixture)


GAIN = {(): 0.40, (3,): 0.60, (4,): 0.55, (3, 4): 0.70, (2, 3): 0.62, (2,): 0.45, (1,): 0.3, (2, 4): 0.5}

class TrainStub:
    """greedy's train and train_runs with known accuracies per block set: GAIN (0.2 for a set not listed), + 0.01
    per held-out fold index; records (blocks, fit positions, held-out positions) per run."""

    def __init__(self):
        self.runs, self.banks, self.seen = [], [], []

    def _result(self, config, data, fold=0):
        self.banks.append(data.bank)
        blocks = () if config.blocks == "none" else tuple(int(b) for b in config.blocks.replace("-", ",").split(","))
        if config.blocks.count("-"):
            blocks = tuple(range(blocks[0], blocks[1] + 1))
        self.runs.append((config.blocks, data.positions, data.eval_positions))
        return type("Run", (), {"test_accuracy": GAIN.get(blocks, 0.2) + fold / 100})()

    def train(self, cache, config, data, backbone=None):
        self.seen.append((cache, backbone, None))
        return self._result(config, data)

    def train_runs(self, cache, jobs, backbone=None, batch_runs="off"):
        self.seen.append((cache, backbone, batch_runs))
        return [self._result(config, data, i) for i, (config, data) in enumerate(jobs)]

@pytest.fixture
def trained(monkeypatch):
    import subcache.selection.greedy as greedy

    stub = TrainStub()
    monkeypatch.setattr(greedy, "train", stub.train)
    monkeypatch.setattr(greedy, "train_runs", stub.train_runs)
    return stub

def _greedy(planted, **kw):
    from subcache.selection.greedy import GreedyConfig, greedy_select

    cache, backbone = planted
    out = kw.pop("out", None)
    return greedy_select(cache, GreedyConfig(train=TRAIN, **kw), out=out, backbone=backbone)

def test_greedy_select_adds_the_best_block_each_step_then_trains_the_choice_on_all_data(planted, trained):
    result = _greedy(planted, epsilon=0.05)
    assert [(p["step"], p["blocks"], p["change"]) for p in result.path] == [
        (0, "none", "start"), (1, "3", "+3"), (2, "3-4", "+4")]
    assert result.blocks == (3, 4) and result.score == pytest.approx(0.70) and result.test_accuracy == 0.70
    assert [r[0] for r in trained.runs][:5] == ["none", "1", "2", "3", "4"]  # step 1 tries every block
    assert len({r[0] for r in trained.runs[:-1]}) == len(trained.runs) - 1  # each set scored once (memo)
    assert trained.runs[-1] == ("3-4", None, None)  # the choice, trained on the whole training split

def test_greedy_select_over_a_range_from_full_dropping_blocks(planted, trained):
    result = _greedy(planted, blocks="2-4", start="full", epsilon=0.05)  # 3-4 → 3 costs 0.1: stop
    assert result.path[0]["blocks"] == "2-4" and result.path[1]["change"] == "-2" and result.blocks == (3, 4)

def test_greedy_select_on_a_validation_split(planted, trained):
    cache, _ = planted
    result = _greedy(planted, blocks="3-4", val_fraction=0.25, max_blocks=1)
    fit, val = validation_split(subcache.open_cache(cache), TRAIN, 0.25)
    *search, final = trained.runs
    assert all((f == fit).all() and (v == val).all() for _, f, v in search)
    assert (final[1] == fit).all() and final[2] is None and result.blocks == (3,)

def test_greedy_select_by_folds_averages_each_candidates_folds(planted, trained):
    result = _greedy(planted, blocks="3-4", folds=3, max_blocks=1)
    assert result.path[1]["score"] == pytest.approx(0.60 + 0.01)  # mean of +0, +0.01, +0.02
    folds = [(f, v) for b, f, v in trained.runs if b == "3" and v is not None]
    assert len(folds) == 3 and len(set(np.concatenate([v for _, v in folds]))) == 240
    assert all(not set(f) & set(v) and len(f) + len(v) == 240 for f, v in folds)

@pytest.mark.parametrize("folds", [1, -1])
def test_greedy_select_refuses_one_or_negative_folds(planted, trained, folds):
    with pytest.raises(BlockError, match=f"--folds must be 0 \\(choose by test accuracy\\) or at least 2, got {folds}"):
        _greedy(planted, folds=folds)

def test_greedy_select_refuses_a_non_finite_epsilon_and_folds_beyond_the_data(planted, trained):
    from subcache.errors import ConfigError

    for eps in (float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="--epsilon must be a finite number"):
            _greedy(planted, epsilon=eps)
    with pytest.raises(ConfigError, match="--folds 241 is more than the 240 training examples; use at most 240"):
        _greedy(planted, folds=241)
    assert _greedy(planted, blocks="4-4", folds=240, epsilon=5).blocks == ()  # as many folds as examples: allowed
    assert trained.runs

def test_greedy_folds_partition_the_limited_pool_the_same_for_a_seed(planted):
    from subcache.selection.greedy import _folds

    c = subcache.open_cache(planted[0])
    folds = _folds(c, TrainConfig(limit=100, seed=1), 3)
    from subcache.train import balanced_subset

    pool = balanced_subset(c.read_y("train").numpy(), 100, 1)
    held = [v for _, v in folds]
    assert sorted(np.concatenate(held).tolist()) == sorted(pool.tolist()) and [len(v) for v in held] == [34, 33, 33]
    assert all((f == np.sort(np.setdiff1d(pool, v))).all() and (v == np.sort(v)).all() for f, v in folds)
    again = _folds(c, TrainConfig(limit=100, seed=1), 3)
    assert all((a[1] == b[1]).all() for a, b in zip(folds, again))
    other = _folds(c, TrainConfig(limit=100, seed=2), 3)
    assert not all(np.array_equal(a[1], b[1]) for a, b in zip(folds, other))  # another seed, other folds

def test_greedy_saves_its_path_and_plot(planted, trained, tmp_path):
    cache, _ = planted
    result = _greedy(planted, blocks="3-4", epsilon=0.05, out=tmp_path / "g")
    saved = json.loads((tmp_path / "g" / "greedy.json").read_text())
    assert saved["blocks"] == [3, 4] and saved["path"] == result.path and saved["score"] == result.score
    assert saved["test_accuracy"] == 0.70 and saved["cache"] == subcache.open_cache(cache).path
    assert saved["config"]["epsilon"] == 0.05 and saved["config"]["train"]["epochs"] == 4
    assert (tmp_path / "g" / "greedy.csv").read_text().splitlines() == [
        "step,blocks,change,score", "0,none,start,0.4", "1,3,+3,0.6", "2,3-4,+4,0.7"]
    assert (tmp_path / "g" / "greedy.png").stat().st_size > 0

def test_greedy_plot_labels_each_step_with_its_blocks(planted):
    from subcache.selection.greedy import GreedyConfig, GreedyResult, plot_greedy

    path = [{"step": 0, "blocks": "none", "score": 0.4}, {"step": 1, "blocks": "3", "score": 0.6}]
    c = subcache.open_cache(planted[0])
    ax = plot_greedy(GreedyResult(path, (3,), 0.6), None, c, GreedyConfig(epsilon=0.05)).axes[0]
    assert [(t.get_text(), t.xy) for t in ax.texts] == [("none", (0, 0.4)), ("3", (1, 0.6))]
    assert list(ax.get_lines()[0].get_ydata()) == [0.4, 0.6] and list(ax.get_xticks()) == [0, 1]
    assert ax.get_title().startswith("Greedy selection (ε = 0.05): planted\n")
    assert ax.get_xlabel() == "greedy step (blocks chosen so far)" and ax.get_ylabel() == "test accuracy"
    ylabel = lambda **kw: plot_greedy(GreedyResult(path, (3,), 0.6), None, c, GreedyConfig(**kw)).axes[0].get_ylabel()
    assert ylabel(val_fraction=0.2) == "validation accuracy" and ylabel(folds=3) == "3-fold validation accuracy"

def test_greedy_search_from_full_stops_when_every_drop_costs_epsilon():
    from subcache.selection.greedy import greedy_search

    value = {(3, 4, 5): 0.75, (4, 5): 0.5, (3, 5): 0.25, (3, 4): 0.125, (5,): 0.4375, (4,): 0.125}  # exact in binary
    score = lambda b: value.get(b, 0.0)  # noqa: E731
    assert greedy_search(score, [3, 4, 5], start="full", epsilon=0.25).blocks == (3, 4, 5)  # costs 0.25: stop
    steps = []
    drop = greedy_search(score, [3, 4, 5], start="full", epsilon=0.5, on_step=steps.append)
    assert drop.blocks == (5,) and [p["change"] for p in drop.path] == ["start", "-3", "-4"]
    assert [s["step"] for s in steps] == [0, 1, 2] and drop.score == 0.4375
    value[(3, 5)] = 0.6875  # dropping the middle block hurts least, but a window can't lose its middle
    assert greedy_search(score, [3, 4, 5], start="full", epsilon=0.5).path[1]["change"] == "-4"
    assert greedy_search(score, [3, 4, 5], start="full", epsilon=0.5, consecutive=True).path[1]["change"] == "-3"
    with pytest.raises(BlockError, match="--start must be empty or full, got 'middle'"):
        greedy_search(score, [3], start="middle")

def test_greedy_search_empty_ties_go_to_the_earlier_blocks_and_an_exact_epsilon_gain_counts():
    from subcache.selection.greedy import greedy_search

    value = {(): 0.5, (3,): 0.75, (5,): 0.75, (3, 5): 0.875, (3, 4): 0.875}  # exact in binary
    score = lambda b: value.get(b, 0.0)  # noqa: E731
    result = greedy_search(score, [3, 4, 5], epsilon=0.125)
    assert [p["blocks"] for p in result.path] == ["none", "3", "3-4"] and result.blocks == (3, 4)
    assert greedy_search(score, [3, 4, 5], epsilon=0.1250001).blocks == (3,)
    assert greedy_search(score, [3, 4, 5], epsilon=0.01, max_blocks=2).blocks == (3, 4)
    assert greedy_search(score, [3, 4, 5], epsilon=0.01, max_blocks=0).blocks == ()

def test_greedy_folds_draw_the_limited_pool_balanced_over_the_label_set_trained_on(relabelled):
    from subcache.selection.greedy import _folds

    c = subcache.open_cache(relabelled[0])
    y = c.read_y("train").numpy()
    for labels, zeros in ((None, 10), ("zero", 20)):  # 40 of 4 classes: 10 of class 0; of `zero`'s 2: 20
        held = np.concatenate([v for _, v in _folds(c, TrainConfig(limit=40, labels=labels), 2)])
        assert len(held) == 40 and (y[held] == 0).sum() == zeros

def test_greedy_search_takes_a_small_gain_by_default():
    from subcache.selection.greedy import greedy_search

    assert greedy_search(lambda b: 0.5 + 0.02 * len(b), [3, 4]).blocks == (3, 4)  # default ε = 0.01

def test_greedy_plot_marks_each_step_and_centres_its_label_just_above_it(planted, tmp_path, monkeypatch, trained):
    import subcache.selection.greedy as greedy

    plotted = []
    real_plot = greedy.plot_greedy
    monkeypatch.setattr(greedy, "plot_greedy", lambda *a, **k: plotted.append(real_plot(*a, **k)))
    _greedy(planted, blocks="3-4", val_fraction=0.25, epsilon=0.05, out=tmp_path / "g")
    ax = plotted[0].axes[0]
    assert ax.get_ylabel() == "validation accuracy"  # drawn with the run's own config
    assert ax.get_lines()[0].get_marker() == "o"
    for t in ax.texts:
        assert t.anncoords == "offset points" and t.xyann[0] == 0 and 3 <= t.xyann[1] <= 12 and t.get_ha() == "center"
    assert 0.1 <= ax.margins()[1] <= 0.5  # room above the top point for its label, the points not squashed

def test_greedy_search_keeps_a_consecutive_set_a_window_growing_at_either_end():
    from subcache.selection.greedy import greedy_search

    value = {(): 0.5, (3,): 0.75, (3, 4): 0.875, (2, 3): 0.8125, (3, 5): 0.9375}
    score = lambda b: value.get(b, 0.0)  # noqa: E731
    assert greedy_search(score, [2, 3, 4, 5], epsilon=0.01, max_blocks=2).blocks == (3, 5)
    assert greedy_search(score, [2, 3, 4, 5], epsilon=0.01, max_blocks=2, consecutive=True).blocks == (3, 4)
    value[(3, 4)] = 0.5
    assert greedy_search(score, [2, 3, 4, 5], epsilon=0.01, max_blocks=2, consecutive=True).blocks == (2, 3)

def test_greedy_select_trains_on_its_cache_and_backbone_sharing_activations_and_batching_folds(planted, trained):
    from subcache.bank import ActivationBank

    cache, backbone = planted
    _greedy(planted, blocks="3-4", folds=2, max_blocks=1, batch_runs="2")
    assert all(c.path == subcache.open_cache(cache).path and b is backbone for c, b, _ in trained.seen)
    assert [r for _, _, r in trained.seen][:-1] == ["2"] * (len(trained.seen) - 1)  # each candidate's folds
    assert trained.banks and all(isinstance(b, ActivationBank) for b in trained.banks)
    trained.banks.clear()
    _greedy(planted, blocks="3-4", max_blocks=1)  # by test accuracy, then the final run
    assert len(trained.banks) == 4 and all(isinstance(b, ActivationBank) for b in trained.banks)
    trained.banks.clear()
    flip = TrainConfig(epochs=4, batch_size=32, device="cpu", augment="flip")
    subcache.selection.greedy.greedy_select(cache, subcache.selection.greedy.GreedyConfig(
        blocks="4-4", train=flip), backbone=backbone)
    assert trained.banks and all(b is None for b in trained.banks)  # augmented runs compute their own

def test_greedy_select_passes_consecutive_on(planted, trained, monkeypatch):
    monkeypatch.setitem(GAIN, (1, 3), 0.75)
    assert _greedy(planted, epsilon=0.05, max_blocks=2).blocks == (1, 3)
    assert _greedy(planted, epsilon=0.05, max_blocks=2, consecutive=True).blocks == (3, 4)

def test_greedy_select_is_silent_by_default_and_writes_a_line_per_run_with_progress(planted, trained, capsys):
    import re

    from subcache.selection.greedy import GreedyConfig, greedy_select

    cache, backbone = planted
    capsys.readouterr()
    greedy_select(cache, GreedyConfig(blocks="3-4", max_blocks=1, train=TRAIN), backbone=backbone)
    assert capsys.readouterr().err == ""
    greedy_select(cache, GreedyConfig(blocks="3-4", max_blocks=1, train=TRAIN), backbone=backbone, progress=True)
    lines = capsys.readouterr().err.splitlines()
    assert [re.sub(r" [\d.,]+ (runs/s|s/run)$", "", line) for line in lines] == [
        "greedy run 1 blocks none: score 0.4000", "greedy run 2 blocks 3: score 0.6000",
        "greedy run 3 blocks 4: score 0.5500"]
    assert all(re.search(r" (runs/s|s/run)$", line) for line in lines)

def test_greedy_select_refuses_folds_with_a_validation_fraction_in_one_line(planted, trained):
    from subcache.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        _greedy(planted, folds=2, val_fraction=0.2)
    assert str(e.value) == "--folds and --val-fraction both choose on held-out training data; give one of them"
