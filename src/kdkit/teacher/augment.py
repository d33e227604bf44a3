"""Random augmentation that a teacher-output cache can replay exactly (FKD-style views).

Random augmentation and a teacher-output cache seem to clash: the teacher would see a new view of each
image every epoch. FKD (Shen & Xing, "A Fast Knowledge Distillation Framework for Visual Recognition",
ECCV 2022) resolves it by storing, per sample, a fixed number of augmented views together with the
parameters that made them, and replaying exactly one stored view to the student whenever the sample comes
up. Here the parameters are never stored at all: they are a pure function of ``(seed, sample index,
view)``, so any process can recompute them, and the cache holds one teacher output per ``(sample, view)``
(row ``index * views + view``).

:class:`CropFlip` is the augmentation: random crop of a zero-padded image (shift by up to ``pad`` pixels)
plus a random horizontal flip, done on whole batches with tensor indexing (no per-sample Python).
:class:`AugmentedData` is an in-memory dataset that carries it; the engine applies it to every training
batch (picking each sample's view for the epoch from ``(seed, epoch, index)``) and puts the view and the
cache row in the batch (``batch["view"]``, ``batch["cache_index"]``), so the student and the teacher (live
or cached) always see the same view.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F

from ..data.core import ArrayData

_MASK = 0x7FFFFFFF


def _mix(a: torch.Tensor) -> torch.Tensor:
    """A deterministic integer hash of int64 tensors into [0, 2^31) (two LCG rounds; no overflow in int64)."""
    a = a & _MASK
    for _ in range(2):
        a = ((a * 1103515245 + 12345) & _MASK) ^ (a >> 7)
    return a


class CropFlip:
    """Random crop with zero padding (shifts of up to ``pad`` pixels) and a random horizontal flip.

    Args:
        pad: padding in pixels on each side; the crop is taken at offsets 0..2·pad.
        flip: also flip horizontally with probability 1/2.
        views: how many distinct views each sample has (what a teacher cache stores per sample).
        seed: seed of every random choice.
    """

    def __init__(self, pad: int = 2, flip: bool = True, views: int = 8, seed: int = 0):
        if pad < 0 or views < 1:
            raise ValueError(f"pad must be >= 0 and views >= 1; got pad={pad}, views={views}")
        self.pad, self.flip, self.views, self.seed = pad, flip, views, seed

    def __repr__(self) -> str:
        return f"CropFlip(pad={self.pad}, flip={self.flip}, views={self.views}, seed={self.seed})"

    def view_of(self, index: torch.Tensor, epoch: int) -> torch.Tensor:
        """Which stored view each sample shows in ``epoch``: (B,) in [0, views)."""
        return _mix(index.long() * 40503 + epoch * 2654435 + self.seed * 97) % self.views

    def params(self, index: torch.Tensor, view: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The crop offsets ``dy``, ``dx`` and the ``flip`` flag of each (sample, view): (B,) each."""
        h = _mix(index.long() * 7919 + view.long() * 104729 + self.seed * 15485863)
        span = 2 * self.pad + 1
        flip = (h // (span * span)) % 2 == 1 if self.flip else torch.zeros_like(h, dtype=torch.bool)
        return {"dy": h % span, "dx": (h // span) % span, "flip": flip}

    def apply(self, x: torch.Tensor, index: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
        """The views ``view`` of samples ``index``: x (B, C, H, W) -> (B, C, H, W)."""
        p = self.params(index.to(x.device), view.to(x.device))
        b, _, h, w = x.shape
        xp = F.pad(x, (self.pad, self.pad, self.pad, self.pad)) if self.pad else x
        rows = p["dy"][:, None] + torch.arange(h, device=x.device)  # (B, H)
        cols = p["dx"][:, None] + torch.arange(w, device=x.device)  # (B, W)
        bi = torch.arange(b, device=x.device)[:, None, None]
        out = xp[bi, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)  # (B, H, W, C) -> (B, C, H, W)
        return torch.where(p["flip"][:, None, None, None], out.flip(-1), out).contiguous()

    def batch(self, batch: Dict[str, torch.Tensor], epoch: int) -> Dict[str, torch.Tensor]:
        """Augment a training batch for ``epoch``; adds ``view`` and the cache row ``cache_index``."""
        index = batch["index"]
        view = self.view_of(index, epoch)
        return dict(batch, x=self.apply(batch["x"], index, view), view=view.to(batch["x"].device),
                    cache_index=index * self.views + view)


class AugmentedData(ArrayData):
    """An :class:`ArrayData` whose training batches are augmented by ``augment`` (see the module docstring).

    ``augmented`` is True, so a teacher cache stores one output per (sample, view) instead of refusing.
    """

    augmented = True

    def __init__(self, x: torch.Tensor, y: Optional[torch.Tensor], augment: CropFlip):
        if x.dim() != 4:
            raise ValueError(f"crop/flip augmentation needs images (N, C, H, W); got shape {tuple(x.shape)}")
        super().__init__(x, y)
        self.augment = augment

    @property
    def transform_description(self) -> str:
        return repr(self.augment)
