"""The teacher store of a causal LM: its next-token distributions over a corpus, written once, read by any number
of students without running the teacher.

A store holds, for every predicted token of every row (``labels != -100``, in row-major order), one of three
records of the teacher's distribution ``p = softmax(z / T)`` at the store's temperature T:

- ``topk`` (size k): the k most likely tokens, their log-probabilities (float16) and the log of the mass outside
  them (float32), the record of :mod:`kdkit.lm.topk`: ``4k + 4`` bytes per position with 16-bit ids. A biased
  picture of ``p``: the tail's shape is lost (:func:`kdkit.lm.topk.truncation_kl` measures what).
- ``sampled`` (size S): S tokens drawn from ``p``, kept as the distinct tokens and how often each was drawn
  (Random-Sampling KD, Anshumann et al., "Sparse Logit Sampling: Accelerating Knowledge Distillation in LLMs", ACL
  2025, which draws independently with replacement: ``sampling: multinomial``); by default the draws are
  systematic (:func:`sample_counts`: the same expectation, a far smaller variance). The target is the empirical
  distribution ``p̂_v = count_v / S``, whose expectation is ``p``: the forward-KL gradient ``T · (q - p̂)`` is an
  unbiased estimate of the full one. At most S entries per position (fewer when draws repeat), each 3 bytes (a
  16-bit id and an 8-bit count); a position's counts add up to S, which is how the reader finds where a position's
  entries end, so nothing else is stored per position. Counts are exact integers: nothing is quantised.
- ``full``: the whole distribution as float16 log-probabilities, ``2V`` bytes per position: the reference, for
  small vocabularies (V = 1,024: 2 KB per token).

Ids are uint16 when the vocabulary has at most 65,536 tokens, else uint32.

**Temperature.** A ``full`` store serves any temperature: ``log_softmax(log p_Ts · Ts / T)`` is the teacher's
distribution at T, exactly (up to the float16 rounding), because ``log p_Ts`` is the logits divided by Ts up to a
constant. A ``topk`` or ``sampled`` store is valid at its own temperature only; a run at another one is refused.

**Losses** (:func:`store_distill_loss`), all chunked like :mod:`kdkit.lm.losses` and mixed with the data's
cross-entropy by ``alpha``: a ``full`` store takes every divergence; ``topk`` every divergence over the k + 1
buckets of :func:`kdkit.lm.topk.sparse_distill_loss`; ``sampled`` forward KL only. Forward KL is linear in the
teacher's distribution, so replacing ``p`` by ``p̂`` keeps its gradient unbiased; reverse KL needs ``log p`` at
every token the student gives mass to (``p̂`` is zero there: the divergence is infinite), and JSD, skew KL and
total variation are not linear in ``p``, so their sampled estimates are biased.

**On disk.** A folder with ``store.json`` (the manifest: kind, size, temperature, vocabulary, counts, statistics,
the fingerprint of what was distilled, and every shard file with its size) and shards of ``rows_per_shard`` rows,
each a few raw little-endian arrays (``shard-00000.index`` and, per kind, ``.ids``, ``.logp``, ``.tail``,
``.counts``). The ``.index`` file gives, for each row of the shard, where its positions and entries
start. The store is written into a temporary sibling folder and renamed into place once complete, so a reader
never sees a partial store; an existing store is never overwritten. Reading uses ``os.pread`` on those files,
for the rows of a batch only: nothing is memory-mapped, so a run's memory does not grow with the corpus (the
operating system's page cache may keep what was read, outside the process). Any process reads any row, so
every data-parallel rank reads its own rows from one store, whatever the world size. No pickles anywhere.

**Fingerprint.** A store records the teacher's weights, the tokenizer, the token ids and targets it was built
on, its kind, size, temperature and sampling seed (:func:`store_fingerprint`); a run refuses a store whose
teacher, tokenizer or data differ from its own, naming which.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

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
from .topk import SparseTargets, check_record, sparse_distill_loss, topk_targets, truncation_kl

FORMAT = "kdkit-teacher-store"
FORMAT_VERSION = 1
KINDS = ("topk", "sampled", "full")
MAX_SAMPLES = 255  # counts are uint8
DEFAULT_ROWS_PER_SHARD = 8192
SAMPLED_DIVERGENCES = ("forward_kl",)
_UINT16_VOCAB = 65536


def id_dtype(vocab_size: int) -> np.dtype:
    """uint16 for vocabularies of at most 65,536 tokens, else uint32."""
    return np.dtype("<u2") if vocab_size <= _UINT16_VOCAB else np.dtype("<u4")


def _sections(kind: str, size: int, vocab_size: int) -> Dict[str, Tuple[np.dtype, Tuple[int, ...], str]]:
    """The arrays of one shard per kind: name -> (dtype, trailing shape, what counts its rows)."""
    ids = id_dtype(vocab_size)
    if kind == "topk":
        return {"ids": (ids, (size,), "positions"), "logp": (np.dtype("<f2"), (size,), "positions"),
                "tail": (np.dtype("<f4"), (), "positions")}
    if kind == "sampled":
        return {"ids": (ids, (), "entries"), "counts": (np.dtype("u1"), (), "entries")}
    return {"logp": (np.dtype("<f2"), (vocab_size,), "positions")}


def bytes_per_position(kind: str, size: int, vocab_size: int, entries_per_position: float = 0.0) -> float:
    """Bytes a store keeps per predicted token (without the per-row index of 16 bytes): topk ``k·(id + 2) + 4``,
    sampled ``entries·(id + 1)``, full ``2V``."""
    idb = id_dtype(vocab_size).itemsize
    if kind == "topk":
        return size * (idb + 2) + 4
    if kind == "sampled":
        return entries_per_position * (idb + 1)
    return 2 * vocab_size


def check_kind(kind: str, size: Optional[int], vocab_size: Optional[int] = None) -> int:
    """One-line errors for a store's kind and size; returns the size (V for ``full``)."""
    if kind not in KINDS:
        raise KdkitError(f"store kind must be one of {', '.join(KINDS)}; got {kind!r}")
    if kind == "full":
        return int(vocab_size or 0)
    what = "k (tokens kept per position)" if kind == "topk" else "the number of samples per position"
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise KdkitError(f"a {kind} store needs its size: {what}, an integer >= 1; got {size!r}")
    if kind == "topk" and vocab_size is not None and size > vocab_size:
        raise KdkitError(f"a top-{size} store is larger than the vocabulary ({vocab_size} tokens); expected "
                         f"1..{vocab_size}")
    if kind == "sampled" and size > MAX_SAMPLES:
        raise KdkitError(f"a sampled store keeps at most {MAX_SAMPLES} samples per position (8-bit counts); got "
                         f"{size}")
    return size


