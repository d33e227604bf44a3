"""Text corpora as causal-LM data: token ids ``x`` (N, L) and next-token targets ``y`` (N, L).

Layout (the contract shared with the transformer work): ``x`` is right-padded with the pad id to a fixed
``L = max_length``; ``y[:, t]`` is the token position ``t`` must predict (``x[:, t + 1]``), and ``-100``
(:data:`IGNORE_INDEX`) where nothing is predicted: padding, the last token, and prompt tokens of prompt/response
pairs. The training loop, the batch loader, checkpoints and metrics see an ordinary
:class:`~kdkit.data.core.ArrayData`.

**One document per row, not packed.** Each document (a quotation, a prompt/response pair) becomes its own row,
ending in ``<|endoftext|>``; a document longer than ``L`` continues in further rows of ``L`` tokens. Packing
several documents into one row would waste no padding but would let a model attend across unrelated
quotations (no document masks in the wrapped models), and the split into train/validation/test is by document
anyway. The padding this costs is mostly not paid: :class:`~kdkit.lm.model.HFCausalLM` drops the columns that
are padding in the whole batch.

Corpora: plain text files (documents separated by lines holding only ``%``, as in Debian's ``fortunes``, by
blank lines, or one per line), JSONL of prompt/response pairs, and Hugging Face ``datasets`` built from local
files. Registered datasets: ``fortunes_lm``, ``text_lm``, ``jsonl_lm``, ``hf_dataset_lm``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..data.builtin import DATASETS
from ..data.core import IGNORE_INDEX, ArrayData, DataSplits, fixed_split, has_token_targets
from ..errors import KdkitError
from . import tokenizer as tokmod

FORTUNES_ROOT = "/usr/share/games/fortunes"
FORTUNES_HINT = "apt-get install fortunes fortunes-min"


class TokenData(ArrayData):
    """Tokenised causal-LM data: :class:`ArrayData` with ``x`` (N, L) int64 ids, ``y`` (N, L) int64 targets.

    Attributes:
        pad_token_id: the id that right-pads ``x``.
        eos_token_id: the end-of-document id (None if unknown).
        tokenizer_path: the ``tokenizer.json`` that made the ids (None if unknown): reports decode samples with it.
        prompts: a few fixed prompt texts (start of held-out documents) for generated samples in reports.
    """

    def __init__(self, x: torch.Tensor, y: Optional[torch.Tensor], pad_token_id: int,
                 eos_token_id: Optional[int] = None, tokenizer_path: Optional[str] = None,
                 prompts: Sequence[str] = ()):
        super().__init__(x, y)
        self.pad_token_id = int(pad_token_id)
        self.eos_token_id = eos_token_id
        self.tokenizer_path = tokenizer_path
        self.prompts = list(prompts)

    def _like(self, x: torch.Tensor, y: Optional[torch.Tensor]) -> "TokenData":
        return TokenData(x, y, self.pad_token_id, self.eos_token_id, self.tokenizer_path, self.prompts)

    def subset(self, idx: torch.Tensor) -> "TokenData":
        return self._like(self.x[idx], None if self.y is None else self.y[idx])

    def without_labels(self) -> "TokenData":
        return self._like(self.x, None)

    @property
    def tokens(self) -> int:
        """Target tokens (positions with a next token to predict)."""
        return int((self.y != IGNORE_INDEX).sum()) if self.y is not None else int((self.x != self.pad_token_id).sum())


def is_token_data(data) -> bool:
    """Whether ``data`` holds causal-LM rows (see :func:`kdkit.data.core.has_token_targets`)."""
    return has_token_targets(data)


# ----------------------------------------------------------------------------- rows from token ids

def document_rows(docs: Sequence[Sequence[int]], max_length: int, pad_id: int,
                  eos_id: Optional[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``max_length`` from documents (lists of ids): each document + ``eos``, long ones continued in
    further rows; ``y`` = next token within the row, ``-100`` after it."""
    if max_length < 2:
        raise KdkitError(f"max_length must be >= 2 (a token and the one it predicts); got {max_length}")
    rows: List[List[int]] = []
    for ids in docs:
        seq = list(ids) + ([eos_id] if eos_id is not None else [])
        for start in range(0, len(seq), max_length):
            piece = seq[start:start + max_length]
            if len(piece) >= 2:
                rows.append(piece)
    return _pad_rows(rows, [0] * len(rows), max_length, pad_id)


