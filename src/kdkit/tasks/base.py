"""The interface of a kind of task: everything that differs between arrays, text classifiers and language models.

A run's task is chosen once, from its data, while the run is assembled (:func:`kdkit.tasks.task_for`), and
handed to the parts that need it. The core (``training/``, ``teacher/``, ``evaluation/``, ``export/``,
``compress/``) calls these methods and never asks what kind of data it holds; a new kind of task is one new
module here that subclasses :class:`Task` and is listed in :data:`kdkit.tasks.TASKS`.

What a task owns:

- the batch contract: which data it claims (:meth:`Task.matches`) and the checks that a model and a teacher
  fit that data before anything is written (:meth:`Task.check_fit`, :meth:`Task.check_outputs`);
- the factory context a model is built with (:meth:`Task.model_context`);
- how a model is measured, at the end (:meth:`Task.evaluate`) and after each epoch (:meth:`Task.validate`);
- what the teacher cache may hold (:attr:`Task.cache_refusal`);
- what export writes and how its parity is checked (:meth:`Task.export`);
- what the report shows about the data (:meth:`Task.describe_data`).

The base class is the array task (classification of images, tabular rows and other tensors): its methods
are the defaults every other task starts from.
"""

from __future__ import annotations

import html
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from ..data.core import ArrayData, check_targets, first_sample
from ..errors import KdkitError