def check_divergence(kind: str, divergence: str) -> None:
    """Refuse a divergence that is not well defined over the store's record."""
    if kind == "sampled" and divergence not in SAMPLED_DIVERGENCES:
        why = ("needs the teacher's log-probability of every token the student gives mass to, and a sampled "
               "store is zero outside its samples (the divergence is infinite)") if "reverse" in divergence else (
               "is not linear in the teacher's distribution, so its estimate from samples is biased")
        raise KdkitError(f"divergence {divergence} over a sampled store: it {why}; use forward_kl, or a topk or "
                         "full store")


# ============================================================================= targets of a batch


@dataclass
class SampledTargets:
    """The sampled teacher for N predicted tokens (row-major order of ``labels != -100``).

    Attributes:
        ids: (N, U) int64 the distinct sampled tokens of each position, padded with 0.
        weights: (N, U) float32 ``count / S`` (0 for padding): the empirical distribution, summing to 1.
        samples: S.
        vocab_size, temperature, row_lengths: as in :class:`kdkit.lm.topk.SparseTargets`.
    """

    ids: torch.Tensor
    weights: torch.Tensor
    samples: int
    vocab_size: int
    temperature: float = 1.0
    row_lengths: Optional[torch.Tensor] = None

    @property
    def num_tokens(self) -> int:
        return int(self.ids.shape[0])

    def to(self, device) -> "SampledTargets":
        return SampledTargets(self.ids.to(device), self.weights.to(device), self.samples, self.vocab_size,
                              self.temperature, self.row_lengths)


@dataclass
class FullTargets:
    """The full teacher distribution for N predicted tokens: ``log_probs`` (N, V) float16 at ``temperature``."""

    log_probs: torch.Tensor
    vocab_size: int
    temperature: float = 1.0
    row_lengths: Optional[torch.Tensor] = None

    @property
    def num_tokens(self) -> int:
        return int(self.log_probs.shape[0])

    def to(self, device) -> "FullTargets":
        return FullTargets(self.log_probs.to(device), self.vocab_size, self.temperature, self.row_lengths)


Targets = Union[SparseTargets, SampledTargets, FullTargets]


SAMPLINGS = ("systematic", "multinomial")


