"""Hinton knowledge distillation, and output matching for regression teachers."""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..losses import kd_loss, kd_per_sample, masked_mse, mix_soft_and_hard, output_mse
from .base import METHODS, Batch, Method, Outputs


@METHODS.register("kd")
class KD(Method):
    """Knowledge distillation (Hinton, Vinyals & Dean, 2015).

    Per sample i, with ``KD_i = T²·KL(p_t^T ‖ p_s^T)`` (:func:`kdkit.losses.kd_per_sample`)::

        ℓ_i = alpha · KD_i + (1 - alpha) · CE(s_i, y_i)   if y_i is a class
        ℓ_i = KD_i                                        if unlabelled (y_i = -1, or no ``y``)
        loss = mean_i ℓ_i

    A fully labelled batch gives the classical ``alpha · KD + (1 - alpha) · CE``; an unlabelled sample has
    no hard target to share its weight with, so it keeps all of it on the soft target. A batch whose every
    ``y`` is -1 therefore gives the same loss as a batch with no ``y`` (an unlabelled transfer set), and in a
    mixed batch every sample counts once (:func:`kdkit.losses.mix_soft_and_hard`). Logged: ``kd`` (mean
    ``KD_i``) and ``ce`` (mean cross-entropy over the labelled samples).

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

    def compute_loss(self, batch: Batch, outputs: Outputs) -> Dict[str, torch.Tensor]:
        logits, teacher_logits = outputs.logits, outputs.teacher_logits  # (B, C) each

        def soft(per_sample: bool) -> torch.Tensor:
            if per_sample:
                return kd_per_sample(logits, teacher_logits, self.temperature)  # (B,)
            return kd_loss(logits, teacher_logits, self.temperature)  # the batch mean, one fused reduction

        return mix_with_labels(logits, soft, batch.get("y"), self.alpha, "kd")


def mix_with_labels(logits: torch.Tensor, soft: Callable[[bool], torch.Tensor], y: Optional[torch.Tensor],
                    alpha: float, name: str) -> Dict[str, torch.Tensor]:
    """The output dict of a logit method: a soft term mixed per sample with cross-entropy on labelled samples.

    ``soft(True)`` gives the soft term per sample (B,), ``soft(False)`` its batch mean. Without class labels
    the loss is the soft term alone; otherwise :func:`kdkit.losses.mix_soft_and_hard`. When every sample of
    the batch is labelled that is exactly ``alpha · mean(soft) + (1 - alpha) · CE``, computed so (fewer
    operations on the hot path) whenever the labels are in host memory, where reading them (through NumPy,
    a view of the same memory) costs no device sync and no tensor operation. On a GPU the general per-sample
    formula runs, with no host sync.
    Logged: ``name`` (mean soft term) and ``ce`` (mean cross-entropy over the labelled samples).
    """
    if y is None or y.is_floating_point():  # no class labels: soft targets only
        kd = soft(False)
        return {"loss": kd, name: kd.detach(), "logits": logits}
    if y.device.type == "cpu" and y.numpy().min(initial=0) >= 0:  # a read of host memory: no device sync
        kd, ce = soft(False), F.cross_entropy(logits, y)
        return {"loss": alpha * kd + (1.0 - alpha) * ce, name: kd.detach(), "ce": ce.detach(), "logits": logits}
    kd = soft(True)
    labelled = y != -1
    ce = F.cross_entropy(logits, y, ignore_index=-1, reduction="none")  # (B,), 0 where unlabelled
    loss = mix_soft_and_hard(kd, ce, labelled, alpha)
    ce_logged = ce.sum() / labelled.sum().clamp_min(1)
    return {"loss": loss, name: kd.mean().detach(), "ce": ce_logged.detach(), "logits": logits}


@METHODS.register("mse")
class OutputMSE(Method):
    """Output matching with MSE, for regression teachers (or logit regression, Ba & Caruana 2014).

    Per output element, ``alpha · (s - t)² + (1 - alpha) · (s - y)²`` where the target ``y`` is known and
    ``(s - t)²`` where it is NaN (kdkit's "unlabelled" for regression) or absent, averaged over all elements:
    the same rule as :class:`KD`, so fully labelled batches give ``alpha · MSE(s, t) + (1 - alpha) · MSE(s, y)``
    and unlabelled ones ``MSE(s, t)``. Logged: ``match`` = MSE(s, t), ``mse`` = MSE over the known targets.

    Args:
        alpha: weight of the teacher-matching term, in [0, 1].
    """

    def __init__(self, student: nn.Module, teacher, alpha: float = 0.5):
        super().__init__(student, teacher)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1]; got {alpha}")
        self.alpha = alpha

    def compute_loss(self, batch: Batch, outputs: Outputs) -> Dict[str, torch.Tensor]:
        out, teacher_out = outputs.logits, outputs.teacher_logits  # (B, C) each
        match = output_mse(out, teacher_out)
        y = batch.get("y")
        if y is None or not y.is_floating_point():
            return {"loss": match, "match": match.detach(), "logits": out}
        y = y.reshape(out.shape)
        known = torch.isfinite(y)
        per_match = (out - teacher_out.reshape(out.shape)).pow(2)
        per_sup = (out - torch.where(known, y, torch.zeros_like(y))).pow(2)  # NaN targets filled, then unused
        loss = mix_soft_and_hard(per_match, per_sup, known, self.alpha)
        return {"loss": loss, "match": match.detach(), "mse": masked_mse(out, y).detach(), "logits": out}
