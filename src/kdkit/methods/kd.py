"""Hinton knowledge distillation, and output matching for regression teachers."""

from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

from ..losses import kd_loss, masked_cross_entropy, output_mse
from .base import METHODS, Batch, Method


@METHODS.register("kd")
class KD(Method):
    """Knowledge distillation (Hinton, Vinyals & Dean, 2015).

    ``loss = alpha · T²·KL(p_t^T ‖ p_s^T) + (1 - alpha) · CE(s, y)``

    The cross-entropy covers the labelled samples of the batch only; a batch
    with no ``y`` (an unlabelled transfer set) trains on the soft targets alone.

    Args:
        student: the model being trained.
        teacher: the frozen teacher.
        temperature: softening temperature T.
        alpha: weight of the soft-target term, in [0, 1].
    """

    def __init__(self, student: nn.Module, teacher, temperature: float = 4.0, alpha: float = 0.9):
        super().__init__(student, teacher)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0; got {temperature}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1]; got {alpha}")
        self.temperature = temperature
        self.alpha = alpha

    def forward(self, batch: Batch) -> Dict[str, torch.Tensor]:
        logits = self.student(batch["x"])  # (B, C)
        teacher_logits = self.teacher(batch)  # (B, C)
        kd = kd_loss(logits, teacher_logits, self.temperature)
        if "y" not in batch:
            return {"loss": kd, "kd": kd.detach(), "logits": logits}
        ce = masked_cross_entropy(logits, batch["y"])
        loss = self.alpha * kd + (1.0 - self.alpha) * ce
        return {"loss": loss, "kd": kd.detach(), "ce": ce.detach(), "logits": logits}


@METHODS.register("mse")
class OutputMSE(Method):
    """Output matching with MSE, for regression teachers (or logit regression, Ba & Caruana 2014).

    ``loss = alpha · MSE(s, t) + (1 - alpha) · MSE(s, y)`` when targets exist, else ``MSE(s, t)``.

    Args:
        alpha: weight of the teacher-matching term, in [0, 1].
    """

    def __init__(self, student: nn.Module, teacher, alpha: float = 0.5):
        super().__init__(student, teacher)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1]; got {alpha}")
        self.alpha = alpha

    def forward(self, batch: Batch) -> Dict[str, torch.Tensor]:
        out = self.student(batch["x"])
        match = output_mse(out, self.teacher(batch))
        y = batch.get("y")
        if y is None or not y.is_floating_point():
            return {"loss": match, "match": match.detach(), "logits": out}
        sup = F.mse_loss(out, y.view_as(out))
        loss = self.alpha * match + (1.0 - self.alpha) * sup
        return {"loss": loss, "match": match.detach(), "mse": sup.detach(), "logits": out}