class Task:
    """A kind of task. Subclasses override what differs; every method has the array default."""

    #: The name the report and ``report.json`` record (``run.task``).
    name = "classification"
    #: Why a dense teacher-output cache would be wrong for every method of this task (None: it may be used).
    cache_refusal: Optional[str] = None
    #: Whether ``kdkit export`` writes a model card beside the file.
    writes_model_card = True

    # ------------------------------------------------------------------ the batch contract
    @staticmethod
    def matches(data) -> bool:
        """Whether ``data`` (a training split) is this task's: the array task takes whatever no other claims."""
        return True

    def model_context(self, splits, teacher: bool = False) -> Dict[str, Any]:
        """Extra factory arguments a model of this task is built with (token tasks: ``vocab_size``,
        ``pad_token_id``); ``teacher``: the teacher's own tokenizer, when it has one."""
        return {}

    def check_fit(self, model: nn.Module, teacher, splits) -> None:
        """Refuse a model (and teacher) that would fail or compute garbage on the splits, before training.

        Arrays: class labels beyond the model's outputs (a test label of 10 for 10 outputs)."""
        with torch.inference_mode():
            was = model.training
            out = model.eval()(first_sample(splits.train).unsqueeze(0).to(_device(model)))
            model.train(was)
        classes = int(out.shape[-1]) if out.dim() == 2 else None
        for name in ("train", "val", "test"):
            data = getattr(splits, name)
            if data is not None:
                check_targets(data, name, classes if splits.num_classes is None else splits.num_classes)

    def check_outputs(self, teacher_out: torch.Tensor, student_out: torch.Tensor) -> None:
        """Raise a clear error when teacher and student outputs (one sample's forward) cannot be compared."""
        t, s = teacher_out, student_out
        if t.shape[1:] != s.shape[1:]:
            raise KdkitError(f"teacher outputs shape {tuple(t.shape[1:])} per sample but student outputs "
                             f"{tuple(s.shape[1:])}; the student's head must match the teacher's (e.g. num_classes)")

    # ------------------------------------------------------------------ measuring
    def evaluate(self, model: nn.Module, data, teacher: Optional[nn.Module] = None, batch_size: int = 512,
                 measure_latency: bool = True, input_shape: Optional[Sequence[int]] = None) -> Dict[str, float]:
        """Quality (accuracy, macro-F1, NLL, ECE, agreement; regression: MSE, MAE), size and CPU latency."""
        from ..evaluation.metrics import latency, measure_outputs

        metrics = measure_outputs(model, data, teacher, batch_size)
        if measure_latency:
            metrics.update(latency(_cpu_model(model), input_shape or tuple(first_sample(data).shape)))
        return metrics

    def validate(self, student: nn.Module, val_data, batch_size: int, teacher: Optional[nn.Module],
                 teacher_outputs: Any = None) -> Tuple[Dict[str, float], Any]:
        """The per-epoch validation figures and what to keep of the teacher's outputs for the next epoch.

        The teacher is frozen, so its validation outputs are computed once per run (``teacher_outputs``), except
        for a user's DataLoader, which may reshuffle on every pass: then both run over the same pass."""
        from torch.utils.data import DataLoader

        from ..evaluation.metrics import predict, predict_many, quality

        if teacher is not None and isinstance(val_data, DataLoader):
            pred, t_pred = predict_many([student, teacher], val_data, batch_size, teachers=(False, True))
            return quality(pred["outputs"], pred.get("y"), t_pred["outputs"]), teacher_outputs
        pred = predict(student, val_data, batch_size)
        if teacher is not None and teacher_outputs is None:
            teacher_outputs = predict(teacher, val_data, batch_size, teacher=True)["outputs"]
        return quality(pred["outputs"], pred.get("y"), teacher_outputs), teacher_outputs

    def validation_metrics(self, teacher: bool) -> Tuple[str, ...]:
        """The figures :meth:`validate` reports (``val_<name>`` in ``metrics.jsonl``): what a sweep may score."""
        return ("accuracy", "macro_f1", "nll", "ece") + (("agreement",) if teacher else ())

    def teacher_val_accuracy(self, teacher, val) -> Optional[float]:
        """The teacher's validation accuracy: the reference line of the report's accuracy curves (None: none)."""
        if teacher is None or val is None or not hasattr(teacher, "model"):
            return None
        from ..evaluation.metrics import predict, quality

        try:
            pred = predict(teacher.model, val, 512, teacher=True)
        except (RuntimeError, TypeError, ValueError):  # a user loader kdkit cannot batch again: no reference line
            return None
        return quality(pred["outputs"], pred.get("y")).get("accuracy") if pred.get("y") is not None else None

    # ------------------------------------------------------------------ the report
    def describe_data(self, train) -> Dict[str, Any]:
        """What ``report.json``'s ``run.data`` says about the training split beyond its size: the labelled share."""
        y = getattr(train, "y", None)
        if y is not None and hasattr(train, "__len__") and len(train):
            known = (y >= 0) if not y.is_floating_point() else torch.isfinite(y.reshape(len(y), -1)).all(1)
            return {"labelled_train": int(known.sum()), "labelled_fraction": int(known.sum()) / len(train)}
        if hasattr(train, "__len__"):
            return {"labelled_train": 0, "labelled_fraction": 0.0}
        return {}

    # ------------------------------------------------------------------ export
    def export_name(self, fmt: str, int8: bool) -> str:
        """The file name ``kdkit export`` writes under ``RUN_DIR/export/`` unless told otherwise."""
        return ("model-int8" if int8 else "model") + (".onnx" if fmt == "onnx" else ".pt")

    def export(self, model: nn.Module, splits, path, fmt: str, int8: bool, *, samples: int = 256,
               calibration_samples: int = 512, dataset: str = "", int8_max_drop: float = 1.0,
               keep_int8: bool = False) -> Tuple[Dict[str, Any], str]:
        """Write ``model`` to ``path``, check its parity on the test split's inputs, time it (``int8_max_drop`` and
        ``keep_int8``: the accuracy rule of int8 text exports, see :mod:`kdkit.export.text`).

        Returns the export's record (``model.onnx.json``) and the report section (HTML) describing it."""
        from ..evaluation.report import format_table
        from ..export.core import Preprocessed, export_model

        data = splits.test if splits.test is not None else splits.val
        inputs = _inputs(data, min(samples, len(data)))
        calibration = _inputs(splits.train, min(calibration_samples, len(splits.train))) if int8 else None
        preprocess = splits.preprocess
        if preprocess is not None:
            # The file takes raw rows: parity is checked (and int8 calibrated) on the same rows un-standardised.
            model = Preprocessed(model, preprocess).eval()
            with torch.no_grad():
                inputs = model.raw(inputs)
                calibration = model.raw(calibration) if calibration is not None else None
        result = export_model(model, inputs, path, fmt, int8=int8, calibration=calibration)
        result.update(self.export_normalisation(splits, preprocess, dataset))
        row = {**result["parity"], **result.get("pytorch", {}), **result.get("onnxruntime", {})}
        models = {f"{fmt}{' int8' if int8 else ''} ({path.name})": {
            "bytes": result["bytes"], **{k: v for k, v in row.items() if k.startswith(("latency", "ort_latency"))}}}
        section = (f"<h2>Export: {html.escape(path.name)}</h2><p>max abs diff vs PyTorch "
                   f"{result['parity']['max_abs_diff']:.3g}, arg-max agreement "
                   f"{result['parity']['argmax_agreement']:.4f} on {result['parity']['samples']} test inputs.</p>"
                   f"<pre>{html.escape(format_table(models))}</pre>")
        return result, section

    def export_normalisation(self, splits, preprocess: Optional[Dict[str, Any]], dataset: str) -> Dict[str, Any]:
        """What the exported file expects as input, for the export's record (``model.onnx.json``) and the model card."""
        if preprocess is None:
            return {"normalisation": "none baked in: feed inputs exactly as kdkit's dataset builder "
                                     f"{dataset!r} produces them"}
        columns = splits.info.get("features")
        result: Dict[str, Any] = {"normalisation": (
            "baked in: the file takes raw rows of the dataset's feature columns"
            + (f" ({', '.join(map(str, columns))})" if columns else "") + " and standardises them itself"
            + ("; its outputs are predictions in the target's own units" if "target_mean" in preprocess else "")),
            "preprocess": preprocess}
        if columns:
            result["input_columns"] = list(columns)
        return result

    def __repr__(self) -> str:
        return f"<kdkit task {self.name}>"


def _device(model: nn.Module) -> torch.device:
    from ..evaluation.metrics import model_device

    return model_device(model)


def _cpu_model(model: nn.Module) -> nn.Module:
    """The model itself when it is on the CPU, else a CPU copy (latency is CPU latency)."""
    if _device(model).type == "cpu":
        return model
    import copy

    return copy.deepcopy(model).cpu()


def _inputs(data, n: int) -> torch.Tensor:
    """The first ``n`` inputs of a split as one tensor."""
    return data.x[:n] if hasattr(data, "x") else torch.stack([data[i]["x"] for i in range(n)])


def first_target(data) -> Optional[torch.Tensor]:
    """The first sample's target, or None for unlabelled or unreadable data (used to tell tasks apart)."""
    if isinstance(data, ArrayData):
        return None if data.y is None or len(data) == 0 else data.y[:1]
    try:
        from ..data.core import as_dataset, to_batch

        d = as_dataset(data)
        if isinstance(d, torch.utils.data.DataLoader):
            return None
        y = to_batch(d[0]).get("y")
        return None if y is None else torch.as_tensor(y)
    except (KdkitError, IndexError, KeyError, TypeError):  # empty or unreadable: the array task, refused later
        return None


__all__ = ["Task", "first_target"]
