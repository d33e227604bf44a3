"""Contrastive representation distillation with a memory bank (Tian et al., ICLR 2020)."""

from __future__ import annotations

import math
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import KdkitError
from ..losses import crd_log_z_from_scores, crd_nce_loss_from_scores, crd_negatives_excluding, crd_scores
from .base import METHODS, Batch
from .feature_base import FeatureMethod


@METHODS.register("crd")
class CRD(FeatureMethod):
    """Contrastive representation distillation (Tian, Krishnan & Isola, ICLR 2020, "Contrastive Representation
    Distillation").

    Student and teacher embeddings are projected by two trainable linear heads to ``feat_dim`` and
    L2-normalised. Two memory banks of ``num_samples`` rows (one per model, buffers of the method, updated
    with ``momentum`` at the rows ``batch["index"]``) supply the contrast: each teacher embedding must pick
    the student-memory row of its own sample out of ``nce_k`` random rows, and vice versa
    (:func:`kdkit.losses.crd_nce_loss`, NCE with the normalising constant Z fixed from the first batch as in
    the paper's code)::

        loss = ce_weight · CE + kd_weight · KD + beta · (crd_s + crd_t)

    One deviation for memory: the ``nce_k`` negatives are drawn once per batch and shared by its samples
    (the paper draws them per sample), which keeps the cost at 2 x B x K dot products instead of a (B, K, D)
    gather. They are drawn with replacement, uniformly among the ``num_samples - 1`` samples other than each
    anchor's own (:func:`kdkit.losses.crd_negatives_excluding`): an anchor is never contrasted with its own
    memory row. Other samples of the batch can be negatives, as in the paper.

    Under DDP (``torchrun``) the memory banks are module buffers, which DDP re-broadcasts from rank 0 at
    every forward: rows written by other ranks are overwritten, so their samples' memory lags. Train CRD
    on one process, or accept the weaker memory.

    Args:
        student_layer, teacher_layer: embedding layers (default ``head:input`` of each).
        num_samples: training-set size (supplied by ``kdkit.api.build_method``); batches must carry
            ``index`` (every kdkit loader provides it).
        feat_dim: projection width (paper: 128).
        nce_k: negatives per batch (paper: 16384), capped at ``num_samples - 1``.
        nce_t: temperature τ (paper: 0.07).
        momentum: memory update momentum (paper: 0.5).
        beta: weight (0.8, the paper's setting).
        ce_weight, kd_weight, temperature: see :class:`~kdkit.methods.feature_base.FeatureMethod`.
    """

    feature_kind = "embedding"
    part = "crd"
    teacher_through_forward_pass = True  # its forward takes the teacher's side from self.run (forward_pass) only

    def __init__(self, student: nn.Module, teacher, num_samples: Optional[int] = None, feat_dim: int = 128,
                 nce_k: int = 4096, nce_t: float = 0.07, momentum: float = 0.5, beta: float = 0.8, **kwargs):
        super().__init__(student, teacher, beta=beta, **kwargs)  # layers, ce/kd weights: FeatureMethod's
        if num_samples is None or num_samples < 2:
            raise KdkitError("crd needs num_samples (the training-set size, >= 2) for its memory bank; "
                             "kdkit.api.build_method / distill supply it")
        if not 0.0 <= momentum < 1.0 or nce_t <= 0 or feat_dim < 1 or nce_k < 1:
            raise ValueError("crd: need 0 <= momentum < 1, nce_t > 0, feat_dim >= 1, nce_k >= 1")
        self.num_samples, self.nce_k = num_samples, min(nce_k, num_samples - 1)
        self.nce_t, self.momentum = nce_t, momentum
        s_dim = math.prod(self.student_shapes[0][1:])
        t_dim = math.prod(self.teacher_shapes[0][1:])
        self.embed_s = nn.Linear(s_dim, feat_dim)
        self.embed_t = nn.Linear(t_dim, feat_dim)
        # Random unit rows to start, as the paper's uniform initialisation; saved with the training state.
        g = torch.Generator().manual_seed(0)
        self.register_buffer("memory_s", F.normalize(torch.randn(num_samples, feat_dim, generator=g), dim=1))
        self.register_buffer("memory_t", F.normalize(torch.randn(num_samples, feat_dim, generator=g), dim=1))
        self.register_buffer("log_z", torch.full((2,), float("nan")))  # (student anchor, teacher anchor)

    def forward(self, batch: Batch) -> Dict[str, torch.Tensor]:
        if "index" not in batch:
            raise KdkitError("crd needs batch['index'] (sample positions) for its memory bank; use a kdkit loader")
        logits, feats, t_logits, t_feats = self.run(batch)
        idx = batch["index"].to(self.memory_s.device).long()
        if int(idx.max()) >= self.num_samples or int(idx.min()) < 0:
            raise KdkitError(f"crd: batch index {int(idx.max())} outside the memory bank of {self.num_samples} "
                             f"samples; num_samples must be the training-set size")
        v_s = F.normalize(self.embed_s(feats[0].flatten(1)), dim=1)  # (B, feat_dim)
        v_t = F.normalize(self.embed_t(t_feats[0].flatten(1)), dim=1)
        # Negatives shared by the batch, uniform over the samples other than each anchor's own: draws r in
        # [0, N - 2], and anchor b reads row r + (r >= idx[b]) (crd_negatives_excluding). Only rows r and r + 1
        # can be read, so two shared (K, D) gathers replace a (B, K, D) one.
        draws = torch.randint(0, self.num_samples - 1, (self.nce_k,), device=idx.device)
        skip_own = crd_negatives_excluding(draws, idx) != draws  # (B, K): where anchor b reads row r + 1
        pos_t, pos_s = self.memory_t[idx], self.memory_s[idx]

        def scores(anchor: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:  # (B,), (B, K)
            pos = (anchor * memory[idx]).sum(1) / self.nce_t
            below, above = (crd_scores(anchor, memory[r], self.nce_t) for r in (draws, draws + 1))
            return pos, torch.where(skip_own, above, below)

        pos_st, neg_st = scores(v_s, self.memory_t)  # the student anchor against the teacher memory
        pos_ts, neg_ts = scores(v_t, self.memory_s)  # and the other way round
        if bool(torch.isnan(self.log_z).any()):
            self.log_z[0] = crd_log_z_from_scores(pos_st, neg_st, self.num_samples)
            self.log_z[1] = crd_log_z_from_scores(pos_ts, neg_ts, self.num_samples)
        crd_s = crd_nce_loss_from_scores(pos_st, neg_st, self.num_samples, self.log_z[0])
        crd_t = crd_nce_loss_from_scores(pos_ts, neg_ts, self.num_samples, self.log_z[1])
        if self.training:
            with torch.no_grad():
                m = self.momentum
                self.memory_s[idx] = F.normalize(m * pos_s + (1.0 - m) * v_s.detach(), dim=1)
                self.memory_t[idx] = F.normalize(m * pos_t + (1.0 - m) * v_t.detach(), dim=1)
        return self.combine(batch, logits, t_logits, crd_s + crd_t, parts={"crd_s": crd_s, "crd_t": crd_t})
