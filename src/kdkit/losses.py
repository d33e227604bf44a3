"""Distillation losses as pure functions: tensors in, scalar tensor out.

Losses never read configs or modules; methods (:mod:`kdkit.methods`) wrap them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """Hinton et al. (2015), "Distilling the Knowledge in a Neural Network", soft-target term.

    ``T² · KL(softmax(t/T) ‖ softmax(s/T))``, averaged over the batch.

    The KL is summed over classes and divided by the batch size (``batchmean``;
    ``reduction="mean"`` would also divide by the number of classes). The T²
    factor keeps the gradient magnitude of the soft term independent of T, so
    that ``alpha`` means the same at every temperature.

    Args:
        student_logits: (B, C) raw student outputs.
        teacher_logits: (B, C) raw teacher outputs.
        temperature: softening temperature T > 0.

    Returns:
        A scalar tensor.
    """
    t = temperature
    log_p_s = F.log_softmax(student_logits / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits / t, dim=-1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (t * t)


def kd_per_sample(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """:func:`kd_loss` before the batch average: ``T² · KL(softmax(t_i/T) ‖ softmax(s_i/T))`` for each sample.

    Args:
        student_logits, teacher_logits: (B, C).

    Returns:
        (B,).
    """
    t = temperature
    log_p_s = F.log_softmax(student_logits / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits / t, dim=-1)
    return F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(-1) * (t * t)


def mix_soft_and_hard(soft: torch.Tensor, hard: torch.Tensor, labelled: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-sample convex mix of a distillation term and a supervised term, averaged over the batch.

    ``mean_i w_i`` with ``w_i = alpha · soft_i + (1 - alpha) · hard_i`` for a labelled sample and ``w_i = soft_i``
    for an unlabelled one: a sample without a label has nothing to split its weight with, so it keeps the
    whole of it on the soft target. A batch with no label at all thus gives the same value as a batch without
    a ``y`` key (``mean_i soft_i``), and a fully labelled one the classical ``alpha · soft + (1 - alpha) · hard``.

    Args:
        soft: (B, ...) per-sample (or per-element) distillation losses.
        hard: same shape; supervised losses, any finite value where unlabelled (it is not used there).
        labelled: same shape, bool.
        alpha: weight of the soft term for labelled samples, in [0, 1].

    Returns:
        A scalar.
    """
    # where() rather than a product with the mask, so that a NaN/inf placeholder in `hard` cannot leak in.
    return torch.where(labelled, alpha * soft + (1.0 - alpha) * hard, soft).mean()


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -1) -> torch.Tensor:
    """Cross-entropy over the labelled samples of a batch (``labels == ignore_index`` are skipped).

    Returns zero (with a gradient path) when no sample in the batch is labelled.

    Args:
        logits: (B, C).
        labels: (B,) integer classes, ``ignore_index`` for unlabelled samples.
    """
    # No data-dependent branch and no host sync: the sum over labelled samples divided by their count.
    total = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    return total / (labels != ignore_index).sum().clamp_min(1)


def output_mse(student_out: torch.Tensor, teacher_out: torch.Tensor) -> torch.Tensor:
    """Mean squared error between outputs: distillation target for regression teachers (or raw logit matching,
    Ba & Caruana 2014)."""
    return F.mse_loss(student_out, teacher_out)


