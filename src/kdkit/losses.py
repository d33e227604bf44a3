"""Distillation losses as pure functions: tensors in, scalar tensor out.

Losses never read configs or modules; methods (:mod:`kdkit.methods`) wrap them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """Hinton et al. (2015), "Distilling the Knowledge in a Neural Network", soft-target term.

    ``T² · KL(softmax(t/T) ‖ softmax(s/T))``, averaged over the batch.

    The KL is summed over classes and divided by the batch size (``batchmean``;
    ``reduction="mean"`` would also divide by the number of classes). The T²
    factor keeps the gradient magnitude of the soft term independent of T, so
    that ``alpha`` means the same at every temperature.

    Args:
        student_logits: (B, C) raw student outputs.
        teacher_logits: (B, C) raw teacher outputs.
        temperature: softening temperature T > 0.

    Returns:
        A scalar tensor.
    """
    t = temperature
    log_p_s = F.log_softmax(student_logits / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits / t, dim=-1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (t * t)


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -1) -> torch.Tensor:
    """Cross-entropy over the labelled samples of a batch (``labels == ignore_index`` are skipped).

    Returns zero (with a gradient path) when no sample in the batch is labelled.

    Args:
        logits: (B, C).
        labels: (B,) integer classes, ``ignore_index`` for unlabelled samples.
    """
    mask = labels != ignore_index
    # Computed unconditionally (no data-dependent branch, no host sync): sum over labelled / count.
    per_sample = F.cross_entropy(logits, labels.clamp_min(0), reduction="none")
    return (per_sample * mask).sum() / mask.sum().clamp_min(1)


def output_mse(student_out: torch.Tensor, teacher_out: torch.Tensor) -> torch.Tensor:
    """Mean squared error between outputs: distillation target for regression teachers (or raw logit matching,
    Ba & Caruana 2014)."""
    return F.mse_loss(student_out, teacher_out)
