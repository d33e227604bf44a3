"""The one training loop, for every method.

    for batch in loader:
        out = method(batch)          # {"loss", parts..., "logits"}
        out["loss"].backward(); clip; optimizer.step(); scheduler.step()

It knows nothing about methods. :func:`fit` reads top to bottom: ``_setup`` (device, DDP, teacher
cache, loader, optimiser), ``_resume``, then per epoch ``_train_epoch`` (the steps), ``_validate``,
``_keep`` (which epoch's weights are kept) and ``_save_epoch`` (metrics.jsonl, checkpoints, then the
tracking backends: TensorBoard, MLflow, see :mod:`kdkit.training.tracking`). Each helper does one thing.

Checkpoints (``run_dir/checkpoints``): ``best.safetensors`` holds the kept weights (the rule is
``train.keep``, see :class:`Keeper`), ``last.safetensors`` the last epoch's, ``state.safetensors``
everything needed to resume, in one atomically written file. A run killed at any moment and resumed
ends with the same weights as one never interrupted (same seed, CPU): the sample order of every epoch
is a pure function of (seed, epoch), the RNG state is saved, and the teacher cache is filled in a fixed
order before the first step.

Speed:

- **Teacher-output cache** (:mod:`kdkit.teacher.plan` decides, once, before training, whether it is
  correct; :mod:`kdkit.teacher.cache` stores it). The teacher's validation outputs are computed once
  per run, not once per epoch (it is frozen).
- **No host sync per step**: losses, parts and accuracy counts accumulate on the device
  (:class:`~kdkit.training.tracker.Tracker`); every ``train.sync_every`` steps one sync checks that every
  step's loss was finite. A non-finite loss stops the run naming the first bad step; checkpoints are
  written only after an epoch passed this check and its weights are finite, so the last good checkpoint
  is kept.
- ``train.precision: bf16`` (autocast), ``train.channels_last``, ``train.compile``, ``train.grad_accum_steps``.
- **Data parallel**: under ``torchrun`` the method (student + trainable extras; the teacher is not a
  module) is wrapped in DDP (:mod:`kdkit.training.distributed`), each rank takes ``batch_size /
  world_size`` samples of every global batch, epoch metrics are all-reduced and only rank 0 validates
  and writes the run directory. ``train.strategy: fsdp`` shards the student, its extras and the teacher
  with FSDP2 instead (:mod:`kdkit.training.fsdp`): every rank then validates (the sharded forward needs
  them all), rank 0 writes the consolidated weights and the resume state is a distributed checkpoint.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from ..config import TrainConfig
from ..data.core import ArrayData, make_loader
from ..errors import KdkitError
from ..teacher import Teacher
from ..teacher.plan import prepare_teacher_cache
from .checkpoint import STATE_FILE, load_training_state, non_finite, save_training_state, save_weights
from .distributed import init_distributed
from .progress import progress_for
from .tracker import Tracker
from .tracking import TensorBoardBackend, Tracking


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch: call it before building anything random (models, connectors, subsets)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise KdkitError(f"device {device!r} requested but CUDA is not available; use device: auto or cpu")
    return torch.device(device)


def build_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0
        )
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(step: int, steps_per_epoch: int, cfg: TrainConfig) -> float:
    """Learning-rate multiplier at optimiser step ``step``: linear warm-up, then constant, cosine or step decay."""
    total = cfg.epochs * steps_per_epoch
    warm = int(cfg.warmup_epochs * steps_per_epoch)
    if step < warm:
        return (step + 1) / warm
    if cfg.schedule == "cosine":
        progress = (step - warm) / max(1, total - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    if cfg.schedule == "step":
        return cfg.gamma ** (step // (cfg.step_size * steps_per_epoch))
    return 1.0


# ----------------------------------------------------------------------------- which weights are kept

class Keeper:
    """Which epoch's weights a careful practitioner keeps (``train.keep``).

    ``best`` compares validation scores lexicographically: accuracy (classification), else -perplexity
    (causal LM), else -MSE (regression), else agreement with the teacher (unlabelled validation data); ties
    are broken by the lower validation NLL, and a tie on both goes to the LATER epoch. With small validation sets
    (digits: 180 images, one image = 0.56 points) accuracy ties are common, and keeping the earliest
    tied epoch kept under-trained, under-confident weights. ``last`` keeps the last epoch.
    """

    def __init__(self, rule: str = "best", best: Optional[List[float]] = None, epoch: Optional[int] = None):
        self.rule, self.best, self.epoch = rule, best, epoch

    @staticmethod
    def key(val: Dict[str, float]) -> Optional[List[float]]:
        """(primary score, -NLL), higher is better; None when validation gave no score."""
        if "accuracy" in val:
            primary = val["accuracy"]
        elif "perplexity" in val:  # causal LM: lower held-out perplexity is better
            primary = -val["perplexity"]
        elif "mse" in val:
            primary = -val["mse"]
        elif "agreement" in val:
            primary = val["agreement"]
        else:
            return None
        return [primary, -val.get("nll", 0.0)]

    def consider(self, epoch: int, val: Optional[Dict[str, float]]) -> bool:
        """Record epoch ``epoch`` (1-based); True when its weights become the kept ones."""
        if self.rule == "last" or val is None:
            self.epoch = epoch
            return True
        key = self.key(val)
        if key is None:
            self.epoch = epoch
            return True
        if self.best is None or key >= self.best:  # list comparison: primary, then -NLL; equal -> later epoch
            self.best, self.epoch = key, epoch
            return True
        return False


@dataclass
class History:
    """Per-epoch records (as written to metrics.jsonl) and the epoch whose weights were kept."""

    epochs: List[Dict[str, Any]] = field(default_factory=list)
    best_score: Optional[List[float]] = None
    best_epoch: Optional[int] = None  # the kept epoch (1-based)
    keep: str = "best"
    teacher_cache: str = "off"  # what the loop did with the teacher's outputs, in words
    kept_state: Optional[Dict[str, torch.Tensor]] = None  # the kept weights, when there is no run directory


# ----------------------------------------------------------------------------- set-up

@dataclass
class _Loop:
    """Everything one run's loop needs, built once by :func:`_setup`."""

    method: nn.Module
    model: nn.Module  # what the step calls: the method, maybe wrapped in DDP and/or compiled
    cfg: TrainConfig
    device: torch.device
    rank: int
    world: int
    loader: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    params: List[nn.Parameter]
    ddp: Optional[nn.Module]
    cache: Any
    autocast: Callable[[], Any]
    augment: Any
    name: str
    ckpt: Optional[Path]
    metrics_path: Optional[Path]
    task: Any = None  # the kind of task (kdkit.tasks): how validation measures the student
    val_teacher_outputs: Any = None  # what task.validate keeps of the frozen teacher's outputs between epochs
    tracking: Optional[Tracking] = None
    sharded: Any = None  # kdkit.training.fsdp.Sharded under strategy fsdp
    rank_bytes: Dict[str, int] = field(default_factory=dict)  # under torchrun: measured at each epoch's end

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def teacher(self):
        return getattr(self.method, "teacher", None)


