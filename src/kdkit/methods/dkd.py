"""Decoupled knowledge distillation (DKD, Zhao et al., CVPR 2022)."""

from __future__ import annotations

from typing import Dict

import torch
from torch import nn

from ..losses import dkd_loss
from .base import METHODS, Batch, Method, Outputs


@METHODS.register("dkd")
class DKD(Method):
    """Decoupled KD (Zhao, Cui, Song, Qiu & Liang, CVPR 2022, "Decoupled Knowledge Distillation").

    ``loss = ce_weight · CE(s, y) + w(step) · T² · (alpha · TCKD + beta · NCKD)`` (see :func:`kdkit.losses.dkd_loss`),
    where ``w = min(1, (k + 1) / warmup_steps)`` during optimiser step ``k`` (counted from 0, in
    :meth:`on_optimizer_step`): a linear ramp over the first ``warmup_steps`` optimiser steps, whatever the
    gradient accumulation (the paper warms the DKD term up over 20 epochs; 0 = no warm-up).

    DKD needs each sample's target class: unlabelled samples (``y = -1``, or no ``y``) use the teacher's
    predicted class instead and get no cross-entropy.

    Args:
        alpha: weight of the target-class term TCKD (paper: 1).
        beta: weight of the non-target term NCKD (paper: 8 on CIFAR-100, 0.5 on ImageNet).
        temperature: T (paper: 4).
        ce_weight: weight of the cross-entropy.
        warmup_steps: optimiser steps over which the DKD term ramps up.
    """

    def __init__(self, student: nn.Module, teacher, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0,
                 ce_weight: float = 1.0, warmup_steps: int = 0):
        super().__init__(student, teacher)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0; got {temperature}")
        if min(alpha, beta, ce_weight, warmup_steps) < 0:
            raise ValueError("alpha, beta, ce_weight and warmup_steps must be >= 0")
        self.alpha, self.beta, self.temperature = alpha, beta, temperature
        self.ce_weight, self.warmup_steps = ce_weight, warmup_steps
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))  # saved with the training state

    def compute_loss(self, batch: Batch, outputs: Outputs) -> Dict[str, torch.Tensor]:
        logits, t_logits = outputs.logits, outputs.teacher_logits  # (B, C) each
        y = batch.get("y")
        pseudo = t_logits.argmax(1)
        targets = pseudo if y is None else torch.where(y >= 0, y, pseudo)
        dkd = dkd_loss(logits, t_logits, targets, self.alpha, self.beta, self.temperature)
        loss = dkd
        if self.warmup_steps:
            # Ramp computed on the device from the step buffer: no host sync in the training step.
            loss = dkd * ((self.steps + 1).to(dkd.dtype) / self.warmup_steps).clamp(max=1.0)
        out = {"dkd": dkd.detach()}
        loss = self.add_ce(loss, out, logits, batch, self.ce_weight)
        out.update(loss=loss, logits=logits)
        return out

    def on_optimizer_step(self) -> None:
        # Counted per optimiser step, not per forward: under gradient accumulation the micro-batches of one
        # step share one ramp value. A buffer, so a resumed run continues the ramp where it stopped.
        self.steps += 1
