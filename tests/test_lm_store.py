"""The LM teacher store (kdkit.lm.store): the three records against independent formulas, the sampled target's
unbiasedness, temperature, the compact on-disk format (ids, shards, atomic writes, streaming reads) and the
one-line refusals (another teacher, tokenizer or temperature, truncated or missing shards, the wrong loss)."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdkit.errors import KdkitError
from kdkit.lm.data import TokenData
from kdkit.lm.losses import lm_distill_loss
from kdkit.lm.store import (
    SampledTargets,
    StoreWriter,
    TeacherStore,
    build_store,
    bytes_per_position,
    id_dtype,
    sample_counts,
    store_distill_loss,
    write_batches,
)
from kdkit.lm.topk import sparse_distill_loss, topk_targets, truncation_kl

B, L, V = 4, 6, 13


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    s = 2 * torch.randn(B, L, V, generator=g)
    t = 3 * torch.randn(B, L, V, generator=g)
    y = torch.randint(0, V, (B, L), generator=g)
    y[0, 4:] = -100
    y[2, 0] = -100
    y[3, :] = -100  # a row that predicts nothing
    return s, t, y


def _write(tmp_path, kind, size, t, y, name="store", rows_per_shard=2, temperature=1.0, fingerprint=None):
    with StoreWriter(tmp_path / name, kind=kind, size=size, rows=B, tokens=int((y != -100).sum()), vocab_size=V,
                     temperature=temperature, fingerprint=fingerprint or {"teacher": "t1"},
                     rows_per_shard=rows_per_shard) as w:
        write_batches(w, [(t[:3], y[:3]), (t[3:], y[3:])], seed=0)
        w.commit()
    return TeacherStore.open(tmp_path / name)


def test_id_width_and_bytes_per_position():
    assert id_dtype(65536).itemsize == 2 and id_dtype(65537).itemsize == 4
    assert bytes_per_position("topk", 12, 32000) == 12 * 4 + 4
    assert bytes_per_position("sampled", 16, 32000, entries_per_position=10.0) == 10 * 3
    assert bytes_per_position("sampled", 16, 200000, entries_per_position=10.0) == 10 * 5
    assert bytes_per_position("full", 0, 1024) == 2048


def test_sample_counts_are_the_draws_grouped():
    g = torch.Generator().manual_seed(3)
    log_p = F.log_softmax(torch.randn(5, 7, generator=g), 1)
    n, ids, counts = sample_counts(log_p, 9, torch.Generator().manual_seed(1), "multinomial")
    draws = torch.multinomial(log_p.exp(), 9, replacement=True, generator=torch.Generator().manual_seed(1))
    start = 0
    for row in range(5):
        uniq, c = torch.unique(draws[row], return_counts=True)
        assert n[row] == len(uniq)
        assert ids[start:start + len(uniq)].tolist() == uniq.tolist()
        assert counts[start:start + len(uniq)].tolist() == c.tolist()
        start += len(uniq)
    assert int(counts.sum()) == 5 * 9


@pytest.mark.parametrize("sampling", ["systematic", "multinomial"])
def test_sampled_target_is_unbiased(sampling):
    """E[count / S] = p: the mean of many sampled targets approaches the teacher's distribution."""
    log_p = F.log_softmax(torch.tensor([[2.0, 1.0, 0.0, -1.0, -3.0]]), 1).repeat(4000, 1)
    n, ids, counts = sample_counts(log_p, 4, torch.Generator().manual_seed(0), sampling)
    assert int(counts.sum()) == 4000 * 4
    pos = torch.repeat_interleave(torch.arange(4000), n)
    dense = torch.zeros(4000, 5).index_put_((pos, ids), counts.float() / 4, accumulate=True)
    np.testing.assert_allclose(dense.mean(0).numpy(), log_p[0].exp().numpy(), atol=0.015)


def test_systematic_counts_are_floor_or_ceil_of_s_times_p():
    g = torch.Generator().manual_seed(2)
    log_p = F.log_softmax(3 * torch.randn(200, 11, generator=g), 1)
    log_p[:, 3] = -float("inf")  # a token the teacher never emits is never drawn
    log_p = log_p - torch.logsumexp(log_p, 1, keepdim=True)
    n, ids, counts = sample_counts(log_p, 16, torch.Generator().manual_seed(0), "systematic")
    pos = torch.repeat_interleave(torch.arange(200), n)
    dense = torch.zeros(200, 11).index_put_((pos, ids), counts.float(), accumulate=True)
    sp = 16 * log_p.exp()
    assert bool(((dense >= sp.floor() - 1e-9) & (dense <= sp.ceil() + 1e-9)).all())
    assert float(dense[:, 3].abs().sum()) == 0.0
    with pytest.raises(KdkitError, match="sampling must be one of systematic, multinomial"):
        sample_counts(log_p, 4, None, "stratified")


