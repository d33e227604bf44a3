"""Distillation losses for transformer encoders, as pure functions: tensors in, scalar tensor out.

Every function takes the padding mask of the batch, ``mask`` (B, L) bool, True on real tokens (for encoders
``x != pad_token_id``, trimmed to the sequence length the model actually ran); padded positions never
contribute, neither as positions nor as attention keys. Means are over real positions only, so the value
does not depend on how much padding a batch carries. Sequence tensors are (B, L, D); attention inputs are
the outputs of a layer's query/key/value projections, (B, L, H · d), split into heads here, so the losses
work whatever attention implementation (eager, SDPA, flash) the model runs.

Papers: TinyBERT (Jiao et al., Findings of EMNLP 2020), MiniLM (Wang et al., NeurIPS 2020), MiniLMv2
(Wang et al., Findings of ACL 2021), DistilBERT (Sanh et al., 2019).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F


def _check_mask(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if mask.shape != x.shape[:2]:
        raise ValueError(f"mask has shape {tuple(mask.shape)}; expected (B, L) = {tuple(x.shape[:2])}")
    return mask.to(torch.bool)


def masked_hidden_mse(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Hidden-state matching (TinyBERT, Jiao et al. 2020, eq. 8), over real tokens only.

    ``Σ_{b,i: mask} Σ_d (s_bid - t_bid)² / (n_real · D)``: the mean squared error over the feature values of
    the positions that hold a token. TinyBERT's ``MSE(H_S W_h, H_T)``: the learned projection ``W_h`` is
    applied by the caller (a submodule of the method) when the widths differ.

    Args:
        student_hidden: (B, L, D), already projected to the teacher's width.
        teacher_hidden: (B, L, D).
        mask: (B, L) bool, True on real tokens.

    Returns:
        A scalar; 0 when the batch has no real token.
    """
    if student_hidden.shape != teacher_hidden.shape:
        raise ValueError(f"hidden states differ in shape: student {tuple(student_hidden.shape)}, teacher "
                         f"{tuple(teacher_hidden.shape)}; project the student's to the teacher's width")
    m = _check_mask(student_hidden, mask).unsqueeze(-1).to(student_hidden.dtype)  # (B, L, 1)
    sq = (student_hidden - teacher_hidden).pow(2) * m
    return sq.sum() / (m.sum() * student_hidden.shape[-1]).clamp_min(1.0)


