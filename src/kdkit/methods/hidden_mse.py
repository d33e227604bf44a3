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

    Defaults, measured (``benchmarks/tinybert_scale.py``): ``layer_map: auto`` pairs each layer of a student
    built by :func:`kdkit.hf.shrink` with the teacher layer it was copied from (TinyBERT's ``uniform`` map would
    make a student holding teacher blocks 0, 2, 4 imitate blocks 1, 3, 5), and ``beta`` 0.1: with a short
    task-specific run the feature term at ``beta`` 1 outweighs the cross-entropy's gradient on the shared
    layers and cost the teacher-initialised student of the text benchmark accuracy. TinyBERT itself never
    mixes the two: it distils the intermediate layers first, with no task loss, then the predictions.

    Args:
        layer_map: ``auto`` (default: ``copied`` for a student of copied teacher layers, else ``uniform``),
            ``copied``, ``uniform``, ``last``, ``final``, a list of teacher layers (one per student layer, -1
            skips) or of ``[student, teacher]`` pairs (:func:`~kdkit.methods.transformer_base.layer_map`).
        projection: ``auto`` (a map when widths differ), ``learned`` (always) or ``none``.
        beta: weight of the hidden term (default 0.1).
        alpha, temperature: see :class:`~kdkit.methods.transformer_base.TransformerMethod`.
    """

    part = "hidden"

    def __init__(self, student: nn.Module, teacher, layer_map: LayerMapSpec = "auto", projection: str = "auto",
                 beta: float = 0.1, **kwargs):
        super().__init__(student, teacher, beta=beta, **kwargs)
        self.use_hidden(self.pairs(layer_map), projection)

    def feature_loss(self, batch: Batch, outputs: Outputs) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        return self.hidden_term(batch, outputs), {}
