"""Bits per byte in the language-model evaluation: the UTF-8 bytes of the target text (non-ASCII included) and
the summed NLL in bits over them, against an independent count."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("tokenizers")
pytest.importorskip("transformers")

from kdkit.lm import tiny_gpt2  # noqa: E402
from kdkit.lm.data import TokenData  # noqa: E402
from kdkit.lm.evaluate import lm_quality, target_bytes  # noqa: E402
from kdkit.lm.tokenizer import train_tokenizer  # noqa: E402

DOCS = ["Crème brûlée for the café.", "Tokyo is 東京 in Japanese.", "naïve code, fixed bugs", "plain ascii text here",
        "über größe straße"] * 4


def _data(tmp_path):
    tok = train_tokenizer(DOCS, vocab_size=300, cache_dir=tmp_path)
    pad, eos = tok.token_to_id("<pad>"), tok.token_to_id("<|endoftext|>")
    rows = [tok.encode(d).ids + [eos] for d in DOCS]
    width = max(map(len, rows))
    x = torch.full((len(rows), width), pad)
    y = torch.full((len(rows), width), -100)
    for i, r in enumerate(rows):
        x[i, :len(r)] = torch.tensor(r)
        y[i, :len(r) - 1] = torch.tensor(r[1:])
    return TokenData(x, y, pad, eos, tok.kdkit_path), tok


def test_target_bytes_are_the_utf8_bytes_of_the_text(tmp_path):
    """Rows whose targets are every token of a document (after an end-of-text token) hold its exact UTF-8 bytes,
    although byte-level BPE splits some characters (è, 東) across tokens."""
    _, tok = _data(tmp_path)
    pad, eos = tok.token_to_id("<pad>"), tok.token_to_id("<|endoftext|>")
    rows = [tok.encode(d).ids for d in DOCS]
    width = max(map(len, rows)) + 1
    x = torch.full((len(rows), width), pad)
    y = torch.full((len(rows), width), -100)
    for i, r in enumerate(rows):
        x[i, :len(r) + 1] = torch.tensor([eos] + r)
        y[i, :len(r) + 1] = torch.tensor(r + [eos])  # the end-of-text target counts 0 bytes
    data = TokenData(x, y, pad, eos, tok.kdkit_path)
    assert target_bytes(data) == sum(len(d.encode("utf-8")) for d in DOCS)
    assert sum(len(d.encode("utf-8")) for d in DOCS) > sum(len(d) for d in DOCS)  # non-ASCII: several bytes


def test_bits_per_byte_is_the_summed_nll_in_bits_over_the_bytes(tmp_path):
    data, _ = _data(tmp_path)
    torch.manual_seed(0)
    model = tiny_gpt2(300, layers=1, hidden=16, max_positions=data.x.shape[1])
    m, _ = lm_quality(model, data)
    assert m["bits_per_byte"] == pytest.approx(m["nll"] * m["tokens"] / math.log(2) / target_bytes(data), rel=1e-9)
    assert m["text_bytes"] == target_bytes(data)
    no_tok = TokenData(data.x, data.y, data.pad_token_id, data.eos_token_id, None)
    assert "bits_per_byte" not in lm_quality(model, no_tok)[0]
