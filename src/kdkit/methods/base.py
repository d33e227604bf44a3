"""The method contract.

A method is a small ``nn.Module`` that owns the student (and any trainable
extras such as connectors) and holds a reference to the frozen teacher.
``forward(batch)`` returns a dict with:

- ``loss``: the scalar to minimise;
- named parts (``kd``, ``ce``, ...): detached-or-not scalars, logged separately;
- ``logits``: the student's outputs on ``batch["x"]`` (used for training accuracy).

The engine knows nothing else about methods. What kdkit hands a method's constructor is one
:class:`MethodContext`; the layers a method reads are declared (``student_layers``,
``teacher_layers``), so the teacher cache can be decided before training and ``combo`` can run the
networks once for all its parts. A method that computes its loss from :class:`Outputs` in
:meth:`Method.compute_loss` (instead of overriding ``forward``) shares that one forward inside a combo.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from ..losses import masked_cross_entropy
from ..registry import Registry
from ..teacher import Teacher
from .hooks import FeatureCapture

METHODS = Registry("method")

Batch = Dict[str, torch.Tensor]


@dataclass(frozen=True)
class MethodContext:
    """What kdkit supplies to a method's constructor, besides the user's options (built once by
    :func:`kdkit.methods.build.build_method`).

    A constructor receives each field whose name it declares as a parameter (``student`` and ``teacher``
    always; ``example_batch`` for dry runs that size connectors; ``num_samples`` for CRD's memory bank;
    ``num_classes``), or the whole context as ``context`` (``combo``, which builds other methods with it).

    Attributes:
        student: the model being trained.
        teacher: the frozen teacher, or None.
        example_batch: one small training batch (CPU), or None without data.
        num_samples: training-set size, or None.
        num_classes: the teacher's output width, or None.
    """

    student: nn.Module
    teacher: Optional[Teacher] = None
    example_batch: Optional[Batch] = field(default=None, compare=False)
    num_samples: Optional[int] = None
    num_classes: Optional[int] = None

    @classmethod
    def names(cls) -> Tuple[str, ...]:
        """Constructor parameters kdkit fills itself: never user options."""
        return tuple(f.name for f in fields(cls)) + ("context",)

    def arguments(self) -> Dict[str, Any]:
        """The keyword arguments a constructor may take from this context (the fields, and ``context``)."""
        return {**{f.name: getattr(self, f.name) for f in fields(self)}, "context": self}


@dataclass
class Outputs:
    """One step's forward passes on ``batch["x"]``, with the declared layers captured.

    Attributes:
        logits: the student's outputs (B, C), part of the autograd graph.
        features: student tensors by layer name (as declared in ``student_layers``).
        teacher_logits: the teacher's outputs (B, C) as ordinary constants, or None without a teacher.
        teacher_features: teacher tensors by layer name, copied out of inference mode.
    """

    logits: torch.Tensor
    features: Dict[str, torch.Tensor]
    teacher_logits: Optional[torch.Tensor]
    teacher_features: Dict[str, torch.Tensor]


def run_networks(student: nn.Module, teacher: Optional[Teacher], batch: Batch,
                 student_capture: Optional[FeatureCapture], teacher_capture: Optional[FeatureCapture]) -> Outputs:
    """The student's forward, and the teacher's, each once, capturing the named layers with forward hooks.

    The teacher's side goes through the :class:`~kdkit.teacher.Teacher`, so a cache attached by the engine can
    answer: ``teacher(batch)`` without teacher layers, :meth:`~kdkit.teacher.Teacher.with_features` with them
    (the cache holds those layers, or the network runs live with the hooks).
    """
    x = batch["x"]
    features: Dict[str, torch.Tensor] = {}
    if student_capture is None:
        logits = student(x)
    else:
        with student_capture:
            logits = student(x)
            features = dict(zip(student_capture.names, student_capture.features()))
        student_capture.clear()
    t_logits, t_features = None, {}
    if teacher is not None and teacher_capture is None:
        t_logits = teacher(batch)
    elif teacher is not None:
        t_logits, t_features = teacher.with_features(batch, teacher_capture)
    return Outputs(logits, features, t_logits, t_features)


class Method(nn.Module):
    """Base class: stores the student as a submodule and the teacher as a plain attribute.

    A method either overrides ``forward(batch)`` (running the networks itself), or implements
    :meth:`compute_loss` from the :class:`Outputs` of :meth:`forward_pass`; the latter shares one forward
    with the other parts of a ``combo``.

    Attributes:
        needs_teacher: whether the method requires a teacher.
        student_layers, teacher_layers: names of the layers the method reads (set in the constructor once the
            layers are known). A method that reads the teacher's layers must declare them: the teacher cache is
            decided from this declaration before training and then holds those layers too
            (:attr:`reads_teacher_features`).
        teacher_through_forward_pass: set True by a method that overrides ``forward`` but takes everything of
            the teacher from :meth:`forward_pass` (its outputs and the hooked ``teacher_layers``; RKD, CRD), so a
            feature cache can stand in for the network. Left False, such a method runs its teacher live.
    """

    needs_teacher = True
    student_layers: Sequence[str] = ()
    teacher_layers: Sequence[str] = ()
    teacher_through_forward_pass = False

    def __init__(self, student: nn.Module, teacher: Optional[Teacher] = None):
        super().__init__()
        self.student = student
        self.teacher = teacher  # not an nn.Module, so not a submodule: never trained, never saved
        self._captures: Optional[Tuple[tuple, Optional[FeatureCapture], Optional[FeatureCapture]]] = None

    @property
    def reads_teacher_features(self) -> bool:
        """Whether the method reads the teacher's intermediate layers (a cache for it holds them too)."""
        return bool(self.teacher_layers)

    @property
    def teacher_cache_refusal(self) -> Optional[str]:
        """Why the teacher cache must not be used for this method (a one-line reason), or None.

        Read once by :func:`kdkit.teacher.plan.cache_plan`. ``lm_kd`` declares one (per-token distributions of a
        whole vocabulary). By default a method that reads teacher layers is refused only when it overrides
        ``forward`` without declaring :attr:`teacher_through_forward_pass`: its own forward may read more of the
        teacher network (other modules' inputs, gradients, parameters) than a cache of the hooked tensors holds."""
        if self.teacher_layers and not (type(self).forward is Method.forward or self.teacher_through_forward_pass):
            return (f"method {type(self).__name__} reads the teacher's layers ({', '.join(self.teacher_layers)}) in "
                    f"its own forward(), which may use more of the teacher network than the hooked outputs a cache "
                    f"holds (module inputs, gradients, parameters); it runs the teacher live")
        return None

    @property
    def shares_forward(self) -> bool:
        """Whether the loss is computed from :class:`Outputs` (so a ``combo`` can run the networks for it)."""
        cls = type(self)
        return cls.forward is Method.forward and cls.compute_loss is not Method.compute_loss

    def forward_pass(self, batch: Batch) -> Outputs:
        """The student and the teacher (when the method has one) on ``batch``, the declared layers captured."""
        key = (tuple(self.student_layers), tuple(self.teacher_layers))
        if self._captures is None or self._captures[0] != key:
            # Built once (module names are resolved here, an unknown one fails with the names that exist).
            s_cap = FeatureCapture(self.student, key[0], "student") if key[0] else None
            t_cap = (FeatureCapture(self.teacher.model, key[1], "teacher", copy_out_of_inference=True)
                     if key[1] else None)
            self._captures = (key, s_cap, t_cap)
        _, s_cap, t_cap = self._captures
        return run_networks(self.student, self.teacher if self.needs_teacher else None, batch, s_cap, t_cap)

    def compute_loss(self, batch: Batch, outputs: Outputs) -> Dict[str, torch.Tensor]:  # pragma: no cover
        """The output dict (``loss``, parts, ``logits``) from one step's :class:`Outputs`."""
        raise NotImplementedError(f"{type(self).__name__} overrides neither forward nor compute_loss")

    def forward(self, batch: Batch) -> Dict[str, torch.Tensor]:
        return self.compute_loss(batch, self.forward_pass(batch))

    def prepare(self, train_data, *, batch_size: int = 512, log=None) -> Optional[str]:
        """Called once by the loop before the first step (after the teacher cache is decided), with the training
        data: a method that precomputes something from it (``lm_kd``'s offline top-k store of the teacher) does it
        here. Returns a one-line description for the run's report (kept beside ``teacher_cache``), or None.
        The default does nothing."""
        return None

    def on_optimizer_step(self) -> None:
        """Called by the loop after every optimiser step (not every micro-batch under gradient accumulation).

        Methods with a schedule of their own (DKD's warm-up) count steps here; a method made of other methods
        (``combo``) passes the call on to its parts. The default does nothing: this runs on every step, so it
        walks no modules.
        """

    @staticmethod
    def add_ce(loss: torch.Tensor, out: Dict[str, torch.Tensor], logits: torch.Tensor, batch: Batch,
               weight: float) -> torch.Tensor:
        """``loss + weight · CE`` over the batch's labelled samples, logging ``out["ce"]``.

        Unchanged when ``weight`` is 0 or the batch has no class labels (unlabelled data, regression targets).
        """
        y = batch.get("y")
        if y is None or y.is_floating_point() or weight <= 0:
            return loss
        ce = masked_cross_entropy(logits, y)
        out["ce"] = ce.detach()
        return loss + weight * ce
