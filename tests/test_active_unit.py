"""Active learning's pieces, exactly: uncertainty values, which items are picked, pool scores on disk, oracle
files, the saved state and curve, and the messages (each test kills mutants that `examples/mutation.sh active`
found surviving)."""
from __future__ import annotations

import csv
import json
import math
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import subcache.active as active
from subcache.active import (ALConfig, PoolScores, _ask, _check, _config_dict, _curve, _load_state, _oracle_labels,
                             _oracle_rows, _save_state, _select, _write_curve, most_uncertain, uncertainty)
from subcache.errors import ConfigError, DataError
from subcache.store import Cache


def test_uncertainty_values_per_metric():
    logits = torch.tensor([[2.0, 0.0, 0.0], [1.0, 1.0, -1.0]], dtype=torch.float64)
    p = logits.float().softmax(-1)
    score, unc = uncertainty(logits, "margin")
    top = p.topk(2).values
    assert torch.allclose(score, top[:, 0] - top[:, 1]) and torch.equal(unc, -score) and score.dtype == torch.float32
    score, unc = uncertainty(logits, "entropy")
    assert torch.allclose(score, -(p * p.log()).sum(-1)) and torch.equal(unc, score)
    score, unc = uncertainty(logits, "least-confidence")
    assert torch.allclose(score, 1 - p.max(-1).values) and torch.equal(unc, score)
    one = uncertainty(torch.tensor([[3.0], [-1.0]]), "margin")[0]  # one class: margin is its probability, 1
    assert one.tolist() == [1.0, 1.0]
    certain = uncertainty(torch.tensor([[0.0, -200.0]]), "entropy")[0]  # p = 0 contributes 0, not NaN
    assert math.isfinite(certain.item()) and certain.item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ConfigError) as e:
        uncertainty(logits, "variance")
    assert str(e.value) == "unknown metric 'variance'; allowed: margin, entropy, least-confidence"


def test_most_uncertain_picks_the_highest_and_breaks_ties_by_position():
    values = np.array([0.5, 0.9, 0.9, 0.1, 0.9, 0.7])
    candidates = np.array([5, 4, 2, 0, 3])
    assert most_uncertain(values, candidates, 3).tolist() == [2, 4, 5]
    assert most_uncertain(values, candidates, 5).tolist() == [2, 4, 5, 0, 3]
    with pytest.raises(DataError) as e:
        most_uncertain(values, candidates, 6)
    assert str(e.value) == "asked for 6 items but only 5 remain unlabelled"


def _scores():
    return PoolScores(ids=np.array([7, 8, 9]), keys=np.array(["a", "b", "c"]), classes=["x", "y"],
                      positions=np.array([0, 2, 1]), score=np.array([0.25, 0.5, 0.75]),
                      uncertainty=np.array([0.5, 0.5, 0.75]), pred=np.array([1, 0, 1]), prob=np.array([0.5, 0.75, 1.0]),
                      metric="margin")


def test_pool_scores_top_names_and_files(tmp_path):
    s = _scores()
    assert s.top(2).tolist() == [2, 0] and s.top(3).tolist() == [2, 0, 1]
    assert s.pred_names().tolist() == ["y", "x", "y"]
    empty = PoolScores(*(np.array([], int) for _ in range(2)), ["x"], *(np.array([], int) for _ in range(5)), "margin")
    assert empty.pred_names().tolist() == [] and empty.pred_names().dtype.kind == "U"
    s.save(tmp_path / "o" / "s.csv")
    with open(tmp_path / "o" / "s.csv", newline="") as f:
        assert list(csv.reader(f)) == [["id", "key", "score", "pred", "pred_index", "prob"],
                                       ["7", "a", "0.25", "y", "1", "0.5"], ["8", "b", "0.5", "x", "0", "0.75"],
                                       ["9", "c", "0.75", "y", "1", "1.0"]]
    s.save(tmp_path / "s.npz")
    with np.load(tmp_path / "s.npz") as z:
        assert sorted(z.files) == ["id", "key", "pred", "pred_index", "prob", "score"]
        assert z["pred"].tolist() == ["y", "x", "y"] and z["id"].tolist() == [7, 8, 9]
    with pytest.raises(DataError) as e:
        s.save(tmp_path / "s.json")
    assert str(e.value) == "unknown output format '.json'; use .csv or .npz"
    assert not (tmp_path / "s.json").exists()


