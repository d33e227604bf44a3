"""Similarity-preserving KD (Tung & Mori, ICCV 2019)."""

from __future__ import annotations

from typing import List

import torch
from torch import nn

from ..losses import sp_loss
from .base import METHODS
from .feature_base import FeatureMethod


@METHODS.register("sp")
class SimilarityPreserving(FeatureMethod):
    """Similarity-preserving KD (Tung & Mori, ICCV 2019, "Similarity-Preserving Knowledge Distillation").

    ``loss = ce_weight · CE + kd_weight · KD + beta · Σ_pairs sp_loss(f_s, f_t)`` with
    :func:`kdkit.losses.sp_loss`: the student's batch similarity matrix should match the teacher's. Widths
    and shapes may differ (no connector).

    Args:
        student_layer, teacher_layer: any layers (default: the embeddings ``head:input``; the paper uses
            the last convolutional group, e.g. ``features``).
        beta: weight (3000, as in the paper and the RepDistiller benchmark).
        ce_weight, kd_weight, temperature: see :class:`~kdkit.methods.feature_base.FeatureMethod`.
    """

    feature_kind = "embedding"
    part = "sp"

    def __init__(self, student: nn.Module, teacher, beta: float = 3000.0, **kwargs):
        super().__init__(student, teacher, beta=beta, **kwargs)  # layers, ce/kd weights: FeatureMethod's

    def feature_loss(self, student_features: List[torch.Tensor], teacher_features: List[torch.Tensor]) -> torch.Tensor:
        return sum(sp_loss(s, t) for s, t in zip(student_features, teacher_features))
