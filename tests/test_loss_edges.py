"""Loss edge cases (issue 8 items 6 and 9): tiny batches, gradient accumulation, unlabelled samples, the
kd_ls weighting, CRD's negatives and NaN regression targets. Reference values come from hand computation
or from formulas written out here independently of kdkit.losses."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kdkit.losses as L
import kdkit.training.loop as engine
from kdkit.config import TrainConfig
from kdkit.data import ArrayData
from kdkit.methods import METHODS
from kdkit.methods.build import build_method
from kdkit.models import create_model
from kdkit.teacher import Teacher

SHAPE = (1, 8, 8)
CLASSES = 5


def _cnn(name: str, width: int) -> nn.Module:
    torch.manual_seed(0)
    return create_model(name, num_classes=CLASSES, input_shape=SHAPE, width=width)


def _batch(n: int, seed: int = 0, num_samples: int = 16):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(n, *SHAPE, generator=g), "y": torch.randint(0, CLASSES, (n,), generator=g),
            "index": torch.randperm(num_samples, generator=g)[:n]}


def close(a, b, rel=1e-5):
    assert float(a) == pytest.approx(float(b), rel=rel, abs=1e-7)


# ------------------------------------------------------------------ 1. relation methods on batches of one and two

# Every registered method whose loss relates the samples of a batch to each other.
RELATION_METHODS = ["cc", "crd", "dist", "pkt", "rkd", "sp"]


@pytest.mark.parametrize("size", [1, 2])
@pytest.mark.parametrize("name", RELATION_METHODS)
def test_relation_method_survives_a_tiny_final_batch(name, size):
    student, teacher = _cnn("cnn_small", 4), _cnn("cnn_large", 6)
    options = {"nce_k": 4} if name == "crd" else {}
    method = build_method(name, student, Teacher(teacher), options, example_batch=_batch(8, seed=1), num_samples=16,
                          num_classes=CLASSES)
    method.train()
    out = method(_batch(size))
    for key, value in out.items():
        if key != "logits" and torch.is_tensor(value) and value.dim() == 0:
            assert math.isfinite(float(value)), f"{name} on a batch of {size}: {key} = {float(value)}"
    out["loss"].backward()
    grads = [p.grad for p in method.parameters() if p.requires_grad and p.grad is not None]
    assert grads, f"{name}: no gradient reached the trainable parameters"
    assert all(torch.isfinite(g).all() for g in grads), f"{name} on a batch of {size}: non-finite gradient"


def test_rkd_and_dist_relation_terms_are_zero_on_one_sample():
    s, t = torch.randn(1, 6, requires_grad=True), torch.randn(1, 9)
    assert float(L.rkd_distance_loss(s, t)) == 0.0  # was NaN: 0 pairs made the mean distance 0 / 0
    assert float(L.rkd_loss(s, t)) == 0.0
    assert float(L.dist_intra_loss(s[:, :5], t[:, :5])) == 0.0  # a correlation down one sample is undefined
    # Two samples: one pair, normalised distance 1 on both sides, so the distance term is exactly 0.
    assert float(L.rkd_distance_loss(torch.randn(2, 6), torch.randn(2, 9))) == pytest.approx(0.0, abs=1e-6)


# ------------------------------------------------------------------ 2. DKD warm-up counts optimiser steps


def _dkd_setup(warmup: int, combo: bool = False):
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    teacher = Teacher(nn.Sequential(nn.Linear(6, 3)))
    if combo:
        return METHODS.get("combo")(student, teacher, parts={"dkd": {"warmup_steps": warmup}})
    return METHODS.get("dkd")(student, teacher, warmup_steps=warmup)


def _dkd_data(n: int = 40) -> ArrayData:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, generator=g)
    return ArrayData(x, torch.randint(0, 3, (n,), generator=g))


ACCUM = TrainConfig(epochs=1, optimizer="sgd", lr=0.05, grad_accum_steps=2, progress=False)


@pytest.mark.parametrize("combo", [False, True])
def test_dkd_warmup_counts_optimiser_steps_under_accumulation(combo):
    method = _dkd_setup(warmup=10, combo=combo)
    # 40 samples in batches of 8: 5 micro-batches, grouped by 2 into 3 optimiser steps (2 + 2 + 1).
    engine.fit(method, _dkd_data(), cfg=ACCUM, batch_size=8)
    dkd = method.parts["dkd"] if combo else method
    assert int(dkd.steps) == 3  # was 5: one count per micro-batch
    assert "steps" in dkd.state_dict()


def test_dkd_warmup_weight_is_shared_by_the_micro_batches_of_one_step():
    method = _dkd_setup(warmup=4)
    method.train()
    b = {"x": torch.randn(6, 6), "y": torch.tensor([0, 1, 2, 0, 1, 2])}
    weights = []
    for _ in range(2):  # two micro-batches, then the optimiser step
        out = method(b)
        weights.append(float((out["loss"] - out["ce"]) / out["dkd"]))
    method.on_optimizer_step()
    out = method(b)
    weights.append(float((out["loss"] - out["ce"]) / out["dkd"]))
    assert weights == pytest.approx([0.25, 0.25, 0.5], rel=1e-5)


def test_dkd_warmup_resumes_where_it_stopped(tmp_path):
    first = _dkd_setup(warmup=10)
    engine.fit(first, _dkd_data(), cfg=ACCUM, run_dir=tmp_path / "r", batch_size=8)
    resumed = _dkd_setup(warmup=10)
    two = TrainConfig(**{**ACCUM.model_dump(), "epochs": 2})
    engine.fit(resumed, _dkd_data(), cfg=two, run_dir=tmp_path / "r", batch_size=8, resume=True)
    assert int(resumed.steps) == 6


# ------------------------------------------------------------------ 3. labelled and unlabelled samples in KD


class _FixedTeacher:
    """A teacher that returns given logits (a stand-in with the Teacher call signature)."""

    def __init__(self, logits: torch.Tensor):
        self.logits = logits

    def __call__(self, batch):
        return self.logits


def _kd_case(name: str, **options):
    torch.manual_seed(0)
    student = nn.Linear(4, 3)
    x = torch.randn(4, 4)
    teacher_logits = torch.randn(4, 3)
    method = METHODS.get(name)(student, _FixedTeacher(teacher_logits), **options)
    return method, x, teacher_logits


def _kl_rows(s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(softmax(t/T) ‖ softmax(s/T)) per row, written out."""
    p_t = torch.softmax(t / temperature, 1)
    return temperature ** 2 * (p_t * (p_t.log() - torch.log_softmax(s / temperature, 1))).sum(1)


