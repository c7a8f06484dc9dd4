"""Label-aware priors over windows from one shared per-sample-gradient pass (`rank --method align,drop`, and the
prior `select` races from).

At the pretrained weights with a fitted probe head, per-sample gradients of every block in the range are taken
at once (torch.func.vmap), from the input of the range's first block through the frozen tail and the head. Two
gradients per sample:

* with the true label y — ``drop``: the first-order drop of *held-out* loss after an AdamW-like step, per unit of
  learning rate, cross-fitted: the samples are split in halves A and B, and per parameter
  ḡ_A·ḡ_B / √(ḡ² + σ²/batch) (Adam's update is the mean gradient over the root of the batch gradient's second
  moment; the product of two independent halves is an unbiased estimate of ḡ², so noise does not score).
  A window sums its blocks (disjoint parameters add).
* of sᵀz (the logits z along one random ±1 vector s shared by all samples) — label-free, so no sample's label
  leaks into its own feature; φᵢᵀφⱼ is an unbiased (Hutchinson) estimate of the empirical tangent kernel
  trace(JᵢJⱼᵀ). CountSketch-projected to ``dim`` numbers per block (TRAK-like), a window's kernel is the sum of
  its blocks' Gram matrices. ``align``: how much of the head's residual
  R = one-hot(y) − p the window's kernel predicts on held-out samples — leave-one-out kernel ridge regression
  (closed form: E_i = [(K+λI)⁻¹R]_i / [(K+λI)⁻¹]_ii, λ = trace(K)/n), 1 − ‖E‖²/‖R‖². Scale-free: it measures
  whether tuning the window can move the logits the way the labels need, in a way that generalises.

Higher is better for both.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from ..backbones import Backbone

PRIOR_METHODS = ("align", "drop")


@dataclass
class GradientSketch:
    features: dict[int, torch.Tensor]  # block → (n, dim) CountSketch of label-free per-sample gradients of sᵀz
    residual: torch.Tensor | None  # (n, classes): one-hot(y) − p at the fitted head (None: align not asked)
    drop: dict[int, float]  # block → cross-fitted first-order held-out loss drop (see the module docstring)


def tail_logits(backbone: Backbone, head: torch.nn.Module, x: torch.Tensor, lo: int,
                blocks: dict[int, torch.nn.Module] | None = None) -> torch.Tensor:
    """Logits from the input of block ``lo``: blocks lo..N (``blocks`` replaces some), the neck, ``head``."""
    for b in range(lo, backbone.num_blocks + 1):
        x = (blocks or {}).get(b, backbone.block(b))(x)
    return head(backbone.neck(x))


def gradient_sketch(backbone: Backbone, head: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, lo: int,
                    hi: int, *, methods: Sequence[str] = PRIOR_METHODS, dim: int = 256, batch_size: int = 256,
                    chunk: int = 32, seed: int = 0) -> GradientSketch:
    """One pass of per-sample gradients of blocks lo..hi over ``x`` (the input of block lo), labels ``y``: with
    the true labels for ``drop``, of sᵀz for ``align`` (see `passes`)."""
    from torch.func import functional_call, grad, vmap

    params = {b: {n: p.detach() for n, p in backbone.block(b).named_parameters()} for b in range(lo, hi + 1)}
    buffers = {b: dict(backbone.block(b).named_buffers()) for b in params}

    def logits(p: dict, xi: torch.Tensor) -> torch.Tensor:
        calls = {b: _bound(backbone.block(b), p[b], buffers[b], functional_call) for b in params}
        return tail_logits(backbone, head, xi.unsqueeze(0), lo, calls)

    drops = {}
    if "drop" in methods:
        per_sample = vmap(grad(lambda p, xi, yi: F.cross_entropy(logits(p, xi), yi.unsqueeze(0))),
                          in_dims=(None, 0, 0))
        sums = {h: {b: {n: torch.zeros_like(p, dtype=torch.float64) for n, p in ps.items()}
                    for b, ps in params.items()} for h in ("a", "b", "sq")}
        for a in range(0, len(x), chunk):
            _accumulate(sums, per_sample(params, x[a:a + chunk], y[a:a + chunk]), a)
        drops = _drops(sums, len(x), batch_size)
    if "align" not in methods:
        return GradientSketch({}, None, drops)
    jacobian = vmap(grad(lambda p, xi, s: (logits(p, xi).squeeze(0) * s).sum()), in_dims=(None, 0, None))
    return GradientSketch(*_kernel_features(backbone, head, x, y, lo, params, jacobian, dim, chunk, seed), drops)


def passes(methods: Sequence[str]) -> tuple[int, int]:
    """(per-sample backward passes, forward-only passes) `gradient_sketch` makes for ``methods``."""
    return ("drop" in methods) + ("align" in methods), int("align" in methods)


def _kernel_features(backbone: Backbone, head: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, lo: int,
                     params: dict, jacobian, dim: int, chunk: int, seed: int
                     ) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """CountSketch of the per-sample gradients of sᵀz per block, and the head's residual one-hot(y) − p."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        probs = torch.cat([tail_logits(backbone, head, x[a:a + chunk], lo).float().softmax(1)
                           for a in range(0, len(x), chunk)])
    s = (torch.randint(2, (probs.shape[1],), generator=gen) * 2 - 1).to(x.device, x.dtype)  # one for all samples
    sketch = {b: {n: (torch.randint(dim, (p.numel(),), generator=gen).to(x.device),
                      (torch.randint(2, (p.numel(),), generator=gen) * 2 - 1).to(x.device, torch.float32))
                  for n, p in ps.items()} for b, ps in params.items()}
    features = {b: torch.zeros(len(x), dim, device=x.device, dtype=torch.float64) for b in params}
    for a in range(0, len(x), chunk):
        for b, named in jacobian(params, x[a:a + chunk], s).items():
            for n, g in named.items():
                idx, sign = sketch[b][n]
                features[b][a:a + len(g)].index_add_(1, idx, (g.flatten(1) * sign).double())
    return features, (F.one_hot(y, probs.shape[1]).to(probs) - probs).double()


