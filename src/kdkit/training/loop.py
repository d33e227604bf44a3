"""The one training loop, for every method.

    for batch in loader:
        out = method(batch)          # {"loss", parts..., "logits"}
        out["loss"].backward(); clip; optimizer.step(); scheduler.step()

It knows nothing about methods. Per epoch it evaluates on the validation
split, appends a line to ``metrics.jsonl``, and writes checkpoints:
``checkpoints/last.safetensors`` (student), ``checkpoints/best.safetensors``
(student with the best validation score) and ``checkpoints/state.{safetensors,json}``
(everything needed to resume). A run killed between epochs and resumed ends with
the same weights as one never interrupted (same seed, CPU).

Speed (issue "distillation that costs little more than training the student"):

- **Teacher-output cache** (:mod:`kdkit.teacher.cache`): ``train.teacher_cache`` ``auto``
  (default) computes the teacher's outputs on the training set once and the
  :class:`~kdkit.teacher.Teacher` answers by ``batch["index"]``, when that is
  correct: not for augmented data (except kdkit's replayable views, one cache row per
  sample and view, :mod:`kdkit.teacher.augment`), not for methods that read teacher features
  (a ``uses_teacher_features = True`` attribute, or forward hooks found on the
  teacher), not for user DataLoaders. The teacher's validation outputs are
  computed once per run, not once per epoch (it is frozen).
- **No host sync per step**: losses, parts and accuracy counts accumulate on the
  device; every ``train.sync_every`` steps (and at the end of each epoch) one sync
  checks that every step's loss was finite. A non-finite loss stops the run naming
  the first bad step exactly (the per-step losses of the epoch are kept in a device
  buffer); checkpoints are written only after an epoch passed this check, so the
  last good checkpoint is kept. (Unlike a per-step check, the in-memory weights
  may have taken up to ``sync_every`` bad steps by then.)
- ``train.precision: bf16`` (autocast), ``train.channels_last``, ``train.compile``
  (``torch.compile`` of the student and live teacher), ``train.grad_accum_steps``.
- **Data parallel**: under ``torchrun`` (``WORLD_SIZE > 1``) the process group is
  initialised (NCCL on GPU, gloo on CPU), the method (student + trainable extras;
  the teacher is not a module) is wrapped in DDP, each rank takes
  ``batch_size / world_size`` samples of every global batch, epoch metrics are
  all-reduced and only rank 0 validates and writes the run directory. The teacher
  cache goes to disk, built once by rank 0 and memory-mapped read-only by all.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from torch import nn

from ..teacher.plan import prepare_teacher_cache
from .distributed import all_reduce, init_distributed
from .progress import epoch_summary, progress_bar
from .checkpoint import load_training_state, save_training_state, save_weights
from ..config import TrainConfig
from ..data.core import make_loader
from ..errors import KdkitError
from ..evaluation.metrics import predict, quality
from ..teacher import Teacher


def seed_everything(seed: int) -> None:
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
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0)
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


def _to(batch: Dict[str, torch.Tensor], device: torch.device) -> Dict[str, torch.Tensor]:
    if device.type == "cpu":
        return batch
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@dataclass
class History:
    """Per-epoch records (as written to metrics.jsonl) and the best validation score."""

    epochs: List[Dict[str, Any]] = field(default_factory=list)
    best_score: Optional[float] = None
    best_epoch: Optional[int] = None
    teacher_cache: str = "off"  # what the loop did with the teacher's outputs, in words


def _score(metrics: Dict[str, float]) -> Optional[float]:
    """Higher is better: validation accuracy, else negative MSE, else agreement."""
    if "accuracy" in metrics:
        return metrics["accuracy"]
    if "mse" in metrics:
        return -metrics["mse"]
    return metrics.get("agreement")


# ----------------------------------------------------------------------------- the loop

class _Tracker:
    """Epoch statistics kept on the device: no host sync until :meth:`first_bad` / :meth:`result`.

    Each micro-step writes one row ``[loss, parts..., hits, labelled]`` into a (steps, K) device buffer
    (one ``stack`` and one copy per step, whatever the number of parts), so the first non-finite loss can be
    named exactly and the epoch means are one weighted sum at the end. The scalar parts are those of the
    epoch's first step (a part missing later counts as 0).
    """

    def __init__(self, device: torch.device, steps: int):
        self.device = device
        self.steps = steps
        self.keys: Optional[List[str]] = None
        self.buf: Optional[torch.Tensor] = None
        self.labels = False
        self.sizes: List[int] = []
        self.checked = 0

    def add(self, step: int, out: Dict[str, torch.Tensor], batch: Dict[str, torch.Tensor]) -> None:
        self.sizes.append(batch["x"].shape[0])
        y = batch.get("y")
        logits = out.get("logits")
        if self.keys is None:
            self.keys = ["loss"] + [k for k, v in out.items()
                                    if k not in ("loss", "logits") and torch.is_tensor(v) and v.dim() == 0]
            self.labels = y is not None and not y.is_floating_point() and logits is not None and logits.dim() == 2
            self.buf = torch.zeros(self.steps, len(self.keys) + 2, device=self.device)
        zero = None
        row = []
        for k in self.keys:
            v = out.get(k)
            if v is None:
                zero = zero if zero is not None else torch.zeros((), device=self.device)
                v = zero
            row.append(v.detach())
        if self.labels:
            # Unlabelled samples carry y = -1, which argmax never equals: no mask needed for the hits.
            row.append((logits.detach().argmax(1) == y).sum(dtype=torch.float32))
            row.append((y >= 0).sum(dtype=torch.float32))
        self.buf[step, :len(row)] = torch.stack(row)

    @property
    def losses(self) -> torch.Tensor:
        return self.buf[:, 0] if self.buf is not None else torch.zeros(0)

    def first_bad(self, upto: int) -> Optional[int]:
        """Index of the first non-finite loss among steps [checked, upto), or None (one host sync)."""
        window = self.buf[self.checked:upto, 0]
        bad = ~torch.isfinite(window)
        none = torch.tensor(2**62, device=self.device)
        flag = torch.where(bad.any(), self.checked + bad.to(torch.uint8).argmax(), none).to(torch.long)
        # Under DDP every rank must stop together: take the earliest bad step over ranks.
        flag = int(all_reduce(flag, "min"))
        self.checked = upto
        return None if flag == 2**62 else flag

    def live(self, step: int) -> Dict[str, str]:
        """Progress-bar figures at a sync point: this step's loss and the epoch's running accuracy."""
        shown = {"loss": f"{float(self.buf[step, 0]):.4f}"}
        if self.labels:
            k = len(self.keys)
            hits, labelled = self.buf[:step + 1, k:k + 2].sum(0).tolist()
            if labelled > 0:
                shown["acc"] = f"{hits / labelled:.3f}"
        return shown

    def result(self) -> Dict[str, float]:
        if self.buf is None:
            return {}
        n = len(self.sizes)
        sizes = torch.tensor(self.sizes, dtype=torch.float32, device=self.device)
        k = len(self.keys)
        sums = (self.buf[:n, :k] * sizes[:, None]).sum(0)
        vec = torch.cat([sums, self.buf[:n, k:].sum(0), sizes.sum().reshape(1)])
        vec = all_reduce(vec).tolist()  # the epoch's one sync (sum over ranks under DDP)
        seen = max(vec[-1], 1.0)
        record = {f"train_{key}": v / seen for key, v in zip(self.keys, vec)}
        if self.labels and vec[k + 1] > 0:
            record["train_accuracy"] = vec[k] / vec[k + 1]
        return record


def _prepare(batch: Dict[str, torch.Tensor], device: torch.device, channels_last: bool) -> Dict[str, torch.Tensor]:
    if device.type != "cpu":
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    if channels_last and batch["x"].dim() == 4:
        batch = dict(batch, x=batch["x"].contiguous(memory_format=torch.channels_last))
    return batch


def fit(method: nn.Module, train_data, val_data=None, cfg: Optional[TrainConfig] = None, *,
        run_dir: Optional[Path] = None, seed: int = 0, device: str = "auto", batch_size: int = 128,
        eval_batch_size: int = 512, num_workers: int = 0, resume: bool = False, name: str = "student") -> History:
    """Train ``method`` (its student and trainable extras) on ``train_data``.

    Args:
        method: a :class:`kdkit.methods.Method`; ``method.student`` is what gets evaluated and saved.
        train_data, val_data: Datasets (batches are dicts, see :mod:`kdkit.data.core`).
        cfg: optimisation and speed settings.
        run_dir: where metrics.jsonl and checkpoints/ go; None keeps everything in memory. Under DDP only
            rank 0 writes it (every rank reads it to resume).
        batch_size: the global batch size (each of ``world_size`` processes takes ``batch_size / world_size``).
        resume: continue from ``run_dir/checkpoints/state.*``.
        name: label of this model in progress bars and logs.

    Returns:
        The :class:`History`; the best weights are on disk, the last ones stay in ``method.student``.
    """
    cfg = cfg or TrainConfig()
    dev = resolve_device(device)
    rank, world, dev = init_distributed(dev)
    if batch_size % world:
        raise KdkitError(f"batch size {batch_size} is not divisible by the {world} processes; use a multiple of {world}")
    main = rank == 0
    seed_everything(seed)
    if cfg.channels_last:
        method.to(memory_format=torch.channels_last)
    method.to(dev)
    teacher = getattr(method, "teacher", None)
    if teacher is not None and hasattr(teacher, "to"):
        teacher.to(dev)
        if cfg.channels_last and hasattr(teacher, "model"):
            teacher.model.to(memory_format=torch.channels_last)
    history = History()
    cache, history.teacher_cache = prepare_teacher_cache(method, train_data, cfg, batch_size=eval_batch_size,
                                                         rank=rank, world_size=world)
    loader = make_loader(train_data, batch_size // world, shuffle=True, seed=seed, num_workers=num_workers,
                         rank=rank, world_size=world)
    micro_steps = len(loader)
    accum = cfg.grad_accum_steps
    steps_per_epoch = -(-micro_steps // accum)  # optimiser steps
    params = [p for p in method.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, steps_per_epoch, cfg))
    start_epoch = 0
    ckpt = Path(run_dir) / "checkpoints" if run_dir is not None else None
    metrics_path = Path(run_dir) / "metrics.jsonl" if run_dir is not None else None
    if resume:
        if ckpt is None:
            raise KdkitError("resume needs a run directory")
        extra = load_training_state(ckpt / "state", method, optimizer, scheduler)
        start_epoch = extra["epoch"] + 1
        history.best_score, history.best_epoch = extra.get("best_score"), extra.get("best_epoch")
        if metrics_path.exists():
            lines = metrics_path.read_text().splitlines()
            history.epochs = [json.loads(line) for line in lines if line.strip()][:start_epoch]
            if main:
                metrics_path.write_text("".join(json.dumps(r) + "\n" for r in history.epochs))
    model: nn.Module = method
    ddp = None
    if world > 1 and params:
        from torch.nn.parallel import DistributedDataParallel

        # Only the method is wrapped: student + trainable extras. The teacher is no submodule of it.
        model = ddp = DistributedDataParallel(method, device_ids=[dev.index] if dev.type == "cuda" else None)
    if cfg.compile:
        # Compile the method's forward as called by the loop (student, connectors and loss; a graph break
        # where it asks the teacher, whose network is compiled on its own when it runs live). `method`
        # itself stays unwrapped, so parameters, state_dict keys and checkpoints are unchanged.
        model = torch.compile(model)
        if teacher is not None and cache is None and hasattr(teacher, "model"):
            teacher.model.compile()
    autocast = (torch.autocast(device_type=dev.type, dtype=torch.bfloat16) if cfg.precision == "bf16"
                else contextlib.nullcontext())
    val_teacher_outputs: List[Optional[torch.Tensor]] = [None]  # the frozen teacher's, computed once
    augment = getattr(train_data, "augment", None)  # kdkit.teacher.augment: replayable views (FKD)
    augment = augment if hasattr(augment, "batch") else None

    if main and cfg.progress and isinstance(teacher, Teacher):
        print(f"teacher cache: {history.teacher_cache}", file=sys.stderr)
    bar = progress_bar(cfg.progress and main)
    tensorboard = None
    try:
        for epoch in range(start_epoch, cfg.epochs):
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(epoch)
            elif hasattr(getattr(loader, "sampler", None), "set_epoch"):
                loader.sampler.set_epoch(epoch)
            method.train()
            t0, c0 = time.perf_counter(), time.process_time()
            stats = _Tracker(dev, micro_steps)
            it = bar(loader, total=micro_steps, desc=f"{name} {epoch + 1}/{cfg.epochs}")
            optimizer.zero_grad(set_to_none=True)
            for step, batch in enumerate(it):
                if augment is not None:
                    batch = augment.batch(batch, epoch)  # the epoch's view of each sample, for student and teacher
                batch = _prepare(batch, dev, cfg.channels_last)
                group_start = step - step % accum
                group = min(accum, micro_steps - group_start)  # micro-batches in this optimiser step
                last = step + 1 == group_start + group
                sync = ddp.no_sync() if (ddp is not None and not last) else contextlib.nullcontext()
                with sync:
                    with autocast:
                        out = model(batch)
                    loss = out["loss"]
                    (loss / group if group > 1 else loss).backward()
                if last:
                    if cfg.grad_clip is not None:
                        nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                    optimizer.step()
                    scheduler.step()
                    method.on_optimizer_step()
                    optimizer.zero_grad(set_to_none=True)
                stats.add(step, out, batch)
                if (step + 1) % cfg.sync_every == 0 or step + 1 == micro_steps:
                    _check_finite(stats, step + 1, epoch, micro_steps, ckpt)
                    if hasattr(it, "set_postfix"):
                        it.set_postfix(stats.live(step))
            if cache is not None:
                if teacher.cache_hits == 0 and teacher.live_calls == 0:
                    # The method runs the teacher network itself (feature methods): nothing to cache.
                    teacher.use_cache(None)
                    cache, history.teacher_cache = None, "off (the method never asked the Teacher for outputs)"
                elif cache.path is not None and cache.filled < len(cache):
                    cache.flush()
            record: Dict[str, Any] = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"]}
            record.update(stats.result())
            record["epoch_seconds"] = time.perf_counter() - t0
            # CPU time of this process (all its threads): on a shared machine, the work done, not the wait.
            record["epoch_cpu_seconds"] = time.process_time() - c0
            if main and val_data is not None and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
                val = _validate(method, val_data, eval_batch_size, val_teacher_outputs)
                record.update({f"val_{k}": v for k, v in val.items()})
                score = _score(val)
                if score is not None and (history.best_score is None or score > history.best_score):
                    history.best_score, history.best_epoch = score, epoch + 1
                    if ckpt is not None:
                        save_weights(method.student, ckpt / "best.safetensors")
            history.epochs.append(record)
            if hasattr(bar, "write"):
                bar.write(epoch_summary(name, record))
            if run_dir is not None and main:
                with open(metrics_path, "a") as fh:
                    fh.write(json.dumps(record) + "\n")
                tensorboard = tensorboard or _tensorboard(Path(run_dir))
                if tensorboard is not None:
                    for key, value in record.items():
                        if key != "epoch" and isinstance(value, (int, float)):
                            tensorboard.add_scalar(key, value, epoch + 1)
                    tensorboard.flush()
                save_weights(method.student, ckpt / "last.safetensors")
                if val_data is None:
                    save_weights(method.student, ckpt / "best.safetensors")
                save_training_state(ckpt / "state", method, optimizer, scheduler,
                                    {"epoch": epoch, "best_score": history.best_score, "best_epoch": history.best_epoch})
    finally:
        if tensorboard is not None:
            tensorboard.close()
        if cache is not None:
            teacher.use_cache(None)
            history.teacher_cache = f"{cache.describe()}; {history.teacher_cache}"
    return history


def _tensorboard(run_dir: Path):
    """A SummaryWriter on ``run_dir/tensorboard`` when the tensorboard package is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