@pytest.mark.parametrize("name", ["kd", "kd_ls"])
def test_all_unlabelled_batch_equals_batch_without_labels(name):
    method, x, _ = _kd_case(name, alpha=0.9)
    no_y = method({"x": x})["loss"]
    all_unlabelled = method({"x": x, "y": torch.full((4,), -1)})["loss"]
    close(all_unlabelled, no_y)  # was 0.9 · no_y


def test_kd_mixed_batch_is_the_per_sample_mix():
    alpha, temperature = 0.7, 2.0
    method, x, t = _kd_case("kd", alpha=alpha, temperature=temperature)
    y = torch.tensor([2, -1, 0, -1])
    out = method({"x": x, "y": y})
    s = out["logits"].detach()
    kd = _kl_rows(s, t, temperature)
    log_p = torch.log_softmax(s, 1)
    # Labelled samples 0 and 2 split their weight; unlabelled 1 and 3 keep it all on the soft term.
    expected = (alpha * kd[0] - (1 - alpha) * log_p[0, 2] + kd[1]
                + alpha * kd[2] - (1 - alpha) * log_p[2, 0] + kd[3]) / 4
    close(out["loss"], expected)
    close(out["kd"], kd.mean())
    close(out["ce"], -(log_p[0, 2] + log_p[2, 0]) / 2)
    # A fully labelled batch is the classical convex mix.
    full = torch.tensor([2, 1, 0, 1])
    ce = F.cross_entropy(s, full)
    close(method({"x": x, "y": full})["loss"], alpha * kd.mean() + (1 - alpha) * ce)


# ------------------------------------------------------------------ 4. kd_ls weighting against the reference code


def test_kd_ls_alpha_90_over_91_is_the_reference_9_to_0_1_weighting_scaled():
    method, x, t = _kd_case("kd_ls", alpha=90 / 91, temperature=2.0)
    y = torch.tensor([0, 1, 2, 1])
    out = method({"x": x, "y": y})
    s = out["logits"].detach()

    def z(v):  # the authors' normalize(): z-score with the unbiased std, 1e-7 in the denominator
        return (v - v.mean(-1, keepdim=True)) / (1e-7 + v.std(-1, keepdim=True))

    reference = 9.0 * _kl_rows(z(s), z(t), 2.0).mean() + 0.1 * F.cross_entropy(s, y)
    close(out["loss"], reference / 9.1)


