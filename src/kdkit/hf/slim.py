"""Making a Hugging Face text classifier smaller without retraining it from nothing.

- :func:`trim_vocabulary`: keep only the embedding rows of the tokens a corpus uses (TextPruner's vocabulary
  pruning, Yang et al. 2022, arXiv:2203.15996). The tokenizer is not changed: the model maps its ids to the kept
  rows in its first operation (a lookup table of one int64 per original id), and an id outside the kept set maps
  to the unknown token's row, as the tokenizer itself does for a word it cannot spell. On the corpus the outputs
  are exactly the untrimmed model's.
- :func:`prune_width`: a narrower model whose every tensor is a slice of the teacher's (fewer hidden
  dimensions, attention heads and feed-forward units), chosen by their mean activation on a few corpus texts,
  as in Minitron's width pruning (Muralidharan et al. 2024, arXiv:2407.14679). It is a starting point for
  distillation, not a finished model: LayerNorm over fewer dimensions changes its outputs.

Both return a new :class:`~kdkit.hf.models.HFClassifier`; the model passed in is not modified.
"""

from __future__ import annotations

import copy
from typing import Dict, List, Optional

import torch
from torch import nn

from ..data.core import trim_to_longest
from ..errors import KdkitError
from .models import HFClassifier


def used_ids(ids: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """The sorted distinct token ids of a tokenised corpus ``(N, L)``, padding excluded."""
    ids = torch.as_tensor(ids)
    return torch.unique(ids[ids != pad_token_id]).sort().values


def _special_ids(model: HFClassifier) -> List[int]:
    """The tokenizer's special ids (pad, unknown, [CLS], [SEP], mask...): always kept."""
    ids = {model.pad_token_id}
    tok = model.tokenizer
    if tok is not None:
        ids.update(int(i) for i in getattr(tok, "all_special_ids", []) if i is not None and i >= 0)
    cfg = model.hf.config
    for name in ("bos_token_id", "eos_token_id", "sep_token_id", "cls_token_id"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value >= 0:
            ids.add(value)
    return sorted(ids)


def _unk_id(model: HFClassifier) -> int:
    tok = model.tokenizer
    unk = getattr(tok, "unk_token_id", None) if tok is not None else None
    if unk is None:
        raise KdkitError("trim_vocabulary needs the model's tokenizer (with an unknown token) to map the ids it "
                         "drops; load the model with kdkit.hf.load(..., tokenizer=True)")
    return int(unk)


def trim_vocabulary(model: HFClassifier, corpus_ids: torch.Tensor) -> HFClassifier:
    """A copy of ``model`` that keeps only the embedding rows of the ids in ``corpus_ids`` (N, L), the special
    tokens and the unknown token; every other id is read as the unknown token.

    The result takes the same ids as before (``vocab_size`` is still the tokenizer's), holds ``id_map`` (a
    buffer: original id -> kept row), and gives outputs identical to ``model`` on every text whose tokens are all
    in the corpus.

    Raises:
        KdkitError: not an HFClassifier, a model trimmed already, ids outside the vocabulary, or no tokenizer.
    """
    if not isinstance(model, HFClassifier):
        raise KdkitError(f"trim_vocabulary takes a kdkit.hf.HFClassifier; got {type(model).__name__}")
    if model.id_map is not None:
        raise KdkitError("trim_vocabulary: this model's vocabulary is trimmed already")
    embedding = model.hf.get_input_embeddings()
    vocab = int(embedding.weight.shape[0])
    corpus = used_ids(corpus_ids, model.pad_token_id)
    if len(corpus) and (int(corpus[0]) < 0 or int(corpus[-1]) >= vocab):
        raise KdkitError(f"trim_vocabulary: corpus ids span {int(corpus[0])}..{int(corpus[-1])} but the model has "
                         f"{vocab} embedding rows; expected ids from the model's own tokenizer")
    unk = _unk_id(model)
    keep = torch.unique(torch.cat([corpus, torch.tensor(_special_ids(model) + [unk], dtype=torch.long)])).sort().values
    out = copy.deepcopy(model)
    new = nn.Embedding(len(keep), embedding.weight.shape[1], padding_idx=None)
    with torch.no_grad():
        new.weight.copy_(embedding.weight[keep])
    out.hf.set_input_embeddings(new)
    id_map = torch.full((vocab,), int((keep == unk).nonzero()[0, 0]), dtype=torch.long)
    id_map[keep] = torch.arange(len(keep))
    out.set_id_map(id_map)
    # The config's vocab_size stays the tokenizer's: it is the range of ids the model accepts.
    return out


# ----------------------------------------------------------------------------- width pruning

def _bert_parts(hf_model: nn.Module):
    """The embeddings, encoder layers, pooler and classifier of a BERT-family sequence classifier."""
    base = getattr(hf_model, getattr(hf_model, "base_model_prefix", "bert"), None)
    if base is None or not hasattr(base, "embeddings") or not hasattr(base, "encoder"):
        raise KdkitError(f"prune_width supports BERT-style encoders (embeddings, encoder.layer); got "
                         f"{type(hf_model).__name__}")
    return base, base.embeddings, list(base.encoder.layer), getattr(base, "pooler", None), hf_model.classifier


@torch.no_grad()
def _importance(model: HFClassifier, ids: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Mean absolute activations on ``ids``: per hidden dimension (embedding output and every layer's output),
    per attention head of each layer (its context vectors' norm) and per feed-forward unit of each layer."""
    _, emb, layers, _, _ = _bert_parts(model.hf)
    heads = int(model.hf.config.num_attention_heads)
    found: Dict[str, torch.Tensor] = {}
    mask_holder: Dict[str, torch.Tensor] = {}

    def add(key: str, value: torch.Tensor) -> None:
        found[key] = found.get(key, 0) + value

    def real(t: torch.Tensor) -> torch.Tensor:  # (B, L, D) -> (tokens, D), padding left out
        return t[mask_holder["mask"]]

    hooks = [emb.register_forward_hook(lambda m, i, o: add("hidden", real(o).abs().mean(0)))]
    for n, layer in enumerate(layers):
        hooks.append(layer.output.register_forward_hook(
            lambda m, i, o: add("hidden", real(o).abs().mean(0))))
        hooks.append(layer.attention.output.dense.register_forward_pre_hook(
            lambda m, i, n=n: add(f"heads.{n}", real(i[0]).unflatten(-1, (heads, -1)).norm(dim=-1).mean(0))))
        hooks.append(layer.output.dense.register_forward_pre_hook(
            lambda m, i, n=n: add(f"ffn.{n}", real(i[0]).abs().mean(0))))
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(ids), 32):
            batch = ids[start:start + 32]
            if model.trim:
                batch = trim_to_longest(batch, model.pad_token_id)
            mask_holder["mask"] = batch != model.pad_token_id
            model(batch)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return found


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The indices of the ``k`` largest scores, in increasing index order (the kept units keep their order)."""
    return torch.topk(scores, k).indices.sort().values


def _slice_linear(linear: nn.Linear, rows: Optional[torch.Tensor] = None,
                  cols: Optional[torch.Tensor] = None) -> nn.Linear:
    w = linear.weight.detach()
    w = w if rows is None else w[rows]
    w = w if cols is None else w[:, cols]
    out = nn.Linear(w.shape[1], w.shape[0], bias=linear.bias is not None)
    with torch.no_grad():
        out.weight.copy_(w)
        if linear.bias is not None:
            out.bias.copy_(linear.bias.detach() if rows is None else linear.bias.detach()[rows])
    return out


def _slice_norm(norm: nn.LayerNorm, dims: torch.Tensor) -> nn.LayerNorm:
    out = nn.LayerNorm(len(dims), eps=norm.eps)
    with torch.no_grad():
        out.weight.copy_(norm.weight.detach()[dims])
        out.bias.copy_(norm.bias.detach()[dims])
    return out


def prune_width(model: HFClassifier, calibration_ids: torch.Tensor, hidden: Optional[int] = None,
                heads: Optional[int] = None, intermediate: Optional[int] = None) -> HFClassifier:
    """A narrower copy of a BERT-style ``model``: ``hidden`` of its hidden dimensions, ``heads`` of each layer's
    attention heads (the head size is kept) and ``intermediate`` of each layer's feed-forward units, the ones
    with the largest mean activation on ``calibration_ids`` (N, L). Every weight is a slice of the model's.

    Defaults: ``heads`` = ``hidden`` / head size (so the attention width equals the hidden width, as BERT's
    config requires), ``intermediate`` = the model's ratio times ``hidden``. Keeping everything returns a model
    with identical outputs; a smaller ``hidden`` changes them (LayerNorm statistics over fewer dimensions), so
    distil the result.

    Raises:
        KdkitError: a size above the model's, a hidden width the heads cannot divide, or not a BERT-style model.
    """
    if not isinstance(model, HFClassifier):
        raise KdkitError(f"prune_width takes a kdkit.hf.HFClassifier; got {type(model).__name__}")
    config = model.hf.config
    t_hidden, t_heads, t_inter = int(config.hidden_size), int(config.num_attention_heads), int(
        config.intermediate_size)
    head_size = t_hidden // t_heads
    hidden = int(hidden or t_hidden)
    heads = int(heads or hidden // head_size)
    intermediate = int(intermediate or round(t_inter * hidden / t_hidden))
    for name, value, limit in (("hidden", hidden, t_hidden), ("heads", heads, t_heads),
                               ("intermediate", intermediate, t_inter)):
        if not 1 <= value <= limit:
            raise KdkitError(f"prune_width: {name} must be between 1 and the model's {limit}; given {value}")
    if heads * head_size != hidden:
        raise KdkitError(f"prune_width: {heads} heads of size {head_size} make {heads * head_size} attention "
                         f"dimensions, but BERT's layers need as many as hidden ({hidden}); choose hidden a "
                         f"multiple of {head_size}")
    scores = _importance(model, torch.as_tensor(calibration_ids))
    out = copy.deepcopy(model)
    base, emb, layers, pooler, classifier = _bert_parts(out.hf)
    dims = _top(scores["hidden"], hidden)
    with torch.no_grad():
        for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
            table = getattr(emb, name, None)
            if table is not None:
                new = nn.Embedding(table.weight.shape[0], hidden, padding_idx=table.padding_idx)
                new.weight.copy_(table.weight.detach()[:, dims])
                setattr(emb, name, new)
        emb.LayerNorm = _slice_norm(emb.LayerNorm, dims)
        for n, layer in enumerate(layers):
            kept = _top(scores[f"heads.{n}"], heads)
            rows = (kept[:, None] * head_size + torch.arange(head_size)).flatten()
            att = layer.attention
            for name in ("query", "key", "value"):
                setattr(att.self, name, _slice_linear(getattr(att.self, name), rows, dims))
            att.self.num_attention_heads, att.self.all_head_size = heads, heads * head_size
            if hasattr(att.self, "attention_head_size"):
                att.self.attention_head_size = head_size
            att.output.dense = _slice_linear(att.output.dense, dims, rows)
            att.output.LayerNorm = _slice_norm(att.output.LayerNorm, dims)
            units = _top(scores[f"ffn.{n}"], intermediate)
            layer.intermediate.dense = _slice_linear(layer.intermediate.dense, units, dims)
            layer.output.dense = _slice_linear(layer.output.dense, dims, units)
            layer.output.LayerNorm = _slice_norm(layer.output.LayerNorm, dims)
        if pooler is not None:
            pooler.dense = _slice_linear(pooler.dense, dims, dims)
        out.hf.classifier = _slice_linear(classifier, None, dims)
    for cfg in (out.hf.config, base.config):
        cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size = hidden, heads, intermediate
    return out


__all__ = ["prune_width", "trim_vocabulary", "used_ids"]
