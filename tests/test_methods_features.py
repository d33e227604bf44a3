"""Losses beyond logits against independently computed references, their invariants, and method behaviour.

References are written as plain loops over samples / classes / channels (or with numpy), a different route
from the vectorised code under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdkit import losses as L
from kdkit.errors import KdkitError
from kdkit.methods.build import build_method
from kdkit.models import create_model
from kdkit.teacher import Teacher

SHAPE = (1, 8, 8)



def close(a, b, tol=1e-5):
    a, b = float(torch.as_tensor(a).detach()), float(torch.as_tensor(b).detach())
    assert abs(a - b) <= tol * max(1.0, abs(b)), (a, b)


def huber(x: float) -> float:
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


# ============================================================================= logit losses


def softmax(v):
    e = np.exp(v - v.max())
    return e / e.sum()


def kl(p, q):
    return float(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0))


def test_dkd_matches_its_definition():
    torch.manual_seed(1)
    s, t = torch.randn(4, 5), torch.randn(4, 5) * 2
    y = torch.tensor([0, 3, 4, 1])
    T, a, b = 3.0, 1.5, 6.0
    ref = 0.0
    for i in range(4):
        ps, pt = softmax(s[i].double().numpy() / T), softmax(t[i].double().numpy() / T)
        yi = int(y[i])
        tckd = kl([pt[yi], 1 - pt[yi]], [ps[yi], 1 - ps[yi]])
        rest = [j for j in range(5) if j != yi]
        # non-target distribution = probabilities renormalised without the target (an independent route)
        nckd = kl(pt[rest] / (1 - pt[yi]), ps[rest] / (1 - ps[yi]))
        ref += T * T * (a * tckd + b * nckd) / 4
    close(L.dkd_loss(s, t, y, a, b, T), ref)


def test_dkd_decomposes_kd_per_sample():
    """Zhao et al. eq. (2): for ONE sample, KD(T) equals DKD with alpha = 1 and beta = 1 - p_t[y] (at T)."""
    torch.manual_seed(2)
    T = 4.0
    for _ in range(5):
        s, t = torch.randn(1, 7), torch.randn(1, 7) * 3
        y = torch.randint(0, 7, (1,))
        pt_y = float(F.softmax(t / T, dim=1)[0, y])
        close(L.dkd_loss(s, t, y, alpha=1.0, beta=1.0 - pt_y, temperature=T), L.kd_loss(s, t, T))
    # and a batch with alpha = beta = 1 is an upper bound of KD (each NCKD weight 1 >= 1 - p_t[y])
    s, t, y = torch.randn(6, 7), torch.randn(6, 7), torch.randint(0, 7, (6,))
    assert L.dkd_loss(s, t, y, 1.0, 1.0, T) >= L.kd_loss(s, t, T) - 1e-6


def test_dkd_skips_unlabelled_and_is_zero_when_distributions_agree():
    s = torch.randn(3, 4, requires_grad=True)
    close(L.dkd_loss(s.detach(), s.detach(), torch.tensor([1, 2, 0])), 0.0)
    t = torch.randn(3, 4)
    y = torch.tensor([1, -1, -1])
    close(L.dkd_loss(s, t, y), L.dkd_loss(s[:1], t[:1], y[:1]))
    L.dkd_loss(s, t, torch.full((3,), -1)).backward()  # no labelled sample: zero, still differentiable
    assert torch.all(s.grad == 0)


def test_dist_matches_pearson_from_numpy():
    torch.manual_seed(3)
    s, t = torch.randn(6, 5), torch.randn(6, 5)
    T = 2.0
    ps, pt = F.softmax(s / T, 1).double().numpy(), F.softmax(t / T, 1).double().numpy()
    inter = np.mean([1 - np.corrcoef(ps[i], pt[i])[0, 1] for i in range(6)]) * T * T
    intra = np.mean([1 - np.corrcoef(ps[:, j], pt[:, j])[0, 1] for j in range(5)]) * T * T
    close(L.dist_inter_loss(s, t, T), inter)
    close(L.dist_intra_loss(s, t, T), intra)
    close(L.dist_loss(s, t, beta=0.5, gamma=3.0, temperature=T), 0.5 * inter + 3.0 * intra)
    close(L.dist_loss(t, t, temperature=T), 0.0)


def test_kd_ls_matches_reference_and_ignores_logit_shift_and_scale():
    torch.manual_seed(4)
    s, t = torch.randn(3, 6), torch.randn(3, 6)
    T = 2.0
    ref = 0.0
    for i in range(3):
        zs = (s[i].double().numpy() - s[i].double().numpy().mean()) / s[i].double().numpy().std(ddof=1)
        zt = (t[i].double().numpy() - t[i].double().numpy().mean()) / t[i].double().numpy().std(ddof=1)
        ref += T * T * kl(softmax(zt / T), softmax(zs / T)) / 3
    close(L.kd_ls_loss(s, t, T), ref, 1e-4)
    shift, scale = torch.randn(3, 1), torch.rand(3, 1) + 0.5
    close(L.kd_ls_loss(s * scale + shift, t * 3 - 1, T), L.kd_ls_loss(s, t, T), 1e-4)


# ============================================================================= feature losses


def test_hint_loss_is_mse_and_rejects_shape_mismatch():
    a, b = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[0.0, 2.0], [5.0, 4.0]])
    close(L.hint_loss(a, b), (1 + 0 + 4 + 0) / 4)
    with pytest.raises(ValueError, match="connector"):
        L.hint_loss(a, b[:, :1])


def test_attention_transfer_reference_and_scale_invariance():
    torch.manual_seed(5)
    fs, ft = torch.randn(2, 3, 2, 2), torch.randn(2, 5, 2, 2)
    ref = 0.0
    for b in range(2):
        qs = [sum(float(fs[b, c, i, j]) ** 2 for c in range(3)) / 3 for i in range(2) for j in range(2)]
        qt = [sum(float(ft[b, c, i, j]) ** 2 for c in range(5)) / 5 for i in range(2) for j in range(2)]
        ns, nt = math.sqrt(sum(q * q for q in qs)), math.sqrt(sum(q * q for q in qt))
        ref += sum((x / ns - y / nt) ** 2 for x, y in zip(qs, qt)) / 8
    close(L.at_loss(fs, ft), ref)
    close(L.at_loss(fs * 10.0, ft * 0.01), L.at_loss(fs, ft))  # invariant to feature scale
    with pytest.raises(ValueError, match="spatial"):
        L.at_loss(fs, torch.randn(2, 5, 3, 3))


def test_nst_matches_loop_mmd():
    torch.manual_seed(6)
    fs, ft = torch.randn(2, 3, 2, 3), torch.randn(2, 4, 2, 3)
    ref = 0.0
    for b in range(2):
        s = [fs[b, c].flatten().double() / fs[b, c].double().norm() for c in range(3)]
        t = [ft[b, c].flatten().double() / ft[b, c].double().norm() for c in range(4)]

        def k(x, y):
            return float(x @ y) ** 2

        mmd = (sum(k(x, y) for x in s for y in s) / 9 + sum(k(x, y) for x in t for y in t) / 16
               - 2 * sum(k(x, y) for x in s for y in t) / 12)
        ref += mmd / 2
    close(L.nst_loss(fs, ft), ref)
    close(L.nst_loss(ft, ft), 0.0)


def test_attention_weighted_mse_reference_and_uniform_case():
    torch.manual_seed(7)
    fs, ft = torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 2)
    tau = 0.5
    ref = 0.0
    for b in range(2):
        att = [float(ft[b, :, i, j].abs().mean()) for i in range(2) for j in range(2)]
        e = [math.exp(a / tau) for a in att]
        w = [4 * v / sum(e) for v in e]
        err = [float(((fs[b, :, i, j] - ft[b, :, i, j]) ** 2).mean()) for i in range(2) for j in range(2)]
        ref += sum(wi * ei for wi, ei in zip(w, err)) / 8
    close(L.attention_weighted_mse(fs, ft, tau), ref)
    uniform = torch.ones(2, 3, 2, 2) * torch.tensor([1.0, -1.0, 1.0]).view(1, 3, 1, 1)  # |f_t| equal everywhere
    close(L.attention_weighted_mse(fs, uniform, tau), F.mse_loss(fs, uniform))


def test_sp_reference_and_batch_order_invariance():
    torch.manual_seed(8)
    fs, ft = torch.randn(4, 3, 2, 2), torch.randn(4, 5)
    B = 4
    a, b = fs.flatten(1).double(), ft.double()
    gs, gt = a @ a.T, b @ b.T
    ref = 0.0
    for i in range(B):
        ns, nt = gs[i].norm(), gt[i].norm()
        ref += sum(float(gs[i, j] / ns - gt[i, j] / nt) ** 2 for j in range(B))
    close(L.sp_loss(fs, ft), ref / B ** 2)
    perm = torch.randperm(B)
    close(L.sp_loss(fs[perm], ft[perm]), L.sp_loss(fs, ft))


def test_pkt_matches_conditional_probability_definition():
    torch.manual_seed(9)
    fs, ft = torch.randn(4, 3), torch.randn(4, 6)
    B = 4

    def cond(f):
        f = f.double()
        k = [[(1 + float(f[i] @ f[j] / (f[i].norm() * f[j].norm()))) / 2 for j in range(B)] for i in range(B)]
        return [[k[i][j] / sum(k[m][j] for m in range(B) if m != j) if i != j else 0.0 for j in range(B)]
                for i in range(B)]

    ps, pt = cond(fs), cond(ft)
    ref = sum(pt[i][j] * math.log(pt[i][j] / ps[i][j]) for i in range(B) for j in range(B) if i != j) / B
    close(L.pkt_loss(fs, ft), ref, 1e-4)
    perm = torch.randperm(B)
    close(L.pkt_loss(fs[perm], ft[perm]), L.pkt_loss(fs, ft))


def test_rkd_distance_and_angle_references():
    torch.manual_seed(10)
    fs, ft = torch.randn(4, 3), torch.randn(4, 5)
    B = 4

    def dists(f):
        d = [[float((f[i] - f[j]).double().norm()) for j in range(B)] for i in range(B)]
        mean = sum(d[i][j] for i in range(B) for j in range(B) if i != j) / (B * B - B)
        return [[v / mean for v in row] for row in d]

    ds, dt = dists(fs), dists(ft)
    ref_d = sum(huber(ds[i][j] - dt[i][j]) for i in range(B) for j in range(B)) / B ** 2
    close(L.rkd_distance_loss(fs, ft), ref_d)

    def cos_angle(f, i, j, k):  # angle at vertex j
        if i == j or k == j:
            return 0.0
        u, v = (f[i] - f[j]).double(), (f[k] - f[j]).double()
        return float(u @ v / (u.norm() * v.norm()))

    ref_a = sum(huber(cos_angle(fs, i, j, k) - cos_angle(ft, i, j, k))
                for i in range(B) for j in range(B) for k in range(B)) / B ** 3
    close(L.rkd_angle_loss(fs, ft), ref_a)
    close(L.rkd_loss(fs, ft, 2.0, 3.0), 2 * ref_d + 3 * ref_a)


def test_rkd_invariant_to_batch_order_and_scale():
    torch.manual_seed(11)
    fs, ft = torch.randn(6, 4), torch.randn(6, 8)
    perm = torch.randperm(6)
    close(L.rkd_loss(fs[perm], ft[perm]), L.rkd_loss(fs, ft))
    close(L.rkd_loss(fs * 5.0, ft), L.rkd_loss(fs, ft))  # distances are normalised, angles scale-free
    close(L.rkd_loss(ft, ft), 0.0)


def test_cc_kernel_converges_to_gaussian_rbf_and_loss_reference():
    torch.manual_seed(12)
    f = torch.randn(5, 4).double()
    u = F.normalize(f, dim=1)
    gamma = 0.4
    exact = torch.exp(-gamma * torch.cdist(u, u) ** 2)
    torch.testing.assert_close(L.rbf_taylor_kernel(f, gamma, order=20), exact)
    fs, ft = torch.randn(3, 4), torch.randn(3, 2)

    def kernel(f, order):
        f = F.normalize(f.double(), dim=1)
        return [[math.exp(-2 * gamma) * sum((2 * gamma) ** p / math.factorial(p) * float(f[i] @ f[j]) ** p
                                            for p in range(order + 1)) for j in range(3)] for i in range(3)]

    ks, kt = kernel(fs, 2), kernel(ft, 2)
    ref = sum((ks[i][j] - kt[i][j]) ** 2 for i in range(3) for j in range(3)) / 9
    close(L.cc_loss(fs, ft, gamma, 2), ref)
    perm = torch.tensor([2, 0, 1])
    close(L.cc_loss(fs[perm], ft[perm]), L.cc_loss(fs, ft))


def test_crd_nce_matches_the_critic_formula():
    torch.manual_seed(13)
    B, K, D, N, tau = 3, 4, 5, 50, 0.5
    a, p = F.normalize(torch.randn(B, D), dim=1), F.normalize(torch.randn(B, D), dim=1)
    neg = F.normalize(torch.randn(K, D), dim=1)
    scores = torch.cat([(a * p).sum(1, keepdim=True), a @ neg.T], 1).double() / tau
    Z = N * float(torch.exp(scores).mean())  # the Monte-Carlo normaliser of the paper's code
    close(math.exp(float(L.crd_log_normaliser(a, p, neg, N, tau))), Z)
    ref = 0.0
    for b in range(B):
        h = lambda s: (math.exp(s) / Z) / (math.exp(s) / Z + K / N)  # noqa: E731
        ref -= math.log(h(float(scores[b, 0]))) + sum(math.log(1 - h(float(scores[b, k]))) for k in range(1, K + 1))
    close(L.crd_nce_loss(a, p, neg, N, tau), ref / B)
    per_anchor = neg.expand(B, K, D)  # (B, K, D) negatives give the same value
    close(L.crd_nce_loss(a, p, per_anchor, N, tau), ref / B)


# ============================================================================= methods


def models(t_width: int = 8):
    student = create_model("cnn_small", num_classes=10, input_shape=SHAPE, width=4)
    teacher = create_model("cnn_large", num_classes=10, input_shape=SHAPE, width=t_width)
    return student, Teacher(teacher)


def batch(n: int = 8, labelled: bool = True):
    b = {"x": torch.randn(n, *SHAPE), "index": torch.arange(n)}
    if labelled:
        b["y"] = torch.randint(0, 10, (n,))
    return b


def test_default_layers_on_the_zoo():
    s, t = models()
    eb = batch()
    at = build_method("at", s, t, {}, example_batch=eb)
    assert at.student_layers == ["features.0.2", "features.0", "features"]
    assert at.teacher_layers == ["features.0", "features.2", "features"]
    fit = build_method("fitnets", s, t, {}, example_batch=eb)
    assert (fit.student_layers, fit.teacher_layers) == (["features"], ["features"])
    assert isinstance(fit.connectors[0], nn.Conv2d) and fit.connectors[0].in_channels == 8
    sp = build_method("sp", s, t, {}, example_batch=eb)
    assert (sp.student_layers, sp.teacher_layers) == (["head:input"], ["head:input"])
    mlp = create_model("mlp", num_classes=10, input_shape=SHAPE, hidden=(12,))
    fit_mlp = build_method("fitnets", mlp, t, {}, example_batch=eb)  # no maps in the student: embeddings
    assert fit_mlp.student_layers == ["3:input"] and isinstance(fit_mlp.connectors[0], nn.Linear)
    nst = build_method("nst", s, t, {"student_layer": ["features.0"], "teacher_layer": ["features.2"]},
                       example_batch=eb)
    assert nst.student_shapes == [(8, 4, 4, 4)] and nst.teacher_shapes == [(8, 16, 4, 4)]


def test_feature_method_parameters_are_student_plus_connectors_and_teacher_stays_frozen():
    s, t = models()
    m = build_method("fitnets", s, t, {"kd_weight": 0.5}, example_batch=batch())
    params = {id(p) for p in m.parameters()}
    expected = {id(p) for p in s.parameters()} | {id(p) for p in m.connectors.parameters()}
    assert params == expected and m.connectors.parameters()
    assert not any(id(p) in params for p in t.model.parameters())
    m.train()
    assert not t.model.training  # method.train() does not reach the teacher
    out = m(batch())
    assert {"loss", "hint", "kd", "ce", "logits"} <= set(out)
    close(out["loss"], 100 * out["hint"] + 0.5 * out["kd"] + out["ce"], 1e-4)
    before = [p.clone() for p in t.model.parameters()]
    out["loss"].backward()
    assert all(p.grad is None for p in t.model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, t.model.parameters()))


def test_unlabelled_batch_trains_on_feature_and_kd_terms_only():
    s, t = models()
    m = build_method("at", s, t, {"kd_weight": 1.0}, example_batch=batch())
    out = m(batch(labelled=False))
    assert "ce" not in out and {"at", "kd"} <= set(out)
    close(out["loss"], 1000 * out["at"] + out["kd"], 1e-4)


def test_dkd_method_uses_teacher_class_for_unlabelled_and_warms_up():
    s, t = models()
    m = build_method("dkd", s, t, {"warmup_steps": 4})
    b = batch()
    b["y"][:3] = -1
    m.train()
    out = m(b)
    logits, t_logits = out["logits"].detach(), t(b)
    targets = torch.where(b["y"] >= 0, b["y"], t_logits.argmax(1))
    close(out["dkd"], L.dkd_loss(logits, t_logits, targets, 1.0, 8.0, 4.0), 1e-4)
    close(out["loss"], 0.25 * out["dkd"] + out["ce"], 1e-4)  # step 1 of a 4-step warm-up
    assert int(m.steps) == 0  # counted per optimiser step, not per forward
    m.on_optimizer_step()
    assert int(m.steps) == 1


def test_rkd_and_crd_report_their_parts():
    s, t = models()
    out = build_method("rkd", s, t, {}, example_batch=batch())(batch())
    close(out["rkd"], 25 * out["rkd_d"] + 50 * out["rkd_a"], 1e-4)
    crd = build_method("crd", s, t, {"nce_k": 5}, example_batch=batch(), num_samples=8)
    out = crd(batch())
    close(out["crd"], out["crd_s"] + out["crd_t"], 1e-4)
    assert crd.nce_k == 5 and crd.memory_s.shape == (8, 128)


def test_crd_needs_num_samples_and_indices():
    s, t = models()
    with pytest.raises(KdkitError, match="num_samples"):
        build_method("crd", s, t, {}, example_batch=batch())
    crd = build_method("crd", s, t, {}, example_batch=batch(), num_samples=8)
    assert crd.nce_k == 7  # capped at num_samples - 1
    b = batch()
    del b["index"]
    with pytest.raises(KdkitError, match="index"):
        crd(b)


def test_crd_loss_decreases_on_a_toy_problem():
    """32 fixed samples, two small MLPs: the student and CRD's heads learn to pick each sample's row in the
    other model's memory bank, so the contrastive loss falls well below its starting value."""
    torch.manual_seed(0)
    n = 32
    x = torch.randn(n, 6)
    student = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    teacher = Teacher(nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)))
    crd = build_method("crd", student, teacher, {"nce_k": 16, "ce_weight": 0.0, "beta": 1.0, "feat_dim": 16,
                                                 "nce_t": 0.1}, example_batch={"x": x[:8]}, num_samples=n)
    assert crd.student_layers == ["2:input"]
    opt = torch.optim.Adam(crd.parameters(), lr=2e-2)
    crd.train()
    history = []
    for epoch in range(30):
        total = 0.0
        for i in range(0, n, 16):
            out = crd({"x": x[i:i + 16], "index": torch.arange(i, i + 16)})
            opt.zero_grad()
            out["loss"].backward()
            opt.step()
            total += float(out["crd"])
        history.append(total / 2)
    assert np.mean(history[-5:]) < 0.7 * np.mean(history[:3]), history
    # the memory banks stay unit-norm rows
    torch.testing.assert_close(crd.memory_s.norm(dim=1), torch.ones(n))
