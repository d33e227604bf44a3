"""Offline top-k LM distillation (kdkit.lm.topk): the tail bucket, k = V equals the full loss, the truncation KL,
and the storage arithmetic (the store on disk: tests/test_lm_store.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdkit.errors import KdkitError
from kdkit.lm.losses import DIVERGENCES, lm_distill_loss
from kdkit.lm.topk import (
    dense_storage_bytes,
    sparse_distill_loss,
    sparse_kd_loss,
    storage_bytes,
    topk_targets,
    truncation_kl,
)
from tests.test_lm_losses import _close

B, L, V = 3, 5, 17


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    s = 2 * torch.randn(B, L, V, generator=g, dtype=torch.float64)
    t = 3 * torch.randn(B, L, V, generator=g, dtype=torch.float64)
    y = torch.randint(0, V, (B, L), generator=g)
    y[0, 3:] = -100
    y[2, 0] = -100
    return s, t, y


def test_stored_record_is_top_k_log_probs_and_exact_tail_mass():
    _, t, y = _batch()
    tg = topk_targets(t, y, 4, temperature=2.0)
    assert tg.values.dtype == torch.float16 and tg.indices.dtype == torch.int32 and tg.log_tail.dtype == torch.float32
    assert tg.row_lengths.tolist() == (y != -100).sum(1).tolist()
    for n, (b, i) in enumerate((y != -100).nonzero().tolist()):
        p = torch.softmax(t[b, i] / 2.0, -1)
        order = torch.argsort(p, descending=True)
        assert tg.indices[n].tolist() == order[:4].tolist()
        np.testing.assert_allclose(tg.values[n].double().exp().numpy(), p[order[:4]].numpy(), rtol=2e-3)
        assert math.exp(tg.log_tail[n]) == pytest.approx(float(p[order[4:]].sum()), rel=1e-5)


def _bucket_reference(s, t, y, k, div, T=1.0, beta=0.5, skew=0.1):
    """The (k + 1)-bucket divergence written out with explicit top-k sets, per token, averaged."""
    from tests.test_lm_losses import _ref_token

    vals = []
    for b, i in (y != -100).nonzero().tolist():
        p = torch.softmax(t[b, i] / T, -1)
        q = torch.softmax(s[b, i] / T, -1)
        top = torch.argsort(p, descending=True)[:k]
        rest = torch.ones(V, dtype=torch.bool)
        rest[top] = False
        pb = torch.cat([p[top], p[rest].sum()[None]]).numpy()
        qb = torch.cat([q[top], q[rest].sum()[None]]).numpy()
        vals.append(T * T * _ref_token(pb, qb, div, beta, skew))
    return float(np.mean(vals))


@pytest.mark.parametrize("div", DIVERGENCES)
def test_bucket_loss_matches_explicit_reference(div):
    s, t, y = _batch(1)
    tg = topk_targets(t, y, 5, temperature=1.5, value_dtype="float32")
    got = sparse_kd_loss(s, y, tg, divergence=div, beta=0.3, skew=0.2, chunk_size=3).item()
    assert got == pytest.approx(_bucket_reference(s, t, y, 5, div, 1.5, 0.3, 0.2), rel=1e-5)
    # float16 values: the same up to half-precision rounding of the stored log-probabilities.
    got16 = sparse_kd_loss(s, y, topk_targets(t, y, 5, temperature=1.5), divergence=div, beta=0.3, skew=0.2).item()
    assert got16 == pytest.approx(got, rel=5e-3, abs=1e-4)


@pytest.mark.parametrize("div", DIVERGENCES)
def test_k_equal_to_vocab_is_the_full_loss(div):
    s, t, y = _batch(2)
    s = s.float().requires_grad_(True)
    t = t.float()
    tg = topk_targets(t, y, V, value_dtype="float32", temperature=2.0)
    assert torch.all(tg.log_tail == float("-inf"))  # nothing outside the top V
    got = sparse_distill_loss(s, y, tg, divergence=div, alpha=0.6, chunk_size=4)
    (g,) = torch.autograd.grad(got.loss, s)
    ref = lm_distill_loss(s, t, y, divergence=div, alpha=0.6, temperature=2.0, chunk_size=None)
    (g_ref,) = torch.autograd.grad(ref.loss, s)
    assert got.loss.item() == pytest.approx(ref.loss.item(), rel=1e-5)
    assert got.ce.item() == pytest.approx(ref.ce.item(), rel=1e-6)
    assert torch.isfinite(g).all()
    _close(g, g_ref, rtol=1e-4, atol=1e-7)


def test_chain_rule_missing_mass_bucket():
    # Full forward KL = bucket KL + r * KL(teacher tail | student tail), with the tails renormalised.
    s, t, y = _batch(3)
    k = 3
    tg = topk_targets(t, y, k, value_dtype="float32")
    bucket = sparse_kd_loss(s, y, tg).item()
    full, tail_terms = [], []
    for b, i in (y != -100).nonzero().tolist():
        p, q = torch.softmax(t[b, i], -1), torch.softmax(s[b, i], -1)
        rest = torch.ones(V, dtype=torch.bool)
        rest[torch.argsort(p, descending=True)[:k]] = False
        r, qr = p[rest].sum(), q[rest].sum()
        full.append(float((p * (p / q).log()).sum()))
        pt, qt = p[rest] / r, q[rest] / qr
        tail_terms.append(float(r * (pt * (pt / qt).log()).sum()))
    assert bucket == pytest.approx(np.mean(full) - np.mean(tail_terms), rel=1e-5)
    assert bucket < np.mean(full)  # a lower bound on the full forward KL


def test_student_matching_teacher_top_k_and_tail_mass_has_zero_loss():
    # Only the top-k probabilities and the tail *mass* matter: any tail shape with the right mass gives 0.
    _, t, y = _batch(4)
    tg = topk_targets(t, y, 4, value_dtype="float32")
    s = torch.zeros_like(t)
    for n, (b, i) in enumerate((y != -100).nonzero().tolist()):
        p = torch.softmax(t[b, i], -1)
        top = tg.indices[n].long()
        rest = torch.ones(V, dtype=torch.bool)
        rest[top] = False
        q = torch.zeros(V, dtype=torch.float64)
        q[top] = p[top]
        shape = torch.rand(int(rest.sum()), dtype=torch.float64) + 0.1  # a different tail shape
        q[rest] = p[rest].sum() * shape / shape.sum()
        s[b, i] = q.log()
    for div in DIVERGENCES:
        assert sparse_kd_loss(s, y, tg, divergence=div).item() == pytest.approx(0.0, abs=1e-6)
    # Dropping the tail mass instead (the student puts none outside the top k) is penalised.
    s2 = s.clone()
    for n, (b, i) in enumerate((y != -100).nonzero().tolist()):
        rest = torch.ones(V, dtype=torch.bool)
        rest[tg.indices[n].long()] = False
        s2[b, i, rest] = -30.0
    assert sparse_kd_loss(s2, y, tg).item() > 0.01


def test_truncation_kl_is_exact_kl_to_uniform_tail_reconstruction():
    _, t, y = _batch(5)
    k = 4
    tg = topk_targets(t, y, k)
    got = truncation_kl(t, y, tg, chunk_size=2)
    for n, (b, i) in enumerate((y != -100).nonzero().tolist()):
        p = torch.softmax(t[b, i], -1)
        top = tg.indices[n].long()
        stored = tg.values[n].double().exp()
        tail = math.exp(float(tg.log_tail[n]))
        z = stored.sum() + tail  # the fp16 values renormalised with the tail
        p_hat = torch.full((V,), tail / z / (V - k), dtype=torch.float64)
        p_hat[top] = stored / z
        assert float(got[n]) == pytest.approx(float((p * (p / p_hat).log()).sum()), rel=1e-4, abs=1e-7)
    assert torch.all(got > 0)
    exact = truncation_kl(t, y, topk_targets(t, y, V, value_dtype="float32"))
    assert exact.abs().max() < 1e-6  # k = V: nothing lost
    # More tokens kept, less lost.
    kls = [truncation_kl(t, y, topk_targets(t, y, kk, value_dtype="float32")).mean().item() for kk in (1, 4, 12)]
    assert kls[0] > kls[1] > kls[2]


def test_masked_positions_change_nothing():
    s, t, y = _batch(6)
    tg = topk_targets(t, y, 4)
    masked = y == -100
    s2 = s.clone()
    s2[masked] = 100 * torch.randn(int(masked.sum()), V, dtype=s.dtype)
    t2 = t.clone()
    t2[masked] = 0
    assert sparse_kd_loss(s2, y, topk_targets(t2, y, 4)).item() == sparse_kd_loss(s, y, tg).item()


def test_storage_arithmetic():
    assert storage_bytes(10 ** 6, 1) == 10_000_000
    assert storage_bytes(10 ** 6, 32) == 10 ** 6 * (32 * 2 + 32 * 4 + 4) == 196_000_000
    assert storage_bytes(10, 8, "float32") == 10 * (8 * 8 + 4)
    assert dense_storage_bytes(10 ** 6, 32_000) == 64_000_000_000
    _, t, y = _batch(7)
    tg = topk_targets(t, y, 6)
    assert tg.nbytes == storage_bytes(int((y != -100).sum()), 6)


def test_bad_inputs_are_one_line_errors(tmp_path):
    s, t, y = _batch(10)
    with pytest.raises(KdkitError, match=r"k must be an integer in \[1, 17\]"):
        topk_targets(t, y, V + 1)
    tg = topk_targets(t, y, 3)
    with pytest.raises(KdkitError, match="record has vocabulary size 17"):
        sparse_kd_loss(s[..., :-1], y, tg)
    y2 = y.clone()
    y2[0, 0] = -100
    with pytest.raises(KdkitError, match="holds .* tokens for this batch but its labels predict"):
        sparse_kd_loss(s, y2, tg)

