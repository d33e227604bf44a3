"""Text students and teachers for tokenised data: ``(B, L)`` token ids in, logits ``(B, C)`` out.

Every model here has a ``pad_token_id`` attribute and derives its mask as ``x != pad_token_id`` (the
shared text contract, see :mod:`kdkit.hf`). ``vocab_size`` and ``pad_token_id`` are filled in by kdkit
from the tokenised dataset (``DataSplits.info["text"]``) when a config names these models, like
``num_classes``; from Python, pass them yourself.

- ``boe``: bag of embeddings (mean of the non-pad token embeddings, an MLP head): the cheapest baseline.
- ``bilstm``: a one-layer BiLSTM with the last forward and backward states concatenated, a ReLU layer and
  a linear head, as in Tang et al. 2019, "Distilling Task-Specific Knowledge from BERT into Simple Neural
  Networks" (arXiv:1903.12136).
- ``tiny_bert``: a random-config BERT (:func:`kdkit.hf.models.tiny_bert`), ``hf``: any local Hugging Face
  model (:func:`kdkit.hf.models.load`, optionally shrunk); both need the optional extra ``hf``.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import nn

from ..errors import KdkitError
from .zoo import MODELS


def _text_args(vocab_size: Optional[int], pad_token_id: Optional[int], name: str) -> Tuple[int, int]:
    if vocab_size is None or pad_token_id is None:
        raise KdkitError(f"model {name!r} takes token ids: it needs vocab_size and pad_token_id (filled in from a "
                         "tokenised text dataset, or given from Python)")
    if not 0 <= pad_token_id < vocab_size:
        raise KdkitError(f"model {name!r}: pad_token_id {pad_token_id} is outside the vocabulary 0..{vocab_size - 1}")
    return int(vocab_size), int(pad_token_id)


class BagOfEmbeddings(nn.Module):
    """Mean of the token embeddings over non-pad positions, then ``hidden`` ReLU units and a linear head.

    Module names: ``embed``, ``hidden``, ``head``.
    """

    def __init__(self, vocab_size: int, num_classes: int, pad_token_id: int, embed_dim: int = 64, hidden: int = 64,
                 dropout: float = 0.1):
        super().__init__()
        self.pad_token_id = pad_token_id
        self.vocab_size = vocab_size
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_token_id)
        self.hidden = nn.Sequential(nn.Linear(embed_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = (x != self.pad_token_id).unsqueeze(-1).float()  # (B, L, 1)
        summed = (self.embed(x) * mask).sum(1)  # (B, E)
        mean = summed / mask.sum(1).clamp_min(1.0)
        return self.head(self.hidden(mean))


class BiLSTMClassifier(nn.Module):
    """Tang et al. 2019's BiLSTM student: embeddings, a bidirectional LSTM over the real tokens (packed, so
    padding is never read), the final forward and backward hidden states concatenated, a ReLU layer, a head.

    Module names: ``embed``, ``lstm``, ``hidden``, ``head``.
    """

    def __init__(self, vocab_size: int, num_classes: int, pad_token_id: int, embed_dim: int = 64, hidden: int = 64,
                 layers: int = 1, dropout: float = 0.1):
        super().__init__()
        self.pad_token_id = pad_token_id
        self.vocab_size = vocab_size
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_token_id)
        self.lstm = nn.LSTM(embed_dim, hidden, num_layers=layers, batch_first=True, bidirectional=True,
                            dropout=dropout if layers > 1 else 0.0)
        self.hidden = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lengths = (x != self.pad_token_id).sum(1).clamp_min(1).cpu()  # (B,); an all-pad row reads one token
        packed = nn.utils.rnn.pack_padded_sequence(self.embed(x), lengths, batch_first=True, enforce_sorted=False)
        _, (h, _) = self.lstm(packed)  # h: (layers * 2, B, H), in the original batch order
        last = torch.cat([h[-2], h[-1]], dim=1)  # last layer: forward final state, backward final state
        return self.head(self.hidden(last))


@MODELS.register("boe")
def boe(num_classes: int, vocab_size: Optional[int] = None, pad_token_id: Optional[int] = None, embed_dim: int = 64,
        hidden: int = 64, dropout: float = 0.1) -> nn.Module:
    """Bag of embeddings: mean non-pad token embedding -> ReLU layer -> head (token ids in)."""
    v, p = _text_args(vocab_size, pad_token_id, "boe")
    return BagOfEmbeddings(v, num_classes, p, embed_dim, hidden, dropout)


@MODELS.register("bilstm")
def bilstm(num_classes: int, vocab_size: Optional[int] = None, pad_token_id: Optional[int] = None,
           embed_dim: int = 64, hidden: int = 64, layers: int = 1, dropout: float = 0.1) -> nn.Module:
    """BiLSTM classifier of Tang et al. 2019 (token ids in)."""
    v, p = _text_args(vocab_size, pad_token_id, "bilstm")
    return BiLSTMClassifier(v, num_classes, p, embed_dim, hidden, layers, dropout)


@MODELS.register("tiny_bert")
def tiny_bert(num_classes: int, input_shape: Tuple[int, ...] = (128,), vocab_size: Optional[int] = None,
              pad_token_id: Optional[int] = None, layers: int = 2, hidden: int = 32, heads: int = 2,
              intermediate: Optional[int] = None, dropout: float = 0.1) -> nn.Module:
    """A random-config BERT classifier (needs the extra ``hf``); positions sized to the data's sequence length."""
    from ..hf.models import tiny_bert as build

    v, p = _text_args(vocab_size, pad_token_id, "tiny_bert")
    return build(v, num_classes, layers=layers, hidden=hidden, heads=heads, intermediate=intermediate,
                 max_length=max(int(input_shape[0]), 8), pad_token_id=p, dropout=dropout)


