"""What users decide on: accuracy, agreement with the teacher, calibration, size and latency."""

from __future__ import annotations

import statistics
import time
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import save
from torch import nn

from ..data.core import as_dataset, make_loader, teacher_inputs
from ..errors import KdkitError


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
def predict(model: nn.Module, data, batch_size: int = 512, device: Optional[torch.device] = None,
            teacher: bool = False) -> Dict[str, torch.Tensor]:
    """Run ``model`` over ``data`` in eval mode; returns ``{"outputs": (N, C), "y": (N, ...) or absent}`` on CPU.

    ``data``: a Dataset, a DataLoader (its own batches and order), an ``(x, y)`` tuple or a tensor of inputs.
    When ``data`` carries a target scaling (``data.target_scale``, set by the ``csv`` builder for regression),
    outputs and targets are returned in the data's own units (``value * std + mean``). ``teacher=True``: the
    model reads the teacher's inputs (``teacher_x`` of text tokenised twice, else ``x``).
    """
    return predict_many([model], data, batch_size, device, teachers=(teacher,))[0]


@torch.inference_mode()
def predict_many(models: Sequence[nn.Module], data, batch_size: int = 512,
                 device: Optional[torch.device] = None,
                 teachers: Optional[Sequence[bool]] = None) -> List[Dict[str, torch.Tensor]]:
    """:func:`predict` for several models in one pass over ``data``.

    One pass keeps the models' outputs row-aligned even when ``data`` is a DataLoader that reshuffles on every
    iteration (two separate passes would pair one model's sample i with another's sample j). ``teachers``:
    per model, whether it reads the teacher's inputs (:func:`kdkit.data.core.teacher_inputs`).
    """
    data = as_dataset(data)
    devices = [device or model_device(m) for m in models]
    was_training = [m.training for m in models]
    for m in models:
        m.eval()
    outs: List[List[torch.Tensor]] = [[] for _ in models]
    ys = []
    try:
        for batch in make_loader(data, batch_size):
            x = torch.as_tensor(batch["x"])
            tx = torch.as_tensor(teacher_inputs(batch))
            for m, dev, o, t in zip(models, devices, outs, teachers or [False] * len(models)):
                o.append(m((tx if t else x).to(dev)).float().cpu())
            if "y" in batch:
                ys.append(torch.as_tensor(batch["y"]))
    finally:
        for m, was in zip(models, was_training):
            m.train(was)
    scale = getattr(data, "target_scale", None)
    results = []
    for o in outs:
        out = torch.cat(o) if o else torch.empty(0)
        result = {"outputs": _unscale(out, scale)}
        if ys:
            result["y"] = _unscale(torch.cat(ys), scale)
        results.append(result)
    return results


def _unscale(t: torch.Tensor, scale) -> torch.Tensor:
    """Standardised regression values back in the data's units: ``t * std + mean`` (shape (N, D) or (N,))."""
    if scale is None or not t.is_floating_point() or t.numel() == 0:
        return t
    mean, std = (torch.as_tensor(v, dtype=t.dtype) for v in scale)
    return (t.reshape(len(t), -1) * std + mean).reshape(t.shape)


def quality(outputs: torch.Tensor, y: Optional[torch.Tensor] = None,
            teacher_outputs: Optional[torch.Tensor] = None) -> Dict[str, float]:
    """Accuracy, NLL, ECE (given labels) and agreement with the teacher (given its outputs) from raw outputs.

    Regression targets (float ``y``) give MSE and MAE instead (in the units ``outputs`` and ``y`` are in);
    unlabelled samples (label -1, or a NaN regression target) are skipped.

    Raises:
        KdkitError: a class label beyond the model's outputs (``C`` columns).
    """
    m: Dict[str, float] = {}
    if y is not None and y.is_floating_point():
        y = y.reshape(outputs.shape)
        keep = ~torch.isnan(y).reshape(len(y), -1).any(dim=1)
        if bool(keep.any()):
            m["mse"] = float(F.mse_loss(outputs[keep], y[keep]))
            m["mae"] = float(F.l1_loss(outputs[keep], y[keep]))
        if teacher_outputs is not None:
            m["mse_to_teacher"] = float(F.mse_loss(outputs, teacher_outputs))
        return m
    if y is not None:
        keep = y >= 0
        out, lab = outputs[keep], y[keep]
        if len(lab) and int(lab.max()) >= out.shape[1]:
            raise KdkitError(f"label {int(lab.max())} is out of range for a model with {out.shape[1]} outputs; "
                             f"expected labels 0..{out.shape[1] - 1} (or -1 for unlabelled)")
        probs = out.softmax(dim=1)
        m["accuracy"] = float((out.argmax(1) == lab).float().mean())
        m["macro_f1"] = macro_f1(out.argmax(1), lab, out.shape[1])
        m["nll"] = float(F.cross_entropy(out, lab))
        m["ece"] = expected_calibration_error(probs, lab)
    if teacher_outputs is not None:
        m["agreement"] = float((outputs.argmax(1) == teacher_outputs.argmax(1)).float().mean())
    return m


