"""Smaller text students: vocabulary trimming, width pruning, int8 text exports, the self-contained ONNX artefact."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

import kdkit  # noqa: E402
from kdkit import KdkitError  # noqa: E402
from kdkit.hf import tiny_bert  # noqa: E402
from kdkit.hf.slim import prune_width, trim_vocabulary, used_ids  # noqa: E402
from kdkit.hf.text import encode  # noqa: E402

from .text_fixtures import texts_and_labels, word_tokenizer  # noqa: E402

QUIET = {"progress": False, "quiet": True}
CLASSES = ["animals", "money", "weather"]


@pytest.fixture(scope="module")
def corpus():
    texts, labels = texts_and_labels()
    extra = ["zebra", "yacht", "volcano"]  # in the vocabulary, in no training text
    return texts, labels, word_tokenizer(texts, extra=extra)


def _model(tok, hidden=32, heads=4, seed=0):
    torch.manual_seed(seed)
    m = tiny_bert(len(tok), 3, layers=2, hidden=hidden, heads=heads, intermediate=2 * hidden, dropout=0.0)
    m.tokenizer = tok
    return m.eval()


# ----------------------------------------------------------------------------- vocabulary trimming

def test_trimmed_vocabulary_gives_identical_logits_on_its_corpus(corpus):
    texts, _, tok = corpus
    model = _model(tok)
    ids = encode(texts, tok, 12)
    small = trim_vocabulary(model, ids)
    kept = small.hf.get_input_embeddings().weight.shape[0]
    # By hand: the corpus' distinct words plus the four special tokens; the three extra words are dropped.
    words = {w for t in texts for w in t.lower().split()}
    assert kept == len(words) + 4 == len(tok) - 3
    assert torch.equal(used_ids(ids, 0), used_ids(ids, 0).unique())
    with torch.no_grad():
        assert torch.equal(model(ids), small(ids))
    assert small.vocab_size == model.vocab_size  # it still takes the tokenizer's ids
    assert model.id_map is None  # the model passed in is untouched


def test_a_token_outside_the_trimmed_vocabulary_reads_as_unknown(corpus):
    texts, _, tok = corpus
    model = _model(tok)
    small = trim_vocabulary(model, encode(texts, tok, 12))
    odd = encode(["the zebra sat on the yacht"], tok, 12)
    unk = tok.unk_token_id
    as_unknown = torch.where(torch.isin(odd, torch.tensor(tok.convert_tokens_to_ids(["zebra", "yacht"]))),
                             torch.full_like(odd, unk), odd)
    with torch.no_grad():  # never dropped: the text keeps its length, the words read as [UNK]
        assert torch.equal(small(odd), model(as_unknown))
        assert not torch.equal(small(odd), model(odd))
    with pytest.raises(KdkitError, match="trimmed already"):
        trim_vocabulary(small, odd)
    with pytest.raises(KdkitError, match="embedding rows"):
        trim_vocabulary(model, torch.tensor([[2, len(tok) + 5, 3]]))


def test_a_trimmed_model_saves_and_loads_its_lookup(corpus, tmp_path):
    from kdkit.training.checkpoint import load_weights, save_weights

    texts, _, tok = corpus
    ids = encode(texts, tok, 12)
    small = trim_vocabulary(_model(tok), ids)
    save_weights(small, tmp_path / "w.safetensors")
    again = trim_vocabulary(_model(tok, seed=5), ids)
    load_weights(again, tmp_path / "w.safetensors")
    with torch.no_grad():
        assert torch.equal(again(ids), small(ids))


# ----------------------------------------------------------------------------- width pruning

def test_width_pruning_that_keeps_everything_is_the_same_model(corpus):
    texts, _, tok = corpus
    model = _model(tok)
    ids = encode(texts, tok, 12)
    same = prune_width(model, ids, hidden=32)
    with torch.no_grad():
        assert torch.allclose(model(ids), same(ids), atol=1e-6)


def test_width_pruning_drops_the_units_and_heads_that_never_fire(corpus):
    texts, _, tok = corpus
    model = _model(tok)
    ids = encode(texts, tok, 12)
    with torch.no_grad():
        for layer in model.hf.bert.encoder.layer:
            layer.intermediate.dense.weight[:16] = 0  # 16 of 64 units: GELU(0 + bias 0) = 0, they contribute nothing
            layer.intermediate.dense.bias[:16] = 0
            layer.attention.self.value.weight[8:16] = 0  # head 1 of 4 (size 8): zero values, zero context
            layer.attention.self.value.bias[8:16] = 0
    # Keep every hidden dimension and 48 units: exactly the dead units go, so nothing changes.
    pruned = prune_width(model, ids, hidden=32, intermediate=48)
    with torch.no_grad():
        assert torch.allclose(model(ids), pruned(ids), atol=1e-5)
    assert pruned.hf.bert.encoder.layer[0].intermediate.dense.weight.shape == (48, 32)
    with pytest.raises(KdkitError, match="3 heads of size 8 make 24"):
        prune_width(model, ids, hidden=32, heads=3)
    # Three heads of a 24-wide model: the dead head 1 is the one left out (every kept value row is non-zero).
    narrow = prune_width(model, ids, hidden=24)
    assert narrow.hf.config.hidden_size == 24 and narrow.hf.config.num_attention_heads == 3
    for layer in narrow.hf.bert.encoder.layer:
        value = layer.attention.self.value.weight
        assert value.shape == (24, 24) and bool((value.abs().sum(1) > 0).all())
    with torch.no_grad():
        assert narrow(ids).shape == (len(texts), 3)
    with pytest.raises(KdkitError, match="between 1 and the model's 32"):
        prune_width(model, ids, hidden=64)


# ----------------------------------------------------------------------------- config path, export artefact

def _run(tmp_path, corpus, student, name="kd"):
    texts, labels, tok = corpus
    folder = tmp_path / "bert"
    if not folder.exists():
        teacher = _model(tok, hidden=32)
        teacher.hf.config.num_labels = 3
        teacher.hf.save_pretrained(folder)
        tok.save_pretrained(folder)
    data_file = tmp_path / "data.jsonl"
    with open(data_file, "w") as fh:
        for t, label in zip(texts * 2, labels * 2):
            fh.write(json.dumps({"text": t, "label": CLASSES[label]}) + "\n")
    data = {"name": "text_jsonl", "path": str(data_file), "tokenizer": str(folder), "max_length": 12,
            "cache_dir": str(tmp_path / "cache"), "batch_size": 8}
    train = {"epochs": 2, "lr": 0.003, **QUIET}
    if not (tmp_path / "teacher").exists():
        kdkit.run_config(kdkit.load_config({"out_dir": str(tmp_path / "teacher"), "data": data, "train": train,
                                            "model": {"name": "hf", "path": str(folder)}}), "train")
    cfg = {"out_dir": str(tmp_path / name), "data": data, "train": train,
           "teacher": {"checkpoint": str(tmp_path / "teacher")},
           "student": {"name": "hf", "path": str(folder), "init": str(tmp_path / "teacher"), **student},
           "method": {"name": "kd"}}
    return kdkit.run_config(kdkit.load_config(cfg), "distill")


def _card_snippet(card: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", card, re.S)
    raw = [b for b in blocks if "tokenizers" in b]
    assert len(raw) == 1, card
    return raw[0]


def test_text_export_is_self_contained_and_agrees_with_pytorch(corpus, tmp_path):
    pytest.importorskip("onnxruntime")
    from kdkit.export import export_run
    from kdkit.export.core import run_onnx

    texts, labels, tok = corpus
    run = _run(tmp_path, corpus, {"layers": [0], "hidden": 16, "narrow": "prune", "trim_vocab": True})
    student = run.student.eval()
    from kdkit.api import build_data

    train_ids = build_data(run.config.data, run.config.seed).train.x
    words = set(used_ids(train_ids, 0).tolist()) | {0, 1, 2, 3}  # the training texts' tokens and the specials
    assert student.hf.get_input_embeddings().weight.shape == (len(words), 16) and len(words) < len(tok) - 3
    result = export_run(run.dir, "onnx")
    folder = Path(result["file"]).parent
    assert sorted(Path(f).name for f in result["files"]) == ["labels.json", "tokenizer.json"]
    meta = json.loads((folder / "labels.json").read_text())
    assert meta["labels"] == CLASSES and meta["max_length"] == 12 and meta["pad_token_id"] == 0
    acc = result["test_accuracy"]
    assert acc["prediction_agreement"] == 1.0 and acc["accuracy_drop_points"] == 0.0
    # The card's snippet, run in a fresh interpreter from the export folder, with onnxruntime and tokenizers only.
    snippet = _card_snippet((folder / "MODEL_CARD.md").read_text())
    assert "kdkit" not in snippet and "transformers" not in snippet
    probe = texts + ["a zebra in the rain", "THE CAT"]
    code = snippet + "\nimport json as _j\nprint(_j.dumps(classify(" + json.dumps(probe) + ")))\n"
    out = subprocess.run([sys.executable, "-c", code], cwd=folder, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    predicted = json.loads(out.stdout.strip().splitlines()[-1])
    with torch.no_grad():
        ours = student(encode(probe, tok, 12)).argmax(1).tolist()
    assert predicted == [CLASSES[i] for i in ours]
    assert run_onnx(result["file"], encode(probe, tok, 12).numpy()).argmax(1).tolist() == ours
    assert result["latency_lengths"]["median"] <= result["latency_lengths"]["p95"] <= 12
    assert set(result["latency"]["median"]) == {"pytorch_ms_b1", "ort_ms_b1", "pytorch_ms_b32", "ort_ms_b32"}


def test_int8_text_export_is_held_to_its_test_accuracy(corpus, tmp_path):
    pytest.importorskip("onnxruntime")
    from kdkit.export import export_run

    run = _run(tmp_path, corpus, {"layers": [0, 1]})
    result = export_run(run.dir, "onnx", int8=True)
    acc = result["test_accuracy"]
    assert acc["int8_within_bound"] and acc["accuracy_drop_points"] <= 1.0
    assert Path(result["file"]).name == "model-int8.onnx" and result["int8"]
    card = (Path(result["file"]).parent / "MODEL_CARD.md").read_text()
    assert "model-int8.onnx" in card and "within the bound" in card
    # An impossible bound: refused, and the file is not left behind.
    out = Path(run.dir) / "strict" / "m.onnx"
    with pytest.raises(KdkitError, match="beyond the bound -1.*--keep-int8"):
        export_run(run.dir, "onnx", int8=True, out=out, int8_max_drop=-1.0)
    assert not out.exists()
    kept = export_run(run.dir, "onnx", int8=True, out=out, int8_max_drop=-1.0, keep_int8=True)
    assert out.exists() and not kept["test_accuracy"]["int8_within_bound"]
    card = (out.parent / "MODEL_CARD.md").read_text()
    assert "kept on request although" in card


def test_an_existing_tokenizer_file_of_another_content_stops_the_export(corpus, tmp_path):
    pytest.importorskip("onnxruntime")
    from kdkit.export import export_run

    run = _run(tmp_path, corpus, {"layers": [0]})
    out = Path(run.dir) / "elsewhere" / "model.onnx"
    out.parent.mkdir()
    (out.parent / "tokenizer.json").write_text("{}")
    with pytest.raises(KdkitError, match="tokenizer.json already exists with other content"):
        export_run(run.dir, "onnx", out=out)
    assert not out.exists() and (out.parent / "tokenizer.json").read_text() == "{}"
