"""Your own model: `--model package.module:factory` returns an nn.Module (cut like timm/torchvision models) or a
`Backbone` (`Backbone.from_modules(stem, blocks, neck, preprocess)`)."""
from __future__ import annotations

import importlib
from dataclasses import replace

from torch import nn

from ..errors import UnknownModelError
from ..trust import FACTORY
from .core import Backbone, Preprocess, state_dict_sha256
from .timm_models import cut_timm, timm_preprocess
from .torchvision_models import cut_torchvision
from .weights import apply_weights




def matches(model: str) -> bool:
    return FACTORY.fullmatch(model) is not None


def known() -> list[str]:
    return ["package.module:factory (your own model)"]


def load(spec: str, weights: str, image_size: int | None) -> Backbone:
    """``package.module:factory`` returns an nn.Module (cut like timm/torchvision models) or a Backbone. Weights:
    ``imagenet``/``default``/``none`` keep what the factory made; a file is loaded on top."""
    module_name, attr = spec.split(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise UnknownModelError(f"cannot load model factory {spec} ({exc}); the module must be importable "
                                f"(on PYTHONPATH) and define {attr}()") from None
    made = factory()
    if isinstance(made, Backbone):
        backbone, made.model_id = made, spec
    elif isinstance(made, nn.Module):
        made.eval()  # never build from batch statistics
        backbone = _cut_module(made, spec, timm_preprocess(made, image_size))
    else:
        raise UnknownModelError(f"{spec}() returned {type(made).__name__}; it must return an nn.Module or a "
                                f"subcache.Backbone (Backbone.from_modules(stem, blocks, neck, preprocess))")
    if weights not in ("imagenet", "default", "none"):
        backbone.weights_id = apply_weights(backbone.model, weights, spec)
    else:
        backbone.weights_id = "factory"
    backbone.weights_sha256 = state_dict_sha256(backbone.model)
    if image_size is not None:
        backbone.preprocess = replace(backbone.preprocess, image_size=image_size)
    return backbone


def _cut_module(net: nn.Module, model_id: str, pre: Preprocess) -> Backbone:
    if type(net).__module__.startswith("timm."):
        return cut_timm(net, model_id, "factory", pre)
    return cut_torchvision(net, model_id, "factory", pre)