def test_check_refuses_unknown_strategies_and_bad_budgets():
    _check(ALConfig(budgets=(2, 3), strategy="random"))
    with pytest.raises(ConfigError) as e:
        _check(ALConfig(strategy="greedy"))
    assert str(e.value) == "unknown strategy 'greedy'; allowed: margin, entropy, least-confidence, random"
    for budgets in ((), (1, 5), (5, 5), (5, 9, 7)):
        with pytest.raises(DataError) as e:
            _check(ALConfig(budgets=budgets))
        assert str(e.value) == ("--budgets must be increasing labelled-set sizes starting at 2 or more, got "
                                f"{','.join(map(str, budgets))}")


def test_oracle_rows_take_names_or_indices_and_refuse_the_rest(tmp_path):
    classes = ["cat", "dog", "7", "a", "b", "c"]
    assert _oracle_rows("f", np.array([1, 2, 3, 4, 1]), ["dog", "0", "7", "5", "1"], classes) == {1: 1, 2: 0, 3: 2,
                                                                                                  4: 5}
    for bad in ("6", "-1", "cow", "2-"):
        with pytest.raises(DataError) as e:
            _oracle_rows("f.csv", np.array([3]), [bad], classes)
        assert str(e.value) == (f"f.csv: id 3 has label {bad!r}; oracle labels must be class names (cat, dog, 7, a, b…) "
                                "or indices 0..5")
    with pytest.raises(DataError) as e:
        _oracle_rows("f.csv", np.array([3, 3]), ["cat", "dog"], classes)
    assert str(e.value) == "f.csv: id 3 is labelled both cat and dog; keep one row per id"


def test_oracle_labels_fill_the_given_and_list_the_missing(tmp_path):
    ids = np.array([100, 101, 102, 103])
    truth = torch.tensor([0, 1, 1, 0])
    labels, missing = _oracle_labels(str(tmp_path / "none.csv"), ids, np.array([1, 3]), truth, ["a", "b"])
    assert labels.tolist() == [-1, -1, -1, -1] and missing.tolist() == [1, 3]
    (tmp_path / "o.csv").write_text("id,label\n103,b\n100,a\n")
    labels, missing = _oracle_labels(str(tmp_path / "o.csv"), ids, np.array([0, 1, 3]), truth, ["a", "b"])
    assert labels.tolist() == [0, -1, -1, 1] and missing.tolist() == [1]


def test_ask_writes_the_items_to_label(tmp_path):
    path = _ask(tmp_path, np.array([5, 6]), np.array(["x/1.png", "2"]))
    assert path == str(tmp_path / "to_label.csv")
    assert (tmp_path / "to_label.csv").read_bytes() == b"id,key,label\r\n5,x/1.png,\r\n6,2,\r\n"


def test_curve_state_and_files(tmp_path):
    state = {"seeds": {"0": {"curve": [{"budget": 2, "accuracy": 0.5}, {"budget": 4, "accuracy": 0.75}]},
                       "1": {"curve": [{"budget": 2, "accuracy": 0.25}]}}}
    config = ALConfig(strategy="entropy")
    curve = _curve(state, config)
    assert curve == [{"budget": 2, "accuracy": 0.5, "strategy": "entropy", "seed": 0},
                     {"budget": 4, "accuracy": 0.75, "strategy": "entropy", "seed": 0},
                     {"budget": 2, "accuracy": 0.25, "strategy": "entropy", "seed": 1}]
    _write_curve(tmp_path, curve)
    assert json.loads((tmp_path / "curve.json").read_text()) == curve
    assert (tmp_path / "curve.csv").read_text().splitlines() == [
        "budget,accuracy,strategy,seed", "2,0.5,entropy,0", "4,0.75,entropy,0", "2,0.25,entropy,1"]
    _save_state(tmp_path, state)
    assert json.loads((tmp_path / "state.json").read_text()) == state and not (tmp_path / "state.json.tmp").exists()


