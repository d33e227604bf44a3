"""Self-distillation (byot, born-again) and mutual learning (dml)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kdkit
from kdkit.cli import run as cli_run
from kdkit.methods import METHODS
from kdkit.methods.byot import self_distillation_loss
from kdkit.methods.dml import mutual_loss
from kdkit.models import create_model
from kdkit.recipes.born_again import born_again
from kdkit.training.checkpoint import read_tensors


def tiny_config(out_dir, **sections):
    """A digits config small enough to train in a second or two (as tests/conftest.py's helper)."""
    cfg = {"seed": 0, "out_dir": str(out_dir), "data": {"name": "digits", "batch_size": 64, "train_subset": 256},
           "train": {"epochs": 2, "lr": 0.01, "progress": False}}
    cfg.update(sections)
    return cfg


def _kl(p, q):
    """KL(p || q) per row, summed over classes, averaged over rows: the textbook formula."""
    return (p * (p.log() - q.log())).sum(dim=1).mean()


def _images(n=16, classes=4):
    torch.manual_seed(0)
    return {"x": torch.randn(n, 1, 12, 12), "y": torch.randint(0, classes, (n,))}


# ----------------------------------------------------------------------------- mutual learning

def test_mutual_loss_matches_the_paper_formula():
    torch.manual_seed(0)
    z1, z2 = torch.randn(5, 3), torch.randn(5, 3)
    y = torch.tensor([0, 1, 2, 1, 0])
    p1, p2 = z1.softmax(1), z2.softmax(1)
    expected = (F.cross_entropy(z1, y) + _kl(p2, p1)) + (F.cross_entropy(z2, y) + _kl(p1, p2))
    out = mutual_loss([z1, z2], y, temperature=1.0)
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_each_peer_gets_only_its_own_gradient():
    torch.manual_seed(0)
    z1, z2, z3 = (torch.randn(4, 3, requires_grad=True) for _ in range(3))
    y = torch.tensor([0, 1, 2, 1])
    mutual_loss([z1, z2, z3], y)["loss"].backward()
    own = F.cross_entropy(z1, y) + (_kl(z2.softmax(1).detach(), z1.softmax(1))
                                    + _kl(z3.softmax(1).detach(), z1.softmax(1))) / 2
    (g,) = torch.autograd.grad(own, z1)
    assert torch.allclose(z1.grad, g, atol=1e-6)


def test_dml_trains_every_peer_with_one_optimiser():
    batch = _images()
    student = create_model("cnn_small", num_classes=4, input_shape=(1, 12, 12), width=4)
    method = METHODS.get("dml")(student, None,
                                peers=[create_model("mlp", num_classes=4, input_shape=(1, 12, 12), hidden=[8]),
                                       "linear"],
                                example_batch=batch)
    assert method.student is student and len(method.models) == 3
    assert METHODS.get("dml").needs_teacher is False
    before = [[p.detach().clone() for p in m.parameters()] for m in method.models]
    opt = torch.optim.SGD(method.parameters(), lr=0.1)
    out = method(batch)
    assert torch.isfinite(out["loss"]) and {"peer0_acc", "peer1_ce", "peer2_kl"} <= set(out)
    out["loss"].backward()
    opt.step()
    for m, old in zip(method.models, before):
        assert any(not torch.equal(a, b) for a, b in zip(old, m.parameters()))


def test_dml_peers_are_fresh_copies():
    student = nn.Linear(4, 3)
    method = METHODS.get("dml")(student, None, peers=2)
    assert all(type(p) is nn.Linear for p in method.peers)
    assert not torch.equal(method.peers[0].weight, student.weight)


def test_dml_from_a_config_needs_no_teacher(tmp_path):
    cfg = tiny_config(tmp_path / "dml", student={"name": "mlp", "hidden": [16]},
                      method={"name": "dml", "peers": [{"name": "mlp", "hidden": [8]}]})
    cfg["train"]["epochs"] = 1
    run = kdkit.run_config(kdkit.load_config(cfg), "distill")
    record = json.loads((tmp_path / "dml" / "metrics.jsonl").read_text().splitlines()[0])
    assert {"train_peer0_acc", "train_peer1_acc"} <= set(record)
    assert "teacher" not in run.metrics


# ----------------------------------------------------------------------------- deep self-distillation

def test_self_distillation_loss_by_formula():
    torch.manual_seed(0)
    zc, z1 = torch.randn(6, 3), torch.randn(6, 3)
    fc, f1 = torch.randn(6, 5), torch.randn(6, 5)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    t, a, lam = 3.0, 0.3, 0.03
    kl = _kl((zc / t).softmax(1), (z1 / t).softmax(1)) * t * t
    expected = F.cross_entropy(zc, y) + (1 - a) * F.cross_entropy(z1, y) + a * kl + lam * ((f1 - fc) ** 2).mean()
    out = self_distillation_loss([z1], zc, [f1], fc, y, t, a, lam)
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_byot_heads_train_but_are_not_part_of_the_student(tmp_path):
    batch = _images()
    student = create_model("cnn_small", num_classes=4, input_shape=(1, 12, 12), width=4)
    method = METHODS.get("byot")(student, None, example_batch=batch)
    assert method.layers == ["features.0.2", "features.0"]  # default: stage outputs above the deepest resolution
    assert len(method.heads) == 2
    student_ids = {id(p) for p in student.parameters()}
    assert not any(id(p) in student_ids for p in method.heads.parameters())
    heads_before = [p.detach().clone() for p in method.heads.parameters()]
    conv_before = student.features[0][0].weight.detach().clone()
    opt = torch.optim.SGD(method.parameters(), lr=0.1)
    out = method(batch)
    assert {"aux_kl", "aux_ce", "feat", "head0_acc"} <= set(out) and torch.isfinite(out["loss"])
    out["loss"].backward()
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(heads_before, method.heads.parameters()))
    assert not torch.equal(conv_before, student.features[0][0].weight)
    # the saved model is the student alone: no head tensors
    run = kdkit.distill(None, student, (batch["x"], batch["y"]), method="byot", epochs=1, progress=False,
                        out_dir=tmp_path / "byot")
    keys = set(read_tensors(run.dir / "checkpoints" / "best.safetensors"))
    assert keys == set(student.state_dict()) and not any(k.startswith("heads") for k in keys)