@pytest.mark.parametrize("div", ["forward_kl", "reverse_kl", "jsd", "tv"])
def test_full_store_is_the_live_loss(tmp_path, div):
    s, t, y = _batch()
    store = _write(tmp_path, "full", None, t, y)
    assert store.meta["float16_kl_mean"] < 1e-5
    tg = store.targets([0, 1, 2, 3])
    got = store_distill_loss(s, y, tg, divergence=div, alpha=0.7)
    want = lm_distill_loss(s, t, y, divergence=div, alpha=0.7)
    assert float(got.loss) == pytest.approx(float(want.loss), rel=2e-3, abs=1e-4)


def test_full_store_derives_another_temperature(tmp_path):
    s, t, y = _batch()
    store = _write(tmp_path, "full", None, t, y, temperature=2.0)
    tg = store.targets([0, 1, 2, 3])
    got = store_distill_loss(s, y, tg, temperature=0.5, alpha=0.6)
    want = lm_distill_loss(s, t, y, temperature=0.5, alpha=0.6)
    assert float(got.loss) == pytest.approx(float(want.loss), rel=5e-3)


def test_topk_store_round_trips_the_record(tmp_path):
    s, t, y = _batch()
    store = _write(tmp_path, "topk", 5, t, y)
    tg = store.targets([2, 0])  # any order
    order = torch.tensor([2, 0])
    ref = topk_targets(t[order], y[order], 5)
    assert torch.equal(tg.indices, ref.indices) and torch.equal(tg.values, ref.values)
    assert torch.equal(tg.log_tail, ref.log_tail)
    got = store_distill_loss(s[order], y[order], tg, divergence="jsd")
    want = sparse_distill_loss(s[order], y[order], ref, divergence="jsd")
    assert float(got.loss) == float(want.loss)
    assert store.meta["bytes_per_position"] == pytest.approx(5 * 4 + 4 + 16 * (B + 2) / store.meta["tokens"])


def test_topk_store_measures_truncation_and_refuses_rows_that_do_not_fit(tmp_path):
    s, t, y = _batch()
    store = _write(tmp_path, "topk", 4, t, y)
    whole = topk_targets(t, y, 4)
    assert store.meta["truncation_kl_mean"] == pytest.approx(truncation_kl(t, y, whole).mean().item(), rel=1e-5)
    assert store.meta["tail_mass_mean"] == pytest.approx(whole.log_tail.double().exp().mean().item(), rel=1e-6)
    with pytest.raises(KdkitError, match="tokens per row"):
        store_distill_loss(s[[0, 2]], y[[0, 2]], store.targets([2, 0]))
    for kind, size in (("sampled", 4), ("full", None)):
        other = _write(tmp_path, kind, size, t, y, name=kind)
        with pytest.raises(KdkitError, match="holds .* tokens for this batch but its labels predict"):
            store_distill_loss(s[[0]], y[[0]], other.targets([1]))


def test_a_store_with_rows_missing_is_not_committed(tmp_path):
    _, t, y = _batch()
    with StoreWriter(tmp_path / "s", kind="sampled", size=3, rows=B, tokens=int((y != -100).sum()),
                     vocab_size=V) as w:
        write_batches(w, [(t[:1], y[:1])])
        with pytest.raises(KdkitError, match="1/4 rows"):
            w.commit()
    assert list(tmp_path.iterdir()) == []