def test_config_and_state_resume_only_the_same_run(tmp_path, resnet18):
    config = ALConfig(blocks="layer4.0", budgets=(2, 4), seeds=3)
    settings = _config_dict(config, resnet18)
    assert settings["blocks"] == [resnet18.resolve("layer4.0")] and settings["budgets"] == [2, 4] and "seeds" not in settings
    assert settings["strategy"] == "margin" and settings["train"]["lr"] == config.train.lr
    identity = {"path": "/c", "attrs_sha256": "A", "labels": None, "labels_sha256": "L"}
    assert _load_state(tmp_path, settings, identity, resnet18) == {"config": settings, "identity": identity,
                                                                   "seeds": {}}
    saved = {"config": {**settings, "blocks": "layer4.0"}, "identity": identity, "seeds": {"0": {"curve": []}}}
    _save_state(tmp_path, saved)
    assert _load_state(tmp_path, settings, identity, resnet18) == {**saved, "config": settings}
    with pytest.raises(DataError) as e:
        _load_state(tmp_path, settings, {**identity, "labels_sha256": "M"}, resnet18)
    assert str(e.value) == f"{tmp_path} holds results from another labels (/c); use another --out for /c"
    with pytest.raises(ConfigError) as e:
        _load_state(tmp_path, {**settings, "budgets": [2, 5]}, identity, resnet18)
    assert str(e.value) == (f"{tmp_path} holds an active-learning run with other settings (budgets differ); use "
                            "another --out or the same options")


def test_select_random_is_seeded_per_round_and_skips_the_labelled(monkeypatch):
    cache = SimpleNamespace(split=lambda name: range(10))
    config = ALConfig(strategy="random")
    labelled = np.array([0, 3, 4])
    got = _select(None, cache, config, 2, 1, labelled, 3, None)
    want = np.sort(np.random.default_rng([2, 1]).choice(np.setdiff1d(np.arange(10), labelled), 3, replace=False))
    assert got.tolist() == want.tolist() and not set(got) & {0, 3, 4}
    seen = []
    logits = torch.tensor([[0.0, 0.1]] * 10)
    logits[7] = torch.tensor([0.0, 0.0])  # the most uncertain by margin
    logits[5] = torch.tensor([0.0, 0.05])
    monkeypatch.setattr(active, "cached_logits", lambda model, c, split, bank=None: seen.append((split, bank)) or logits)
    picked = _select("m", cache, ALConfig(strategy="margin"), 0, 0, labelled, 2, "bank")
    assert picked.tolist() == [7, 5] and seen == [("train", "bank")]


def test_plot_curves_draws_mean_and_std_per_budget_for_each_strategy(tmp_path):
    from subcache.active import plot_curves

    runs = {"margin": [{"budget": 10, "accuracy": 0.5}, {"budget": 10, "accuracy": 0.7},
                       {"budget": 100, "accuracy": 0.8}, {"budget": 100, "accuracy": 0.8}],
            "random": [{"budget": 10, "accuracy": 0.4}, {"budget": 1000, "accuracy": 0.9}]}
    fig = plot_curves(runs, tmp_path / "al.png")
    assert (tmp_path / "al.png").stat().st_size > 0 and tuple(fig.get_size_inches()) == (6.5, 4.2)
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines) == ["margin", "random"] and all(line.get_marker() == "o" for line in lines.values())
    assert lines["margin"].get_xdata().tolist() == [10, 100]
    assert lines["margin"].get_ydata() == pytest.approx([0.6, 0.8])
    assert lines["random"].get_xdata().tolist() == [10, 1000] and lines["random"].get_ydata() == pytest.approx([0.4, 0.9])
    band = ax.collections[0].get_paths()[0].vertices  # margin's mean ± std
    assert {round(y, 6) for y in band[:, 1]} == {0.5, 0.7, 0.8}  # 0.6 ± 0.1 at 10, 0.8 ± 0 at 100
    assert {round(x) for x in band[:, 0]} == {10, 100} and ax.collections[0].get_alpha() == 0.2
    assert ax.get_xscale() == "log" and [t.get_text() for t in ax.get_xticklabels()] == ["10", "100", "1,000"]
    from matplotlib.ticker import NullLocator

    assert isinstance(ax.xaxis.get_minor_locator(), NullLocator)
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == ("labelled examples", "test accuracy",
                                                                 "Active learning")
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["margin", "random"]
    assert plot_curves(runs, None, "Mine").axes[0].get_title() == "Mine" and ax.title.get_fontsize() == 10
    assert ax.xaxis.get_gridlines()[0].get_alpha() == 0.3


