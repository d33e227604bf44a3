"""Token-level distillation of causal language models (``lm_kd``).

Every position that predicts a token (``y != -100``) compares the student's next-token distribution with the
teacher's through one divergence from :mod:`kdkit.lm.losses` (forward KL: Hinton et al. 2015 / Kim & Rush 2016's
word-level KD; reverse KL: Gu et al. 2024; generalised JSD(beta): Agarwal et al. 2024 (GKD); skew KL: Ko et al.
2024 (DistiLLM); total variation), computed in chunks of tokens so that memory stays bounded, and mixes it with
the next-token cross-entropy on the data::

    loss = alpha · T² · mean_tokens D(p_teacher^T ‖ q_student^T) + (1 - alpha) · mean_tokens CE(q_student, y)

``alpha`` weighs the distillation term as in kdkit's ``kd`` (1 = pure distillation, 0 = the data alone).

Where the teacher's distribution comes from:

- **live** (default): the frozen teacher runs on each batch. kdkit's dense teacher-output cache is refused for
  this method: it would hold N × L × V floats (configs/lm_kd.yaml: 1,877 rows × 64 positions × 1,024 tokens
  × 4 bytes = 0.49 GB; with a 32k vocabulary, 32 times more), and the wrapped models trim padding per batch, so
  outputs have no fixed per-sample shape;
- **offline top-k** (``teacher_topk: k``): before the first step the teacher's ``k`` largest logits per target
  position (fp16 values, int32 ids) and its probability mass outside them are computed once over the training
  set and stored on disk under a fingerprint of the teacher's weights, the data and ``k`` (reused by later
  runs); the student then trains against them without running the teacher (:mod:`kdkit.lm.topk`; the missing
  mass is one extra bucket of the distribution, not dropped). The storage per million tokens and the KL lost to
  truncation are measured and reported.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

from ..data.core import IGNORE_INDEX
from ..errors import KdkitError
from .base import METHODS, Batch, Method

DIVERGENCE_NAMES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tv")


@METHODS.register("lm_kd")
class LMKD(Method):
    """Token-level KD for causal LMs (see the module docstring).

    Args:
        student, teacher: causal LMs over one vocabulary ((B, L) ids -> (B, L', V) logits).
        divergence: forward_kl | reverse_kl | jsd | skew_kl | skew_reverse_kl | tv.
        beta: JSD's beta in (0, 1) (``jsd``).
        skew: the skew alpha of DistiLLM in [0, 1) (``skew_kl``, ``skew_reverse_kl``).
        temperature: softening temperature T of the divergence (the cross-entropy stays at T = 1).
        alpha: weight of the distillation term in [0, 1]; ``1 - alpha`` weighs the data's next-token CE.
        chunk_size: predicted tokens per chunk of the loss (0: about 2**22 logits per chunk).
        teacher_topk: train against the teacher's offline top-k (k >= 1); None: the live teacher.
        topk_dir: folder of the top-k stores (default ``$KDKIT_CACHE_DIR/lm_topk`` or ``~/.cache/kdkit/lm_topk``).
        example_batch: supplied by kdkit: checked to hold token data.
    """

    def __init__(self, student: nn.Module, teacher, divergence: str = "forward_kl", beta: float = 0.5,
                 skew: float = 0.1, temperature: float = 1.0, alpha: float = 1.0, chunk_size: int = 0,
                 teacher_topk: Optional[int] = None, topk_dir: Optional[str] = None,
                 example_batch: Optional[Batch] = None):
        super().__init__(student, teacher)
        if example_batch is not None:
            x, y = example_batch.get("x"), example_batch.get("y")
            if x.dim() != 2 or x.is_floating_point() or y is None or y.shape != x.shape:
                raise KdkitError(f"method lm_kd distils causal language models: it needs token ids x (N, L) with "
                                 f"next-token targets y (N, L) (e.g. dataset fortunes_lm or text_lm); got x of shape "
                                 f"{tuple(x.shape)} and {'no y' if y is None else f'y of shape {tuple(y.shape)}'}")
        from ..lm.losses import check_options

        check_options(divergence, temperature, alpha, beta, skew)
        if chunk_size < 0:
            raise KdkitError(f"chunk_size must be >= 0 (0: automatic); got {chunk_size}")
        if teacher_topk is not None and teacher_topk < 1:
            raise KdkitError(f"teacher_topk must be >= 1 (or null for the live teacher); got {teacher_topk}")
        s_vocab = getattr(student, "vocab_size", None)
        t_vocab = getattr(getattr(teacher, "model", None), "vocab_size", None)
        if s_vocab is not None and t_vocab is not None and s_vocab != t_vocab:
            raise KdkitError(f"teacher vocabulary has {t_vocab} tokens but the student's has {s_vocab}; token-level "
                             f"distillation needs one shared tokenizer (mapping between vocabularies is not "
                             f"supported by kdkit)")
        vocab = t_vocab if t_vocab is not None else s_vocab
        if teacher_topk is not None and vocab is not None and teacher_topk > int(vocab):
            raise KdkitError(f"teacher_topk={teacher_topk} is larger than the vocabulary ({vocab} tokens); expected "
                             f"1..{vocab} (k = {vocab} keeps every token: the full distribution)")
        self.divergence, self.beta, self.skew = divergence, beta, skew
        self.temperature, self.alpha = temperature, alpha
        self.chunk_size = chunk_size or "auto"
        self.teacher_topk, self.topk_dir = teacher_topk, topk_dir
        self.store = None  # the offline top-k store, attached by prepare()

    @property
    def teacher_cache_refusal(self) -> str:
        """Why kdkit's dense teacher-output cache is not used (read by :func:`kdkit.teacher.plan.cache_plan`)."""
        if self.teacher_topk is not None:
            return "lm_kd reads the teacher's offline top-k store (method.teacher_topk), not the dense cache"
        return ("lm_kd compares full next-token distributions: a dense cache would hold N x L x V floats per run "
                "(set method.teacher_topk for the offline top-k store)")

    def prepare(self, train_data, *, batch_size: int = 64, log=None) -> Optional[str]:
        """Before the first step: build or reuse the offline top-k store (``teacher_topk``); a description."""
        if self.teacher_topk is None:
            return None
        from ..lm.offline import build_topk_store

        self.store = build_topk_store(self.teacher.model, train_data, self.teacher_topk,
                                      temperature=self.temperature, cache_dir=self.topk_dir, batch_size=batch_size,
                                      log=log)
        return self.store.describe()

    def forward(self, batch: Batch) -> Dict[str, torch.Tensor]:
        from ..lm import losses

        logits = self.student(batch["x"])  # (B, L', V)
        y = batch["y"][:, :logits.shape[1]]  # trimmed columns are padding (-100) in every row
        if self.store is not None:  # offline: the teacher's top-k of these rows, stored before training
            from ..lm.topk import sparse_distill_loss

            targets = self.store.targets(batch["index"], logits.device)
            out = sparse_distill_loss(logits, y, targets, divergence=self.divergence, alpha=self.alpha,
                                      beta=self.beta, skew=self.skew, chunk_size=self.chunk_size,
                                      ignore_index=IGNORE_INDEX)
        else:
            t_logits = self.teacher(batch)  # (B, L', V): the same trimming, the same length
            out = losses.lm_distill_loss(logits, t_logits, y, divergence=self.divergence,
                                         temperature=self.temperature, alpha=self.alpha, beta=self.beta,
                                         skew=self.skew, chunk_size=self.chunk_size, ignore_index=IGNORE_INDEX)
        return {"loss": out.loss, self.divergence: out.kd, "ce": out.ce, "logits": logits}