def test_sampled_loss_is_kl_of_the_empirical_distribution(tmp_path):
    s, t, y = _batch()
    store = _write(tmp_path, "sampled", 8, t, y)
    tg = store.targets([0, 1, 2, 3])
    assert isinstance(tg, SampledTargets)
    assert torch.allclose(tg.weights.sum(1), torch.ones(tg.num_tokens))
    got = store_distill_loss(s, y, tg, alpha=0.8)
    # by hand: p̂ dense from the weights, KL(p̂ ‖ q) and the CE
    pos = (y != -100).nonzero().tolist()
    kd = ce = 0.0
    for n, (b, i) in enumerate(pos):
        p_hat = torch.zeros(V).index_add_(0, tg.ids[n], tg.weights[n])
        log_q = F.log_softmax(s[b, i].double(), 0)
        m = p_hat > 0
        kd += float((p_hat[m] * (p_hat[m].log() - log_q[m])).sum())
        ce += float(-log_q[y[b, i]])
    want = (0.8 * kd + 0.2 * ce) / len(pos)
    assert float(got.loss) == pytest.approx(want, rel=1e-5)
    # the gradient: (q - p̂) per token, times alpha, over N (plus the CE part)
    s_req = s.clone().requires_grad_(True)
    store_distill_loss(s_req, y, tg, alpha=1.0).loss.backward()
    b, i = pos[0]
    p_hat = torch.zeros(V).index_add_(0, tg.ids[0], tg.weights[0])
    expect = (torch.softmax(s[b, i], 0) - p_hat) / len(pos)
    assert torch.allclose(s_req.grad[b, i], expect, atol=1e-6)
    # 3 bytes per entry (uint16 id, uint8 count), nothing else per position
    m = store.meta
    assert m["entries"] <= 8 * m["tokens"]
    assert m["bytes"] == m["entries"] * 3 + 16 * (B + 2)  # and two shards' index: (rows + 1) x 2 int64 each


def test_sampled_store_with_many_draws_approaches_the_full_loss(tmp_path):
    s, t, y = _batch()
    store = _write(tmp_path, "sampled", 255, t, y)
    got = float(store_distill_loss(s, y, store.targets([0, 1, 2, 3])).loss)
    full = float(lm_distill_loss(s, t, y).loss)
    # KL(p̂‖q) = KL(p‖q) + (H(p) - H(p̂)) + Σ (p̂ - p) log(1/q): close at S = 255, not equal
    assert abs(got - full) < 0.25 * full


def test_the_same_seed_writes_the_same_store(tmp_path):
    _, t, y = _batch()
    a = _write(tmp_path, "sampled", 6, t, y, name="a")
    b = _write(tmp_path, "sampled", 6, t, y, name="b")
    for name in a.meta["shards"][0]["files"]:
        assert (a.path / f"shard-00000.{name}").read_bytes() == (b.path / f"shard-00000.{name}").read_bytes()


@pytest.mark.parametrize("div", ["reverse_kl", "jsd", "skew_kl", "tv"])
def test_a_sampled_store_refuses_divergences_it_cannot_serve(tmp_path, div):
    s, t, y = _batch()
    store = _write(tmp_path, "sampled", 4, t, y)
    with pytest.raises(KdkitError, match=f"divergence {div} over a sampled store") as e:
        store.check_run(div, 1.0)
    assert "\n" not in str(e.value)
    with pytest.raises(KdkitError, match=f"divergence {div} over a sampled store"):
        store_distill_loss(s, y, store.targets([0, 1, 2, 3]), divergence=div)


def test_topk_and_sampled_refuse_another_temperature(tmp_path):
    s, t, y = _batch()
    for kind, size in (("topk", 3), ("sampled", 4)):
        store = _write(tmp_path, kind, size, t, y, name=kind, temperature=2.0)
        with pytest.raises(KdkitError, match="written at temperature 2 and this run asks for 1"):
            store.check_run("forward_kl", 1.0)
        with pytest.raises(KdkitError, match="cannot be re-tempered"):
            store_distill_loss(s, y, store.targets([0, 1, 2, 3]), temperature=1.0)
    _write(tmp_path, "full", None, t, y, name="full", temperature=2.0).check_run("forward_kl", 1.0)  # derives it


def test_truncated_or_missing_shards_are_refused(tmp_path):
    _, t, y = _batch()
    store = _write(tmp_path, "sampled", 4, t, y)
    path = store.path
    ids = path / "shard-00001.ids"
    data = ids.read_bytes()
    ids.write_bytes(data[:-1])
    with pytest.raises(KdkitError, match=r"shard file shard-00001.ids has \d+ bytes, store.json says \d+ \(truncated"):
        TeacherStore.open(path)
    ids.unlink()
    with pytest.raises(KdkitError, match="incomplete: shard file shard-00001.ids is missing"):
        TeacherStore.open(path)
    (path / "store.json").unlink()
    with pytest.raises(KdkitError, match="is not a teacher store"):
        TeacherStore.open(path)


