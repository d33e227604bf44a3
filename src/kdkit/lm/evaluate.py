"""Language-model numbers: held-out perplexity, next-token agreement with the teacher, generation speed, samples.

Everything is streamed batch by batch: a (B, L', V) logits tensor lives only for one batch and is reduced at once
to sums (negative log-likelihood, hits, agreements), so memory never holds (N, L, V) outputs. This is the one
place where kdkit's loop and metrics treat causal-LM data differently (:func:`kdkit.data.core.has_token_targets`
says when): :func:`lm_quality` for validation during training, :func:`evaluate_lm` for ``kdkit.evaluate``, the
run's final report and ``kdkit evaluate``.

Definitions (over target positions, ``y != -100``, token-weighted):

- ``nll``: mean next-token cross-entropy in nats; ``perplexity = exp(nll)``;
- ``bits_per_byte``: the summed negative log-likelihood in bits over the UTF-8 bytes of the target text
  (:func:`target_bytes`: the bytes each target token stands for under the data's byte-level tokenizer,
  special tokens as 0 bytes). Unlike perplexity per token it compares models with different tokenizers on the same text;
- ``token_accuracy``: share of positions where the arg-max token is the target;
- ``agreement``: share of positions where the model's arg-max equals the teacher's (Stanton et al. 2021 call
  this top-1 agreement);
- ``gen_tokens_per_s``: greedy generation at batch 1 on the CPU, a fixed prompt (the first 8 tokens of the
  first row) and a fixed number of new tokens (end-of-text does not stop it), median of repeats, with the
  model's key/value cache (``hf.generate``).
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..data.core import IGNORE_INDEX, make_loader


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.inference_mode()
def lm_quality(model: nn.Module, data, batch_size: int = 64, teacher: Optional[nn.Module] = None,
               teacher_argmax: Optional[torch.Tensor] = None) -> Tuple[Dict[str, float], Optional[torch.Tensor]]:
    """Streaming NLL, perplexity, next-token accuracy and (with a teacher) agreement of ``model`` on ``data``.

    Args:
        model: a causal LM taking (B, L) ids and returning (B, L', V) logits, ``L' <= L``.
        data: token data (``x``, ``y`` of shape (N, L)).
        teacher: the teacher network, for agreement; its arg-max tokens are returned so a caller that
            validates every epoch computes them once (the teacher is frozen).
        teacher_argmax: (N, L) arg-max tokens of the teacher from an earlier call (then ``teacher`` is not run).

    Returns:
        ``(metrics, teacher_argmax)``.
    """
    was = model.training
    model.eval()
    dev = _device(model)
    t_dev = _device(teacher) if teacher is not None else None
    nll = torch.zeros((), dtype=torch.float64)
    hits = torch.zeros((), dtype=torch.long)
    agree = torch.zeros((), dtype=torch.long)
    count = 0
    new_argmax = None
    if teacher is not None and teacher_argmax is None:
        was_t = teacher.training
        teacher.eval()
        new_argmax = torch.full(tuple(data.y.shape), -1, dtype=torch.long)
    try:
        for batch in make_loader(data, batch_size):
            x, y, idx = batch["x"], batch["y"], batch["index"]
            logits = model(x.to(dev)).float()  # (B, L', V)
            length = logits.shape[1]
            y = y[:, :length].to(dev)  # trimmed columns are padding: -100 there anyway
            mask = y != IGNORE_INDEX
            picked = logits[mask]  # (T, V): this batch's target positions only
            target = y[mask]
            nll += F.cross_entropy(picked, target, reduction="sum").double().cpu()
            pred = picked.argmax(-1)
            hits += (pred == target).sum().cpu()
            count += int(mask.sum())
            if teacher is not None or teacher_argmax is not None:
                if teacher_argmax is not None:
                    t_pred = teacher_argmax[idx][:, :length].to(dev)
                else:
                    t_logits = teacher(x.to(t_dev)).float()
                    t_full = torch.full(tuple(x.shape), -1, dtype=torch.long)
                    t_full[:, :t_logits.shape[1]] = t_logits.argmax(-1).cpu()
                    new_argmax[idx] = t_full
                    t_pred = t_full[:, :length].to(dev)
                agree += (pred == t_pred[mask]).sum().cpu()
    finally:
        model.train(was)
        if new_argmax is not None:
            teacher.train(was_t)
    n = max(count, 1)
    m = {"nll": float(nll) / n, "perplexity": math.exp(min(float(nll) / n, 700.0)), "token_accuracy": int(hits) / n,
         "tokens": count}
    nbytes = target_bytes(data)
    if nbytes:
        m["bits_per_byte"] = float(nll) / math.log(2.0) / nbytes
        m["text_bytes"] = nbytes
    if teacher is not None or teacher_argmax is not None:
        m["agreement"] = int(agree) / n
    return m, (teacher_argmax if teacher_argmax is not None else new_argmax)


def token_byte_lengths(tok) -> Optional[torch.Tensor]:
    """(V,) UTF-8 bytes each token stands for, for a byte-level BPE tokenizer (each character of a byte-level
    token is one byte; special tokens are 0); None for other tokenizers."""
    import json as _json

    spec = _json.loads(tok.to_str())
    if (spec.get("decoder") or {}).get("type") != "ByteLevel":
        return None
    special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    size = tok.get_vocab_size(with_added_tokens=True)
    return torch.tensor([0 if i in special or tok.id_to_token(i) is None else len(tok.id_to_token(i))
                         for i in range(size)], dtype=torch.long)


def target_bytes(data) -> Optional[int]:
    """UTF-8 bytes of ``data``'s target text (``y != -100``), from the data's ``tokenizer.json``: exact for a
    byte-level BPE (the bytes of each target token, special tokens 0), else the length of each row's decoded
    targets. Computed once per dataset; None without a tokenizer file."""
    cached = getattr(data, "_target_bytes", None)
    if cached is not None:
        return cached
    path = getattr(data, "tokenizer_path", None)
    y = getattr(data, "y", None)
    if not path or y is None:
        return None
    from ..errors import KdkitError

    try:
        from .tokenizer import load_tokenizer

        tok = load_tokenizer(path)
    except (ImportError, KdkitError):  # no tokenizers package, or the file moved: left out, not guessed
        return None
    lengths = token_byte_lengths(tok)
    targets = y[y != IGNORE_INDEX]
    if lengths is not None and (targets.numel() == 0 or int(targets.max()) < len(lengths)):
        total = int(lengths[targets].sum())
    else:
        texts = tok.decode_batch([row[row != IGNORE_INDEX].tolist() for row in y], skip_special_tokens=True)
        total = sum(len(t.encode("utf-8")) for t in texts)
    try:
        data._target_bytes = total
    except AttributeError:
        pass
    return total


def _room(model: nn.Module, prompt_len: int, wanted: int) -> int:
    """New tokens that fit the model's learned positions after a prompt of ``prompt_len`` (at least 1)."""
    limit = getattr(model, "max_positions", None)
    return max(1, min(wanted, limit - prompt_len)) if limit else wanted


def _prompt_ids(data, length: int = 8) -> torch.Tensor:
    """The first ``length`` real tokens of the first row: a fixed prompt for timing (1, P)."""
    row = data.x[0]
    pad = getattr(data, "pad_token_id", None)
    real = row[row != pad] if pad is not None else row
    return real[:max(1, min(length, len(real)))].unsqueeze(0).clone()


@torch.inference_mode()
def generation_speed(model: nn.Module, prompt: torch.Tensor, new_tokens: int = 32, repeats: int = 5,
                     warmup: int = 1) -> Dict[str, float]:
    """Greedy generation at batch 1 on the CPU: ``new_tokens`` after ``prompt`` (1, P), median of ``repeats``.

    The model is copied to the CPU if it is elsewhere; end-of-text does not stop generation (a fixed length, so
    every repeat does the same work).
    """
    from ..training.threads import single_thread

    cpu = model if _device(model).type == "cpu" else copy.deepcopy(model).cpu()
    was = cpu.training
    cpu.eval()
    new_tokens = _room(cpu, prompt.shape[1], new_tokens)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    if hasattr(cpu, "hf"):
        kwargs["eos_token_id"] = None
    times = []
    try:
        with single_thread():  # one thread, as every kdkit latency
            for _ in range(warmup):
                cpu.generate(prompt, **kwargs)
            for _ in range(repeats):
                t0 = time.perf_counter()
                cpu.generate(prompt, **kwargs)
                times.append(time.perf_counter() - t0)
    finally:
        cpu.train(was)
    med = statistics.median(times)
    return {"gen_tokens_per_s": new_tokens / med, "gen_ms_per_token": 1000 * med / new_tokens,
            "latency_threads": 1, "latency_repeats": repeats}


@torch.inference_mode()
def samples(model: nn.Module, data, new_tokens: int = 24) -> List[Dict[str, str]]:
    """Greedy continuations of the data's fixed prompts (``data.prompts``), decoded with its tokenizer."""
    prompts = getattr(data, "prompts", None)
    path = getattr(data, "tokenizer_path", None)
    if not prompts or not path or not hasattr(model, "generate"):
        return []
    from .tokenizer import load_tokenizer

    tok = load_tokenizer(path)
    eos = getattr(data, "eos_token_id", None)
    cpu = model if _device(model).type == "cpu" else copy.deepcopy(model).cpu()
    was = cpu.training
    cpu.eval()
    out = []
    try:
        for p in prompts:
            ids = torch.tensor([tok.encode(p, add_special_tokens=False).ids], dtype=torch.long)
            ids = ids[:, :max(1, (getattr(cpu, "max_positions", None) or 10**9) - 1)]
            gen = cpu.generate(ids, max_new_tokens=_room(cpu, ids.shape[1], new_tokens), do_sample=False,
                               eos_token_id=eos)[0, ids.shape[1]:]
            cut = gen.tolist()
            if eos is not None and eos in cut:
                cut = cut[:cut.index(eos)]
            out.append({"prompt": p, "continuation": tok.decode(cut, skip_special_tokens=True)})
    finally:
        cpu.train(was)
    return out


def evaluate_lm(model: nn.Module, data, teacher: Optional[nn.Module] = None, batch_size: int = 64,
                measure_speed: bool = True, sample_text: bool = True) -> Dict[str, Any]:
    """Everything about a causal LM on token data: quality (streamed), size, generation speed, samples.

    Returns:
        ``nll, perplexity, token_accuracy, tokens`` (+ ``agreement`` with a teacher), ``parameters, bytes``,
        ``gen_tokens_per_s, gen_ms_per_token`` and ``samples`` (a list of ``{prompt, continuation}``) when the
        data carries a tokenizer and prompts.
    """
    from ..evaluation.metrics import size

    metrics: Dict[str, Any] = lm_quality(model, data, batch_size, teacher)[0]
    metrics.update(size(model))
    if measure_speed and hasattr(model, "generate"):
        metrics.update(generation_speed(model, _prompt_ids(data)))
    if sample_text:
        s = samples(model, data)
        if s:
            metrics["samples"] = s
    return metrics
