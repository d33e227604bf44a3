"""Any methods combined by weights: ``loss = Σ_i w_i · loss_i``, every part logged separately.

    method:
      name: combo
      parts:
        kd: {weight: 1.0, temperature: 4}
        fitnets: {weight: 0.5, student_layer: features.1, teacher_layer: features.3}
        hint2: {name: fitnets, weight: 0.1, ...}   # a label other than a method name needs `name:`

Each part is built as the registered method it names, from the same
:class:`~kdkit.methods.base.MethodContext` (one student, one teacher), so its connectors/heads become
parameters of the combination and the one optimiser trains them.

**One forward per step.** Every part declares the layers it reads (``student_layers``,
``teacher_layers``). The combination captures the union of those layers in one student forward and one
teacher forward, with forward hooks registered once and removed after each pass (the public
``register_forward_hook`` API; the networks are never edited), and hands the resulting
:class:`~kdkit.methods.base.Outputs` to each part's ``compute_loss``. A part that overrides ``forward``
instead (it runs the networks its own way: CRD's memory bank, mutual learning's peers, or a method not yet
written against :class:`~kdkit.methods.base.Outputs`) runs its own forward, as does every part with
``share_forward: false``. The result is the same either way; only the work differs.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
from torch import nn

from ..errors import KdkitError
from .base import METHODS, Batch, Method, MethodContext, run_networks
from .build import instantiate
from .hooks import FeatureCapture


def _union(layer_lists) -> List[str]:
    """The names of several lists, each once, in first-seen order."""
    return list(dict.fromkeys(name for layers in layer_lists for name in layers))


@METHODS.register("combo")
class Combo(Method):
    """Weighted sum of registered methods sharing one student: ``loss = Σ_i weight_i · loss_i``.

    Every part's scalars are logged under ``<label>.<part>`` (``kd.kd``, ``kd.ce``, ``fitnets.hint``)
    and its full loss under ``<label>.loss``. Each part's loss is that method's complete objective,
    including its own cross-entropy term if it has one: with two parts that both add CE, the CE
    counts twice unless one part's CE weight is set to 0 (e.g. ``alpha: 1`` for ``kd``).

    Args:
        student: the model being trained.
        teacher: the frozen teacher shared by all parts.
        parts: ``{label: {weight: float, name: method (default: the label), **method options}}``.
        share_forward: run the student (and the teacher network) once per step for every part that computes
            its loss from :class:`~kdkit.methods.base.Outputs`.
        context: what kdkit supplies to methods (injected by :func:`~kdkit.methods.build.build_method`); the
            parts are built from it. Default: the student and teacher alone.
    """

    def __init__(self, student: nn.Module, teacher=None, parts: Optional[Dict[str, Dict[str, Any]]] = None,
                 share_forward: bool = True, context: Optional[MethodContext] = None):
        super().__init__(student, teacher)
        if not parts:
            raise ValueError("combo needs parts, e.g. parts: {kd: {weight: 1.0}, fitnets: {weight: 0.5, ...}}")
        if not isinstance(parts, dict):
            raise ValueError(f"combo parts must be a mapping label -> options; got {type(parts).__name__}")
        context = context if context is not None else MethodContext(student, teacher)
        self.share_forward = share_forward
        self.weights: Dict[str, float] = {}
        built = {}
        for label, options in parts.items():
            built[label], self.weights[label] = self._build_part(str(label), options, context)
        self.parts = nn.ModuleDict(built)
        # Declared once: what the combination reads is what its parts read (the teacher cache is decided from it and
        # holds the union of the parts' teacher layers).
        self.student_layers = _union(p.student_layers for p in self.parts.values())
        self.teacher_layers = _union(p.teacher_layers for p in self.parts.values())
        self.shared = [label for label, p in self.parts.items() if share_forward and p.shares_forward]
        shared = [self.parts[label] for label in self.shared]
        s_layers = _union(p.student_layers for p in shared)
        t_layers = _union(p.teacher_layers for p in shared)
        self._with_teacher = any(p.needs_teacher for p in shared) and teacher is not None
        self._s_cap = FeatureCapture(student, s_layers, "student") if s_layers else None
        self._t_cap = (FeatureCapture(teacher.model, t_layers, "teacher", copy_out_of_inference=True)
                       if t_layers else None)

    @staticmethod
    def _build_part(label: str, options: Any, context: MethodContext):
        if options is not None and not isinstance(options, dict):
            raise KdkitError(f"combo part {label!r}: options must be a mapping; given {options!r}")
        options = dict(options or {})
        if "." in label:
            raise KdkitError(f"combo part label {label!r} must not contain '.'")
        name = options.pop("name", label)
        weight = options.pop("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
            raise KdkitError(f"combo part {label!r}: weight must be a number >= 0; given {weight!r}")
        if METHODS.get(name) is Combo:
            raise KdkitError("combo parts cannot be combo themselves; list all parts in one combo")
        return instantiate(name, options, context, where=f"combo part {label!r} ({name})"), float(weight)

    @property
    def teacher_cache_refusal(self) -> Optional[str]:
        """The first part's refusal: one part that must not read the cache keeps the whole combination live."""
        return next((r for r in (p.teacher_cache_refusal for p in self.parts.values()) if r), None)

    def on_optimizer_step(self) -> None:
        for part in self.parts.values():  # parts with a schedule of their own (DKD's warm-up) count steps too
            part.on_optimizer_step()

    def forward(self, batch: Batch) -> Dict[str, torch.Tensor]:
        outputs = None
        if self.shared:
            outputs = run_networks(self.student, self.teacher if self._with_teacher else None, batch,
                                   self._s_cap, self._t_cap)
        outs = {label: part.compute_loss(batch, outputs) if label in self.shared else part(batch)
                for label, part in self.parts.items()}
        loss = sum(self.weights[label] * out["loss"] for label, out in outs.items())
        result: Dict[str, torch.Tensor] = {"loss": loss, "logits": next(iter(outs.values()))["logits"]}
        for label, out in outs.items():
            result[f"{label}.loss"] = out["loss"].detach()
            for key, value in out.items():
                if key not in ("loss", "logits") and torch.is_tensor(value) and value.dim() == 0:
                    result[f"{label}.{key}"] = value.detach()
        return result
