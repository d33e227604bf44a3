"""The frozen teacher.

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


def as_teacher(teacher: Optional[Union[Teacher, nn.Module]]) -> Optional[Teacher]:
    """Wrap a module as a :class:`Teacher` (an existing Teacher or None pass through; a list becomes a
    :class:`TeacherEnsemble`)."""
    if teacher is None or isinstance(teacher, Teacher):
        return teacher
    if isinstance(teacher, (list, tuple)):
        from .ensemble import TeacherEnsemble

        return TeacherEnsemble(teacher)  # several teachers: equal weights, averaged soft targets
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher must be a torch.nn.Module or kdkit.Teacher; got {type(teacher).__name__}")
    return Teacher(teacher)