def _check_inputs(train_data) -> None:
    """NaN/inf in in-memory training inputs is a data error, not a learning-rate problem: say so up front."""
    if isinstance(train_data, ArrayData) and train_data.x.is_floating_point():
        bad = ~torch.isfinite(train_data.x.reshape(len(train_data.x), -1)).all(dim=1)
        if bool(bad.any()):
            raise KdkitError(f"training inputs contain NaN or inf in {int(bad.sum())} sample(s), the first at "
                             f"position {int(bad.to(torch.uint8).argmax())}; clean or impute them first")


def _setup(method: nn.Module, train_data, cfg: TrainConfig, *, run_dir, seed: int, device: str, batch_size: int,
           eval_batch_size: int, num_workers: int, name: str, history: History, task) -> _Loop:
    dev = resolve_device(device)
    rank, world, dev = init_distributed(dev)
    if batch_size % world:
        raise KdkitError(
            f"batch size {batch_size} is not divisible by the {world} processes; use a multiple of {world}"
        )
    _check_inputs(train_data)
    seed_everything(seed)
    if cfg.channels_last:
        method.to(memory_format=torch.channels_last)
    method.to(dev)
    teacher = getattr(method, "teacher", None)
    if teacher is not None and hasattr(teacher, "to"):
        teacher.to(dev)
        if cfg.channels_last and hasattr(teacher, "model"):
            teacher.model.to(memory_format=torch.channels_last)
    fsdp = cfg.strategy == "fsdp"
    if fsdp:
        from . import fsdp as sharding

        problem = sharding.sharding_problem(cfg, method, world)
        if problem:
            raise KdkitError(problem)
    cache_cfg = cfg.model_copy(update={"teacher_cache": "off"}) if fsdp else cfg
    cache, history.teacher_cache = prepare_teacher_cache(method, train_data, cache_cfg, batch_size=eval_batch_size,
                                                         rank=rank, world_size=world, task=task,
                                                         log=(lambda _m: None) if cfg.quiet else None)
    if fsdp:
        history.teacher_cache = "off (strategy fsdp: the sharded teacher runs live)"
    # Before sharding: a teacher store is written by rank 0 alone, with the whole teacher.
    prepared = method.prepare(train_data, batch_size=eval_batch_size,
                              log=lambda msg: print(msg, file=sys.stderr)) if hasattr(method, "prepare") else None
    if prepared:
        history.teacher_cache = f"{history.teacher_cache}; {prepared}"
    sharded = sharding.shard(method, dev, cfg) if fsdp else None
    if sharded is not None:
        history.teacher_cache = f"{history.teacher_cache}; {sharded.describe()}"
    loader = make_loader(train_data, batch_size // world, shuffle=True, seed=seed, num_workers=num_workers,
                         rank=rank, world_size=world)
    steps_per_epoch = -(-len(loader) // cfg.grad_accum_steps)  # optimiser steps
    params = [p for p in method.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, steps_per_epoch, cfg))
    model, ddp = _wrap(method, cfg, dev, world, params, cache) if sharded is None else (method, None)
    # Under FSDP, bf16 is its mixed-precision policy (parameters gathered in bf16), not autocast.
    autocast = ((lambda: torch.autocast(device_type=dev.type, dtype=torch.bfloat16))
                if cfg.precision == "bf16" and sharded is None else contextlib.nullcontext)
    augment = getattr(train_data, "augment", None)  # kdkit.teacher.augment: replayable views (FKD)
    run_dir = Path(run_dir) if run_dir is not None else None
    return _Loop(method=method, model=model, cfg=cfg, device=dev, rank=rank, world=world, loader=loader, task=task,
                 optimizer=optimizer, scheduler=scheduler, params=params, ddp=ddp, cache=cache, autocast=autocast,
                 augment=augment if hasattr(augment, "batch") else None, name=name,
                 ckpt=run_dir / "checkpoints" if run_dir else None,
                 metrics_path=run_dir / "metrics.jsonl" if run_dir else None, sharded=sharded)