def sample_counts(log_probs: torch.Tensor, samples: int, generator: Optional[torch.Generator] = None,
                  sampling: str = "systematic") -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw ``samples`` tokens from each row of ``log_probs`` (n, V) and count them.

    ``multinomial``: S independent draws with replacement (Anshumann et al. 2025). ``systematic``: one uniform
    offset U per position and the S evenly spaced points (U + j) / S, j = 0..S-1, looked up in the teacher's
    cumulative distribution (systematic resampling; Kitagawa 1996, Carpenter, Clifford & Fearnhead 1999).
    Each point is marginally a draw from p, so E[count_v / S] = p_v exactly as with independent draws, but a
    token's count is always ``floor(S·p_v)`` or ``ceil(S·p_v)``: every token with p_v ≥ 1/S is kept, and the
    target's variance is far smaller.

    Returns:
        ``(n_entries (n,), ids (E,), counts (E,))``: per position the number of distinct tokens drawn, then the
        distinct tokens of every position back to back (ascending within a position) and their counts.
    """
    n = log_probs.shape[0]
    if n == 0:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty, empty
    if sampling == "multinomial":
        draws = torch.multinomial(log_probs.float().exp(), samples, replacement=True, generator=generator)
        draws = draws.sort(dim=1).values  # (n, S)
    elif sampling == "systematic":
        cdf = log_probs.double().exp().cumsum(1)
        cdf = cdf / cdf[:, -1:]  # exactly 1 at the end
        u = torch.rand(n, 1, generator=generator, dtype=torch.float64)
        points = (u + torch.arange(samples, dtype=torch.float64)) / samples  # (n, S), increasing
        draws = torch.searchsorted(cdf, points, right=True).clamp_(max=log_probs.shape[1] - 1)  # ascending
    else:
        raise KdkitError(f"sampling must be one of {', '.join(SAMPLINGS)}; got {sampling!r}")
    new = torch.ones_like(draws, dtype=torch.bool)
    new[:, 1:] = draws[:, 1:] != draws[:, :-1]
    n_entries = new.sum(1)
    starts = new.reshape(-1).nonzero().squeeze(1)  # flat positions where a distinct token begins
    ends = torch.cat([starts[1:], torch.tensor([n * samples])])
    row_of = starts // samples
    # a run never crosses a row: cut runs at row ends
    row_end = (row_of + 1) * samples
    counts = torch.minimum(ends, row_end) - starts
    return n_entries, draws.reshape(-1)[starts], counts


def sampled_record(teacher_logits: torch.Tensor, labels: torch.Tensor, samples: int, *, temperature: float = 1.0,
                   generator: Optional[torch.Generator] = None, sampling: str = "systematic",
                   chunk_size: ChunkSize = "auto", ignore_index: int = IGNORE_INDEX) -> Dict[str, np.ndarray]:
    """The sampled record of ``teacher_logits`` (B, L, V) at the predicted tokens, as the arrays a store keeps
    (``ids`` (E,), ``counts`` (E,)), with ``n`` (N,) the entries of each position and ``covered`` (N,) the
    teacher mass its distinct draws hold (for the store's statistics)."""
    check_labels(teacher_logits, labels)
    vocab = teacher_logits.shape[-1]
    check_kind("sampled", samples, vocab)
    index, _ = predicted_tokens(labels, vocab, ignore_index)
    flat = teacher_logits.detach().reshape(-1, vocab)
    chunk = resolve_chunk_size(chunk_size, vocab) or max(index.numel(), 1)
    ns, ids, counts, covered = [], [], [], []
    with torch.no_grad():
        for start in range(0, index.numel(), chunk):
            log_p = F.log_softmax(flat.index_select(0, index[start:start + chunk]).float().cpu() / temperature, 1)
            n, i, c = sample_counts(log_p, samples, generator, sampling)
            ns.append(n)
            ids.append(i)
            counts.append(c)
            rows = torch.repeat_interleave(torch.arange(len(n)), n)
            covered.append(torch.zeros(len(n)).index_add_(0, rows, log_p[rows, i].exp()))

    def cat(parts):
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)

    return {"n": cat(ns).numpy().astype(np.uint8), "ids": cat(ids).numpy(),
            "counts": cat(counts).numpy().astype(np.uint8),
            "covered": cat(covered).numpy() if covered else np.zeros(0, dtype=np.float32)}


def _sampled_from_raw(ids: np.ndarray, counts: np.ndarray, samples: int, vocab: int, temperature: float,
                      row_lengths: torch.Tensor) -> SampledTargets:
    """Padded (N, U) ids and weights from the entries of N positions: each position's counts add up to S."""
    c = torch.from_numpy(counts.astype(np.int64))
    positions = int(row_lengths.sum())
    pos = (torch.cumsum(c, 0) - c) // samples  # the position of each entry
    n_t = torch.bincount(pos, minlength=positions) if len(c) else torch.zeros(positions, dtype=torch.long)
    if len(c) and (int(pos[-1]) != positions - 1 or int(c.sum()) != positions * samples):
        raise KdkitError(f"teacher store: {len(c)} sampled entries do not make {positions} positions of {samples} "
                         "draws each (damaged store)")
    width = int(n_t.max()) if n_t.numel() else 1
    slot = torch.arange(len(pos)) - torch.repeat_interleave(torch.cumsum(n_t, 0) - n_t, n_t)
    id_pad = torch.zeros(positions, width, dtype=torch.long)
    w_pad = torch.zeros(positions, width, dtype=torch.float32)
    id_pad[pos, slot] = torch.from_numpy(ids.astype(np.int64))
    w_pad[pos, slot] = torch.from_numpy(counts.astype(np.float32)) / samples
    return SampledTargets(id_pad, w_pad, samples, vocab, float(temperature), row_lengths)


# ============================================================================= losses over a store


