"""`rank`: score every window from the cache without training it, and judge the ranking against a real profile.

Three families of scores, each from one pass over (a subset of) the training split:

* gradient energy, at the pretrained weights with a head fitted on the neck features (L2-regularised logistic
  regression, L-BFGS): ``fisher`` — the mean over samples of ‖∂log p(y|x)/∂θ_block‖² (the empirical Fisher's trace
  for the block), ``fisher_pp`` — the same per parameter, and ``rgn`` — Auto-RGN's relative gradient norm
  ‖g_block‖ / ‖θ_block‖ (Lee et al. 2022, surgical fine-tuning) with g the mean gradient over the samples.
  A window *sums* its blocks' scores (``fisher_pp``: the window's total ÷ its parameters): tuning a window makes
  all of its blocks' gradient directions available at once, and squared gradient norms add over disjoint
  parameter sets.
* transferability of the frozen features, from the activation bank, globally average-pooled: ``logme`` — LogME
  evidence (You et al. 2021, one-vs-rest targets averaged over classes) and ``knn`` — leave-one-out k-NN accuracy
  (cosine, standardised features). A window scores T(its input) − T(its last block's output): the task
  information the frozen window *loses*, which is what tuning it can win back. (The window's output alone would
  reward the windows the frozen network already handles well — the ones that need tuning least.)

* label-aware priors from per-sample gradients (see `prior`): ``align`` — how much of the head's residual the
  window's sketched gradient kernel predicts on held-out samples (leave-one-out kernel ridge), ``drop`` — the
  cross-fitted first-order drop of held-out loss after an Adam-like step.

Higher is better for every score. Selection never sees the validation set (``--val-fraction``) nor the test split;
`compare` correlates a ranking with a measured profile (its validation means when it has them).
"""
from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..backbones import Backbone
from ..bank import NECK, ActivationBank
from ..devices import resolve_device
from ..errors import BlockError, ConfigError, TrainingError
from ..progress import stage
from ..evaluation import labels_for
from ..store import Cache
from ..train import TrainConfig, balanced_subset, open_for_training
from .flops import forward_flops, training_flops, window_flops
from .prior import PRIOR_METHODS, gradient_sketch, passes, prior_scores
from .runs import load_profile
from .windows import parse_range, spec_of, validation_split, windows

METHODS = ("fisher", "fisher_pp", "rgn", "logme", "knn", *PRIOR_METHODS)
GRADIENT = ("fisher", "fisher_pp", "rgn")


@dataclass(frozen=True)
class RankConfig:
    blocks: str | None = None  # range LOW-HIGH; default: the cached layer to the last block
    widths: tuple[int, ...] = (1,)
    methods: tuple[str, ...] = METHODS  # the first one orders the ranking (its `score`)
    val_fraction: float = 0.0  # the validation set `profile --val-fraction` carves is left out here too
    samples: int = 256  # training examples for the per-sample gradients (class-balanced, seeded)
    knn: int = 10  # neighbours of leave-one-out k-NN
    head_l2: float = 1e-3  # L2 penalty of the fitted head (keeps p(y|x) away from 1 on separable features)
    train: TrainConfig = field(default_factory=TrainConfig)  # device, labels, limit, train split


@dataclass
class RankResult:
    ranking: list[dict]  # best first: blocks, window, width, score and one column per method
    blocks: dict[int, dict[str, float]]  # per-block scores (transfer scores: the block's own drop)
    seconds: float
    config: RankConfig
    comparison: dict | None = None

    def to_dict(self) -> dict:
        return {"ranking": self.ranking, "blocks": {str(b): s for b, s in self.blocks.items()},
                "methods": list(self.config.methods), "seconds": round(self.seconds, 3),
                "comparison": self.comparison}


def parse_methods(spec: str) -> tuple[str, ...]:
    """``fisher,rgn`` | ``all`` → method names (``fisher`` also adds ``fisher_pp``)."""
    if spec.strip() == "all":
        return METHODS
    names = [m.strip() for m in spec.split(",") if m.strip()]
    bad = [m for m in names if m not in METHODS]
    if bad or not names:
        raise BlockError(f"unknown rank method {', '.join(bad) or repr(spec)}; allowed: {', '.join(METHODS)} or all")
    return tuple(dict.fromkeys(n for m in names for n in ((m, "fisher_pp") if m == "fisher" else (m,))))