def test_an_interrupted_write_leaves_nothing_and_nothing_is_overwritten(tmp_path):
    _, t, y = _batch()

    def batches():
        yield t[:2], y[:2]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        with StoreWriter(tmp_path / "s", kind="topk", size=2, rows=B, tokens=int((y != -100).sum()),
                         vocab_size=V) as w:
            write_batches(w, batches())
            w.commit()
    assert list(tmp_path.iterdir()) == []
    store = _write(tmp_path, "topk", 2, t, y, name="s")
    before = {f.name: f.read_bytes() for f in store.path.iterdir()}
    with pytest.raises(KdkitError, match="already exists; not overwriting"):
        StoreWriter(store.path, kind="topk", size=2, rows=B, tokens=1, vocab_size=V)
    assert {f.name: f.read_bytes() for f in store.path.iterdir()} == before


def test_reads_are_streamed_not_mapped(tmp_path):
    """A store is read with pread: neither opening it nor reading a batch maps one of its files."""
    if not os.path.exists("/proc/self/maps"):
        pytest.skip("needs /proc/self/maps (Linux) to see the process's memory maps")
    _, t, y = _batch()
    store = _write(tmp_path, "full", None, t, y)
    tg = store.targets([1])
    assert tg.num_tokens == int((y[1] != -100).sum())
    assert str(store.path) not in open("/proc/self/maps").read()
    mapped = np.memmap(store.path / "shard-00000.logp", dtype=np.uint8, mode="r")  # what a mapping looks like
    assert str(store.path) in open("/proc/self/maps").read()
    del mapped


def _token_data(n=12, length=8, vocab=29, seed=0, tokenizer_path=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(2, vocab, (n, length), generator=g)
    y = torch.cat([x[:, 1:], torch.full((n, 1), -100)], 1)
    x[-1, 5:] = 0
    y[-1, 4:] = -100
    return TokenData(x, y, pad_token_id=0, eos_token_id=1, tokenizer_path=tokenizer_path)


def _gpt(vocab=29, seed=0):
    pytest.importorskip("transformers")
    from kdkit.lm import tiny_gpt2

    torch.manual_seed(seed)
    return tiny_gpt2(vocab, layers=1, hidden=16, max_positions=8).eval()


def test_build_store_reuses_and_refuses_another_teacher_tokenizer_or_data(tmp_path):
    tok_a, tok_b = tmp_path / "a.json", tmp_path / "b.json"
    tok_a.write_text('{"model": "a"}')
    tok_b.write_text('{"model": "b"}')
    data = _token_data(tokenizer_path=str(tok_a))
    teacher = _gpt()
    path = tmp_path / "stores" / "s8"
    store = build_store(teacher, data, "sampled", 8, path=path, rows_per_shard=5)
    assert not store.reused and len(store.meta["shards"]) == 3
    again = build_store(teacher, data, "sampled", 8, path=path)
    assert again.reused
    with pytest.raises(KdkitError, match="the teacher's weights differ"):
        build_store(_gpt(seed=1), data, "sampled", 8, path=path)
    with pytest.raises(KdkitError, match="the tokenizer differ"):
        build_store(teacher, _token_data(tokenizer_path=str(tok_b)), "sampled", 8, path=path)
    with pytest.raises(KdkitError, match="the token ids, the targets"):
        build_store(teacher, _token_data(seed=5, tokenizer_path=str(tok_a)), "sampled", 8, path=path)
    with pytest.raises(KdkitError, match=r"holds another record: size 8 \(asked 16\)"):
        build_store(teacher, data, "sampled", 16, path=path)
    with pytest.raises(KdkitError, match="holds another record: temperature"):
        build_store(teacher, data, "sampled", 8, path=path, temperature=2.0)
    # the stored record is the teacher's, row by row, whatever the shard
    with torch.inference_mode():
        logits = teacher(data.x[[7]])
    ref = topk_targets(logits, data.y[[7], :logits.shape[1]], 3)
    top = build_store(teacher, data, "topk", 3, folder=tmp_path / "slots", rows_per_shard=4)
    assert torch.equal(top.targets([7]).indices, ref.indices)
    assert math.isclose(json.loads((top.path / "store.json").read_text())["rows"], 12)