def masked_cosine_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, mask: torch.Tensor,
                       eps: float = 1e-8) -> torch.Tensor:
    """DistilBERT's cosine embedding loss on hidden states (Sanh et al. 2019, "DistilBERT, a distilled version
    of BERT"), over real tokens only.

    ``mean_{b,i: mask} (1 - cos(s_bi, t_bi))``: PyTorch's ``CosineEmbeddingLoss`` with target 1, which the
    authors apply to the last hidden states of the positions the attention mask keeps. The directions of the
    two models' hidden vectors are aligned; their norms are free.

    Args:
        student_hidden, teacher_hidden: (B, L, D), the same width (project the student's first otherwise).
        mask: (B, L) bool, True on real tokens.
        eps: guards the norms of all-zero vectors.

    Returns:
        A scalar in [0, 2]; 0 when the batch has no real token.
    """
    if student_hidden.shape != teacher_hidden.shape:
        raise ValueError(f"hidden states differ in shape: student {tuple(student_hidden.shape)}, teacher "
                         f"{tuple(teacher_hidden.shape)}")
    m = _check_mask(student_hidden, mask).to(student_hidden.dtype)  # (B, L)
    cos = F.cosine_similarity(student_hidden, teacher_hidden, dim=-1, eps=eps)  # (B, L)
    return ((1.0 - cos) * m).sum() / m.sum().clamp_min(1.0)


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, L, H · d) -> (B, H, L, d): the head layout of multi-head attention (heads are contiguous slices).

    Raises:
        ValueError: the width is not a multiple of ``num_heads``.
    """
    b, n, width = x.shape
    if num_heads < 1 or width % num_heads:
        raise ValueError(f"width {width} cannot be split into {num_heads} heads")
    return x.view(b, n, num_heads, width // num_heads).transpose(1, 2)


def relation_log_probs(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Per-head scaled dot-product relations as log-probabilities over keys, padded keys excluded.

    ``log softmax_j(a_hi · b_hj / √d)`` with ``d = width / num_heads``. With ``a`` = queries and ``b`` = keys it
    is the self-attention distribution of BERT-style models (Vaswani et al. 2017) recomputed from the captured
    projections; with ``a = b`` = values it is MiniLM's value relation (Wang et al. 2020, eq. 7).

    Args:
        a, b: (B, L, H · d).
        mask: (B, L) bool, True on real tokens; a padded key gets log-probability -inf.
        num_heads: H.

    Returns:
        (B, H, L, L) log-probabilities; rows of padded queries are finite but meaningless (callers mask them).
    """
    mask = _check_mask(a, mask)
    qa, kb = split_heads(a, num_heads), split_heads(b, num_heads)  # (B, H, L, d)
    scores = qa @ kb.transpose(-1, -2) / math.sqrt(qa.shape[-1])  # (B, H, L, L)
    # A row with no real key (an all-pad sequence) keeps its scores: finite, and masked out as a query below.
    keys = mask[:, None, None, :] | ~mask.any(dim=1)[:, None, None, None]
    scores = scores.masked_fill(~keys, float("-inf"))
    if scores.dtype in (torch.float16, torch.bfloat16):  # fp16 features: the softmax in float32
        scores = scores.float()
    return F.log_softmax(scores, dim=-1)


def masked_relation_kl(student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor,
                       mask: torch.Tensor) -> torch.Tensor:
    """``KL(teacher ‖ student)`` between relation distributions, mean over heads and real query positions.

    ``Σ_{b,h,i: mask_bi} Σ_{j: mask_bj} p_t(j) (log p_t(j) - log p_s(j)) / (H · n_real)``: MiniLM's loss (Wang et al.
    2020, eqs. 5 and 7, there averaged over heads and positions of unpadded sequences). Padded keys hold
    probability 0 in both distributions and are dropped (not computed as 0 · (-inf)).

    Args:
        student_log_probs, teacher_log_probs: (B, H, L, L) log-probabilities over the last axis
            (:func:`relation_log_probs`); the same number of heads H.
        mask: (B, L) bool, True on real tokens.

    Returns:
        A scalar; 0 when the batch has no real token.
    """
    if student_log_probs.shape != teacher_log_probs.shape:
        raise ValueError(f"relations differ in shape: student {tuple(student_log_probs.shape)}, teacher "
                         f"{tuple(teacher_log_probs.shape)} (B, H, L, L); the heads must match in number")
    mask = mask.to(torch.bool)
    keys = mask[:, None, None, :]  # (B, 1, 1, L)
    diff = torch.where(keys, teacher_log_probs - student_log_probs, torch.zeros_like(student_log_probs))
    kl_rows = (teacher_log_probs.exp() * diff).sum(-1)  # (B, H, L)
    queries = mask[:, None, :].to(kl_rows.dtype)  # (B, 1, L)
    heads = student_log_probs.shape[1]
    return (kl_rows * queries).sum() / (queries.sum() * heads).clamp_min(1.0)


def _heads(student_heads: int, teacher_heads: int, relation_heads: Optional[int]):
    if relation_heads is not None:
        return relation_heads, relation_heads
    if student_heads != teacher_heads:
        raise ValueError(f"the student has {student_heads} attention heads and the teacher {teacher_heads}; they "
                         f"must match in number, or give relation_heads (MiniLMv2) to re-split both")
    return student_heads, teacher_heads


