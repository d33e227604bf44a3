"""Any methods combined by weights: ``loss = Σ_i w_i · loss_i``, every part logged separately.

    method:
      name: combo
      parts:
        kd: {weight: 1.0, temperature: 4}
        fitnets: {weight: 0.5, student_layer: features.1, teacher_layer: features.3}
        hint2: {name: fitnets, weight: 0.1, ...}   # a label other than a method name needs `name:`

Each part is built as the registered method it names, sharing the one student (and teacher), so
its connectors/heads become parameters of the combination and the one optimiser trains them.

**One student forward per step.** Parts call ``student(x)`` (and ``teacher(batch)``) themselves. While
the combination runs, the forward of the student and of the teacher network is shared: the first
call on a given input tensor runs the network for real and records every submodule call; a later
call on the *same* tensor object returns the same output (same autograd graph) and replays the
recorded calls to the forward hooks (and pre-hooks) that the calling part has installed, so
feature-capturing parts still see their layers fire. Hooks that *modify* outputs are not replayed
faithfully (their return value is ignored); set ``share_forward: false`` for such parts, and every
part then runs its own forward. A part that calls the network on a different tensor (e.g. its own
augmentation) always runs a real forward.
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch
from torch import nn

from ..registry import call_checked
from .base import METHODS, Batch, Method

_MISSING = object()


class _SharedForward:
    """Memoise ``module.forward`` by input identity and replay submodule hooks on a memo hit."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.entries: List[tuple] = []  # (args, kwargs, events, output)
        self.events: Optional[list] = None
        self.original = module.forward
        self.handles = []
        self.recorders = set()
        for sub in module.modules():
            if sub is module:
                continue
            pre = sub.register_forward_pre_hook(self._record_pre, with_kwargs=True)
            post = sub.register_forward_hook(self._record_post, with_kwargs=True)
            self.handles += [pre, post]
            self.recorders.update({pre.id, post.id})

    def _record_pre(self, mod, args, kwargs):
        if self.events is not None:
            self.events.append(("pre", mod, args, kwargs, None))

    def _record_post(self, mod, args, kwargs, output):
        if self.events is not None:
            self.events.append(("post", mod, args, kwargs, output))

    def _lookup(self, args, kwargs):
        for e_args, e_kwargs, events, output in self.entries:
            if (len(e_args) == len(args) and all(a is b for a, b in zip(e_args, args))
                    and e_kwargs.keys() == kwargs.keys() and all(e_kwargs[k] is kwargs[k] for k in kwargs)):
                return events, output
        return None, _MISSING

    def _replay(self, events) -> None:
        for kind, mod, args, kwargs, output in events:
            if kind == "pre":
                for hid, hook in list(mod._forward_pre_hooks.items()):
                    if hid in self.recorders:
                        continue
                    if hid in mod._forward_pre_hooks_with_kwargs:
                        hook(mod, args, kwargs)
                    else:
                        hook(mod, args)
            else:
                for hid, hook in list(mod._forward_hooks.items()):
                    if hid in self.recorders:
                        continue
                    if hid in mod._forward_hooks_with_kwargs:
                        hook(mod, args, kwargs, output)
                    else:
                        hook(mod, args, output)

    def __call__(self, *args, **kwargs):
        events, output = self._lookup(args, kwargs)
        if output is not _MISSING:
            self._replay(events)
            return output
        self.events = []
        try:
            output = self.original(*args, **kwargs)
            self.entries.append((args, kwargs, self.events, output))
        finally:
            self.events = None
        return output

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        if self.module.__dict__.get("forward") is self:
            del self.module.forward
        self.entries.clear()


@contextlib.contextmanager
def shared_forward(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Inside the block, each module runs its forward at most once per input tensor (see module docs)."""
    shared = []
    try:
        for m in dict.fromkeys(modules):  # unique, in order
            s = _SharedForward(m)
            m.forward = s  # an instance attribute: nn.Module.__call__ now calls it (top-level hooks still run)
            shared.append(s)
        yield
    finally:
        for s in shared:
            s.close()


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
        share_forward: run the student (and teacher network) forward once per step for all parts.
        example_batch, num_samples, num_classes: passed to the parts that accept them (injected by
            the API for methods that size connectors or memory banks).
    """

    def __init__(self, student: nn.Module, teacher=None, parts: Optional[Dict[str, Dict[str, Any]]] = None,
                 share_forward: bool = True, example_batch: Optional[Batch] = None,
                 num_samples: Optional[int] = None, num_classes: Optional[int] = None):
        super().__init__(student, teacher)
        if not parts:
            raise ValueError("combo needs parts, e.g. parts: {kd: {weight: 1.0}, fitnets: {weight: 0.5, ...}}")
        if not isinstance(parts, dict):
            raise ValueError(f"combo parts must be a mapping label -> options; got {type(parts).__name__}")
        self.share_forward = share_forward
        self.weights: Dict[str, float] = {}
        built = {}
        injected = {"student": student, "teacher": teacher, "example_batch": example_batch,
                    "num_samples": num_samples, "num_classes": num_classes}
        for label, options in parts.items():
            options = dict(options or {})
            if "." in label:
                raise ValueError(f"combo part label {label!r} must not contain '.'")
            name = options.pop("name", label)
            weight = float(options.pop("weight", 1.0))
            if weight < 0:
                raise ValueError(f"combo part {label!r}: weight must be >= 0; got {weight}")
            cls = METHODS.get(name)
            if cls is Combo:
                raise ValueError("combo parts cannot be combo themselves; list all parts in one combo")
            if getattr(cls, "needs_teacher", True) and teacher is None:
                raise ValueError(f"combo part {label!r} ({name}) needs a teacher")
            built[label] = call_checked(cls, options, f"combo part {label!r} ({name})", injected)
            self.weights[label] = weight
        self.parts = nn.ModuleDict(built)

    def _networks(self) -> List[nn.Module]:
        nets = [self.student]
        t_model = getattr(self.teacher, "model", None)
        if isinstance(t_model, nn.Module):
            nets.append(t_model)
        return nets

    def forward(self, batch: Batch) -> Dict[str, torch.Tensor]:
        ctx = shared_forward(self._networks()) if self.share_forward else contextlib.nullcontext()
        with ctx:
            outs = {label: part(batch) for label, part in self.parts.items()}
        loss = sum(self.weights[label] * out["loss"] for label, out in outs.items())
        result: Dict[str, torch.Tensor] = {"loss": loss, "logits": next(iter(outs.values()))["logits"]}
        for label, out in outs.items():
            result[f"{label}.loss"] = out["loss"].detach()
            for key, value in out.items():
                if key not in ("loss", "logits") and torch.is_tensor(value) and value.dim() == 0:
                    result[f"{label}.{key}"] = value.detach()
        return result
