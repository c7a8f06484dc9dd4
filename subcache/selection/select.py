"""`select`: choose a window at a fraction of a full profile's compute, finish training it, save it as a task.

1. **Prior** (one shared pass, `prior`): a probe head fitted on the neck features of the first epoch's latter
   half of the batch order, then per-sample gradients of every block in the range at once, on rows the head was
   not fitted on → each window's ``align`` or ``drop`` score, on at most ``samples`` examples and at most
   ``prior_share`` of the budget (only the ``prior`` score's pass is made).
2. **Racing at step granularity**: candidates are windows of the widest width only — the best ``top`` of them
   by the ``prior`` score (``drop`` by default) plus the earliest and the latest (`_candidates` says why).
   Every candidate's head starts from the fitted probe (LP-FT), every candidate follows one batch order (the one
   `train` draws for this seed) under one cosine schedule over the *full* run; rung r trains the survivors to
   r0·2^r steps, ranks them by held-out loss, keeps the better half. Held-out loss: while the rung ends in the first
   half of the first epoch, the *prequential* loss — each batch of the rung's latter half scored in eval mode just
   before the update on it (no candidate and not the probe head has seen it; every candidate is judged on the same
   batches; a forward per image, far less than a validation pass); past that, the validation set's loss. The last
   survivor continues the same run to the full schedule: its racing steps are not paid twice.
3. **Honest compute**: the probe fit, the prior's forward and backward passes, every racing step, every scoring
   forward and every validation pass count, in FLOPs (`flops.window_flops`), against a full profile of the same
   windows and settings that selects on the same validation set (every window's training epochs + one validation
   pass). The frozen forward that fills the activation bank is shared by both and counted in neither (as `profile
   --halving` counts); the winner's remaining training is in ``total_fraction``, not ``compute_fraction``.
   ``budget`` caps ``compute_fraction``: the first rung's length is planned so that racing fits even if the
   costliest candidates survive, and a rung that would pass the cap is not run (the leader so far wins).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F

from ..backbones import Backbone
from ..bank import ActivationBank
from ..devices import resolve_device
from ..distributed import WriterLock
from ..errors import ConfigError
from ..evaluation import labels_for, scorer
from ..loader import batch_order
from ..progress import progress_bar
from ..store import Cache
from ..task import check_out_dir, check_task_out, save_task
from ..step import optimizer
from ..train import TrainConfig, balanced_subset, check_train_config, open_for_training, task_record
from ..tuned import TunedModel
from .flops import forward_flops, window_flops
from .prior import PRIOR_METHODS, gradient_sketch, passes, prior_scores
from .rank import fit_head
from .windows import parse_range, spec_of, validation_split, windows


MIN_PRIOR_SAMPLES = 8


@dataclass(frozen=True)
class SelectConfig:
    blocks: str | None = None  # range LOW-HIGH; default: the cached layer to the last block
    widths: tuple[int, ...] = (1,)
    budget: float = 0.1  # hard cap on compute_fraction (selection FLOPs ÷ a full profile's)
    val_fraction: float = 0.2  # validation set carved from the training split (`validation_split`)
    prior: str = "drop"  # which prior score picks the candidates: drop | align
    top: int = 1  # candidates (widest windows only): the prior's best `top`, + the earliest and the latest
    samples: int = 256  # training examples for the prior's per-sample gradients (fewer if `prior_share` needs)
    prior_share: float = 0.25  # the prior takes at most this share of the budget (if 8 samples fit in it)
    head_l2: float = 1e-3  # L2 penalty of the fitted probe head
    head_iters: int = 30  # L-BFGS iterations of the probe fit (a start for every candidate, not a converged probe)
    train: TrainConfig = field(default_factory=TrainConfig)  # epochs, lr, batch size, seed, labels, device …


@dataclass
class SelectResult:
    blocks: tuple[int, ...]
    candidates: list[dict]  # blocks, prior scores, steps trained, last validation loss, rung it left at
    rungs: list[dict]  # steps, windows raced, their validation losses, kept
    flops: dict[str, float]  # prior, racing, validation, finish (the winner's remaining steps), full_profile
    steps: int  # the winner's optimiser steps, all of one run (= epochs × steps per epoch)
    test_accuracy: float | None
    budget: float
    stopped_by_budget: bool
    out: str | None = None

    @property
    def compute_fraction(self) -> float:
        """Selection compute (prior + racing + validation) ÷ the full profile's."""
        f = self.flops
        return (f["prior"] + f["racing"] + f["validation"]) / f["full_profile"]

    @property
    def total_fraction(self) -> float:
        """Selection and the winner's remaining training ÷ the full profile's (what halving's fraction counts)."""
        return self.compute_fraction + self.flops["finish"] / self.flops["full_profile"]

    def to_dict(self) -> dict:
        return {"blocks": spec_of(self.blocks), "compute_fraction": self.compute_fraction,
                "total_fraction": self.total_fraction, "budget": self.budget,
                "stopped_by_budget": self.stopped_by_budget, "test_accuracy": self.test_accuracy,
                "steps": self.steps, "candidates": self.candidates, "rungs": self.rungs, "flops": self.flops,
                "task": self.out}