@MODELS.register("hf")
def hf(num_classes: int, path: Optional[str] = None, layers: Optional[List[int]] = None,
       hidden: Optional[int] = None, init: Optional[str] = None, attention: Optional[str] = None,
       narrow: str = "random", intermediate: Optional[int] = None, trim_vocab: bool = False,
       corpus_ids: Optional[torch.Tensor] = None) -> nn.Module:
    """A local Hugging Face model directory (``path``; ``minilm``: the MiniLM-L6 of the ``bench`` extra) with
    ``num_classes`` labels, optionally shrunk (``layers``: keep these encoder layers with their weights;
    ``hidden``: a narrower model). ``init``: a kdkit run directory (or ``.safetensors``) of the same
    model whose weights are loaded before shrinking, e.g. the fine-tuned teacher. ``attention``: the attention
    implementation (``eager`` when a method reads attention probabilities; default: transformers' choice).

    ``narrow``: how a ``hidden`` narrower than the model's is made: ``random`` (a fresh config, random weights)
    or ``prune`` (the hidden dimensions, heads and feed-forward units (``intermediate``) most active on the
    training texts, sliced from the model's weights: :func:`kdkit.hf.slim.prune_width`). ``trim_vocab``: keep only
    the embedding rows of the tokens the training texts use (:func:`kdkit.hf.slim.trim_vocabulary`; other tokens
    read as the unknown token). Needs the extra ``hf``."""
    from ..hf.models import load, shrink

    if path is None:
        raise KdkitError("model 'hf' needs path: a local Hugging Face model directory (or 'minilm')")
    if narrow not in ("random", "prune"):
        raise KdkitError(f"model 'hf': narrow must be 'random' or 'prune'; given {narrow!r}")
    if (narrow == "prune" and hidden is not None or trim_vocab) and corpus_ids is None:
        raise KdkitError("model 'hf': narrow: prune and trim_vocab read the training texts' token ids; build the "
                         "model from a tokenised text dataset (or pass corpus_ids from Python)")
    model = load(path, num_labels=num_classes, attn_implementation=attention,
                 log=(lambda _: None) if init is not None else print)
    if init is not None:
        from ..training.checkpoint import load_weights

        load_weights(model, init)
    if narrow == "prune" and hidden is not None:
        from ..hf.slim import prune_width

        if layers is not None:
            model = shrink(model, layers=layers)
        model = prune_width(model, corpus_ids[:512], hidden=hidden, intermediate=intermediate)
    elif layers is not None or hidden is not None:
        model = shrink(model, layers=layers, hidden=hidden, intermediate=intermediate)
    if trim_vocab:
        from ..hf.slim import trim_vocabulary

        model = trim_vocabulary(model, corpus_ids)
    return model