# -- the scores --------------------------------------------------------------------------------------------------
def logme(features: np.ndarray, labels: np.ndarray, iterations: int = 11) -> float:
    """LogME (You et al. 2021): the mean over classes of the log evidence per sample of a Bayesian linear model
    from ``features`` (N, D) to the class's one-hot target, α and β fitted by the paper's fixed-point iteration
    on the SVD of the features."""
    f = features.astype(np.float64)
    n, d = f.shape
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    s2 = s ** 2  # eigenvalues of FᵀF (the rest are zero)
    evidences = []
    for c in np.unique(labels):
        y = (labels == c).astype(np.float64)
        z2 = (u.T @ y) ** 2  # y's energy along each singular direction
        rest = y @ y - z2.sum()  # energy outside the features' span: never fitted
        alpha, beta = 1.0, 1.0
        for _ in range(iterations):
            gamma = (beta * s2 / (alpha + beta * s2)).sum()
            m2 = (beta ** 2 * s2 * z2 / (alpha + beta * s2) ** 2).sum()  # ‖m‖²
            res = (z2 * (alpha / (alpha + beta * s2)) ** 2).sum() + rest  # ‖y − F m‖²
            new_alpha, new_beta = gamma / (m2 + 1e-5), (n - gamma) / (res + 1e-5)
            done = abs(new_alpha / new_beta - alpha / beta) / (alpha / beta) < 0.01
            alpha, beta = new_alpha, new_beta
            if done:
                break
        evidence = (d / 2 * math.log(alpha) + n / 2 * math.log(beta)
                    - 0.5 * np.log(alpha + beta * s2).sum() - 0.5 * (d - len(s2)) * math.log(alpha)
                    - beta / 2 * res - alpha / 2 * m2 - n / 2 * math.log(2 * math.pi))
        evidences.append(evidence / n)
    return float(np.mean(evidences))


def knn_accuracy(features: torch.Tensor, labels: torch.Tensor, k: int = 10) -> float:
    """Leave-one-out k-NN accuracy: cosine similarity of standardised features, majority vote (ties: the
    smallest class index), each sample's own vote left out."""
    f = (features - features.mean(0)) / (features.std(0) + 1e-6)
    f = F.normalize(f, dim=1)
    sim = f @ f.T
    sim.fill_diagonal_(-float("inf"))
    nearest = sim.topk(min(k, len(f) - 1), dim=1).indices
    votes = torch.zeros(len(f), int(labels.max()) + 1, device=f.device)
    votes.scatter_add_(1, labels[nearest], torch.ones_like(nearest, dtype=votes.dtype))
    return (votes.argmax(1) == labels).float().mean().item()


def pooled(h: torch.Tensor) -> torch.Tensor:
    """Block output → one vector per sample: mean over space (N, C, H, W) or tokens (N, T, C)."""
    if h.ndim == 4:
        return h.mean((2, 3))
    return h.mean(1) if h.ndim == 3 else h.flatten(1)


