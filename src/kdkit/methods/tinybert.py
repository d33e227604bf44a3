"""TinyBERT's task-specific distillation: hidden states and attention maps together, plus logits KD."""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import nn

from .base import METHODS, Batch, Outputs
from .transformer_base import LayerMapSpec, TransformerMethod


@METHODS.register("tinybert")
class TinyBERT(TransformerMethod):
    """Hidden-state MSE and attention KL on the same layer map, with Hinton KD on the logits (Jiao et al.,
    Findings of EMNLP 2020, "TinyBERT", eqs. 7-10, in one stage).

    ::

        loss = alpha · KD_T + (1 - alpha) · CE
               + beta · (hidden_weight · Σ_pairs MSE(H_s W_h, H_t) + attention_weight · Σ_pairs KL(A_t ‖ A_s))

    the terms of ``hidden_mse`` and ``attention_kl`` (see those methods), computed from one forward of each
    model. Deviations from the paper, on purpose: one stage (the paper distils the intermediate layers
    first, with no task loss, then the predictions), no embedding-layer term, and the attention term is a KL
    between attention distributions rather than an MSE between raw scores.

    Because the stages are merged, the feature terms compete with the task loss from the first step, and
    their scale decides the result. Measured on the text benchmark's setting (``benchmarks/tinybert_scale.py``:
    MiniLM-L6 teacher, 3-layer student copied from its blocks 0, 2, 4, 3 epochs): with the former defaults
    (``uniform`` map, ``beta`` 1) the attention KL started at 6.0 nats summed over the three pairs, each pair's
    gradient on the student's shared layers 25-33 times the cross-entropy's, and the student ended 15.4 points
    below labels alone (``benchmarks/results/text_classification.json``). Hence the defaults:
    ``layer_map: auto`` (each layer of a shrunk student is paired with the teacher layer it was copied from;
    the uniform map made copied block 0 imitate block 1) and ``beta`` 0.1.

    Args:
        layer_map: as in ``hidden_mse`` (default ``auto``: the layers a shrunk student was copied from, else
            ``uniform``), used for both terms.
        projection: as in ``hidden_mse``.
        relation_heads: as in ``attention_kl``.
        hidden_weight, attention_weight: weights of the two feature terms inside ``beta``.
        beta: weight of the feature terms (default 0.1).
        alpha, temperature: see :class:`~kdkit.methods.transformer_base.TransformerMethod`.
    """

    part = "feat"

    def __init__(self, student: nn.Module, teacher, layer_map: LayerMapSpec = "auto", projection: str = "auto",
                 relation_heads: Optional[int] = None, hidden_weight: float = 1.0, attention_weight: float = 1.0,
                 beta: float = 0.1, **kwargs):
        super().__init__(student, teacher, beta=beta, **kwargs)
        if min(hidden_weight, attention_weight) < 0:
            raise ValueError("hidden_weight and attention_weight must be >= 0")
        self.hidden_weight, self.attention_weight = hidden_weight, attention_weight
        pairs = self.pairs(layer_map)
        self.use_hidden(pairs, projection)
        self.use_attention(pairs, relation_heads)

    def feature_loss(self, batch: Batch, outputs: Outputs) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        hidden = self.hidden_term(batch, outputs)
        at, _ = self.attention_term(batch, outputs)
        return self.hidden_weight * hidden + self.attention_weight * at, {"hidden": hidden, "attn_kl": at}