class SharedOrder:
    """The batches of the fit set, step by step: `train`'s order for this seed (`loader.batch_order`), one for
    every candidate."""

    def __init__(self, n: int, batch_size: int, seed: int, device: torch.device):
        self.n, self.batch_size, self.seed, self.device = n, batch_size, seed, device
        self._epochs: dict[int, list[torch.Tensor]] = {}
        self.steps_per_epoch = len(self.epoch(0))

    def epoch(self, e: int) -> list[torch.Tensor]:
        if e not in self._epochs:
            self._epochs[e] = batch_order(self.n, self.batch_size, self.seed, e, self.device)
        return self._epochs[e]

    def batch(self, step: int) -> torch.Tensor:
        e, i = divmod(step, self.steps_per_epoch)
        return self.epoch(e)[i]

    def head_rows(self) -> np.ndarray:
        """Fit-set positions of the first epoch's latter half: the probe head is fitted on them, so the batches
        before them (steps < `steps_per_epoch` // 2) are unseen by every candidate until it trains on them."""
        return torch.cat(self.epoch(0)[self.steps_per_epoch // 2:]).cpu().numpy()

    def samples(self, start: int, stop: int) -> int:
        """Samples in steps start..stop-1 (every epoch has the same batch sizes)."""
        sizes = [len(b) for b in self.epoch(0)]
        return sum(sizes[s % self.steps_per_epoch] for s in range(start, stop))


class Racer:
    """One candidate's run: its model (head from the probe), AdamW, cosine over the full schedule, the shared order.
    ``trace``: the batches it trained on, step by step."""

    def __init__(self, win: tuple[int, ...], model: TunedModel, x: torch.Tensor, y: torch.Tensor,
                 order: SharedOrder, config: TrainConfig, device: torch.device, total: int):
        self.win, self.model, self.x, self.y, self.order = win, model, x, y, order
        self.opt = optimizer(model, config, device)
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=max(1, total))
        self.step, self.samples, self.trace, self.loss = 0, 0, [], None
        self.checks: dict[int, float] = {}  # step → eval-mode loss on its batch, taken before the update on it

    def advance(self, until: int, check_from: int | None = None) -> None:
        """Train to step ``until``; from step ``check_from`` on, first score each batch in eval mode (`checks`)."""
        while self.step < until:
            idx = self.order.batch(self.step)
            if check_from is not None and self.step >= check_from:
                self.checks[self.step] = self._loss(idx)
            self.model.train()
            loss = F.cross_entropy(self.model.trainable_part(self.x[idx].float()).float(), self.y[idx])
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.sched.step()
            self.trace.append(idx)
            self.step, self.samples = self.step + 1, self.samples + len(idx)
        self.model.eval()

    @torch.no_grad()
    def _loss(self, idx: torch.Tensor) -> float:
        self.model.eval()
        return F.cross_entropy(self.model.trainable_part(self.x[idx].float()).float(), self.y[idx]).item()

    def prequential_loss(self, until: int) -> float:
        """Mean eval-mode loss over the latter half of steps 0..until-1, each batch scored before the update on it:
        held-out while no batch was seen before (the first epoch, outside the probe head's rows)."""
        self.loss = float(np.mean([self.checks[t] for t in range(until // 2, until)]))
        return self.loss

    @torch.no_grad()
    def validation_loss(self, x: torch.Tensor, y: torch.Tensor, batch: int = 1024) -> float:
        self.model.eval()
        total = sum(F.cross_entropy(self.model.trainable_part(x[a:a + batch].float()).float(), y[a:a + batch],
                                    reduction="sum").item() for a in range(0, len(x), batch))
        self.loss = total / len(x)
        return self.loss


@dataclass
class _Setting:
    """What every step of a selection shares: cache, backbone, bank, fit/validation positions and labels, FLOPs."""
    cache: Cache
    backbone: Backbone
    config: SelectConfig
    device: torch.device
    bank: ActivationBank
    fit: np.ndarray
    val: np.ndarray
    labels: torch.Tensor  # the whole training split's
    classes: int
    flops: tuple  # forward_flops(backbone)

    _memo: dict = field(default_factory=dict)

    def inputs(self, first: int, rows: np.ndarray) -> torch.Tensor:
        """Activations at block ``first``'s input for training-split ``rows`` (fit and validation: memoised)."""
        key = (first, id(rows))
        if key not in self._memo:
            x = self.bank.at(self.config.train.train_split, first)[torch.from_numpy(rows).to(self.device)]
            if rows is not self.fit and rows is not self.val:
                return x
            self._memo[key] = x
        return self._memo[key]

    def targets(self, rows: np.ndarray) -> torch.Tensor:
        return self.labels[torch.from_numpy(rows)].to(self.device)

    def step_flops(self, win: tuple[int, ...]) -> int:
        return window_flops(self.flops, win)[1]

    def forward_flops(self, win: tuple[int, ...]) -> int:
        return window_flops(self.flops, win)[2]


def select_window(cache: Cache | str | os.PathLike, config: SelectConfig = SelectConfig(), *,
                  out: str | os.PathLike | None = None, backbone: Backbone | None = None,
                  progress: bool = False, overwrite: bool = False) -> SelectResult:
    """Choose a window within ``config.budget`` of a full profile's compute, train it to the full schedule, save
    it to ``out`` as a task (the format of `train --out`; a complete task already there needs ``overwrite``)."""
    check_select_config(config)
    cache, backbone = open_for_training(cache, backbone)
    lo, hi = parse_range(config.blocks, cache, backbone)
    wins = [w for width in sorted(set(config.widths)) for w in windows(lo, hi, width)]
    if out is None:
        return _select(cache, backbone, config, wins, None, progress)
    out = os.fspath(out)
    check_out_dir(out)
    with WriterLock(out, what="select"):
        check_task_out(out, overwrite=overwrite)
        return _select(cache, backbone, config, wins, out, progress)


def check_select_config(config: SelectConfig) -> None:
    check_train_config(config.train)
    if not (math.isfinite(config.budget) and 0 < config.budget <= 1):
        raise ConfigError(f"--budget must be a fraction of a full profile's compute in (0, 1], got {config.budget}")
    if not 0 < config.val_fraction < 1:
        raise ConfigError(f"--val-fraction must be between 0 and 1 (e.g. 0.2), got {config.val_fraction}")
    if config.top < 1 or config.samples < 2 or not 0 < config.prior_share < 1:
        raise ConfigError(f"--top must be ≥ 1, --samples ≥ 2 and the prior's share in (0, 1), got {config.top}, "
                          f"{config.samples}, {config.prior_share}")
    if config.prior not in PRIOR_METHODS:
        raise ConfigError(f"--prior must be one of {', '.join(PRIOR_METHODS)}, got {config.prior!r}")
    if config.train.augment not in ("none", "") or config.train.siamese or config.train.prune:
        raise ConfigError("select trains plain windows: no --augment, --siamese or --prune")


def _select(cache: Cache, backbone: Backbone, config: SelectConfig, wins: list[tuple[int, ...]], out: str | None,
            progress: bool) -> SelectResult:
    s = _setting(cache, backbone, config)
    order = SharedOrder(len(s.fit), config.train.batch_size, config.train.seed, s.device)
    total = config.train.epochs * order.steps_per_epoch
    full = _full_profile_flops(s, wins, order)
    head, prior, scores = _prior(s, wins, config.budget * full, order.head_rows())
    candidates = _candidates(wins, scores, config.prior, config.top)
    racers = [Racer(w, _model(s, w, head), s.inputs(w[0], s.fit), s.targets(s.fit), order, config.train, s.device,
                    total) for w in candidates]
    with progress_bar(progress, "rungs/s", every=0) as bar:
        leader, rungs, spent, stopped = _race(s, racers, order, total, config.budget * full - prior, bar)
        raced = leader.samples * s.step_flops(leader.win)
        leader.advance(total)
        bar.line(f"winner {spec_of(leader.win)}: trained to {total} steps")
    result = SelectResult(leader.win, _candidate_rows(racers, scores, rungs), rungs,
                          {"prior": prior, "racing": spent["racing"], "validation": spent["validation"],
                           "finish": leader.samples * s.step_flops(leader.win) - raced, "full_profile": full},
                          leader.step, _test_accuracy(s, leader.model), config.budget, stopped, out)
    if out:
        _save(s, leader.model, result, out)
    return result


def _setting(cache: Cache, backbone: Backbone, config: SelectConfig) -> _Setting:
    device = resolve_device(config.train.device)
    backbone.to(device).eval()
    fit, val = validation_split(cache, config.train, config.val_fraction)
    labels, classes = labels_for(cache, config.train.train_split, config.train.labels)
    return _Setting(cache, backbone, config, device, ActivationBank(cache, backbone, device), fit, val, labels,
                    classes, forward_flops(backbone))


def _full_profile_flops(s: _Setting, wins: list[tuple[int, ...]], order: SharedOrder) -> float:
    """A profile of every window on the fit set selecting on the validation set: its epochs + one validation pass."""
    per_epoch = order.samples(0, order.steps_per_epoch)
    return float(sum(s.config.train.epochs * per_epoch * s.step_flops(w) + len(s.val) * s.forward_flops(w)
                     for w in wins))


def _prior(s: _Setting, wins: list[tuple[int, ...]], cap: float, head_rows: np.ndarray
           ) -> tuple[torch.nn.Linear, float, dict]:
    """The probe head on the neck features of the fit set's ``head_rows``, and the prior's scores
    per window from samples outside them (a fitted head's own rows have memorised residuals), with their FLOPs:
    on ``config.samples`` examples, or fewer (not under 8) so that the prior takes at most ``config.prior_share``
    of ``cap`` (FLOPs); refused when even that passes ``cap``."""
    last, lo, hi = max(w[0] for w in wins), min(w[0] for w in wins), max(w[-1] for w in wins)
    at = torch.from_numpy(head_rows).to(s.device)
    x = s.inputs(last, s.fit)[at]
    run = lambda h: s.backbone.neck(s.backbone.run_blocks(h, last, s.backbone.num_blocks))  # noqa: E731
    with torch.no_grad():
        neck = torch.cat([run(x[a:a + 1024].float()) for a in range(0, len(x), 1024)])
    y = s.targets(s.fit)
    head = fit_head(neck.float(), y[at], s.classes, s.config.head_l2, s.config.head_iters)
    span, (n, d) = tuple(range(lo, hi + 1)), neck.shape
    fixed = n * window_flops(s.flops, (last,))[2] + head.evaluations * 6 * n * d * s.classes  # neck, probe
    backwards, forwards = passes((s.config.prior,))
    per_sample = backwards * s.step_flops(span) + forwards * s.forward_flops(span)
    share = int((cap * s.config.prior_share - fixed) // per_sample)
    count = min(s.config.samples, len(s.fit), max(share, MIN_PRIOR_SAMPLES))
    if fixed + count * per_sample > cap:
        raise ConfigError(f"--budget {s.config.budget} is below what the prior needs (the probe fit and "
                          f"{count} gradient samples take {(fixed + count * per_sample) / cap * s.config.budget:.3f} "
                          f"of the profile); raise --budget")
    pool = np.setdiff1d(np.arange(len(y)), head_rows)  # samples the head never saw (all of them: any)
    pool = pool if len(pool) else head_rows
    some = balanced_subset(y[torch.from_numpy(pool).to(s.device)].cpu().numpy(), count, 0)
    some = pool if some is None else pool[some]
    sketch = gradient_sketch(s.backbone, head, s.inputs(lo, s.fit[some]).float(), y[torch.from_numpy(some).to(
        s.device)], lo, hi, methods=(s.config.prior,), batch_size=s.config.train.batch_size, seed=s.config.train.seed)
    return head, float(fixed + len(some) * per_sample), {w: prior_scores(sketch, w, (s.config.prior,)) for w in wins}


def _candidates(wins: list[tuple[int, ...]], scores: dict, prior: str, top: int) -> list[tuple[int, ...]]:
    """Windows of the widest width only (a short race from the probe head favours fewer tuned blocks, which the
    full schedule does not: windows of one width are the ones it can compare): the prior's best ``top`` of them
    by its score ``prior``, then the earliest and the latest (input shift tends to favour early blocks, label
    shift late ones); no repeats."""
    widest = [w for w in wins if len(w) == max(map(len, wins))]
    best = sorted(widest, key=lambda w: (-scores[w][prior], w[0]))[:top]
    return list(dict.fromkeys([*best, min(widest), max(widest)]))


def _model(s: _Setting, win: tuple[int, ...], head: torch.nn.Linear) -> TunedModel:
    """The window's model, its head a copy of the fitted probe (LP-FT)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s.config.train.seed)
        model = TunedModel(s.backbone, s.cache.layer, win, s.classes, s.cache.sample_shape).to(s.device)
    with torch.no_grad():
        model.head.weight.copy_(head.weight)
        model.head.bias.copy_(head.bias)
    return model


def first_rung_steps(costs: list[tuple[float, float, float]], total: int, room: float, quick_until: int = 0) -> int:
    """The longest first rung (steps, 0: none fits) whose racing fits ``room`` even if the costliest candidates
    survive every rung. ``costs``: per candidate (FLOPs of a step, of a validation pass, of scoring one step's
    batch); a rung ending at step ≤ ``quick_until`` scores the batches of its latter half instead of validating."""
    worst = sorted(costs, reverse=True)

    def planned(r0: int) -> float:
        alive, done, t, spent = len(worst), 0, r0, 0.0
        while alive > 1:
            t = min(t, total)
            spent += sum(c * (t - done) + (e * (t - t // 2) if t <= quick_until else v) for c, v, e in worst[:alive])
            if t >= total:
                break
            alive, done, t = math.ceil(alive / 2), t, 2 * t
        return spent

    lo, hi = 0, total  # planned() grows with r0: the largest r0 with planned(r0) ≤ room
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if planned(mid) <= room else (lo, mid - 1)
    return lo


def _race(s: _Setting, racers: list[Racer], order: SharedOrder, total: int, room: float, bar
          ) -> tuple[Racer, list[dict], dict, bool]:
    """Successive halving by held-out loss, rung lengths doubling from a first rung planned to fit ``room``: while
    the batches are unseen (the first half of the first epoch: the head was fitted on the second) the prequential
    loss of the rung's latter half (`Racer.prequential_loss`), after it the validation set's loss."""
    val_cost = {r.win: len(s.val) * s.forward_flops(r.win) for r in racers}
    batch = s.config.train.batch_size
    costs = [(batch * s.step_flops(r.win), val_cost[r.win], batch * s.forward_flops(r.win)) for r in racers]
    quick = order.steps_per_epoch // 2
    t, alive, rungs = first_rung_steps(costs, total, room, quick), list(racers), []
    spent, stopped = {"racing": 0.0, "validation": 0.0}, False
    while len(alive) > 1:
        t = min(t, total)
        step_cost = sum(order.samples(r.step, t) * s.step_flops(r.win) for r in alive)
        checks = sum((order.samples(max(r.step, t // 2), t) if t <= quick else len(s.val)) * s.forward_flops(r.win)
                     for r in alive)
        if t == 0 or sum(spent.values()) + step_cost + checks > room:
            stopped = True
            break
        for r in alive:
            r.advance(t, t // 2 if t <= quick else None)
            _judge(s, r, t, quick)
        spent["racing"] += step_cost
        spent["validation"] += checks
        ranked = sorted(alive, key=lambda r: (r.loss, racers.index(r)))
        alive = ranked[:1] if t >= total else ranked[:math.ceil(len(ranked) / 2)]
        rungs.append({"rung": len(rungs), "steps": t, "judged_on": "prequential" if t <= quick else "validation",
                      "windows": [spec_of(r.win) for r in ranked], "val_loss": [r.loss for r in ranked],
                      "kept": [spec_of(r.win) for r in alive]})
        bar.line(f"rung {len(rungs) - 1}: {t} steps, kept {', '.join(rungs[-1]['kept'])}")
        t *= 2
    leader = min(alive, key=lambda r: (math.inf if r.loss is None else r.loss, racers.index(r)))
    return leader, rungs, spent, stopped


def _judge(s: _Setting, r: Racer, t: int, quick: int) -> float:
    """The racer's held-out loss after ``t`` steps: prequential while the batches are unseen, else validation."""
    if t <= quick:
        return r.prequential_loss(t)
    return r.validation_loss(s.inputs(r.win[0], s.val), s.targets(s.val))


def _candidate_rows(racers: list[Racer], scores: dict, rungs: list[dict]) -> list[dict]:
    rows = []
    for r in racers:
        left = next((g["rung"] for g in rungs if spec_of(r.win) in g["windows"] and spec_of(r.win) not in g["kept"]),
                    None)
        rows.append({"blocks": spec_of(r.win), **scores[r.win], "steps_raced": max(
            [g["steps"] for g in rungs if spec_of(r.win) in g["windows"]], default=0), "val_loss": r.loss,
            "left_at_rung": left})
    return rows


def _test_accuracy(s: _Setting, model: TunedModel) -> float | None:
    split = s.config.train.test_split
    if split not in s.cache.splits:
        return None
    labels = labels_for(s.cache, split, s.config.train.labels)[0]
    return scorer(model, s.cache, split, labels, None, s.bank, s.device)()


def _save(s: _Setting, model: TunedModel, result: SelectResult, out: str) -> None:
    config = replace(s.config.train, blocks=spec_of(result.blocks))
    metrics = {"test_accuracy": result.test_accuracy, "blocks": list(result.blocks), "steps": result.steps,
               "trainable_params": model.trainable_params(), "compute_fraction": result.compute_fraction}
    selection = {k: v for k, v in result.to_dict().items() if k != "task"}
    save_task(out, model, task_record(s.cache, s.backbone, model, config, metrics, complete=True,
                                      selected_by="select", selection=selection, head_init="probe"))
