"""KD with logit standardisation (Sun et al., CVPR 2024)."""

from __future__ import annotations

from typing import Dict

import torch
from torch import nn

from ..losses import kd_ls_loss, masked_cross_entropy
from .base import METHODS, Batch, Method


@METHODS.register("kd_ls")
class KDLogitStandardised(Method):
    """KD on z-scored logits (Sun, Ren, Li, Wang & Cao, CVPR 2024, "Logit Standardization in Knowledge
    Distillation").

    ``loss = alpha · T² · KL(softmax(Z(t)/T) ‖ softmax(Z(s)/T)) + (1 - alpha) · CE(s, y)`` with ``Z`` the
    per-sample z-score of the logits (:func:`kdkit.losses.kd_ls_loss`): the student must match the
    teacher's logit relations, not their range, so the two may keep different temperatures in effect.
    Unlabelled batches train on the soft term alone.

    Args:
        temperature: base temperature applied after standardisation (the paper's code uses 2).
        alpha: weight of the soft term, in [0, 1] (0.9 matches the paper's 9 : 1 KD : CE weighting).
    """

    def __init__(self, student: nn.Module, teacher, temperature: float = 2.0, alpha: float = 0.9):
        super().__init__(student, teacher)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0; got {temperature}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1]; got {alpha}")
        self.temperature, self.alpha = temperature, alpha

    def forward(self, batch: Batch) -> Dict[str, torch.Tensor]:
        logits = self.student(batch["x"])
        t_logits = self.teacher(batch)
        kd = kd_ls_loss(logits, t_logits, self.temperature)
        if "y" not in batch:
            return {"loss": kd, "kd_ls": kd.detach(), "logits": logits}
        ce = masked_cross_entropy(logits, batch["y"])
        loss = self.alpha * kd + (1.0 - self.alpha) * ce
        return {"loss": loss, "kd_ls": kd.detach(), "ce": ce.detach(), "logits": logits}