def test_oracle_file_errors_name_the_file(tmp_path):
    (tmp_path / "o.csv").write_text("id,label\n100,X1\n")
    with pytest.raises(DataError) as e:
        _oracle_labels(str(tmp_path / "o.csv"), np.array([100]), np.array([0]), torch.tensor([0]), ["a", "b"])
    assert str(e.value) == (f"{tmp_path / 'o.csv'}: id 100 has label 'X1'; oracle labels must be class names (a, b…) or "
                            "indices 0..1")


def test_compare_strategies_runs_each_strategy_in_its_folder_and_titles_the_plot(resnet_cache, resnet18, tmp_path,
                                                                                monkeypatch):
    import subcache
    from subcache.active import ALResult, compare_strategies
    from subcache.plotting import describe_runs

    runs, plots = [], []
    def active_learning(cache, config, *, out, backbone, progress):
        assert isinstance(cache, Cache)  # opened once, for every strategy
        runs.append((config.strategy, out, backbone, progress))
        waiting = "to_label.csv" if config.strategy == "least-confidence" else None
        return ALResult([{"budget": 2, "accuracy": 0.5}], waiting)

    monkeypatch.setattr(active, "active_learning", active_learning)
    monkeypatch.setattr(active, "plot_curves", lambda curves, path, title: plots.append((curves, path, title)))
    config = ALConfig(budgets=(2, 4), seeds=2)
    compare_strategies(resnet_cache, config, ("margin", "random"), out=tmp_path, backbone=resnet18, progress=True)
    assert runs == [("margin", str(tmp_path / "margin"), resnet18, True), ("random", str(tmp_path / "random"), resnet18,
                                                                          True)]
    cache = subcache.open_cache(resnet_cache)
    runs_line = describe_runs(cache, config.train, 2, examples=False)
    assert plots == [({"margin": [{"budget": 2, "accuracy": 0.5}], "random": [{"budget": 2, "accuracy": 0.5}]},
                      tmp_path / "al.png", f"Active learning: linear probe, resnet18\n{runs_line}")]
    compare_strategies(resnet_cache, replace_config(config, blocks="7-8"), ("entropy",), out=tmp_path,
                       backbone=resnet18)
    assert plots[-1][2].startswith("Active learning: SubTuning blocks 7-8, resnet18\n") and runs[-1][3] is False
    with pytest.raises(ConfigError) as e:
        compare_strategies(resnet_cache, config, (), out=tmp_path, backbone=resnet18)
    assert str(e.value) == "--strategy is empty; allowed: margin, entropy, least-confidence, random"
    with pytest.raises(ConfigError, match="unknown strategy 'bogus'"):
        compare_strategies(resnet_cache, config, ("margin", "bogus"), out=tmp_path, backbone=resnet18)
    assert len(runs) == 3  # every strategy is checked before the first runs
    plots.clear()
    compare_strategies(resnet_cache, config, ("margin", "least-confidence"), out=tmp_path, backbone=resnet18)
    assert plots == []  # a strategy waits for labels: nothing to compare yet


def replace_config(config, **kw):
    from dataclasses import replace

    return replace(config, **kw)


# -- the rounds, with training stubbed: which items each round labels, and what each run is given ------------------
def _d(seed: int, n: int = 192) -> np.ndarray:
    """Each position's distinct logit gap under seed ``seed``'s model (the smaller, the more uncertain by margin)."""
    return ((np.arange(n) * 37 + seed * 11) % n + 1) / 50