def _wrap(method: nn.Module, cfg: TrainConfig, dev: torch.device, world: int, params, cache) -> Tuple[nn.Module, Any]:
    """The module the step calls: DDP around the method under torchrun, torch.compile on request."""
    model: nn.Module = method
    ddp = None
    if world > 1 and params:
        from torch.nn.parallel import DistributedDataParallel

        # Only the method is wrapped: student + trainable extras. The teacher is no submodule of it.
        model = ddp = DistributedDataParallel(method, device_ids=[dev.index] if dev.type == "cuda" else None)
    if cfg.compile:
        # Compile the method's forward as called by the loop; `method` itself stays unwrapped, so parameters,
        # state_dict keys and checkpoints are unchanged. The live teacher's network is compiled on its own.
        model = torch.compile(model)
        teacher = getattr(method, "teacher", None)
        if teacher is not None and cache is None and hasattr(teacher, "model"):
            teacher.model.compile()
    return model, ddp


def _resume(loop: _Loop, history: History) -> int:
    """Restore the saved state (if the run saved one) and the metrics of the epochs it covers; the start epoch."""
    if loop.ckpt is None:
        raise KdkitError("resume needs a run directory")
    state = loop.ckpt / STATE_FILE
    if loop.sharded is not None:
        from . import fsdp as sharding

        has_state = sharding.checkpoint_world_size(loop.ckpt) is not None
    else:
        has_state = state.is_file()
    if not has_state:
        # Killed before its first epoch ended: nothing to restore, so the run starts again from epoch 1.
        records: List[Dict[str, Any]] = []
        start = 0
    else:
        extra = (sharding.load_checkpoint(loop.ckpt, loop.method, loop.optimizer, loop.scheduler)
                 if loop.sharded is not None else
                 load_training_state(state, loop.method, loop.optimizer, loop.scheduler))
        start = extra["epoch"] + 1
        history.best_score, history.best_epoch = extra.get("best_score"), extra.get("best_epoch")
        lines = loop.metrics_path.read_text().splitlines() if loop.metrics_path.is_file() else []
        # Lines past the saved epoch (and a half-written last line) belong to work that is redone.
        try:
            records = [json.loads(line) for line in lines[:start]]
        except json.JSONDecodeError:
            raise KdkitError(f"cannot resume: {loop.metrics_path} is damaged before epoch {start}") from None
    if loop.main:
        loop.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in records))
        loop.tracking.catch_up(records)  # epochs saved but not yet sent before the interruption
    history.epochs = records
    return start


