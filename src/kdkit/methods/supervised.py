"""Plain supervised training (no teacher): cross-entropy for classes, MSE for regression targets."""

from __future__ import annotations

from typing import Dict

import torch

from ..data.core import IGNORE_INDEX
from ..losses import masked_cross_entropy, masked_mse
from .base import METHODS, Batch, Method


@METHODS.register("supervised")
class Supervised(Method):
    """Train on hard labels only: the baseline and the way teachers are trained.

    Cross-entropy over the labelled samples for class labels (``-1`` = unlabelled, skipped); MSE over the
    known targets for float (regression) targets (``NaN`` = unlabelled, skipped,
    :func:`kdkit.losses.masked_mse`). A batch with no label at all gives a loss of 0. Causal LMs ((B, L', V)
    logits, (B, L) token targets): next-token cross-entropy averaged over the target tokens (``-100`` skipped).
    """

    needs_teacher = False

    def forward(self, batch: Batch) -> Dict[str, torch.Tensor]:
        logits = self.student(batch["x"])
        y = batch["y"]
        if y.is_floating_point():
            loss = masked_mse(logits, y)
            return {"loss": loss, "mse": loss.detach(), "logits": logits}
        if logits.dim() == 3 and y.dim() == 2:  # causal LM: next-token CE over target positions (y != -100)
            loss = masked_cross_entropy(logits.flatten(0, 1), y[:, :logits.shape[1]].flatten(), IGNORE_INDEX)
            return {"loss": loss, "ce": loss.detach(), "logits": logits}
        loss = masked_cross_entropy(logits, y)
        return {"loss": loss, "ce": loss.detach(), "logits": logits}
