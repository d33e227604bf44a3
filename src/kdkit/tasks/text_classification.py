"""Text classification: token ids (N, L), right-padded, with class labels (N,).

Differs from the array task in four places: the model factory gets the tokenizer's ``vocab_size`` and
``pad_token_id``; models and teachers are checked against the data's pad id, vocabulary and label count;
latency is timed on real token ids at batch 1 and 32, at the split's median and 95th-percentile real length
(:func:`kdkit.evaluation.metrics.text_latency_input`);
the exported file takes int64 ids and computes its attention mask itself.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import torch
from torch import nn

from ..data.core import first_sample, teacher_view
from ..errors import KdkitError
from .base import Task, _cpu_model, first_target


def token_context(splits, teacher: bool = False) -> Dict[str, Any]:
    """``vocab_size`` and ``pad_token_id`` of tokenised splits (the teacher's own when it has a tokenizer of its
    own), and ``corpus_ids``, the training split's ids (vocabulary trimming, width-pruning calibration), for text
    model factories; empty when the splits record no tokenizer."""
    text = splits.info.get("text") if isinstance(splits.info, dict) else None
    if not isinstance(text, dict):
        return {}
    prefix = "teacher_" if teacher and "teacher_vocab_size" in text else ""
    context = {"vocab_size": text[prefix + "vocab_size"], "pad_token_id": text[prefix + "pad_token_id"]}
    train = splits.train
    if hasattr(train, "x") and torch.is_tensor(train.x):  # the training texts' ids (transfer rows included)
        context["corpus_ids"] = teacher_view(train).x if prefix else train.x
    return context


def check_token_fit(model: nn.Module, teacher, splits) -> None:
    """Pad ids, vocabulary and label count of the student and teacher match their tokenised data."""
    from ..data.text import check_text_model

    for name in ("train", "val", "test"):
        data = getattr(splits, name)
        if data is None:
            continue
        check_text_model(model, data, f"{name} split", splits.num_classes)
        if teacher is not None and hasattr(teacher, "model"):
            check_text_model(teacher.model, teacher_view(data), f"teacher on the {name} split", splits.num_classes)


class TokenTask(Task):
    """What every task over token ids shares: the tokenizer's context for factories, and the token checks."""

    def model_context(self, splits, teacher: bool = False) -> Dict[str, Any]:
        return token_context(splits, teacher)

    def check_fit(self, model: nn.Module, teacher, splits) -> None:
        check_token_fit(model, teacher, splits)
        super().check_fit(model, teacher, splits)


