"""Cross-tokenizer LM distillation (kdkit.lm.cross): byte-span alignment (multi-byte characters, text the
teacher's tokenizer cannot reproduce), the three losses, and the same-tokenizer case equal to lm_kd."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("tokenizers")
pytest.importorskip("transformers")

from kdkit.errors import KdkitError  # noqa: E402
from kdkit.lm import tiny_gpt2  # noqa: E402
from kdkit.lm.cross import align, batch_groups, cross_distill_loss  # noqa: E402
from kdkit.lm.data import TokenData  # noqa: E402
from kdkit.lm.losses import lm_distill_loss  # noqa: E402
from kdkit.lm.tokenizer import load_tokenizer, train_tokenizer  # noqa: E402
from kdkit.methods.build import build_method  # noqa: E402
from kdkit.teacher import Teacher  # noqa: E402

DOCS = ["Crème brûlée for the café.", "Tokyo is 東京 in Japanese.", "naïve code, fixed bugs", "plain ascii text here",
        "über größe straße", "the cat sat on the mat"] * 5


def _rows(tok, docs, length=40):
    pad, eos = tok.token_to_id("<pad>"), tok.token_to_id("<|endoftext|>")
    rows = [tok.encode(d).ids + [eos] for d in docs]
    x = torch.full((len(rows), length), pad)
    y = torch.full((len(rows), length), -100)
    for i, r in enumerate(rows):
        x[i, :len(r)] = torch.tensor(r)
        y[i, :len(r) - 1] = torch.tensor(r[1:])
    return TokenData(x, y, pad, eos, tok.kdkit_path)


def _pair(s_tok, t_tok):
    """A tiny teacher over the teacher tokenizer's vocabulary and a tiny student over the student's."""
    torch.manual_seed(0)
    teacher = tiny_gpt2(t_tok.get_vocab_size(), layers=1, hidden=16, max_positions=40)
    student = tiny_gpt2(s_tok.get_vocab_size(), layers=1, hidden=16, max_positions=40)
    return teacher, student


@pytest.fixture()
def toks(tmp_path):
    a = train_tokenizer(DOCS, vocab_size=290, cache_dir=tmp_path / "a")
    b = train_tokenizer(DOCS[:12], vocab_size=270, cache_dir=tmp_path / "b")  # other merges, other size
    return load_tokenizer(a.kdkit_path), load_tokenizer(b.kdkit_path)


def test_groups_cover_the_same_bytes_on_both_sides(toks):
    from kdkit.lm.cross import byte_table

    s_tok, t_tok = toks
    data = _rows(s_tok, DOCS[:6])
    al = align(data, s_tok, t_tok)
    assert al.unaligned == 0 and len(al.groups)
    sb, tb = byte_table(s_tok, "student"), byte_table(t_tok, "teacher")
    for r, s0, s1, t0, t1, matched in al.groups.tolist():
        s_ids = data.x[r, s0:s1]
        t_ids = al.teacher_x[r, t0:t1]
        assert int(sb[s_ids].sum()) == int(tb[t_ids].sum())  # the same bytes ...
        assert int(sb[data.x[r, :s0]].sum()) == int(tb[al.teacher_x[r, :t0]].sum())  # ... after the same text
        if matched:
            assert s_tok.id_to_token(int(s_ids[0])) == t_tok.id_to_token(int(t_ids[0]))
    # rows with multi-byte characters (è, 東京) align like the others: nearly every target token is in a group
    # (the tokens of a row's first group are predicted from nothing the teacher shares, and are left out)
    assert al.aligned_share > 0.85
    assert any(r == 1 for r, *_ in al.groups.tolist())


def test_rows_that_stop_being_utf8_or_that_the_teacher_cannot_reproduce_are_reported(toks):
    s_tok, t_tok = toks
    data = _rows(s_tok, DOCS[:3])
    # cut row 0 inside a two-byte character (è): aligned up to that byte, and counted
    ids = data.x[0].tolist()
    cut = next(i for i in range(1, 12) if s_tok.id_to_token(ids[i]) and "Ã" in s_tok.id_to_token(ids[i]))
    x = torch.cat([data.x[:1, :cut + 1], torch.zeros(1, data.x.shape[1] - cut - 1, dtype=torch.long)], 1)
    bad = TokenData(x, data.y[:1], data.pad_token_id, None, data.tokenizer_path)
    al = align(bad, s_tok, t_tok)
    assert al.truncated == 1 and al.unaligned == 0
    assert "1 row(s) aligned up to their first byte that is not UTF-8" in al.describe()
    assert all(s1 <= cut for _, _, s1, *_ in al.groups.tolist())  # nothing past the cut

    class Lowercasing:  # a teacher tokenizer that normalises text: its bytes are not the student's
        def __init__(self, tok):
            self.tok = tok

        def encode(self, text, add_special_tokens=False):
            return self.tok.encode(text.lower(), add_special_tokens=add_special_tokens)

        def __getattr__(self, name):
            return getattr(self.tok, name)

    upper = _rows(s_tok, ["Tokyo is big", "the cat sat on the mat"])
    al = align(upper, s_tok, Lowercasing(t_tok))
    assert al.unaligned == 1 and int(al.offsets[1]) == 0  # row 0 ("Tokyo") has no groups, row 1 does
    assert int(al.offsets[2]) > 0 and "1 row(s) left out" in al.describe()


def test_same_tokenizer_gives_lm_kd_forward_kl_exactly(toks):
    s_tok, _ = toks
    data = _rows(s_tok, DOCS[:6])
    al = align(data, s_tok, s_tok)
    assert bool(al.groups[:, 5].all())
    g = torch.Generator().manual_seed(0)
    V = s_tok.get_vocab_size()
    s = torch.randn(6, 40, V, generator=g)
    t = 2 * torch.randn(6, 40, V, generator=g)
    for mode in ("merged", "hybrid"):
        got = cross_distill_loss(s, data.x, data.y, t, al.teacher_x, batch_groups(al, torch.arange(6)), al.shared,
                                 loss=mode, alpha=0.6)
        want = lm_distill_loss(s, t, data.y, alpha=0.6)
        assert float(got.loss) == pytest.approx(float(want.loss), rel=1e-5)


def test_uld_is_the_sorted_l1_distance(toks):
    s_tok, t_tok = toks
    data = _rows(s_tok, DOCS[:2])
    al = align(data, s_tok, t_tok)
    g = torch.Generator().manual_seed(1)
    s = torch.randn(2, 40, s_tok.get_vocab_size(), generator=g)
    t = torch.randn(2, al.teacher_x.shape[1], t_tok.get_vocab_size(), generator=g)
    groups = batch_groups(al, torch.arange(2))
    got = cross_distill_loss(s, data.x, data.y, t, al.teacher_x, groups, al.shared, loss="uld").kd
    vals = []
    for r, s0, s1, t0, t1, _ in groups.tolist():
        q = torch.softmax(s[r, s0 - 1], 0).sort(descending=True).values
        p = torch.softmax(t[r, t0 - 1], 0).sort(descending=True).values
        w = max(len(p), len(q))
        vals.append(float((torch.nn.functional.pad(q, (0, w - len(q))) - torch.nn.functional.pad(p, (0, w - len(p))))
                          .abs().sum()))
    assert float(got) == pytest.approx(sum(vals) / len(vals), rel=1e-5)


def test_lm_kd_with_a_teacher_of_another_tokenizer_trains_and_names_what_is_missing(toks):
    s_tok, t_tok = toks
    data = _rows(s_tok, DOCS)
    teacher, student = _pair(s_tok, t_tok)
    with pytest.raises(KdkitError, match="give the teacher's tokenizer"):
        build_method("lm_kd", student, Teacher(teacher), {}, train_data=data)
    for mode in ("uld", "merged", "hybrid"):
        m = build_method("lm_kd", student, Teacher(teacher), {"teacher_tokenizer": t_tok.kdkit_path,
                                                              "cross_loss": mode, "alpha": 0.5}, train_data=data)
        assert "groups" in m.prepare(data)
        m.train()
        batch = {"x": data.x[:4], "y": data.y[:4], "index": torch.arange(4)}
        out = m(batch)
        out["loss"].backward()
        assert torch.isfinite(out["loss"]) and float(out[mode]) > 0  # groups compared: two random models differ
    nameless = TokenData(data.x, data.y, data.pad_token_id, data.eos_token_id, None)
    m = build_method("lm_kd", student, Teacher(teacher), {"teacher_tokenizer": t_tok.kdkit_path}, train_data=nameless)
    with pytest.raises(KdkitError, match="needs the student's tokenizer.json"):
        m.prepare(nameless)


def test_kdkit_distill_with_a_teacher_of_another_tokenizer(tmp_path, monkeypatch):
    """From a config: the teacher is built over its own vocabulary, trained against through the alignment, and
    measured on its own tokens of the test text (bits per byte on both sides; no agreement by token id)."""
    import json
    import random

    import kdkit

    monkeypatch.setenv("KDKIT_CACHE_DIR", str(tmp_path / "cache"))
    rng = random.Random(0)
    words = "the cat dog runs on a mat under tree café naïve größe code user".split()
    (tmp_path / "q.txt").write_text("\n%\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(4, 9)))
                                                  for _ in range(80)))
    data = {"name": "text_lm", "path": str(tmp_path / "q.txt"), "max_length": 24, "batch_size": 16}
    train = {"epochs": 1, "lr": 0.01, "threads": 1, "progress": False, "quiet": True}
    kdkit.run_config(kdkit.load_config({"out_dir": str(tmp_path / "t"), "data": {**data, "vocab_size": 280},
                                        "train": train, "model": {"name": "causal_lm", "layers": 1, "hidden": 16}}),
                     "train")
    t_tok = next((tmp_path / "cache" / "tokenizers").glob("*/tokenizer.json"))
    cfg = {"out_dir": str(tmp_path / "kd"), "data": {**data, "vocab_size": 310}, "train": train,
           "teacher": {"checkpoint": str(tmp_path / "t")}, "student": {"name": "causal_lm", "layers": 1, "hidden": 8},
           "method": {"name": "lm_kd", "teacher_tokenizer": str(t_tok), "cross_loss": "hybrid", "alpha": 0.5}}
    run = kdkit.run_config(kdkit.load_config(cfg), "distill")
    report = json.loads((tmp_path / "kd" / "report.json").read_text())
    t, s = report["models"]["teacher"], report["models"]["student"]
    assert t["bits_per_byte"] > 0 and s["bits_per_byte"] > 0 and "agreement" not in s
    assert "cross-tokenizer alignment" in report["teacher_cache"]
    assert run.metrics["student"]["perplexity"] == pytest.approx(s["perplexity"])


def test_gkd_re_tokenises_the_students_samples_for_the_teacher(toks):
    s_tok, t_tok = toks
    data = _rows(s_tok, DOCS)
    teacher, student = _pair(s_tok, t_tok)
    m = build_method("gkd", student, Teacher(teacher), {"teacher_tokenizer": t_tok.kdkit_path, "on_policy": 1.0,
                                                         "max_new_tokens": 8, "prompt_tokens": 3},
                     train_data=data)
    m.prepare(data)
    m.train()
    out = m({"x": data.x[:4], "y": data.y[:4], "index": torch.arange(4)})
    assert float(out["on_policy"]) == 1.0 and torch.isfinite(out["loss"])
    assert float(out["hybrid"]) > 0  # groups of generated tokens were found and compared
    out["loss"].backward()
    assert student.hf.transformer.wte.weight.grad is not None


def test_a_full_store_of_the_teacher_on_its_own_tokens_gives_the_live_loss(toks, tmp_path):
    s_tok, t_tok = toks
    data = _rows(s_tok, DOCS)
    teacher, student = _pair(s_tok, t_tok)
    batch = {"x": data.x[:5], "y": data.y[:5], "index": torch.tensor([3, 0, 7, 12, 1])}
    losses = {}
    for name, extra in (("live", {}), ("store", {"store": str(tmp_path / "s"), "store_kind": "full"})):
        for mode in ("uld", "merged", "hybrid"):
            m = build_method("lm_kd", student, Teacher(teacher), {"teacher_tokenizer": t_tok.kdkit_path,
                                                                  "cross_loss": mode, **extra}, train_data=data)
            text = m.prepare(data)
            m.train()
            batch = {"x": data.x[batch["index"]], "y": data.y[batch["index"]], "index": batch["index"]}
            losses[name, mode] = float(m(batch)["loss"])
    assert "full teacher store" in text and (tmp_path / "s" / "store.json").is_file()
    for mode in ("uld", "merged", "hybrid"):
        assert losses["store", mode] == pytest.approx(losses["live", mode], rel=2e-3)
    with pytest.raises(KdkitError, match="is stored whole"):
        build_method("lm_kd", student, Teacher(teacher), {"teacher_tokenizer": t_tok.kdkit_path,
                                                          "store_kind": "sampled", "store_size": 8}, train_data=data)


def _hf_style_tokenizer(folder, docs):
    """A GPT-2-style tokenizer.json made with the tokenizers library: byte-level BPE, only <|endoftext|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer)
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    return folder


