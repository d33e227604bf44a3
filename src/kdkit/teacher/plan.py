"""Whether and how the teacher's outputs are cached for a run: decided once, before training.

:func:`cache_plan` says what ``train.teacher_cache`` means for a method and a dataset;
:func:`prepare_teacher_cache` builds (or reuses) that cache and attaches it to the method's teacher.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Tuple

from torch import nn

from ..config import TrainConfig
from ..errors import KdkitError
from ..training.distributed import barrier


def cache_plan(method: nn.Module, train_data, cfg: TrainConfig, world_size: int = 1, task=None) -> Tuple[str, str]:
    """Decide what ``train.teacher_cache`` means for this run: ``("off"|"memory"|"disk", reason)``.

    ``auto`` caches only when it is correct (a frozen :class:`~kdkit.teacher.Teacher`, an in-memory or
    indexable dataset without random augmentation or with a finite set of replayable views (crop/flip, not
    mixup/CutMix), a method without a :attr:`~kdkit.methods.base.Method.teacher_cache_refusal`) and
    picks memory when the cache fits ``cache_memory_mb`` (disk under DDP, shared by the ranks).
    A method that reads the teacher's intermediate layers (``teacher_layers``) gets them cached too, in
    ``cache_feature_dtype``, and their bytes count in the estimate.
    An explicit ``memory``/``disk`` that would be wrong is an error. ``task`` (:mod:`kdkit.tasks`) may refuse a
    dense cache for every method of its kind (:attr:`~kdkit.tasks.base.Task.cache_refusal`: causal LMs).

    Raises:
        KdkitError: ``teacher_cache`` is ``memory``/``disk`` but caching would give wrong targets.
    """
    from torch.utils.data import DataLoader

    from ..teacher import Teacher
    from ..teacher.cache import is_augmented

    mode = cfg.teacher_cache
    if mode == "off":
        return "off", "train.teacher_cache is off"
    teacher = getattr(method, "teacher", None)
    reason = None
    if not isinstance(teacher, Teacher):
        reason = "the method has no frozen kdkit Teacher"
    elif getattr(method, "teacher_cache_refusal", None):  # Method.teacher_cache_refusal (lm_kd: per-token logits)
        reason = method.teacher_cache_refusal
    elif getattr(task, "cache_refusal", None):
        reason = task.cache_refusal
    elif isinstance(train_data, DataLoader) or not hasattr(train_data, "__getitem__"):
        reason = "the training data is a DataLoader/iterable whose sample indices and transforms kdkit cannot see"
    elif getattr(getattr(train_data, "augment", None), "not_cacheable", None):  # kdkit.teacher.augment.Mix
        reason = train_data.augment.not_cacheable
    elif is_augmented(train_data) and not hasattr(getattr(train_data, "augment", None), "views"):
        reason = ("the training data is randomly augmented in a way kdkit cannot replay, so the teacher sees a "
                  "new view every epoch (data.augment: crop_flip has replayable views)")
    if reason is not None:
        if mode == "auto":
            return "off", reason
        raise KdkitError(f"train.teacher_cache={mode} cannot be used: {reason}; use auto or off")
    if mode != "auto":
        return mode, f"train.teacher_cache={mode}"
    if world_size > 1:
        return "disk", "auto: several processes share one memory-mapped cache"
    from ..teacher.cache import cache_bytes, feature_bytes, probe

    spec = cache_spec(method, cfg)
    out_shape, features = probe(teacher.model, train_data, teacher.device, spec.layers)
    rows = len(train_data) * getattr(getattr(train_data, "augment", None), "views", 1)  # FKD: one row per view
    est = cache_bytes(rows, out_shape, spec, features)
    size = f"{est / 2**20:.1f} MiB"
    if features is not None:
        size += (f" (of which {feature_bytes(rows, features, spec) / 2**20:.1f} MiB {features.describe()} in "
                 f"{spec.feature_dtype})")
    if est <= cfg.cache_memory_mb * 2**20:
        return "memory", f"auto: {size} fits train.cache_memory_mb={cfg.cache_memory_mb}"
    return "disk", f"auto: {size} exceeds train.cache_memory_mb={cfg.cache_memory_mb}"


def cache_spec(method, cfg: TrainConfig, storage: str = "memory"):
    """The :class:`~kdkit.teacher.cache.CacheSpec` a run's cache is built with: ``cfg``'s storage form, plus the
    teacher layers the method declares (``method.teacher_layers``; a ``combo``: the union of its parts')."""
    from ..teacher.cache import CacheSpec

    return CacheSpec(cfg.cache_dtype, cfg.cache_topk, storage, tuple(getattr(method, "teacher_layers", ()) or ()),
                     cfg.cache_feature_dtype)


def prepare_teacher_cache(method: nn.Module, train_data, cfg: TrainConfig, *, batch_size: int = 512,
                          rank: int = 0, world_size: int = 1, log=None, task=None):
    """Build (or reuse) the teacher cache ``cfg`` asks for and attach it to the method's teacher.

    Returns ``(cache or None, description)``.
    """
    from ..teacher.cache import build_cache

    log = log or (lambda msg: print(msg, file=sys.stderr))
    mode, reason = cache_plan(method, train_data, cfg, world_size, task)
    if mode == "off":
        return None, f"off ({reason})"
    teacher = method.teacher
    spec = cache_spec(method, cfg, mode)
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else None
    if world_size > 1 and mode == "disk":
        # Rank 0 builds (or validates) the file; the others open what it wrote, read-only.
        if rank == 0:
            cache = build_cache(teacher.model, train_data, spec, cache_dir=cache_dir, batch_size=batch_size,
                                progress=cfg.progress, log=log)
        barrier()
        if rank != 0:
            cache = build_cache(teacher.model, train_data, spec, cache_dir=cache_dir, batch_size=batch_size,
                                log=lambda _m: None)
    else:
        # Filled before the first step, in dataset order and fixed batches: the stored outputs do not depend
        # on which epoch's shuffled batches met a sample first, so a resumed run reads exactly the values an
        # uninterrupted one does (lazy filling from the first epoch's batches gave float differences under
        # several threads). The teacher does the same work as a first live epoch would, only earlier.
        # A complete matching disk cache (e.g. from `kdkit cache`) is reused instead.
        cache = build_cache(teacher.model, train_data, spec, cache_dir=cache_dir, batch_size=batch_size,
                            progress=cfg.progress and rank == 0, log=log if rank == 0 else (lambda _m: None))
    teacher.use_cache(cache)
    teacher.cache_hits = teacher.live_calls = 0
    return cache, f"{mode}, {reason}"
