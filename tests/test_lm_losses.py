"""Token-level LM distillation losses (kdkit.lm.losses): reference values by explicit loops, torch.distributions
and scipy; masks; temperature; chunked == unchunked in value and gradient; JSD's limits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.spatial.distance import jensenshannon
from torch.distributions import Categorical, kl_divergence

from kdkit.errors import KdkitError
from kdkit.lm.losses import DIVERGENCES, jsd_tokens, lm_distill_loss, lm_kd_loss, next_token_cross_entropy


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-6, atol: float = 1e-9) -> None:
    """allclose with the worst difference in the message (torch.testing.assert_close imports torch.distributed:
    seconds on a loaded machine)."""
    assert a.shape == b.shape and torch.allclose(a, b, rtol=rtol, atol=atol), float((a - b).abs().max())


B, L, V = 3, 6, 13


def _batch(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    s = (2 * torch.randn(B, L, V, generator=g)).to(dtype)
    t = (2 * torch.randn(B, L, V, generator=g)).to(dtype)
    y = torch.randint(0, V, (B, L), generator=g)
    y[0, 4:] = -100  # padding at the end
    y[1, :2] = -100  # prompt tokens at the start
    y[2, -1] = -100  # last position predicts nothing
    return s, t, y


def _ref_token(p: np.ndarray, q: np.ndarray, div: str, beta=0.5, skew=0.1) -> float:
    """Divergence between teacher p and student q (1-D probability vectors), written out term by term."""
    if div == "forward_kl":
        return float(sum(pi * np.log(pi / qi) for pi, qi in zip(p, q)))
    if div == "reverse_kl":
        return float(sum(qi * np.log(qi / pi) for pi, qi in zip(p, q)))
    if div == "jsd":
        m = beta * p + (1 - beta) * q
        return float(beta * np.sum(p * np.log(p / m)) + (1 - beta) * np.sum(q * np.log(q / m)))
    if div == "skew_kl":
        m = skew * p + (1 - skew) * q
        return float(np.sum(p * np.log(p / m)))
    if div == "skew_reverse_kl":
        m = (1 - skew) * p + skew * q
        return float(np.sum(q * np.log(q / m)))
    if div == "tv":
        return float(0.5 * np.abs(p - q).sum())
    raise AssertionError(div)


def _ref_loss(s, t, y, div, temperature=1.0, beta=0.5, skew=0.1):
    """T² · mean over predicted tokens, by an explicit loop over (batch, position)."""
    vals = []
    for b in range(s.shape[0]):
        for i in range(s.shape[1]):
            if int(y[b, i]) == -100:
                continue
            p = torch.softmax(t[b, i].double() / temperature, -1).numpy()
            q = torch.softmax(s[b, i].double() / temperature, -1).numpy()
            vals.append(temperature ** 2 * _ref_token(p, q, div, beta, skew))
    return float(np.mean(vals))


@pytest.mark.parametrize("div", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_each_divergence_matches_explicit_loop(div, temperature):
    s, t, y = _batch()
    got = lm_kd_loss(s, t, y, divergence=div, temperature=temperature, beta=0.3, skew=0.2, chunk_size=4)
    want = _ref_loss(s, t, y, div, temperature, beta=0.3, skew=0.2)
    assert got.item() == pytest.approx(want, rel=1e-5, abs=1e-7)


def test_kls_match_torch_distributions_and_jsd_matches_scipy():
    s, t, y = _batch(1)
    mask = y != -100
    p, q = Categorical(logits=t[mask]), Categorical(logits=s[mask])
    fkl = lm_kd_loss(s, t, y, divergence="forward_kl").item()
    rkl = lm_kd_loss(s, t, y, divergence="reverse_kl").item()
    assert fkl == pytest.approx(kl_divergence(p, q).mean().item(), rel=1e-5)
    assert rkl == pytest.approx(kl_divergence(q, p).mean().item(), rel=1e-5)
    # scipy's Jensen-Shannon distance is the square root of JSD(0.5) (natural log by default).
    js = np.mean([jensenshannon(a, b) ** 2 for a, b in zip(p.probs.numpy(), q.probs.numpy())])
    assert lm_kd_loss(s, t, y, divergence="jsd", beta=0.5).item() == pytest.approx(js, rel=1e-5)


@pytest.mark.parametrize("div", DIVERGENCES)
def test_masked_positions_change_nothing(div):
    s, t, y = _batch(2)
    s.requires_grad_(True)
    out = lm_distill_loss(s, t, y, divergence=div, alpha=0.6, temperature=2.0, chunk_size=5)
    (g,) = torch.autograd.grad(out.loss, s)
    masked = y == -100
    assert torch.all(g[masked] == 0)  # padded / prompt positions get no gradient
    # Arbitrary logits where nothing is predicted: same value, same gradient.
    s2, t2 = s.detach().clone(), t.clone()
    s2[masked] = 1e3 * torch.randn(int(masked.sum()), V, dtype=s2.dtype)
    t2[masked] = -1e3
    s2.requires_grad_(True)
    out2 = lm_distill_loss(s2, t2, y, divergence=div, alpha=0.6, temperature=2.0, chunk_size=5)
    (g2,) = torch.autograd.grad(out2.loss, s2)
    assert out2.loss.item() == out.loss.item()
    assert torch.equal(g2[~masked], g[~masked])


def test_mean_is_per_token_not_per_sequence():
    # Two sequences with 4 and 1 predicted tokens: the loss is the mean over the 5 tokens.
    s, t, y = _batch(3)
    y[:] = -100
    y[0, :4] = 1
    y[1, 2] = 2
    per_token = []
    for b, i in [(0, 0), (0, 1), (0, 2), (0, 3), (1, 2)]:
        per_token.append(kl_divergence(Categorical(logits=t[b, i]), Categorical(logits=s[b, i])).item())
    assert lm_kd_loss(s, t, y).item() == pytest.approx(np.mean(per_token), rel=1e-6)
    # More padding columns appended: nothing changes.
    pad_s = torch.cat([s, torch.randn(B, 4, V, dtype=s.dtype)], 1)
    pad_t = torch.cat([t, torch.randn(B, 4, V, dtype=t.dtype)], 1)
    pad_y = torch.cat([y, torch.full((B, 4), -100)], 1)
    assert lm_kd_loss(pad_s, pad_t, pad_y).item() == lm_kd_loss(s, t, y).item()


@pytest.mark.parametrize("div", DIVERGENCES)
@pytest.mark.parametrize("chunk", [1, 3, 7, 1000, "auto"])
def test_chunked_equals_unchunked_value_and_gradient(div, chunk):
    s, t, y = _batch(4, dtype=torch.float32)
    s.requires_grad_(True)
    kw = dict(divergence=div, alpha=0.75, temperature=1.5, beta=0.4, skew=0.1)
    ref = lm_distill_loss(s, t, y, chunk_size=None, **kw)
    (g_ref,) = torch.autograd.grad(ref.loss, s)
    got = lm_distill_loss(s, t, y, chunk_size=chunk, **kw)
    (g,) = torch.autograd.grad(got.loss * 3.0, s)  # a non-unit upstream gradient is applied too
    assert got.loss.item() == pytest.approx(ref.loss.item(), rel=1e-6)
    assert got.kd.item() == pytest.approx(ref.kd.item(), rel=1e-6)
    assert got.ce.item() == pytest.approx(ref.ce.item(), rel=1e-6)
    _close(g, 3.0 * g_ref, rtol=1e-6, atol=1e-9)


def test_chunked_gradient_flows_through_a_model_and_teacher_gets_none():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, V)
    h = torch.randn(B, L, 8)
    _, t, y = _batch(5, dtype=torch.float32)
    t.requires_grad_(True)
    lm_kd_loss(head(h), t, y, divergence="jsd", chunk_size=2).backward()
    g_chunked = head.weight.grad.clone()
    head.weight.grad = None
    lm_kd_loss(head(h), t, y, divergence="jsd", chunk_size=None).backward()
    _close(g_chunked, head.weight.grad, rtol=1e-5, atol=1e-7)
    assert t.grad is None  # the teacher is a target


def test_low_precision_logits_are_computed_in_float32():
    s, t, y = _batch(6, dtype=torch.float32)
    sb = s.to(torch.bfloat16).requires_grad_(True)
    out = lm_kd_loss(sb, t.to(torch.bfloat16), y, chunk_size=4)
    out.backward()
    want = _ref_loss(sb.detach().float(), t.to(torch.bfloat16).float(), y, "forward_kl")
    assert out.item() == pytest.approx(want, rel=1e-5)
    assert sb.grad.dtype == torch.bfloat16


def test_mix_with_cross_entropy():
    s, t, y = _batch(7)
    ce = F.cross_entropy(s.reshape(-1, V), y.reshape(-1), ignore_index=-100).item()
    assert next_token_cross_entropy(s, y, chunk_size=5).item() == pytest.approx(ce, rel=1e-6)
    out = lm_distill_loss(s, t, y, divergence="reverse_kl", temperature=2.0, alpha=0.3, chunk_size=5)
    kd = _ref_loss(s, t, y, "reverse_kl", 2.0)
    assert out.kd.item() == pytest.approx(kd, rel=1e-5)
    assert out.ce.item() == pytest.approx(ce, rel=1e-5)  # cross-entropy at T = 1 whatever the KD temperature
    assert out.loss.item() == pytest.approx(0.3 * kd + 0.7 * ce, rel=1e-5)
    assert lm_distill_loss(s, t, y, alpha=0.0).loss.item() == pytest.approx(ce, rel=1e-5)


def test_temperature_softens_and_scales_by_t_squared():
    s, t, y = _batch(8)
    at1 = lm_kd_loss(s, t, y, temperature=1.0).item()
    at4 = lm_kd_loss(s, t, y, temperature=4.0).item()
    # At T = 4 the distributions are smoother: the KL itself shrinks, T² * KL is the reported value.
    kl_soft = _ref_loss(s / 4.0, t / 4.0, y, "forward_kl", 1.0)
    assert at4 == pytest.approx(16.0 * kl_soft, rel=1e-5)
    assert at4 != pytest.approx(at1, rel=1e-2)


def test_jsd_limits_are_the_two_kls():
    s, t, y = _batch(9)
    mask = y != -100
    log_q, log_p = F.log_softmax(s[mask], -1), F.log_softmax(t[mask], -1)
    fkl = kl_divergence(Categorical(logits=t[mask]), Categorical(logits=s[mask]))
    rkl = kl_divergence(Categorical(logits=s[mask]), Categorical(logits=t[mask]))
    eps = 1e-7  # float64: the O(beta) correction is far below the tolerance
    _close(jsd_tokens(log_q, log_p, eps) / eps, fkl, rtol=1e-4, atol=1e-8)  # beta -> 0
    _close(jsd_tokens(log_q, log_p, 1 - eps) / eps, rkl, rtol=1e-4, atol=1e-8)  # beta -> 1
    # Symmetry: JSD(beta)(p || q) = JSD(1 - beta)(q || p).
    _close(jsd_tokens(log_q, log_p, 0.2), jsd_tokens(log_p, log_q, 0.8))
    for beta in (0.0, 1.0):
        with pytest.raises(KdkitError, match="beta must be in"):
            lm_kd_loss(s, t, y, divergence="jsd", beta=beta)


def test_skew_zero_is_plain_kl():
    s, t, y = _batch(10)
    assert lm_kd_loss(s, t, y, divergence="skew_kl", skew=0.0).item() == pytest.approx(
        lm_kd_loss(s, t, y, divergence="forward_kl").item(), rel=1e-12)
    assert lm_kd_loss(s, t, y, divergence="skew_reverse_kl", skew=0.0).item() == pytest.approx(
        lm_kd_loss(s, t, y, divergence="reverse_kl").item(), rel=1e-12)


def test_nothing_predicted_is_zero_with_gradient_path():
    s, t, y = _batch(11, dtype=torch.float32)
    y[:] = -100
    for chunk in (None, 4):
        x = s.clone().requires_grad_(True)
        out = lm_distill_loss(x, t, y, alpha=0.5, chunk_size=chunk)
        out.loss.backward()
        assert out.loss.item() == 0.0 and out.kd.item() == 0.0
        assert torch.all(x.grad == 0)


def test_teacher_without_mass_on_some_tokens():
    # A teacher that rules tokens out (-inf logits): forward KL skips them (0 log 0 = 0), no NaN anywhere.
    s, t, y = _batch(12, dtype=torch.float32)
    t[..., :3] = float("-inf")
    s.requires_grad_(True)
    out = lm_kd_loss(s, t, y, chunk_size=3)
    out.backward()
    mask = y != -100
    p = torch.softmax(t[mask].double(), -1)
    lq = torch.log_softmax(s.detach()[mask].double(), -1)
    want = (p[:, 3:] * (p[:, 3:].log() - lq[:, 3:])).sum(-1).mean().item()
    assert out.item() == pytest.approx(want, rel=1e-5)
    assert torch.isfinite(s.grad).all()


def test_bad_inputs_are_one_line_errors():
    s, t, y = _batch(13)
    with pytest.raises(KdkitError, match="same .batch, length, vocab. shape"):
        lm_kd_loss(s, t[..., :-1], y)
    with pytest.raises(KdkitError, match="labels must be .batch, length."):
        lm_kd_loss(s, t, y[:, :-1])
    with pytest.raises(KdkitError, match="unknown LM divergence 'kl'"):
        lm_kd_loss(s, t, y, divergence="kl")
    bad = y.clone()
    bad[0, 0] = V
    with pytest.raises(KdkitError, match=r"token ids in \[0, 13\)"):
        lm_kd_loss(s, t, bad)
    with pytest.raises(KdkitError, match="chunk_size must be"):
        lm_kd_loss(s, t, y, chunk_size=0)
    with pytest.raises(KdkitError, match="temperature must be > 0"):
        lm_kd_loss(s, t, y, temperature=0.0)
    with pytest.raises(KdkitError, match="skew must be in"):
        lm_kd_loss(s, t, y, divergence="skew_kl", skew=1.0)
    with pytest.raises(KdkitError, match="alpha"):
        lm_distill_loss(s, t, y, alpha=1.5)
