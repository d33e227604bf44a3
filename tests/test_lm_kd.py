"""The lm_kd method: its loss against an independent formula, runs through the API and YAML, top-k offline."""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import kdkit  # noqa: E402
from kdkit.errors import KdkitError  # noqa: E402
from kdkit.lm.evaluate import lm_quality  # noqa: E402
from kdkit.methods.build import build_method  # noqa: E402
from kdkit.teacher import Teacher  # noqa: E402

WORDS = "the cat dog runs sleeps on a mat under tree red blue big small program bug fixes code user".split()


def _corpus_file(path, n=60, seed=0):
    rng = random.Random(seed)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) + "." for _ in range(n)]
    path.write_text("\n%\n".join(docs) + "\n")
    return path


@pytest.fixture()
def splits(tmp_path):
    f = _corpus_file(tmp_path / "quotes")
    return kdkit.DATASETS.get("text_lm")(path=str(f), vocab_size=300, max_length=16, val_fraction=0.1,
                                         test_fraction=0.1, cache_dir=str(tmp_path / "tok"))


def _pair(vocab, seed=0, t_layers=2, s_hidden=16):
    torch.manual_seed(seed)
    teacher = kdkit.lm.tiny_gpt2(vocab, layers=t_layers, hidden=32, max_positions=16)
    student = kdkit.lm.tiny_gpt2(vocab, layers=1, hidden=s_hidden, heads=2, max_positions=16)
    return teacher, student


def test_loss_matches_forward_kl_and_cross_entropy_by_hand(splits):
    teacher, student = _pair(splits.num_classes)
    method = build_method("lm_kd", student, Teacher(teacher), {"alpha": 0.3, "temperature": 2.0},
                          train_data=splits.train)
    batch = {"x": splits.train.x[:6], "y": splits.train.y[:6], "index": torch.arange(6)}
    out = method(batch)
    with torch.no_grad():
        s, t = student(batch["x"]), teacher.eval()(batch["x"])
        y = batch["y"][:, :s.shape[1]]
        keep = y != -100
        p = F.softmax(t[keep] / 2.0, -1)
        log_q = F.log_softmax(s[keep] / 2.0, -1)
        kl = (p * (p.log() - log_q)).sum(-1).mean() * 4.0  # T² · KL(p ‖ q) per token
        ce = F.cross_entropy(s[keep], y[keep])
    assert float(out["forward_kl"]) == pytest.approx(float(kl), rel=1e-4)
    assert float(out["ce"]) == pytest.approx(float(ce), rel=1e-4)
    assert float(out["loss"].detach()) == pytest.approx(float(0.3 * kl + 0.7 * ce), rel=1e-4)
    out["loss"].backward()
    assert student.hf.transformer.wte.weight.grad is not None


def test_one_training_step_of_lm_kd(splits):
    """The smoke step of tests/test_method_smoke.py on token data: finite loss and parts, (B, L', V) logits, the
    student changes in one step, the teacher does not."""
    teacher, student = _pair(splits.num_classes)
    before_t = {k: v.clone() for k, v in teacher.state_dict().items()}
    before_s = [p.detach().clone() for p in student.parameters()]
    method = build_method("lm_kd", student, Teacher(teacher), {"divergence": "skew_kl"}, train_data=splits.train)
    batch = {"x": splits.train.x[:8], "y": splits.train.y[:8], "index": torch.arange(8)}
    out = method(batch)
    longest = int((batch["x"] != 0).sum(1).max())
    assert out["logits"].shape == (8, longest, splits.num_classes)
    assert all(torch.isfinite(v) for k, v in out.items() if k != "logits")
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.1)
    out["loss"].backward()
    opt.step()
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before_s, student.parameters()))
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before_t.items())


def test_lm_kd_on_image_data_says_what_it_needs():
    from kdkit.models import create_model

    student = create_model("mlp", num_classes=3, input_shape=(4,))
    batch = {"x": torch.randn(4, 4), "y": torch.tensor([0, 1, 2, 0]), "index": torch.arange(4)}
    with pytest.raises(KdkitError, match="lm_kd distils causal language models"):
        build_method("lm_kd", student, Teacher(create_model("mlp", num_classes=3, input_shape=(4,))), {},
                     example_batch=batch)


