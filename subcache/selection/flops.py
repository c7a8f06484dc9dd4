"""FLOP accounting shared by every selection method and the benchmarks: forward FLOPs per block
(torch.utils.flop_counter), a training step's FLOPs from images and from the cache, a whole profile's."""
from __future__ import annotations

import torch

from ..backbones import Backbone, describe_blocks
from ..devices import placement



@torch.inference_mode()
def forward_flops(backbone: Backbone) -> tuple[int, list[int], int]:
    """Forward FLOPs per image of the stem, of each block, and of the neck (torch.utils.flop_counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    size = backbone.preprocess.image_size
    device, dtype = placement(backbone.model)
    x = torch.zeros(1, 3, size, size, device=device, dtype=dtype)
    with FlopCounterMode(display=False) as stem:
        h = backbone.stem(x)
    h = backbone.run_blocks(h, 1, backbone.num_blocks)
    with FlopCounterMode(display=False) as neck:
        backbone.neck(h)
    return stem.get_total_flops(), [b.flops for b in describe_blocks(backbone)], neck.get_total_flops()


def training_flops(backbone: Backbone, window: tuple[int, ...]) -> tuple[int, int]:
    """FLOPs of one training step per image for a window: (from images, from the cache).

    Backward ≈ 2× forward for the tuned blocks (input and weight gradients) and 1× for the frozen blocks after
    them (input gradients only); the prefix runs forward only. (FlopCounterMode itself counts a grouped conv's
    backward as dense, so it cannot be used on the backward of depthwise blocks.)"""
    prefix, step, _ = window_flops(forward_flops(backbone), window)
    return prefix + step, step


def window_flops(flops: tuple[int, list[int], int], window: tuple[int, ...]) -> tuple[int, int, int]:
    """Per image, from `_forward_flops`: (the forward up to the window's input, a training step from there (see
    `training_flops`), a forward from there to the logits)."""
    stem, blocks, neck = flops
    first, last = window[0], window[-1]
    tuned, rest = sum(blocks[first - 1:last]), sum(blocks[last:]) + neck
    return stem + sum(blocks[:first - 1]), 3 * tuned + 2 * rest, tuned + rest


def profile_flops(backbone: Backbone, wins: list[tuple[int, ...]], epochs: int, n_train: int,
                  n_test: int) -> tuple[int, int]:
    """FLOPs of a whole profile, (from images, from the cache): every window's training steps (see
    `training_flops`) and one test pass per window. The cache's side also pays, once per item of both splits, the
    forward up to the last window's input: its build (to the cached layer) and the bank (the frozen blocks on)."""
    flops = forward_flops(backbone)
    from_cache = (n_train + n_test) * window_flops(flops, (max(w[0] for w in wins),))[0]
    from_images = 0
    for w in wins:
        prefix, step, forward = window_flops(flops, w)
        from_images += epochs * n_train * (prefix + step) + n_test * (prefix + forward)
        from_cache += epochs * n_train * step + n_test * forward
    return from_images, from_cache