@pytest.fixture
def stub_rounds(monkeypatch):
    """`train` and `train_runs` record what each run gets and return a model named after the seed; `cached_logits`
    gives that model's logits [0, gap]; the shared bank is a sentinel. Returns the list of recorded runs."""
    from subcache.train import TrainResult

    calls = Calls()

    def result(config, data, cache, backbone):
        calls.append({"seed": config.seed, "blocks": config.blocks, "positions": data.positions.tolist(),
                      "labels": data.labels.tolist(), "bank": data.bank})
        calls.given.append((cache, backbone))
        acc = round(0.5 + config.seed / 10 + len(data.positions) / 1000, 4)
        return TrainResult(f"model{config.seed}", acc, 0.0, 0.0, 0, 0.0, (), len(data.positions))

    def logits(model, cache, split, bank=None):
        assert split == "train" and bank == "bank" and isinstance(cache, Cache)
        return torch.stack([torch.zeros(192), torch.as_tensor(_d(int(model[5:])), dtype=torch.float32)], 1)

    def runs(cache, runs, *, backbone, batch_runs):
        calls.append(("batched", batch_runs, [c.seed for c, _ in runs]))
        return [result(*run, cache, backbone) for run in runs]

    monkeypatch.setattr(active, "train", lambda cache, config, data, *, backbone: result(config, data, cache, backbone))
    monkeypatch.setattr(active, "train_runs", runs)
    monkeypatch.setattr(active, "cached_logits", logits)
    monkeypatch.setattr(active, "shared_bank", lambda *args: calls.banks.append(args) or "bank")
    return calls


class Calls(list):
    """The runs trained (a list), with the (cache, backbone) each was given and the shared banks asked for."""

    def __init__(self):
        super().__init__()
        self.given, self.banks = [], []


def _expected_sets(seed: int, budgets, n: int = 192) -> list[list[int]]:
    """Each round's labelled positions: a seeded first draw, then the most uncertain (smallest gap) of the rest."""
    sets = [np.sort(np.random.default_rng(seed).choice(n, budgets[0], replace=False)).tolist()]
    for budget in budgets[1:]:
        rest = [p for p in np.argsort(_d(seed, n), kind="stable") if p not in sets[-1]]
        sets.append(sorted(sets[-1] + [int(p) for p in rest[:budget - len(sets[-1])]]))
    return sets


def test_rounds_label_each_seed_s_most_uncertain_items_and_save_the_curve(resnet_cache, resnet18, tmp_path,
                                                                           stub_rounds, capsys):
    import subcache
    from subcache.active import active_learning

    truth = subcache.open_cache(resnet_cache).read_y("train").tolist()
    config = ALConfig(blocks="7-8", budgets=(4, 6, 9), seeds=2, batch_runs="off")
    result = active_learning(resnet_cache, config, out=tmp_path, backbone=resnet18, progress=True)
    # seed after seed (batch_runs off), every round from the pretrained blocks 7-8, on the bank, with the true labels
    assert [(c["seed"], c["positions"]) for c in stub_rounds] == [
        (s, labelled) for s in (0, 1) for labelled in _expected_sets(s, (4, 6, 9))]
    assert all(c["blocks"] == "7-8" and c["labels"] == truth and c["bank"] == "bank" for c in stub_rounds)
    want = [{"budget": b, "accuracy": round(0.5 + s / 10 + b / 1000, 4), "strategy": "margin", "seed": s}
            for s in (0, 1) for b in (4, 6, 9)]
    assert result.curve == want and result.waiting is None
    assert json.loads((tmp_path / "curve.json").read_text()) == want
    with open(tmp_path / "curve.csv", newline="") as f:
        assert [{k: float(v) if k == "accuracy" else int(v) if k != "strategy" else v for k, v in row.items()}
                for row in csv.DictReader(f)] == want
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["seeds"]["1"]["labelled"] == _expected_sets(1, (4, 6, 9))[-1]
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 6 and all(line.startswith(f"active learning (margin) {k}/6 ({k / 6:.0%}) seed ")
                                   for k, line in enumerate(lines, 1))  # a line per round
    assert "seed 0, 4 labelled: test accuracy 0.5040" in lines[0] and "seed 1, 9 labelled: test accuracy 0.6090" in \
        lines[5] and all(re.search(r" (rounds/s|s/round)$", line) for line in lines)
    cache = stub_rounds.given[0][0]
    assert all(c is cache and b is resnet18 for c, b in stub_rounds.given) and isinstance(cache, Cache)
    assert stub_rounds.banks == [(cache, resnet18, config.train.augment, config.train.device)]
    assert json.loads((tmp_path / "state.json").read_text())["identity"] == subcache.labels.data_identity(cache, None)
    # resumed: a finished run trains nothing again (quietly); a third seed trains only seed 2, counted from 6 of 9
    stub_rounds.clear()
    assert active_learning(resnet_cache, config, out=tmp_path, backbone=resnet18).curve == want
    assert stub_rounds == [] and capsys.readouterr().err == ""
    state = json.loads((tmp_path / "state.json").read_text())  # an earlier version spelt the blocks
    (tmp_path / "state.json").write_text(json.dumps({**state, "config": {**state["config"], "blocks": "7-8"}}))
    more = active_learning(resnet_cache, replace_config(config, seeds=3), out=tmp_path, backbone=resnet18,
                           progress=True)
    assert [c["seed"] for c in stub_rounds] == [2, 2, 2] and more.curve[6:] == [
        {"budget": b, "accuracy": round(0.7 + b / 1000, 4), "strategy": "margin", "seed": 2} for b in (4, 6, 9)]
    assert capsys.readouterr().err.startswith("active learning (margin) 7/9 (78%)")