def test_vocabulary_mismatch_is_an_error(splits):
    torch.manual_seed(0)
    teacher = kdkit.lm.tiny_gpt2(splits.num_classes + 4, max_positions=16)
    student = kdkit.lm.tiny_gpt2(splits.num_classes, max_positions=16)
    with pytest.raises(KdkitError, match="vocabulary has .* needs one shared tokenizer, or .*teacher_tokenizer"):
        kdkit.distill(teacher, student, splits.train, splits.val, method="lm_kd", epochs=1)


def test_dense_teacher_cache_is_refused_with_a_reason(splits):
    teacher, student = _pair(splits.num_classes)
    with pytest.raises(KdkitError, match="store_kind"):
        kdkit.distill(teacher, student, splits.train, splits.val, method="lm_kd", epochs=1,
                      teacher_cache="memory")


def test_a_combo_holding_lm_kd_refuses_the_dense_cache_too(splits):
    # The refusal is a declared property of the method; combo passes its parts' refusal on, so a cache that
    # lm_kd must not read is not handed to it from inside a combination either.
    teacher, student = _pair(splits.num_classes)
    with pytest.raises(KdkitError, match="store_kind"):
        kdkit.distill(teacher, student, splits.train, splits.val, method="combo", epochs=1,
                      parts={"lm": {"name": "lm_kd"}}, teacher_cache="memory")


def _kl_to_teacher(student, teacher, data):
    """Mean per-token KL(teacher ‖ student) on ``data``, computed directly (one batch, no chunks)."""
    with torch.no_grad():
        s, t = student.eval()(data.x), teacher.eval()(data.x)
        keep = data.y[:, :s.shape[1]] != -100
        log_p, log_q = F.log_softmax(t[keep], -1), F.log_softmax(s[keep], -1)
        return float((log_p.exp() * (log_p - log_q)).sum(-1).mean())


def test_distill_through_the_api_moves_the_student_to_the_teacher(splits, tmp_path):
    teacher, student = _pair(splits.num_classes)
    kdkit.train(teacher, splits.train, splits.val, epochs=3, lr=1e-2, batch_size=16, threads=1, progress=False,
                quiet=True)
    data_alone = copy.deepcopy(student)
    common = dict(epochs=3, lr=1e-2, batch_size=16, threads=1, progress=False, quiet=True)
    run = kdkit.distill(teacher, student, splits.train, splits.val, test_data=splits.test, method="lm_kd",
                        divergence="jsd", beta=0.5, alpha=1.0, out_dir=tmp_path / "kd", **common)
    # the same student, the same budget, the data's cross-entropy alone (alpha = 0)
    base = kdkit.distill(teacher, data_alone, splits.train, splits.val, method="lm_kd", alpha=0.0, **common)
    assert _kl_to_teacher(run.student, teacher, splits.test) < _kl_to_teacher(base.student, teacher, splits.test)
    report = json.loads((tmp_path / "kd" / "report.json").read_text())
    s, t = report["models"]["student"], report["models"]["teacher"]
    direct, _ = lm_quality(run.student, splits.test, 16, teacher=teacher)
    assert s["perplexity"] == pytest.approx(direct["perplexity"], rel=1e-6)
    assert s["agreement"] == pytest.approx(direct["agreement"])
    assert t["perplexity"] > 1 and "samples" in s and len(s["samples"]) == len(t["samples"])
    assert "lm_kd compares full next-token distributions" in report["teacher_cache"]
    hist = [json.loads(line) for line in (tmp_path / "kd" / "metrics.jsonl").read_text().splitlines()]
    assert {"train_jsd", "train_ce", "val_perplexity", "val_agreement"} <= set(hist[-1])
    assert "Generated samples" in (tmp_path / "kd" / "report.html").read_text()


