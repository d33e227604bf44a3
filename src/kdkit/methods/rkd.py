"""Relational knowledge distillation, distance + angle (Park et al., CVPR 2019)."""

from __future__ import annotations

from typing import Dict

import torch
from torch import nn

from ..losses import rkd_angle_loss, rkd_distance_loss
from .base import METHODS, Batch
from .feature_base import FeatureMethod


@METHODS.register("rkd")
class RKD(FeatureMethod):
    """RKD-DA (Park, Kim, Lu & Cho, CVPR 2019, "Relational Knowledge Distillation").

    ``loss = ce_weight · CE + kd_weight · KD + beta · Σ_pairs (distance_weight · D + angle_weight · A)`` with
    the distance and angle terms of :func:`kdkit.losses.rkd_distance_loss` / :func:`kdkit.losses.rkd_angle_loss`
    (logged as ``rkd_d`` and ``rkd_a``). Widths may differ. The angle term costs B³ memory per pair.

    Args:
        student_layer, teacher_layer: any layers (default: the embeddings ``head:input``).
        distance_weight, angle_weight: the paper's 25 and 50.
        beta: overall weight.
        ce_weight, kd_weight, temperature: see :class:`~kdkit.methods.feature_base.FeatureMethod`.
    """

    feature_kind = "embedding"
    part = "rkd"
    teacher_through_forward_pass = True  # its forward takes the teacher's side from self.run (forward_pass) only

    def __init__(self, student: nn.Module, teacher, distance_weight: float = 25.0, angle_weight: float = 50.0,
                 beta: float = 1.0, **kwargs):
        super().__init__(student, teacher, beta=beta, **kwargs)  # layers, ce/kd weights: FeatureMethod's
        self.distance_weight, self.angle_weight = distance_weight, angle_weight

    def forward(self, batch: Batch) -> Dict[str, torch.Tensor]:
        logits, feats, t_logits, t_feats = self.run(batch)
        d = sum(rkd_distance_loss(s, t) for s, t in zip(feats, t_feats))
        a = sum(rkd_angle_loss(s, t) for s, t in zip(feats, t_feats))
        rkd = self.distance_weight * d + self.angle_weight * a
        return self.combine(batch, logits, t_logits, rkd, parts={"rkd_d": d, "rkd_a": a})
