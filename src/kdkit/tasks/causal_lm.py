"""Causal language models: token rows ``x`` (N, L) and next-token targets ``y`` (N, L) (``-100``: nothing to predict).

Measured by :mod:`kdkit.lm.evaluate` (streamed perplexity, next-token accuracy and agreement, generation speed,
samples: never (N, L, V) outputs in memory), exported by :mod:`kdkit.lm.export` (ids in, (B, L, V) logits out,
both axes dynamic). A dense teacher cache is refused: it would hold N x L x V floats; ``lm_kd`` keeps an offline
teacher store of its own instead (``method.store_kind``, :mod:`kdkit.lm.store`).
"""

from __future__ import annotations

import html
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from ..data.core import has_token_targets
from ..errors import KdkitError
from .text_classification import TokenTask


class CausalLM(TokenTask):
    """Next-token prediction over token rows."""

    name = "causal_lm"
    cache_refusal = ("a causal LM's teacher outputs are (N, L, V) next-token logits, too large for the dense cache "
                     "(lm_kd keeps a teacher store instead: method.store_kind)")

    @staticmethod
    def matches(data) -> bool:
        return has_token_targets(data)

    def check_outputs(self, teacher_out: torch.Tensor, student_out: torch.Tensor) -> None:
        t, s = teacher_out, student_out
        if t.dim() == 3 and s.dim() == 3 and t.shape[-1] != s.shape[-1]:  # (B, L, V) next-token logits
            raise KdkitError(f"teacher vocabulary has {t.shape[-1]} tokens but the student's has {s.shape[-1]}; "
                             "token-level distillation needs one shared tokenizer, or the teacher's own tokenizer "
                             "as lm_kd's method.teacher_tokenizer")
        super().check_outputs(t, s)

    def evaluate(self, model: nn.Module, data, teacher: Optional[nn.Module] = None, batch_size: int = 512,
                 measure_latency: bool = True, input_shape: Optional[Sequence[int]] = None) -> Dict[str, Any]:
        from ..lm.evaluate import evaluate_lm

        return evaluate_lm(model, data, teacher, batch_size=min(batch_size, 64), measure_speed=measure_latency)

    def validate(self, student: nn.Module, val_data, batch_size: int, teacher: Optional[nn.Module],
                 teacher_outputs: Any = None) -> Tuple[Dict[str, float], Any]:
        """Streamed per batch; the teacher's arg-max tokens (``teacher_outputs``) are computed once per run."""
        from ..lm.evaluate import lm_quality

        return lm_quality(student, val_data, min(batch_size, 64), teacher, teacher_outputs)

    def validation_metrics(self, teacher: bool) -> Tuple[str, ...]:
        return ("nll", "perplexity", "token_accuracy", "tokens") + (("agreement",) if teacher else ())

    def teacher_val_accuracy(self, teacher, val) -> Optional[float]:
        """The teacher's next-token accuracy on the validation rows (streamed)."""
        if teacher is None or val is None or not hasattr(teacher, "model"):
            return None
        from ..lm.evaluate import lm_quality

        return lm_quality(teacher.model, val)[0]["token_accuracy"]

    def describe_data(self, train) -> Dict[str, Any]:
        """Every position with a target is a label: the report names the targets instead of a labelled share."""
        return {"targets": "next-token"}

    def export_name(self, fmt: str, int8: bool) -> str:
        return "model-int8.onnx" if int8 else "model.onnx"

    def export(self, model: nn.Module, splits, path, fmt: str, int8: bool, *, samples: int = 256,
               calibration_samples: int = 512, dataset: str = "", int8_max_drop: float = 1.0,
               keep_int8: bool = False) -> Tuple[Dict[str, Any], str]:
        """ONNX only: ids in, (B, L, V) logits out, parity on the first test rows; ``int8``: dynamic quantisation,
        held to a test perplexity at most ``int8_max_drop`` percent above the float model's."""
        if fmt != "onnx":
            raise KdkitError("causal LMs export to ONNX only (--format onnx); see kdkit.lm.export")
        from ..lm.export import export_lm

        data = splits.test if splits.test is not None else splits.val
        result = export_lm(model, data.x[:min(samples, len(data), 32)], path, int8=int8,
                           int8_max_rise=int8_max_drop, keep_int8=keep_int8)
        p = result["parity"]
        speed = ""
        if "onnxruntime" in result:
            speed = (f" Greedy generation at batch 1: onnxruntime "
                     f"{result['onnxruntime']['onnx_gen_tokens_per_s']:.1f} tokens/s (no KV cache), PyTorch "
                     f"{result['pytorch']['gen_tokens_per_s']:.1f} tokens/s (KV cache).")
        if "test_perplexity" in result:
            q = result["test_perplexity"]
            speed += (f" int8: test perplexity {q['perplexity_file']:.3f} against {q['perplexity_pytorch']:.3f} in "
                      f"float ({q['perplexity_rise_percent']:+.2f}%, bound {q['int8_max_rise_percent']:g}%).")
        section = (f"<h2>Export: {html.escape(path.name)}</h2><p>{result['bytes']:,} bytes; max abs diff vs PyTorch "
                   f"{p['max_abs_diff']:.3g} over real positions, arg-max agreement {p['argmax_agreement']:.4f} on "
                   f"{p['samples']} test rows.{speed}</p>")
        return result, section


__all__ = ["CausalLM"]
