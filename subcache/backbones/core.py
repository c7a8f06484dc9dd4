"""The contract every backbone family meets: a stem, an ordered list of blocks 1..N, a neck and the original head,
addressed by block (index or module path, derived from the model's module tree); how images become its input
(`Preprocess`); its fingerprint; per-block facts (`describe_blocks`); and the two helpers every cut shares (a stage
transition run at the start of the next block, and the check that a cut reproduces the model's own forward)."""
from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from ..devices import placement
from ..errors import BlockError, UnknownModelError

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


class Fn(nn.Module):
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


def state_dict_sha256(model: nn.Module) -> str:
    """A fingerprint of the weights (names, shapes, dtypes and bytes of every tensor in the state dict)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


class _Lead(nn.Sequential):
    """A block run after the stage transition that precedes it (a downsample); named after the block."""

    def __init__(self, lead: nn.Module, block: nn.Module):
        super().__init__(lead, block)
        self.__dict__["named"] = block  # not a registered child: its parameters belong to index 1


def with_lead(lead: nn.Module | None, block: nn.Module) -> nn.Module:
    return block if lead is None or isinstance(lead, nn.Identity) else _Lead(lead, block)


@torch.inference_mode()
def checked(backbone: Backbone, net: nn.Module) -> Backbone:
    """A derived cut must reproduce the model's own forward; refuse it otherwise (checked once, at ≤ 64 px)."""
    size = min(backbone.preprocess.image_size, 64)
    x = torch.randn(1, 3, size, size)
    net.eval()
    if not torch.allclose(backbone(x), net(x), rtol=1e-4, atol=1e-5):
        raise UnknownModelError(f"{backbone.model_id}: stem + blocks + neck do not reproduce the model's forward; "
                                f"build a subcache.Backbone.from_modules(...) for it")
    return backbone


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