def _bound(module: torch.nn.Module, p: dict, buffers: dict, functional_call):
    return lambda h: functional_call(module, (p, buffers), (h,))


def _accumulate(sums: dict, grads: dict, start: int) -> None:
    """Add a chunk's per-sample gradients: half A (even sample positions), half B (odd), squares (all)."""
    for b, named in grads.items():
        for n, g in named.items():
            g = g.double()
            even = (torch.arange(start, start + len(g), device=g.device) % 2 == 0).view(-1, *[1] * (g.ndim - 1))
            sums["a"][b][n] += (g * even).sum(0)
            sums["b"][b][n] += (g * ~even).sum(0)
            sums["sq"][b][n] += g.square().sum(0)


def _drops(sums: dict, count: int, batch_size: int) -> dict[int, float]:
    """Per block: Σ over parameters of ḡ_A·ḡ_B / √(ḡ² + σ²/batch) (σ²: the per-sample variance)."""
    n_a, n_b = (count + 1) // 2, count // 2
    out = {}
    for b in sums["a"]:
        total = 0.0
        for n in sums["a"][b]:
            ga, gb = sums["a"][b][n] / max(n_a, 1), sums["b"][b][n] / max(n_b, 1)
            mean = (sums["a"][b][n] + sums["b"][b][n]) / count
            var = (sums["sq"][b][n] / count - mean.square()).clamp_min(0)
            scale = (mean.square() + var / batch_size).sqrt()
            total += (ga * gb / scale.clamp_min(1e-30)).masked_fill(scale == 0, 0).sum().item()
        out[b] = total
    return out


def align_score(sketch: GradientSketch, win: tuple[int, ...]) -> float:
    """1 − ‖leave-one-out kernel-ridge error‖² / ‖residual‖² with the window's sketched-Fisher kernel."""
    phi = torch.cat([sketch.features[b] for b in win], dim=1)
    k = phi @ phi.T
    n = len(k)
    trace = k.diagonal().sum()
    if trace <= 0 or not math.isfinite(trace.item()):
        return 0.0
    inv = torch.linalg.inv(k + trace / n * torch.eye(n, dtype=k.dtype, device=k.device))
    err = (inv @ sketch.residual) / inv.diagonal().unsqueeze(1)
    return float(1 - err.square().sum() / sketch.residual.square().sum().clamp_min(1e-30))


def prior_scores(sketch: GradientSketch, win: tuple[int, ...], methods=PRIOR_METHODS) -> dict[str, float]:
    out = {}
    if "align" in methods:
        out["align"] = align_score(sketch, win)
    if "drop" in methods:
        out["drop"] = sum(sketch.drop[b] for b in win)
    return out