def test_byot_explicit_layers_and_bad_name():
    batch = _images()
    student = create_model("resnet_small", num_classes=4, input_shape=(1, 12, 12), width=4)
    method = METHODS.get("byot")(student, None, layers=["layer1"], feature_layer="none", example_batch=batch)
    out = method(batch)
    assert out["feat"].item() == 0.0 and len(method.heads) == 1
    with pytest.raises(kdkit.KdkitError, match="no module named"):
        METHODS.get("byot")(student, None, layers=["layer9"], example_batch=batch)


# ----------------------------------------------------------------------------- born-again networks

def test_born_again_api_produces_generations(tmp_path):
    torch.manual_seed(0)
    x, y = torch.randn(96, 6), torch.randint(0, 3, (96,))
    teacher = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    result = born_again(teacher, (x, y), (x, y), test_data=(x, y), generations=3, epochs=1, progress=False,
                        out_dir=tmp_path / "ban")
    assert len(result.runs) == 3
    assert sorted(p.name for p in (tmp_path / "ban").iterdir()) == ["gen1", "gen2", "gen3", "summary.json"]
    summary = json.loads((tmp_path / "ban" / "summary.json").read_text())
    assert [g["generation"] for g in summary["generations"]] == [0, 1, 2, 3]
    assert "accuracy" in summary["ensemble"]
    weights = [r.student[0].weight for r in result.runs]
    assert all(w.shape == teacher[0].weight.shape for w in weights)  # the teacher's own architecture
    assert not torch.equal(weights[0], weights[1])


def test_born_again_cli_trains_generation_zero(tmp_path, capsys):
    cfg = tiny_config(tmp_path / "ban", student={"name": "mlp", "hidden": [16]}, method={"name": "kd"})
    cfg["train"]["epochs"] = 1
    path = tmp_path / "ban.yaml"
    import yaml

    path.write_text(yaml.safe_dump(cfg))
    assert cli_run(["born-again", str(path), "--generations", "2"]) == 0
    names = sorted(p.name for p in (tmp_path / "ban").iterdir())
    assert names == ["gen0", "gen1", "gen2", "summary.json"]
    gen2 = kdkit.load_config(tmp_path / "ban" / "gen2" / "config.yaml")
    assert gen2.student.name == "mlp" and gen2.teacher.checkpoint.endswith("gen1") and gen2.seed == 2
    assert "gen2" in capsys.readouterr().out
