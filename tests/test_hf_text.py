"""Transformers on text: tokenisation, bucketing, shrink, load, end-to-end distillation, cache, mismatches, export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

import kdkit  # noqa: E402
from kdkit import KdkitError  # noqa: E402
from kdkit.data.core import TensorLoader, bucketed_order, epoch_permutation  # noqa: E402
from kdkit.data.text import fortune_topics, read_fortune_file  # noqa: E402
from kdkit.evaluation.metrics import macro_f1, predict  # noqa: E402
from kdkit.hf import tiny_bert  # noqa: E402
from kdkit.hf.models import load, shrink  # noqa: E402
from kdkit.hf.text import encode, tokenize  # noqa: E402
from kdkit.teacher import Teacher  # noqa: E402

from .text_fixtures import texts_and_labels, word_tokenizer  # noqa: E402

QUIET = {"progress": False, "quiet": True}


@pytest.fixture(scope="module")
def corpus():
    texts, labels = texts_and_labels()
    return texts, labels, word_tokenizer(texts)


def _split(data):
    n = len(data)
    return data.subset(torch.arange(0, n, 3) % n), data.subset(torch.arange(1, n, 3))


# ----------------------------------------------------------------------------- tokenisation

def test_encode_right_pads_with_the_pad_id(corpus):
    _, _, tok = corpus
    vocab = tok.get_vocab()
    ids = encode(["The cat sat", "a dog ran in the big park today now"], tok, max_length=6)
    # By hand: [CLS]=2, words by vocabulary lookup (lower-cased), [SEP]=3, then [PAD]=0; the long text truncated.
    assert ids[0].tolist() == [2, vocab["the"], vocab["cat"], vocab["sat"], 3, 0]
    assert ids[1].tolist() == [2, vocab["a"], vocab["dog"], vocab["ran"], vocab["in"], 3]


def test_pad_token_inside_a_text_is_refused(corpus):
    _, _, tok = corpus
    with pytest.raises(KdkitError, match=r"text 1 .*pad token \(id 0\)"):
        encode(["fine text", "a [PAD] inside"], tok, max_length=8)
    with pytest.raises(KdkitError, match="not a string"):
        encode(["ok", 3], tok, max_length=8)


def test_tokenised_ids_are_cached_and_reused(corpus, tmp_path, monkeypatch):
    texts, labels, tok = corpus
    logs = []
    first = tokenize(texts, labels, tok, 10, cache_dir=tmp_path, log=logs.append)
    assert logs == [] and len(list(tmp_path.glob("tokens-*.safetensors"))) == 1

    def no_tokenising(*args, **kwargs):
        raise AssertionError("tokenised again")

    monkeypatch.setattr("kdkit.hf.text.encode", no_tokenising)
    second = tokenize(texts, labels, tok, 10, cache_dir=tmp_path, log=logs.append)
    assert torch.equal(first.x, second.x) and logs and "reusing" in logs[0]
    with pytest.raises(AssertionError):  # other texts: a new key, tokenised again
        tokenize(texts[:-1], labels[:-1], tok, 10, cache_dir=tmp_path, log=logs.append)


def test_teacher_tokenizer_rides_along_and_the_same_one_is_used_once(corpus):
    texts, labels, tok = corpus
    same = tokenize(texts, labels, tok, 10, teacher_tokenizer=word_tokenizer(texts), cache_dir=False)
    assert same.teacher_x is None  # an identical tokenizer built separately is detected
    other = word_tokenizer(texts, extra=["zzz"] * 1, lowercase=False)
    data = tokenize(texts, labels, tok, 10, teacher_tokenizer=other, cache_dir=False)
    assert torch.equal(data.teacher_x, encode(texts, other, 10)) and torch.equal(data.x, encode(texts, tok, 10))
    batch = next(iter(TensorLoader(data, 4)))
    assert torch.equal(batch["teacher_x"], data.teacher_x[:4])
    teacher_model = tiny_bert(len(other), 3).eval()
    with torch.no_grad():
        ref = teacher_model(data.teacher_x[:4])
    torch.testing.assert_close(Teacher(teacher_model)(batch), ref)  # the teacher reads its own ids


# ----------------------------------------------------------------------------- bucketing

def test_bucketed_order_is_deterministic_and_groups_lengths():
    lengths = torch.randint(1, 60, (103,), generator=torch.Generator().manual_seed(1))
    order = epoch_permutation(103, seed=3, epoch=0)
    a = bucketed_order(order, lengths, 8, seed=3, epoch=0, pool_batches=4)
    assert torch.equal(a, bucketed_order(order, lengths, 8, seed=3, epoch=0, pool_batches=4))
    assert sorted(a.tolist()) == list(range(103))  # every sample once
    assert not torch.equal(a, bucketed_order(order, lengths, 8, seed=3, epoch=1, pool_batches=4))
    batches = a[:96].view(12, 8)
    spread = (lengths[batches].max(1).values - lengths[batches].min(1).values).float().mean()
    random_spread = (lengths[order[:96].view(12, 8)].max(1).values - lengths[order[:96].view(12, 8)].min(1).values)
    assert spread < 0.5 * random_spread.float().mean()
    assert set(a[96:].tolist()) == set(a.tolist()) - set(a[:96].tolist())  # the smaller batch goes last


def test_training_loader_buckets_text_by_length(corpus):
    texts, labels, tok = corpus
    data = tokenize(texts, labels, tok, 16, cache_dir=False)
    loader = TensorLoader(data, 5, shuffle=True, seed=0)
    loader.set_epoch(2)
    first = [b["index"].tolist() for b in loader]
    loader.set_epoch(2)
    assert [b["index"].tolist() for b in loader] == first  # a pure function of (seed, epoch)
    lengths = (data.x != 0).sum(1)
    expected = bucketed_order(epoch_permutation(30, 0, 2), lengths, 5, 0, 2)
    assert sum(first, []) == expected.tolist()


# ----------------------------------------------------------------------------- models

def test_shrink_copies_the_kept_layers_exactly():
    teacher = tiny_bert(50, 3, layers=4)
    student = shrink(teacher, layers=[0, 2])
    t, s = teacher.hf.state_dict(), student.hf.state_dict()
    assert student.hf.config.num_hidden_layers == 2 and student.pad_token_id == teacher.pad_token_id
    assert student.hf.config._attn_implementation == "eager"  # the teacher's attention implementation is kept
    for key, value in s.items():
        src = key.replace("encoder.layer.1.", "encoder.layer.2.")  # student layer 1 is teacher layer 2
        assert torch.equal(value, t[src]), key
    assert torch.equal(s["bert.encoder.layer.0.attention.self.query.weight"],
                       t["bert.encoder.layer.0.attention.self.query.weight"])
    assert torch.equal(s["classifier.weight"], t["classifier.weight"])
    narrow = shrink(teacher, hidden=16)
    assert narrow.hf.config.hidden_size == 16 and narrow.hf.config.num_hidden_layers == 4
    with pytest.raises(KdkitError, match="increasing"):
        shrink(teacher, layers=[2, 0])
    with pytest.raises(KdkitError, match="0..3"):
        shrink(teacher, layers=[0, 4])


def test_text_students_ignore_padding():
    for name in ("boe", "bilstm"):
        model = kdkit.create_model(name, num_classes=3, vocab_size=20, pad_token_id=0).eval()
        x = torch.tensor([[5, 6, 7, 0, 0, 0], [8, 0, 0, 0, 0, 0]])
        with torch.no_grad():
            torch.testing.assert_close(model(x), model(x[:, :3]))  # extra padding changes nothing
            torch.testing.assert_close(model(x[1:]), model(x[1:, :1]))
    with pytest.raises(KdkitError, match="vocab_size and pad_token_id"):
        kdkit.create_model("boe", num_classes=3)


def test_load_local_directory_and_bare_encoder(corpus, tmp_path):
    _, _, tok = corpus
    clf = tiny_bert(len(tok), 3).eval()
    clf.hf.save_pretrained(tmp_path / "clf")
    tok.save_pretrained(tmp_path / "clf")
    loaded = load(tmp_path / "clf").eval()
    x = encode(["the cat sat", "rain"], tok, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), clf(x))
    assert loaded.tokenizer is not None and loaded.num_labels == 3
    with pytest.raises(KdkitError, match="3 labels but 5"):
        load(tmp_path / "clf", num_labels=5)
    clf.hf.bert.save_pretrained(tmp_path / "enc")  # a bare encoder (BertModel)
    tok.save_pretrained(tmp_path / "enc")
    notes = []
    fresh = load(tmp_path / "enc", num_labels=4, log=notes.append)
    assert fresh.num_labels == 4 and "fresh 4-way classification head" in notes[0]
    assert torch.equal(fresh.hf.bert.embeddings.word_embeddings.weight, clf.hf.bert.embeddings.word_embeddings.weight)
    with pytest.raises(KdkitError, match="give num_labels"):
        load(tmp_path / "enc")
    with pytest.raises(KdkitError, match="does not exist"):
        load(tmp_path / "nowhere")


# ----------------------------------------------------------------------------- end to end

def test_distill_text_through_the_api(corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("KDKIT_CACHE_DIR", str(tmp_path))  # raw texts are tokenised into the default cache
    texts, labels, tok = corpus
    train, val = _split(tokenize(texts, labels, tok, 12, cache_dir=False))
    teacher = tiny_bert(len(tok), 3, layers=4)
    kdkit.train(teacher, train, val, epochs=2, batch_size=8, lr=3e-3, **QUIET)
    student = shrink(teacher, layers=[0, 3])
    run = kdkit.distill(teacher, student, train, val, epochs=2, batch_size=8, lr=3e-3, **QUIET)
    m = run.metrics["student"]
    out = predict(run.student, val)
    pred, y = out["outputs"].argmax(1), out["y"]
    from sklearn.metrics import f1_score

    assert m["macro_f1"] == pytest.approx(f1_score(y.numpy(), pred.numpy(), average="macro"))
    assert m["accuracy"] == pytest.approx(float((pred == y).float().mean()))
    # Timed at the validation texts' median real length (and their 95th percentile), by hand from the ids.
    lengths = (val.x != tok.pad_token_id).sum(1).float()
    assert m["latency_seq_len"] == int(lengths.median()) < 12
    assert m["latency_p95len_seq_len"] == int(torch.quantile(lengths, 0.95).ceil())
    assert m["latency_ms_per_seq_b32"] == pytest.approx(m["latency_ms_b32"] / 32) and m["latency_threads"] == 1
    # Raw texts: tokenised with the student's tokenizer (shrink keeps the teacher's).
    teacher.tokenizer = tok
    raw = kdkit.distill(teacher, shrink(teacher, layers=[1]), (texts[::2], labels[::2]), (texts[1::2], labels[1::2]),
                        epochs=1, batch_size=8, **QUIET)
    assert raw.metrics["student"]["accuracy"] >= 0 and raw.metrics["teacher"]["parameters"] > 0
    assert len(list((tmp_path / "text").glob("tokens-*.safetensors"))) == 2  # train and val texts, cached


def test_mismatched_vocabulary_pad_or_labels_are_errors(corpus):
    texts, labels, tok = corpus
    train, val = _split(tokenize(texts, labels, tok, 10, cache_dir=False))
    teacher = tiny_bert(len(tok), 3)
    with pytest.raises(KdkitError, match="beyond the model's vocabulary"):
        kdkit.distill(teacher, tiny_bert(10, 3), train, val, epochs=1, **QUIET)
    with pytest.raises(KdkitError, match="pad id is 1 but the data was padded with 0"):
        kdkit.distill(teacher, tiny_bert(len(tok), 3, pad_token_id=1), train, val, epochs=1, **QUIET)
    with pytest.raises(KdkitError, match="teacher outputs shape|4 labels"):
        kdkit.distill(tiny_bert(len(tok), 4), tiny_bert(len(tok), 3), train, val, epochs=1, **QUIET)


def test_text_configs_train_then_distill(corpus, tmp_path):
    texts, labels, tok = corpus
    tok.save_pretrained(tmp_path / "tok")
    with open(tmp_path / "data.jsonl", "w") as fh:
        for t, label in zip(texts, labels):
            fh.write(json.dumps({"text": t, "label": ["animals", "money", "weather"][label]}) + "\n")
    data = {"name": "text_jsonl", "path": str(tmp_path / "data.jsonl"), "tokenizer": str(tmp_path / "tok"),
            "max_length": 12, "cache_dir": str(tmp_path / "cache"), "batch_size": 8}
    train = {"epochs": 2, "lr": 0.003, **QUIET}
    teacher_cfg = {"out_dir": str(tmp_path / "teacher"), "data": data, "train": train,
                   "model": {"name": "tiny_bert", "layers": 2, "hidden": 32}}
    t_run = kdkit.run_config(kdkit.load_config(teacher_cfg), "train")
    kd_cfg = {"out_dir": str(tmp_path / "kd"), "data": data, "train": train,
              "teacher": {"checkpoint": str(tmp_path / "teacher")}, "student": {"name": "bilstm", "hidden": 16},
              "method": {"name": "kd", "temperature": 2.0}}
    run = kdkit.run_config(kdkit.load_config(kd_cfg), "distill")
    report = json.loads((tmp_path / "kd" / "report.json").read_text())
    assert report["models"]["student"]["macro_f1"] == pytest.approx(run.metrics["student"]["macro_f1"])
    assert report["models"]["teacher"]["accuracy"] == pytest.approx(t_run.metrics["student"]["accuracy"])
    assert run.config.data.options()["tokenizer"] == str(tmp_path / "tok")
    assert len(list((tmp_path / "cache").glob("tokens-*.safetensors"))) == 1  # tokenised once for both runs
    kd_cfg["student"] = {"name": "tiny_bert", "layers": 1, "hidden": 16, "heads": 2}
    kd_cfg["out_dir"] = str(tmp_path / "kd2")
    kd_cfg["data"] = dict(data, name="text_jsonl")
    run2 = kdkit.run_config(kdkit.load_config(kd_cfg), "distill")
    from kdkit.export import export_run

    result = export_run(run2.dir, "onnx")
    assert result["parity"]["max_abs_diff"] <= result["parity"]["tolerance"]
    assert result["latency_seq_len"] < 12 and "ort_latency_ms_b32" in result["onnxruntime"]
    card = Path(result["model_card"]).read_text()  # token ids go in as int64, not float32
    assert "of shape (batch, sequence), int64" in card and "x.astype(np.int64)" in card and "float32" not in card


def test_onnx_export_has_dynamic_batch_and_sequence(corpus, tmp_path):
    pytest.importorskip("onnxruntime")
    from kdkit.export.core import export_model, run_onnx

    texts, _, tok = corpus
    model = tiny_bert(len(tok), 3).eval()
    x = encode(texts, tok, 12)
    result = export_model(model, x, tmp_path / "m.onnx", timing=False)
    assert result["parity"]["max_abs_diff"] <= result["parity"]["tolerance"]
    short = encode(texts[:5], tok, 7)  # another batch size and sequence length
    with torch.no_grad():
        ref = model(short).numpy()
    assert abs(run_onnx(tmp_path / "m.onnx", short.numpy()) - ref).max() < 1e-4


# ----------------------------------------------------------------------------- metrics and data files

def test_macro_f1_by_hand():
    pred = torch.tensor([0, 0, 1, 1, 2, 0])
    y = torch.tensor([0, 1, 1, 1, 2, 2])
    # class 0: TP1 FP2 FN0 -> 2/4; class 1: TP2 FP0 FN1 -> 4/5; class 2: TP1 FP0 FN1 -> 2/3
    assert macro_f1(pred, y, 3) == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3)
    assert macro_f1(pred, y, 5) == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3)  # absent classes are not averaged


def test_fortune_files_and_missing_fortunes(tmp_path):
    (tmp_path / "jokes").write_text("one liner\n%\ntwo\nlines\n%\n%\nlast one\n")
    (tmp_path / "jokes.dat").write_bytes(b"\0\1")
    (tmp_path / "tiny").write_text("only\n")
    assert read_fortune_file(tmp_path / "jokes") == ["one liner", "two\nlines", "last one"]
    assert fortune_topics(tmp_path) == [("jokes", 3), ("tiny", 1)]
    with pytest.raises(KdkitError, match="apt-get install fortunes fortunes-min"):
        fortune_topics(tmp_path / "missing")
