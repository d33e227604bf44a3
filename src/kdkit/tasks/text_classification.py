"""Text classification: token ids (N, L), right-padded, with class labels (N,).

Differs from the array task in four places: the model factory gets the tokenizer's ``vocab_size`` and
``pad_token_id``; models and teachers are checked against the data's pad id, vocabulary and label count;
latency is timed on real token ids at batch 1 and 32 (:func:`kdkit.evaluation.metrics.text_latency_input`);
the exported file takes int64 ids and computes its attention mask itself.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

from torch import nn

from ..data.core import first_sample, teacher_view
from ..errors import KdkitError
from .base import Task, _cpu_model, first_target


def token_context(splits, teacher: bool = False) -> Dict[str, Any]:
    """``vocab_size`` and ``pad_token_id`` of tokenised splits (the teacher's own when it has a tokenizer of its
    own), for text model factories; empty when the splits record no tokenizer."""
    text = splits.info.get("text") if isinstance(splits.info, dict) else None
    if not isinstance(text, dict):
        return {}
    prefix = "teacher_" if teacher and "teacher_vocab_size" in text else ""
    return {"vocab_size": text[prefix + "vocab_size"], "pad_token_id": text[prefix + "pad_token_id"]}


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
        """The array task's figures, with latency timed on the first text's real ids (batch 1 and 32)."""
        from ..evaluation.metrics import TEXT_LATENCY_BATCHES, latency, measure_outputs, text_latency_input

        if getattr(model, "pad_token_id", None) is None:  # a user's own model on integer inputs: timed as arrays
            return super().evaluate(model, data, teacher, batch_size, measure_latency, input_shape)
        metrics = measure_outputs(model, data, teacher, batch_size)
        if measure_latency:
            ids = text_latency_input(first_sample(data), int(model.pad_token_id))
            metrics.update(latency(_cpu_model(model), tuple(ids.shape), TEXT_LATENCY_BATCHES, example=ids))
            metrics["latency_seq_len"] = int(ids.shape[0])
            for bs in TEXT_LATENCY_BATCHES:
                metrics[f"latency_ms_per_seq_b{bs}"] = metrics[f"latency_ms_b{bs}"] / bs
        return metrics

    def export_normalisation(self, splits, preprocess, dataset: str) -> Dict[str, Any]:
        text = splits.info.get("text", {}) if isinstance(splits.info, dict) else {}
        return {"normalisation": (f"token ids: int64 (batch, sequence), right-padded with pad id "
                                  f"{text.get('pad_token_id')} from the tokenizer {text.get('tokenizer')!r}; "
                                  "the attention mask is computed inside the graph (ids != pad id)")}


__all__ = ["TextClassification", "TokenTask", "check_token_fit", "token_context"]