def test_batched_rounds_train_the_seeds_of_a_round_as_one_and_pick_the_same_items(resnet_cache, resnet18, tmp_path,
                                                                                  stub_rounds, capsys):
    from subcache.active import active_learning

    config = ALConfig(budgets=(3, 5), seeds=3, batch_runs="2")
    result = active_learning(resnet_cache, config, out=tmp_path, backbone=resnet18)
    assert capsys.readouterr().err == ""  # quiet by default
    assert all(isinstance(c, Cache) and b is resnet18 for c, b in stub_rounds.given)
    batched = [c for c in stub_rounds if isinstance(c, tuple)]
    # rounds go seed group by seed group: seeds 0 and 1 together round after round, then seed 2 alone
    assert batched == [("batched", 2, [0, 1]), ("batched", 2, [0, 1])]
    runs = [(c["seed"], c["positions"]) for c in stub_rounds if isinstance(c, dict)]
    assert runs == [(s, _expected_sets(s, (3, 5))[r]) for r in (0, 1) for s in (0, 1)] + [
        (2, labelled) for labelled in _expected_sets(2, (3, 5))]
    assert [(c["seed"], c["budget"]) for c in result.curve] == [(0, 3), (0, 5), (1, 3), (1, 5), (2, 3), (2, 5)]


