"""combo: methods combined by weights, parts logged separately, one student forward per step."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import kdkit
from kdkit.errors import KdkitError
from kdkit.methods import METHODS
from kdkit.methods.combo import shared_forward
from kdkit.models import create_model
from kdkit.teacher import Teacher


def tiny_config(out_dir, **sections):
    """A digits config small enough to train in a second or two (as tests/conftest.py's helper)."""
    cfg = {"seed": 0, "out_dir": str(out_dir), "data": {"name": "digits", "batch_size": 64, "train_subset": 256},
           "train": {"epochs": 2, "lr": 0.01, "progress": False}}
    cfg.update(sections)
    return cfg


class Counting(nn.Module):
    """Wraps a layer and counts how often its forward really runs."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


def _mlp_pair():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Flatten(), Counting(nn.Linear(8, 16)), nn.ReLU(), nn.Linear(16, 3))
    teacher = Teacher(nn.Sequential(nn.Flatten(), nn.Linear(8, 3)))
    batch = {"x": torch.randn(10, 8), "y": torch.randint(0, 3, (10,))}
    return student, teacher, batch


def test_combo_equals_weighted_sum_of_parts_computed_separately():
    student, teacher, batch = _mlp_pair()
    parts = {"kd": {"weight": 1.0, "temperature": 2.0, "alpha": 0.7}, "mse": {"weight": 0.5, "alpha": 0.3}}
    combo = METHODS.get("combo")(student, teacher, parts=parts)
    out = combo(batch)
    kd = METHODS.get("kd")(student, teacher, temperature=2.0, alpha=0.7)(batch)
    mse = METHODS.get("mse")(student, teacher, alpha=0.3)(batch)
    expected = 1.0 * kd["loss"] + 0.5 * mse["loss"]
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    # every part logged under a prefixed name, with the part's own value
    assert out["kd.kd"].item() == pytest.approx(kd["kd"].item(), rel=1e-6)
    assert out["kd.ce"].item() == pytest.approx(kd["ce"].item(), rel=1e-6)
    assert out["mse.match"].item() == pytest.approx(mse["match"].item(), rel=1e-6)
    assert out["mse.loss"].item() == pytest.approx(mse["loss"].item(), rel=1e-6)
    # and the gradient is the gradient of the weighted sum
    g_combo = torch.autograd.grad(out["loss"], list(student.parameters()))
    g_sum = torch.autograd.grad(expected, list(student.parameters()))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g_combo, g_sum))


def test_student_forward_runs_once_for_all_parts():
    student, teacher, batch = _mlp_pair()
    parts = {"kd": {"weight": 1.0}, "mse": {"weight": 1.0}}
    counter = student[1]
    METHODS.get("combo")(student, teacher, parts=parts)(batch)
    assert counter.calls == 1
    counter.calls = 0
    METHODS.get("combo")(student, teacher, parts=parts, share_forward=False)(batch)
    assert counter.calls == 2
    assert "forward" not in student.__dict__  # the sharing is undone after the step


def test_shared_forward_replays_hooks_of_later_callers():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    x = torch.randn(3, 4)
    seen = []
    with shared_forward([net]):
        first = net(x)
        handle = net[1].register_forward_hook(lambda m, i, o: seen.append(o))
        second = net(x)
        handle.remove()
        third = net(x + 1)  # another input: a real forward
    assert second is first and len(seen) == 1
    assert torch.equal(seen[0], torch.relu(net[0](x)))
    assert not torch.equal(third, first)


def test_combo_with_a_feature_part_matches_the_part_alone():
    torch.manual_seed(0)
    student = create_model("cnn_small", num_classes=4, input_shape=(1, 12, 12), width=4)
    teacher = Teacher(create_model("cnn_small", num_classes=4, input_shape=(1, 12, 12), width=8))
    batch = {"x": torch.randn(8, 1, 12, 12), "y": torch.randint(0, 4, (8,))}
    counter = Counting(student.features[0])
    student.features[0] = counter
    parts = {"kd": {"weight": 1.0}, "fit": {"name": "fitnets", "weight": 0.5, "student_layer": "features.1",
                                            "teacher_layer": "features.1"}}
    combo = METHODS.get("combo")(student, teacher, parts=parts, example_batch=batch)
    counter.calls = 0
    out = combo(batch)
    assert counter.calls == 1  # kd and fitnets shared one student forward
    alone = combo.parts["fit"](batch)  # the same part (same connector), its own forward
    assert out["fit.loss"].item() == pytest.approx(alone["loss"].item(), rel=1e-5)
    assert any(k.startswith("fit.") and k != "fit.loss" for k in out)
    # connectors of the parts are parameters of the combination
    assert set(map(id, combo.parts["fit"].parameters())) <= set(map(id, combo.parameters()))


def test_combo_errors_name_the_part():
    student, teacher, _ = _mlp_pair()
    with pytest.raises(KdkitError, match="unknown method 'kdd'"):
        METHODS.get("combo")(student, teacher, parts={"kdd": {}})
    with pytest.raises(KdkitError, match="combo part 'kd'.*unknown option 'temp'"):
        METHODS.get("combo")(student, teacher, parts={"kd": {"temp": 3}})
    with pytest.raises(ValueError, match="parts"):
        METHODS.get("combo")(student, teacher, parts={})


def test_combo_from_config_logs_every_part(tmp_path, teacher_run):
    cfg = tiny_config(tmp_path / "combo", student={"name": "mlp", "hidden": [16]},
                      teacher={"checkpoint": str(teacher_run)},
                      method={"name": "combo", "parts": {"kd": {"weight": 1.0, "temperature": 4},
                                                         "mse": {"weight": 0.5}}})
    cfg["train"]["epochs"] = 1
    kdkit.run_config(kdkit.load_config(cfg), "distill")
    record = json.loads((tmp_path / "combo" / "metrics.jsonl").read_text().splitlines()[0])
    assert {"train_kd.kd", "train_kd.ce", "train_mse.match", "train_loss"} <= set(record)
