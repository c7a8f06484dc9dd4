"""The model trained on a cache: frozen bridge → tuned block copies → frozen tail → frozen neck → new head."""
from __future__ import annotations

import copy

import torch
from torch import nn

from .backbones import Backbone
from .devices import placement


class TunedModel(nn.Module):
    """SubTuning model fed with activations at the input of block ``start``.

    Blocks ``start..N`` run in order; those in ``tuned`` are trainable copies (train mode while training), the
    rest are the backbone's own frozen blocks (always eval mode, no parameter grads; gradients still flow through
    the ones after a tuned block). With ``siamese`` the head also sees the original backbone's features.
    """

    def __init__(self, backbone: Backbone, start: int, tuned: tuple[int, ...], num_classes: int,
                 sample_shape: tuple[int, ...], siamese: bool = False):
        super().__init__()
        self.backbone, self.start, self.tuned, self.siamese = backbone, start, tuple(tuned), siamese
        self.tuned_blocks = nn.ModuleDict({str(i): copy.deepcopy(backbone.block(i)).requires_grad_(True)
                                           for i in self.tuned})
        device, dtype = placement(backbone.model)
        with torch.no_grad():  # in eval mode: a dummy pass must not touch the tuned copies' BatchNorm statistics
            self.tuned_blocks.eval()
            dim = self._features(torch.zeros(2, *sample_shape, device=device, dtype=dtype), self.start).shape[-1]
            self.tuned_blocks.train()
        # initialised on the CPU (the same seed gives the same head on every device), then moved to the backbone's
        self.head = nn.Linear(dim * (2 if siamese else 1), num_classes).to(device)

    @property
    def first_trainable(self) -> int:
        """First block with trainable weights (N + 1 for a linear probe)."""
        return min(self.tuned) if self.tuned else self.backbone.num_blocks + 1

    def block(self, index: int) -> nn.Module:
        return self.tuned_blocks[str(index)] if index in self.tuned else self.backbone.block(index)

    def _run(self, h: torch.Tensor, first: int, last: int) -> torch.Tensor:
        for i in range(first, last + 1):
            h = self.block(i)(h)
        return h

    def _features(self, h: torch.Tensor, first: int) -> torch.Tensor:
        return self.backbone.neck(self._run(h, first, self.backbone.num_blocks))

    def frozen_part(self, h: torch.Tensor) -> torch.Tensor:
        """Cached input → input of the first tuned block (or, for a probe, the feature vector). No grads needed."""
        if not self.tuned:
            return self.backbone.neck(self.backbone.run_blocks(h, self.start, self.backbone.num_blocks))
        return self.backbone.run_blocks(h, self.start, self.first_trainable - 1)

    def trainable_part(self, h: torch.Tensor) -> torch.Tensor:
        """Output of `frozen_part` → logits."""
        if not self.tuned:
            return self.head(h)
        features = self._features(h, self.first_trainable)
        if self.siamese:  # the original branch: same input, the backbone's own blocks
            features = torch.cat([features, self.backbone.features(h, self.first_trainable - 1)], dim=-1)
        return self.head(features)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            h = self.frozen_part(h)
        return self.trainable_part(h)

    def train(self, mode: bool = True) -> "TunedModel":
        super().train(mode)
        self.backbone.eval()  # frozen parts never leave eval mode: their BatchNorm statistics never move
        return self

    def task_state(self) -> dict[str, torch.Tensor]:
        """Only what the task owns: tuned block copies and the head."""
        return {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()
                if not k.startswith("backbone.")}

    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)
