"""timm: `--model timm:NAME` — a `blocks` sequence (EfficientNet, MobileNet, ViT) or `feature_info` stages expanded
into their blocks (ResNet, ConvNeXt, RegNet, …)."""
from __future__ import annotations

from torch import nn

from ..errors import UnknownModelError, WeightsError
from .core import Backbone, Fn, Preprocess, checked, with_lead
from .weights import apply_weights

PREFIX = "timm:"


def matches(model: str) -> bool:
    return model.startswith(PREFIX)


def known() -> list[str]:
    return ["timm:NAME (any timm model with blocks or stages)"]


def load(model: str, weights: str, image_size: int | None) -> Backbone:
    import timm

    name = model.removeprefix("timm:")
    if name not in timm.list_models(name):
        raise UnknownModelError(f"unknown timm model {name!r}; see timm.list_models()")
    kwargs = {"img_size": image_size} if image_size is not None and _takes_img_size(name) else {}
    if weights in ("imagenet", "default"):
        try:
            net = timm.create_model(name, pretrained=True, **kwargs)
        except Exception as exc:  # noqa: BLE001 - offline hub failures come in many types
            raise WeightsError(f"timm weights for {name} are not available offline ({type(exc).__name__}); put "
                               f"them in the Hugging Face cache or pass --weights none|PATH") from None
        weights_id = f"timm:{net.pretrained_cfg.get('tag') or 'default'}"
    else:
        net = timm.create_model(name, pretrained=False, **kwargs)
        weights_id = apply_weights(net, weights, model)
    return cut_timm(net, model, weights_id, timm_preprocess(net, image_size))


def timm_preprocess(net: nn.Module, image_size: int | None) -> Preprocess:
    """timm's own data config for the model (`resolve_model_data_config`: its pretrained config, else timm's
    defaults)."""
    from timm.data import resolve_model_data_config

    cfg = resolve_model_data_config(net)
    return Preprocess(image_size or cfg["input_size"][-1], tuple(cfg["mean"]), tuple(cfg["std"]), cfg["crop_pct"],
                      cfg["interpolation"])


def cut_timm(net: nn.Module, model_id: str, weights_id: str, pre: Preprocess) -> Backbone:
    """A `blocks` sequence (EfficientNet, MobileNet, ViT) or, by timm's `feature_info`, stages (ResNet, ConvNeXt,
    RegNet, …) expanded into their blocks."""
    if isinstance(getattr(net, "blocks", None), nn.Sequential | nn.ModuleList):
        return timm_backbone(net, model_id, weights_id, pre)
    names = [f["module"] for f in getattr(net, "feature_info", [])]
    stages = [net.get_submodule(n) for n in names if n != "act1" and not n.startswith("stem")]
    if not stages:
        raise UnknownModelError(f"timm model {model_id} has neither `blocks` nor `feature_info` stages")
    blocks = [b for stage in stages for b in _stage_blocks(stage)]
    if hasattr(net, "stem"):
        stem = Fn(net, lambda m, x: m.stem(x), "stem")
    elif all(hasattr(net, a) for a in ("conv1", "bn1", "act1", "maxpool")):
        stem = Fn(net, lambda m, x: m.maxpool(m.act1(m.bn1(m.conv1(x)))), "conv1, bn1, act1, maxpool")
    else:
        raise UnknownModelError(f"timm model {model_id} has an unsupported stem (no `stem` or conv1…maxpool)")
    post = nn.Sequential(*[getattr(net, a) for a in ("final_conv", "norm_pre") if hasattr(net, a)])
    neck = Fn(net, lambda m, x: m.forward_head(post(x), pre_logits=True), "forward_head")
    backbone = Backbone(net, stem, blocks, neck, net.get_classifier(), model_id=model_id, weights_id=weights_id,
                        preprocess=pre)
    return checked(backbone, net)


def _stage_blocks(stage: nn.Module) -> list[nn.Module]:
    """A stage's blocks in forward order; what runs before its `blocks` (a downsample) joins the first block."""
    inner = getattr(stage, "blocks", None)
    if not isinstance(inner, nn.Sequential | nn.ModuleList):
        return list(stage.children())
    lead = [m for name, m in stage.named_children() if name != "blocks"]
    first = with_lead(lead[0] if len(lead) == 1 else (nn.Sequential(*lead) if lead else None), inner[0])
    return [first, *list(inner)[1:]]


def _takes_img_size(name: str) -> bool:
    """Patch-based timm models fix their token grid at creation; conv nets take any size."""
    import timm

    return timm.get_pretrained_cfg(name) is not None and timm.get_pretrained_cfg(name).fixed_input_size


def timm_backbone(net: nn.Module, model_id: str, weights_id: str, pre: Preprocess) -> Backbone:
    blocks = [b for stage in net.blocks for b in (stage if isinstance(stage, nn.Sequential) else [stage])]
    if hasattr(net, "conv_stem"):
        stem = Fn(net, lambda m, x: m.bn1(m.conv_stem(x)), "conv_stem, bn1")
    elif hasattr(net, "patch_embed"):
        stem = Fn(net, lambda m, x: m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x)))), "patch_embed, pos")
    else:
        raise UnknownModelError(f"timm model {model_id} has an unsupported stem (no conv_stem or patch_embed)")
    from timm.models.efficientnet import EfficientNet

    if isinstance(net, EfficientNet):  # forward_features ends with conv_head, bn2
        neck = Fn(net, lambda m, x: m.forward_head(m.bn2(m.conv_head(x)), pre_logits=True), "conv_head, bn2, pool")
    elif hasattr(net, "patch_embed"):  # ViT: final norm, then pool/class token
        neck = Fn(net, lambda m, x: m.forward_head(m.norm(x), pre_logits=True), "norm, pool")
    else:  # e.g. MobileNetV3: pooling and conv_head live in forward_head
        neck = Fn(net, lambda m, x: m.forward_head(x, pre_logits=True), "forward_head")
    return Backbone(net, stem, blocks, neck, net.get_classifier(), model_id=model_id, weights_id=weights_id,
                    preprocess=pre)
