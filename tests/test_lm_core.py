"""Causal-LM foundation: token rows and masks, tokenizer cache, HFCausalLM, streamed validation, runs."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import kdkit  # noqa: E402
from kdkit.data.core import ArrayData, check_targets  # noqa: E402
from kdkit.errors import KdkitError  # noqa: E402
from kdkit.lm import data as lmdata  # noqa: E402
from kdkit.lm import tokenizer as tokmod  # noqa: E402
from kdkit.lm.evaluate import lm_quality  # noqa: E402
from kdkit.training.loop import Keeper  # noqa: E402

WORDS = ("the cat dog runs sleeps on a mat under tree quickly slowly red blue big small computer program bug "
         "fixes crashes every morning night user writes code").split()


def corpus(n_docs: int = 60, seed: int = 0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))).capitalize() + "."
            for _ in range(n_docs)]


@pytest.fixture()
def fortune_file(tmp_path):
    path = tmp_path / "quotes"
    path.write_text("\n%\n".join(corpus()) + "\n%\n")
    return path


def test_document_rows_targets_are_the_next_token_and_mask_the_rest():
    x, y = lmdata.document_rows([[5, 6, 7], [8, 9, 10, 11, 12, 13]], max_length=4, pad_id=0, eos_id=1)
    # doc 1: 5 6 7 <eos>; doc 2: 8 9 10 11 | 12 13 <eos> (continued in a second row)
    assert x.tolist() == [[5, 6, 7, 1], [8, 9, 10, 11], [12, 13, 1, 0]]
    assert y.tolist() == [[6, 7, 1, -100], [9, 10, 11, -100], [13, 1, -100, -100]]


def test_pair_rows_mask_the_prompt():
    x, y, dropped = lmdata.pair_rows([[5, 6], [7, 8, 9, 10, 11]], [[20, 21], [22]], max_length=5, pad_id=0, eos_id=1)
    assert dropped == 1  # the second prompt fills the whole row: no response token left
    assert x.tolist() == [[5, 6, 20, 21, 1]]
    # position 0 predicts 6 (a prompt token): masked; position 1 predicts the first response token
    assert y.tolist() == [[-100, 20, 21, 1, -100]]


def test_tokenizer_is_trained_once_and_reused(tmp_path):
    docs = corpus()
    tok = tokmod.train_tokenizer(docs, 300, cache_dir=tmp_path)
    assert (tok.token_to_id("<pad>"), tok.token_to_id("<|endoftext|>")) == (0, 1)
    assert tok.get_vocab_size() <= 300
    messages = []
    again = tokmod.train_tokenizer(docs, 300, cache_dir=tmp_path, log=messages.append)
    assert again.kdkit_path == tok.kdkit_path and "reusing" in messages[0]
    other = tokmod.train_tokenizer(docs[:-1], 300, cache_dir=tmp_path)
    assert other.kdkit_path != tok.kdkit_path  # another corpus: another fingerprint
    text = docs[0]
    assert tok.decode(tok.encode(text).ids) == text  # byte-level: lossless


def test_text_with_the_pad_token_is_refused(tmp_path):
    tok = tokmod.train_tokenizer(corpus(), 300, cache_dir=tmp_path)
    with pytest.raises(KdkitError, match="pad token"):
        tokmod.encode(tok, ["fine", "a <pad> inside"], 0)


def test_fortune_style_corpus_splits_by_document(fortune_file, tmp_path):
    splits = kdkit.DATASETS.get("text_lm")(path=str(fortune_file), vocab_size=300, max_length=64,
                                           val_fraction=0.1, test_fraction=0.1, cache_dir=str(tmp_path / "tok"))
    assert splits.info["documents"] == {"train": 48, "val": 6, "test": 6}
    tr, va = splits.train, splits.val
    assert len(tr) == 48 and tr.x.shape[1] == 64 and tr.y.shape == tr.x.shape  # one document per row here
    assert splits.num_classes == 300 and splits.input_shape == (64,)
    # every target is the next input token, or -100
    real = tr.y != -100
    assert torch.equal(tr.y[:, :-1][real[:, :-1]], tr.x[:, 1:][real[:, :-1]])
    assert bool((tr.y[tr.x == 0] == -100).all())  # padding never predicts
    # no document of the validation split appears in training rows
    tok = tokmod.load_tokenizer(splits.info["tokenizer"])
    train_text = {tok.decode([i for i in row.tolist() if i > 1]) for row in tr.x}
    val_text = {tok.decode([i for i in row.tolist() if i > 1]) for row in va.x}
    assert not train_text & val_text and len(val_text) == 6


def test_fortunes_lm_missing_root_names_the_package(tmp_path):
    with pytest.raises(KdkitError, match="apt-get install fortunes"):
        kdkit.DATASETS.get("fortunes_lm")(root=str(tmp_path / "nowhere"))


def test_check_targets_accepts_ignore_index_only_for_token_rows():
    x = torch.tensor([[3, 4, 0]])
    check_targets(ArrayData(x, torch.tensor([[4, -100, -100]])), "train", 10)
    with pytest.raises(KdkitError, match="token target -5"):
        check_targets(ArrayData(x, torch.tensor([[4, -5, -100]])), "train", 10)
    with pytest.raises(KdkitError, match="token target 12"):
        check_targets(ArrayData(x, torch.tensor([[12, -100, -100]])), "train", 10)
    with pytest.raises(KdkitError, match="label"):  # class labels keep their rule
        check_targets(ArrayData(torch.zeros(2, 3), torch.tensor([1, -100])), "train", 10)


def test_hfcausallm_masks_padding_and_trims_columns():
    torch.manual_seed(0)
    model = kdkit.lm.tiny_gpt2(50, max_positions=16).eval()
    a = torch.tensor([[5, 6, 7, 8, 9, 0, 0, 0]])
    b = torch.tensor([[5, 6, 7, 0, 0, 0, 0, 0]])
    with torch.no_grad():
        out = model(torch.cat([a, b]))
        alone = model(torch.tensor([[5, 6, 7]]))
    assert out.shape == (2, 5, 50)  # trimmed to the longest row
    # the padded row's real positions equal the same tokens run without padding
    torch.testing.assert_close(out[1, :3], alone[0], atol=1e-5, rtol=1e-5)
    assert model.pad_token_id == 0 and model.vocab_size == 50
    assert "hf.transformer.h.1" in dict(model.named_modules())


def test_load_reads_a_local_directory_and_refuses_a_missing_one(tmp_path):
    torch.manual_seed(0)
    model = kdkit.lm.tiny_gpt2(60, max_positions=16)
    model.hf.save_pretrained(tmp_path / "m")
    back = kdkit.lm.load(tmp_path / "m")
    x = torch.tensor([[4, 5, 6, 0]])
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(x), model.eval()(x))
    assert back.pad_token_id == 0  # from the config's pad_token_id
    with pytest.raises(KdkitError, match="not found"):
        kdkit.lm.load(tmp_path / "missing")


def test_streamed_validation_equals_a_direct_computation():
    torch.manual_seed(0)
    student, teacher = kdkit.lm.tiny_gpt2(40, max_positions=12), kdkit.lm.tiny_gpt2(40, max_positions=12)
    x = torch.randint(2, 40, (7, 12))
    lengths = [12, 9, 5, 12, 3, 7, 10]
    for i, n in enumerate(lengths):
        x[i, n:] = 0
    y = torch.full_like(x, -100)
    for i, n in enumerate(lengths):
        y[i, :n - 1] = x[i, 1:n]
    y[2, :2] = -100  # a "prompt" masked out
    data = ArrayData(x, y)
    m, t_arg = lm_quality(student, data, batch_size=3, teacher=teacher)
    with torch.no_grad():  # direct: every row on its own, unpadded, no trimming subtleties
        nll, hits, agree, count = 0.0, 0, 0, 0
        for i, n in enumerate(lengths):
            s = student.eval()(x[i:i + 1, :n])[0]
            t = teacher.eval()(x[i:i + 1, :n])[0]
            keep = y[i, :n] != -100
            nll += float(F.cross_entropy(s[keep], y[i, :n][keep], reduction="sum"))
            hits += int((s[keep].argmax(-1) == y[i, :n][keep]).sum())
            agree += int((s[keep].argmax(-1) == t[keep].argmax(-1)).sum())
            count += int(keep.sum())
    assert m["tokens"] == count
    assert m["nll"] == pytest.approx(nll / count, rel=1e-5)
    assert m["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert m["token_accuracy"] == pytest.approx(hits / count)
    assert m["agreement"] == pytest.approx(agree / count)
    again, _ = lm_quality(student, data, batch_size=2, teacher_argmax=t_arg)  # the teacher's tokens, reused
    assert again["agreement"] == pytest.approx(m["agreement"]) and again["nll"] == pytest.approx(m["nll"])


def test_keeper_keeps_the_lowest_validation_perplexity():
    keeper = Keeper("best")
    for epoch, ppl in enumerate([30.0, 20.0, 25.0], start=1):
        keeper.consider(epoch, {"perplexity": ppl, "nll": math.log(ppl), "token_accuracy": 0.5})
    assert keeper.epoch == 2


def test_train_a_tiny_lm_through_the_api_reports_perplexity(fortune_file, tmp_path):
    splits = kdkit.DATASETS.get("text_lm")(path=str(fortune_file), vocab_size=300, max_length=16,
                                           val_fraction=0.1, test_fraction=0.1, cache_dir=str(tmp_path / "tok"))
    torch.manual_seed(0)
    model = kdkit.lm.tiny_gpt2(splits.num_classes, max_positions=16)
    run = kdkit.train(model, splits.train, splits.val, test_data=splits.test, epochs=2, lr=1e-2, batch_size=16,
                      out_dir=tmp_path / "run", threads=1, progress=False, quiet=True)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    m = report["models"]["student"]
    direct, _ = lm_quality(run.student, splits.test, 8)
    assert m["perplexity"] == pytest.approx(direct["perplexity"], rel=1e-6)
    assert m["perplexity"] < splits.num_classes  # learnt something: below the uniform guess
    assert report["kept_epoch"] in (1, 2)
    hist = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"val_perplexity", "train_token_accuracy"} <= set(hist[0])
    assert "perplexity" in (tmp_path / "run" / "report.html").read_text()


def test_onnx_export_matches_pytorch_on_real_ids(tmp_path):
    pytest.importorskip("onnxruntime")
    from kdkit.lm.export import export_lm

    torch.manual_seed(0)
    model = kdkit.lm.tiny_gpt2(80, max_positions=24).eval()
    ids = torch.randint(2, 80, (4, 20))
    ids[1, 9:] = 0
    ids[3, 14:] = 0
    result = export_lm(model, ids, tmp_path / "lm.onnx", timing=False)
    assert result["parity"]["max_abs_diff"] <= result["parity"]["tolerance"]
    assert [c["shape"] for c in result["parity"]["checks"]] == [[4, 20], [2, 10]]  # dynamic batch and length
    # independent check: onnxruntime on a third shape against the model's own trimmed output
    import onnxruntime as ort

    sess = ort.InferenceSession(str(tmp_path / "lm.onnx"), providers=["CPUExecutionProvider"])
    x = ids[1:2, :9]
    with torch.no_grad():
        ref = model(x).numpy()
    torch.testing.assert_close(torch.from_numpy(sess.run(None, {"input": x.numpy()})[0]), torch.from_numpy(ref),
                               atol=1e-4, rtol=1e-4)
    with pytest.raises(KdkitError, match="already exists"):
        export_lm(model, ids, tmp_path / "lm.onnx", timing=False)


def test_int8_onnx_export_is_held_to_its_perplexity(tmp_path):
    pytest.importorskip("onnxruntime")
    import torch.nn.functional as F

    from kdkit.lm.export import export_lm

    torch.manual_seed(0)
    model = kdkit.lm.tiny_gpt2(80, max_positions=24).eval()
    ids = torch.randint(2, 80, (6, 20))
    ids[1, 9:] = 0
    result = export_lm(model, ids, tmp_path / "lm-int8.onnx", timing=False, int8=True, int8_max_rise=50.0)
    q = result["test_perplexity"]
    # The float perplexity by an independent formula: cross-entropy over the real next-token positions.
    with torch.no_grad():
        logits = model(ids)[:, :-1]
    target = ids[:, 1:]
    real = (ids[:, :-1] != 0) & (target != 0)
    nll = F.cross_entropy(logits.reshape(-1, 80), target.reshape(-1), reduction="none").reshape(target.shape)
    assert q["perplexity_pytorch"] == pytest.approx(float(nll[real].mean().exp()), rel=1e-5)
    assert result["int8"] and q["int8_within_bound"] and abs(q["perplexity_rise_percent"]) < 50
    # The matrix products run in int8 (GPT-2's Gemm layers rewritten as MatMul first), the weights stored in int8.
    int8_graph, float_graph = _graph(tmp_path / "lm-int8.onnx"), _graph(_float_file(model, ids, tmp_path))
    ops = {n.op_type for n in int8_graph.node}
    assert "MatMulInteger" in ops and "Gemm" not in ops
    assert _weight_bytes(int8_graph) < 0.5 * _weight_bytes(float_graph)
    with pytest.raises(KdkitError, match="beyond the bound -1%"):
        export_lm(model, ids, tmp_path / "strict.onnx", timing=False, int8=True, int8_max_rise=-1.0)
    assert not (tmp_path / "strict.onnx").exists() and not list(tmp_path.glob(".*partial*"))


def _float_file(model, ids, tmp_path):
    from kdkit.lm.export import export_lm

    return export_lm(model, ids, tmp_path / "float.onnx", timing=False)["file"]


def _graph(path):
    import onnx

    return onnx.load(str(path)).graph


def _weight_bytes(graph) -> int:
    """Bytes of the weight matrices and tables (initializers of two or more dimensions)."""
    from onnx import numpy_helper

    return sum(numpy_helper.to_array(i).nbytes for i in graph.initializer if len(i.dims) >= 2)


def test_lm_export_writes_a_model_card_and_a_record_per_file(fortune_file, tmp_path):
    pytest.importorskip("onnxruntime")
    from kdkit.export import export_run

    cfg = {"out_dir": str(tmp_path / "lm"), "seed": 0,
           "data": {"name": "text_lm", "path": str(fortune_file), "vocab_size": 300, "max_length": 16,
                    "val_fraction": 0.1, "test_fraction": 0.1, "cache_dir": str(tmp_path / "tok"), "batch_size": 16},
           "model": {"name": "causal_lm", "layers": 1, "hidden": 32, "heads": 2},
           "train": {"epochs": 1, "lr": 0.01, "progress": False, "quiet": True, "threads": 1}}
    run = kdkit.run_config(kdkit.load_config(cfg), "train")
    first = export_run(run.dir, "onnx")
    second = export_run(run.dir, "onnx", int8=True, int8_max_drop=100.0)
    folder = Path(first["file"]).parent
    assert (folder / "model.onnx.json").is_file() and (folder / "model-int8.onnx.json").is_file()
    assert json.loads((folder / "model.onnx.json").read_text())["int8"] is False  # the first record is kept
    card = (folder / "MODEL_CARD.md").read_text()
    ppl = json.loads((run.dir / "report.json").read_text())["models"]["student"]["perplexity"]
    assert "| perplexity | bits per byte |" in card and f"{ppl:.3f}" in card
    assert "Predicts the next token" in card and "model-int8.onnx" in card and second["int8"]
