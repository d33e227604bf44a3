"""Hugging Face sequence classifiers behind kdkit's text contract: ``(B, L)`` token ids in, logits out."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ..errors import KdkitError
from . import require_hf


def trim_to_longest(x: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """Drop trailing columns that are padding in every row of ``x`` (B, L); keep at least one column.

    Right padding is the contract (the tokenising step refuses the pad id as a real token), so the
    longest row's length is the number of columns any row needs. One host sync per batch.
    """
    longest = int((x != pad_token_id).sum(1).max()) if x.numel() else 0
    return x[:, :max(longest, 1)] if longest < x.shape[1] else x


class HFClassifier(nn.Module):
    """A Hugging Face ``...ForSequenceClassification`` model taking ``(B, L)`` ids, returning logits ``(B, C)``.

    The attention mask is ``x != pad_token_id``. With ``trim=True`` (default) trailing columns that are
    pad in the whole batch are dropped first (dynamic padding: a batch pays only for its longest
    sequence); export turns it off so the traced graph keeps a symbolic sequence axis. The wrapped
    model is the ``hf`` attribute, so hook names read ``hf.bert.encoder.layer.1``.

    Args:
        hf_model: a transformers model whose output has ``.logits`` of shape (B, C).
        pad_token_id: the tokenizer's pad id.
        tokenizer: optional tokenizer kept with the model (``model.tokenizer``); not a submodule,
            not saved in checkpoints.
    """

    def __init__(self, hf_model: nn.Module, pad_token_id: int, tokenizer: Any = None, trim: bool = True):
        super().__init__()
        if pad_token_id is None or int(pad_token_id) < 0:
            raise KdkitError(f"HFClassifier needs the tokenizer's pad id (an int >= 0); got {pad_token_id!r}")
        self.hf = hf_model
        self.pad_token_id = int(pad_token_id)
        self.trim = trim
        self.tokenizer = tokenizer

    @property
    def num_labels(self) -> int:
        return int(self.hf.config.num_labels)

    @property
    def vocab_size(self) -> int:
        return int(self.hf.config.vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype not in (torch.int64, torch.int32):
            raise KdkitError(f"HFClassifier takes integer token ids (B, L); got dtype {x.dtype}")
        if self.trim:
            x = trim_to_longest(x, self.pad_token_id)
        mask = (x != self.pad_token_id).long()  # (B, L)
        return self.hf(input_ids=x, attention_mask=mask).logits  # (B, C)


def tiny_bert(vocab_size: int, num_labels: int, layers: int = 2, hidden: int = 32, heads: int = 2,
              intermediate: Optional[int] = None, max_length: int = 128, pad_token_id: int = 0,
              attn_implementation: str = "eager", dropout: float = 0.1) -> HFClassifier:
    """A randomly initialised ``BertForSequenceClassification`` wrapped in :class:`HFClassifier` (tests, students).

    Weights come from torch's global generator, so the run's seed fixes them. Attention defaults to the
    ``eager`` implementation so attention probabilities are observable (TinyBERT/MiniLM losses).
    """
    transformers = require_hf()
    if hidden % heads:
        raise KdkitError(f"tiny_bert: hidden ({hidden}) must be divisible by heads ({heads})")
    config = transformers.BertConfig(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=intermediate or 4 * hidden, max_position_embeddings=max_length, num_labels=num_labels,
        pad_token_id=pad_token_id, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    config._attn_implementation = attn_implementation
    return HFClassifier(transformers.BertForSequenceClassification(config), pad_token_id)
