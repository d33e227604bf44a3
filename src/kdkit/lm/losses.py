"""Token-level distillation losses for causal language models, as pure functions.

Shapes: B = batch, L = sequence length, V = vocabulary, N = number of predicted tokens in the batch.

Logits are (B, L, V) for the student and the teacher; ``labels`` is (B, L) int64, ``labels[b, t]`` the token
position t must predict and ``-100`` where nothing is predicted (padding, prompt tokens, the last position).
Only positions with ``labels != -100`` contribute, to every term; every loss is a **mean over those tokens**
(the sum over predicted tokens divided by their number N, whatever the batch's padding), and zero, with a
gradient path, when a batch predicts nothing.

Divergences (``p`` = teacher, ``q`` = student, both ``softmax(logits / T)`` over the vocabulary, per token):

- ``forward_kl``: ``KL(p ‖ q) = Σ_v p_v (log p_v - log q_v)`` (Hinton et al. 2015; Kim & Rush 2016's word-level
  KD): mass-covering, the classical choice.
- ``reverse_kl``: ``KL(q ‖ p)``: mode-seeking (Gu et al., "MiniLLM", ICLR 2024, at the sequence level).
- ``jsd``: the generalised Jensen-Shannon divergence of GKD (Agarwal et al., "On-Policy Distillation of Language
  Models: Learning from Self-Generated Mistakes", ICLR 2024, section 3):
  ``JSD(β)(p ‖ q) = β KL(p ‖ m) + (1 - β) KL(q ‖ m)`` with ``m = β p + (1 - β) q``. ``β = 0.5`` is the usual JSD.
  Both ends are degenerate (``JSD(0) = JSD(1) = 0``); near them it becomes the KLs, scaled:
  ``JSD(β) / β → KL(p ‖ q)`` (forward KL) as ``β → 0`` and ``JSD(β) / (1 - β) → KL(q ‖ p)`` (reverse KL) as
  ``β → 1``. So small β behaves like forward KL, β near 1 like reverse KL, as the paper says; β must lie in (0, 1)
  here (ask for ``forward_kl`` or ``reverse_kl`` for the ends). This is also TRL's ``GKDTrainer`` loss for
  0 < β < 1.
- ``skew_kl``: DistiLLM's skew KL (Ko et al., "DistiLLM: Towards Streamlined Distillation for Large Language
  Models", ICML 2024): ``SKL(α) = KL(p ‖ α p + (1 - α) q)``, skew ``α`` in [0, 1) (paper default 0.1; α = 0 is
  forward KL). Mixing a little of the teacher into the student keeps the divergence and its gradient bounded
  where ``q`` is tiny.
- ``skew_reverse_kl``: DistiLLM's skew reverse KL ``SRKL(α) = KL(q ‖ (1 - α) p + α q)`` (α = 0 is reverse KL).
- ``tv``: total variation distance ``½ Σ_v |p_v - q_v|`` (Wen et al., "f-Divergence Minimization for
  Sequence-Level Knowledge Distillation", ACL 2023), bounded in [0, 1].

Temperature: every divergence is taken between ``softmax(z / T)`` distributions and multiplied by ``T²``
(Hinton et al.'s factor, which keeps the gradient scale of the KLs comparable across T; kdkit's
:func:`kdkit.losses.kd_loss` does the same). The default ``T = 1`` is what LM distillation mostly uses.

Mix with the data: ``loss = alpha · kd + (1 - alpha) · ce``, where ``kd`` is the divergence term above and ``ce``
the next-token cross-entropy of the student on ``labels`` at temperature 1 (the language-modelling loss), both
means over the same predicted tokens.

Memory: logits for B × L × V tokens are large (4 × 512 × 32,000 float32 is 262 MB per tensor), and a plain
autograd implementation keeps several tensors of that size (log-softmaxes, probabilities, products) for the
backward pass. Here the predicted tokens are processed ``chunk_size`` at a time: each chunk's loss and its
exact gradient with respect to that chunk's student logits are computed in the forward pass (the chunk's
intermediates are freed before the next chunk), the gradients are written into one buffer shaped like the
student logits, and the backward pass hands that buffer back. Extra memory beyond the logits and their
gradient is O(chunk_size × V) (the idea of torchtune's chunked KD loss and Liger Kernel's fused losses).
The gradient equals the unchunked computation's (``chunk_size=None``; tests check value and gradient), and
``benchmarks/lm_loss_memory.py`` measures the peak memory of both. The teacher logits are a target: they get
no gradient.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from ..errors import KdkitError

IGNORE_INDEX = -100
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tv")
# "auto" chunk size: about 2**22 logits (16 MiB in float32) per chunk, so 131 tokens at V = 32,000.
_AUTO_CHUNK_ELEMENTS = 2 ** 22

ChunkSize = Union[int, str, None]


class LMLoss(NamedTuple):
    """``loss = alpha · kd + (1 - alpha) · ce`` (differentiable) and its two parts (detached), all scalars."""

    loss: torch.Tensor
    kd: torch.Tensor
    ce: torch.Tensor


# ============================================================================= per-token divergences
# Each takes log-probabilities (N, V) of the student and the teacher and returns (N,), without temperature.


def _plogratio(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """``Σ_v a_v (log a_v - log b_v)`` with ``0 · log 0 = 0`` (a teacher that gives a token no mass at all)."""
    a = log_a.exp()
    return torch.where(a > 0, a * (log_a - log_b), torch.zeros_like(a)).sum(-1)


def forward_kl_tokens(log_q: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """``KL(p ‖ q)`` per token. Args: student ``log_q`` (N, V), teacher ``log_p`` (N, V). Returns (N,)."""
    return _plogratio(log_p, log_q)


def reverse_kl_tokens(log_q: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """``KL(q ‖ p)`` per token. Args: student ``log_q`` (N, V), teacher ``log_p`` (N, V). Returns (N,)."""
    return _plogratio(log_q, log_p)


def jsd_tokens(log_q: torch.Tensor, log_p: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """GKD's generalised JSD per token (Agarwal et al. 2024): ``β KL(p ‖ m) + (1 - β) KL(q ‖ m)``,
    ``m = β p + (1 - β) q``, for 0 < β < 1. Args: student ``log_q`` (N, V), teacher ``log_p`` (N, V)."""
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
    return beta * _plogratio(log_p, log_m) + (1.0 - beta) * _plogratio(log_q, log_m)


def skew_kl_tokens(log_q: torch.Tensor, log_p: torch.Tensor, skew: float = 0.1) -> torch.Tensor:
    """DistiLLM's skew KL per token (Ko et al. 2024): ``KL(p ‖ α p + (1 - α) q)``, α = ``skew`` in [0, 1)."""
    if skew == 0.0:
        return _plogratio(log_p, log_q)
    log_m = torch.logaddexp(log_p + math.log(skew), log_q + math.log1p(-skew))
    return _plogratio(log_p, log_m)