def pair_rows(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], max_length: int, pad_id: int,
              eos_id: Optional[int]) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Rows from prompt/response pairs: ``prompt + response + eos``, cut to ``max_length`` on the right; targets
    only where the predicted token is part of the response (prompt tokens are masked out of the loss).

    Returns ``(x, y, dropped)``: pairs whose prompt leaves no room for a response token are dropped and counted.
    """
    rows, starts, dropped = [], [], 0
    for p, r in zip(prompts, responses):
        seq = (list(p) + list(r) + ([eos_id] if eos_id is not None else []))[:max_length]
        if len(p) >= len(seq) or len(p) == 0 and len(seq) < 2:
            dropped += 1
            continue
        rows.append(seq)
        starts.append(max(len(p) - 1, 0))  # position len(p)-1 predicts the first response token
    x, y = _pad_rows(rows, starts, max_length, pad_id)
    return x, y, dropped


def _pad_rows(rows: List[List[int]], first_target: List[int], max_length: int,
              pad_id: int) -> Tuple[torch.Tensor, torch.Tensor]:
    n = len(rows)
    x = torch.full((n, max_length), pad_id, dtype=torch.long)
    y = torch.full((n, max_length), IGNORE_INDEX, dtype=torch.long)
    for i, (seq, first) in enumerate(zip(rows, first_target)):
        t = torch.tensor(seq, dtype=torch.long)
        x[i, :len(seq)] = t
        y[i, first:len(seq) - 1] = t[first + 1:]
    return x, y


# ----------------------------------------------------------------------------- corpora

def read_documents(path: Union[str, Path], separator: str = "auto") -> List[str]:
    """Documents of a plain text file.

    ``separator``: ``"%"`` (lines holding only ``%``, the fortune format), ``"blank"`` (blank lines), ``"line"``
    (one document per line), ``"file"`` (the whole file), or ``"auto"``: ``%`` when such a line exists, else blank
    lines. Terminal overstriking (``X\\bX``, in some fortunes) is removed; empty documents are skipped.
    """
    p = Path(path)
    try:
        text = p.read_bytes().decode("utf-8", errors="replace")
    except OSError as e:
        raise KdkitError(f"cannot read {p}: {e.strerror or e}") from None
    text = re.sub(r".\x08", "", text).replace("\r\n", "\n")
    if separator == "auto":
        separator = "%" if re.search(r"^%$", text, flags=re.M) else "blank"
    if separator == "%":
        docs = re.split(r"^%\n?", text, flags=re.M)
    elif separator == "blank":
        docs = re.split(r"\n\s*\n", text)
    elif separator == "line":
        docs = text.split("\n")
    elif separator == "file":
        docs = [text]
    else:
        raise KdkitError(f"separator must be auto, %, blank, line or file; got {separator!r}")
    return [d.strip("\n") for d in docs if d.strip()]


def _dedupe(docs: List[str]) -> List[str]:
    """Each document once (the fortunes repeat some quotations across files; a duplicate in train and test would
    leak the test set)."""
    return list(dict.fromkeys(docs))


def _paths(path: Union[str, Sequence[str]], where: str) -> List[Path]:
    items = [path] if isinstance(path, (str, Path)) else list(path)
    out: List[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            out += sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith("."))
        elif p.is_file():
            out.append(p)
        else:
            raise KdkitError(f"{where}: {p} not found (expected a text file or a folder of them)")
    if not out:
        raise KdkitError(f"{where}: no files under {path}")
    return out


def fortune_files(root: str = FORTUNES_ROOT, topics: Optional[Sequence[str]] = None) -> List[Path]:
    """The fortune topic files under ``root`` (files without an extension: not ``.dat`` indexes, not ``.u8``
    links), all or the named ``topics``, sorted by name."""
    r = Path(root)
    if not r.is_dir():
        raise KdkitError(f"the fortunes corpus is not at {r}; install it ({FORTUNES_HINT}) or give root")
    files = sorted(f for f in r.iterdir() if f.is_file() and "." not in f.name)
    if topics is not None:
        by_name = {f.name: f for f in files}
        missing = [t for t in topics if t not in by_name]
        if missing:
            raise KdkitError(f"fortunes topic {missing[0]!r} not found in {r}; available: {', '.join(sorted(by_name))}")
        files = [by_name[t] for t in topics]
    if not files:
        raise KdkitError(f"no fortune files in {r}; install them ({FORTUNES_HINT})")
    return files


# ----------------------------------------------------------------------------- splits

def _split_docs(n: int, val_fraction: float, test_fraction: float, seed: int = 0):
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise KdkitError(f"val_fraction + test_fraction must be below 1 (each in [0, 1)); got {val_fraction} and "
                         f"{test_fraction}")
    n_val, n_test = int(round(n * val_fraction)), int(round(n * test_fraction))
    if n - n_val - n_test < 1:
        raise KdkitError(f"only {n} documents: nothing left to train on after the validation and test splits")
    tr, va, te = fixed_split(n, n_val, n_test, seed=seed)
    return sorted(tr.tolist()), sorted(va.tolist()), sorted(te.tolist())


def _prompt_texts(docs: Sequence[str], count: int = 4, words: int = 3) -> List[str]:
    """The first ``words`` words of up to ``count`` documents: fixed prompts for generated samples."""
    out = []
    for d in docs:
        w = d.split()
        if len(w) > words:
            out.append(" ".join(w[:words]))
        if len(out) == count:
            break
    return out


def _tokenizer_for(train_texts: Sequence[str], tokenizer: Optional[str], vocab_size: int, cache_dir):
    if tokenizer is not None:
        return tokmod.load_tokenizer(tokenizer)
    return tokmod.train_tokenizer(train_texts, vocab_size, cache_dir)


def splits_from_documents(docs: Sequence[str], *, max_length: int, vocab_size: int, tokenizer: Optional[str],
                          val_fraction: float, test_fraction: float, cache_dir=None,
                          source: str = "") -> DataSplits:
    """Documents -> a fixed split by document (seed 0), a tokenizer trained on the training documents only
    (or the one given), rows per :func:`document_rows`."""
    docs = _dedupe([d for d in docs if d.strip()])
    where = f" in {source}" if source else ""
    if len(docs) < 2:
        raise KdkitError(f"only {len(docs)} distinct document{'s' if len(docs) != 1 else ''}{where}; a corpus needs "
                         f"documents to split into training and held-out rows (for a file with one document per "
                         f"line set data.separator: line; blank lines or lines holding only % separate documents "
                         f"by default)")
    tr, va, te = _split_docs(len(docs), val_fraction, test_fraction)
    if not va and not te:  # the run would end with an empty report
        raise KdkitError(f"data.val_fraction={val_fraction} and data.test_fraction={test_fraction} of {len(docs)} "
                         f"documents{where} give no validation or test documents: nothing to measure the model on; "
                         f"raise one of them (or give more documents)")
    train_docs = [docs[i] for i in tr]
    tok = _tokenizer_for(train_docs, tokenizer, vocab_size, cache_dir)
    pad, eos = tokmod.special_ids(tok)
    held_out = [docs[i] for i in te] or [docs[i] for i in va] or train_docs

    def make(idx: List[int], name: str) -> Optional[TokenData]:
        if not idx:
            return None
        ids = tokmod.encode(tok, [docs[i] for i in idx], pad, where=f"{name} document")
        x, y = document_rows(ids, max_length, pad, eos)
        return TokenData(x, y, pad, eos, tok.kdkit_path, _prompt_texts(held_out))

    splits = {name: make(idx, name) for name, idx in (("train", tr), ("val", va), ("test", te))}
    info = {"source": source, "documents": {"train": len(tr), "val": len(va), "test": len(te)},
            "rows": {k: (0 if v is None else len(v)) for k, v in splits.items()},
            "tokens": {k: (0 if v is None else v.tokens) for k, v in splits.items()},
            "tokenizer": tok.kdkit_path, "vocab_size": tok.get_vocab_size(), "max_length": max_length,
            "layout": "one document per row (+ <|endoftext|>), right-padded; long documents continue in the next row"}
    return DataSplits(splits["train"], splits["val"], splits["test"], num_classes=tok.get_vocab_size(),
                      input_shape=(max_length,), task="lm", info=info)


@DATASETS.register("fortunes_lm")
def fortunes_lm(root: str = FORTUNES_ROOT, topics: Optional[List[str]] = None, max_documents: Optional[int] = None,
                vocab_size: int = 2048, max_length: int = 64, val_fraction: float = 0.05,
                test_fraction: float = 0.05, tokenizer: Optional[str] = None,
                cache_dir: Optional[str] = None) -> DataSplits:
    """The Debian ``fortunes`` quotations as a language-modelling corpus (about 2.4 MB, 14,000 quotations).

    Quotations are separated by ``%`` lines; duplicates are dropped; the split is fixed, by quotation (seed 0);
    a byte-level BPE tokenizer of ``vocab_size`` is trained on the training quotations (cached, see
    :mod:`kdkit.lm.tokenizer`) unless ``tokenizer`` names a ``tokenizer.json``. ``topics`` picks topic files
    (e.g. ``[computers, science]``); ``max_documents`` keeps the first N quotations (in file order).
    """
    docs: List[str] = []
    for f in fortune_files(root, topics):
        docs += read_documents(f, "%")
    docs = _dedupe(docs)[:max_documents] if max_documents is not None else docs
    return splits_from_documents(docs, max_length=max_length, vocab_size=vocab_size, tokenizer=tokenizer,
                                 val_fraction=val_fraction, test_fraction=test_fraction, cache_dir=cache_dir,
                                 source=f"fortunes: {root} ({', '.join(topics) if topics else 'all topics'})")


@DATASETS.register("text_lm")
def text_lm(path: Optional[Union[str, List[str]]] = None, separator: str = "auto", vocab_size: int = 2048,
            max_length: int = 128, val_fraction: float = 0.05, test_fraction: float = 0.05,
            tokenizer: Optional[str] = None, cache_dir: Optional[str] = None) -> DataSplits:
    """Plain text files (a file, a folder, or a list of them) as documents (see :func:`read_documents`)."""
    if path is None:
        raise KdkitError("dataset text_lm needs path: a text file, a folder of them, or a list")
    docs: List[str] = []
    for f in _paths(path, "text_lm"):
        docs += read_documents(f, separator)
    return splits_from_documents(docs, max_length=max_length, vocab_size=vocab_size, tokenizer=tokenizer,
                                 val_fraction=val_fraction, test_fraction=test_fraction, cache_dir=cache_dir,
                                 source=f"text: {path}")


def read_jsonl(path: Union[str, Path], fields: Sequence[str]) -> List[Dict[str, str]]:
    """Records of a JSONL file; each must hold the string ``fields`` (line numbers in errors)."""
    p = Path(path)
    if not p.is_file():
        raise KdkitError(f"JSONL file {p} not found")
    out = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise KdkitError(f"{p} line {n}: not valid JSON ({e.msg}); expected one object per line") from None
        if not isinstance(rec, dict) or any(not isinstance(rec.get(f), str) for f in fields):
            raise KdkitError(f"{p} line {n}: expected an object with string fields {', '.join(fields)}")
        out.append(rec)
    if not out:
        raise KdkitError(f"{p} holds no records")
    return out


def splits_from_pairs(pairs: Sequence[Tuple[str, str]], *, max_length: int, vocab_size: int,
                      tokenizer: Optional[str], val_fraction: float, test_fraction: float, cache_dir=None,
                      source: str = "") -> DataSplits:
    """Prompt/response pairs -> fixed split by pair; the tokenizer is trained on the training pairs' text; the
    loss sees only response tokens (prompt positions carry ``-100``)."""
    pairs = list(dict.fromkeys((p, r) for p, r in pairs))
    tr, va, te = _split_docs(len(pairs), val_fraction, test_fraction)
    tok = _tokenizer_for([p + r for i in tr for p, r in [pairs[i]]], tokenizer, vocab_size, cache_dir)
    pad, eos = tokmod.special_ids(tok)
    prompts = [pairs[i][0] for i in (te or va or tr)][:4]
    dropped: Dict[str, int] = {}

    def make(idx: List[int], name: str) -> Optional[TokenData]:
        if not idx:
            return None
        p_ids = tokmod.encode(tok, [pairs[i][0] for i in idx], pad, where=f"{name} prompt")
        r_ids = tokmod.encode(tok, [pairs[i][1] for i in idx], pad, where=f"{name} response")
        x, y, dropped[name] = pair_rows(p_ids, r_ids, max_length, pad, eos)
        if len(x) == 0:
            raise KdkitError(f"{name} split: every prompt fills max_length={max_length}; raise max_length")
        return TokenData(x, y, pad, eos, tok.kdkit_path, prompts)

    splits = {name: make(idx, name) for name, idx in (("train", tr), ("val", va), ("test", te))}
    info = {"source": source, "pairs": {"train": len(tr), "val": len(va), "test": len(te)},
            "dropped_prompt_too_long": dropped, "tokenizer": tok.kdkit_path, "vocab_size": tok.get_vocab_size(),
            "max_length": max_length, "layout": "prompt + response + <|endoftext|> per row; prompt masked (-100)"}
    return DataSplits(splits["train"], splits["val"], splits["test"], num_classes=tok.get_vocab_size(),
                      input_shape=(max_length,), task="lm", info=info)


@DATASETS.register("jsonl_lm")
def jsonl_lm(path: Optional[str] = None, prompt_field: str = "prompt", response_field: str = "response",
             vocab_size: int = 2048, max_length: int = 128, val_fraction: float = 0.05, test_fraction: float = 0.05,
             tokenizer: Optional[str] = None, cache_dir: Optional[str] = None) -> DataSplits:
    """A JSONL file of ``{"prompt": ..., "response": ...}`` objects (field names configurable)."""
    if path is None:
        raise KdkitError("dataset jsonl_lm needs path: a JSONL file of prompt/response objects")
    recs = read_jsonl(path, [prompt_field, response_field])
    return splits_from_pairs([(r[prompt_field], r[response_field]) for r in recs], max_length=max_length,
                             vocab_size=vocab_size, tokenizer=tokenizer, val_fraction=val_fraction,
                             test_fraction=test_fraction, cache_dir=cache_dir, source=f"jsonl: {path}")


@DATASETS.register("hf_dataset_lm")
def hf_dataset_lm(data_files: Optional[Union[str, List[str]]] = None, format: str = "json", text_field: str = "text",
                  prompt_field: Optional[str] = None, response_field: Optional[str] = None, vocab_size: int = 2048,
                  max_length: int = 128, val_fraction: float = 0.05, test_fraction: float = 0.05,
                  tokenizer: Optional[str] = None, cache_dir: Optional[str] = None) -> DataSplits:
    """A Hugging Face ``datasets`` dataset built from local files (``load_dataset(format, data_files=...)``;
    format ``json``, ``csv``, ``text`` or ``parquet``), read as documents (``text_field``) or as prompt/response
    pairs (``prompt_field`` and ``response_field``). Nothing is downloaded."""
    if data_files is None:
        raise KdkitError("dataset hf_dataset_lm needs data_files: local file(s) for datasets.load_dataset")
    files = [data_files] if isinstance(data_files, str) else list(data_files)
    for f in files:
        if not Path(f).is_file():
            raise KdkitError(f"hf_dataset_lm: data file {f} not found (only local files are read)")
    try:
        import datasets
    except ImportError:
        raise KdkitError("dataset hf_dataset_lm needs the optional extra 'hf': pip install 'kdkit[hf]'") from None
    if format not in ("json", "csv", "text", "parquet"):
        raise KdkitError(f"hf_dataset_lm: format must be json, csv, text or parquet; got {format!r}")
    ds = datasets.load_dataset(format, data_files=files, split="train")
    cols = set(ds.column_names)
    if (prompt_field is None) != (response_field is None):
        raise KdkitError("hf_dataset_lm: give both prompt_field and response_field (pairs), or neither (documents)")
    if prompt_field is not None:
        for f in (prompt_field, response_field):
            if f not in cols:
                raise KdkitError(f"hf_dataset_lm: no column {f!r}; columns: {', '.join(sorted(cols))}")
        return splits_from_pairs(list(zip(ds[prompt_field], ds[response_field])), max_length=max_length,
                                 vocab_size=vocab_size, tokenizer=tokenizer, val_fraction=val_fraction,
                                 test_fraction=test_fraction, cache_dir=cache_dir, source=f"datasets: {files}")
    if text_field not in cols:
        raise KdkitError(f"hf_dataset_lm: no column {text_field!r}; columns: {', '.join(sorted(cols))}")
    return splits_from_documents([t for t in ds[text_field] if isinstance(t, str)], max_length=max_length,
                                 vocab_size=vocab_size, tokenizer=tokenizer, val_fraction=val_fraction,
                                 test_fraction=test_fraction, cache_dir=cache_dir, source=f"datasets: {files}")
