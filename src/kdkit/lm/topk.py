"""Offline LM distillation from the teacher's top-k tokens per position, with the missing mass kept explicitly.

Storing a teacher's full distribution costs V numbers per token (32,000 float16 values = 64 KB per token, 64 GB
per million tokens). Here each predicted token keeps:

- ``values`` (k,) float16: the teacher's log-probabilities ``log p_i`` of its k most likely tokens at the
  stored temperature T (logits shifted by their log-sum-exp: still logits, and the masses they stand for are
  exact up to float16 rounding);
- ``indices`` (k,) int32: which tokens those are;
- ``log_tail`` () float32: ``log r``, the log of the mass outside the top k, ``r = 1 - Σ_i p_i``, computed from
  the full logits (``logsumexp`` over the other V - k tokens), so it is not lost to rounding.

That is ``6k + 4`` bytes per token (:func:`storage_bytes`): 196 MB per million tokens at k = 32.

**The loss against a sparse teacher** (:func:`sparse_distill_loss`) compares two distributions over k + 1
outcomes: the teacher's k tokens plus one "everything else" bucket of mass r, and the student's probabilities of
the same k tokens plus the student's own mass outside them, ``q_rest = 1 - Σ_i q_i`` (computed as a log-sum-exp
over the student's other logits). Any divergence of :mod:`kdkit.lm.losses` applies to these (k + 1)-bucket
distributions. This is the exact divergence between the two distributions coarsened to the partition
{top-k tokens one by one, the rest as one event}. For forward KL the chain rule of relative entropy (Cover &
Thomas, *Elements of Information Theory*, Thm. 2.5.3) splits the full loss as

    ``KL(p ‖ q) = KL_bucket(p ‖ q) + r · KL(p_tail/r ‖ q_tail/q_rest)``,

so the bucket loss is the full one minus the term that needs the teacher's tail *shape*, which is not stored.
It is a lower bound on the full forward KL, exact when k = V, and it pulls the student's tail mass to the
teacher's without inventing a shape for it. The common alternatives drop the tail (renormalising the top k to
sum to one), which Anshumann et al. ("Sparse Logit Sampling: Accelerating Knowledge Distillation in LLMs",
ACL 2025) show gives the student a biased (over-confident) target, or spread it uniformly over the other
tokens, which teaches the student a flat tail that the teacher does not have (kdkit's classification cache,
:mod:`kdkit.teacher.cache`, does the latter for small class counts).

**What truncation loses** (:func:`truncation_kl`): per token, ``KL(p ‖ p̂)`` between the full teacher and the
distribution the stored record determines when nothing else is known, ``p̂``: the stored top-k probabilities
(float16, renormalised with the tail) and the tail mass r spread uniformly over the other V - k tokens. By the
same chain rule it is ``Σ_topk p_i log(p_i / p̂_i) + r · KL(p_tail/r ‖ uniform)``: the float16 rounding plus the
information in the tail's shape. It is zero (up to rounding) when k = V.

**On disk**: :mod:`kdkit.lm.store` writes these records (with 16-bit ids where the vocabulary allows) beside
its ``sampled`` and ``full`` kinds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F

from ..errors import KdkitError
from .losses import (
    IGNORE_INDEX,
    ChunkSize,
    LMLoss,
    check_labels,
    check_options,
    chunked_token_mean,
    divergence_tokens,
    predicted_tokens,
    resolve_chunk_size,
)

_VALUE_DTYPES = {"float16": (torch.float16, 2), "float32": (torch.float32, 4)}
# Finite stand-ins for log 0: exp() of them is exactly 0, and differences of them stay finite, so an empty
# bucket (k = V) contributes 0 to every divergence and nothing NaN reaches a gradient.
_LOG_ZERO_TEACHER = -1e30
_LOG_ZERO_STUDENT_LOGIT = torch.finfo(torch.float32).min / 4


def storage_bytes(num_tokens: int, k: int, value_dtype: str = "float16") -> int:
    """Bytes of a sparse teacher for ``num_tokens`` predicted tokens: ``num_tokens · (k · (value + 4) + 4)``
    (values, int32 indices, one float32 log tail mass per token), plus nothing for padding. The file adds
    8 bytes per row (offsets) and a small ``meta.json``.

    ``storage_bytes(10**6, k)`` is the storage per million tokens: 10 MB at k = 1, 196 MB at k = 32;
    the dense float16 distribution over V = 32,000 tokens would be 64 GB."""
    if value_dtype not in _VALUE_DTYPES:
        raise KdkitError(f"value_dtype must be float16 or float32; got {value_dtype!r}")
    return int(num_tokens) * (int(k) * (_VALUE_DTYPES[value_dtype][1] + 4) + 4)


def dense_storage_bytes(num_tokens: int, vocab_size: int, bytes_per_value: int = 2) -> int:
    """Bytes of the full teacher distribution for ``num_tokens`` tokens (float16 by default), for comparison."""
    return int(num_tokens) * int(vocab_size) * int(bytes_per_value)


@dataclass
class SparseTargets:
    """The sparse teacher for N predicted tokens, in the row-major order of ``labels != -100``.

    Attributes:
        values: (N, k) float16 (or float32) teacher log-probabilities of its top-k tokens at ``temperature``.
        indices: (N, k) int32 token ids.
        log_tail: (N,) float32 log of the teacher's mass outside the top k (``-inf`` when k = V).
        vocab_size: V.
        temperature: the T the probabilities were taken at; the student is compared at the same T.
        row_lengths: optional (B,) number of predicted tokens of each row, checked against the labels.
    """

    values: torch.Tensor
    indices: torch.Tensor
    log_tail: torch.Tensor
    vocab_size: int
    temperature: float = 1.0
    row_lengths: Optional[torch.Tensor] = None

    @property
    def k(self) -> int:
        return int(self.values.shape[1])

    @property
    def num_tokens(self) -> int:
        return int(self.values.shape[0])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.values, self.indices, self.log_tail))

    def to(self, device: Union[str, torch.device]) -> "SparseTargets":
        return SparseTargets(self.values.to(device), self.indices.to(device), self.log_tail.to(device),
                             self.vocab_size, self.temperature, self.row_lengths)

    def bucket_log_probs(self, start: int = 0, end: Optional[int] = None) -> torch.Tensor:
        """(n, k + 1) float32 teacher log-probabilities of the top-k tokens and the tail bucket, renormalised
        (float16 values do not sum exactly to ``1 - r``), with a finite floor for an empty bucket."""
        sl = slice(start, end)
        raw = torch.cat([self.values[sl].float(), self.log_tail[sl].float()[:, None]], dim=1)
        return F.log_softmax(raw, dim=1).clamp_min(_LOG_ZERO_TEACHER)


def topk_targets(teacher_logits: torch.Tensor, labels: torch.Tensor, k: int, *, temperature: float = 1.0,
                 value_dtype: str = "float16", chunk_size: ChunkSize = "auto",
                 ignore_index: int = IGNORE_INDEX) -> SparseTargets:
    """Compress the teacher's distribution at every predicted token to its top k (see the module docstring).

    Args:
        teacher_logits: (B, L, V).
        labels: (B, L) int; only positions with ``labels != ignore_index`` are kept.
        k: tokens kept per position, 1 <= k <= V.
        temperature: T of the stored distribution (the loss compares the student at the same T).
        value_dtype: "float16" (default) or "float32" for the log-probabilities.
        chunk_size: tokens processed at a time ("auto": about 2**22 logits), bounding memory.

    Returns:
        :class:`SparseTargets` for the N predicted tokens, with ``row_lengths``.
    """
    check_labels(teacher_logits, labels)
    vocab = teacher_logits.shape[-1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= vocab:
        raise KdkitError(f"top-k k must be an integer in [1, {vocab}] (the vocabulary size); got {k!r}")
    if not temperature > 0:
        raise KdkitError(f"temperature must be > 0; got {temperature}")
    if value_dtype not in _VALUE_DTYPES:
        raise KdkitError(f"value_dtype must be float16 or float32; got {value_dtype!r}")
    index, _ = predicted_tokens(labels, vocab, ignore_index)
    flat = teacher_logits.detach().reshape(-1, vocab)
    chunk = resolve_chunk_size(chunk_size, vocab) or max(index.numel(), 1)
    values, indices, tails = [], [], []
    with torch.no_grad():
        for start in range(0, index.numel(), chunk):
            z = flat.index_select(0, index[start:start + chunk]).float() / temperature  # (c, V)
            lse = torch.logsumexp(z, dim=1, keepdim=True)
            top_v, top_i = z.topk(k, dim=1)
            tail = torch.logsumexp(z.scatter(1, top_i, float("-inf")), dim=1)  # -inf when k = V
            values.append((top_v - lse).to(_VALUE_DTYPES[value_dtype][0]))
            indices.append(top_i.to(torch.int32))
            tails.append(tail - lse.squeeze(1))
    dev = teacher_logits.device
    empty = (torch.zeros(0, k, dtype=_VALUE_DTYPES[value_dtype][0], device=dev),
             torch.zeros(0, k, dtype=torch.int32, device=dev), torch.zeros(0, device=dev))
    return SparseTargets(
        values=torch.cat(values) if values else empty[0], indices=torch.cat(indices) if indices else empty[1],
        log_tail=torch.cat(tails) if tails else empty[2], vocab_size=vocab, temperature=float(temperature),
        row_lengths=(labels != ignore_index).sum(1).cpu())


def check_record(student_logits: torch.Tensor, labels: torch.Tensor, targets, n: int, ignore_index: int) -> None:
    """A teacher record (top-k here, or any of :mod:`kdkit.lm.store`'s) fits a batch: the same vocabulary, as many
    predicted tokens, the same tokens per row."""
    if targets.vocab_size != student_logits.shape[-1]:
        raise KdkitError(f"the teacher's record has vocabulary size {targets.vocab_size} but the student's logits "
                         f"have {student_logits.shape[-1]}; it needs the same tokenizer")
    if targets.num_tokens != n:
        raise KdkitError(f"the teacher's record holds {targets.num_tokens} tokens for this batch but its labels "
                         f"predict {n} (labels != -100); it must be built from the same data")
    if targets.row_lengths is not None:
        have = (labels != ignore_index).sum(1).cpu()
        if not torch.equal(have, targets.row_lengths.cpu().to(have.dtype)):
            raise KdkitError(f"the teacher's record has {targets.row_lengths.tolist()} tokens per row but the labels "
                             f"{have.tolist()}; it must be built from the same rows")


def sparse_distill_loss(student_logits: torch.Tensor, labels: torch.Tensor, targets: SparseTargets, *,
                        divergence: str = "forward_kl", alpha: float = 1.0, beta: float = 0.5, skew: float = 0.1,
                        chunk_size: ChunkSize = "auto", ignore_index: int = IGNORE_INDEX) -> LMLoss:
    """Distillation from a sparse teacher with the missing mass as one extra bucket (see the module docstring).

    ``loss = alpha · T² · mean_tokens D(p_bucket ‖ q_bucket) + (1 - alpha) · mean_tokens -log q(y)``, where the
    bucket distributions are over the teacher's top-k tokens plus "the rest", T is ``targets.temperature`` and the
    cross-entropy is at T = 1, as in :func:`kdkit.lm.losses.lm_distill_loss`; with k = V it equals that loss.

    Args:
        student_logits: (B, L, V) full student logits.
        labels: (B, L) int64, ``ignore_index`` where nothing is predicted (the same labels the targets were
            built with).
        targets: :class:`SparseTargets` for the predicted tokens (row-major order).
        divergence, alpha, beta, skew, chunk_size: as in :func:`kdkit.lm.losses.lm_distill_loss`.

    Returns:
        :class:`~kdkit.lm.losses.LMLoss` ``(loss, kd, ce)``.
    """
    temperature = targets.temperature
    check_options(divergence, temperature, alpha, beta, skew)
    check_labels(student_logits, labels)
    index, y = predicted_tokens(labels, student_logits.shape[-1], ignore_index)
    check_record(student_logits, labels, targets, index.numel(), ignore_index)
    t2 = temperature * temperature
    top_idx = targets.indices.to(student_logits.device)

    def terms(s: torch.Tensor, start: int, end: int):
        idx = top_idx[start:end].long()  # (c, k)
        z = s / temperature
        lse = torch.logsumexp(z, dim=1, keepdim=True)
        log_q_top = z.gather(1, idx) - lse  # (c, k)
        # The student's mass outside the teacher's top k, from its other logits (finite when k = V).
        log_q_rest = torch.logsumexp(z.scatter(1, idx, _LOG_ZERO_STUDENT_LOGIT), dim=1, keepdim=True) - lse
        log_q = torch.cat([log_q_top, log_q_rest], dim=1)  # (c, k + 1)
        log_p = targets.bucket_log_probs(start, end).to(s.device)
        kd = t2 * divergence_tokens(log_q, log_p, divergence, beta, skew)
        log_q1 = (z - lse) if temperature == 1.0 else F.log_softmax(s, dim=1)
        ce = -log_q1.gather(1, y[start:end, None]).squeeze(1)
        return alpha * kd + (1.0 - alpha) * ce, kd, ce

    return chunked_token_mean(student_logits, index, terms, chunk_size)


def sparse_kd_loss(student_logits: torch.Tensor, labels: torch.Tensor, targets: SparseTargets, *,
                   divergence: str = "forward_kl", beta: float = 0.5, skew: float = 0.1,
                   chunk_size: ChunkSize = "auto", ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The bucketed divergence alone: :func:`sparse_distill_loss` with ``alpha = 1``. Returns a scalar."""
    return sparse_distill_loss(student_logits, labels, targets, divergence=divergence, alpha=1.0, beta=beta,
                               skew=skew, chunk_size=chunk_size, ignore_index=ignore_index).loss


def truncation_kl(teacher_logits: torch.Tensor, labels: torch.Tensor, targets: SparseTargets, *,
                  chunk_size: ChunkSize = "auto", ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Per predicted token, ``KL(p ‖ p̂)``: the full teacher against what the sparse record determines (stored
    top-k probabilities, tail mass spread uniformly over the other V - k tokens), at the targets' temperature.

    Args:
        teacher_logits: (B, L, V) the logits ``targets`` was built from.
        labels: (B, L).
        targets: :class:`SparseTargets`.

    Returns:
        (N,) float32, in nats; 0 up to float16 rounding when k = V.
    """
    check_labels(teacher_logits, labels)
    vocab = teacher_logits.shape[-1]
    index, _ = predicted_tokens(labels, vocab, ignore_index)
    check_record(teacher_logits, labels, targets, index.numel(), ignore_index)
    flat = teacher_logits.detach().reshape(-1, vocab)
    chunk = resolve_chunk_size(chunk_size, vocab) or max(index.numel(), 1)
    k = targets.k
    out = []
    with torch.no_grad():
        for start in range(0, index.numel(), chunk):
            end = min(start + chunk, index.numel())
            log_p = F.log_softmax(flat.index_select(0, index[start:end]).float() / targets.temperature, dim=1)
            bucket = targets.bucket_log_probs(start, end).to(log_p.device)  # (c, k + 1)
            rest = bucket[:, k:] - math.log(vocab - k) if k < vocab else bucket[:, k:]
            log_hat = rest.expand(-1, vocab).clone().scatter_(1, targets.indices[start:end].long().to(log_p.device),
                                                              bucket[:, :k])
            p = log_p.exp()
            out.append(torch.where(p > 0, p * (log_p - log_hat), torch.zeros_like(p)).sum(1))
    return torch.cat(out) if out else torch.zeros(0)
