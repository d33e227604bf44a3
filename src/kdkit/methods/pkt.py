"""Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018)."""

from __future__ import annotations

from typing import List

import torch
from torch import nn

from ..losses import pkt_loss
from .base import METHODS
from .feature_base import FeatureMethod


@METHODS.register("pkt")
class PKT(FeatureMethod):
    """Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018, "Learning Deep Representations with
    Probabilistic Knowledge Transfer").

    ``loss = ce_weight · CE + kd_weight · KD + beta · Σ_pairs pkt_loss(f_s, f_t)`` with
    :func:`kdkit.losses.pkt_loss`: KL between the teacher's and the student's neighbour distributions
    (cosine kernel) in embedding space. Widths may differ (no connector).

    Args:
        student_layer, teacher_layer: any layers (default: the embeddings ``head:input``).
        beta: weight of the KL (500: RepDistiller's 30000 was applied to a mean over the B² entries at batch
            64; our per-anchor KL is about B times larger, so 30000 / 64 ≈ 470, rounded).
        ce_weight, kd_weight, temperature: see :class:`~kdkit.methods.feature_base.FeatureMethod`.
    """

    feature_kind = "embedding"
    part = "pkt"

    def __init__(self, student: nn.Module, teacher, beta: float = 500.0, **kwargs):
        super().__init__(student, teacher, beta=beta, **kwargs)  # layers, ce/kd weights: FeatureMethod's

    def feature_loss(self, student_features: List[torch.Tensor], teacher_features: List[torch.Tensor]) -> torch.Tensor:
        return sum(pkt_loss(s, t) for s, t in zip(student_features, teacher_features))