# ----------------------------------------------------------------------------- one epoch

def _train_epoch(loop: _Loop, epoch: int, bar) -> Dict[str, Any]:
    """One pass over the training data; returns the epoch's record (train statistics, lr, seconds)."""
    loop.method.train()
    if hasattr(loop.loader, "set_epoch"):
        loop.loader.set_epoch(epoch)
    t0, c0 = time.perf_counter(), time.process_time()
    micro_steps = len(loop.loader)
    stats = Tracker(loop.device, micro_steps)
    it = bar(loop.loader, total=micro_steps, desc=f"{loop.name} {epoch + 1}/{loop.cfg.epochs}")
    loop.optimizer.zero_grad(set_to_none=True)
    for step, batch in enumerate(it):
        if loop.augment is not None:
            batch = loop.augment.batch(batch, epoch, step)  # this step's view of each sample, for student and teacher
        batch = _prepare(batch, loop.device, loop.cfg.channels_last)
        out = _step(loop, batch, step, micro_steps)
        stats.add(step, out, batch)
        if (step + 1) % loop.cfg.sync_every == 0 or step + 1 == micro_steps:
            _check_finite(stats, step + 1, epoch, micro_steps, loop.ckpt)
            if hasattr(it, "set_postfix"):
                it.set_postfix(stats.live(step))
    record: Dict[str, Any] = {"epoch": epoch + 1, "lr": loop.optimizer.param_groups[0]["lr"]}
    record.update(stats.result())
    record["epoch_seconds"] = time.perf_counter() - t0
    # CPU time of this process (all its threads): on a shared machine, the work done, not the wait.
    record["epoch_cpu_seconds"] = time.process_time() - c0
    if loop.rank_bytes:  # under torchrun: this process's parameter, gradient and optimiser bytes (its shards)
        record.update({f"rank_{k}_bytes": v for k, v in loop.rank_bytes.items()})
    return record