def test_yaml_teacher_then_a_store_written_once_for_two_students(tmp_path, monkeypatch):
    f = _corpus_file(tmp_path / "quotes")
    monkeypatch.setenv("KDKIT_CACHE_DIR", str(tmp_path / "cache"))
    data = {"name": "text_lm", "path": str(f), "vocab_size": 300, "max_length": 16, "batch_size": 16,
            "eval_batch_size": 32}
    train = {"epochs": 2, "lr": 0.01, "threads": 1, "progress": False, "quiet": True}
    kdkit.run_config(kdkit.load_config({"out_dir": str(tmp_path / "t"), "data": data, "train": train,
                                        "model": {"name": "causal_lm", "layers": 2, "hidden": 32}}), "train")
    store = tmp_path / "stores" / "s16"
    cfg = {"out_dir": str(tmp_path / "kd"), "data": data, "train": train,
           "teacher": {"checkpoint": str(tmp_path / "t")},
           "student": {"name": "causal_lm", "layers": 1, "hidden": 16},
           "method": {"name": "lm_kd", "store": str(store), "store_kind": "sampled", "store_size": 16, "alpha": 0.5}}
    from kdkit.api import cache_config

    info = cache_config(kdkit.load_config(cfg), log=lambda m: None)  # kdkit cache: the teacher's job, once
    assert info["path"] == str(store) and (store / "store.json").is_file()
    assert "sampled (16 systematic draws) teacher store" in info["description"]
    written = {p.name: p.stat().st_mtime_ns for p in store.iterdir()}
    run = kdkit.run_config(kdkit.load_config(cfg), "distill")
    report = json.loads((tmp_path / "kd" / "report.json").read_text())
    assert report["models"]["student"]["perplexity"] == pytest.approx(run.metrics["student"]["perplexity"])
    assert "reusing" in report["teacher_cache"] and "bytes per token" in report["teacher_cache"]
    # a second, different student reads the same store (store: PATH alone), and nothing in it is rewritten
    cfg2 = {**cfg, "out_dir": str(tmp_path / "kd2"), "student": {"name": "causal_lm", "layers": 1, "hidden": 24},
            "method": {"name": "lm_kd", "store": str(store), "alpha": 1.0}}
    kdkit.run_config(kdkit.load_config(cfg2), "distill")
    assert {p.name: p.stat().st_mtime_ns for p in store.iterdir()} == written
    # the offline top-k alias writes a topk store under the cache folder
    cfg3 = {**cfg, "out_dir": str(tmp_path / "kd3"), "method": {"name": "lm_kd", "teacher_topk": 8, "alpha": 0.5}}
    kdkit.run_config(kdkit.load_config(cfg3), "distill")
    assert "top-8 teacher store" in json.loads((tmp_path / "kd3" / "report.json").read_text())["teacher_cache"]
    assert list((tmp_path / "cache" / "lm_store").glob("top8-*"))


def test_a_store_of_another_teacher_or_temperature_is_refused_before_training(tmp_path, splits):
    teacher, student = _pair(splits.num_classes)
    store = tmp_path / "s"
    m = build_method("lm_kd", student, Teacher(teacher), {"store": str(store), "store_kind": "sampled",
                                                          "store_size": 4}, train_data=splits.train)
    m.prepare(splits.train)
    other, _ = _pair(splits.num_classes, seed=3)
    m2 = build_method("lm_kd", copy.deepcopy(student), Teacher(other), {"store": str(store)}, train_data=splits.train)
    with pytest.raises(KdkitError, match="the teacher's weights differ"):
        m2.prepare(splits.train)
    m3 = build_method("lm_kd", copy.deepcopy(student), Teacher(teacher), {"store": str(store), "temperature": 2.0},
                      train_data=splits.train)
    with pytest.raises(KdkitError, match="written at temperature 1 and this run asks for 2"):
        m3.prepare(splits.train)
    with pytest.raises(KdkitError, match="divergence jsd over a sampled store"):
        build_method("lm_kd", student, Teacher(teacher), {"store_kind": "sampled", "store_size": 4,
                                                          "divergence": "jsd"}, train_data=splits.train)
    with pytest.raises(KdkitError, match="not a teacher store"):
        build_method("lm_kd", student, Teacher(teacher), {"store": str(tmp_path / "none")},
                     train_data=splits.train).prepare(splits.train)


def test_a_top_k_larger_than_the_vocabulary_is_refused_before_training(splits):
    teacher, student = _pair(splits.num_classes)
    vocab = splits.num_classes
    with pytest.raises(KdkitError, match=f"teacher_topk={vocab + 1} is larger than the vocabulary"):
        build_method("lm_kd", student, Teacher(teacher), {"teacher_topk": vocab + 1}, train_data=splits.train)
    build_method("lm_kd", student, Teacher(teacher), {"teacher_topk": vocab}, train_data=splits.train)  # k = V: fine
