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

:class:`Mix` is the other kind: mixup / CutMix on top of (optional) crop/flip, the views of *function
matching* (Beyer et al., "Knowledge distillation: A good teacher is patient and consistent", CVPR 2022).
Its mixing weights are drawn afresh every step, so the set of views is unbounded and no teacher cache can
hold them: the teacher runs live on every mixed batch (:mod:`kdkit.teacher.plan` decides so). The draws are
a pure function of ``(seed, epoch, step)``, so a resumed run replays exactly the views an uninterrupted one
saw.
"""

from __future__ import annotations

from typing import Dict, Optional, Union

import numpy as np
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

    def batch(self, batch: Dict[str, torch.Tensor], epoch: int, step: int = 0) -> Dict[str, torch.Tensor]:
        """Augment a training batch for ``epoch`` (``step`` is unused: a view depends on the sample and the
        epoch only); adds ``view`` and the cache row ``cache_index``."""
        index = batch["index"]
        view = self.view_of(index, epoch)
        return dict(batch, x=self.apply(batch["x"], index, view), view=view.to(batch["x"].device),
                    cache_index=index * self.views + view)


class Mix:
    """Mixup and/or CutMix of every training batch, on top of an optional :class:`CropFlip`: the consistent,
    aggressive views of function matching (Beyer et al., CVPR 2022, Sec. 3: teacher and student see the *same*
    mixed image; the loss is the KL divergence to the teacher on that image, no labels).

    Sample ``i`` of a batch is mixed with its neighbour ``(i + 1) mod B`` (the loader shuffles every epoch, so
    the partner is a random image; Beyer et al.'s ``big_vision`` code rolls the batch the same way). Per sample:

    - mixup (Zhang et al., ICLR 2018): ``x_i' = lam_i · x_i + (1 - lam_i) · x_partner``, ``lam_i ~ Beta(mixup, mixup)``;
    - CutMix (Yun et al., ICCV 2019): a box of ``sqrt(1 - lam_i)`` of the height and width, centred at a uniform
      position and clipped to the image, is pasted from the partner; ``lam_i`` becomes the share of pixels kept.

    With both on, each sample takes CutMix with probability 1/2, else mixup. Every draw comes from one NumPy
    generator seeded by ``(seed, epoch, step)``. Mixed images have no single label, so the batch loses ``y``
    (the method sees an unlabelled batch: for ``kd``, the soft term alone) and any cache row.

    Args:
        mixup: Beta concentration of mixup weights (1.0: uniform, the paper's choice); 0 turns mixup off.
        cutmix: Beta concentration of CutMix areas; 0 turns CutMix off.
        crop_flip: applied to each image before mixing (None: no crop/flip); its crop is a pure function of
            ``(seed, sample, epoch)``, different every epoch (its ``views`` are not used).
        seed: the run's seed.
    """

    #: The views are not a finite set: a teacher cache cannot be used (see :func:`kdkit.teacher.plan.cache_plan`).
    not_cacheable = ("the training batches are mixed (mixup/cutmix) with weights drawn afresh every step, an "
                     "unbounded set of views, so the teacher must run live on each one (function matching)")

    def __init__(self, mixup: float = 1.0, cutmix: float = 0.0, crop_flip: Optional[CropFlip] = None, seed: int = 0):
        if mixup < 0 or cutmix < 0 or (mixup == 0 and cutmix == 0):
            raise ValueError(f"mixup and cutmix must be >= 0 and one of them > 0; got mixup={mixup}, cutmix={cutmix}")
        self.mixup, self.cutmix, self.crop_flip, self.seed = float(mixup), float(cutmix), crop_flip, seed

    def __repr__(self) -> str:
        return f"Mix(mixup={self.mixup:g}, cutmix={self.cutmix:g}, crop_flip={self.crop_flip!r}, seed={self.seed})"

    def params(self, batch_size: int, height: int, width: int, epoch: int, step: int) -> Dict[str, torch.Tensor]:
        """The draws of one step: ``lam`` (B,) float64 weight of each sample's own image, ``cutmix`` (B,) bool,
        and the box ``top, bottom, left, right`` (B,) of the pasted region (empty for mixup samples)."""
        rng = np.random.default_rng([self.seed, epoch, step, 0x4B444B])  # a pure function of (seed, epoch, step)
        if self.mixup > 0 and self.cutmix > 0:
            use_cut = rng.random(batch_size) < 0.5
        else:
            use_cut = np.full(batch_size, self.cutmix > 0)
        # Order of draws: (the choice, with both on), mixup weights, CutMix areas, box centres.
        lam_mix = rng.beta(max(self.mixup, 1e-6), max(self.mixup, 1e-6), batch_size)
        lam_cut = rng.beta(max(self.cutmix, 1e-6), max(self.cutmix, 1e-6), batch_size)
        lam = np.where(use_cut, lam_cut, lam_mix)
        cy, cx = rng.integers(0, height, batch_size), rng.integers(0, width, batch_size)
        half_h = np.floor(height * np.sqrt(1.0 - lam) / 2).astype(np.int64)
        half_w = np.floor(width * np.sqrt(1.0 - lam) / 2).astype(np.int64)
        top, bottom = np.clip(cy - half_h, 0, height), np.clip(cy + half_h, 0, height)
        left, right = np.clip(cx - half_w, 0, width), np.clip(cx + half_w, 0, width)
        top, bottom = np.where(use_cut, top, 0), np.where(use_cut, bottom, 0)
        left, right = np.where(use_cut, left, 0), np.where(use_cut, right, 0)
        # CutMix: the weight is the share of pixels the sample keeps once the box is clipped (Yun et al., Alg. 1).
        lam = np.where(use_cut, 1.0 - (bottom - top) * (right - left) / (height * width), lam)
        as_t = torch.from_numpy
        return {"lam": as_t(lam), "cutmix": as_t(use_cut), "top": as_t(top), "bottom": as_t(bottom),
                "left": as_t(left), "right": as_t(right)}

    def mix(self, x: torch.Tensor, p: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Mix ``x`` (B, C, H, W) with its rolled copy by the draws ``p`` of :meth:`params`."""
        partner = x.roll(-1, dims=0)  # sample i with sample i + 1
        dev = x.device
        lam = p["lam"].to(dev, x.dtype)[:, None, None, None]  # (B, 1, 1, 1)
        rows = torch.arange(x.shape[2], device=dev)[None, :]  # (1, H)
        cols = torch.arange(x.shape[3], device=dev)[None, :]  # (1, W)
        in_rows = (rows >= p["top"].to(dev)[:, None]) & (rows < p["bottom"].to(dev)[:, None])  # (B, H)
        in_cols = (cols >= p["left"].to(dev)[:, None]) & (cols < p["right"].to(dev)[:, None])  # (B, W)
        box = (in_rows[:, :, None] & in_cols[:, None, :])[:, None]  # (B, 1, H, W)
        mixed = lam * x + (1 - lam) * partner
        cut = torch.where(box, partner, x)
        return torch.where(p["cutmix"].to(dev)[:, None, None, None], cut, mixed)

    def batch(self, batch: Dict[str, torch.Tensor], epoch: int, step: int = 0) -> Dict[str, torch.Tensor]:
        """The mixed view of a training batch at ``(epoch, step)``: ``x`` replaced, ``y`` and cache rows dropped,
        ``mix_lam`` (B,) added (each sample's own share)."""
        x = batch["x"]
        if self.crop_flip is not None:
            index = batch["index"]
            # A fresh crop every epoch (view number = epoch, not one of a few stored views): nothing is cached here.
            x = self.crop_flip.apply(x, index, torch.full_like(index, epoch))
        p = self.params(x.shape[0], x.shape[2], x.shape[3], epoch, step)
        out = {k: v for k, v in batch.items() if k not in ("x", "y", "view", "cache_index")}
        out["x"] = self.mix(x, p)
        out["mix_lam"] = p["lam"].to(x.device, torch.float32)
        return out


class AugmentedData(ArrayData):
    """An :class:`ArrayData` whose training batches are augmented by ``augment`` (see the module docstring).

    ``augmented`` is True, so a teacher cache stores one output per (sample, view) instead of refusing.
    """

    augmented = True

    def __init__(self, x: torch.Tensor, y: Optional[torch.Tensor], augment: Union[CropFlip, Mix]):
        if x.dim() != 4:
            raise ValueError(f"crop/flip and mixing augmentation need images (N, C, H, W); got shape {tuple(x.shape)}")
        super().__init__(x, y)
        self.augment = augment

    @property
    def transform_description(self) -> str:
        return repr(self.augment)


def augment_train(train, cfg, seed: int, dataset: str):
    """The training split as ``data:`` asks: crop/flip (replayable, cacheable) and/or mixup/CutMix (function
    matching, live teacher); unchanged when none is asked for.

    Raises:
        KdkitError: augmentation asked for a dataset that is not in-memory images (N, C, H, W).
    """
    from ..errors import KdkitError

    mixing = cfg.mixup > 0 or cfg.cutmix > 0
    if cfg.augment is None and not mixing:
        return train
    asked = ", ".join([f"data.augment={cfg.augment}"] * (cfg.augment is not None)
                      + [f"data.mixup={cfg.mixup:g}"] * (cfg.mixup > 0)
                      + [f"data.cutmix={cfg.cutmix:g}"] * (cfg.cutmix > 0))
    if not isinstance(train, ArrayData) or train.x.dim() != 4:
        raise KdkitError(f"{asked} needs an in-memory image dataset (N, C, H, W); dataset {dataset!r} is not one")
    crop = CropFlip(cfg.augment_pad, True, cfg.augment_views, seed) if cfg.augment == "crop_flip" else None
    return AugmentedData(train.x, train.y, Mix(cfg.mixup, cfg.cutmix, crop, seed) if mixing else crop)