def store_distill_loss(student_logits: torch.Tensor, labels: torch.Tensor, targets: Targets, *,
                       divergence: str = "forward_kl", temperature: Optional[float] = None, alpha: float = 1.0,
                       beta: float = 0.5, skew: float = 0.1, chunk_size: ChunkSize = "auto",
                       ignore_index: int = IGNORE_INDEX) -> LMLoss:
    """``alpha · T² · mean_tokens D(p ‖ q_T) + (1 - alpha) · mean_tokens -log q(y)`` against a stored teacher.

    Args:
        student_logits: (B, L, V).
        labels: (B, L), ``ignore_index`` where nothing is predicted (the labels the store was built with).
        targets: the batch's record (:meth:`TeacherStore.targets`).
        temperature: T of the divergence; None: the store's. A ``full`` store derives any T; ``topk`` and
            ``sampled`` refuse a T other than their own.
        divergence, alpha, beta, skew, chunk_size: as in :func:`kdkit.lm.losses.lm_distill_loss`.
    """
    T = float(targets.temperature if temperature is None else temperature)
    check_options(divergence, T, alpha, beta, skew)
    if isinstance(targets, SparseTargets):
        _check_temperature("topk", targets.temperature, T)
        return sparse_distill_loss(student_logits, labels, targets, divergence=divergence, alpha=alpha, beta=beta,
                                   skew=skew, chunk_size=chunk_size, ignore_index=ignore_index)
    check_labels(student_logits, labels)
    index, y = predicted_tokens(labels, student_logits.shape[-1], ignore_index)
    check_record(student_logits, labels, targets, index.numel(), ignore_index)
    t2 = T * T
    dev = student_logits.device
    if isinstance(targets, SampledTargets):
        check_divergence("sampled", divergence)
        _check_temperature("sampled", targets.temperature, T)
        ids, weights = targets.ids.to(dev), targets.weights.to(dev)

        def teacher_term(log_q_t: torch.Tensor, start: int, end: int) -> torch.Tensor:
            w = weights[start:end]
            log_w = torch.where(w > 0, w.clamp_min(1e-30).log(), torch.zeros_like(w))
            return (w * (log_w - log_q_t.gather(1, ids[start:end]))).sum(1)  # KL(p̂ ‖ q_T)
    else:
        scale = targets.temperature / T
        log_p_all = targets.log_probs

        def teacher_term(log_q_t: torch.Tensor, start: int, end: int) -> torch.Tensor:
            log_p = F.log_softmax(log_p_all[start:end].to(dev).float() * scale, dim=1)
            return divergence_tokens(log_q_t, log_p, divergence, beta, skew)

    def terms(s: torch.Tensor, start: int, end: int):
        log_q_t = F.log_softmax(s / T, dim=1)
        kd = t2 * teacher_term(log_q_t, start, end)
        ce = -(log_q_t if T == 1.0 else F.log_softmax(s, dim=1)).gather(1, y[start:end, None]).squeeze(1)
        return alpha * kd + (1.0 - alpha) * ce, kd, ce

    return chunked_token_mean(student_logits, index, terms, chunk_size)


def _check_temperature(kind: str, stored: float, asked: float) -> None:
    if not math.isclose(stored, asked, rel_tol=1e-9):
        raise KdkitError(f"the {kind} teacher store was written at temperature {stored:g} and this run asks for "
                         f"{asked:g}; a {kind} record cannot be re-tempered: use temperature {stored:g}, or a full "
                         "store, or write a store at this temperature")


# ============================================================================= writing