def macro_f1(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """Macro-averaged F1: the unweighted mean over classes of 2·TP / (2·TP + FP + FN).

    Averaged over the classes that occur in ``labels`` or ``pred`` (a class absent from both has no F1;
    scikit-learn's ``f1_score(average="macro")`` averages over the same set).

    Args:
        pred: (N,) predicted classes.
        labels: (N,) true classes.
        num_classes: C.
    """
    if len(labels) == 0:
        return float("nan")
    tp = torch.bincount(labels[pred == labels], minlength=num_classes).double()
    n_pred = torch.bincount(pred, minlength=num_classes).double()
    n_true = torch.bincount(labels, minlength=num_classes).double()
    present = (n_pred + n_true) > 0
    f1 = 2 * tp[present] / (n_pred[present] + n_true[present])  # 2TP / (2TP + FP + FN)
    return float(f1.mean())


def size(model: nn.Module) -> Dict[str, int]:
    """Parameter count and the bytes of the model's safetensors file."""
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    return {"parameters": sum(p.numel() for p in model.parameters()), "bytes": len(save(state))}


@torch.inference_mode()
def latency(model: nn.Module, input_shape: Sequence[int], batch_sizes: Sequence[int] = (1, 256),
            repeats: int = 30, warmup: int = 5, example: Optional[torch.Tensor] = None) -> Dict[str, float]:
    """Median CPU wall time per batch (milliseconds) after warm-up, for each batch size, with its spread.

    Inputs are random floats of ``input_shape``, or, with an integer ``example`` (one sample of token ids,
    shape ``input_shape``), that sample repeated over the batch: real ids, the sequence length fixed.

    Always on one CPU thread (whatever the run trained with), so every command times a model alike.

    Returns ``latency_ms_b{bs}`` (median), ``latency_ms_b{bs}_q1`` / ``_q3`` (quartiles of the ``repeats``
    timings), and ``latency_threads`` (torch's CPU threads while timing: 1) and ``latency_repeats``.
    """
    from ..training.threads import single_thread

    with single_thread():  # always one thread: the report, kdkit evaluate and kdkit export time alike
        return _latency(model, input_shape, batch_sizes, repeats, warmup, example)


def _latency(model: nn.Module, input_shape: Sequence[int], batch_sizes: Sequence[int], repeats: int, warmup: int,
             example: Optional[torch.Tensor]) -> Dict[str, float]:
    model = model.eval()
    device = model_device(model)
    result = {}
    for bs in batch_sizes:
        if example is not None:
            x = example.to(device).unsqueeze(0).expand(bs, *example.shape).contiguous()
        else:
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
        q1, _, q3 = statistics.quantiles(times, n=4) if len(times) > 1 else (times[0],) * 3
        result[f"latency_ms_b{bs}_q1"], result[f"latency_ms_b{bs}_q3"] = 1000 * q1, 1000 * q3
    result["latency_threads"] = torch.get_num_threads()
    result["latency_repeats"] = repeats
    return result


def measure_outputs(model: nn.Module, data, teacher: Optional[nn.Module] = None,
                    batch_size: int = 512) -> Dict[str, float]:
    """Quality from ``model``'s outputs on ``data`` (and agreement with ``teacher``'s, which reads the teacher's
    inputs), plus size: the figures every array and text task reports before its latency.

    Regression: ``mse`` and ``mae`` are in the data's own units. Splits built by the ``csv`` dataset hold
    standardised targets and carry their scaling (``data.target_scale``, also in the report's
    ``data_info.preprocess``); outputs and targets are mapped back (``value * std + mean``) before measuring.
    :func:`kdkit.tasks.evaluate` is the entry point that picks the right measurement for the kind of task.

    Returns:
        ``accuracy, macro_f1, nll, ece, agreement`` or ``mse, mae, mse_to_teacher`` (as applicable),
        ``parameters, bytes``.
    """
    data = as_dataset(data)
    models = [model] if teacher is None else [model, teacher]
    preds = predict_many(models, data, batch_size, teachers=(False, True)[:len(models)])
    t_out = preds[1]["outputs"] if teacher is not None else None
    metrics = quality(preds[0]["outputs"], preds[0].get("y"), t_out)
    metrics.update(size(model))
    return metrics


#: Batch sizes of the latency of text models (per sequence at batch 1 and 32, as usually reported).
TEXT_LATENCY_BATCHES = (1, 32)


def text_latency_input(sample: torch.Tensor, pad_token_id: int, length: Optional[int] = None) -> torch.Tensor:
    """One sequence of ids for timing: the sample's real (non-pad) tokens repeated to ``length`` tokens (default:
    its full padded length), so every batch is timed at one fixed sequence length (no column is padding)."""
    real = sample[sample != pad_token_id]
    if len(real) == 0:
        raise KdkitError("cannot time a text model on a sample of padding only; expected real token ids")
    n = int(length or len(sample))
    return real.repeat(-(-n // len(real)))[:n]


def length_profile(ids: torch.Tensor, pad_token_id: int) -> Dict[str, int]:
    """The real (non-pad) lengths of tokenised texts (N, L): ``median`` and ``p95`` tokens (at least 2)."""
    lengths = (torch.as_tensor(ids) != pad_token_id).sum(1).float()
    if len(lengths) == 0:
        raise KdkitError("cannot measure text lengths of an empty split")
    return {"median": max(2, int(lengths.median().item())), "p95": max(2, int(torch.quantile(lengths, 0.95).ceil()))}