def _step(loop: _Loop, batch: Dict[str, torch.Tensor], step: int, micro_steps: int) -> Dict[str, torch.Tensor]:
    """Forward and backward of one micro-batch; an optimiser step at the end of each accumulation group."""
    accum = loop.cfg.grad_accum_steps
    group_start = step - step % accum
    group = min(accum, micro_steps - group_start)  # micro-batches in this optimiser step
    last = step + 1 == group_start + group
    sync = loop.ddp.no_sync() if (loop.ddp is not None and not last) else contextlib.nullcontext()
    with sync:
        with loop.autocast():
            out = loop.model(batch)
        loss = out["loss"]
        (loss / group if group > 1 else loss).backward()
    if last:
        if loop.cfg.grad_clip is not None:
            nn.utils.clip_grad_norm_(loop.params, loop.cfg.grad_clip)
        loop.optimizer.step()
        loop.scheduler.step()
        loop.method.on_optimizer_step()
        if loop.world > 1 and step + 1 == micro_steps:  # what this process holds, once per epoch
            from .fsdp import local_bytes

            loop.rank_bytes = local_bytes(loop.method, loop.optimizer)
        loop.optimizer.zero_grad(set_to_none=True)
    return out


def _prepare(batch: Dict[str, torch.Tensor], device: torch.device, channels_last: bool) -> Dict[str, torch.Tensor]:
    if device.type != "cpu":
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    if channels_last and batch["x"].dim() == 4:
        batch = dict(batch, x=batch["x"].contiguous(memory_format=torch.channels_last))
    return batch


def _check_finite(stats: Tracker, upto: int, epoch: int, steps_per_epoch: int, ckpt: Optional[Path]) -> None:
    bad = stats.first_bad(upto)
    if bad is None:
        return
    value = float(stats.losses[bad]) if bad < len(stats.losses) else float("nan")
    where = f"epoch {epoch + 1}, step {bad + 1} (global step {epoch * steps_per_epoch + bad + 1})"
    raise KdkitError(f"loss became {value} at {where}; lower the learning rate or set train.grad_clip{_kept(ckpt)}")


def _kept(ckpt: Optional[Path]) -> str:
    if ckpt is not None and (ckpt / "last.safetensors").exists():
        return f"; last good checkpoint kept in {ckpt}"
    return ""


def _validate(loop: _Loop, val_data, batch_size: int) -> Dict[str, float]:
    """The task's validation figures; what it keeps of the frozen teacher's outputs is reused next epoch."""
    teacher = loop.teacher
    teacher_model = teacher.model if teacher is not None and hasattr(teacher, "model") else None
    if getattr(loop.method, "cross_tokenizer", False):  # a teacher with its own tokenizer: no agreement by id
        teacher_model = None
    val, loop.val_teacher_outputs = loop.task.validate(loop.method.student, val_data, batch_size, teacher_model,
                                                       loop.val_teacher_outputs)
    return val


# ----------------------------------------------------------------------------- saving

def _save_epoch(loop: _Loop, record: Dict[str, Any], history: History, keeper: Keeper, improved: bool,
                epoch: int) -> None:
    """After a good epoch: the kept weights, the metrics line, last weights, resume state, then tracking.

    Tracking comes last, once the epoch is committed (a resumed run redoes no epoch it has sent)."""
    if loop.sharded is not None:
        return _save_sharded_epoch(loop, record, history, keeper, improved, epoch)
    student = loop.method.student
    bad = non_finite(student.state_dict())
    if bad is not None:
        # A finite loss can still come with a NaN gradient on the epoch's last step: never save such weights.
        raise KdkitError(f"weights became non-finite in epoch {epoch + 1} ({bad}); lower the learning rate or "
                         f"set train.grad_clip{_kept(loop.ckpt)}")
    if loop.ckpt is None:
        if improved:
            history.kept_state = {k: v.detach().clone() for k, v in student.state_dict().items()}
        return
    if not loop.main:
        return
    if improved:
        save_weights(student, loop.ckpt / "best.safetensors")
    _append_record(loop.metrics_path, record)
    save_weights(student, loop.ckpt / "last.safetensors")
    save_training_state(loop.ckpt / STATE_FILE, loop.method, loop.optimizer, loop.scheduler,
                        {"epoch": epoch, "best_score": keeper.best, "best_epoch": keeper.epoch})
    loop.tracking.log_epoch(record)


