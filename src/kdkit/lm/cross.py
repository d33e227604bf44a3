"""Distilling a causal LM from a teacher with another tokenizer: byte-span alignment and three losses.

**Alignment** (:func:`align`). Each training row is the student's tokens of some text. The text is rebuilt from
the student's ids (their bytes: both tokenizers are byte-level BPEs, so every token stands for an exact byte
string) and tokenised again with the teacher's tokenizer. Walking both token sequences over the same bytes, a
*group* ends wherever both sequences have a token boundary at the same byte: a group pairs the student tokens
``[s0, s1)`` with the teacher tokens ``[t0, t1)`` covering the same bytes, and both sides predict it from the
same text before it. A group is *matched* when it is one token on each side with the same string (the
"shared pieces"). Special tokens (the end of text) are zero bytes: a trailing end-of-text token on both sides is
its own matched group. A row whose bytes the teacher's tokenizer does not reproduce (a tokenizer that
normalises or drops bytes) is never aligned approximately: it is left out of the distillation term and counted
(``CrossAlignment.unaligned``); a row whose bytes stop being UTF-8 (cut inside a character, or sampled bytes) is
aligned up to that byte and counted (``truncated``). The run says how many of each.

**Losses** (``cross_loss``), means over the groups of a batch (the first group of a row is predicted by nothing
and left out):

- ``uld``: Universal Logit Distillation (Boizard et al., "Towards Cross-Tokenizer Distillation: the Universal
  Logit Distillation Loss for LLMs", 2024): at the position predicting each group's first token, the
  Wasserstein-1 distance between the two next-token distributions with their probabilities sorted, which needs
  no mapping between vocabularies: ``Σ_i |p_(i) - q_(i)|`` over the sorted vectors (the shorter one padded with
  zeros);
- ``merged``: on matched groups, forward KL between the two next-token distributions restricted to the tokens
  both vocabularies share (same string), each renormalised over them; on the other groups, the probability of
  the group's text, the product of its tokens' conditional probabilities on each side (the "merged" logits),
  compared as two Bernoulli events by their KL: ``P log(P/Q) + (1-P) log((1-P)/(1-Q))`` (in the spirit of the
  chunk-likelihood matching of Minixhofer et al., "Universal Cross-Tokenizer Distillation via Approximate
  Likelihood Matching", 2025, in a form of kdkit's own);
- ``hybrid`` (the scheme of TRL's GOLD trainer): the restricted KL on matched groups and ULD on the others.

With one tokenizer on both sides every group is matched and the shared vocabulary is the whole vocabulary, so
``merged`` and ``hybrid`` are exactly lm_kd's forward KL (a test checks it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from ..errors import KdkitError
from .losses import IGNORE_INDEX, LMLoss

CROSS_LOSSES = ("uld", "merged", "hybrid")


def byte_table(tok, side: str) -> torch.Tensor:
    """(V,) bytes per token of a byte-level BPE tokenizer (special tokens 0); a one-line error otherwise."""
    from .evaluate import token_byte_lengths

    table = token_byte_lengths(tok)
    if table is None:
        raise KdkitError(f"the {side}'s tokenizer is not a byte-level BPE (its decoder is not ByteLevel); "
                         "cross-tokenizer distillation aligns the two tokenizations byte by byte and needs byte-level "
                         "tokenizers on both sides (GPT-2, Llama 3, Qwen and kdkit's own are)")
    return table


def _byte_level_bytes(tok, ids: List[int]) -> bytes:
    """The exact bytes of byte-level token ids (special tokens: none)."""
    from .tokenizer import byte_decoder

    dec = byte_decoder()
    out = bytearray()
    for i in ids:
        s = tok.id_to_token(i)
        if s is None:
            continue
        try:
            out.extend(dec[c] for c in s)
        except KeyError:  # a special token such as <|endoftext|>: not text
            continue
    return bytes(out)


@dataclass
class CrossAlignment:
    """The teacher's tokens of every row and the groups of both tokenizations.

    Attributes:
        teacher_x: (N, Lt) teacher ids, right-padded with the teacher's pad id.
        teacher_y: (N, Lt) teacher next-token targets (-100 on padding and the first token).
        groups: (G, 6) int64 rows of ``(row, s0, s1, t0, t1, matched)``, sorted by row.
        offsets: (N + 1,) where each row's groups start in ``groups``.
        shared: (K, 2) pairs of (student id, teacher id) with the same token string.
        unaligned: rows whose bytes the teacher's tokenizer did not reproduce (left out of the distillation).
        tokens: student target tokens inside groups / all student target tokens (the aligned share).
    """

    teacher_x: torch.Tensor
    teacher_y: torch.Tensor
    groups: torch.Tensor
    offsets: torch.Tensor
    shared: torch.Tensor
    unaligned: int
    aligned_share: float
    pad_id: int = 0
    truncated: int = 0

    def describe(self) -> str:
        n = len(self.offsets) - 1
        matched = int(self.groups[:, 5].sum()) if len(self.groups) else 0
        text = (f"cross-tokenizer alignment: {len(self.groups):,} groups over {n:,} rows ({matched:,} matched one to "
                f"one), {self.aligned_share:.1%} of the student's target tokens aligned; {len(self.shared):,} tokens "
                "shared by the two vocabularies")
        if self.unaligned:
            text += (f"; {self.unaligned} row(s) left out: the teacher's tokenizer does not reproduce their bytes "
                     "(it normalises or drops some)")
        if self.truncated:
            text += (f"; {self.truncated} row(s) aligned up to their first byte that is not UTF-8 (a row cut inside "
                     "a character)")
        return text


def _row_groups(s_ids: List[int], t_ids: List[int], s_bytes: torch.Tensor, t_bytes: torch.Tensor, s_tok,
                t_tok) -> List[Tuple[int, int, int, int, int]]:
    """Walk both token sequences over the same bytes: a group ends where both have a boundary. Returns
    ``(s0, s1, t0, t1, matched)`` for every group but the first (predicted by nothing)."""
    s_end = torch.cumsum(s_bytes[torch.tensor(s_ids, dtype=torch.long)], 0).tolist() if s_ids else []
    t_end = torch.cumsum(t_bytes[torch.tensor(t_ids, dtype=torch.long)], 0).tolist() if t_ids else []
    out = []
    i = j = s0 = t0 = 0
    while i < len(s_end) and j < len(t_end):
        if s_end[i] == t_end[j]:
            s1, t1 = i + 1, j + 1
            one_to_one = s1 - s0 == 1 and t1 - t0 == 1
            matched = int(one_to_one and s_tok.id_to_token(s_ids[s0]) == t_tok.id_to_token(t_ids[t0]))
            if s0 > 0 and t0 > 0:
                out.append((s0, s1, t0, t1, matched))
            s0, t0 = s1, t1
            i, j = i + 1, j + 1
        elif s_end[i] < t_end[j]:
            i += 1
        else:
            j += 1
    return out


def align(data, student_tok, teacher_tok, *, max_length: Optional[int] = None) -> CrossAlignment:
    """Align every row of ``data`` (student ids ``x``, targets ``y``) with the teacher's tokenization."""
    s_bytes = byte_table(student_tok, "student")
    t_bytes = byte_table(teacher_tok, "teacher")
    from .tokenizer import EOS, PAD

    t_pad = teacher_tok.token_to_id(PAD)
    t_eos = teacher_tok.token_to_id(EOS)
    t_pad = t_pad if t_pad is not None else (t_eos if t_eos is not None else 0)
    s_eos = getattr(data, "eos_token_id", None)
    s_pad = data.pad_token_id
    rows_t: List[List[int]] = []
    groups: List[Tuple[int, int, int, int, int, int]] = []
    offsets = [0]
    unaligned = truncated = 0
    aligned_tokens = total_tokens = 0
    for r in range(len(data)):
        x = data.x[r]
        n = int((x != s_pad).sum()) if s_pad is not None else len(x)
        ids = x[:n].tolist()
        total_tokens += int((data.y[r] != IGNORE_INDEX).sum())
        ends_eos = bool(ids) and s_eos is not None and ids[-1] == s_eos
        text_ids = ids[:-1] if ends_eos else ids
        raw = _byte_level_bytes(student_tok, text_ids)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:  # bytes that are not UTF-8 (a row cut inside a character, sampled bytes):
            text = raw[:e.start].decode("utf-8")  # the valid prefix is aligned, the rest is not
            raw = raw[:e.start]
            truncated += 1
        t_ids = teacher_tok.encode(text, add_special_tokens=False).ids if text else []
        if _byte_level_bytes(teacher_tok, t_ids) != raw:  # the very bytes, not only as many
            unaligned += 1
            rows_t.append([t_pad])
            offsets.append(len(groups))
            continue
        if ends_eos and t_eos is not None:
            t_ids = t_ids + [t_eos]
        rows_t.append(t_ids)
        t_text = t_ids[:-1] if (ends_eos and t_eos is not None) else t_ids
        for s0, s1, t0, t1, matched in _row_groups(text_ids, t_text, s_bytes, t_bytes, student_tok, teacher_tok):
            groups.append((r, s0, s1, t0, t1, matched))
            aligned_tokens += s1 - s0
        if ends_eos and t_eos is not None and len(text_ids) > 0 and len(t_text) > 0:
            groups.append((r, len(text_ids), len(text_ids) + 1, len(t_text), len(t_text) + 1,
                           int(student_tok.id_to_token(s_eos) == teacher_tok.id_to_token(t_eos))))
            aligned_tokens += 1
        offsets.append(len(groups))
    width = max([len(t) for t in rows_t] + [1])
    if max_length is not None:
        width = min(width, max_length)
    tx = torch.full((len(rows_t), width), t_pad, dtype=torch.long)
    ty = torch.full((len(rows_t), width), IGNORE_INDEX, dtype=torch.long)
    for r, t in enumerate(rows_t):
        t = t[:width]
        tx[r, :len(t)] = torch.tensor(t, dtype=torch.long)
        if len(t) > 1:
            ty[r, :len(t) - 1] = torch.tensor(t[1:], dtype=torch.long)
    g = torch.tensor(groups, dtype=torch.long).reshape(-1, 6)
    if max_length is not None and len(g):  # groups the teacher's row no longer holds
        g = g[g[:, 4] <= width]
        counts = torch.bincount(g[:, 0], minlength=len(rows_t))
        offsets = [0] + torch.cumsum(counts, 0).tolist()
    s_vocab = {student_tok.id_to_token(i): i for i in range(student_tok.get_vocab_size(with_added_tokens=True))}
    shared = [(s_vocab[tok], i) for i in range(teacher_tok.get_vocab_size(with_added_tokens=True))
              if (tok := teacher_tok.id_to_token(i)) is not None and tok in s_vocab]
    return CrossAlignment(tx, ty, g, torch.tensor(offsets, dtype=torch.long),
                          torch.tensor(shared, dtype=torch.long).reshape(-1, 2), unaligned,
                          aligned_tokens / max(total_tokens, 1), int(t_pad), truncated)


