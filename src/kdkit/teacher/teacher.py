"""The frozen teacher, and several frozen teachers acting as one (:class:`TeacherEnsemble`).

A :class:`Teacher` is deliberately *not* an ``nn.Module``: it is never a
submodule of a method, so ``method.parameters()`` never includes it, it never
reaches the optimiser, and ``method.train()`` never switches it out of eval
mode. It runs under ``torch.inference_mode()``.

Caching its outputs is the teacher's business: while the engine trains with a
:class:`kdkit.teacher.cache.TeacherCache` attached (``train.teacher_cache``), a call with a
batch dict answers by ``batch["index"]`` from the cache (complete before the first step),
so methods never know. A method that reads the teacher's intermediate layers gets them, with the outputs,
from :meth:`Teacher.with_features` (through :func:`kdkit.methods.base.run_networks`): the one place where they
come either from the cache (which then holds those layers) or from a live pass with forward hooks. Whether a
cache may be attached at all is decided once, before training, by :func:`kdkit.teacher.plan.cache_plan`.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple, Union

import torch
from torch import nn

from ..data.core import teacher_inputs

Batch = Dict[str, torch.Tensor]


class Teacher:
    """Frozen, eval-mode wrapper around a trained model.

    Call it with a batch dict (or an input tensor) to get its outputs.

    Args:
        model: the trained teacher network.
    """

    def __init__(self, model: nn.Module):
        self.model = model.eval().requires_grad_(False)
        self.cache = None  # a kdkit.teacher.cache.TeacherCache of the training set while the engine trains with one
        self.cache_hits = 0  # calls answered from the cache
        self.live_calls = 0  # calls that ran the network

    def to(self, device: Union[str, torch.device]) -> "Teacher":
        self.model.to(device)
        return self

    @property
    def device(self) -> torch.device:
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def use_cache(self, cache) -> None:
        """Answer batches by ``batch["index"]`` from ``cache`` (a complete :class:`kdkit.teacher.cache.TeacherCache`
        of the dataset those indices refer to), or run live again with ``None``. The engine sets it for the
        training loop only (:mod:`kdkit.teacher.plan`), after the cache was filled; methods never know. A method
        that feeds the teacher *other* inputs than the batch's own (mixed, perturbed) must call it with a tensor
        or a dict without ``index``, which always runs live.

        Raises:
            ValueError: the cache is not complete (rows missing would be answered with garbage).
        """
        if cache is not None and not cache.complete:
            raise ValueError("a teacher cache must be complete before it answers for the teacher")
        self.cache = cache

    def _cache_rows(self, batch: Union[Batch, torch.Tensor]) -> Optional[torch.Tensor]:
        """The cache rows that answer ``batch`` (counted as a hit), or None when it must run live: no cache
        attached, or a tensor / a dict without ``index`` (inputs the cache was not built on)."""
        if self.cache is None or not isinstance(batch, dict) or "index" not in batch:
            return None
        self.cache_hits += 1
        return batch.get("cache_index", batch["index"])  # with replayable augmentation: the (sample, view) row

    def __call__(self, batch: Union[Batch, torch.Tensor]) -> torch.Tensor:
        # A teacher with its own tokenizer reads the batch's teacher_x (kdkit.data.core.teacher_inputs).
        x = teacher_inputs(batch) if isinstance(batch, dict) else batch
        index = self._cache_rows(batch)
        if index is not None:
            return self.cache.get(index, device=x.device)  # (B, C) float32, a fresh tensor
        self.live_calls += 1
        with torch.inference_mode():
            out = self.model(x)
        # Inference tensors cannot be saved for the student's backward pass; a copy of the
        # (B, C) outputs is cheap and turns them into ordinary constants.
        return out.clone()

    def with_features(self, batch: Union[Batch, torch.Tensor], capture) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """The teacher's outputs and the tensors of ``capture``'s layers (a
        :class:`~kdkit.methods.hooks.FeatureCapture` on ``self.model``) on ``batch``, as ordinary tensors.

        From the cache when one is attached and the batch carries ``index``: the stored rows, a text teacher's
        sequence features cut to the length the network would have run at for this batch
        (:func:`kdkit.teacher.cache.sequence_length`), so shapes are the same as live. Otherwise the network runs
        under inference mode with the hooks installed, and only the captured tensors and outputs are copied out
        (inference tensors cannot be saved for the student's backward pass).

        Raises:
            KdkitError: the attached cache does not hold one of the layers (built for other layers).
        """
        x = teacher_inputs(batch) if isinstance(batch, dict) else batch
        index = self._cache_rows(batch)
        if index is not None:
            from .cache import sequence_length

            features = self.cache.get_features(index, capture.names, sequence_length(self.model, x), device=x.device)
            return self.cache.get(index, device=x.device), features
        self.live_calls += 1
        with capture:
            with torch.inference_mode():
                out = self.model(x)
            features = dict(zip(capture.names, capture.features()))  # copied out of inference mode by the hooks
        capture.clear()
        return out.clone(), features


# ----------------------------------------------------------------------------- several teachers as one

def ensemble_weights(logits: "list[torch.Tensor]", prior: torch.Tensor, weighting: str = "fixed") -> torch.Tensor:
    """Per-sample weights of K teachers, shape (B, K), each row summing to 1.

    - ``fixed``: ``a_k = w_k`` (the prior, normalised), the same for every sample.
    - ``entropy``: ``a_k(x) ∝ w_k · exp(-H(p_k(x)))`` with ``H`` the entropy (nats) of teacher k's
      softmax: confident (low-entropy) teachers count more on that sample. This follows the idea of
      entropy-based adaptive teacher weighting (Kwon et al. 2020, "Adaptive knowledge distillation
      based on entropy", ICASSP), with a softmax over ``-H`` as the normaliser.
    - ``max_prob``: ``a_k(x) ∝ w_k · max_c p_k(c|x)``: weight proportional to teacher k's top-class
      probability (confidence-aware weighting in the spirit of Zhang et al. 2022, CA-MKD, which uses
      label-based confidence; this variant needs no labels).

    Args:
        logits: K tensors of shape (B, C), one per teacher.
        prior: (K,) non-negative fixed weights (normalised here).
        weighting: ``fixed``, ``entropy`` or ``max_prob``.
    """
    prior = prior / prior.sum()
    k, b = len(logits), logits[0].shape[0]
    if weighting == "fixed":
        return prior.to(logits[0].dtype).expand(b, k)
    log_p = torch.stack([z.float().log_softmax(dim=-1) for z in logits], dim=1)  # (B, K, C)
    if weighting == "entropy":
        entropy = -(log_p.exp() * log_p).sum(dim=-1)  # (B, K)
        score = torch.log(prior).to(entropy) - entropy
        return score.softmax(dim=1)
    if weighting == "max_prob":
        conf = log_p.exp().amax(dim=-1) * prior.to(log_p)  # (B, K)
        return conf / conf.sum(dim=1, keepdim=True)
    raise ValueError(f"unknown ensemble weighting {weighting!r}; use fixed, entropy or max_prob")


class EnsembleModel(nn.Module):
    """K teacher networks behind one forward: returns the logits of their weighted ensemble.

    With ``combine="probs"`` (default) the soft targets are averaged, not the logits: the output is
    ``T · log Σ_k a_k softmax(z_k / T)``, chosen so that ``softmax(output / T)`` equals the weighted
    average of the teachers' soft targets at temperature ``T`` exactly (use the distillation method's
    temperature). ``combine="logits"`` returns ``Σ_k a_k z_k``. Members may have different
    architectures; they must output the same number of classes. Submodules are named
    ``members.0``, ``members.1``, ... (for feature hooks).
    """

    def __init__(self, members: "list[nn.Module]", weights=None, weighting: str = "fixed",
                 temperature: float = 1.0, combine: str = "probs"):
        super().__init__()
        if len(members) < 1:
            raise ValueError("an ensemble needs at least one teacher")
        if weights is None:
            weights = [1.0] * len(members)
        if len(weights) != len(members):
            raise ValueError(f"{len(weights)} teacher weights given for {len(members)} teachers")
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"teacher weights must be >= 0 with a positive sum; got {list(weights)}")
        if weighting not in ("fixed", "entropy", "max_prob"):
            raise ValueError(f"unknown ensemble weighting {weighting!r}; use fixed, entropy or max_prob")
        if combine not in ("probs", "logits"):
            raise ValueError(f"unknown ensemble combine {combine!r}; use probs or logits")
        if temperature <= 0:
            raise ValueError(f"ensemble temperature must be > 0; got {temperature}")
        self.members = nn.ModuleList(members)
        self.register_buffer("prior", torch.tensor([float(w) for w in weights]))
        self.weighting, self.temperature, self.combine = weighting, float(temperature), combine

    def member_logits(self, x: torch.Tensor) -> "list[torch.Tensor]":
        return [m(x) for m in self.members]

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        """(B, K) per-sample teacher weights for inputs ``x``."""
        return ensemble_weights(self.member_logits(x), self.prior, self.weighting)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        zs = self.member_logits(x)  # K x (B, C)
        a = ensemble_weights(zs, self.prior, self.weighting)  # (B, K)
        if self.combine == "logits":
            return torch.einsum("bk,kbc->bc", a.to(zs[0].dtype), torch.stack(zs))
        t = self.temperature
        log_p = torch.stack([(z.float() / t).log_softmax(dim=-1) for z in zs], dim=1)  # (B, K, C)
        # log Σ_k a_k p_k computed in log space, so tiny probabilities never become log(0).
        return t * torch.logsumexp(log_p + torch.log(a.float()).unsqueeze(-1), dim=1)


class TeacherEnsemble(Teacher):
    """Several frozen teachers (any architectures, any checkpoints) acting as one :class:`Teacher`.

    ``ensemble(batch)`` returns the ensemble's logits (see :class:`EnsembleModel`), so every
    logit-based method works unchanged; ``ensemble.model`` is the :class:`EnsembleModel`, so
    evaluation (accuracy, agreement) measures the ensemble; ``ensemble.members`` are the networks.

    Args:
        teachers: trained models or :class:`Teacher` objects.
        weights: fixed prior weights, one per teacher (default: equal).
        weighting: ``fixed``, ``entropy`` or ``max_prob`` (per-sample confidence weights, see
            :func:`ensemble_weights`).
        temperature: the temperature whose soft targets are averaged (set it to the method's).
        combine: ``probs`` (average soft targets) or ``logits`` (average logits).
    """

    def __init__(self, teachers, weights=None, weighting: str = "fixed", temperature: float = 1.0,
                 combine: str = "probs"):
        members = [t.model if isinstance(t, Teacher) else t for t in teachers]
        for m in members:
            if not isinstance(m, nn.Module):
                raise TypeError(f"each teacher must be a torch.nn.Module or kdkit.Teacher; got {type(m).__name__}")
        super().__init__(EnsembleModel(members, weights, weighting, temperature, combine))

    @property
    def members(self) -> "list[nn.Module]":
        return list(self.model.members)


def as_teacher(teacher: Optional[Union[Teacher, nn.Module]]) -> Optional[Teacher]:
    """Wrap a module as a :class:`Teacher` (an existing Teacher or None pass through; a list becomes a
    :class:`TeacherEnsemble`)."""
    if teacher is None or isinstance(teacher, Teacher):
        return teacher
    if isinstance(teacher, (list, tuple)):
        return TeacherEnsemble(teacher)  # several teachers: equal weights, averaged soft targets
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher must be a torch.nn.Module or kdkit.Teacher; got {type(teacher).__name__}")
    return Teacher(teacher)
