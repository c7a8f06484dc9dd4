"""`select`: the label-aware prior, racing on one shared batch order, the winner's run continued (not restarted),
honest compute under a hard budget, the saved task. On test_rank's planted backbone, where block 3 is the window
to tune."""
from __future__ import annotations

import json
import math
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import subcache
from subcache.cli.main import main
from subcache.errors import ConfigError
from subcache.loader import batch_order
from subcache.selection import SelectConfig, select_window
from subcache.selection import select as select_module
from subcache.selection.flops import forward_flops, window_flops
from subcache.selection.prior import GradientSketch, _accumulate, _drops, align_score
from subcache.selection.rank import RankConfig, rank_windows
from subcache.train import TrainConfig
from test_rank import planted  # noqa: F401  (the fixture)

FAST = TrainConfig(epochs=8, batch_size=16, lr=1e-2, device="cpu")
# the toy's probe fit is dear beside its tiny profile: the prior may take half the budget here
CONFIG = SelectConfig(widths=(1,), budget=0.1, samples=32, val_fraction=0.25, prior_share=0.5, train=FAST)


@pytest.fixture(scope="module")
def selected(planted, tmp_path_factory):  # noqa: F811
    """One selection on the planted task, saved; every Racer it made and the optimiser steps of each advance."""
    cache, backbone = planted
    out = tmp_path_factory.mktemp("select") / "task"
    made, steps = [], []

    class Recorded(select_module.Racer):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            made.append(self)

        def advance(self, until: int, check_from: int | None = None) -> None:
            steps.append(until - self.step)
            super().advance(until, check_from)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(select_module, "Racer", Recorded)
        result = select_window(cache, CONFIG, out=out, backbone=backbone)
    return result, out, made, steps


def test_planted_window_is_chosen_and_saved_task_scores_as_reported(planted, selected):  # noqa: F811
    cache, backbone = planted
    result, out, _, _ = selected
    assert result.blocks == (3,), result.rungs
    assert len(result.rungs) >= 2 and result.rungs[-1]["kept"] == ["3"]
    assert result.compute_fraction <= CONFIG.budget and not result.stopped_by_budget  # the plan fits the budget
    assert subcache.evaluate_task(out, cache, backbone=backbone) == result.test_accuracy
    meta = json.loads((out / "task.json").read_text())
    assert meta["blocks"] == [3] and meta["selection"]["blocks"] == "3" and meta["complete"]


