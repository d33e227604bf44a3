"""combo: methods combined by weights, parts logged separately, one forward per step for the parts that share it."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import kdkit
from kdkit.errors import KdkitError
from kdkit.methods import METHODS
from kdkit.methods.base import MethodContext
from kdkit.methods.build import build_method
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


def _cnn_pair():
    torch.manual_seed(0)
    student = create_model("cnn_small", num_classes=4, input_shape=(1, 12, 12), width=4)
    teacher = Teacher(create_model("cnn_small", num_classes=4, input_shape=(1, 12, 12), width=8))
    batch = {"x": torch.randn(8, 1, 12, 12), "y": torch.randint(0, 4, (8,))}
    return student, teacher, batch


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_parts_share_one_forward_of_each_network_through_handles_removed_after():
    student, teacher, batch = _cnn_pair()
    s_counter, t_counter = Counting(student.features[0]), Counting(teacher.model.features[0])
    student.features[0], teacher.model.features[0] = s_counter, t_counter
    parts = {"fit": {"name": "fitnets", "weight": 0.5, "student_layer": "features.1", "teacher_layer": "features.1"},
             "at": {"weight": 2.0}, "sp": {"weight": 0.1}}
    combo = build_method("combo", student, teacher, {"parts": parts}, example_batch=batch)
    # the union of the parts' layers, declared once
    declared = [n for part in combo.parts.values() for n in part.student_layers]
    assert combo.student_layers == list(dict.fromkeys(declared)) and "head:input" in combo.student_layers
    assert combo.reads_teacher_features and combo.shared == ["fit", "at", "sp"]
    s_counter.calls = t_counter.calls = 0
    out = combo(batch)
    assert s_counter.calls == 1 and t_counter.calls == 1  # was one student pass per part before sharing
    assert _hook_count(student) == 0 and _hook_count(teacher.model) == 0  # nothing left on the networks
    assert "forward" not in student.__dict__ and "forward" not in teacher.model.__dict__  # no monkeypatching
    # the same numbers as each part alone (same connectors), each running its own forward
    alone = {label: part(batch) for label, part in combo.parts.items()}
    assert s_counter.calls == 4
    expected = sum(combo.weights[k] * alone[k]["loss"] for k in parts)
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    for label in parts:
        assert out[f"{label}.loss"].item() == pytest.approx(alone[label]["loss"].item(), rel=1e-5)
    g_combo = torch.autograd.grad(out["loss"], list(student.parameters()))
    g_sum = torch.autograd.grad(expected, list(student.parameters()))
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-5) for a, b in zip(g_combo, g_sum))  # gradients ~40


def test_logit_parts_share_the_forward_with_feature_parts():
    """kd, dkd and dist compute their loss from the shared outputs: kd + dkd + fitnets is one student pass."""
    student, teacher, batch = _cnn_pair()
    counter = Counting(student.features[0])
    student.features[0] = counter
    parts = {"kd": {"weight": 1.0}, "dkd": {"weight": 0.5}, "dist": {"weight": 0.5},
             "fit": {"name": "fitnets", "weight": 0.1, "student_layer": "features.1", "teacher_layer": "features.1"}}
    combo = build_method("combo", student, teacher, {"parts": parts}, example_batch=batch)
    assert sorted(combo.shared) == ["dist", "dkd", "fit", "kd"]
    counter.calls = 0
    out = combo(batch)
    assert counter.calls == 1
    alone = {label: part(batch) for label, part in combo.parts.items()}
    expected = sum(combo.weights[k] * alone[k]["loss"] for k in parts)
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_share_forward_false_runs_each_part_alone():
    student, teacher, batch = _cnn_pair()
    counter = Counting(student.features[0])
    student.features[0] = counter
    parts = {"at": {}, "sp": {}}
    combo = build_method("combo", student, teacher, {"parts": parts, "share_forward": False}, example_batch=batch)
    counter.calls = 0
    combo(batch)
    assert combo.shared == [] and counter.calls == 2


def test_combo_with_a_feature_part_matches_the_part_alone():
    torch.manual_seed(0)
    student = create_model("cnn_small", num_classes=4, input_shape=(1, 12, 12), width=4)
    teacher = Teacher(create_model("cnn_small", num_classes=4, input_shape=(1, 12, 12), width=8))
    batch = {"x": torch.randn(8, 1, 12, 12), "y": torch.randint(0, 4, (8,))}
    counter = Counting(student.features[0])
    student.features[0] = counter
    parts = {"kd": {"weight": 1.0}, "fit": {"name": "fitnets", "weight": 0.5, "student_layer": "features.1",
                                            "teacher_layer": "features.1"}}
    combo = METHODS.get("combo")(student, teacher, parts=parts, context=MethodContext(student, teacher, batch))
    counter.calls = 0
    out = combo(batch)
    assert counter.calls == 1 + (not combo.parts["kd"].shares_forward)  # kd shares once it computes from Outputs
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
    with pytest.raises(KdkitError, match="combo part 'kd': weight must be a number >= 0; given 'x'"):
        METHODS.get("combo")(student, teacher, parts={"kd": {"weight": "x"}})
    with pytest.raises(KdkitError, match=r"combo part 'kd' \(kd\): option temperature must be a number; given 'hot'"):
        METHODS.get("combo")(student, teacher, parts={"kd": {"temperature": "hot"}})


def test_combo_from_config_logs_every_part(tmp_path, teacher_run):
    cfg = tiny_config(tmp_path / "combo", student={"name": "mlp", "hidden": [16]},
                      teacher={"checkpoint": str(teacher_run)},
                      method={"name": "combo", "parts": {"kd": {"weight": 1.0, "temperature": 4},
                                                         "mse": {"weight": 0.5}}})
    cfg["train"]["epochs"] = 1
    kdkit.run_config(kdkit.load_config(cfg), "distill")
    record = json.loads((tmp_path / "combo" / "metrics.jsonl").read_text().splitlines()[0])
    assert {"train_kd.kd", "train_kd.ce", "train_mse.match", "train_loss"} <= set(record)
