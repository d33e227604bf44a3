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
- **a teacher store** (``store_kind: topk | sampled | full`` with ``store_size``, or ``store: PATH``): the
  teacher's distribution over the training rows, written once (by ``kdkit cache`` on the same config, or at the
  start of the first run) and read by any number of students, which then never run the teacher
  (:mod:`kdkit.lm.store`). ``sampled`` keeps S tokens drawn from the teacher per position (an unbiased target,
  about 3 bytes per kept token), ``topk`` the k most likely with the missing mass as one bucket, ``full`` the
  whole distribution in float16. ``store: PATH`` names the folder (written there if absent, refused if it was
  written for another teacher, tokenizer or data); without it, the store lives under ``store_dir`` in a
  folder named by a hash of the teacher, the data and the settings. ``teacher_topk: k`` is
  ``store_kind: topk, store_size: k``.
"""

from __future__ import annotations

from pathlib import Path
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
        store: folder of the teacher store to read (and to write there if absent); None: see ``store_kind``.
        store_kind: topk | sampled | full: train against a teacher store of this kind (None with no ``store``:
            the live teacher).
        store_size: k of a topk store, draws per position of a sampled one (at most 255).
        store_dir: parent folder of stores named by hash (default ``$KDKIT_CACHE_DIR/lm_store`` or
            ``~/.cache/kdkit/lm_store``).
        store_seed: the seed of a sampled store's draws.
        store_sampling: systematic (default) | multinomial: how a sampled store draws (see
            :func:`kdkit.lm.store.sample_counts`).
        teacher_topk: the same as ``store_kind: topk, store_size: teacher_topk``; topk_dir: as ``store_dir``.
        teacher_tokenizer: the teacher's own ``tokenizer.json`` (or a folder holding one) when it has another
            tokenizer: the texts are aligned byte by byte and compared with ``cross_loss``
            (:mod:`kdkit.lm.cross`); None: one shared tokenizer.
        cross_loss: uld | merged | hybrid (with ``teacher_tokenizer``).
        example_batch: supplied by kdkit: checked to hold token data.
    """

    def __init__(self, student: nn.Module, teacher, divergence: str = "forward_kl", beta: float = 0.5,
                 skew: float = 0.1, temperature: float = 1.0, alpha: float = 1.0, chunk_size: int = 0,
                 store: Optional[str] = None, store_kind: Optional[str] = None, store_size: Optional[int] = None,
                 store_dir: Optional[str] = None, store_seed: int = 0, store_sampling: str = "systematic",
                 teacher_topk: Optional[int] = None,
                 topk_dir: Optional[str] = None, teacher_tokenizer: Optional[str] = None, cross_loss: str = "hybrid",
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
        if teacher_topk is not None:
            if store_kind not in (None, "topk") or (store_size is not None and store_size != teacher_topk):
                raise KdkitError(f"teacher_topk={teacher_topk} is store_kind: topk, store_size: {teacher_topk}; it "
                                 f"contradicts store_kind={store_kind!r}, store_size={store_size!r}: give one of them")
            store_kind, store_size = "topk", teacher_topk
        store_dir = store_dir if store_dir is not None else topk_dir
        s_vocab = getattr(student, "vocab_size", None)
        t_vocab = getattr(getattr(teacher, "model", None), "vocab_size", None)
        if s_vocab is not None and t_vocab is not None and s_vocab != t_vocab and teacher_tokenizer is None:
            raise KdkitError(f"teacher vocabulary has {t_vocab} tokens but the student's has {s_vocab}; give the "
                             "teacher's tokenizer (method.teacher_tokenizer: its tokenizer.json) to distil across "
                             "tokenizers, or use one shared tokenizer")
        if teacher_tokenizer is not None:
            from ..lm.cross import CROSS_LOSSES

            if cross_loss not in CROSS_LOSSES:
                raise KdkitError(f"cross_loss must be one of {', '.join(CROSS_LOSSES)}; got {cross_loss!r}")
            if (store_kind not in (None, "full")) or teacher_topk is not None:
                raise KdkitError(f"a teacher with its own tokenizer is stored whole (store_kind: full): the "
                                 f"cross-tokenizer losses need its entire next-token distribution and the probability "
                                 f"of every token of a group; got store_kind={store_kind or 'topk'}")
        vocab = t_vocab if t_vocab is not None else s_vocab
        if teacher_topk is not None and vocab is not None and teacher_topk > int(vocab):
            raise KdkitError(f"teacher_topk={teacher_topk} is larger than the vocabulary ({vocab} tokens); expected "
                             f"1..{vocab} (k = {vocab} keeps every token: the full distribution)")
        if store_kind is not None:
            from ..lm.store import check_divergence, check_kind

            check_kind(store_kind, store_size, int(vocab) if vocab is not None else None)
            check_divergence(store_kind, divergence)
            from ..lm.store import SAMPLINGS

            if store_sampling not in SAMPLINGS:
                raise KdkitError(f"store_sampling must be one of {', '.join(SAMPLINGS)}; got {store_sampling!r}")
        self.divergence, self.beta, self.skew = divergence, beta, skew
        self.temperature, self.alpha = temperature, alpha
        self.chunk_size = chunk_size or "auto"
        self.store_path, self.store_kind, self.store_size = store, store_kind, store_size
        self.store_dir, self.store_seed, self.store_sampling = store_dir, int(store_seed), store_sampling
        self.store = None  # the teacher store, attached by prepare()
        self.teacher_tokenizer, self.cross_loss = teacher_tokenizer, cross_loss
        self.cross = None  # the cross-tokenizer alignment, attached by prepare()

    @property
    def uses_store(self) -> bool:
        return self.store_kind is not None or self.store_path is not None

    @property
    def teacher_cache_refusal(self) -> str:
        """Why kdkit's dense teacher-output cache is not used (read by :func:`kdkit.teacher.plan.cache_plan`)."""
        if self.uses_store:
            return "lm_kd reads its teacher store (method.store / store_kind), not the dense cache"
        return ("lm_kd compares full next-token distributions: a dense cache would hold N x L x V floats per run "
                "(set method.store_kind: sampled, topk or full for a teacher store written once)")

    def prepare(self, train_data, *, batch_size: int = 64, log=None) -> Optional[str]:
        """Before the first step: open, or write, the teacher store (``store`` / ``store_kind``); a description.

        Under torchrun the first process writes a missing store while the others wait, then every process opens
        it and reads the rows of its own batches."""
        if self.teacher_tokenizer is not None:
            return self._prepare_cross(train_data, log)
        if not self.uses_store:
            return None
        self.store = self._store_for(train_data, self.store_kind, self.store_size, self.temperature, batch_size, log)
        self.store.check_run(self.divergence, self.temperature)
        return self.store.describe()

    def _store_for(self, rows, kind: Optional[str], size: Optional[int], temperature: float, batch_size: int, log):
        """The store of ``rows``: ``method.store`` opened as it is (no kind given), or written once (rank 0 first
        under torchrun, the others then open it) or reused."""
        from ..lm.store import TeacherStore, build_store, store_fingerprint

        model = self.teacher.model
        if kind is None:  # store: PATH alone: it must exist; its own kind and size apply
            if not (Path(self.store_path) / "store.json").is_file():
                raise KdkitError(f"method.store {self.store_path} is not a teacher store (no store.json); give "
                                 "method.store_kind (and store_size) to write one there")
            return TeacherStore.open(self.store_path, store_fingerprint(model, rows))

        def build():
            return build_store(model, rows, kind, size, temperature=temperature, path=self.store_path,
                               folder=self.store_dir, seed=self.store_seed, sampling=self.store_sampling,
                               batch_size=batch_size, log=log)

        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return build()
        store = build() if dist.get_rank() == 0 else None
        dist.barrier()
        return store if store is not None else build()  # now written: opened and checked

    @property
    def cross_tokenizer(self) -> bool:
        """Whether the teacher has its own tokenizer (then it never sees the student's ids)."""
        return self.teacher_tokenizer is not None

    def _prepare_cross(self, train_data, log) -> str:
        from ..lm.cross import align
        from ..lm.tokenizer import load_tokenizer

        path = getattr(train_data, "tokenizer_path", None)
        if not path:
            raise KdkitError("cross-tokenizer distillation rebuilds each row's text from the student's tokens and "
                             "needs the student's tokenizer.json: this training data names none (tokenizer_path)")
        self.tokenizers = (load_tokenizer(path), load_tokenizer(self.teacher_tokenizer))  # kept for generated text
        self.tokenizer_path = path
        self.cross = align(train_data, *self.tokenizers,
                           max_length=getattr(getattr(self.teacher, "model", None), "max_positions", None))
        if log and (self.cross.unaligned or self.cross.truncated):
            log(f"lm_kd: {self.cross.describe()}")
        text = self.cross.describe()
        if self.uses_store:  # the teacher's whole distributions over its own tokens, written once
            from ..lm.data import TokenData

            t_tok = self.tokenizers[1]
            rows = TokenData(self.cross.teacher_x, self.cross.teacher_y, self.cross.pad_id,
                             t_tok.token_to_id("<|endoftext|>"), getattr(t_tok, "kdkit_path", None))
            self.store = self._store_for(rows, self.store_kind and "full", None, 1.0, 64, log)
            if self.store.kind != "full":
                raise KdkitError(f"teacher store {self.store_path} is a {self.store.kind} store; a teacher with "
                                 "its own tokenizer needs a full store")
            text += f"; {self.store.describe()}"
        return text

    def teacher_tokens(self, data):
        """``data`` (student tokens) tokenised for the teacher: a :class:`kdkit.lm.data.TokenData` of the same
        documents, to measure the teacher on its own tokens (rows it cannot reproduce hold nothing)."""
        from ..lm.cross import align
        from ..lm.data import TokenData
        from ..lm.tokenizer import load_tokenizer

        t_tok = load_tokenizer(self.teacher_tokenizer)
        al = align(data, load_tokenizer(data.tokenizer_path), t_tok,
                   max_length=getattr(getattr(self.teacher, "model", None), "max_positions", None))
        return TokenData(al.teacher_x, al.teacher_y, al.pad_id, t_tok.token_to_id("<|endoftext|>"),
                         getattr(t_tok, "kdkit_path", None))

    def _cross_forward(self, batch: Batch, logits: torch.Tensor) -> Dict[str, torch.Tensor]:
        from ..lm.cross import batch_groups, cross_distill_loss

        index = batch["index"].cpu()
        tx = self.cross.teacher_x[index]
        real = (tx != self.cross.pad_id).any(0).nonzero()
        tx = tx[:, :int(real.max()) + 1 if len(real) else 1].to(logits.device)  # trailing padding trimmed
        if self.store is not None:  # the stored log-probabilities (T = 1) act as the teacher's logits
            ty = self.cross.teacher_y[index][:, :tx.shape[1]]
            stored = self.store.targets(index, logits.device)
            t_logits = torch.zeros(*ty.shape, stored.vocab_size, device=logits.device)
            t_logits[ty.to(logits.device) != IGNORE_INDEX] = stored.log_probs.float()
        else:
            with torch.no_grad():
                t_logits = self.teacher.model(tx)
        out = cross_distill_loss(logits, batch["x"], batch["y"], t_logits, tx, batch_groups(self.cross, index),
                                 self.cross.shared, loss=self.cross_loss, alpha=self.alpha,
                                 temperature=self.temperature)
        return {"loss": out.loss, self.cross_loss: out.kd, "ce": out.ce, "logits": logits}

    def forward(self, batch: Batch) -> Dict[str, torch.Tensor]:
        from ..lm import losses

        logits = self.student(batch["x"])  # (B, L', V)
        y = batch["y"][:, :logits.shape[1]]  # trimmed columns are padding (-100) in every row
        if self.cross_tokenizer:
            if not self.training:  # evaluation: the student's own loss (the teacher cannot read these ids)
                ce = losses.next_token_cross_entropy(logits, y)
                return {"loss": ce, "ce": ce.detach(), "logits": logits}
            if self.cross is None:
                raise KdkitError("lm_kd with teacher_tokenizer aligns the training rows before the first step: call "
                                 "method.prepare(train_data) first (kdkit's fit does)")
            return self._cross_forward(batch, logits)
        if self.store is not None:  # the teacher's record of these rows, written before training
            from ..lm.store import store_distill_loss

            targets = self.store.targets(batch["index"], logits.device)
            out = store_distill_loss(logits, y, targets, divergence=self.divergence, temperature=self.temperature,
                                     alpha=self.alpha, beta=self.beta, skew=self.skew, chunk_size=self.chunk_size,
                                     ignore_index=IGNORE_INDEX)
        else:
            t_logits = self.teacher(batch)  # (B, L', V): the same trimming, the same length
            out = losses.lm_distill_loss(logits, t_logits, y, divergence=self.divergence,
                                         temperature=self.temperature, alpha=self.alpha, beta=self.beta,
                                         skew=self.skew, chunk_size=self.chunk_size, ignore_index=IGNORE_INDEX)
        return {"loss": out.loss, self.divergence: out.kd, "ce": out.ce, "logits": logits}