def test_compute_counts_prior_racing_and_validation_by_hand(planted, selected):  # noqa: F811
    cache, backbone = planted
    result, _, _, _ = selected
    c = subcache.open_cache(cache)
    n_train = len(c.split("train"))
    n_val = round(0.25 * n_train)
    n_fit = n_train - n_val
    flops = forward_flops(backbone)
    step, fwd = (lambda w: window_flops(flops, w)[1]), (lambda w: window_flops(flops, w)[2])
    per_epoch = sum(len(b) for b in batch_order(n_fit, FAST.batch_size, FAST.seed, 0))
    wins = [(1,), (2,), (3,), (4,)]
    assert result.flops["full_profile"] == sum(FAST.epochs * per_epoch * step(w) + n_val * fwd(w) for w in wins)
    sizes = [len(b) for e in range(FAST.epochs) for b in batch_order(n_fit, FAST.batch_size, FAST.seed, e)]
    samples = lambda steps: sum(sizes[:steps])  # noqa: E731
    by_hand = sum(samples(c["steps_raced"]) * step((int(c["blocks"]),)) for c in result.candidates)
    assert result.flops["racing"] == by_hand
    quick = len(batch_order(n_fit, FAST.batch_size, FAST.seed, 0)) // 2
    # judged on the rung's latter half of batches, each scored before its update, while they are unseen (the
    # first half of the first epoch), on the validation set after it; both count
    assert [r["judged_on"] for r in result.rungs] == ["prequential" if r["steps"] <= quick else "validation"
                                                      for r in result.rungs]
    assert {r["judged_on"] for r in result.rungs} == {"prequential", "validation"}, result.rungs
    validations = sum((samples(r["steps"]) - samples(r["steps"] // 2) if r["steps"] <= quick else n_val)
                      * fwd((int(b),)) for r in result.rungs for b in r["windows"])
    assert result.flops["validation"] == validations
    total = len(sizes)
    assert result.flops["finish"] == (samples(total) - samples(result.rungs[-1]["steps"])) * step((3,))
    assert result.flops["prior"] > 0
    assert result.compute_fraction == pytest.approx(
        (result.flops["prior"] + by_hand + validations) / result.flops["full_profile"])


def test_racing_shares_one_batch_order_and_the_winner_continues(selected):
    result, _, racers, steps = selected
    winner = next(r for r in racers if r.win == result.blocks)
    n_fit = len(racers[0].y)
    spe = len(batch_order(n_fit, FAST.batch_size, FAST.seed, 0))
    total = FAST.epochs * spe
    assert len(winner.trace) == winner.step == result.steps == total
    # train's order for this seed, step by step, and every candidate saw the same batches as far as it got
    expected = [b for e in range(FAST.epochs) for b in batch_order(n_fit, FAST.batch_size, FAST.seed, e)]
    assert all(torch.equal(a, b) for a, b in zip(winner.trace, expected))
    for r in racers:
        assert r.step >= 1 and all(torch.equal(a, b) for a, b in zip(r.trace, expected)), r.win
    # continued, not restarted: the optimiser steps taken are the racing steps plus the winner's remaining ones
    raced = {c["blocks"]: c["steps_raced"] for c in result.candidates}
    assert sum(steps) == sum(raced.values()) - raced["3"] + total


def test_continued_run_equals_one_uninterrupted_run(planted, selected):  # noqa: F811
    cache, backbone = planted
    result, _, racers, _ = selected
    winner = next(r for r in racers if r.win == result.blocks)
    assert any(0 < c["steps_raced"] < result.steps for c in result.candidates if c["blocks"] == "3")
    setting = select_module._setting(subcache.open_cache(cache), backbone, CONFIG)
    order = select_module.SharedOrder(len(setting.fit), FAST.batch_size, FAST.seed, setting.device)
    head, _, _ = select_module._prior(setting, [(1,), (2,), (3,), (4,)], 1e30, order.head_rows())
    alone = select_module.Racer(winner.win, select_module._model(setting, winner.win, head),
                                setting.inputs(3, setting.fit), setting.targets(setting.fit), order, FAST,
                                setting.device, result.steps)
    alone.advance(result.steps)
    for (k, a), b in zip(winner.model.task_state().items(), alone.model.task_state().values()):
        assert torch.equal(a, b), k


def test_prequential_rungs_judge_each_batch_before_its_update(planted, selected):  # noqa: F811
    cache, backbone = planted
    result, _, racers, _ = selected
    by = {select_module.spec_of(r.win): r for r in racers}
    judged = [(rung["steps"], w, loss) for rung in result.rungs if rung["judged_on"] == "prequential"
              for w, loss in zip(rung["windows"], rung["val_loss"])]
    assert judged
    for t, w, loss in judged:  # the rung's latter half of each candidate's per-step losses
        assert loss == pytest.approx(sum(by[w].checks[s] for s in range(t // 2, t)) / (t - t // 2)), (t, w)
    setting = select_module._setting(subcache.open_cache(cache), backbone, CONFIG)
    order = select_module.SharedOrder(len(setting.fit), FAST.batch_size, FAST.seed, setting.device)
    head, _, _ = select_module._prior(setting, [(1,), (2,), (3,), (4,)], 1e30, order.head_rows())
    x, y = setting.inputs(3, setting.fit), setting.targets(setting.fit)
    two, one = (select_module.Racer((3,), select_module._model(setting, (3,), head), x, y, order, FAST,
                                    setting.device, 30) for _ in range(2))
    modes = []
    two.model.head.register_forward_pre_hook(lambda m, args: modes.append(m.training))
    two.advance(2, check_from=1)
    one.advance(1)
    assert modes == [True, False, True]  # step 0 trains; step 1 is checked in eval mode (BatchNorm), then trains
    with torch.no_grad():  # step 1's check: the model after one update, in eval mode, on batch 1, before its update
        before = torch.nn.functional.cross_entropy(one.model.eval().trainable_part(x[order.batch(1)].float()),
                                                   y[order.batch(1)])
    assert list(two.checks) == [1] and two.checks[1] == pytest.approx(before.item(), rel=1e-5)
    # the probe head never saw the batches judged on: it is fitted on the first epoch's latter half
    every_row = np.arange(len(setting.fit))
    assert not torch.equal(head.weight, select_module._prior(setting, [(3,)], 1e30, every_row)[0].weight)
    rows = order.head_rows()
    assert sorted(rows.tolist()) == sorted(torch.cat(order.epoch(0)[order.steps_per_epoch // 2:]).tolist())
    assert not set(rows.tolist()) & set(torch.cat(order.epoch(0)[:order.steps_per_epoch // 2]).tolist())


def test_prior_samples_are_rows_the_probe_head_never_saw(planted, monkeypatch):  # noqa: F811
    cache, backbone = planted
    setting = select_module._setting(subcache.open_cache(cache), backbone, CONFIG)
    order = select_module.SharedOrder(len(setting.fit), FAST.batch_size, FAST.seed, setting.device)
    asked, inputs = [], setting.inputs
    monkeypatch.setattr(setting, "inputs", lambda first, rows: asked.append(rows) or inputs(first, rows))
    select_module._prior(setting, [(1,), (2,), (3,), (4,)], 1e30, order.head_rows())
    sampled = set(asked[-1].tolist())  # the gradient samples' training-split rows
    head = set(setting.fit[order.head_rows()].tolist())
    assert len(sampled) == min(CONFIG.samples, len(setting.fit) - len(head)) and not sampled & head
    assert sampled <= set(setting.fit.tolist())


def test_candidates_are_the_prior_best_and_the_ends_among_the_widest_windows_only():
    wins = [(1,), (2,), (3,), (4,), (1, 2), (2, 3), (3, 4)]
    scores = {w: {"drop": float(w == (2,))} for w in wins}  # the prior's best is a single block: not raced
    assert select_module._candidates(wins, scores, "drop", 1) == [(1, 2), (3, 4)]  # ties among the widest: earlier
    scores[(2, 3)] = {"drop": 0.5}
    assert select_module._candidates(wins, scores, "drop", 1) == [(2, 3), (1, 2), (3, 4)]
    assert select_module._candidates(wins, scores, "drop", 2) == [(2, 3), (1, 2), (3, 4)]
    assert select_module._candidates([(1,), (2,), (3,)], scores, "drop", 1) == [(2,), (1,), (3,)]
    wider = [(1,), (2,), (3,), (1, 2), (2, 3), (1, 2, 3)]  # the widest width fits once: the only candidate
    assert select_module._candidates(wider, {w: {"drop": float(w == (2,))} for w in wider}, "drop", 1) == [
        (1, 2, 3)]


def test_select_races_and_returns_only_the_widest_windows(planted, monkeypatch):  # noqa: F811
    cache, backbone = planted  # a prior whose best window is the planted single block: it must not race
    monkeypatch.setattr(select_module, "prior_scores", lambda sketch, w, methods: {"drop": float(w == (3,))})
    config = SelectConfig(**{**CONFIG.__dict__, "widths": (1, 2), "train": replace(FAST, epochs=4)})
    result = select_window(cache, config, backbone=backbone)
    assert {c["blocks"] for c in result.candidates} <= {"1-2", "2-3", "3-4"} and len(result.candidates) >= 2
    assert all(set(g["windows"]) <= {"1-2", "2-3", "3-4"} for g in result.rungs) and result.rungs
    assert 3 in result.blocks and len(result.blocks) == 2


def test_budget_is_a_hard_cap(planted, selected):  # noqa: F811
    cache, backbone = planted
    result = select_window(cache, SelectConfig(**{**CONFIG.__dict__, "budget": 0.07}), backbone=backbone)
    assert 0 < result.compute_fraction <= 0.07 < selected[0].compute_fraction
    assert result.total_fraction > result.compute_fraction
    assert sum(r["steps"] for r in result.rungs) < sum(r["steps"] for r in selected[0].rungs)


def test_budget_below_the_prior_is_refused(planted, tmp_path):  # noqa: F811
    cache, backbone = planted
    with pytest.raises(ConfigError, match="below what the prior needs"):
        select_window(cache, SelectConfig(**{**CONFIG.__dict__, "budget": 0.001}), backbone=backbone,
                      out=tmp_path / "t")
    assert not (tmp_path / "t" / "task.json").exists()


def test_first_rung_is_the_longest_that_fits_the_worst_case():
    costs = [(10.0, 1.0, 0.5), (20.0, 2.0, 1.0), (30.0, 3.0, 1.5), (40.0, 4.0, 2.0)]
    # r0 steps: 4 run r0 (+ their validations), the 2 costliest go on to 2·r0
    planned = lambda r0: 100 * r0 + 10 + 70 * r0 + 7  # noqa: E731
    for room in (100, planned(1), planned(3) + 5, planned(400) - 1):
        r0 = select_module.first_rung_steps(costs, total=1000, room=room)
        assert (r0 == 0 or planned(r0) <= room) and planned(r0 + 1) > room, room
    assert select_module.first_rung_steps(costs, total=1000, room=10 ** 9) == 1000  # everyone to the end
    # rungs ending by step quick_until score the batches of their latter half instead of validating
    quick_first = lambda r0: 100 * r0 + 5 * (r0 - r0 // 2) + 70 * r0 + 7  # noqa: E731
    for room in (1760, planned(50) - 3):  # 1760: 10 steps with validation do not fit, with scoring they do
        r0 = select_module.first_rung_steps(costs, total=1000, room=room, quick_until=room // 100)
        assert r0 <= room // 100 < 2 * r0 and quick_first(r0) <= room < quick_first(r0 + 1), room
        both = lambda r0: 100 * r0 + 5 * (r0 - r0 // 2) + 70 * r0 + 3.5 * r0  # noqa: E731
        r0 = select_module.first_rung_steps(costs, total=1000, room=room, quick_until=1000)
        assert both(r0) <= room < both(r0 + 1), room


def test_align_is_leave_one_out():
    gen = torch.Generator().manual_seed(0)
    phi = torch.randn(80, 16, generator=gen, dtype=torch.float64)
    predictable = phi[:, :3] @ torch.randn(3, 4, generator=gen, dtype=torch.float64)
    noise = torch.randn(80, 4, generator=gen, dtype=torch.float64)
    sketch = lambda r: GradientSketch({1: phi}, r, {1: 0.0})  # noqa: E731
    assert align_score(sketch(predictable), (1,)) > 0.5
    assert align_score(sketch(noise), (1,)) < 0  # an in-sample fit would explain part of pure noise


def test_drop_is_cross_fitted_so_pure_noise_scores_nothing():
    gen = torch.Generator().manual_seed(0)

    def drop(mean: float) -> float:
        g = mean + torch.randn(200, 4000, generator=gen, dtype=torch.float64)
        sums = {h: {1: {"w": torch.zeros(4000, dtype=torch.float64)}} for h in ("a", "b", "sq")}
        _accumulate(sums, {1: {"w": g}}, 0)
        return _drops(sums, 200, batch_size=16)[1]

    assert abs(drop(0.0)) < 12  # ḡ² alone would give ≈ 4000 · (1/200) / √(1/200 + 1/16) ≈ 77
    assert drop(1.0) == pytest.approx(4000 / math.sqrt(1 + 1 / 16), rel=0.05)


def test_rank_drop_puts_the_planted_block_first_and_align_is_finite(planted):  # noqa: F811
    cache, backbone = planted
    result = rank_windows(cache, RankConfig(methods=("drop", "align"), samples=32, train=FAST), backbone=backbone)
    assert result.ranking[0]["blocks"] == "3"
    assert all(math.isfinite(r["align"]) for r in result.ranking)


def test_cli_select_json_then_evaluate(planted, tmp_path, monkeypatch):  # noqa: F811
    cache, backbone = planted
    monkeypatch.setattr(sys.modules["subcache.train"], "backbone_for", lambda record, *a: backbone)
    monkeypatch.setattr(sys.modules["subcache.evaluation"], "backbone_for", lambda record, *a: backbone)
    runner = CliRunner()
    done = runner.invoke(main, ["select", "--cache", cache, "--budget", "1", "--samples", "32", "--epochs", "3",
                                "--batch-size", "16", "--lr", "0.01", "--val-fraction", "0.25", "--device", "cpu",
                                "--out", str(tmp_path / "task"), "--json"])
    assert done.exit_code == 0, done.output
    d = json.loads(done.stdout)
    assert d["blocks"] == "3" and d["compute_fraction"] <= 1
    assert {c["blocks"] for c in d["candidates"]} >= {"1", "4"} and all("drop" in c for c in d["candidates"])
    ev = runner.invoke(main, ["evaluate", "--task", str(tmp_path / "task"), "--cache", cache, "--device", "cpu",
                              "--json"])
    assert ev.exit_code == 0, ev.output
    assert json.loads(ev.stdout)["test_accuracy"] == d["test_accuracy"]
    before = (tmp_path / "task" / "task.safetensors").read_bytes()
    again = runner.invoke(main, ["select", "--cache", cache, "--budget", "1", "--samples", "32", "--epochs", "1",
                                 "--device", "cpu", "--val-fraction", "0.25", "--out", str(tmp_path / "task")])
    assert again.exit_code == 1 and "already holds a task" in again.output  # a complete task needs --overwrite
    assert (tmp_path / "task" / "task.safetensors").read_bytes() == before
    bad = runner.invoke(main, ["select", "--cache", cache, "--budget", "0", "--out", str(tmp_path / "t2")])
    assert bad.exit_code == 2 and "--budget" in bad.output
    tiny = runner.invoke(main, ["select", "--cache", cache, "--budget", "0.001", "--device", "cpu", "--val-fraction",
                                "0.25", "--out", str(tmp_path / "t3")])
    assert tiny.exit_code == 1 and tiny.output.startswith("Error: --budget 0.001 is below what the prior needs")
    assert len(tiny.output.strip().splitlines()) == 1 and not (tmp_path / "t3" / "task.json").exists()