def test_an_oracle_run_stops_for_labels_then_trains_on_the_given_ones(resnet_cache, resnet18, tmp_path, stub_rounds,
                                                                     monkeypatch):
    import subcache
    from subcache.active import active_learning

    cache = subcache.open_cache(resnet_cache)
    ids, keys = cache.split("train").id[:], cache.read_keys("train")
    oracle = tmp_path / "oracle.csv"
    config = ALConfig(budgets=(3, 5), seeds=2, oracle=str(oracle), batch_runs="4")  # never batched: seed by seed
    first = _expected_sets(0, (3, 5))[0]
    with monkeypatch.context() as m:  # another rank under torchrun: the same answer, but rank 0 writes the files
        m.setattr(active, "Dist", SimpleNamespace(from_env=lambda: SimpleNamespace(main=False, world=1)))
        waiting = active_learning(cache, config, out=tmp_path / "al", backbone=resnet18).waiting
    assert waiting == str(tmp_path / "al" / "to_label.csv") and list((tmp_path / "al").iterdir()) == []
    result = active_learning(cache, config, out=tmp_path / "al", backbone=resnet18)
    assert result.waiting == str(tmp_path / "al" / "to_label.csv") and result.curve == [] and stub_rounds == []
    with open(result.waiting, newline="") as f:
        assert list(csv.reader(f)) == [["id", "key", "label"], *[[str(ids[p]), str(keys[p]), ""] for p in first]]
    oracle.write_text("id,label\n" + "".join(f"{ids[p]},{cache.classes[(p + 1) % 4]}\n" for p in first[:2]))
    assert active_learning(cache, config, out=tmp_path / "al", backbone=resnet18).waiting == result.waiting
    oracle.write_text("id,label\n" + "".join(f"{ids[p]},{(p + 1) % 4}\n" for p in first))
    result = active_learning(cache, config, out=tmp_path / "al", backbone=resnet18)
    assert result.waiting is not None and [c["seed"] for c in stub_rounds] == [0]  # its next items need labels
    labels = stub_rounds[0]["labels"]
    assert [labels[p] for p in first] == [(p + 1) % 4 for p in first]  # the oracle's labels, not the cache's
    assert sum(v != -1 for v in labels) == 3  # nothing else is labelled


def test_score_pool_scores_every_item_but_the_excluded_with_the_task_s_model(resnet_cache, monkeypatch):
    import subcache
    from subcache.active import score_pool

    cache = subcache.open_cache(resnet_cache)
    ids, keys = cache.split("test").id[:], cache.read_keys("test")
    logits = torch.stack([torch.zeros(96), torch.as_tensor(_d(0, 96), dtype=torch.float32),
                          torch.full((96,), 0.5)], 1)
    seen = []
    monkeypatch.setattr(active, "open_task", lambda task, c, device, backbone: seen.append((task, c, device, backbone))
                        or (SimpleNamespace(meta={"classes": ["a", "b", "c"]}), cache, "model", "dev"))
    monkeypatch.setattr(active, "cached_logits", lambda model, c, split, dev, progress: seen.append(
        (model, c is cache, split, dev, progress)) or (logits if split == "test" else torch.zeros(192, 3)))
    scores = score_pool(resnet_cache, "task", split="test", metric="entropy", exclude=ids[[5, 2]], device="cpu",
                        backbone="bb", progress=True)
    assert seen == [("task", resnet_cache, "cpu", "bb"), ("model", True, "test", "dev", True)]
    keep = [p for p in range(96) if p not in (2, 5)]
    probs = logits.softmax(-1)
    assert scores.positions.tolist() == keep and scores.ids.tolist() == ids[keep].tolist()
    assert scores.keys.tolist() == keys[keep].tolist() and scores.classes == ["a", "b", "c"]
    entropy = -(probs * probs.log()).sum(-1)
    assert scores.score == pytest.approx(entropy[keep].numpy(), rel=1e-5) and scores.metric == "entropy"
    assert scores.uncertainty.tolist() == scores.score.tolist()
    assert scores.pred.tolist() == probs.argmax(-1)[keep].tolist() and set(scores.pred.tolist()) == {1, 2}
    assert scores.prob == pytest.approx(probs.max(-1).values[keep].numpy())
    assert score_pool(resnet_cache, "task", split="test").positions.tolist() == list(range(96))
    seen.clear()
    assert score_pool(resnet_cache, "task").metric == "margin"  # defaults: margin on train, device auto, quiet
    assert seen == [("task", resnet_cache, "auto", None), ("model", True, "train", "dev", False)]
    with pytest.raises(DataError) as e:
        score_pool(resnet_cache, "task", split="test", exclude=np.array([ids[0], *range(10**9, 10**9 + 4)]))
    assert str(e.value) == f"--exclude names 4 ids that split test does not have (e.g. [{10**9}, {10**9 + 1}, " \
                           f"{10**9 + 2}])"
    with pytest.raises(ConfigError) as e:
        score_pool(resnet_cache, "task", metric="random")
    assert str(e.value) == "unknown metric 'random'; allowed: margin, entropy, least-confidence"


