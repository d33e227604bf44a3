"""Attention-map transfer over heads as a KL divergence (TinyBERT's attention loss, with MiniLM's KL)."""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import nn

from .base import METHODS, Batch, Outputs
from .transformer_base import LayerMapSpec, TransformerMethod


@METHODS.register("attention_kl")
class AttentionKL(TransformerMethod):
    """Attention-map transfer (Jiao et al. 2020, "TinyBERT", eq. 7), as ``KL(A_t ‖ A_s)`` per head and query.

    TinyBERT matches the unnormalised attention scores with MSE; this method matches the attention
    *distributions* with a KL divergence (MiniLM's form, Wang et al. 2020, eq. 5), which makes it
    insensitive to a per-row shift of the scores. The distributions are recomputed from the
    captured query/key projections (``softmax(Q K^T / √d)``, padded keys excluded), so the method works with
    any attention implementation (eager, SDPA, flash) and never asks the model to return attentions. The KL
    is averaged over heads and real query positions and summed over layer pairs
    (:func:`kdkit.losses_text.attention_kl_loss`)::

        loss = alpha · KD_T + (1 - alpha) · CE + beta · Σ_pairs KL(A_t ‖ A_s)

    Head counts must match (widths may differ), unless ``relation_heads`` re-splits both models' queries and
    keys into that many heads (MiniLMv2's relation heads, Wang et al. 2021).

    The KL is in nats per query row: between different layers of a real model it is of the order of 1-3 per
    pair, several times the cross-entropy's gradient on the shared layers, hence ``beta`` 0.1 by default (see
    ``hidden_mse`` and ``benchmarks/tinybert_scale.py``).

    Args:
        layer_map: as in ``hidden_mse`` (default ``auto``: the layers a shrunk student was copied from, else
            ``uniform``).
        relation_heads: None (the models' own heads) or a number dividing both widths.
        beta: weight of the attention term (default 0.1).
        alpha, temperature: see :class:`~kdkit.methods.transformer_base.TransformerMethod`.
    """

    part = "attn_kl"

    def __init__(self, student: nn.Module, teacher, layer_map: LayerMapSpec = "auto",
                 relation_heads: Optional[int] = None, beta: float = 0.1, **kwargs):
        super().__init__(student, teacher, beta=beta, **kwargs)
        self.use_attention(self.pairs(layer_map), relation_heads)

    def feature_loss(self, batch: Batch, outputs: Outputs) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        at, _ = self.attention_term(batch, outputs)
        return at, {}
