"""The KD loss against values computed by hand and by independent formulas."""

import math

import pytest
import torch
import torch.nn.functional as F

from kdkit.losses import kd_loss, masked_cross_entropy


def _kl_by_hand(p, q):
    """KL(p || q) for two probability lists."""
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def test_kd_loss_matches_hand_computation():
    s = torch.tensor([[1.0, 2.0, 3.0]])
    t = torch.tensor([[3.0, 1.0, 0.0]])
    T = 2.0
    soft = lambda z: [math.exp(v / T) / sum(math.exp(u / T) for u in z) for v in z]  # noqa: E731
    expected = T * T * _kl_by_hand(soft([3.0, 1.0, 0.0]), soft([1.0, 2.0, 3.0]))
    assert kd_loss(s, t, T).item() == pytest.approx(expected, rel=1e-6)


def test_t1_equals_plain_kl_batchmean():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    p_t, p_s = t.softmax(1), s.softmax(1)
    plain = (p_t * (p_t.log() - p_s.log())).sum(1).mean()  # summed over classes, averaged over the batch
    assert kd_loss(s, t, 1.0).item() == pytest.approx(plain.item(), rel=1e-6)


def test_t_squared_scaling():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    T = 3.0
    unscaled = F.kl_div((s / T).log_softmax(1), (t / T).softmax(1), reduction="sum") / 4
    assert kd_loss(s, t, T).item() == pytest.approx(T * T * unscaled.item(), rel=1e-6)


def test_kd_is_zero_for_identical_logits_and_positive_otherwise():
    z = torch.randn(3, 4)
    assert kd_loss(z, z, 4.0).item() == pytest.approx(0.0, abs=1e-7)
    assert kd_loss(z, z.flip(1), 4.0).item() > 0


def test_batchmean_not_mean():
    """Averaging over classes too (reduction='mean') would divide by C: the loss must not depend on that."""
    s, t = torch.randn(2, 10), torch.randn(2, 10)
    by_sample = [kd_loss(s[i:i + 1], t[i:i + 1], 1.0).item() for i in range(2)]
    assert kd_loss(s, t, 1.0).item() == pytest.approx(sum(by_sample) / 2, rel=1e-6)


def test_masked_cross_entropy_skips_unlabelled():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [5.0, -5.0]])
    labels = torch.tensor([0, -1, 1])
    expected = (F.cross_entropy(logits[0:1], labels[0:1]) + F.cross_entropy(logits[2:3], labels[2:3])) / 2
    assert masked_cross_entropy(logits, labels).item() == pytest.approx(expected.item(), rel=1e-6)
    assert masked_cross_entropy(logits, torch.full((3,), -1)).item() == 0.0
