"""Connectors: small trainable maps from a student feature's shape to the teacher's.

A connector is sized from the shapes seen in ONE dry-run batch (see
:class:`kdkit.methods.feature_base.FeatureMethod`) and is a submodule of the
method, so the optimiser trains it together with the student; it is not part of
``method.student`` and is never exported.

=============================  =========================================================
student -> teacher             connector
=============================  =========================================================
(B, D) -> (B, D')              ``nn.Linear(D, D')``
(B, L, D) -> (B, L, D')        ``nn.Linear(D, D')`` on the last dimension (token features)
(B, C, H, W) -> (B, C', H, W)  1x1 ``nn.Conv2d(C, C')``
(B, C, H, W) -> (B, C', h, w)  spatial resize to (h, w) first, when ``resize=True``
same shape                     identity (``kind="auto"``), or a learned map (``"learned"``)
=============================  =========================================================
"""

from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import KdkitError

CONNECTOR_KINDS = ("auto", "learned", "none")


def _fmt(shape: Sequence[int]) -> str:
    return "(B, " + ", ".join(str(s) for s in shape[1:]) + ")"


def resize_to(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Resize (B, C, H, W) maps to ``size``: average pooling when shrinking both sides, bilinear otherwise."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    if x.shape[2] >= size[0] and x.shape[3] >= size[1]:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class Resize(nn.Module):
    """Spatial resize of (B, C, H, W) maps to a fixed (h, w) (no parameters)."""

    def __init__(self, size: Tuple[int, int]):
        super().__init__()
        self.size = tuple(size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return resize_to(x, self.size)

    def extra_repr(self) -> str:
        return f"size={self.size}"


def spatial_mismatch(student_shape: Sequence[int], teacher_shape: Sequence[int], where: str) -> KdkitError:
    return KdkitError(f"{where}: student features {_fmt(student_shape)} and teacher features "
                      f"{_fmt(teacher_shape)} differ in spatial size; set resize=true to interpolate the "
                      f"student's maps, or pick layers of equal size (see `kdkit inspect`)")


def make_connector(student_shape: Sequence[int], teacher_shape: Sequence[int], kind: str = "auto",
                   resize: bool = False, where: str = "connector") -> nn.Module:
    """A module mapping student features of ``student_shape`` to ``teacher_shape`` (batch dims ignored).

    Args:
        student_shape, teacher_shape: shapes from a dry run, batch dimension first.
        kind: ``"auto"`` (identity when the shapes already agree, else a learned map), ``"learned"``
            (always a linear / 1x1-conv map) or ``"none"`` (identity; a shape mismatch is an error).
        resize: allow a spatial resize of 4-D student maps to the teacher's H x W.
        where: prefix of error messages (the method and layer names).

    Raises:
        KdkitError: shapes that no connector of this kind can map.
    """
    if kind not in CONNECTOR_KINDS:
        raise KdkitError(f"{where}: connector must be one of {', '.join(CONNECTOR_KINDS)}; got {kind!r}")
    s, t = tuple(student_shape), tuple(teacher_shape)
    if len(s) != len(t):
        raise KdkitError(f"{where}: cannot map student features {_fmt(s)} to teacher features {_fmt(t)} "
                         f"(different number of dimensions); pick layers of the same kind (see `kdkit inspect`)")
    if kind == "none" or (kind == "auto" and s[1:] == t[1:]):
        if s[1:] != t[1:]:
            raise KdkitError(f"{where}: student features {_fmt(s)} do not match teacher features {_fmt(t)} and "
                             f"connector is 'none'; use connector: auto to learn a map")
        return nn.Identity()
    if len(s) == 2 or (len(s) == 3 and s[1] == t[1]):
        return nn.Linear(s[-1], t[-1])
    if len(s) == 4:
        layers = []
        if s[2:] != t[2:]:
            if not resize:
                raise spatial_mismatch(s, t, where)
            layers.append(Resize(t[2:]))
        layers.append(nn.Conv2d(s[1], t[1], kernel_size=1))
        return nn.Sequential(*layers) if len(layers) > 1 else layers[0]
    raise KdkitError(f"{where}: no connector maps student features {_fmt(s)} to teacher features {_fmt(t)}; "
                     f"supported: (B, D), (B, L, D) and (B, C, H, W)")


__all__ = ["CONNECTOR_KINDS", "Resize", "make_connector", "resize_to", "spatial_mismatch"]