# ------------------------------------------------------------------ 5. CRD never contrasts an anchor with itself


def test_crd_negative_indices_are_uniform_over_the_other_samples():
    n = 5
    draws = torch.arange(n - 1)  # every possible draw once
    own = torch.arange(n)
    neg = L.crd_negatives_excluding(draws, own)
    for b in range(n):
        assert sorted(neg[b].tolist()) == [i for i in range(n) if i != b]  # a bijection onto the others


def test_crd_method_excludes_the_anchor_from_its_negatives():
    student, teacher = _cnn("cnn_small", 4), _cnn("cnn_large", 6)
    crd = build_method("crd", student, Teacher(teacher), {"nce_k": 1, "feat_dim": 8, "ce_weight": 0.0},
                       example_batch=_batch(4), num_samples=2)
    crd.eval()  # no memory update, so the banks below are the ones the loss read
    crd.log_z.zero_()
    b = _batch(2, num_samples=2)
    idx = b["index"]
    _, feats, _, t_feats = crd.run(b)
    v_s = F.normalize(crd.embed_s(feats[0].flatten(1)), dim=1).detach()
    v_t = F.normalize(crd.embed_t(t_feats[0].flatten(1)), dim=1).detach()
    other = (1 - idx)[:, None]  # with two samples, the only admissible negative is the other one: (B, 1)
    expected_s = L.crd_nce_loss(v_s, crd.memory_t[idx], crd.memory_t[other], 2, crd.nce_t, torch.tensor(0.0))
    expected_t = L.crd_nce_loss(v_t, crd.memory_s[idx], crd.memory_s[other], 2, crd.nce_t, torch.tensor(0.0))
    for seed in range(5):  # whatever the draw (shared by the batch, it used to hit one anchor's own row)
        torch.manual_seed(seed)
        out = crd(b)
        close(out["crd_s"], expected_s, rel=1e-4)
        close(out["crd_t"], expected_t, rel=1e-4)


# ------------------------------------------------------------------ 6. NaN regression targets are skipped


def test_masked_mse_by_hand():
    pred = torch.tensor([1.0, 2.0, 3.0, 4.0], requires_grad=True)
    target = torch.tensor([1.5, float("nan"), 2.0, float("nan")])
    loss = L.masked_mse(pred, target)
    close(loss, (0.5 ** 2 + 1.0 ** 2) / 2)
    loss.backward()
    assert torch.allclose(pred.grad, torch.tensor([-0.5, 0.0, 1.0, 0.0]))  # d/dp of the mean over 2 targets
    none = torch.zeros(3, requires_grad=True)
    empty = L.masked_mse(none, torch.full((3,), float("nan")))
    empty.backward()
    assert float(empty) == 0.0 and torch.equal(none.grad, torch.zeros(3))


def test_supervised_regression_skips_nan_targets():
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    method = METHODS.get("supervised")(model)
    x = torch.randn(4, 3)
    y = torch.tensor([0.5, float("nan"), -1.0, float("nan")])
    out = method({"x": x, "y": y})
    p = out["logits"].detach().squeeze(1)
    close(out["loss"], ((p[0] - 0.5) ** 2 + (p[2] + 1.0) ** 2) / 2)
    out["loss"].backward()
    assert all(torch.isfinite(q.grad).all() for q in model.parameters())
    unlabelled = method({"x": x, "y": torch.full((4,), float("nan"))})["loss"]
    assert float(unlabelled) == 0.0


def test_output_mse_mixes_per_target_and_skips_nan():
    alpha = 0.25
    torch.manual_seed(0)
    teacher_out = torch.randn(4, 1)
    method = METHODS.get("mse")(nn.Linear(3, 1), _FixedTeacher(teacher_out), alpha=alpha)
    x = torch.randn(4, 3)
    y = torch.tensor([0.5, float("nan"), -1.0, float("nan")])
    out = method({"x": x, "y": y})
    p, t = out["logits"].detach().squeeze(1), teacher_out.squeeze(1)
    m = (p - t) ** 2
    expected = (alpha * m[0] + (1 - alpha) * (p[0] - 0.5) ** 2 + m[1]
                + alpha * m[2] + (1 - alpha) * (p[2] + 1.0) ** 2 + m[3]) / 4
    close(out["loss"], expected)
    close(out["mse"], ((p[0] - 0.5) ** 2 + (p[2] + 1.0) ** 2) / 2)
    no_y = method({"x": x})["loss"]
    close(method({"x": x, "y": torch.full((4,), float("nan"))})["loss"], no_y)
