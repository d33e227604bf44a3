"""DistilBERT's cosine embedding loss on hidden states (Sanh et al. 2019)."""

from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import nn

from ..losses_text import masked_cosine_loss
from .base import METHODS, Batch, Outputs
from .transformer_base import LayerMapSpec, TransformerMethod


@METHODS.register("hidden_cosine")
class HiddenCosine(TransformerMethod):
    """DistilBERT's cosine loss (Sanh, Debut, Chaumond & Wolf 2019, "DistilBERT, a distilled version of BERT:
    smaller, faster, cheaper and lighter"), with Hinton KD on the logits.

    ``1 - cos(h_s, h_t)`` per real token, averaged (:func:`kdkit.losses_text.masked_cosine_loss`: PyTorch's
    ``CosineEmbeddingLoss`` with target 1 on the positions the attention mask keeps), summed over layer pairs::

        loss = alpha · KD_T + (1 - alpha) · CE + beta · Σ_pairs (1 - cos(H_s W_h, H_t))

    DistilBERT aligns the last hidden states of student and teacher (``layer_map: final``, the default) and
    needs equal widths; when they differ a learned linear map ``W_h`` (as in ``hidden_mse``) is applied first.
    DistilBERT pre-trains with this loss plus MLM; here it is a task-specific term beside the logits.

    Args:
        layer_map: ``final`` (default) or any map of ``hidden_mse``.
        projection: ``auto`` (a map when widths differ), ``learned`` or ``none``.
        beta, alpha, temperature: see :class:`~kdkit.methods.transformer_base.TransformerMethod`.
    """

    part = "cos"

    def __init__(self, student: nn.Module, teacher, layer_map: LayerMapSpec = "final", projection: str = "auto",
                 **kwargs):
        super().__init__(student, teacher, **kwargs)
        self.use_hidden(self.pairs(layer_map), projection)

    def feature_loss(self, batch: Batch, outputs: Outputs) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        total = 0.0
        for s, t in self.hidden_pairs:
            hs, ht = self.hidden_states(outputs, s, t)
            total = total + masked_cosine_loss(self.projection(hs), ht, self.mask(batch, hs, ht))
        return total, {}
