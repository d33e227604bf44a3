"""Plain supervised training (no teacher): cross-entropy for classes, MSE for regression targets."""

from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F

from ..losses import masked_cross_entropy
from .base import METHODS, Batch, Method


@METHODS.register("supervised")
class Supervised(Method):
    """Train on hard labels only: the baseline and the way teachers are trained."""

    needs_teacher = False

    def forward(self, batch: Batch) -> Dict[str, torch.Tensor]:
        logits = self.student(batch["x"])
        y = batch["y"]
        if y.is_floating_point():
            loss = F.mse_loss(logits, y.view_as(logits))
            return {"loss": loss, "mse": loss.detach(), "logits": logits}
        loss = masked_cross_entropy(logits, y)
        return {"loss": loss, "ce": loss.detach(), "logits": logits}