def _check_finite(stats: _Tracker, upto: int, epoch: int, steps_per_epoch: int, ckpt: Optional[Path]) -> None:
    bad = stats.first_bad(upto)
    if bad is None:
        return
    value = float(stats.losses[bad]) if bad < len(stats.losses) else float("nan")
    where = f"epoch {epoch + 1}, step {bad + 1} (global step {epoch * steps_per_epoch + bad + 1})"
    kept = ""
    if ckpt is not None and (ckpt / "last.safetensors").exists():
        kept = f"; last good checkpoint kept in {ckpt}"
    raise KdkitError(f"loss became {value} at {where}; lower the learning rate or set train.grad_clip{kept}")


def _validate(method: nn.Module, val_data, batch_size: int, teacher_memo: Optional[list] = None) -> Dict[str, float]:
    student = method.student
    pred = predict(student, val_data, batch_size)
    teacher = getattr(method, "teacher", None)
    t_out = None
    if teacher is not None and hasattr(teacher, "model"):
        # The teacher is frozen: its validation outputs are the same every epoch, computed once per run.
        if teacher_memo is None or teacher_memo[0] is None:
            t_out = predict(teacher.model, val_data, batch_size)["outputs"]
            if teacher_memo is not None:
                teacher_memo[0] = t_out
        else:
            t_out = teacher_memo[0]
    return quality(pred["outputs"], pred.get("y"), t_out)
