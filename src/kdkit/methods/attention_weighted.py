"""Feature matching weighted by the teacher's spatial attention."""

from __future__ import annotations

from typing import List

import torch
from torch import nn

from ..losses import attention_weighted_mse
from .base import METHODS
from .connectors import make_connector
from .feature_base import FeatureMethod


@METHODS.register("attention_weighted")
class AttentionWeightedFeatures(FeatureMethod):
    """Feature MSE where the teacher's own spatial attention weights every position (the spatial attention
    mask of Zhang & Ma, ICLR 2021, "Improve Object Detection with Feature-based Knowledge Distillation:
    Towards Accurate and Efficient Detectors", applied to classification).

    ``loss = ce_weight · CE + kd_weight · KD + beta · Σ_pairs attention_weighted_mse(connector(f_s), f_t)``
    (:func:`kdkit.losses.attention_weighted_mse`): positions where the teacher's activations are strong count
    more than background. A 1x1-conv connector (sized from the dry run) maps student channels to the
    teacher's.

    Args:
        student_layer, teacher_layer: (B, C, H, W) layers (default: the last feature maps).
        attention_temperature: softmax temperature of the teacher's attention (paper: 0.5).
        connector, resize: see :func:`kdkit.methods.connectors.make_connector`.
        beta: weight of the weighted MSE (as FitNets: 100).
        ce_weight, kd_weight, temperature: see :class:`~kdkit.methods.feature_base.FeatureMethod`.
    """

    feature_kind = "map"
    part = "attn_mse"

    def __init__(self, student: nn.Module, teacher, attention_temperature: float = 0.5, connector: str = "auto",
                 resize: bool = False, beta: float = 100.0, **kwargs):
        super().__init__(student, teacher, beta=beta, **kwargs)  # layers, ce/kd weights: FeatureMethod's
        if attention_temperature <= 0:
            raise ValueError(f"attention_temperature must be > 0; got {attention_temperature}")
        self.attention_temperature = attention_temperature
        self.connectors = nn.ModuleList(
            make_connector(s, t, connector, resize, where=f"attention_weighted {sl}->{tl}")
            for s, t, sl, tl in zip(self.student_shapes, self.teacher_shapes, self.student_layers, self.teacher_layers))

    def feature_loss(self, student_features: List[torch.Tensor], teacher_features: List[torch.Tensor]) -> torch.Tensor:
        return sum(attention_weighted_mse(c(s), t, self.attention_temperature)
                   for c, s, t in zip(self.connectors, student_features, teacher_features))
