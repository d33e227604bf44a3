"""Reference values for the transformer losses (kdkit.losses_text), each computed here by explicit loops
over samples, heads and positions (math on Python floats), independent of the vectorised code."""

from __future__ import annotations

import math

import pytest
import torch

from kdkit.losses_text import (
    attention_kl_loss,
    masked_cosine_loss,
    masked_hidden_mse,
    minilm_loss,
    value_relation_loss,
)

MASK = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)  # B=3, L=5


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _real_positions(mask):
    return [(b, i) for b in range(mask.shape[0]) for i in range(mask.shape[1]) if mask[b, i]]


def _ref_mse(s, t, mask):
    total, n = 0.0, 0
    for b, i in _real_positions(mask):
        for d in range(s.shape[2]):
            total += (float(s[b, i, d]) - float(t[b, i, d])) ** 2
            n += 1
    return total / n


def _ref_cos(s, t, mask):
    vals = []
    for b, i in _real_positions(mask):
        u, v = s[b, i].tolist(), t[b, i].tolist()
        dot = sum(a * c for a, c in zip(u, v))
        nu, nv = math.sqrt(sum(a * a for a in u)), math.sqrt(sum(c * c for c in v))
        vals.append(1.0 - dot / (nu * nv))
    return sum(vals) / len(vals)


def _ref_probs(a, c, mask, b, h, i, heads):
    """softmax over the real keys j of a_h[b, i] · c_h[b, j] / sqrt(d), as a dict j -> probability."""
    d = a.shape[2] // heads
    sl = slice(h * d, (h + 1) * d)
    keys = [j for j in range(mask.shape[1]) if mask[b, j]]
    scores = {j: sum(x * y for x, y in zip(a[b, i, sl].tolist(), c[b, j, sl].tolist())) / math.sqrt(d) for j in keys}
    top = max(scores.values())
    z = sum(math.exp(v - top) for v in scores.values())
    return {j: math.exp(v - top) / z for j, v in scores.items()}


def _ref_kl(sa, sc, ta, tc, mask, s_heads, t_heads):
    vals = []
    for h in range(s_heads):
        for b, i in _real_positions(mask):
            ps = _ref_probs(sa, sc, mask, b, h, i, s_heads)
            pt = _ref_probs(ta, tc, mask, b, h, i, t_heads)
            vals.append(sum(pt[j] * (math.log(pt[j]) - math.log(ps[j])) for j in pt))
    return sum(vals) / len(vals)


def _with_garbage_in_padding(x, mask, value=1e3):
    """x with huge values where padded: a masked loss must not change."""
    return torch.where(mask.unsqueeze(-1), x, torch.full_like(x, value))


def test_hidden_mse_matches_loop_and_ignores_padding():
    s, t = _rand(3, 5, 4, seed=1), _rand(3, 5, 4, seed=2)
    got = masked_hidden_mse(s, t, MASK)
    assert got.item() == pytest.approx(_ref_mse(s, t, MASK), rel=1e-12)
    assert masked_hidden_mse(_with_garbage_in_padding(s, MASK), t, MASK).item() == pytest.approx(got.item(), rel=1e-12)
    assert masked_hidden_mse(s, t, torch.zeros(3, 5, dtype=torch.bool)).item() == 0.0


def test_cosine_matches_loop_and_ignores_padding():
    s, t = _rand(3, 5, 6, seed=3), _rand(3, 5, 6, seed=4)
    got = masked_cosine_loss(s, t, MASK)
    assert got.item() == pytest.approx(_ref_cos(s, t, MASK), rel=1e-12)
    assert masked_cosine_loss(_with_garbage_in_padding(s, MASK), t, MASK).item() == pytest.approx(got.item())
    assert masked_cosine_loss(2.5 * t, t, MASK).item() == pytest.approx(0.0, abs=1e-12)  # direction only
    assert masked_cosine_loss(-t, t, MASK).item() == pytest.approx(2.0)


def test_attention_kl_matches_loop_with_different_widths():
    # student 2 heads of width 3, teacher 2 heads of width 4
    sq, sk = _rand(3, 5, 6, seed=5), _rand(3, 5, 6, seed=6)
    tq, tk = _rand(3, 5, 8, seed=7), _rand(3, 5, 8, seed=8)
    got = attention_kl_loss(sq, sk, tq, tk, MASK, 2, 2)
    assert got.item() == pytest.approx(_ref_kl(sq, sk, tq, tk, MASK, 2, 2), rel=1e-10)
    # padded keys and queries never contribute, whatever their values
    g = [_with_garbage_in_padding(v, MASK, 50.0) for v in (sq, sk, tq, tk)]
    assert attention_kl_loss(*g, MASK, 2, 2).item() == pytest.approx(got.item(), rel=1e-10)
    assert attention_kl_loss(tq, tk, tq, tk, MASK, 2, 2).item() == pytest.approx(0.0, abs=1e-12)


def test_attention_kl_gradient_is_finite_with_padding():
    sq = _rand(3, 5, 6, seed=9).requires_grad_(True)
    loss = attention_kl_loss(sq, _rand(3, 5, 6, seed=10), _rand(3, 5, 6, seed=11), _rand(3, 5, 6, seed=12), MASK, 3, 3)
    loss.backward()
    assert torch.isfinite(sq.grad).all()
    # padded query rows get no gradient through the student's queries
    assert (sq.grad[~MASK] == 0).all() and sq.grad[MASK].abs().sum() > 0


def test_head_counts_must_match_unless_relation_heads():
    sq, tq = _rand(3, 5, 6, seed=13), _rand(3, 5, 8, seed=14)
    with pytest.raises(ValueError, match="3 attention heads and the teacher 2"):
        attention_kl_loss(sq, sq, tq, tq, MASK, 3, 2)
    # MiniLMv2 relation heads: both re-split into 2 heads
    got = attention_kl_loss(sq, sq, tq, tq, MASK, 3, 2, relation_heads=2)
    assert got.item() == pytest.approx(_ref_kl(sq, sq, tq, tq, MASK, 2, 2), rel=1e-10)


def test_value_relation_and_minilm_match_loop():
    sq, sk, sv = (_rand(3, 5, 6, seed=s) for s in (20, 21, 22))
    tq, tk, tv = (_rand(3, 5, 4, seed=s) for s in (23, 24, 25))
    vr = value_relation_loss(sv, tv, MASK, 2, 2)
    ref_vr = _ref_kl(sv, sv, tv, tv, MASK, 2, 2)
    assert vr.item() == pytest.approx(ref_vr, rel=1e-10)
    total = minilm_loss((sq, sk, sv), (tq, tk, tv), MASK, 2, 2)
    assert total.item() == pytest.approx(_ref_kl(sq, sk, tq, tk, MASK, 2, 2) + ref_vr, rel=1e-10)


def test_shape_errors_name_the_shapes():
    with pytest.raises(ValueError, match="project the student"):
        masked_hidden_mse(_rand(2, 3, 4), _rand(2, 3, 5), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask has shape"):
        masked_hidden_mse(_rand(2, 3, 4), _rand(2, 3, 4), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="cannot be split into 4 heads"):
        attention_kl_loss(_rand(2, 3, 6), _rand(2, 3, 6), _rand(2, 3, 6), _rand(2, 3, 6),
                          torch.ones(2, 3, dtype=torch.bool), 4, 4)
