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
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from torch import nn

from .checkpoint import load_training_state, save_training_state, save_weights
from .config import TrainConfig
from .data.core import make_loader
from .errors import KdkitError
from .evaluate import predict, quality


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


def _score(metrics: Dict[str, float]) -> Optional[float]:
    """Higher is better: validation accuracy, else negative MSE, else agreement."""
    if "accuracy" in metrics:
        return metrics["accuracy"]
    if "mse" in metrics:
        return -metrics["mse"]
    return metrics.get("agreement")


def fit(method: nn.Module, train_data, val_data=None, cfg: Optional[TrainConfig] = None, *,
        run_dir: Optional[Path] = None, seed: int = 0, device: str = "auto", batch_size: int = 128,
        eval_batch_size: int = 512, num_workers: int = 0, resume: bool = False, name: str = "student") -> History:
    """Train ``method`` (its student and trainable extras) on ``train_data``.

    Args:
        method: a :class:`kdkit.methods.Method`; ``method.student`` is what gets evaluated and saved.
        train_data, val_data: Datasets (batches are dicts, see :mod:`kdkit.data.core`).
        cfg: optimisation settings.
        run_dir: where metrics.jsonl and checkpoints/ go; None keeps everything in memory.
        resume: continue from ``run_dir/checkpoints/state.*``.
        name: label of this model in progress bars and logs.

    Returns:
        The :class:`History`; the best weights are on disk, the last ones stay in ``method.student``.
    """
    cfg = cfg or TrainConfig()
    dev = resolve_device(device)
    seed_everything(seed)
    method.to(dev)
    teacher = getattr(method, "teacher", None)
    if teacher is not None and hasattr(teacher, "to"):
        teacher.to(dev)
    loader = make_loader(train_data, batch_size, shuffle=True, seed=seed, num_workers=num_workers)
    steps_per_epoch = len(loader)
    params = [p for p in method.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, steps_per_epoch, cfg))
    history = History()
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
            metrics_path.write_text("".join(json.dumps(r) + "\n" for r in history.epochs))

    bar = _progress(cfg.progress)
    for epoch in range(start_epoch, cfg.epochs):
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        elif hasattr(getattr(loader, "sampler", None), "set_epoch"):
            loader.sampler.set_epoch(epoch)
        method.train()
        t0 = time.perf_counter()
        sums: Dict[str, float] = {}
        correct, labelled, seen = 0, 0, 0
        it = bar(loader, total=steps_per_epoch, desc=f"{name} {epoch + 1}/{cfg.epochs}")
        for step, batch in enumerate(it):
            batch = _to(batch, dev)
            out = method(batch)
            loss = out["loss"]
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                where = f"epoch {epoch + 1}, step {step + 1} (global step {epoch * steps_per_epoch + step + 1})"
                kept = ""
                if ckpt is not None and (ckpt / "last.safetensors").exists():
                    kept = f"; last good checkpoint kept in {ckpt}"
                raise KdkitError(f"loss became {loss_value} at {where}; lower the learning rate or set train.grad_clip{kept}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip is not None:
                nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            n = batch["x"].shape[0]
            seen += n
            for k, v in out.items():
                if k != "logits" and torch.is_tensor(v) and v.dim() == 0:
                    sums[k] = sums.get(k, 0.0) + float(v) * n
            y = batch.get("y")
            if y is not None and not y.is_floating_point() and "logits" in out:
                mask = y >= 0
                correct += int(((out["logits"].argmax(1) == y) & mask).sum())
                labelled += int(mask.sum())
            if hasattr(it, "set_postfix") and step % 10 == 0:
                post = {"loss": f"{loss_value:.4f}"}
                if labelled:
                    post["acc"] = f"{correct / labelled:.3f}"
                it.set_postfix(post)
        record: Dict[str, Any] = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"],
                                  "epoch_seconds": time.perf_counter() - t0}
        record.update({f"train_{k}": v / max(seen, 1) for k, v in sums.items()})
        if labelled:
            record["train_accuracy"] = correct / labelled
        if val_data is not None and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
            val = _validate(method, val_data, eval_batch_size)
            record.update({f"val_{k}": v for k, v in val.items()})
            score = _score(val)
            if score is not None and (history.best_score is None or score > history.best_score):
                history.best_score, history.best_epoch = score, epoch + 1
                if ckpt is not None:
                    save_weights(method.student, ckpt / "best.safetensors")
        history.epochs.append(record)
        if hasattr(bar, "write"):
            bar.write(_summary(name, record))
        if run_dir is not None:
            with open(metrics_path, "a") as fh:
                fh.write(json.dumps(record) + "\n")
            save_weights(method.student, ckpt / "last.safetensors")
            if val_data is None:
                save_weights(method.student, ckpt / "best.safetensors")
            save_training_state(ckpt / "state", method, optimizer, scheduler,
                                {"epoch": epoch, "best_score": history.best_score, "best_epoch": history.best_epoch})
    return history


def _validate(method: nn.Module, val_data, batch_size: int) -> Dict[str, float]:
    student = method.student
    pred = predict(student, val_data, batch_size)
    teacher = getattr(method, "teacher", None)
    t_out = None
    if teacher is not None and hasattr(teacher, "model"):
        t_out = predict(teacher.model, val_data, batch_size)["outputs"]
    return quality(pred["outputs"], pred.get("y"), t_out)


def _summary(name: str, record: Dict[str, Any]) -> str:
    keys = ["train_loss", "train_accuracy", "val_accuracy", "val_agreement", "val_mse"]
    parts = [f"{k}={record[k]:.4f}" for k in keys if k in record]
    return f"{name} epoch {record['epoch']}: " + " ".join(parts) + f" ({record['epoch_seconds']:.1f}s)"


class _Quiet:
    def __call__(self, it, **_):
        return it


def _progress(enabled: bool):
    if not enabled:
        return _Quiet()
    from tqdm.auto import tqdm

    class _Bar:
        write = staticmethod(tqdm.write)

        def __call__(self, it, total, desc):
            return tqdm(it, total=total, desc=desc, leave=False, dynamic_ncols=True)

    return _Bar()
