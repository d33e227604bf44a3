"""Hugging Face transformers in kdkit: local models as teachers and students, tokenised text.

Everything here needs the optional extra ``hf`` (transformers, tokenizers, datasets); ``import kdkit``
never imports transformers, and :func:`require_hf` turns a missing install into a one-line error.

The shared text contract: a tokenised dataset is an :class:`~kdkit.data.core.ArrayData` whose ``x`` is
a LongTensor ``(N, L)`` of token ids right-padded with the tokenizer's pad id; every text model takes
``(B, L)`` ids, has a ``pad_token_id`` attribute and derives its attention mask as ``x != pad_token_id``.

    teacher = kdkit.hf.load("path/to/model", num_labels=8)   # HFClassifier, tokenizer at teacher.tokenizer
    student = kdkit.hf.shrink(teacher, layers=[0, 2, 4])     # kept layers copied from the teacher
    train = kdkit.hf.tokenize(texts, labels, teacher.tokenizer, max_length=64)
"""

from __future__ import annotations

from typing import Any

from .require import require_hf


def __getattr__(name: str) -> Any:
    # Lazy attributes, so `import kdkit.hf` stays cheap and never imports transformers by itself.
    if name in ("HFClassifier", "load", "load_tokenizer", "shrink", "tiny_bert"):
        from . import models
        return getattr(models, name)
    if name == "tokenize":
        from .text import tokenize
        return tokenize
    raise AttributeError(f"module 'kdkit.hf' has no attribute {name!r}")


__all__ = ["HFClassifier", "load", "load_tokenizer", "require_hf", "shrink", "tiny_bert", "tokenize"]
