"""The registered KD method: alpha weighting, unlabelled batches, regression matching."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdkit.losses import kd_loss
from kdkit.methods import METHODS
from kdkit.teacher import Teacher


def _pair(out=3):
    torch.manual_seed(0)
    return nn.Linear(4, out), Teacher(nn.Linear(4, out))


def test_alpha_zero_equals_cross_entropy():
    student, teacher = _pair()
    batch = {"x": torch.randn(6, 4), "y": torch.tensor([0, 1, 2, 0, 1, 2])}
    out = METHODS.get("kd")(student, teacher, temperature=4.0, alpha=0.0)(batch)
    assert out["loss"].item() == pytest.approx(F.cross_entropy(student(batch["x"]), batch["y"]).item(), rel=1e-6)


def test_alpha_mixes_kd_and_ce():
    student, teacher = _pair()
    batch = {"x": torch.randn(6, 4), "y": torch.tensor([0, 1, 2, 0, 1, 2])}
    out = METHODS.get("kd")(student, teacher, temperature=2.0, alpha=0.7)(batch)
    s, t = student(batch["x"]), teacher.model(batch["x"])
    expected = 0.7 * kd_loss(s, t, 2.0) + 0.3 * F.cross_entropy(s, batch["y"])
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert set(out) >= {"loss", "kd", "ce", "logits"}


def test_no_labels_uses_soft_targets_only():
    student, teacher = _pair()
    batch = {"x": torch.randn(5, 4)}
    out = METHODS.get("kd")(student, teacher, temperature=3.0, alpha=0.5)(batch)
    assert "ce" not in out
    assert out["loss"].item() == pytest.approx(kd_loss(student(batch["x"]), teacher.model(batch["x"]), 3.0).item(),
                                               rel=1e-6)


def test_teacher_is_not_trained():
    student, teacher = _pair()
    method = METHODS.get("kd")(student, teacher)
    ids = {id(p) for p in method.parameters()}
    assert all(id(p) not in ids for p in teacher.model.parameters())
    assert not teacher.model.training
    method.train()
    assert not teacher.model.training


def test_mse_method_for_regression_teacher():
    student, teacher = _pair(out=2)
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    out = METHODS.get("mse")(student, teacher, alpha=0.25)({"x": x, "y": y})
    s = student(x)
    expected = 0.25 * F.mse_loss(s, teacher.model(x)) + 0.75 * F.mse_loss(s, y)
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("bad", [{"temperature": 0.0}, {"alpha": 1.5}])
def test_bad_options_are_rejected(bad):
    student, teacher = _pair()
    with pytest.raises(ValueError):
        METHODS.get("kd")(student, teacher, **bad)
