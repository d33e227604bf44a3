"""KD with logit standardisation (Sun et al., CVPR 2024)."""

from __future__ import annotations

from typing import Dict

import torch
from torch import nn

from ..losses import kd_per_sample, standardize_logits
from .base import METHODS, Batch, Method, Outputs
from .kd import mix_with_labels


@METHODS.register("kd_ls")
class KDLogitStandardised(Method):
    """KD on z-scored logits (Sun, Ren, Li, Wang & Cao, CVPR 2024, "Logit Standardization in Knowledge
    Distillation").

    ``loss = alpha · T² · KL(softmax(Z(t)/T) ‖ softmax(Z(s)/T)) + (1 - alpha) · CE(s, y)`` with ``Z`` the
    per-sample z-score of the logits (:func:`kdkit.losses.kd_ls_loss`): the student must match the
    teacher's logit relations, not their range, so the two may keep different temperatures in effect.
    Labelled and unlabelled samples are mixed per sample exactly as in :class:`~kdkit.methods.kd.KD`
    (an unlabelled sample keeps the whole weight on the soft term; a batch of -1 labels equals a batch
    without ``y``).

    Weighting against the authors' code: their CIFAR-100 runs use ``9 · KD + 0.1 · CE`` (KD weight 9, CE
    weight 0.1 kept from mdistiller), a 90 : 1 ratio, not a 0.9 / 0.1 mix. ``alpha = 90 / 91`` gives that
    ratio exactly; the loss is then the reference loss divided by 9.1, which a learning rate 9.1 times
    larger undoes for SGD (with or without momentum) without weight decay; Adam is nearly insensitive to
    it. The default ``alpha = 0.9`` is the classical KD mix, a 9 : 1 ratio that puts ten times more weight
    on the labels than the reference.

    Args:
        temperature: base temperature applied after standardisation (the paper's code uses 2).
        alpha: weight of the soft term for labelled samples, in [0, 1] (90 / 91 for the reference ratio).
    """

    def __init__(self, student: nn.Module, teacher, temperature: float = 2.0, alpha: float = 0.9):
        super().__init__(student, teacher)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0; got {temperature}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1]; got {alpha}")
        self.temperature, self.alpha = temperature, alpha

    def compute_loss(self, batch: Batch, outputs: Outputs) -> Dict[str, torch.Tensor]:
        logits, t_logits = outputs.logits, outputs.teacher_logits  # (B, C) each
        z_s, z_t = standardize_logits(logits), standardize_logits(t_logits)

        def soft(per_sample: bool) -> torch.Tensor:
            kd = kd_per_sample(z_s, z_t, self.temperature)  # (B,)
            return kd if per_sample else kd.mean()

        # Labelled and unlabelled samples mix per sample as in KD.
        return mix_with_labels(logits, soft, batch.get("y"), self.alpha, "kd_ls")