def _tmp_sibling(path: Path) -> Path:
    return path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class StoreWriter:
    """Writes a store row by row, in order (:meth:`append`), then :meth:`commit` renames it into place.

    Use as a context manager: leaving the block without :meth:`commit` (an exception, Ctrl-C) removes the
    temporary folder, and nothing appears at ``path``.

    Args:
        path: the store folder to create; it must not exist.
        kind, size: ``topk`` (k), ``sampled`` (S) or ``full`` (size ignored).
        rows, tokens: the dataset's rows and predicted tokens (``labels != -100``), checked at commit.
        vocab_size, temperature: of the teacher's distribution.
        fingerprint: strings identifying teacher, tokenizer and data (:func:`store_fingerprint`).
        rows_per_shard: rows per shard.
    """

    def __init__(self, path: Union[str, Path], *, kind: str, size: Optional[int], rows: int, tokens: int,
                 vocab_size: int, temperature: float = 1.0, fingerprint: Optional[Mapping[str, str]] = None,
                 rows_per_shard: int = DEFAULT_ROWS_PER_SHARD):
        self.path = Path(path)
        if self.path.exists():
            raise KdkitError(f"teacher store {self.path} already exists; not overwriting it (delete it or choose "
                             "another path)")
        size = check_kind(kind, size, vocab_size)
        if not temperature > 0:
            raise KdkitError(f"store temperature must be > 0; got {temperature}")
        if rows_per_shard < 1:
            raise KdkitError(f"rows_per_shard must be >= 1; got {rows_per_shard}")
        self.kind, self.size, self.vocab = kind, size, int(vocab_size)
        self.sections = _sections(kind, size, self.vocab)
        self.meta: Dict[str, Any] = {
            "format": FORMAT, "version": FORMAT_VERSION, "kind": kind, "size": size, "vocab_size": self.vocab,
            "temperature": float(temperature), "id_dtype": id_dtype(self.vocab).name, "rows": int(rows),
            "tokens": int(tokens), "rows_per_shard": int(rows_per_shard), "fingerprint": dict(fingerprint or {}),
            "shards": []}
        self.tmp = _tmp_sibling(self.path)
        self.tmp.mkdir(parents=True)
        self._row = self._pos = self._ent = 0
        self._shard: Optional[Dict[str, Any]] = None
        self._stats = {"covered": 0.0, "kl": 0.0, "kl_max": 0.0, "kl_tokens": 0, "tail": 0.0}

    # one shard at a time: files opened for appending, index (rows + 1, 2) kept until the shard closes
    def _open_shard(self) -> None:
        i = len(self.meta["shards"])
        name = f"shard-{i:05d}"
        self._shard = {"name": name, "row_start": self._row, "rows": 0, "positions": 0, "entries": 0,
                       "index": [(0, 0)],
                       "files": {s: open(self.tmp / f"{name}.{s}", "wb") for s in self.sections}}

    def _close_shard(self) -> None:
        sh = self._shard
        if sh is None:
            return
        for f in sh["files"].values():
            f.close()
        index = np.asarray(sh["index"], dtype="<i8")
        index.tofile(self.tmp / f"{sh['name']}.index")
        files = {"index": {"dtype": "<i8", "shape": list(index.shape)}}
        for s, (dt, trail, counted) in self.sections.items():
            files[s] = {"dtype": dt.str, "shape": [sh[counted], *trail]}
        for s, spec in files.items():
            spec["bytes"] = (self.tmp / f"{sh['name']}.{s}").stat().st_size
            want = int(np.prod(spec["shape"])) * np.dtype(spec["dtype"]).itemsize
            if spec["bytes"] != want:  # a write that did not complete
                raise KdkitError(f"teacher store {self.path}: {sh['name']}.{s} has {spec['bytes']} bytes, expected "
                                 f"{want}")
        self.meta["shards"].append({"name": sh["name"], "row_start": sh["row_start"], "rows": sh["rows"],
                                    "positions": sh["positions"], "entries": sh["entries"], "files": files})
        self._shard = None

    def append(self, row_lengths: Sequence[int], arrays: Mapping[str, np.ndarray],
               entries_per_position: Optional[np.ndarray] = None) -> None:
        """Write the next ``len(row_lengths)`` rows: ``arrays`` holds the kind's sections for their positions
        (``entries_per_position``: sampled stores' ``n``)."""
        lengths = [int(v) for v in row_lengths]
        if self._row + len(lengths) > self.meta["rows"]:
            raise KdkitError(f"teacher store {self.path}: more rows written than the declared {self.meta['rows']}")
        n_entries = arrays["n"].astype(np.int64) if self.kind == "sampled" else None
        p0 = 0
        e0 = 0
        for length in lengths:
            if self._shard is None:
                self._open_shard()
            sh = self._shard
            p1 = p0 + length
            e1 = e0 + (int(n_entries[p0:p1].sum()) if n_entries is not None else 0)
            for s, (dt, _, counted) in self.sections.items():
                a, b = (p0, p1) if counted == "positions" else (e0, e1)
                np.ascontiguousarray(arrays[s][a:b], dtype=dt).tofile(sh["files"][s])
            sh["rows"] += 1
            sh["positions"] += length
            sh["entries"] += e1 - e0
            sh["index"].append((sh["positions"], sh["entries"]))
            self._row += 1
            self._pos += length
            self._ent += e1 - e0
            p0, e0 = p1, e1
            if sh["rows"] == self.meta["rows_per_shard"]:
                self._close_shard()
        have = len(n_entries) if n_entries is not None else len(arrays[next(iter(self.sections))])
        if p0 != have or (n_entries is not None and e0 != len(arrays["ids"])):
            raise KdkitError(f"teacher store {self.path}: the rows' lengths ({p0} positions) do not match the "
                             f"arrays written ({have})")

    def add_stats(self, **values: float) -> None:
        """Accumulate statistics for ``store.json``: ``covered`` (sampled mass), ``kl`` / ``kl_max`` /
        ``kl_tokens`` (truncation or float16 KL), ``tail`` (top-k tail mass)."""
        st = self._stats
        for key, v in values.items():
            st[key] = max(st[key], v) if key == "kl_max" else st[key] + v

    def commit(self) -> Path:
        """Check that every row was written, then rename the folder into place."""
        self._close_shard()
        m = self.meta
        if self._row != m["rows"] or self._pos != m["tokens"]:
            raise KdkitError(f"teacher store {self.path}: {self._row}/{m['rows']} rows and {self._pos}/{m['tokens']} "
                             "tokens written; not committing")
        st, tokens = self._stats, max(m["tokens"], 1)
        m["entries"] = self._ent if self.kind == "sampled" else m["tokens"] * m["size"]
        m["entries_per_position"] = m["entries"] / tokens
        if self.kind == "sampled":
            m["sampled_mass_mean"] = st["covered"] / tokens
        if self.kind == "topk":
            m["tail_mass_mean"] = st["tail"] / tokens
        if st["kl_tokens"]:
            key = "truncation_kl" if self.kind == "topk" else "float16_kl"
            m[f"{key}_mean"] = st["kl"] / st["kl_tokens"]
            m[f"{key}_max"] = st["kl_max"]
        m["bytes"] = sum(spec["bytes"] for sh in m["shards"] for spec in sh["files"].values())
        m["bytes_per_position"] = m["bytes"] / tokens
        m["bytes_per_entry"] = m["bytes"] / max(m["entries"], 1)  # with the per-row index
        idb = id_dtype(self.vocab).itemsize
        m["entry_bytes"] = {"topk": idb + 2, "sampled": idb + 1, "full": 2}[self.kind]  # one entry alone
        (self.tmp / "store.json").write_text(json.dumps(m, indent=1))
        try:
            os.rename(self.tmp, self.path)  # atomic; fails if the path appeared meanwhile (non-empty)
        except OSError as e:
            self.abort()
            raise KdkitError(f"could not move the teacher store into {self.path}: {e.strerror}") from None
        self.tmp = None
        return self.path

    def abort(self) -> None:
        if self._shard is not None:
            for f in self._shard["files"].values():
                f.close()
            self._shard = None
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.abort()  # a no-op after commit()


