"""What users decide on: accuracy, agreement with the teacher, calibration, size and latency."""

from __future__ import annotations

import statistics
import time
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import save
from torch import nn

from ..data.core import as_dataset, make_loader
from ..teacher import Teacher


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """ECE (Guo et al. 2017): the confidence-accuracy gap averaged over equal-width confidence bins.

    Args:
        probs: (N, C) predicted probabilities.
        labels: (N,) true classes.
    """
    conf, pred = probs.max(dim=1)
    correct = (pred == labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    ece = torch.zeros(())
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (conf > lo) & (conf <= hi)
        if in_bin.any():
            ece += in_bin.float().mean() * (conf[in_bin].mean() - correct[in_bin].mean()).abs()
    return float(ece)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer; CPU for models with neither (e.g. int8 quantised ones)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


@torch.inference_mode()
def predict(model: nn.Module, data, batch_size: int = 512, device: Optional[torch.device] = None) -> Dict[str, torch.Tensor]:
    """Run ``model`` over ``data`` in eval mode; returns ``{"outputs": (N, C), "y": (N, ...) or absent}`` on CPU."""
    device = device or model_device(model)
    was_training = model.training
    model.eval()
    outs, ys = [], []
    for batch in make_loader(as_dataset(data), batch_size):
        outs.append(model(batch["x"].to(device)).float().cpu())
        if "y" in batch:
            ys.append(batch["y"])
    model.train(was_training)
    result = {"outputs": torch.cat(outs)}
    if ys:
        result["y"] = torch.cat(ys)
    return result


def quality(outputs: torch.Tensor, y: Optional[torch.Tensor] = None,
            teacher_outputs: Optional[torch.Tensor] = None) -> Dict[str, float]:
    """Accuracy, NLL, ECE (given labels) and agreement with the teacher (given its outputs) from raw outputs.

    Regression targets (float ``y``) give MSE instead; unlabelled (-1) samples are skipped.
    """
    m: Dict[str, float] = {}
    if y is not None and y.is_floating_point():
        m["mse"] = float(F.mse_loss(outputs, y.view_as(outputs)))
        if teacher_outputs is not None:
            m["mse_to_teacher"] = float(F.mse_loss(outputs, teacher_outputs))
        return m
    if y is not None:
        keep = y >= 0
        out, lab = outputs[keep], y[keep]
        probs = out.softmax(dim=1)
        m["accuracy"] = float((out.argmax(1) == lab).float().mean())
        m["nll"] = float(F.cross_entropy(out, lab))
        m["ece"] = expected_calibration_error(probs, lab)
    if teacher_outputs is not None:
        m["agreement"] = float((outputs.argmax(1) == teacher_outputs.argmax(1)).float().mean())
    return m


def size(model: nn.Module) -> Dict[str, int]:
    """Parameter count and the bytes of the model's safetensors file."""
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    return {"parameters": sum(p.numel() for p in model.parameters()), "bytes": len(save(state))}


@torch.inference_mode()
def latency(model: nn.Module, input_shape: Sequence[int], batch_sizes: Sequence[int] = (1, 256),
            repeats: int = 30, warmup: int = 5) -> Dict[str, float]:
    """Median CPU wall time per batch (milliseconds) after warm-up, for each batch size."""
    model = model.eval()
    device = model_device(model)
    result = {}
    for bs in batch_sizes:
        x = torch.randn(bs, *input_shape, device=device)
        for _ in range(warmup):
            model(x)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        result[f"latency_ms_b{bs}"] = 1000 * statistics.median(times)
    return result


def evaluate(model: nn.Module, data, teacher: Optional[nn.Module] = None, batch_size: int = 512,
             measure_latency: bool = True, input_shape: Optional[Sequence[int]] = None) -> Dict[str, float]:
    """Everything about ``model`` on ``data``: quality, size and (optionally) CPU latency.

    Args:
        model: the model to measure.
        data: a Dataset, an ``(x, y)`` tuple or a tensor of inputs.
        teacher: when given, agreement with it (same arg-max) is reported.
        measure_latency: time batch 1 and batch 256 on the CPU.

    Returns:
        ``accuracy, nll, ece, agreement`` (as applicable), ``parameters, bytes``, ``latency_ms_b1``, ``latency_ms_b256``.
    """
    data = as_dataset(data)
    pred = predict(model, data, batch_size)
    t_out = None
    if teacher is not None:
        t_model = teacher.model if isinstance(teacher, Teacher) else teacher
        t_out = predict(t_model, data, batch_size)["outputs"]
    metrics = quality(pred["outputs"], pred.get("y"), t_out)
    metrics.update(size(model))
    if measure_latency:
        shape = input_shape or tuple(data[0]["x"].shape if isinstance(data[0], dict) else data[0][0].shape)
        device = model_device(model)
        cpu_model = model if device.type == "cpu" else _cpu_copy(model)
        metrics.update(latency(cpu_model, shape))
    return metrics


def _cpu_copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model).cpu()
