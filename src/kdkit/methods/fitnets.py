"""FitNets hints (Romero et al., ICLR 2015)."""

from __future__ import annotations

from typing import List

import torch
from torch import nn

from ..losses import hint_loss
from .base import METHODS
from .connectors import make_connector
from .feature_base import FeatureMethod


@METHODS.register("fitnets")
class FitNets(FeatureMethod):
    """FitNets hint learning (Romero, Ballas, Kahou, Chassang, Gatta & Bengio, ICLR 2015, "FitNets: Hints for
    Thin Deep Nets").

    A connector (the paper's regressor: 1x1 conv for maps, linear for vectors, sized from the dry run)
    maps each student feature to its teacher feature's shape; the hint is their mean squared error
    (:func:`kdkit.losses.hint_loss`), summed over the layer pairs:

    ``loss = ce_weight · CE + kd_weight · KD + beta · Σ_pairs MSE(connector(f_s), f_t)``

    trained in one stage with the cross-entropy (the paper pre-trains on the hint first; one stage is the
    usual modern setting).

    Args:
        student_layer, teacher_layer: layer names or lists (default: last feature maps, else embeddings).
        connector: ``auto`` (identity when shapes agree), ``learned`` (always a map) or ``none``.
        resize: resize student maps to the teacher's spatial size when they differ.
        beta: weight of the hint (100 as in the RepDistiller benchmark of Tian et al. 2020).
        ce_weight, kd_weight, temperature: see :class:`~kdkit.methods.feature_base.FeatureMethod`.
    """

    feature_kind = "any"
    part = "hint"

    def __init__(self, student: nn.Module, teacher, connector: str = "auto", resize: bool = False, beta: float = 100.0,
                 **kwargs):
        super().__init__(student, teacher, beta=beta, **kwargs)  # layers, ce/kd weights: FeatureMethod's
        self.connectors = nn.ModuleList(
            make_connector(s, t, connector, resize, where=f"fitnets {sl}->{tl}")
            for s, t, sl, tl in zip(self.student_shapes, self.teacher_shapes, self.student_layers, self.teacher_layers))

    def feature_loss(self, student_features: List[torch.Tensor], teacher_features: List[torch.Tensor]) -> torch.Tensor:
        return sum(hint_loss(c(s), t) for c, s, t in zip(self.connectors, student_features, teacher_features))