def masked_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the finite entries of ``target``: a NaN target means "unlabelled" (kdkit's
    convention for regression) and is skipped.

    Returns zero (with a gradient path) when no target is finite, so an unlabelled batch adds nothing.

    Args:
        prediction: (B, ...) model outputs.
        target: same number of elements as ``prediction`` (reshaped to it), NaN where unknown.
    """
    target = target.reshape(prediction.shape)
    known = torch.isfinite(target)
    # Fill the unknown targets before subtracting: (p - NaN) would put NaN into the backward pass of where().
    diff = torch.where(known, prediction - torch.where(known, target, torch.zeros_like(target)),
                       torch.zeros_like(prediction))
    return diff.pow(2).sum() / known.sum().clamp_min(1)


# ============================================================================= beyond logits
# Shapes: B = batch, C = classes or channels, D = embedding width, H x W = spatial size, K = negatives.


def _big_negative(z: torch.Tensor) -> float:
    # Finite stand-in for -inf when masking a class out of a softmax: exp() underflows to exactly 0, yet
    # 0 * (log p - log q) stays 0 instead of NaN in the forward and backward passes.
    return torch.finfo(z.dtype).min / 4


def dkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
             alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0) -> torch.Tensor:
    """Decoupled knowledge distillation (Zhao, Cui, Song, Qiu & Liang, CVPR 2022, "Decoupled Knowledge
    Distillation").

    ``DKD = T² · (alpha · TCKD + beta · NCKD)``, averaged over the labelled samples, where at temperature T

    - ``TCKD = KL(b_t ‖ b_s)``, ``b = [p_y, 1 - p_y]``: the binary target / non-target probabilities;
    - ``NCKD = KL(p̂_t ‖ p̂_s)``, ``p̂ = softmax`` over the non-target classes only.

    Classical KD splits per sample as ``KL(p_t ‖ p_s) = TCKD + (1 - p_y^t) · NCKD`` (the paper's eq. 2), so
    KD is DKD with ``alpha = 1`` and a sample-dependent ``beta = 1 - p_y^t``; DKD frees the two weights.

    Args:
        student_logits, teacher_logits: (B, C).
        labels: (B,) integer classes; ``-1`` (unlabelled) samples are skipped (DKD needs the target class).
        alpha, beta: weights of TCKD and NCKD.
        temperature: T > 0.

    Returns:
        A scalar (zero, with a gradient path, when no sample is labelled).
    """
    t = temperature
    mask = labels >= 0
    y = labels.clamp_min(0)
    zs, zt = student_logits / t, teacher_logits / t
    target = F.one_hot(y, zs.shape[-1]).bool()  # (B, C)

    def binary_log_probs(z: torch.Tensor) -> torch.Tensor:  # (B, 2): log [p_y, 1 - p_y]
        lse = torch.logsumexp(z, dim=-1)
        log_py = z.gather(1, y[:, None]).squeeze(1) - lse
        log_rest = torch.logsumexp(z.masked_fill(target, _big_negative(z)), dim=-1) - lse
        return torch.stack([log_py, log_rest], dim=-1)

    bs, bt = binary_log_probs(zs), binary_log_probs(zt)
    tckd = (bt.exp() * (bt - bs)).sum(-1)  # (B,)
    ls = F.log_softmax(zs.masked_fill(target, _big_negative(zs)), dim=-1)
    lt = F.log_softmax(zt.masked_fill(target, _big_negative(zt)), dim=-1)
    nckd = (lt.exp() * (lt - ls)).sum(-1)  # (B,); the target class has p̂_t = 0 exactly
    per_sample = (alpha * tckd + beta * nckd) * (t * t)
    return (per_sample * mask).sum() / mask.sum().clamp_min(1)


def _pearson(a: torch.Tensor, b: torch.Tensor, dim: int, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation of ``a`` and ``b`` along ``dim``."""
    a = a - a.mean(dim, keepdim=True)
    b = b - b.mean(dim, keepdim=True)
    return (a * b).sum(dim) / (a.norm(dim=dim) * b.norm(dim=dim) + eps)


def dist_inter_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                    temperature: float = 4.0) -> torch.Tensor:
    """DIST inter-class relation (Huang, You, Wang, Qian & Xu, NeurIPS 2022, "Knowledge Distillation from A
    Stronger Teacher").

    ``T² · mean_i (1 - ρ(p_s[i, :], p_t[i, :]))``: one minus the Pearson correlation between the student's and
    the teacher's class probabilities of each sample (p = softmax(z / T)), averaged over the batch.

    Args:
        student_logits, teacher_logits: (B, C).
    """
    ps = F.softmax(student_logits / temperature, dim=-1)
    pt = F.softmax(teacher_logits / temperature, dim=-1)
    return temperature ** 2 * (1.0 - _pearson(ps, pt, dim=1)).mean()


def dist_intra_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                    temperature: float = 4.0) -> torch.Tensor:
    """DIST intra-class relation (Huang et al., NeurIPS 2022): ``T² · mean_c (1 - ρ(p_s[:, c], p_t[:, c]))``,
    the Pearson correlation taken down the batch for each class.

    A correlation down a batch of one sample is undefined: the term is then 0 (nothing to match), like the
    other relation losses on a batch of one.

    Args:
        student_logits, teacher_logits: (B, C).
    """
    ps = F.softmax(student_logits / temperature, dim=-1)
    pt = F.softmax(teacher_logits / temperature, dim=-1)
    if ps.shape[0] < 2:  # a shape, not a value: no host sync
        return (ps * 0.0).sum()
    return temperature ** 2 * (1.0 - _pearson(ps, pt, dim=0)).mean()


