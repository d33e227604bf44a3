"""The offline top-k teacher of a run: built once from the training data, fingerprinted, reused.

:func:`build_topk_store` runs the frozen teacher over the training rows in dataset order (fixed batches, so the
stored values do not depend on the epoch's shuffling), keeps its top-k per predicted token with the missing mass
(:mod:`kdkit.lm.topk`) and writes them under ``topk_dir/<slot>``; the slot is a hash of the teacher's weights, the
training ids and targets, k and the temperature, so a later run with the same teacher, data and settings reuses
the file (``kdkit.teacher.cache``'s fingerprints), and anything changed gets a new one. ``lm_kd`` reads it by
``batch["index"]`` and never runs the teacher during training.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterator, Tuple

import torch
from torch import nn

from ..data.core import IGNORE_INDEX, has_token_targets
from ..errors import KdkitError


def default_topk_dir() -> Path:
    """``$KDKIT_CACHE_DIR/lm_topk``, else ``~/.cache/kdkit/lm_topk``."""
    env = os.environ.get("KDKIT_CACHE_DIR")
    return (Path(env) if env else Path.home() / ".cache" / "kdkit") / "lm_topk"


class TopkStore:
    """A committed sparse teacher (:class:`kdkit.lm.topk.SparseTeacherFile`) and how it came to be."""

    def __init__(self, file, reused: bool):
        self.file, self.reused = file, reused

    def targets(self, index: torch.Tensor, device: torch.device):
        """The sparse targets of rows ``index`` (their predicted tokens in row-major order) on ``device``."""
        return self.file.targets(index).to(device)

    @property
    def meta(self):
        return self.file.meta

    def per_million_tokens(self) -> float:
        """Bytes on disk per million stored (predicted) tokens."""
        return self.meta["bytes"] / max(self.meta["tokens"], 1) * 1e6

    def describe(self) -> str:
        m = self.meta
        text = (f"offline top-{m['k']} teacher ({'reusing' if self.reused else 'built'} {self.file.path}): "
                f"{m['tokens']:,} tokens, {m['bytes'] / 2**20:.2f} MiB = {self.per_million_tokens() / 1e6:.1f} MB per "
                f"million tokens (dense fp16 over V={m['vocab_size']}: {2 * m['vocab_size']:.0f} MB)")
        if "truncation_kl_mean" in m:
            text += (f"; truncation KL mean {m['truncation_kl_mean']:.3g} nats/token (max "
                     f"{m['truncation_kl_max']:.3g}); teacher mass outside the top-{m['k']}: "
                     f"{m['tail_mass_mean']:.3g} on average")
        return text


def _batches(model: nn.Module, data, batch_size: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    dev = next(model.parameters()).device
    for start in range(0, len(data), batch_size):
        x, y = data.x[start:start + batch_size], data.y[start:start + batch_size]
        with torch.inference_mode():
            logits = model(x.to(dev)).float()  # (b, L', V): trailing all-pad columns trimmed
        yield logits.cpu(), y[:, :logits.shape[1]]  # the trimmed columns hold -100 only


def build_topk_store(model: nn.Module, data, k: int, *, temperature: float = 1.0, cache_dir=None,
                     batch_size: int = 64, log=None) -> TopkStore:
    """Build (or reuse) the offline top-k teacher of ``model`` on ``data`` (token data with targets).

    Raises:
        KdkitError: data without token targets, or ``k`` beyond the vocabulary.
    """
    from ..teacher.cache import fingerprint_data, fingerprint_model
    from .topk import SparseTeacherFile, build_sparse_teacher

    if not has_token_targets(data):
        raise KdkitError("method.teacher_topk needs in-memory causal-LM training data (token ids x and targets y "
                         "of shape (N, L)); this training data has none")
    vocab = getattr(model, "vocab_size", None)
    if vocab is None:  # any (B, L) -> (B, L', V) model: ask it
        with torch.inference_mode():
            vocab = model(data.x[:1].to(next(model.parameters()).device)).shape[-1]
    vocab = int(vocab)
    if k > vocab:
        raise KdkitError(f"teacher_topk={k} is larger than the vocabulary ({vocab}); use k <= {vocab}")
    h = hashlib.blake2b(digest_size=16)
    h.update(data.y.contiguous().numpy().tobytes())  # the targets decide which positions are stored
    fingerprint = {"teacher": fingerprint_model(model), "data": fingerprint_data(data), "targets": h.hexdigest(),
                   "k": str(k), "temperature": repr(float(temperature))}
    slot = hashlib.blake2b("|".join(f"{a}={b}" for a, b in sorted(fingerprint.items())).encode(),
                           digest_size=10).hexdigest()
    folder = Path(cache_dir) if cache_dir is not None else default_topk_dir()
    path = folder / f"top{k}-{len(data)}-{slot}"
    if (path / "meta.json").is_file():
        store = TopkStore(SparseTeacherFile.open(path, fingerprint), reused=True)
        if log:
            log(f"lm_kd: reusing the offline top-{k} teacher {path}")
        return store
    was = model.training
    model.eval()
    tokens = int((data.y != IGNORE_INDEX).sum())
    try:
        file = build_sparse_teacher(path, _batches(model, data, batch_size), rows=len(data), tokens=tokens, k=k,
                                    vocab_size=vocab, temperature=temperature, fingerprint=fingerprint)
    finally:
        model.train(was)
    store = TopkStore(file, reused=False)
    if log:
        log(f"lm_kd: {store.describe()}")
    return store