class TextClassification(TokenTask):
    """Token ids in, one class per text out."""

    name = "text_classification"

    @staticmethod
    def matches(data) -> bool:
        try:
            x = first_sample(data)
        except KdkitError:  # an empty split is refused later, with its own message
            return False
        y = first_target(data)
        return x.dim() == 1 and not x.is_floating_point() and (y is None or not y.is_floating_point())

    def evaluate(self, model: nn.Module, data, teacher: Optional[nn.Module] = None, batch_size: int = 512,
                 measure_latency: bool = True, input_shape: Optional[Sequence[int]] = None) -> Dict[str, float]:
        """The array task's figures, with latency timed at batch 1 and 32 on sequences of the split's median real
        length (``latency_ms_b*``) and of its 95th percentile (``latency_p95len_ms_b*``), one thread."""
        from ..evaluation.metrics import (
            TEXT_LATENCY_BATCHES,
            latency,
            length_profile,
            measure_outputs,
            text_latency_input,
        )
        if getattr(model, "pad_token_id", None) is None:  # a user's own model on integer inputs: timed as arrays
            return super().evaluate(model, data, teacher, batch_size, measure_latency, input_shape)
        metrics = measure_outputs(model, data, teacher, batch_size)
        if measure_latency:
            pad = int(model.pad_token_id)
            # key prefix -> timed length: the median, and the 95th percentile (a DataLoader: its padded length)
            lengths = length_profile(data.x, pad) if hasattr(data, "x") else {"median": None}
            first, cpu = first_sample(data), _cpu_model(model)
            for prefix, n in (("", lengths["median"]), ("p95len_", lengths.get("p95"))):
                if prefix and n is None:
                    continue
                ids = text_latency_input(first, pad, n)
                timed = latency(cpu, tuple(ids.shape), TEXT_LATENCY_BATCHES, example=ids)
                metrics.update({k.replace("latency_", f"latency_{prefix}", 1) if k.startswith("latency_ms") else k: v
                                for k, v in timed.items()})
                metrics[f"latency_{prefix}seq_len"] = int(ids.shape[0])
            for bs in TEXT_LATENCY_BATCHES:
                metrics[f"latency_ms_per_seq_b{bs}"] = metrics[f"latency_ms_b{bs}"] / bs
        return metrics

    def export(self, model: nn.Module, splits, path, fmt: str, int8: bool, *, samples: int = 256,
               calibration_samples: int = 512, dataset: str = "", int8_max_drop: float = 1.0,
               keep_int8: bool = False):
        """ONNX: the file with its tokenizer and labels (:mod:`kdkit.export.text`), parity on the first ``samples``
        test texts, accuracy on the whole test split (int8: within ``int8_max_drop`` points unless
        ``keep_int8``), PyTorch and onnxruntime timed in alternation at the split's median and 95th-percentile
        real lengths, batch 1 and 32. TorchScript: the array task's export."""
        import html
        from pathlib import Path

        from ..evaluation.metrics import text_latency_input
        from ..evaluation.report import format_table
        from ..export.core import export_model
        from ..export.text import (
            check_side_files,
            check_split_accuracy,
            paired_latency,
            side_files,
            timed_lengths,
            write_side_files,
        )
        from ..hf.models import PACKAGED_MODELS, load_tokenizer

        text = splits.info.get("text", {}) if isinstance(splits.info, dict) else {}
        if fmt != "onnx" or getattr(model, "pad_token_id", None) is None or not text:
            return super().export(model, splits, path, fmt, int8, samples=samples,
                                  calibration_samples=calibration_samples, dataset=dataset)
        path = Path(path)
        name = text.get("tokenizer")  # the data's tokenizer: a folder or a packaged name (else an object's class)
        loadable = isinstance(name, str) and (name in PACKAGED_MODELS or Path(name).is_dir())
        tokenizer = load_tokenizer(name) if loadable else getattr(model, "tokenizer", None)
        if tokenizer is None:
            raise KdkitError("cannot export the text model's tokenizer: the data names none kdkit can load")
        files = side_files(tokenizer, splits.info.get("classes") or list(range(splits.num_classes)),
                           text["max_length"], text["pad_token_id"])
        check_side_files(path.parent, files)  # before anything is written
        data = splits.test if splits.test is not None else splits.val
        pad = int(model.pad_token_id)
        model = _cpu_model(model).eval()
        from ..data.core import trim_to_longest

        inputs = trim_to_longest(data.x[:min(samples, len(data))], pad)
        result = export_model(model, inputs, path, fmt, int8=int8, timing=False)
        parity = result["parity"]  # int8: no logit tolerance; held to the accuracy rule below
        try:
            result["test_accuracy"] = check_split_accuracy(model, path, data, int8, int8_max_drop, keep_int8)
        except KdkitError:
            path.unlink(missing_ok=True)
            raise
        result["files"] = write_side_files(path.parent, files)
        result.update(self.export_normalisation(splits, None, dataset))
        lengths = timed_lengths(data.x, pad, text.get("max_length"))
        result["latency_lengths"] = lengths
        result["latency_seq_len"] = lengths["median"]
        result["latency"] = {}
        for key, n in lengths.items():
            ids = text_latency_input(data.x[0], pad, n)
            result["latency"][key] = paired_latency(model, path, ids)
        timed = result["latency"]["median"]
        result["pytorch"] = {f"latency_ms_b{b}": timed[f"pytorch_ms_b{b}"] for b in (1, 32)}
        result["onnxruntime"] = {f"ort_latency_ms_b{b}": timed[f"ort_ms_b{b}"] for b in (1, 32)}
        acc = result["test_accuracy"]
        rows = {f"{k} tokens ({n})": result["latency"][k] for k, n in lengths.items()}
        section = (f"<h2>Export: {html.escape(path.name)}</h2><p>{'int8 (dynamic), ' if int8 else ''}"
                   f"{result['bytes']:,} bytes, with {', '.join(html.escape(Path(f).name) for f in result['files'])}."
                   f" Test accuracy of the file {100 * acc.get('accuracy_file', float('nan')):.2f}% against "
                   f"{100 * acc.get('accuracy_pytorch', float('nan')):.2f}% in PyTorch "
                   f"({acc.get('samples', 0):,} texts, {100 * acc.get('prediction_agreement', float('nan')):.2f}% "
                   f"equal predictions); max abs logit diff {parity['max_abs_diff']:.3g} on {parity['samples']} "
                   f"texts. Latency in ms, one thread, PyTorch and onnxruntime timed in alternation:</p>"
                   f"<pre>{html.escape(format_table(rows))}</pre>")
        return result, section

    def export_normalisation(self, splits, preprocess, dataset: str) -> Dict[str, Any]:
        text = splits.info.get("text", {}) if isinstance(splits.info, dict) else {}
        return {"normalisation": (f"token ids: int64 (batch, sequence), right-padded with pad id "
                                  f"{text.get('pad_token_id')} from the tokenizer {text.get('tokenizer')!r}; "
                                  "the attention mask is computed inside the graph (ids != pad id)")}


__all__ = ["TextClassification", "TokenTask", "check_token_fit", "token_context"]