def dist_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float = 2.0, gamma: float = 2.0,
              temperature: float = 4.0) -> torch.Tensor:
    """DIST (Huang et al., NeurIPS 2022): ``beta · inter + gamma · intra`` (see :func:`dist_inter_loss`,
    :func:`dist_intra_loss`). Correlation, not KL, so the student need only preserve the teacher's ranking
    and relative scale of probabilities, not their exact values.

    Args:
        student_logits, teacher_logits: (B, C).
    """
    return (beta * dist_inter_loss(student_logits, teacher_logits, temperature)
            + gamma * dist_intra_loss(student_logits, teacher_logits, temperature))


def standardize_logits(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Z-score each row: ``(z - mean(z)) / std(z)`` over classes (unbiased std), shape kept."""
    return (logits - logits.mean(-1, keepdim=True)) / (logits.std(-1, keepdim=True) + eps)


def kd_ls_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """KD with logit standardisation (Sun, Ren, Li, Wang & Cao, CVPR 2024, "Logit Standardization in Knowledge
    Distillation").

    ``T² · KL(softmax(Z(t)/T) ‖ softmax(Z(s)/T))`` with ``Z`` the per-sample z-score
    (:func:`standardize_logits`). The student then matches the teacher's logit *relations*, not their range:
    the loss is unchanged when a sample's logits (of either model) are shifted or scaled by a positive factor.

    Args:
        student_logits, teacher_logits: (B, C), C >= 2.
        temperature: base temperature T > 0 applied after standardisation.
    """
    return kd_loss(standardize_logits(student_logits), standardize_logits(teacher_logits), temperature)


def hint_loss(student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """FitNets hint (Romero, Ballas, Kahou, Chassang, Gatta & Bengio, ICLR 2015, "FitNets: Hints for Thin
    Deep Nets").

    ``mean((r(s) - t)²)`` over every element, where ``r(s)`` is the student's (regressed) feature; the
    paper's ``1/2 ‖·‖²`` sum differs only by a constant factor folded into the method's weight.

    Args:
        student_features, teacher_features: tensors of the same shape, e.g. (B, C, H, W) or (B, D).
    """
    if student_features.shape != teacher_features.shape:
        raise ValueError(f"hint_loss: student features {tuple(student_features.shape)} and teacher features "
                         f"{tuple(teacher_features.shape)} differ; map them with a connector first")
    return F.mse_loss(student_features, teacher_features)


def attention_map(features: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Spatial attention map of Zagoruyko & Komodakis (2017): ``normalize(mean_c |f|^p)``.

    Args:
        features: (B, C, H, W).
        p: exponent (2 in the paper).

    Returns:
        (B, H·W), each row of unit L2 norm.
    """
    if features.dim() != 4:
        raise ValueError(f"attention_map needs (B, C, H, W) feature maps; got shape {tuple(features.shape)}")
    return F.normalize(features.abs().pow(p).mean(1).flatten(1), dim=1)


def at_loss(student_features: torch.Tensor, teacher_features: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Attention transfer (Zagoruyko & Komodakis, ICLR 2017, "Paying More Attention to Attention").

    ``mean_{b, j} (a_s[b, j] - a_t[b, j])²`` with ``a`` the unit-norm attention maps of :func:`attention_map`
    (the authors' code's form of ``β/2 ‖a_s - a_t‖``). Channels may differ; spatial sizes must agree. Because
    each map is normalised, the loss is unchanged when either model's features are scaled by a constant.

    Args:
        student_features: (B, Cs, H, W).
        teacher_features: (B, Ct, H, W).
    """
    a_s, a_t = attention_map(student_features, p), attention_map(teacher_features, p)
    if a_s.shape != a_t.shape:
        raise ValueError(f"at_loss: spatial sizes differ: student {tuple(student_features.shape[2:])}, teacher "
                         f"{tuple(teacher_features.shape[2:])}")
    return (a_s - a_t).pow(2).mean()


def nst_loss(student_features: torch.Tensor, teacher_features: torch.Tensor, degree: int = 2,
             coef0: float = 0.0) -> torch.Tensor:
    """Neuron selectivity transfer (Huang & Wang, 2017, "Like What You Like: Knowledge Distill via Neuron
    Selectivity Transfer", arXiv:1707.01219).

    Each channel's spatial activation pattern, L2-normalised over H·W, is one sample of a distribution;
    the loss is the squared MMD between the student's and the teacher's channel distributions under the
    polynomial kernel ``k(a, b) = (aᵀb + coef0)^degree``:

    ``MMD² = mean_{i,i'} k(s_i, s_i') + mean_{j,j'} k(t_j, t_j') - 2 mean_{i,j} k(s_i, t_j)``, averaged over the
    batch. Channel counts may differ; spatial sizes must agree.

    Args:
        student_features: (B, Cs, H, W).
        teacher_features: (B, Ct, H, W).
        degree, coef0: polynomial kernel (the paper's best: degree 2, coef0 0).
    """
    if student_features.shape[2:] != teacher_features.shape[2:]:
        raise ValueError(f"nst_loss: spatial sizes differ: student {tuple(student_features.shape[2:])}, teacher "
                         f"{tuple(teacher_features.shape[2:])}")
    s = F.normalize(student_features.flatten(2), dim=2)  # (B, Cs, HW)
    t = F.normalize(teacher_features.flatten(2), dim=2)  # (B, Ct, HW)

    def k(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a @ b.transpose(1, 2) + coef0).pow(degree)

    return k(s, s).mean() + k(t, t).mean() - 2.0 * k(s, t).mean()


def attention_weighted_mse(student_features: torch.Tensor, teacher_features: torch.Tensor,
                           temperature: float = 0.5) -> torch.Tensor:
    """Feature MSE weighted by the teacher's own spatial attention (the spatial mask of Zhang & Ma, ICLR 2021,
    "Improve Object Detection with Feature-based Knowledge Distillation").

    ``w = H·W · softmax_j(mean_c |f_t[:, c, j]| / temperature)`` (per sample; weights average 1) and
    ``loss = mean_{b, j} w[b, j] · mean_c (f_s[b, c, j] - f_t[b, c, j])²``. Positions the teacher attends to
    count more; with a uniform teacher map it is plain feature MSE (:func:`hint_loss`).

    Args:
        student_features: (B, C, H, W), already mapped to the teacher's shape (e.g. by a 1x1 connector).
        teacher_features: (B, C, H, W).
        temperature: softmax temperature of the attention (lower = sharper).
    """
    if student_features.shape != teacher_features.shape or teacher_features.dim() != 4:
        raise ValueError(f"attention_weighted_mse needs equal (B, C, H, W) shapes; got student "
                         f"{tuple(student_features.shape)}, teacher {tuple(teacher_features.shape)}")
    t = teacher_features.detach()
    hw = t.shape[2] * t.shape[3]
    weights = hw * F.softmax(t.abs().mean(1).flatten(1) / temperature, dim=1)  # (B, HW)
    per_position = (student_features - teacher_features).pow(2).mean(1).flatten(1)  # (B, HW)
    return (weights * per_position).mean()


def sp_loss(student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """Similarity-preserving KD (Tung & Mori, ICCV 2019, "Similarity-Preserving Knowledge Distillation").

    ``G = normalize_rows(f fᵀ)`` on features flattened to (B, ·); ``loss = ‖G_s - G_t‖_F² / B²``. Only
    sample-to-sample similarities are matched, so widths may differ and the loss does not depend on the
    order of the batch.

    Args:
        student_features: (B, ...) any shape with a batch dimension.
        teacher_features: (B, ...).
    """
    b = student_features.shape[0]
    s = student_features.flatten(1)
    t = teacher_features.flatten(1)
    g_s = F.normalize(s @ s.t(), dim=1)
    g_t = F.normalize(t @ t.t(), dim=1)
    return (g_s - g_t).pow(2).sum() / (b * b)


def pkt_loss(student_features: torch.Tensor, teacher_features: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018, "Learning Deep Representations with
    Probabilistic Knowledge Transfer").

    With cosine-similarity kernel ``K(i, j) = (1 + cos(f_i, f_j)) / 2`` the conditional probabilities are
    ``p(i|j) = K(i, j) / Σ_{k≠j} K(k, j)`` for ``i ≠ j``; the loss is ``KL(P_t(·|j) ‖ P_s(·|j))`` averaged over
    the anchors j. Widths may differ.

    Args:
        student_features: (B, ...), B >= 2.
        teacher_features: (B, ...).
        eps: guards the logarithm.
    """

    def conditional(f: torch.Tensor) -> torch.Tensor:  # (B, B), column j = p(.|j), zero diagonal
        f = F.normalize(f.flatten(1), dim=1)
        k = (1.0 + f @ f.t()) / 2.0
        k = k * (1.0 - torch.eye(len(f), dtype=f.dtype, device=f.device))
        return k / k.sum(0, keepdim=True).clamp_min(eps)

    p_s, p_t = conditional(student_features), conditional(teacher_features)
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).sum(0).mean()


def _pairwise_distances(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """(B, B) Euclidean distances, exact zeros on the diagonal and a finite gradient there."""
    sq = x.pow(2).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * x @ x.t()).clamp_min(eps)
    d = d2.sqrt()
    return d * (1.0 - torch.eye(len(x), dtype=x.dtype, device=x.device))


def rkd_distance_loss(student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """RKD distance term (Park, Kim, Lu & Cho, CVPR 2019, "Relational Knowledge Distillation").

    Pairwise Euclidean distances of each model's embeddings, each divided by its mean over the pairs
    ``i ≠ j``, compared with the Huber loss (δ = 1), averaged over all B² entries (the diagonal is 0 on both
    sides). Scale-free and independent of the batch order. A batch of one sample has no pair: the term is 0.

    Args:
        student_features, teacher_features: (B, ...) flattened to (B, D_s), (B, D_t).
    """
    b = student_features.shape[0]
    off = 1.0 - torch.eye(b, dtype=student_features.dtype, device=student_features.device)
    pairs = max(b * (b - 1), 1)  # B = 1 has no pair; dividing by 0 pairs made the mean distance (and loss) NaN

    def normalised(f: torch.Tensor) -> torch.Tensor:
        d = _pairwise_distances(f.flatten(1))
        return d / ((d * off).sum() / pairs).clamp_min(1e-12)

    return F.smooth_l1_loss(normalised(student_features), normalised(teacher_features))


def _angles(f: torch.Tensor) -> torch.Tensor:
    """(B, B, B): entry [j, i, k] = cos of the angle at vertex j between i and k (0 when degenerate)."""
    e = F.normalize(f[None, :, :] - f[:, None, :], dim=2)  # e[j, i] = unit(f_i - f_j), (B, B, D)
    return e @ e.transpose(1, 2)


def rkd_angle_loss(student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """RKD angle term (Park et al., CVPR 2019): the cosine of every angle ∠(f_i, f_j, f_k) of each model's
    embeddings, compared with the Huber loss (δ = 1), averaged over all B³ triplets (degenerate triplets,
    i = j or k = j, are 0 on both sides). Needs (B, D) memory of B³ floats.

    Args:
        student_features, teacher_features: (B, ...) flattened to (B, D_s), (B, D_t).
    """
    return F.smooth_l1_loss(_angles(student_features.flatten(1)), _angles(teacher_features.flatten(1)))


def rkd_loss(student_features: torch.Tensor, teacher_features: torch.Tensor, distance_weight: float = 25.0,
             angle_weight: float = 50.0) -> torch.Tensor:
    """RKD-DA (Park et al., CVPR 2019): ``distance_weight · distance + angle_weight · angle`` (the paper's
    weights 25 and 50). See :func:`rkd_distance_loss`, :func:`rkd_angle_loss`."""
    return (distance_weight * rkd_distance_loss(student_features, teacher_features)
            + angle_weight * rkd_angle_loss(student_features, teacher_features))


def rbf_taylor_kernel(features: torch.Tensor, gamma: float = 0.4, order: int = 2) -> torch.Tensor:
    """Gaussian RBF kernel matrix approximated by a Taylor series (Peng et al., ICCV 2019, eq. 8).

    On unit vectors ``‖x - y‖² = 2 - 2xᵀy``, so ``exp(-γ‖x - y‖²) = e^{-2γ} Σ_p (2γ)^p / p! · (xᵀy)^p``,
    truncated after ``order``.

    Args:
        features: (B, ...) flattened to (B, D) and L2-normalised.

    Returns:
        (B, B) kernel matrix.
    """
    f = F.normalize(features.flatten(1), dim=1)
    c = f @ f.t()
    out = torch.zeros_like(c)
    term = torch.ones_like(c)
    for p in range(order + 1):
        if p:
            term = term * (2.0 * gamma) * c / p
        out = out + term
    return math.exp(-2.0 * gamma) * out


def cc_loss(student_features: torch.Tensor, teacher_features: torch.Tensor, gamma: float = 0.4,
            order: int = 2) -> torch.Tensor:
    """Correlation congruence (Peng, Jin, Liu, Li, Wu, Liu, Zhou & Zhang, ICCV 2019, "Correlation Congruence
    for Knowledge Distillation").

    ``‖K_s - K_t‖_F² / B²`` between the sample-correlation matrices of student and teacher embeddings,
    ``K`` the Taylor-approximated Gaussian RBF kernel of :func:`rbf_taylor_kernel`. Widths may differ.

    Args:
        student_features, teacher_features: (B, ...).
        gamma, order: kernel width and Taylor order.
    """
    b = student_features.shape[0]
    diff = rbf_taylor_kernel(student_features, gamma, order) - rbf_taylor_kernel(teacher_features, gamma, order)
    return diff.pow(2).sum() / (b * b)


def crd_scores(anchor: torch.Tensor, candidates: torch.Tensor, temperature: float) -> torch.Tensor:
    """``<anchor, candidate> / temperature``: (B, D) x (K, D) -> (B, K), or (B, D) x (B, K, D) -> (B, K)."""
    if candidates.dim() == 2:
        return anchor @ candidates.t() / temperature
    return torch.einsum("bd,bkd->bk", anchor, candidates) / temperature


def crd_negatives_excluding(draws: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """Negative indices that never hit the anchor's own sample, from draws shared by the batch.

    ``draws`` are uniform over ``{0, ..., N - 2}``; for anchor b, ``draws + (draws >= own[b])`` maps them one to
    one onto ``{0, ..., N - 1}`` minus ``own[b]``, so each anchor's negatives are uniform over the *other* samples.
    Only two shared candidates exist per draw (``r`` and ``r + 1``), so scores need no per-anchor gather.

    Args:
        draws: (K,) integers in [0, N - 2].
        own: (B,) the anchors' sample indices in [0, N - 1].

    Returns:
        (B, K) indices.
    """
    return draws[None, :] + (draws[None, :] >= own[:, None]).to(draws.dtype)


def crd_log_z_from_scores(pos_scores: torch.Tensor, neg_scores: torch.Tensor, num_samples: int) -> torch.Tensor:
    """Monte-Carlo estimate of CRD's ``log Z``: ``log(N · mean(exp(score)))`` over the positive (B,) and negative
    (B, K) scores ``aᵀv / τ`` (Tian et al. fix Z from the first batch; detached)."""
    with torch.no_grad():
        scores = torch.cat([pos_scores.reshape(-1, 1), neg_scores.reshape(len(pos_scores), -1)], dim=1)
        return torch.logsumexp(scores.flatten(), 0) - math.log(scores.numel()) + math.log(num_samples)


def crd_log_normaliser(anchor: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor, num_samples: int,
                       temperature: float = 0.07) -> torch.Tensor:
    """Monte-Carlo estimate of CRD's ``log Z`` from one batch: ``log(N · mean(exp(score)))`` over the positive
    and negative scores (Tian et al. fix Z from the first batch; detached)."""
    pos = (anchor * positive).sum(1) / temperature
    return crd_log_z_from_scores(pos, crd_scores(anchor, negatives, temperature), num_samples)


def crd_nce_loss(anchor: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor, num_samples: int,
                 temperature: float = 0.07, log_z: torch.Tensor = None) -> torch.Tensor:
    """Contrastive representation distillation, NCE form (Tian, Krishnan & Isola, ICLR 2020, "Contrastive
    Representation Distillation").

    A critic ``h(a, v) = P / (P + K/N)`` with ``P = exp(aᵀv / τ) / Z`` tells the positive pair (the other
    model's embedding of the same sample) from K negatives drawn uniformly among the N training samples:

    ``loss = -mean_b [ log h(a_b, v_b⁺) + Σ_k log(1 - h(a_b, v_k⁻)) ]``

    computed in log space (``log h = ℓ - logaddexp(ℓ, log(K/N))`` with ``ℓ = aᵀv/τ - log Z``).

    Args:
        anchor: (B, D) unit embeddings of one model.
        positive: (B, D) unit embeddings of the other model for the same samples.
        negatives: (K, D) unit embeddings shared by the batch, or (B, K, D) per anchor.
        num_samples: N, the training-set size.
        temperature: τ.
        log_z: ``log Z``; estimated from this batch (:func:`crd_log_normaliser`) when None.
    """
    pos = (anchor * positive).sum(1) / temperature  # (B,)
    neg = crd_scores(anchor, negatives, temperature)  # (B, K)
    return crd_nce_loss_from_scores(pos, neg, num_samples, log_z)


def crd_nce_loss_from_scores(pos_scores: torch.Tensor, neg_scores: torch.Tensor, num_samples: int,
                             log_z: torch.Tensor = None) -> torch.Tensor:
    """:func:`crd_nce_loss` from the scores ``aᵀv / τ``: positive (B,), negative (B, K)."""
    if log_z is None:
        log_z = crd_log_z_from_scores(pos_scores, neg_scores, num_samples)
    log_noise = math.log(neg_scores.shape[-1] / num_samples)
    pos = pos_scores - log_z  # (B,)
    neg = neg_scores - log_z  # (B, K)
    log_h_pos = pos - torch.logaddexp(pos, torch.full_like(pos, log_noise))
    log_not_h_neg = log_noise - torch.logaddexp(neg, torch.full_like(neg, log_noise))
    return -(log_h_pos + log_not_h_neg.sum(1)).mean()
