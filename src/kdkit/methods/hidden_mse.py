"""Hidden-state matching with a layer map (TinyBERT's hidden-state loss, Jiao et al. 2020)."""

from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import nn

from .base import METHODS, Batch, Outputs
from .transformer_base import LayerMapSpec, TransformerMethod


@METHODS.register("hidden_mse")
class HiddenMSE(TransformerMethod):
    """Hidden-state matching (Jiao et al., Findings of EMNLP 2020, "TinyBERT", eq. 8), with Hinton KD on the logits.

    For each (student, teacher) pair of encoder blocks given by ``layer_map``, the masked MSE between the
    projected student output ``H_s W_h`` and the teacher output ``H_t`` over real tokens
    (:func:`kdkit.losses_text.masked_hidden_mse`), summed over pairs::

        loss = alpha · KD_T + (1 - alpha) · CE + beta · Σ_pairs MSE(H_s W_h, H_t)

    ``W_h`` is one learned linear map shared by every pair (as in the authors' code), created when the widths
    differ; it is a submodule of the method, trained with the student and never exported.

    Args:
        layer_map: ``uniform`` (default), ``last``, ``final``, a list of teacher layers (one per student
            layer, -1 skips) or of ``[student, teacher]`` pairs (:func:`~kdkit.methods.transformer_base.layer_map`).
        projection: ``auto`` (a map when widths differ), ``learned`` (always) or ``none``.
        beta, alpha, temperature: see :class:`~kdkit.methods.transformer_base.TransformerMethod`.
    """

    part = "hidden"

    def __init__(self, student: nn.Module, teacher, layer_map: LayerMapSpec = "uniform", projection: str = "auto",
                 **kwargs):
        super().__init__(student, teacher, **kwargs)
        self.use_hidden(self.pairs(layer_map), projection)

    def feature_loss(self, batch: Batch, outputs: Outputs) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        return self.hidden_term(batch, outputs), {}
