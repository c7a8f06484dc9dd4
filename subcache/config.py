"""What one SubTuning run is told: `TrainConfig` (one field per `subcache train` option, defaults from the paper's
Table 2) and the check that refuses values training cannot use, before any work. The CLI takes its defaults from
here."""
from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import ConfigError


@dataclass(frozen=True)
class TrainConfig:
    """One SubTuning run. One field per `subcache train` option."""

    blocks: str = "none"  # `13`, `13-14`, `13,15`, `layer3.5`, or `none` (linear probe)
    epochs: int = 10
    lr: float = 1e-3
    weight_decay: float = 0.01
    batch_size: int = 256
    augment: str = "none"  # flip, crop, flip,crop or none — in feature space, on the device
    seed: int = 0
    limit: int | None = None  # seeded class-balanced subset of the training split (the low-data regime)
    eval_every: int = 0  # evaluate on the test split every k epochs (0: only at the end)
    device: str = "auto"  # auto | cpu | cuda
    loader: str = "auto"  # auto | memory | stream: stream when the split exceeds the memory budget
    precision: str = "fp32"  # fp32 | bf16 (autocast over the trainable part)
    channels_last: bool | None = None  # 4-D activations and weights in channels_last (None: on CUDA only)
    fused: bool | None = None  # fused AdamW kernel (None: on CUDA only; True on a device without one is an error)
    compile: str = "auto"  # auto | on | off: the training step through torch.compile (auto: where measured to pay)
    labels: str | None = None  # an extra label set of the cache (labels/NAME) instead of y
    siamese: bool = False  # head sees original + tuned features (paper §5.1)
    prune: float = 0.0  # channel-prune this fraction of the tuned blocks' inner channels before training (§5.2)
    prune_norm: str = "l1"  # l1 | l2 magnitude importance
    prune_scope: str = "local"  # local (per layer) | global (ranked across the tuned blocks)
    train_split: str = "train"
    test_split: str = "test"


def check_train_config(config: TrainConfig) -> None:
    """Refuse option values training cannot use, before any work."""
    if config.epochs <= 0 or config.batch_size <= 1:
        raise ConfigError("--epochs must be ≥ 1 and --batch-size ≥ 2 (BatchNorm needs two samples)")
    if not (math.isfinite(config.lr) and config.lr > 0):
        raise ConfigError(f"--lr must be a finite positive number, got {config.lr}")
    if not (math.isfinite(config.weight_decay) and config.weight_decay >= 0):
        raise ConfigError(f"--weight-decay must be a finite number ≥ 0, got {config.weight_decay}")
    if config.seed < 0:
        raise ConfigError(f"--seed must be ≥ 0, got {config.seed}")
    if not str(config.blocks).strip():
        raise ConfigError("--blocks is empty; give blocks (e.g. 13-14) or `none` for a linear probe")
