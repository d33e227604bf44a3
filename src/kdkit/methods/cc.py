"""Correlation congruence (Peng et al., ICCV 2019)."""

from __future__ import annotations

from typing import List

import torch
from torch import nn

from ..losses import cc_loss
from .base import METHODS
from .feature_base import FeatureMethod


@METHODS.register("cc")
class CorrelationCongruence(FeatureMethod):
    """Correlation congruence (Peng, Jin, Liu, Li, Wu, Liu, Zhou & Zhang, ICCV 2019, "Correlation Congruence
    for Knowledge Distillation").

    ``loss = ce_weight · CE + kd_weight · KD + beta · Σ_pairs cc_loss(f_s, f_t)`` with
    :func:`kdkit.losses.cc_loss`: the sample-to-sample correlation matrices (Gaussian RBF kernel,
    Taylor-expanded to ``order``) of student and teacher embeddings should agree. The paper adds it to
    KD; set ``kd_weight`` for that. Widths may differ.

    Args:
        student_layer, teacher_layer: any layers (default: the embeddings ``head:input``).
        gamma, order: RBF width and Taylor order of the kernel.
        beta: weight (20, our choice: with ``‖K_s - K_t‖² / B²`` the term starts near half the cross-entropy
            for the zoo's CNNs; not a value from the paper, whose normalisation differs).
        ce_weight, kd_weight, temperature: see :class:`~kdkit.methods.feature_base.FeatureMethod`.
    """

    feature_kind = "embedding"
    part = "cc"

    def __init__(self, student: nn.Module, teacher, gamma: float = 0.4, order: int = 2, beta: float = 20.0, **kwargs):
        super().__init__(student, teacher, beta=beta, **kwargs)  # layers, ce/kd weights: FeatureMethod's
        self.gamma, self.order = gamma, order

    def feature_loss(self, student_features: List[torch.Tensor], teacher_features: List[torch.Tensor]) -> torch.Tensor:
        return sum(cc_loss(s, t, self.gamma, self.order) for s, t in zip(student_features, teacher_features))