def skew_reverse_kl_tokens(log_q: torch.Tensor, log_p: torch.Tensor, skew: float = 0.1) -> torch.Tensor:
    """DistiLLM's skew reverse KL per token (Ko et al. 2024): ``KL(q ‖ (1 - α) p + α q)``, α in [0, 1)."""
    if skew == 0.0:
        return _plogratio(log_q, log_p)
    log_m = torch.logaddexp(log_p + math.log1p(-skew), log_q + math.log(skew))
    return _plogratio(log_q, log_m)


def tv_tokens(log_q: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """Total variation ``½ Σ_v |p_v - q_v|`` per token (Wen et al. 2023). Returns (N,) in [0, 1]."""
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)


def divergence_tokens(log_q: torch.Tensor, log_p: torch.Tensor, divergence: str = "forward_kl",
                      beta: float = 0.5, skew: float = 0.1) -> torch.Tensor:
    """The named divergence (one of :data:`DIVERGENCES`) per token between student ``log_q`` and teacher
    ``log_p``, both (N, V) log-probabilities (any normalised distributions: :mod:`kdkit.lm.topk` passes
    k + 1 buckets). Returns (N,)."""
    if divergence == "forward_kl":
        return forward_kl_tokens(log_q, log_p)
    if divergence == "reverse_kl":
        return reverse_kl_tokens(log_q, log_p)
    if divergence == "jsd":
        return jsd_tokens(log_q, log_p, beta)
    if divergence == "skew_kl":
        return skew_kl_tokens(log_q, log_p, skew)
    if divergence == "skew_reverse_kl":
        return skew_reverse_kl_tokens(log_q, log_p, skew)
    if divergence == "tv":
        return tv_tokens(log_q, log_p)
    raise KdkitError(f"unknown LM divergence {divergence!r}; expected one of {', '.join(DIVERGENCES)}")