def test_a_hugging_face_tokenizer_folder_on_either_side(tmp_path, monkeypatch):
    import json
    import random

    import kdkit

    monkeypatch.setenv("KDKIT_CACHE_DIR", str(tmp_path / "cache"))
    rng = random.Random(1)
    words = "the cat dog runs on a mat under tree café naïve größe code user".split()
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 9))) for _ in range(80)]
    (tmp_path / "q.txt").write_text("\n%\n".join(docs))
    hf = _hf_style_tokenizer(tmp_path / "hf_tok", docs)
    train = {"epochs": 1, "lr": 0.01, "threads": 1, "progress": False, "quiet": True}
    data = {"name": "text_lm", "path": str(tmp_path / "q.txt"), "max_length": 24, "batch_size": 16}
    # the teacher on the Hugging Face-style tokenizer (no <pad>: its end-of-text token pads), the student on kdkit's
    kdkit.run_config(kdkit.load_config({"out_dir": str(tmp_path / "t"), "data": {**data, "tokenizer": str(hf)},
                                        "train": train, "model": {"name": "causal_lm", "layers": 1, "hidden": 16}}),
                     "train")
    cfg = {"out_dir": str(tmp_path / "kd"), "data": {**data, "vocab_size": 300}, "train": train,
           "teacher": {"checkpoint": str(tmp_path / "t")}, "student": {"name": "causal_lm", "layers": 1, "hidden": 8},
           "method": {"name": "lm_kd", "teacher_tokenizer": str(hf), "alpha": 0.5}}
    kdkit.run_config(kdkit.load_config(cfg), "distill")
    report = json.loads((tmp_path / "kd" / "report.json").read_text())
    assert report["models"]["teacher"]["bits_per_byte"] > 0
    assert "0 row(s)" not in report["teacher_cache"] and "cross-tokenizer alignment" in report["teacher_cache"]