def _append_record(path: Path, record: Dict[str, Any]) -> None:
    """One epoch's line of metrics.jsonl, on the disk before the checkpoints that follow it."""
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _save_sharded_epoch(loop: _Loop, record: Dict[str, Any], history: History, keeper: Keeper, improved: bool,
                        epoch: int) -> None:
    """:func:`_save_epoch` under FSDP: the full weights gathered onto rank 0, the resume state as a DCP."""
    from safetensors.torch import save_file

    from . import fsdp as sharding
    from .checkpoint import _atomic, _contiguous

    full = sharding.full_state(loop.method.student)  # every rank takes part; rank 0 gets the tensors
    bad = non_finite(full) if loop.main else None
    flag = torch.tensor([1 if bad else 0])
    torch.distributed.broadcast(flag, 0)
    if int(flag):
        raise KdkitError(f"weights became non-finite in epoch {epoch + 1} ({bad or 'on rank 0'}); lower the "
                         f"learning rate or set train.grad_clip{_kept(loop.ckpt)}")
    if loop.ckpt is None:
        if improved and loop.main:
            history.kept_state = full
        return
    if loop.main:
        tensors = _contiguous(full)
        if improved:
            _atomic(loop.ckpt / "best.safetensors", lambda f: save_file(tensors, str(f)))
        _append_record(loop.metrics_path, record)
        _atomic(loop.ckpt / "last.safetensors", lambda f: save_file(tensors, str(f)))
    sharding.save_checkpoint(loop.ckpt, loop.method, loop.optimizer, loop.scheduler,
                             {"epoch": epoch, "best_score": keeper.best, "best_epoch": keeper.epoch})
    if loop.main:
        loop.tracking.log_epoch(record)


def _unshard(loop: _Loop, train_data) -> None:
    """After a sharded run: the student and the teacher as plain CPU models on rank 0 (for the report), and a
    Hugging Face student's ``save_pretrained`` folder; the other ranks keep their shards."""
    from . import fsdp as sharding

    sh = loop.sharded
    kept = loop.ckpt / "best.safetensors" if loop.ckpt is not None else None
    has_kept = kept is not None and kept.is_file()  # every rank sees the same run directory
    # The kept weights are on disk already; otherwise the shards are gathered (every rank takes part).
    full = None if has_kept else sharding.full_state(loop.method.student)
    teacher = loop.teacher
    t_full = sharding.full_state(teacher.model) if sh.teacher_template is not None else None
    if not loop.main:
        return
    if has_kept:
        from .checkpoint import read_tensors

        full = read_tensors(kept)
    student = sharding.unsharded(sh.student_template, full)
    loop.method.student = student
    if t_full is not None:
        teacher.model = sharding.unsharded(sh.teacher_template, t_full).eval().requires_grad_(False)
    if loop.ckpt is not None:
        sharding.save_pretrained(student, loop.ckpt / "pretrained", getattr(train_data, "tokenizer_path", None))


# ----------------------------------------------------------------------------- the loop

_EPOCH_HOOKS: contextvars.ContextVar = contextvars.ContextVar("kdkit_epoch_hooks", default=())


@contextlib.contextmanager
def epoch_hook(callback: Callable[[Dict[str, Any]], None]):
    """Call ``callback(record)`` after each epoch of every :func:`fit` run inside this block (this thread only).

    ``record`` is the epoch's line of metrics.jsonl (``val_*`` keys on evaluated epochs), passed after the
    epoch was saved, on rank 0. An exception the callback raises ends the run there, its saved epochs intact:
    a sweep prunes a poor trial this way (:mod:`kdkit.recipes.sweep`). The loop knows nothing about why.
    """
    token = _EPOCH_HOOKS.set(_EPOCH_HOOKS.get() + (callback,))
    try:
        yield
    finally:
        _EPOCH_HOOKS.reset(token)