def batch_groups(al: CrossAlignment, index: torch.Tensor) -> torch.Tensor:
    """The groups of rows ``index`` (B,), with their row replaced by the position in the batch: (G, 6)."""
    parts = []
    for b, r in enumerate(index.tolist()):
        g = al.groups[al.offsets[r]:al.offsets[r + 1]].clone()
        g[:, 0] = b
        parts.append(g)
    return torch.cat(parts) if parts else torch.zeros(0, 6, dtype=torch.long)


def _token_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(B, L) log-probability of token ``ids[:, t + 1]`` at position t (0 past the end)."""
    lp = F.log_softmax(logits.float(), -1)
    nxt = ids[:, 1:lp.shape[1] + 1]
    out = torch.zeros(lp.shape[:2], dtype=lp.dtype, device=lp.device)
    out[:, :nxt.shape[1]] = lp[:, :nxt.shape[1]].gather(2, nxt.unsqueeze(-1)).squeeze(-1)
    return out


def _span_sums(token_lp: torch.Tensor, rows: torch.Tensor, start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    """Σ token_lp[row, start-1 .. end-2]: the log-probability of tokens [start, end) given what precedes them."""
    c = torch.cat([torch.zeros_like(token_lp[:, :1]), token_lp.cumsum(1)], 1)
    return c[rows, end - 1] - c[rows, start - 1]


def cross_distill_loss(student_logits: torch.Tensor, student_x: torch.Tensor, student_y: torch.Tensor,
                       teacher_logits: torch.Tensor, teacher_x: torch.Tensor, groups: torch.Tensor,
                       shared: torch.Tensor, *, loss: str = "hybrid", alpha: float = 1.0,
                       temperature: float = 1.0) -> LMLoss:
    """``alpha · T² · mean_groups D + (1 - alpha) · mean_tokens CE`` with D the cross-tokenizer term (module
    docstring). ``groups`` (G, 6) from :func:`batch_groups`; ``shared`` (K, 2) student/teacher id pairs."""
    if loss not in CROSS_LOSSES:
        raise KdkitError(f"cross_loss must be one of {', '.join(CROSS_LOSSES)}; got {loss!r}")
    T = float(temperature)
    dev = student_logits.device
    g = groups.to(dev)
    Ls, Lt = student_logits.shape[1], teacher_logits.shape[1]
    keep = (g[:, 2] - 1 < Ls) & (g[:, 4] - 1 < Lt) if len(g) else torch.zeros(0, dtype=torch.bool, device=dev)
    g = g[keep]
    y = student_y[:, :Ls]
    mask = y != IGNORE_INDEX
    ce = F.cross_entropy(student_logits[mask].float(), y[mask], reduction="mean") if mask.any() \
        else student_logits.sum() * 0.0
    if len(g) == 0:
        kd = student_logits.sum() * 0.0
        return LMLoss(alpha * kd + (1 - alpha) * ce, kd.detach(), ce.detach())
    rows, s0, s1, t0, t1, matched = g.unbind(1)
    matched = matched.bool()
    q_first = F.log_softmax(student_logits[rows, s0 - 1].float() / T, -1)  # (G, Vs)
    with torch.no_grad():
        p_first = F.log_softmax(teacher_logits[rows, t0 - 1].float() / T, -1)  # (G, Vt)
    terms = torch.zeros(len(g), device=dev)
    if loss in ("merged", "hybrid") and bool(matched.any()):
        sid, tid = shared[:, 0].to(dev), shared[:, 1].to(dev)
        lq = q_first[matched][:, sid]
        lp = p_first[matched][:, tid]
        lq = lq - torch.logsumexp(lq, 1, keepdim=True)
        lp = lp - torch.logsumexp(lp, 1, keepdim=True)
        terms[matched] = T * T * (lp.exp() * (lp - lq)).sum(1)
    rest = ~matched if loss != "uld" else torch.ones_like(matched)
    if bool(rest.any()):
        if loss in ("uld", "hybrid"):
            qs = q_first[rest].exp().sort(1, descending=True).values
            ps = p_first[rest].exp().sort(1, descending=True).values
            width = max(qs.shape[1], ps.shape[1])
            qs = F.pad(qs, (0, width - qs.shape[1]))
            ps = F.pad(ps, (0, width - ps.shape[1]))
            terms[rest] = T * T * (qs - ps).abs().sum(1)
        else:  # merged: the groups' text probabilities as Bernoulli events
            s_lp = _span_sums(_token_logprobs(student_logits, student_x), rows[rest], s0[rest], s1[rest])
            with torch.no_grad():
                t_lp = _span_sums(_token_logprobs(teacher_logits, teacher_x), rows[rest], t0[rest], t1[rest])
            eps = 1e-6
            P, Q = t_lp.exp().clamp(eps, 1 - eps), s_lp.exp().clamp(eps, 1 - eps)
            terms[rest] = P * (P.log() - Q.log()) + (1 - P) * ((1 - P).log() - (1 - Q).log())
    kd = terms.mean()
    return LMLoss(alpha * kd + (1 - alpha) * ce, kd.detach(), ce.detach())


__all__ = ["CROSS_LOSSES", "CrossAlignment", "align", "batch_groups", "byte_table", "cross_distill_loss"]