def write_batches(writer: StoreWriter, batches: Iterable[Tuple[torch.Tensor, torch.Tensor]], *, seed: int = 0,
                  sampling: str = "systematic", measure: bool = True, chunk_size: ChunkSize = "auto") -> None:
    """Compute the kind's record of each ``(teacher_logits (b, L, V), labels (b, L))`` batch and append it."""
    kind, size, T = writer.kind, writer.size, writer.meta["temperature"]
    g = torch.Generator().manual_seed(int(seed))
    for logits, labels in batches:
        lengths = (labels != IGNORE_INDEX).sum(1).tolist()
        if kind == "topk":
            tg = topk_targets(logits, labels, size, temperature=T, chunk_size=chunk_size)
            writer.append(lengths, {"ids": tg.indices.numpy(), "logp": tg.values.numpy(),
                                    "tail": tg.log_tail.float().numpy()})
            writer.add_stats(tail=float(tg.log_tail.double().exp().sum()))
            if measure and tg.num_tokens:
                kl = truncation_kl(logits, labels, tg, chunk_size=chunk_size)
                writer.add_stats(kl=float(kl.double().sum()), kl_max=float(kl.max()), kl_tokens=kl.numel())
        elif kind == "sampled":
            raw = sampled_record(logits, labels, size, temperature=T, generator=g, sampling=sampling,
                                 chunk_size=chunk_size)
            writer.append(lengths, raw)
            writer.add_stats(covered=float(raw["covered"].astype(np.float64).sum()))
        else:
            index, _ = predicted_tokens(labels, logits.shape[-1])
            log_p = F.log_softmax(logits.reshape(-1, logits.shape[-1]).index_select(0, index).float() / T, dim=1)
            half = log_p.to(torch.float16)
            writer.append(lengths, {"logp": half.numpy()})
            if measure and len(index):  # what float16 costs: KL(p ‖ renormalised float16 p)
                kl = (log_p.exp() * (log_p - F.log_softmax(half.float(), dim=1))).sum(1)
                writer.add_stats(kl=float(kl.double().sum()), kl_max=float(kl.max()), kl_tokens=kl.numel())


# ============================================================================= reading


