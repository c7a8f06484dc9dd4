"""Channel pruning of the tuned blocks before training (paper §5.2), with the `torch-pruning` package.

Only channels *inside* tuned blocks are removed — never the channels a block hands to the next one (its output
convolution / projection and downsample path are left whole), so the frozen blocks around them are untouched and
the task's added compute shrinks. Magnitude importance of the pretrained weights makes the result deterministic,
so a saved pruned task is rebuilt by pruning fresh copies the same way and checking every shape.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .devices import placement
from .errors import ConfigError, TaskError
from .tuned import TunedModel


@dataclass(frozen=True)
class PruneConfig:
    ratio: float = 0.0  # fraction of prunable channels removed
    norm: str = "l1"  # l1 | l2 magnitude importance
    scope: str = "local"  # local: the same ratio in every layer; global: ranked across all tuned blocks


class _Chain(nn.Module):
    """Blocks from the model's start to its last tuned block, as one module for the dependency graph."""

    def __init__(self, model: TunedModel):
        super().__init__()
        self.model = model

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.model._run(h, self.model.start, max(self.model.tuned))


def _protected(block: nn.Module, tokens: bool, out_dim: int) -> list[nn.Module]:
    """Layers whose outputs leave the block (residual interface): never pruned."""
    if tokens:
        return [m for m in block.modules() if (isinstance(m, nn.Linear) and m.out_features == out_dim)
                or hasattr(m, "qkv")]
    names = [(n, m) for n, m in block.named_modules() if isinstance(m, nn.Conv2d) and m.out_channels == out_dim]
    downsample = [m for n, m in names if "downsample" in n or "shortcut" in n]
    main = [m for n, m in names if m not in downsample]
    return downsample + main[-1:]


def prune_tuned_blocks(model: TunedModel, sample_shape: tuple[int, ...], config: PruneConfig) -> float:
    """Prune ``model``'s tuned block copies in place; returns the remaining fraction of their parameters."""
    import torch_pruning as tp

    if not 0 < config.ratio < 1:
        raise ConfigError(f"--prune must be between 0 and 1 (exclusive), got {config.ratio}")
    if config.norm not in ("l1", "l2") or config.scope not in ("local", "global"):
        raise ConfigError("--prune-norm must be l1 or l2 and --prune-scope local or global")
    if not model.tuned:
        raise ConfigError("--prune needs tuned blocks (a linear probe has none)")
    before = sum(p.numel() for p in model.tuned_blocks.parameters())
    device, dtype = placement(model.backbone.model)
    example = torch.zeros(2, *sample_shape, device=device, dtype=dtype)
    chain = _Chain(model)
    with torch.no_grad():
        h = model.backbone.run_blocks(example, model.start, model.first_trainable - 1)
    ignored: list[nn.Module] = [m for i in range(model.start, max(model.tuned) + 1) if i not in model.tuned
                                for m in [model.backbone.block(i)]]
    for i in model.tuned:
        block = model.tuned_blocks[str(i)]
        with torch.no_grad():
            out = block(h)
        ignored += _protected(block, h.ndim == 3, out.shape[-1] if h.ndim == 3 else out.shape[1])
        h = out
    was_training = model.training
    model.eval()
    with torch.inference_mode(False), torch.enable_grad():  # the dependency graph is traced with autograd
        pruner = tp.pruner.MetaPruner(chain, example, importance=tp.importance.MagnitudeImportance(
            p=1 if config.norm == "l1" else 2), pruning_ratio=config.ratio, ignored_layers=ignored,
            global_pruning=config.scope == "global")
        pruner.step()
    model.train(was_training)
    model.tuned_blocks.requires_grad_(True)
    return sum(p.numel() for p in model.tuned_blocks.parameters()) / before


def shapes(model: TunedModel) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in model.tuned_blocks.state_dict().items()}


def rebuild(model: TunedModel, sample_shape: tuple[int, ...], config: PruneConfig,
            expected: dict[str, list[int]]) -> None:
    """Re-prune fresh copies the way a saved task was pruned and check that every shape matches."""
    prune_tuned_blocks(model, sample_shape, config)
    got = shapes(model)
    if got != expected:
        bad = next(k for k in expected if got.get(k) != expected[k])
        raise TaskError(f"pruned task does not rebuild: {bad} is {got.get(bad)}, the task holds {expected[bad]}")
