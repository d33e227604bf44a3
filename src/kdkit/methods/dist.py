"""DIST: distillation by correlation of probabilities (Huang et al., NeurIPS 2022)."""

from __future__ import annotations

from typing import Dict

import torch
from torch import nn

from ..losses import dist_inter_loss, dist_intra_loss
from .base import METHODS, Batch, Method, Outputs


@METHODS.register("dist")
class DIST(Method):
    """DIST (Huang, You, Wang, Qian & Xu, NeurIPS 2022, "Knowledge Distillation from A Stronger Teacher").

    ``loss = ce_weight · CE(s, y) + beta · inter + gamma · intra`` where ``inter`` / ``intra`` are one minus the
    Pearson correlation of the softened class probabilities per sample / per class
    (:func:`kdkit.losses.dist_inter_loss`, :func:`kdkit.losses.dist_intra_loss`). No labels are needed for
    the distillation terms; the cross-entropy covers the labelled samples only.

    Args:
        beta: weight of the inter-class (per-sample) relation.
        gamma: weight of the intra-class (per-class, across the batch) relation.
        temperature: softening temperature.
        ce_weight: weight of the cross-entropy.
    """

    def __init__(self, student: nn.Module, teacher, beta: float = 2.0, gamma: float = 2.0, temperature: float = 4.0,
                 ce_weight: float = 1.0):
        super().__init__(student, teacher)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0; got {temperature}")
        self.beta, self.gamma, self.temperature, self.ce_weight = beta, gamma, temperature, ce_weight

    def compute_loss(self, batch: Batch, outputs: Outputs) -> Dict[str, torch.Tensor]:
        logits, t_logits = outputs.logits, outputs.teacher_logits  # (B, C) each
        inter = dist_inter_loss(logits, t_logits, self.temperature)
        intra = dist_intra_loss(logits, t_logits, self.temperature)
        loss = self.beta * inter + self.gamma * intra
        out = {"inter": inter.detach(), "intra": intra.detach()}
        loss = self.add_ce(loss, out, logits, batch, self.ce_weight)
        out.update(loss=loss, logits=logits)
        return out