def attention_kl_loss(student_query: torch.Tensor, student_key: torch.Tensor, teacher_query: torch.Tensor,
                      teacher_key: torch.Tensor, mask: torch.Tensor, student_heads: int, teacher_heads: int,
                      relation_heads: Optional[int] = None) -> torch.Tensor:
    """Attention-map transfer as ``KL(A_t ‖ A_s)`` over heads (TinyBERT's attention loss, Jiao et al. 2020, eq. 7,
    with the KL of MiniLM, Wang et al. 2020, eq. 5, in place of TinyBERT's MSE on unnormalised scores).

    ``A = softmax(Q K^T / √d)`` per head, computed from the captured query and key projections (not from the
    model's returned attentions, so it works with any attention implementation), padded keys excluded;
    the KL is averaged over heads and real query positions (:func:`masked_relation_kl`). Widths may differ
    (each model uses its own head size d); head counts must match, unless ``relation_heads`` re-splits both
    models' projections into that many heads (MiniLMv2's relation heads, Wang et al. 2021).

    Args:
        student_query, student_key: (B, L, H_s · d_s).
        teacher_query, teacher_key: (B, L, H_t · d_t).
        mask: (B, L) bool, True on real tokens.
        student_heads, teacher_heads: H_s and H_t.
        relation_heads: optional R, splitting both widths into R heads.

    Returns:
        A scalar.
    """
    hs, ht = _heads(student_heads, teacher_heads, relation_heads)
    return masked_relation_kl(relation_log_probs(student_query, student_key, mask, hs),
                              relation_log_probs(teacher_query, teacher_key, mask, ht), mask)


def value_relation_loss(student_value: torch.Tensor, teacher_value: torch.Tensor, mask: torch.Tensor,
                        student_heads: int, teacher_heads: int, relation_heads: Optional[int] = None) -> torch.Tensor:
    """MiniLM's value-relation transfer (Wang et al. 2020, eqs. 6-7): ``KL(VR_t ‖ VR_s)`` with
    ``VR = softmax(V V^T / √d)`` per head, over real positions and keys (:func:`masked_relation_kl`).

    Args:
        student_value: (B, L, H_s · d_s); teacher_value: (B, L, H_t · d_t).
        mask: (B, L) bool, True on real tokens.
        student_heads, teacher_heads, relation_heads: as in :func:`attention_kl_loss`.

    Returns:
        A scalar.
    """
    hs, ht = _heads(student_heads, teacher_heads, relation_heads)
    return masked_relation_kl(relation_log_probs(student_value, student_value, mask, hs),
                              relation_log_probs(teacher_value, teacher_value, mask, ht), mask)


def minilm_loss(student_qkv, teacher_qkv, mask: torch.Tensor, student_heads: int, teacher_heads: int,
                relation_heads: Optional[int] = None) -> torch.Tensor:
    """MiniLM's deep self-attention distillation (Wang et al., NeurIPS 2020): attention-distribution transfer
    plus value-relation transfer on one layer (the last), ``L_AT + L_VR``.

    Args:
        student_qkv: (query, key, value) of the student's layer, each (B, L, H_s · d_s).
        teacher_qkv: (query, key, value) of the teacher's layer, each (B, L, H_t · d_t).
        mask: (B, L) bool, True on real tokens.
        student_heads, teacher_heads, relation_heads: as in :func:`attention_kl_loss`.

    Returns:
        A scalar.
    """
    (sq, sk, sv), (tq, tk, tv) = student_qkv, teacher_qkv
    return (attention_kl_loss(sq, sk, tq, tk, mask, student_heads, teacher_heads, relation_heads)
            + value_relation_loss(sv, tv, mask, student_heads, teacher_heads, relation_heads))


__all__ = ["attention_kl_loss", "masked_cosine_loss", "masked_hidden_mse", "masked_relation_kl", "minilm_loss",
           "relation_log_probs", "split_heads", "value_relation_loss"]