def test_only_rank_0_writes_the_state_and_curve(resnet_cache, resnet18, tmp_path, stub_rounds, monkeypatch):
    from subcache.active import active_learning

    monkeypatch.setattr(active, "Dist", SimpleNamespace(from_env=lambda: SimpleNamespace(main=False, world=1)))
    result = active_learning(resnet_cache, ALConfig(budgets=(3, 5)), out=tmp_path, backbone=resnet18)
    assert [c["budget"] for c in result.curve] == [3, 5] and list(tmp_path.iterdir()) == []


def test_a_run_on_a_label_set_trains_and_picks_by_its_labels(int8_store, resnet18, tmp_path, stub_rounds, monkeypatch):
    import subcache
    from subcache.active import active_learning
    from subcache.train import TrainConfig

    cache = subcache.open_cache(int8_store)
    parity = subcache.labels.read_labels(cache, "train", "parity")[0]
    monkeypatch.setattr(active, "cached_logits", lambda model, c, split, bank=None: torch.stack(
        [torch.zeros(24), torch.arange(24.0)], 1))  # item 0 the most uncertain, then 1, 2, ...
    config = ALConfig(budgets=(3, 5), train=TrainConfig(labels="parity"), oracle=None)
    active_learning(cache, config, out=tmp_path, backbone=resnet18)
    assert stub_rounds[0]["labels"] == parity.tolist()
    first = _expected_sets(0, (3,), n=24)[0]
    assert stub_rounds[1]["positions"] == sorted(first + [p for p in range(24) if p not in first][:2])
    assert json.loads((tmp_path / "state.json").read_text())["identity"] == \
        subcache.labels.data_identity(cache, "parity")
    oracle = tmp_path / "oracle.csv"  # an oracle names the label set's classes
    oracle.write_text("id,label\n" + "".join(f"{i},{'even' if k == 0 else 'odd'}\n" for i, k in
                                               zip(cache.split("train").id[:], parity.tolist())))
    stub_rounds.clear()
    active_learning(cache, replace_config(config, oracle=str(oracle)), out=tmp_path / "o", backbone=resnet18)
    assert [stub_rounds[0]["labels"][p] for p in first] == [int(parity[p]) for p in first]


def test_random_rounds_draw_per_seed_and_round(resnet_cache, resnet18, tmp_path, stub_rounds):
    from subcache.active import active_learning

    active_learning(resnet_cache, ALConfig(budgets=(3, 5, 6), seeds=2, strategy="random", batch_runs="off"),
                    out=tmp_path, backbone=resnet18)
    for seed in (0, 1):
        sets = [c["positions"] for c in stub_rounds if c["seed"] == seed]
        for r, (before, after) in enumerate(zip(sets, sets[1:])):
            rest = np.setdiff1d(np.arange(192), before)
            drawn = np.random.default_rng([seed, r]).choice(rest, len(after) - len(before), replace=False)
            assert after == sorted(before + drawn.tolist())


def test_budgets_past_the_pool_are_refused_before_any_round(resnet_cache, resnet18, tmp_path, stub_rounds):
    from subcache.active import active_learning

    active_learning(resnet_cache, ALConfig(budgets=(2, 192)), out=tmp_path / "all", backbone=resnet18)  # the whole pool
    with pytest.raises(DataError) as e:
        active_learning(resnet_cache, ALConfig(budgets=(2, 5, 193)), out=tmp_path / "more", backbone=resnet18)
    assert str(e.value) == "budget 193 exceeds the pool (192 items)"


def test_pool_scores_make_the_folders_they_are_saved_in(tmp_path):
    _scores().save(tmp_path / "a" / "b" / "s.csv")
    assert (tmp_path / "a" / "b" / "s.csv").is_file()


def test_progress_writes_a_line_for_every_round(resnet_cache, resnet18, tmp_path, stub_rounds, capsys):
    from subcache.active import active_learning

    active_learning(resnet_cache, ALConfig(budgets=(3, 4, 5, 6, 7, 8), seeds=2, batch_runs="off"), out=tmp_path,
                    backbone=resnet18, progress=True)
    assert len(capsys.readouterr().err.splitlines()) == 12