class TeacherStore:
    """A committed store, read with ``os.pread`` for the rows of a batch (:meth:`targets`)."""

    def __init__(self, path: Path, meta: Dict[str, Any], reused: bool = True):
        self.path, self.meta, self.reused = path, meta, reused
        self.kind, self.size = meta["kind"], int(meta["size"])
        self.temperature = float(meta["temperature"])
        self.vocab_size = int(meta["vocab_size"])
        self._starts = [int(sh["row_start"]) for sh in meta["shards"]]
        self._fds: Dict[Tuple[int, str], int] = {}

    # ---------------------------------------------------------------- opening
    @classmethod
    def open(cls, path: Union[str, Path], expect: Optional[Mapping[str, str]] = None) -> "TeacherStore":
        """Open ``path``, checking every shard file's presence and size; with ``expect`` (a fingerprint), refuse
        a store built from another teacher, tokenizer or data, naming which."""
        path = Path(path)
        try:
            meta = json.loads((path / "store.json").read_text())
        except FileNotFoundError:
            raise KdkitError(f"{path} is not a teacher store (no store.json): write one with kdkit cache or "
                             "kdkit.lm.store.build_store") from None
        except (OSError, ValueError) as e:
            raise KdkitError(f"teacher store {path}: store.json is unreadable ({e})") from None
        if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
            raise KdkitError(f"{path} is not a version-{FORMAT_VERSION} {FORMAT} (store.json says "
                             f"{meta.get('format')!r} version {meta.get('version')!r})")
        rows = 0
        for sh in meta["shards"]:
            for name, spec in sh["files"].items():
                f = path / f"{sh['name']}.{name}"
                if not f.is_file():
                    raise KdkitError(f"teacher store {path} is incomplete: shard file {f.name} is missing")
                have = f.stat().st_size
                if have != spec["bytes"]:
                    raise KdkitError(f"teacher store {path} is damaged: shard file {f.name} has {have} bytes, "
                                     f"store.json says {spec['bytes']} (truncated or overwritten)")
            rows += sh["rows"]
        if rows != meta["rows"]:
            raise KdkitError(f"teacher store {path} is incomplete: its shards hold {rows} rows of {meta['rows']}")
        if expect is not None:
            check_fingerprint(path, meta.get("fingerprint", {}), expect)
        return cls(path, meta)

    def __len__(self) -> int:
        return int(self.meta["rows"])

    @property
    def nbytes(self) -> int:
        return int(self.meta["bytes"])

    def check_run(self, divergence: str, temperature: float) -> None:
        """Refuse a divergence the kind cannot serve, or a temperature it cannot give."""
        check_divergence(self.kind, divergence)
        if self.kind != "full":
            _check_temperature(self.kind, self.temperature, float(temperature))

    def describe(self) -> str:
        m = self.meta
        what = {"topk": f"top-{self.size}", "sampled": f"sampled ({self.size} {m.get('sampling', '')} draws)",
                "full": "full"}[self.kind]
        text = (f"{what} teacher store at T={self.temperature:g} ({'reusing' if self.reused else 'wrote'} "
                f"{self.path}): {m['rows']:,} rows, {m['tokens']:,} tokens, {m['bytes'] / 2**20:.2f} MiB = "
                f"{m['bytes_per_position']:.1f} bytes per token")
        if self.kind != "full":
            text += (f" ({m['entries_per_position']:.1f} entries of {m['entry_bytes']} bytes, "
                     f"{m['bytes_per_entry']:.2f} with the row index)")
        text += f"; dense float16 would take {2 * self.vocab_size:,} bytes per token"
        if "sampled_mass_mean" in m:
            text += f"; the sampled tokens hold {m['sampled_mass_mean']:.3f} of the teacher's mass on average"
        if "truncation_kl_mean" in m:
            text += (f"; teacher mass outside the top-{self.size}: {m['tail_mass_mean']:.3g} on average, truncation "
                     f"KL {m['truncation_kl_mean']:.3g} nats/token")
        if "float16_kl_mean" in m:
            text += f"; float16 costs {m['float16_kl_mean']:.2g} nats/token of KL"
        return text

    # ---------------------------------------------------------------- reading
    def _fd(self, shard: int, section: str) -> int:
        key = (shard, section)
        fd = self._fds.get(key)
        if fd is None:
            fd = self._fds[key] = os.open(self.path / f"{self.meta['shards'][shard]['name']}.{section}", os.O_RDONLY)
        return fd

    def _read(self, shard: int, section: str, start: int, stop: int) -> np.ndarray:
        spec = self.meta["shards"][shard]["files"][section]
        dt = np.dtype(spec["dtype"])
        per = dt.itemsize * int(np.prod(spec["shape"][1:], dtype=np.int64))
        nbytes = (stop - start) * per
        buf = os.pread(self._fd(shard, section), nbytes, start * per) if nbytes else b""
        if len(buf) != nbytes:
            raise KdkitError(f"teacher store {self.path}: short read from {self.meta['shards'][shard]['name']}."
                             f"{section} (the file changed after opening)")
        return np.frombuffer(buf, dtype=dt).reshape(stop - start, *spec["shape"][1:])

    def rows(self, index: Union[torch.Tensor, Sequence[int]]) -> Tuple[List[int], Dict[str, np.ndarray]]:
        """The raw record of rows ``index``: their lengths and the kind's sections, concatenated in that order."""
        idx = torch.as_tensor(index).to("cpu", torch.long).tolist()
        lengths: List[int] = []
        parts: Dict[str, List[np.ndarray]] = {s: [] for s in _sections(self.kind, self.size, self.vocab_size)}
        counted = {s: c for s, (_, _, c) in _sections(self.kind, self.size, self.vocab_size).items()}
        for r in idx:
            if not 0 <= r < len(self):
                raise KdkitError(f"teacher store {self.path} has rows 0..{len(self) - 1}; asked for row {r}")
            shard = bisect.bisect_right(self._starts, r) - 1
            local = r - self._starts[shard]
            (p0, e0), (p1, e1) = self._read(shard, "index", local, local + 2)
            lengths.append(int(p1 - p0))
            for s in parts:
                a, b = (p0, p1) if counted[s] == "positions" else (e0, e1)
                parts[s].append(self._read(shard, s, int(a), int(b)))
        return lengths, {s: np.concatenate(v) if v else np.zeros(0) for s, v in parts.items()}

    def targets(self, index: Union[torch.Tensor, Sequence[int]], device: Union[str, torch.device] = "cpu"
                ) -> Targets:
        """The record of rows ``index`` (B,), their tokens in that order (the batch's row-major order)."""
        lengths, a = self.rows(index)
        row_lengths = torch.tensor(lengths, dtype=torch.long)
        T, V = self.temperature, self.vocab_size
        if self.kind == "topk":
            k = self.size
            t: Targets = SparseTargets(values=torch.from_numpy(a["logp"].astype(np.float16).reshape(-1, k)),
                                       indices=torch.from_numpy(a["ids"].astype(np.int32).reshape(-1, k)),
                                       log_tail=torch.from_numpy(a["tail"].astype(np.float32).reshape(-1)),
                                       vocab_size=V, temperature=T, row_lengths=row_lengths)
        elif self.kind == "sampled":
            t = _sampled_from_raw(a["ids"].reshape(-1), a["counts"].reshape(-1), self.size, V, T, row_lengths)
        else:
            t = FullTargets(torch.from_numpy(a["logp"].astype(np.float16).reshape(-1, V)), V, T, row_lengths)
        return t.to(device)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self):  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

    def __getstate__(self):  # data-loader workers and spawn: reopen files in the new process
        state = dict(self.__dict__)
        state["_fds"] = {}
        return state


# ============================================================================= fingerprints and building

FINGERPRINT_WORDS = {"teacher": "the teacher's weights", "tokenizer": "the tokenizer", "data": "the token ids",
                     "targets": "the targets (which positions predict what)"}


def tokenizer_fingerprint(data) -> str:
    """A hash of the ``tokenizer.json`` that made ``data``'s ids (the file's bytes), else of its vocabulary size
    and special tokens."""
    h = hashlib.blake2b(digest_size=16)
    path = getattr(data, "tokenizer_path", None)
    if path and Path(path).is_file():
        h.update(Path(path).read_bytes())
    else:
        h.update(f"{getattr(data, 'pad_token_id', None)}:{getattr(data, 'eos_token_id', None)}".encode())
    return h.hexdigest()


def store_fingerprint(model: nn.Module, data) -> Dict[str, str]:
    """What a store distils: the teacher's weights, the tokenizer, the token ids and the targets."""
    from ..teacher.cache import fingerprint_data, fingerprint_model

    h = hashlib.blake2b(digest_size=16)
    h.update(data.y.contiguous().numpy().tobytes())
    return {"teacher": fingerprint_model(model), "tokenizer": tokenizer_fingerprint(data),
            "data": fingerprint_data(data), "targets": h.hexdigest()}