# ============================================================================= checks


def check_options(divergence: str, temperature: float, alpha: float, beta: float, skew: float) -> None:
    """One-line KdkitErrors for out-of-range options (shared with :mod:`kdkit.lm.topk`)."""
    if divergence not in DIVERGENCES:
        raise KdkitError(f"unknown LM divergence {divergence!r}; expected one of {', '.join(DIVERGENCES)}")
    if not temperature > 0:
        raise KdkitError(f"temperature must be > 0; got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise KdkitError(f"alpha (weight of the distillation term) must be in [0, 1]; got {alpha}")
    if divergence == "jsd" and not 0.0 < beta < 1.0:
        raise KdkitError(f"jsd beta must be in (0, 1) (JSD(0) = JSD(1) = 0); got {beta}; use divergence "
                         "'forward_kl' or 'reverse_kl' for the beta -> 0 or beta -> 1 ends")
    if divergence in ("skew_kl", "skew_reverse_kl") and not 0.0 <= skew < 1.0:
        raise KdkitError(f"{divergence} skew must be in [0, 1); got {skew}")


def check_labels(student_logits: torch.Tensor, labels: torch.Tensor) -> None:
    if student_logits.dim() != 3:
        raise KdkitError(f"student logits must be (batch, length, vocab); got shape {tuple(student_logits.shape)}")
    if labels.shape != student_logits.shape[:2]:
        raise KdkitError(f"labels must be (batch, length) = {tuple(student_logits.shape[:2])} like the logits; "
                         f"got shape {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise KdkitError(f"labels must be integer token ids (-100 where nothing is predicted); got {labels.dtype}")


def resolve_chunk_size(chunk_size: ChunkSize, vocab: int) -> Optional[int]:
    """``"auto"`` -> about 2**22 logits per chunk; None -> None (unchunked); a positive int as is."""
    if chunk_size is None:
        return None
    if chunk_size == "auto":
        return max(1, _AUTO_CHUNK_ELEMENTS // max(vocab, 1))
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise KdkitError(f"chunk_size must be a positive integer, 'auto' or None (unchunked); got {chunk_size!r}")
    return chunk_size


# ============================================================================= the chunked engine
# A "terms" function gets the float32 student logits of a chunk of predicted tokens, (c, V), and the chunk's
# [start, end) range in the list of predicted tokens, and returns (weighted per-token loss, kd, ce), each (c,).
TermsFn = Callable[[torch.Tensor, int, int], Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


class _ChunkedMean(torch.autograd.Function):
    """Mean of per-token terms over the rows ``index`` of ``flat`` (M, V), ``chunk`` rows at a time, with the
    gradient for ``flat`` computed chunk by chunk in the forward pass (see the module docstring)."""

    @staticmethod
    def forward(ctx, flat: torch.Tensor, index: torch.Tensor, terms: TermsFn, chunk: int,  # type: ignore[override]
                needs_grad: bool):
        n = index.numel()
        grad = torch.zeros_like(flat) if needs_grad else None
        sums = torch.zeros(3, dtype=torch.float32, device=flat.device)  # loss, kd, ce
        for start in range(0, n, chunk):
            end = min(start + chunk, n)
            rows = index[start:end]
            s = flat.index_select(0, rows).float().requires_grad_(needs_grad)  # (c, V): the chunk's copy
            with torch.enable_grad():
                loss_t, kd_t, ce_t = terms(s, start, end)
                chunk_loss = loss_t.sum() / n
            if needs_grad:
                (g,) = torch.autograd.grad(chunk_loss, s)
                grad.index_copy_(0, rows, g.to(grad.dtype))  # rows are distinct: a plain write
            sums += torch.stack([chunk_loss.detach(), kd_t.detach().sum() / n, ce_t.detach().sum() / n])
            del s, loss_t, kd_t, ce_t, chunk_loss
        ctx.grad = grad
        loss, kd, ce = sums.unbind()
        loss, kd, ce = loss.clone(), kd.clone(), ce.clone()
        ctx.mark_non_differentiable(kd, ce)
        return loss, kd, ce

    @staticmethod
    def backward(ctx, grad_loss, _grad_kd, _grad_ce):  # type: ignore[override]
        grad = ctx.grad
        if grad is None:
            if ctx.needs_input_grad[0]:
                raise RuntimeError("backward through a chunked LM loss twice is not supported (its gradient "
                                   "buffer is handed over, not copied)")
            return None, None, None, None, None
        ctx.grad = None  # hand the buffer over (in place below), so that it is not held twice
        return grad.mul_(grad_loss.to(grad.dtype)), None, None, None, None


def predicted_tokens(labels: torch.Tensor, vocab: int, ignore_index: int = IGNORE_INDEX
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Flat positions (N,) of the tokens with ``labels != ignore_index`` in row-major order, and their labels (N,).

    Refuses labels outside ``[0, vocab)`` (other than ``ignore_index``)."""
    y_flat = labels.reshape(-1)
    index = torch.nonzero(y_flat != ignore_index).squeeze(1)  # one host sync
    targets = y_flat.index_select(0, index)
    if targets.numel():
        lo, hi = torch.stack([targets.min(), targets.max()]).tolist()
        if lo < 0 or hi >= vocab:
            raise KdkitError(f"labels must be token ids in [0, {vocab}) or {ignore_index}; got values in "
                             f"[{lo}, {hi}]")
    return index, targets


def chunked_token_mean(student_logits: torch.Tensor, index: torch.Tensor, terms: TermsFn,
                       chunk_size: ChunkSize = "auto") -> LMLoss:
    """Run ``terms`` over the rows ``index`` of the flattened logits, ``chunk_size`` at a time, and average.

    Args:
        student_logits: (B, L, V), any float dtype (each chunk is computed in float32).
        index: (N,) flat positions of the predicted tokens (:func:`predicted_tokens`).
        terms: see :data:`TermsFn`; ``start``/``end`` index ``index``.
        chunk_size: tokens per chunk; "auto" (about 2**22 logits per chunk) or None for one plain autograd pass.

    Returns:
        :class:`LMLoss` of means over the N tokens (zeros, with a gradient path, when N = 0).
    """
    vocab = student_logits.shape[-1]
    chunk = resolve_chunk_size(chunk_size, vocab)
    flat = student_logits.reshape(-1, vocab)  # a view for contiguous logits
    n = index.numel()
    if chunk is None:  # the reference: every predicted token at once, plain autograd
        loss_t, kd_t, ce_t = terms(flat.index_select(0, index).float(), 0, n)
        denom = max(n, 1)
        return LMLoss(loss_t.sum() / denom, kd_t.detach().sum() / denom, ce_t.detach().sum() / denom)
    needs_grad = flat.requires_grad and torch.is_grad_enabled()
    loss, kd, ce = _ChunkedMean.apply(flat, index, terms, chunk, needs_grad)
    return LMLoss(loss, kd, ce)


# ============================================================================= public losses


def lm_distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, *,
                    divergence: str = "forward_kl", temperature: float = 1.0, alpha: float = 1.0,
                    beta: float = 0.5, skew: float = 0.1, chunk_size: ChunkSize = "auto",
                    ignore_index: int = IGNORE_INDEX) -> LMLoss:
    """Token-level distillation of a causal LM mixed with the next-token cross-entropy (see the module docstring).

    ``loss = alpha · T² · mean_tokens D(p_T ‖ q_T) + (1 - alpha) · mean_tokens -log q(y)``, with ``p_T``, ``q_T``
    the teacher's and student's ``softmax(logits / T)``, ``q`` the student's ``softmax(logits)``, and the means
    over the tokens with ``labels != ignore_index``.

    Args:
        student_logits: (B, L, V).
        teacher_logits: (B, L, V), same shape (a target: it gets no gradient).
        labels: (B, L) int64: the token each position predicts, ``ignore_index`` where none.
        divergence: one of :data:`DIVERGENCES`.
        temperature: T > 0 for the divergence (the cross-entropy is always at T = 1).
        alpha: weight of the distillation term in [0, 1]; 1 (default) is pure distillation.
        beta: JSD's β in (0, 1) (``jsd`` only).
        skew: DistiLLM's skew α in [0, 1) (``skew_kl`` and ``skew_reverse_kl`` only).
        chunk_size: predicted tokens per chunk, "auto" (about 2**22 logits per chunk: 131 tokens at V = 32,000),
            or None for the unchunked reference computation.
        ignore_index: the label of positions that predict nothing.

    Returns:
        :class:`LMLoss` ``(loss, kd, ce)``: scalars; ``loss`` carries the gradient, ``kd`` (already times T²)
        and ``ce`` are detached, for logging.
    """
    check_options(divergence, temperature, alpha, beta, skew)
    check_labels(student_logits, labels)
    if teacher_logits.shape != student_logits.shape:
        raise KdkitError(f"teacher logits {tuple(teacher_logits.shape)} and student logits "
                         f"{tuple(student_logits.shape)} must have the same (batch, length, vocab) shape; "
                         "a different vocabulary needs a token mapping")
    vocab = student_logits.shape[-1]
    t_flat = teacher_logits.detach().reshape(-1, vocab)
    index, targets = predicted_tokens(labels, vocab, ignore_index)  # (N,), (N,)
    t2 = temperature * temperature

    def terms(s: torch.Tensor, start: int, end: int):
        rows = index[start:end]
        log_p = F.log_softmax(t_flat.index_select(0, rows).float() / temperature, dim=-1)
        log_q_t = F.log_softmax(s / temperature, dim=-1)
        kd = t2 * divergence_tokens(log_q_t, log_p, divergence, beta, skew)
        y = targets[start:end, None]
        ce = -(log_q_t if temperature == 1.0 else F.log_softmax(s, dim=-1)).gather(1, y).squeeze(1)
        return alpha * kd + (1.0 - alpha) * ce, kd, ce

    return chunked_token_mean(student_logits, index, terms, chunk_size)


def lm_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, *,
               divergence: str = "forward_kl", temperature: float = 1.0, beta: float = 0.5, skew: float = 0.1,
               chunk_size: ChunkSize = "auto", ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """``T² · mean_tokens D(p_T ‖ q_T)`` alone: :func:`lm_distill_loss` with ``alpha = 1``. Returns a scalar."""
    return lm_distill_loss(student_logits, teacher_logits, labels, divergence=divergence, temperature=temperature,
                           alpha=1.0, beta=beta, skew=skew, chunk_size=chunk_size, ignore_index=ignore_index).loss


def next_token_cross_entropy(student_logits: torch.Tensor, labels: torch.Tensor, chunk_size: ChunkSize = "auto",
                             ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean next-token cross-entropy ``-log softmax(z)_y`` over the tokens with ``labels != ignore_index``
    (the language-modelling loss; ``exp`` of it on held-out text is the perplexity), computed in chunks.

    Args:
        student_logits: (B, L, V).
        labels: (B, L) int64.

    Returns:
        A scalar (zero, with a gradient path, when nothing is predicted).
    """
    check_labels(student_logits, labels)
    index, targets = predicted_tokens(labels, student_logits.shape[-1], ignore_index)

    def terms(s: torch.Tensor, start: int, end: int):
        ce = torch.logsumexp(s, dim=-1) - s.gather(1, targets[start:end, None]).squeeze(1)
        return ce, torch.zeros_like(ce), ce

    return chunked_token_mean(student_logits, index, terms, chunk_size).loss
