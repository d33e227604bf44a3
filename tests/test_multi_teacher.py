"""Several teachers: ensemble weights, averaged soft targets, the Teacher contract, config and API paths."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import kdkit
from kdkit.errors import KdkitError
from kdkit.tasks import evaluate
from kdkit.teacher import EnsembleModel, Teacher, TeacherEnsemble, as_teacher, ensemble_weights


def tiny_config(out_dir, **sections):
    """A digits config small enough to train in a second or two (as tests/conftest.py's helper)."""
    cfg = {"seed": 0, "out_dir": str(out_dir), "data": {"name": "digits", "batch_size": 64, "train_subset": 256},
           "train": {"epochs": 2, "lr": 0.01, "progress": False}}
    cfg.update(sections)
    return cfg


# Two teachers on two classes with hand-picked softmax outputs:
#   teacher A: logits (0, 0)     -> p = (0.5, 0.5),  max 0.5,  H = ln 2
#   teacher B: logits (ln 3, 0)  -> p = (0.75, 0.25), max 0.75, H = -(0.75 ln 0.75 + 0.25 ln 0.25)
ZA = torch.tensor([[0.0, 0.0]])
ZB = torch.tensor([[math.log(3.0), 0.0]])


class Const(nn.Module):
    """A 'network' that outputs fixed logits for every input row (for hand-computed ensembles)."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.register_buffer("logits", logits)
        self.dummy = nn.Parameter(torch.zeros(()))  # so .parameters() is not empty

    def forward(self, x):
        return self.logits.expand(x.shape[0], -1) + 0 * self.dummy


def test_fixed_weights_are_the_normalised_prior():
    a = ensemble_weights([ZA, ZB], torch.tensor([1.0, 3.0]), "fixed")
    assert a.tolist() == [[0.25, 0.75]]


def test_max_prob_weights_by_hand():
    a = ensemble_weights([ZA, ZB], torch.tensor([1.0, 1.0]), "max_prob")
    assert a[0].tolist() == pytest.approx([0.5 / 1.25, 0.75 / 1.25], abs=1e-6)
    # a prior multiplies the confidence: (1*0.5, 2*0.75) / 2.0
    a = ensemble_weights([ZA, ZB], torch.tensor([1.0, 2.0]), "max_prob")
    assert a[0].tolist() == pytest.approx([0.25, 0.75], abs=1e-6)


def test_entropy_weights_by_hand():
    h_a = math.log(2.0)
    h_b = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    expected_b = math.exp(-h_b) / (math.exp(-h_a) + math.exp(-h_b))
    a = ensemble_weights([ZA, ZB], torch.tensor([1.0, 1.0]), "entropy")
    assert a[0, 1].item() == pytest.approx(expected_b, abs=1e-6)
    assert a[0, 1] > a[0, 0]  # the more confident teacher counts more


@pytest.mark.parametrize("weighting", ["fixed", "entropy", "max_prob"])
def test_confidence_weights_are_per_sample_distributions(weighting):
    torch.manual_seed(1)
    logits = [torch.randn(7, 5) * s for s in (0.5, 2.0, 4.0)]
    a = ensemble_weights(logits, torch.tensor([1.0, 2.0, 0.5]), weighting)
    assert a.shape == (7, 3)
    assert torch.all(a >= 0)
    assert torch.allclose(a.sum(dim=1), torch.ones(7), atol=1e-6)
    if weighting != "fixed":  # confidence weights really vary per sample
        assert not torch.allclose(a, a[:1].expand_as(a))


def test_averaged_soft_targets_by_hand():
    model = EnsembleModel([Const(ZA), Const(ZB)], weights=[1.0, 3.0], temperature=1.0)
    out = model(torch.zeros(1, 4))
    # 0.25 * (0.5, 0.5) + 0.75 * (0.75, 0.25) = (0.6875, 0.3125)
    assert out.softmax(-1)[0].tolist() == pytest.approx([0.6875, 0.3125], abs=1e-6)


@pytest.mark.parametrize("weighting", ["fixed", "entropy", "max_prob"])
def test_output_at_temperature_reproduces_weighted_soft_targets(weighting):
    torch.manual_seed(2)
    members = [nn.Linear(4, 6), nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 6))]
    model = EnsembleModel(members, weights=[2.0, 1.0], weighting=weighting, temperature=4.0)
    x = torch.randn(5, 4)
    zs = [m(x) for m in members]
    a = ensemble_weights(zs, torch.tensor([2.0, 1.0]), weighting)
    expected = sum(a[:, k:k + 1] * (zs[k] / 4.0).softmax(-1) for k in range(2))
    assert torch.allclose((model(x) / 4.0).softmax(-1), expected, atol=1e-6)


def test_logit_averaging():
    model = EnsembleModel([Const(ZA), Const(ZB)], weights=[1.0, 1.0], combine="logits")
    assert model(torch.zeros(2, 3))[0].tolist() == pytest.approx([math.log(3.0) / 2, 0.0], abs=1e-6)


def test_bad_ensemble_arguments():
    with pytest.raises(ValueError, match="weights"):
        EnsembleModel([Const(ZA), Const(ZB)], weights=[1.0])
    with pytest.raises(ValueError, match="weighting"):
        EnsembleModel([Const(ZA)], weighting="vote")


def test_ensemble_behaves_like_a_teacher():
    torch.manual_seed(3)
    t1, t2 = nn.Linear(4, 3), nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    ens = as_teacher([t1, t2])
    assert isinstance(ens, TeacherEnsemble) and isinstance(ens, Teacher)
    assert ens.members == [t1, t2]
    batch = {"x": torch.randn(6, 4), "y": torch.tensor([0, 1, 2, 0, 1, 2])}
    out = ens.to("cpu")(batch)
    assert out.shape == (6, 3) and not out.requires_grad
    assert all(not p.requires_grad for p in ens.model.parameters())
    metrics = evaluate(nn.Linear(4, 3), (batch["x"], batch["y"]), teacher=ens, measure_latency=False)
    assert 0.0 <= metrics["agreement"] <= 1.0


def test_distill_accepts_a_list_of_teachers():
    torch.manual_seed(4)
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    teachers = [nn.Linear(4, 3), nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))]
    student = nn.Linear(4, 3)
    before = student.weight.detach().clone()
    t_before = [p.detach().clone() for p in teachers[0].parameters()]
    run = kdkit.distill(teachers, student, (x, y), (x, y), epochs=1, progress=False, temperature=2.0)
    assert not torch.equal(before, run.student.weight)
    assert all(torch.equal(a, b) for a, b in zip(t_before, teachers[0].parameters()))  # teachers frozen
    assert "teacher" in run.metrics and "agreement" in run.metrics["student"]


@pytest.fixture(scope="module")
def mlp_teacher_run(tmp_path_factory):
    """A second teacher of another architecture (an MLP) on the same digits slice."""
    out = tmp_path_factory.mktemp("teacher_mlp") / "run"
    cfg = tiny_config(out, model={"name": "mlp", "hidden": [32]})
    kdkit.run_config(kdkit.load_config(cfg), "train")
    return out


def test_config_teachers_of_different_architectures(tmp_path, teacher_run, mlp_teacher_run):
    cfg = tiny_config(tmp_path / "ens", student={"name": "mlp", "hidden": [16]},
                      teachers=[{"checkpoint": str(teacher_run)}, {"checkpoint": str(mlp_teacher_run)}],
                      ensemble={"weighting": "entropy", "weights": [2.0, 1.0]},
                      method={"name": "kd", "temperature": 3.0})
    cfg["train"]["epochs"] = 1
    run = kdkit.run_config(kdkit.load_config(cfg), "distill")
    assert {"teacher", "student"} <= set(run.metrics)
    saved = kdkit.load_config(tmp_path / "ens" / "config.yaml")
    assert [t.name for t in saved.teachers] == ["cnn_small", "mlp"]  # architectures read from the runs
    again = kdkit.evaluate_run(tmp_path / "ens")
    assert again["teacher"]["accuracy"] == pytest.approx(run.metrics["teacher"]["accuracy"])


def test_config_teacher_errors(tmp_path, teacher_run):
    both = tiny_config(tmp_path / "a", student={"name": "mlp"}, teacher={"checkpoint": str(teacher_run)},
                       teachers=[{"checkpoint": str(teacher_run)}])
    with pytest.raises(KdkitError, match="either teacher"):
        kdkit.run_config(kdkit.load_config(both), "distill")
    mismatch = tiny_config(tmp_path / "b", student={"name": "mlp"}, ensemble={"weights": [1.0]},
                           teachers=[{"checkpoint": str(teacher_run)}, {"checkpoint": str(teacher_run)}])
    with pytest.raises(KdkitError, match="ensemble.weights"):
        kdkit.run_config(kdkit.load_config(mismatch), "distill")
    unknown = tiny_config(tmp_path / "c", student={"name": "mlp"}, ensemble={"weighting": "vote"},
                          teachers=[{"checkpoint": str(teacher_run)}])
    with pytest.raises(KdkitError, match="weighting"):
        kdkit.load_config(unknown)
