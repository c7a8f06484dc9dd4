"""One optimiser step of a training run, and what it is made of: AdamW, the training forward (bridge, autocast,
channels_last), optionally compiled."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .config import TrainConfig
from .devices import autocast, compile_enabled, fused_adamw
from .loader import Loader, bridge
from .tuned import TunedModel



class Step:
    """One optimiser step: the loader's `bridge` without grads, the trainable part (or ``forward``, its DDP wrapper)
    under the precision's autocast, cross-entropy, AdamW, the cosine schedule. ``step(x, y)`` returns
    (loss × batch, correct) on the device, no host sync. With ``--compile`` the forward and loss run compiled
    (CUDA graphs on CUDA: mode reduce-overhead; one graph per batch size, so the short last batch has its own)."""

    def __init__(self, model: TunedModel, config: TrainConfig, device: torch.device, loader: Loader,
                 forward: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.opt = optimizer(model, config, device)
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.opt, T_max=max(1, config.epochs * loader.steps_per_epoch))
        self.forward = training_forward(model, config, device, bridge(loader, model), forward)
        self.loss = _loss_of(self.forward)
        if compile_enabled(config.compile, device):
            mode = "reduce-overhead" if device.type == "cuda" else None
            self.loss = torch.compile(self.loss, mode=mode, dynamic=False)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss, correct = self.loss(x, y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.sched.step()
        return torch.stack([loss.detach() * len(y), correct])


def _loss_of(forward: Callable[[torch.Tensor], torch.Tensor]):
    def loss(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = forward(x)
        return F.cross_entropy(logits.float(), y), (logits.argmax(1) == y).sum().float()

    return loss


def optimizer(model: TunedModel, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; the fused kernel on CUDA by default, or where ``config.fused`` asks."""
    params = [p for p in model.parameters() if p.requires_grad]
    return fused_adamw(params, config.lr, config.weight_decay, device, config.fused)


def training_forward(model: TunedModel, config: TrainConfig, device: torch.device,
                     to_input: Callable[[torch.Tensor], torch.Tensor],
                     forward: Callable[[torch.Tensor], torch.Tensor] | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """One training forward: ``to_input`` (the loader's `bridge`: the frozen bridge, or nothing) in float32 without
    grads, then the trainable part (or ``forward``, its DDP wrapper) under bf16 autocast when ``config.precision``
    asks, in channels_last when ``config.channels_last`` asks."""
    channels_last = device.type == "cuda" if config.channels_last is None else config.channels_last
    if channels_last:
        trainable_channels_last(model)

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            x = to_input(x)
        if channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, config.precision):
            return (forward or model.trainable_part)(x)

    return run


def trainable_channels_last(model: TunedModel) -> None:
    """The run's own tuned copies and head in channels_last (convolutions run fastest so with bf16 on GPUs; the
    frozen blocks between and after them take channels_last inputs as they are). Frozen modules are shared by
    every run on the backbone and never change, layout included: runs must not depend on their order."""
    model.tuned_blocks.to(memory_format=torch.channels_last)
    model.head.to(memory_format=torch.channels_last)