def check_fingerprint(path: Path, have: Mapping[str, str], expect: Mapping[str, str]) -> None:
    changed = [key for key in FINGERPRINT_WORDS if key in expect and have.get(key) != expect.get(key)]
    if changed:
        words = ", ".join(FINGERPRINT_WORDS[key] for key in changed)
        raise KdkitError(f"teacher store {path} was written for another run: {words} differ from this run's; "
                         "write a store for this teacher and data (or point method.store elsewhere)")


def default_store_dir() -> Path:
    """``$KDKIT_CACHE_DIR/lm_store``, else ``~/.cache/kdkit/lm_store``."""
    env = os.environ.get("KDKIT_CACHE_DIR")
    return (Path(env) if env else Path.home() / ".cache" / "kdkit") / "lm_store"


def slot_path(folder: Union[str, Path], kind: str, size: int, temperature: float, seed: int,
              fingerprint: Mapping[str, str], rows: int, sampling: str = "systematic") -> Path:
    """The store's folder under ``folder`` for these settings (a hash of all of them)."""
    key = "|".join(f"{a}={b}" for a, b in sorted(fingerprint.items()))
    key += f"|kind={kind}|size={size}|T={float(temperature)!r}|seed={seed}"
    if kind == "sampled":
        key += f"|sampling={sampling}"
    slot = hashlib.blake2b(key.encode(), digest_size=10).hexdigest()
    name = {"topk": f"top{size}", "sampled": f"sampled{size}", "full": "full"}[kind]
    return Path(folder) / f"{name}-{rows}-{slot}"


def _teacher_batches(model: nn.Module, data, batch_size: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    dev = next(model.parameters()).device
    for start in range(0, len(data), batch_size):
        x, y = data.x[start:start + batch_size], data.y[start:start + batch_size]
        with torch.inference_mode():
            logits = model(x.to(dev)).float()  # (b, L', V): trailing all-pad columns trimmed
        yield logits.cpu(), y[:, :logits.shape[1]]  # the trimmed columns hold -100 only


def build_store(model: nn.Module, data, kind: str, size: Optional[int] = None, *, temperature: float = 1.0,
                path: Optional[Union[str, Path]] = None, folder: Optional[Union[str, Path]] = None, seed: int = 0,
                sampling: str = "systematic", batch_size: int = 64, rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
                log=None) -> TeacherStore:
    """Write (or reuse) the store of ``model`` over ``data`` (token ids ``x`` and targets ``y``, (N, L)).

    ``path`` names the store folder; without it, a folder under ``folder`` (default :func:`default_store_dir`)
    named by a hash of teacher, data and settings. An existing store at that path is reused after its
    fingerprint, kind, size and temperature are checked; otherwise the teacher runs over ``data`` once, in
    dataset order, and the store is written atomically.
    """
    from ..data.core import has_token_targets

    if not has_token_targets(data):
        raise KdkitError("a teacher store needs in-memory causal-LM training data (token ids x and targets y of "
                         "shape (N, L)); this training data has none")
    vocab = getattr(model, "vocab_size", None)
    if vocab is None:
        with torch.inference_mode():
            vocab = model(data.x[:1].to(next(model.parameters()).device)).shape[-1]
    vocab = int(vocab)
    size = check_kind(kind, size, vocab)
    fingerprint = store_fingerprint(model, data)
    target = Path(path) if path is not None else slot_path(folder or default_store_dir(), kind, size, temperature,
                                                           seed, fingerprint, len(data), sampling)
    if target.exists():
        store = TeacherStore.open(target, fingerprint)
        m = store.meta
        asked = {"kind": kind, "size": size}
        if kind != "full":  # a full store serves any temperature
            asked["temperature"] = float(temperature)
        if kind == "sampled":
            asked.update(seed=int(seed), sampling=sampling)
        differ = [f"{k} {m.get(k)!r} (asked {v!r})" for k, v in asked.items() if m.get(k) != v]
        if differ:
            raise KdkitError(f"teacher store {target} holds another record: {', '.join(differ)}; choose another "
                             "path or delete it")
        if log:
            log(f"teacher store: reusing {target}")
        return store
    tokens = int((data.y != IGNORE_INDEX).sum())
    was = model.training
    model.eval()
    try:
        with StoreWriter(target, kind=kind, size=size, rows=len(data), tokens=tokens, vocab_size=vocab,
                         temperature=temperature, fingerprint=fingerprint, rows_per_shard=rows_per_shard) as w:
            if kind == "sampled":
                if sampling not in SAMPLINGS:
                    raise KdkitError(f"store sampling must be one of {', '.join(SAMPLINGS)}; got {sampling!r}")
                w.meta.update(seed=int(seed), sampling=sampling)
            write_batches(w, _teacher_batches(model, data, batch_size), seed=seed, sampling=sampling)
            w.commit()
    finally:
        model.train(was)
    store = TeacherStore.open(target, fingerprint)
    store.reused = False
    if log:
        log(f"teacher store: {store.describe()}")
    return store


__all__ = ["FINGERPRINT_WORDS", "FORMAT", "FullTargets", "KINDS", "SampledTargets", "StoreWriter", "TeacherStore",
           "build_store", "bytes_per_position", "check_divergence", "check_kind", "default_store_dir", "id_dtype",
           "SAMPLINGS", "sample_counts", "sampled_record", "slot_path", "store_distill_loss", "store_fingerprint",
           "tokenizer_fingerprint", "write_batches"]
