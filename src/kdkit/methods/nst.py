"""Neuron selectivity transfer (Huang & Wang, 2017)."""

from __future__ import annotations

from typing import List

import torch
from torch import nn

from ..losses import nst_loss
from .base import METHODS
from .connectors import resize_to, spatial_mismatch
from .feature_base import FeatureMethod


@METHODS.register("nst")
class NST(FeatureMethod):
    """Neuron selectivity transfer (Huang & Wang, 2017, "Like What You Like: Knowledge Distill via Neuron
    Selectivity Transfer", arXiv:1707.01219).

    ``loss = ce_weight · CE + kd_weight · KD + beta · Σ_pairs MMD²_poly(f_s, f_t)`` with
    :func:`kdkit.losses.nst_loss`: the distributions of channel activation patterns are matched, so channel
    counts may differ (no connector); spatial sizes must agree (or ``resize``).

    Args:
        student_layer, teacher_layer: (B, C, H, W) layers (default: the last feature maps).
        degree, coef0: polynomial kernel (paper's best: 2, 0).
        resize: resize student maps to the teacher's spatial size when they differ.
        beta: weight (50, the RepDistiller benchmark setting of Tian et al. 2020).
        ce_weight, kd_weight, temperature: see :class:`~kdkit.methods.feature_base.FeatureMethod`.
    """

    feature_kind = "map"
    part = "nst"

    def __init__(self, student: nn.Module, teacher, degree: int = 2, coef0: float = 0.0, resize: bool = False,
                 beta: float = 50.0, **kwargs):
        super().__init__(student, teacher, beta=beta, **kwargs)  # layers, ce/kd weights: FeatureMethod's
        self.degree, self.coef0 = degree, coef0
        for s, t, sl, tl in zip(self.student_shapes, self.teacher_shapes, self.student_layers, self.teacher_layers):
            if s[2:] != t[2:] and not resize:
                raise spatial_mismatch(s, t, f"nst {sl}->{tl}")

    def feature_loss(self, student_features: List[torch.Tensor], teacher_features: List[torch.Tensor]) -> torch.Tensor:
        return sum(nst_loss(resize_to(s, t.shape[2:]), t, self.degree, self.coef0)
                   for s, t in zip(student_features, teacher_features))
