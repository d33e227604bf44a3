"""Tokenising text once: raw texts and labels in, a cached :class:`~kdkit.data.core.ArrayData` of token ids out.

The contract (see :mod:`kdkit.hf`): ``x`` is a LongTensor (N, L) of ids right-padded with the tokenizer's pad id
to ``L = max_length`` (longer texts are truncated); the pad id never occurs as a real token (refused here), so
``x != pad_token_id`` is the attention mask. When the teacher has its own tokenizer, the same texts are
tokenised for it too (``teacher_x``); the same tokenizer (same vocabulary, rules and special tokens) is
detected and the texts are tokenised once.

Tokenised ids are cached on disk (``cache_dir``, default ``$KDKIT_CACHE_DIR/text`` or ``~/.cache/kdkit/text``),
keyed by a hash of the texts, the tokenizers and ``max_length``, so a second run reads them back instead of
tokenising again.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch

from ..data.core import ArrayData
from ..errors import KdkitError
from .models import load_tokenizer

CACHE_VERSION = 1


def default_text_cache_dir() -> Path:
    """``$KDKIT_CACHE_DIR/text``, else ``~/.cache/kdkit/text``."""
    env = os.environ.get("KDKIT_CACHE_DIR")
    return Path(env) / "text" if env else Path.home() / ".cache" / "kdkit" / "text"


def tokenizer_key(tokenizer: Any) -> str:
    """A hash of everything that decides a tokenizer's ids: its class, its full serialised pipeline (fast
    tokenizers: vocabulary, normaliser, pre-tokeniser, post-processor) or vocabulary, and its special tokens."""
    h = hashlib.blake2b(digest_size=16)
    h.update(type(tokenizer).__qualname__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        pipeline = json.loads(backend.to_str())
        for state in ("truncation", "padding"):  # set by the last call, not part of what the tokenizer is
            pipeline.pop(state, None)
        h.update(json.dumps(pipeline, sort_keys=True).encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps({"pad": tokenizer.pad_token_id, "special": sorted(map(str, tokenizer.all_special_tokens)),
                         "lower": getattr(tokenizer, "do_lower_case", None)}).encode())
    return h.hexdigest()


def same_tokenizer(a: Any, b: Any) -> bool:
    """Whether two tokenizers give the same ids for every text (same :func:`tokenizer_key`)."""
    return a is b or tokenizer_key(a) == tokenizer_key(b)


def vocab_size(tokenizer: Any) -> int:
    """Number of ids the tokenizer can produce (added tokens included)."""
    return int(len(tokenizer))


def encode(texts: Sequence[str], tokenizer: Any, max_length: int) -> torch.Tensor:
    """Token ids (N, max_length), right-padded with the tokenizer's pad id, truncated to ``max_length``.

    Raises:
        KdkitError: no pad token, a non-string text, or a text in which the pad id occurs as a real token
            (the mask ``ids != pad`` would hide it).
    """
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        raise KdkitError(f"tokenizer {type(tokenizer).__name__} has no pad token; expected one (the attention mask "
                         "is ids != pad id)")
    if max_length < 2:
        raise KdkitError(f"max_length must be at least 2 tokens; given {max_length}")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise KdkitError(f"text {i} is a {type(t).__name__}, not a string; expected raw texts")
    if not texts:
        return torch.empty(0, max_length, dtype=torch.long)
    enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_length,
                    padding_side="right", return_attention_mask=True)
    ids = torch.tensor(enc["input_ids"], dtype=torch.long)  # (N, L)
    mask = torch.tensor(enc["attention_mask"], dtype=torch.bool)
    bad = (ids == pad) & mask
    if bool(bad.any()):
        i = int(bad.any(1).to(torch.uint8).argmax())
        raise KdkitError(f"text {i} ({texts[i][:40]!r}) holds the pad token (id {pad}) as a real token; expected "
                         "texts without it (the attention mask is ids != pad id)")
    if bool(mask[:, 1:].gt(mask[:, :-1]).any()):
        raise KdkitError("the tokenizer padded on the left; kdkit expects right padding")
    return ids


def _cache_key(texts: Sequence[str], keys: Sequence[str], max_length: int) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(f"v{CACHE_VERSION}|{max_length}|{'|'.join(keys)}|{len(texts)}".encode())
    for t in texts:
        h.update(t.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()


def _save(path: Path, tensors: Dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def _load(path: Path) -> Optional[Dict[str, torch.Tensor]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError):
        return None  # a damaged cache file is rebuilt


def tokenize_texts(texts: Sequence[str], tokenizer: Any, max_length: int = 128, teacher_tokenizer: Any = None,
                   cache_dir: Any = None, log: Callable[[str], None] = print) -> Tuple[torch.Tensor,
                                                                                       Optional[torch.Tensor]]:
    """``(x, teacher_x)``: the texts' ids for the student's tokenizer and, when the teacher's differs, for the
    teacher's (else None). Read from the disk cache when the same texts were tokenised the same way before;
    ``cache_dir=False`` turns the cache off."""
    tok = load_tokenizer(tokenizer)
    t_tok = None if teacher_tokenizer is None else load_tokenizer(teacher_tokenizer)
    if t_tok is not None and same_tokenizer(tok, t_tok):
        t_tok = None  # one tokenizer: the texts are tokenised once
    keys = [tokenizer_key(tok)] + ([tokenizer_key(t_tok)] if t_tok is not None else [])
    path = None
    if cache_dir is not False:
        base = Path(cache_dir) if cache_dir else default_text_cache_dir()
        path = base / f"tokens-{len(texts)}-{_cache_key(texts, keys, max_length)}.safetensors"
        cached = _load(path) if path.is_file() else None
        if cached is not None and ("teacher_x" in cached) == (t_tok is not None):
            log(f"tokenised text: reusing {path}")
            return cached["x"], cached.get("teacher_x")
    x = encode(texts, tok, max_length)
    teacher_x = encode(texts, t_tok, max_length) if t_tok is not None else None
    if path is not None:
        _save(path, {"x": x, **({"teacher_x": teacher_x} if teacher_x is not None else {})})
    return x, teacher_x


def tokenize(texts: Sequence[str], labels: Optional[Sequence[int]], tokenizer: Any, max_length: int = 128, *,
             teacher_tokenizer: Any = None, bucket_by_length: bool = True, cache_dir: Any = None,
             log: Callable[[str], None] = print) -> ArrayData:
    """Raw texts (and integer labels, -1 = unlabelled) as a tokenised :class:`ArrayData` (see the module doc).

    Args:
        texts: the raw texts.
        labels: one class index per text, or None (an unlabelled transfer set).
        tokenizer: the student's tokenizer (an object, or a local directory / ``minilm``).
        max_length: L; longer texts are truncated.
        teacher_tokenizer: the teacher's, when it differs (then ``teacher_x`` holds its ids).
        bucket_by_length: training batches group samples of similar length (:class:`~kdkit.data.TensorLoader`).
        cache_dir: where tokenised ids are cached (None: the default; False: no cache).
    """
    if labels is not None and len(labels) != len(texts):
        raise KdkitError(f"{len(texts)} texts but {len(labels)} labels; expected one label per text")
    tok = load_tokenizer(tokenizer)
    x, teacher_x = tokenize_texts(texts, tok, max_length, teacher_tokenizer, cache_dir, log)
    y = None if labels is None else torch.as_tensor(list(labels), dtype=torch.long)
    t_pad = None
    if teacher_x is not None:
        t_pad = int(load_tokenizer(teacher_tokenizer).pad_token_id)
    return ArrayData(x, y, teacher_x=teacher_x, pad_token_id=int(tok.pad_token_id), teacher_pad_token_id=t_pad,
                     bucket_by_length=bucket_by_length)


def text_info(tokenizer: Any, max_length: int, teacher_tokenizer: Any = None) -> Dict[str, Any]:
    """What a text dataset records in ``DataSplits.info["text"]``: vocabulary sizes and pad ids kdkit checks
    models against, and fills into text model factories."""
    tok = load_tokenizer(tokenizer)
    info: Dict[str, Any] = {"tokenizer": str(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else
                            type(tok).__name__, "vocab_size": vocab_size(tok), "pad_token_id": int(tok.pad_token_id),
                            "max_length": int(max_length)}
    if teacher_tokenizer is not None:
        t_tok = load_tokenizer(teacher_tokenizer)
        if not same_tokenizer(tok, t_tok):
            info.update(teacher_tokenizer=str(teacher_tokenizer) if isinstance(teacher_tokenizer, (str, os.PathLike))
                        else type(t_tok).__name__, teacher_vocab_size=vocab_size(t_tok),
                        teacher_pad_token_id=int(t_tok.pad_token_id))
    return info
