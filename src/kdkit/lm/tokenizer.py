"""Byte-level BPE tokenizers trained with Hugging Face ``tokenizers`` on a corpus, cached by fingerprint.

Byte-level BPE (Radford et al. 2019, GPT-2; Sennrich et al. 2016 for BPE) never meets an unknown
character: every text maps to ids. kdkit's tokenizers reserve two special tokens, always first:

- ``<pad>`` (id 0): right-pads ``x`` (the contract's mask is ``x != pad``); text that tokenises to it is refused;
- ``<|endoftext|>`` (id 1): ends each document, so a model learns where a quotation stops.

:func:`train_tokenizer` hashes the corpus, the vocabulary size and this module's format version; the trained
``tokenizer.json`` is stored under ``cache_dir/<fingerprint>/`` and reused by any later run with the same corpus
and size (training is deterministic for one corpus, so a rerun gives the same ids either way).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

from ..errors import KdkitError

PAD = "<pad>"
EOS = "<|endoftext|>"
PAD_ID, EOS_ID = 0, 1
FORMAT_VERSION = 1


def require_tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise KdkitError("training a tokenizer needs the optional extra 'hf': pip install 'kdkit[hf]'") from None
    return tokenizers


def default_cache_dir() -> Path:
    """``$KDKIT_CACHE_DIR/tokenizers``, else ``~/.cache/kdkit/tokenizers``."""
    env = os.environ.get("KDKIT_CACHE_DIR")
    return (Path(env) if env else Path.home() / ".cache" / "kdkit") / "tokenizers"


def corpus_fingerprint(texts: Sequence[str], vocab_size: int) -> str:
    """A hash of every document (in order), the vocabulary size and the tokenizer format."""
    h = hashlib.blake2b(digest_size=12)
    h.update(f"bpe-v{FORMAT_VERSION}|{vocab_size}|{len(texts)}|".encode())
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def train_tokenizer(texts: Sequence[str], vocab_size: int = 4096, cache_dir: Optional[os.PathLike] = None,
                    log=None):
    """Train (or reuse) a byte-level BPE tokenizer on ``texts``.

    Args:
        texts: the training documents (only the training split: validation text must not shape the vocabulary).
        vocab_size: target vocabulary, special tokens and the 256 byte symbols included (>= 260).
        cache_dir: where trained tokenizers are kept (default :func:`default_cache_dir`).
        log: optional callable for one-line messages.

    Returns:
        a ``tokenizers.Tokenizer`` with ``<pad>`` = 0 and ``<|endoftext|>`` = 1; its file is at
        ``tokenizer.kdkit_path`` (an attribute set here) and its fingerprint at ``tokenizer.kdkit_fingerprint``.
    """
    tk = require_tokenizers()
    if vocab_size < 260:
        raise KdkitError(f"vocab_size must be >= 260 (256 byte symbols + special tokens); got {vocab_size}")
    if not texts:
        raise KdkitError("cannot train a tokenizer on an empty corpus; expected at least one document")
    fp = corpus_fingerprint(texts, vocab_size)
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = folder / fp / "tokenizer.json"
    if path.is_file():
        tok = load_tokenizer(path)
        if log:
            log(f"tokenizer: reusing {path}")
    else:
        tok = tk.Tokenizer(tk.models.BPE())
        tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, EOS], show_progress=False,
                                         initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tok.save(str(tmp))
        os.replace(tmp, path)  # atomic: a half-written file is never reused
        (path.parent / "meta.json").write_text(json.dumps({"fingerprint": fp, "vocab_size": vocab_size,
                                                           "documents": len(texts), "format": FORMAT_VERSION}))
        if log:
            log(f"tokenizer: trained byte-level BPE ({tok.get_vocab_size()} tokens) -> {path}")
    tok.kdkit_path = str(path)
    tok.kdkit_fingerprint = fp
    return tok


def load_tokenizer(path: os.PathLike):
    """A ``tokenizer.json`` file (or a folder holding one) as a ``tokenizers.Tokenizer``, checked to have kdkit's
    special tokens in place."""
    tk = require_tokenizers()
    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise KdkitError(f"tokenizer file {p} not found (expected a tokenizer.json)")
    try:
        tok = tk.Tokenizer.from_file(str(p))
    except Exception as e:  # tokenizers raises a plain Exception on a malformed file
        raise KdkitError(f"cannot read tokenizer {p}: {str(e).splitlines()[0]}") from None
    tok.kdkit_path = str(p)
    return tok


# End-of-text tokens of common tokenizers: kdkit's and GPT-2's / Qwen's, Llama 3's, SentencePiece models'.
EOS_NAMES = (EOS, "<|end_of_text|>", "</s>", "<eos>")


def special_ids(tok) -> tuple:
    """(pad id, eos id) of a tokenizer: kdkit's ``<pad>`` and ``<|endoftext|>``, or for a Hugging Face tokenizer
    without a pad token (GPT-2, Llama 3) its end-of-text token for both (padding follows a row's last token, so
    it is never read as text)."""
    eos = next((tok.token_to_id(n) for n in EOS_NAMES if tok.token_to_id(n) is not None), None)
    if eos is None:
        raise KdkitError(f"the tokenizer has no end-of-text token (looked for {', '.join(EOS_NAMES)}); expected one "
                         "trained by kdkit.lm.train_tokenizer or a causal-LM tokenizer.json that has one")
    pad = tok.token_to_id(PAD)
    return (eos if pad is None else pad), eos


def encode(tok, texts: Iterable[str], pad_id: int, where: str = "text") -> List[List[int]]:
    """Ids of each text (no special tokens added); text that produces the pad id is refused (contract)."""
    texts = list(texts)
    out = [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
    for i, ids in enumerate(out):
        if pad_id in ids:
            raise KdkitError(f"{where} {i} contains the pad token ({tok.id_to_token(pad_id)!r}, id {pad_id}) as text; "
                             f"the pad id may only mark padding: remove it from the corpus")
    return out


def decode(tok, ids: Sequence[int]) -> str:
    return tok.decode(list(ids), skip_special_tokens=True)


def byte_decoder() -> dict:
    """The byte-level alphabet of GPT-2-style BPEs (``tokenizers``' ByteLevel): character -> byte.

    The 188 printable bytes (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) stand for themselves; the other 68 bytes
    are given the characters U+0100 upward, in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}
