"""torchvision classifiers: ResNets (layer1-4), ViTs (encoder layers) and any model with a `features` sequence
(ConvNeXt, MobileNet, EfficientNet, …). Weights: the enum's file from the local torch hub cache, offline."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..errors import UnknownModelError, WeightsError
from .core import IMAGENET_MEAN, IMAGENET_STD, Backbone, Fn, Preprocess, checked, with_lead
from .weights import apply_weights

TORCHVISION_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2")


TORCHVISION_VITS = ("vit_b_16", "vit_b_32", "vit_l_16")



def matches(model: str) -> bool:
    return model in torchvision_names()


def known() -> list[str]:
    return [*TORCHVISION_RESNETS, *TORCHVISION_VITS, "other torchvision classifiers with `features` (convnext_tiny, "
            "mobilenet_v3_small, efficientnet_b0, …)"]


def torchvision_names() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def _torchvision_weights(model: str, weights: str):
    from torchvision.models import get_model_weights

    enum = get_model_weights(model)
    if weights in ("imagenet", "default"):
        return enum.DEFAULT
    try:
        return enum[weights]
    except KeyError:
        raise WeightsError(f"unknown weights {weights!r} for {model}; use imagenet, none, a file, or one of "
                           f"{', '.join(w.name for w in enum)}") from None


def _hub_file(url: str) -> Path:
    return Path(torch.hub.get_dir(), "checkpoints", os.path.basename(url))


def load(model: str, weights: str, image_size: int | None) -> Backbone:
    import torchvision

    is_file_or_none = weights == "none" or Path(weights).suffix in (".pth", ".pt", ".safetensors")
    enum = None if is_file_or_none else _torchvision_weights(model, weights)
    native = 224
    kwargs = {}
    if model in TORCHVISION_VITS:
        if enum is not None and image_size not in (None, enum.meta["min_size"][0]):
            raise WeightsError(f"{model} with {enum.name} weights needs --image-size {enum.meta['min_size'][0]}")
        kwargs["image_size"] = image_size or (enum.meta["min_size"][0] if enum is not None else native)
    net = getattr(torchvision.models, model)(weights=None, **kwargs)
    if enum is None:
        weights_id = apply_weights(net, weights, model)
        pre = Preprocess(image_size or native, IMAGENET_MEAN, IMAGENET_STD, 0.875)
    else:
        path = _hub_file(enum.url)
        if not path.is_file():
            raise WeightsError(f"{model} {enum.name} weights are not available offline: place "
                               f"{path.name} in {path.parent} (from {enum.url}) or pass --weights none|PATH")
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        weights_id = f"torchvision:{enum.name}"
        t = enum.transforms()
        pre = Preprocess(image_size or t.crop_size[0], tuple(t.mean), tuple(t.std), t.crop_size[0] / t.resize_size[0])
    return cut_torchvision(net, model, weights_id, pre)


def cut_torchvision(net: nn.Module, model_id: str, weights_id: str, pre: Preprocess) -> Backbone:
    """ViT (encoder layers), ResNet (layer1-4) or a `features` + `classifier` model (ConvNeXt, MobileNet, …)."""
    if hasattr(net, "encoder") and hasattr(net, "class_token"):
        return Backbone(net, Fn(net, _tv_vit_stem, "vit stem"), list(net.encoder.layers),
                        Fn(net, _tv_vit_neck, "ln, class token"), net.heads,
                        model_id=model_id, weights_id=weights_id, preprocess=pre)
    if all(hasattr(net, a) for a in ("layer1", "layer4", "fc")):
        blocks = [b for layer in (net.layer1, net.layer2, net.layer3, net.layer4) for b in layer]
        return Backbone(net, Fn(net, _resnet_stem, "conv1, bn1, relu, maxpool"), blocks,
                        Fn(net, _resnet_neck, "avgpool, flatten"), net.fc,
                        model_id=model_id, weights_id=weights_id, preprocess=pre)
    if isinstance(getattr(net, "features", None), nn.Sequential) and isinstance(getattr(net, "classifier", None),
                                                                               nn.Sequential):
        return checked(_features_backbone(net, model_id, weights_id, pre), net)
    raise UnknownModelError(f"cannot cut {model_id} ({type(net).__name__}) into blocks: no ViT encoder, ResNet "
                            f"layers or `features` sequence; build a subcache.Backbone.from_modules(...) instead")


def is_layer(m: nn.Module) -> bool:
    """A plain sequence of single layers (conv-norm-act, a downsample) rather than a stage of blocks."""
    return isinstance(m, nn.Sequential) and all(not list(c.children()) for c in m)


def _features_backbone(net: nn.Module, model_id: str, weights_id: str, pre: Preprocess) -> Backbone:
    """torchvision's `features` models: features[0] is the stem, a trailing conv-norm-act joins the neck, stages
    are expanded into their blocks, and a downsample between stages runs at the start of the next block."""
    items = list(net.features)
    stem, items = items[0], items[1:]
    tail = items.pop() if items and is_layer(items[-1]) else nn.Identity()
    blocks, lead = [], None
    for item in items:
        if is_layer(item):
            lead = item
            continue
        for block in (item if isinstance(item, nn.Sequential) else [item]):
            blocks.append(with_lead(lead, block))
            lead = None
    if not blocks:
        raise UnknownModelError(f"{model_id} has no blocks in its `features`; build a Backbone.from_modules(...)")
    return Backbone(net, Fn(net, lambda m, x: stem(x), "features.0"), blocks,
                    Fn(net, lambda m, x: _tv_pre_logits(m, tail(x)), "last conv, avgpool, classifier[:-1]"),
                    net.classifier[-1], model_id=model_id, weights_id=weights_id, preprocess=pre)


def _tv_pre_logits(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = m.avgpool(x)
    if not any(isinstance(c, nn.Flatten) for c in m.classifier):
        x = torch.flatten(x, 1)
    return m.classifier[:-1](x)


def _resnet_stem(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return m.maxpool(m.relu(m.bn1(m.conv1(x))))


def _resnet_neck(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.flatten(m.avgpool(x), 1)


def _tv_vit_stem(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = m._process_input(x)  # (B, T, D)
    x = torch.cat([m.class_token.expand(x.shape[0], -1, -1), x], dim=1)
    return m.encoder.dropout(x + m.encoder.pos_embedding)


def _tv_vit_neck(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return m.encoder.ln(x)[:, 0]
