"""Attention transfer (Zagoruyko & Komodakis, ICLR 2017)."""

from __future__ import annotations

from typing import List

import torch
from torch import nn

from ..losses import at_loss
from .base import METHODS
from .connectors import resize_to, spatial_mismatch
from .feature_base import FeatureMethod


@METHODS.register("at")
class AttentionTransfer(FeatureMethod):
    """Activation-based attention transfer (Zagoruyko & Komodakis, ICLR 2017, "Paying More Attention to
    Attention: Improving the Performance of Convolutional Neural Networks via Attention Transfer").

    ``loss = ce_weight · CE + kd_weight · KD + beta · Σ_pairs at_loss(f_s, f_t)`` with
    :func:`kdkit.losses.at_loss` (unit-norm maps ``mean_c |f|^p``). Channel counts may differ, so no
    connector is needed; by default one layer pair per spatial size both networks share (the paper pairs
    the outputs of residual groups).

    Args:
        student_layer, teacher_layer: (B, C, H, W) layers, or lists of them.
        p: exponent of the attention map (paper: 2).
        resize: resize student maps to the teacher's spatial size when they differ (else an error).
        beta: weight (paper: 1000).
        ce_weight, kd_weight, temperature: see :class:`~kdkit.methods.feature_base.FeatureMethod`.
    """

    feature_kind = "map"
    per_resolution = True
    part = "at"

    def __init__(self, student: nn.Module, teacher, p: float = 2.0, resize: bool = False, beta: float = 1000.0,
                 **kwargs):
        super().__init__(student, teacher, beta=beta, **kwargs)  # layers, ce/kd weights: FeatureMethod's
        self.p, self.resize = p, resize
        for s, t, sl, tl in zip(self.student_shapes, self.teacher_shapes, self.student_layers, self.teacher_layers):
            if s[2:] != t[2:] and not resize:
                raise spatial_mismatch(s, t, f"at {sl}->{tl}")

    def feature_loss(self, student_features: List[torch.Tensor], teacher_features: List[torch.Tensor]) -> torch.Tensor:
        return sum(at_loss(resize_to(s, t.shape[2:]), t, self.p) for s, t in zip(student_features, teacher_features))