def fit(method: nn.Module, train_data, val_data=None, cfg: Optional[TrainConfig] = None, *,
        run_dir: Optional[Path] = None, seed: int = 0, device: str = "auto", batch_size: int = 128,
        eval_batch_size: int = 512, num_workers: int = 0, resume: bool = False, name: str = "student",
        tracking: Optional[Tracking] = None, task=None) -> History:
    """Train ``method`` (its student and trainable extras) on ``train_data``.

    Args:
        method: a :class:`kdkit.methods.Method`; ``method.student`` is what gets evaluated and saved.
        train_data, val_data: Datasets (batches are dicts, see :mod:`kdkit.data.core`).
        cfg: optimisation and speed settings.
        run_dir: where metrics.jsonl and checkpoints/ go; None keeps everything in memory. Under DDP only
            rank 0 writes it (every rank reads it to resume).
        batch_size: the global batch size (each of ``world_size`` processes takes ``batch_size / world_size``).
        resume: continue from ``run_dir/checkpoints/state.safetensors`` (from epoch 1 if none was saved).
        name: label of this model in progress bars and logs.
        tracking: started backends to send each epoch to (:mod:`kdkit.training.tracking`; the caller ends
            them). None: TensorBoard in ``run_dir/tensorboard`` when the package is installed, ended here.
        task: the kind of task (:mod:`kdkit.tasks`), which says how validation measures the student and what
            the teacher cache may hold; None: chosen from ``train_data``.

    Returns:
        The :class:`History`. ``method.student`` holds the last epoch's weights; the kept ones are in
        ``run_dir/checkpoints/best.safetensors`` (or ``history.kept_state`` without a run directory).
    """
    cfg = cfg or TrainConfig()
    if task is None:
        from ..tasks import task_for

        task = task_for(train_data)
    history = History(keep=cfg.keep)
    loop = _setup(method, train_data, cfg, run_dir=run_dir, seed=seed, device=device, batch_size=batch_size,
                  eval_batch_size=eval_batch_size, num_workers=num_workers, name=name, history=history, task=task)
    own_tracking = tracking is None
    loop.tracking = tracking if tracking is not None else Tracking([TensorBoardBackend()] if loop.ckpt else [])
    if own_tracking and loop.main and loop.ckpt is not None:
        loop.tracking.start(loop.ckpt.parent, {}, resume)
    start = _resume(loop, history) if resume else 0
    keeper = Keeper(cfg.keep, history.best_score, history.best_epoch)
    out = progress_for(cfg, loop.main)
    if isinstance(loop.teacher, Teacher):
        out.line(f"teacher cache: {history.teacher_cache}")
    try:
        for epoch in range(start, cfg.epochs):
            record = _train_epoch(loop, epoch, out)
            val = None
            # Under FSDP every rank validates (each forward gathers the shards): the same figures everywhere.
            evaluates = loop.main or loop.sharded is not None
            if evaluates and val_data is not None and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
                val = _validate(loop, val_data, eval_batch_size)
                record.update({f"val_{k}": v for k, v in val.items()})
            # Without validation data the latest epoch is kept; epochs skipped by eval_every are never kept.
            improved = evaluates and (keeper.consider(epoch + 1, val) if val is not None or val_data is None else False)
            history.epochs.append(record)
            _save_epoch(loop, record, history, keeper, improved, epoch)
            out.epoch(name, record)
            for hook in _EPOCH_HOOKS.get() if loop.main else ():
                hook(dict(record))
        history.best_score, history.best_epoch = keeper.best, keeper.epoch
        if loop.sharded is not None:
            _unshard(loop, train_data)
        if keeper.epoch is not None:
            rule = "best validation score" if cfg.keep == "best" and val_data is not None else "last epoch"
            out.line(f"{name}: keeping the weights of epoch {keeper.epoch} of {cfg.epochs} ({rule})")
    finally:
        if own_tracking:
            loop.tracking.end()
        if loop.cache is not None:
            loop.teacher.use_cache(None)
            history.teacher_cache = f"{loop.cache.describe()}; {history.teacher_cache}"
    return history