def fit_head(features: torch.Tensor, labels: torch.Tensor, classes: int, l2: float,
             max_iter: int = 100) -> torch.nn.Linear:
    """L2-regularised multinomial logistic regression, full batch L-BFGS, on centred features scaled by one number
    (per-feature scaling would let the penalty favour large raw weights on near-constant features, whose
    gradients then swamp the blocks' scores). ``max_iter``: L-BFGS iterations."""
    if not bool(torch.isfinite(features).all()):
        raise TrainingError("rank: the neck features hold non-finite values; the cache's activations may hold "
                            "inf/nan (check with `subcache verify`)")
    mean, std = features.mean(0), features.std() + 1e-6
    x = (features - mean) / std
    head = torch.nn.Linear(x.shape[1], classes).to(features.device)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    opt = torch.optim.LBFGS(head.parameters(), lr=1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(head(x), labels) + l2 * head.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    head.evaluations = int(opt.state[head.weight].get("func_evals", 0))  # L-BFGS's loss+gradient evaluations
    with torch.no_grad():  # fold the standardisation in: the head reads raw neck features
        head.weight.div_(std)
        head.bias.sub_(head.weight @ mean)
    return head.requires_grad_(False)


def gradient_scores(backbone: Backbone, head: torch.nn.Linear, x: torch.Tensor, y: torch.Tensor, lo: int,
                    hi: int, chunk: int = 32) -> dict[int, dict[str, float]]:
    """Per block lo..hi: fisher, fisher_pp and rgn from per-sample gradients of log p(y|x) (torch.func.vmap).
    ``x``: the input of block ``lo`` for the samples."""
    from torch.func import functional_call, grad, vmap

    blocks = {b: backbone.block(b) for b in range(lo, hi + 1)}
    params = {b: {n: p.detach() for n, p in m.named_parameters()} for b, m in blocks.items()}
    buffers = {b: dict(m.named_buffers()) for b, m in blocks.items()}

    def nll(p: dict, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        h = xi.unsqueeze(0)
        for b in range(lo, backbone.num_blocks + 1):
            h = functional_call(blocks[b], (p[b], buffers[b]), (h,)) if b in blocks else backbone.block(b)(h)
        return F.cross_entropy(head(backbone.neck(h)), yi.unsqueeze(0))

    per_sample = vmap(grad(nll), in_dims=(None, 0, 0))
    energy = {b: torch.zeros((), device=x.device, dtype=torch.float64) for b in blocks}
    total = {b: {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params[b].items()} for b in blocks}
    for a in range(0, len(x), chunk):
        g = per_sample(params, x[a:a + chunk], y[a:a + chunk])
        for b in blocks:
            for n, gn in g[b].items():
                energy[b] += gn.double().flatten(1).square().sum()
                total[b][n] += gn.double().sum(0)
    return {b: _block_gradient_scores(energy[b] / len(x), total[b], params[b], len(x)) for b in blocks}


def _block_gradient_scores(energy: torch.Tensor, total: dict, params: dict, count: int) -> dict[str, float]:
    numel = sum(p.numel() for p in params.values())
    g_norm = math.sqrt(sum((t / count).square().sum().item() for t in total.values()))
    theta = math.sqrt(sum(p.double().square().sum().item() for p in params.values()))
    return {"fisher": energy.item(), "fisher_pp": energy.item() / numel, "rgn": g_norm / max(theta, 1e-12),
            "params": numel}


def transfer_scores(bank: ActivationBank, split: str, rows: torch.Tensor, y: torch.Tensor, lo: int, hi: int,
                    methods: Sequence[str], k: int) -> dict[int, dict[str, float]]:
    """Per depth lo..hi+1: LogME / k-NN of the pooled input of that block (hi+1: the last block's output)."""
    out = {}
    for depth in range(lo, hi + 2):
        f = pooled(bank.at(split, depth)[rows]).float()
        out[depth] = {}
        if "logme" in methods:
            out[depth]["logme"] = logme(f.cpu().numpy(), y.cpu().numpy())
        if "knn" in methods:
            out[depth]["knn"] = knn_accuracy(f, y, k)
    return out


# -- windows -----------------------------------------------------------------------------------------------------
def window_scores(win: tuple[int, ...], grads: dict[int, dict], transfer: dict[int, dict],
                  methods: Sequence[str], sketch=None) -> dict[str, float]:
    """Aggregate block scores over a window (see the module docstring for why sums and drops; `prior` for align
    and drop)."""
    s: dict[str, float] = {} if sketch is None else prior_scores(sketch, win, methods)
    if grads:
        s["fisher"] = sum(grads[b]["fisher"] for b in win)
        s["fisher_pp"] = s["fisher"] / sum(grads[b]["params"] for b in win)
        s["rgn"] = sum(grads[b]["rgn"] for b in win)
    for m in ("logme", "knn"):
        if m in methods:
            s[m] = transfer[win[0]][m] - transfer[win[-1] + 1][m]
    return {m: s[m] for m in methods}


def rank_windows(cache: Cache | str, config: RankConfig = RankConfig(), *, out: str | None = None,
                 backbone: Backbone | None = None, against: str | None = None, progress: bool = False) -> RankResult:
    """Score every window of each width in the range; best first by the first method. ``against``: a profile
    folder to compare with (Spearman, Kendall, regret). ``progress``: a line per stage (`progress.stage`)."""
    t0 = time.perf_counter()
    cache, backbone = open_for_training(cache, backbone)
    lo, hi = parse_range(config.blocks, cache, backbone)
    wins = [w for width in sorted(set(config.widths)) for w in windows(lo, hi, width)]
    methods = parse_methods(",".join(config.methods))
    device = resolve_device(config.train.device)
    backbone.to(device).eval()
    grads, transfer, sketch = _scores(cache, config, backbone, ActivationBank(cache, backbone, device), methods,
                                      (lo, hi), progress)
    ranking = [{"blocks": spec_of(w), "window": list(w), "width": len(w),
                **window_scores(w, grads, transfer, methods, sketch)} for w in wins]
    _check_finite(ranking, methods)
    for r in ranking:
        r["score"] = r[methods[0]]
    ranking.sort(key=lambda r: (-r["score"], r["width"], r["window"][0]))
    result = RankResult(ranking, _per_block(grads, transfer, sketch, methods, lo, hi), time.perf_counter() - t0,
                        config)
    if against:
        result.comparison = compare(ranking, methods, against)
    if out:
        save_rank(out, result, cache)
    return result


def _scores(cache: Cache, config: RankConfig, backbone: Backbone, bank: ActivationBank, methods: Sequence[str],
            span: tuple[int, int], progress: bool) -> tuple[dict, dict, "object | None"]:
    """(per-block gradient scores, per-depth transferability, the gradient sketch of the prior methods), each
    computed only when a method asks for it."""
    (lo, hi), split = span, config.train.train_split
    rows, y = _positions(cache, config, bank.device)
    grads, transfer, sketch = {}, {}, None
    if set(methods) & {*GRADIENT, *PRIOR_METHODS}:
        classes = labels_for(cache, split, config.train.labels)[1]
        with stage(f"rank: frozen blocks {lo}-{backbone.num_blocks} over {len(rows):,} examples, head", progress):
            head = fit_head(bank.at(split, NECK)[rows].float(), y, classes, config.head_l2)
        some = _subset(y, config.samples)
        x = bank.at(split, lo)[rows[some]].float()
        if set(methods) & set(GRADIENT):
            with stage(f"rank: per-sample gradients of blocks {lo}-{hi} on {len(some):,} examples", progress):
                grads = gradient_scores(backbone, head, x, y[some], lo, hi)
        if set(methods) & set(PRIOR_METHODS):
            with stage(f"rank: gradient sketch of blocks {lo}-{hi} on {len(some):,} examples", progress):
                sketch = gradient_sketch(backbone, head, x, y[some], lo, hi, methods=methods,
                                         batch_size=config.train.batch_size)
    if set(methods) & {"logme", "knn"}:
        with stage(f"rank: {', '.join(m for m in methods if m in ('logme', 'knn'))} at blocks {lo}-{hi + 1}",
                   progress):
            transfer = transfer_scores(bank, split, rows, y, lo, hi, methods, config.knn)
    return grads, transfer, sketch


def _per_block(grads: dict, transfer: dict, sketch, methods: Sequence[str], lo: int, hi: int) -> dict[int, dict]:
    """Each block's own scores (a window of one): gradient energy, the prior's, and transferability lost."""
    blocks = {b: {m: v for m, v in grads.get(b, {}).items() if m in methods} for b in range(lo, hi + 1)}
    for b in blocks:
        blocks[b].update(prior_scores(sketch, (b,), methods) if sketch else {})
        blocks[b].update({m: transfer[b][m] - transfer[b + 1][m] for m in ("logme", "knn") if m in methods})
    return blocks


def _positions(cache: Cache, config: RankConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Training positions rank may look at (the --limit pool minus validation) and their labels, on the device."""
    labels = labels_for(cache, config.train.train_split, config.train.labels)[0]
    split = validation_split(cache, config.train, config.val_fraction)
    if split is not None:
        rows = split[0]
    else:
        pool = balanced_subset(labels.numpy(), config.train.limit, 0)
        rows = np.arange(len(labels)) if pool is None else pool
    rows_t = torch.from_numpy(rows)
    return rows_t.to(device), labels[rows_t].to(device)


def _subset(y: torch.Tensor, count: int) -> torch.Tensor:
    picked = balanced_subset(y.cpu().numpy(), count, 0)
    return torch.arange(len(y), device=y.device) if picked is None else torch.from_numpy(picked).to(y.device)


def _check_finite(ranking: list[dict], methods: Sequence[str]) -> None:
    bad = [(r["blocks"], m) for r in ranking for m in methods if not math.isfinite(r[m])]
    if bad:
        raise TrainingError(f"rank method {bad[0][1]} gave a non-finite score for window {bad[0][0]}; the cache's "
                            f"activations may hold inf/nan (check with `subcache verify`)")


@torch.inference_mode()
def pooled_widths(backbone: Backbone, lo: int, hi: int) -> list[int]:
    """Width of the pooled features at the input of blocks lo..hi and at the output of hi."""
    size = backbone.preprocess.image_size
    device = next(backbone.parameters()).device
    h = backbone.prefix(torch.zeros(1, 3, size, size, device=device), lo)
    dims = []
    for d in range(lo, hi + 1):
        dims.append(pooled(h).shape[1])
        h = backbone.block(d)(h)
    return dims + [pooled(h).shape[1]]


def rank_flops(backbone: Backbone, result: RankResult, lo: int, hi: int, rows: int) -> float:
    """Arithmetic of one rank, excluding the frozen forward that fills the bank (a profile shares it): per-sample
    gradients (forward + backward of the range and the tail, as one training step; align and drop one each, align
    also a forward for the head's probabilities), LogME's SVD (≈ 4·N·D²) and
    k-NN's similarities (2·N²·D) at every depth."""
    methods, dims = result.config.methods, pooled_widths(backbone, lo, hi)
    span = tuple(range(lo, hi + 1))
    step, forward = training_flops(backbone, span)[1], window_flops(forward_flops(backbone), span)[2]
    backwards, forwards = passes(methods)
    grads = min(result.config.samples, rows) * (step * (bool(set(methods) & set(GRADIENT)) + backwards)
                                                + forward * forwards)
    svd = sum(4 * rows * d * min(rows, d) for d in dims) if "logme" in methods else 0
    knn = sum(2 * rows * rows * d for d in dims) if "knn" in methods else 0
    return float(grads + svd + knn)


# -- judged against a profile ----------------------------------------------------------------------------------
def _ranks(values: np.ndarray) -> np.ndarray:
    """Average ranks (1-based) with ties sharing their mean rank."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(1, len(values) + 1)
    for v in np.unique(values):
        tie = values == v
        ranks[tie] = ranks[tie].mean()
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    ra, rb = _ranks(np.asarray(a, float)), _ranks(np.asarray(b, float))
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def kendall(a: Sequence[float], b: Sequence[float]) -> float:
    """Kendall's tau-b (ties in either list allowed)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    da, db = np.sign(a[:, None] - a[None, :]), np.sign(b[:, None] - b[None, :])
    upper = np.triu_indices(len(a), 1)
    conc = (da * db)[upper].sum()
    na, nb = (da[upper] != 0).sum(), (db[upper] != 0).sum()
    return float(conc / math.sqrt(na * nb)) if na and nb else float("nan")


def compare(ranking: list[dict], methods: Sequence[str], profile_dir: str) -> dict:
    """Per method: Spearman and Kendall correlation of its scores with the profile's accuracy per window
    (validation means when the profile has them, else test), and the regret in test-accuracy points: the
    profile's pick (best on validation, else test) minus the method's top window; ``oracle_regret`` against the
    best test accuracy."""
    measured = {s["blocks"]: s for s in load_profile(profile_dir).summary() if s["width"] > 0}
    shared = [r for r in ranking if r["blocks"] in measured]
    if len(shared) < 2:
        raise ConfigError(f"{profile_dir} shares {len(shared)} window(s) with this ranking; rank the same "
                            f"--blocks and --width as the profile")
    truth = [measured[r["blocks"]].get("val_mean", measured[r["blocks"]]["mean"]) for r in shared]
    pick = max(measured.values(), key=lambda s: s.get("val_mean", s["mean"]))
    oracle = max(s["mean"] for s in measured.values())
    out = {"profile": profile_dir, "windows": len(shared), "selected_on": "validation" if
           "val_mean" in pick else "test", "profile_pick": pick["blocks"], "profile_pick_test": pick["mean"],
           "methods": {}}
    for m in methods:
        top = max(shared, key=lambda r: (r[m], -r["width"], -r["window"][0]))
        out["methods"][m] = {"spearman": spearman([r[m] for r in shared], truth),
                             "kendall": kendall([r[m] for r in shared], truth), "top": top["blocks"],
                             "top_test": measured[top["blocks"]]["mean"],
                             "regret": 100 * (pick["mean"] - measured[top["blocks"]]["mean"]),
                             "oracle_regret": 100 * (oracle - measured[top["blocks"]]["mean"])}
    return out



# -- output --------------------------------------------------------------------------------------------------------
def save_rank(out: str, result: RankResult, cache: Cache) -> None:
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"cache": cache.path, "backbone": cache.backbone, "layer": cache.layer,
            "config": asdict(result.config), **result.to_dict()}
    (folder / "rank.json").write_text(json.dumps(meta, indent=1))
    methods = list(result.config.methods)
    with open(folder / "rank.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["blocks", "width", "score", *parse_methods(",".join(methods))],
                                extrasaction="ignore")
        writer.writeheader()
        writer.writerows(result.ranking)
    plot_rank(result, folder / "rank.png", parse_methods(",".join(methods)))


def plot_rank(result: RankResult, path: Path, methods: tuple[str, ...]) -> None:
    """One panel per method: score vs first block of the window, one line per width (matplotlib object API)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.2 * len(methods), 3.2), dpi=110)
    FigureCanvasAgg(fig)
    for i, m in enumerate(methods):
        ax = fig.add_subplot(1, len(methods), i + 1)
        for width in sorted({r["width"] for r in result.ranking}):
            pts = sorted((r["window"][0], r[m]) for r in result.ranking if r["width"] == width)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"width {width}")
        ax.set_title(m)
        ax.set_xlabel("first block")
        ax.grid(alpha=0.3)
    fig.axes[0].set_ylabel("score (higher: tune here)")
    fig.axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
