"""MiniLM: deep self-attention distillation of the last layer (Wang et al., NeurIPS 2020)."""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import nn

from .base import METHODS, Batch, Outputs
from .transformer_base import LayerMapSpec, TransformerMethod


@METHODS.register("minilm")
class MiniLM(TransformerMethod):
    """MiniLM (Wang, Wei, Dong, Bao, Yang & Zhou, NeurIPS 2020, "MiniLM: Deep Self-Attention Distillation for
    Task-Agnostic Compression of Pre-Trained Transformers"), with Hinton KD on the logits.

    On the last encoder layer of each model: the self-attention distribution transfer
    ``KL(softmax(Q_t K_t^T/√d_t) ‖ softmax(Q_s K_s^T/√d_s))`` and the value-relation transfer
    ``KL(softmax(V_t V_t^T/√d_t) ‖ softmax(V_s V_s^T/√d_s))``, each averaged over heads and real query
    positions, padded keys excluded (:func:`kdkit.losses_text.minilm_loss`)::

        loss = alpha · KD_T + (1 - alpha) · CE + beta · (L_AT + L_VR)

    Widths may differ (no projection is needed: relations are L × L); head counts must match, unless
    ``relation_heads`` re-splits both models into that many relation heads (MiniLMv2, Wang et al., Findings
    of ACL 2021). MiniLM is task-agnostic pre-training distillation; here it runs on the task data, with the
    logit terms, as a task-specific method.

    Args:
        layer_map: ``final`` (default, the paper's last layer) or any map of ``hidden_mse``.
        relation_heads: None (the models' own heads) or a number dividing both widths.
        beta, alpha, temperature: see :class:`~kdkit.methods.transformer_base.TransformerMethod`.
    """

    part = "minilm"

    def __init__(self, student: nn.Module, teacher, layer_map: LayerMapSpec = "final",
                 relation_heads: Optional[int] = None, **kwargs):
        super().__init__(student, teacher, **kwargs)
        self.use_attention(self.pairs(layer_map), relation_heads)

    def feature_loss(self, batch: Batch, outputs: Outputs) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        at, vr = self.attention_term(batch, outputs, values=True)
        return at + vr, {"minilm_at": at, "minilm_vr": vr}
