"""What each step of a compression ladder does to a model: one handler per step type, keyed by its name.

The ``compress:`` section of a config is a list of steps (their settings are the ``*Step`` classes in
:mod:`kdkit.config`, which also describe themselves for the ladder table). Here each step name maps to a
:class:`StepHandler` with two methods:

- ``check(step, model, ctx)``: a dry run on a copy, without recovery training, done for every step before
  the run directory is created, so that a step the model cannot take (an architecture torch-pruning cannot
  trace, a layer name that does not exist, unrelated models for a transfer) fails before any work is
  written or trained. It returns the model as the step would leave it, for the next step's check.
- ``apply(step, model, ctx)``: the step itself, with its recovery distillation, returning a :class:`Outcome`.

Adding a step type is one ``*Step`` class in :data:`kdkit.config.COMPRESS_STEPS` and one handler in
:data:`HANDLERS`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional

import torch
from torch import nn

from ..errors import KdkitError
from .lowrank import factorize
from .prune import count_nonzero, count_parameters, make_permanent, prune_structured, prune_unstructured
from .quantize import convert_qat, prepare_qat, quantize_dynamic, quantize_static
from .transfer import transfer_weights

#: ``recover(model, epochs, lr, tag)``: ``epochs`` of distillation from the teacher, returning the kept model.
Recover = Callable[[nn.Module, int, Optional[float], str], nn.Module]


def no_recovery(model: nn.Module, epochs: int, lr: Optional[float], tag: str) -> nn.Module:
    """The recovery of a dry run: none (a check looks at shapes and support, not accuracy)."""
    return model


@dataclass
class StepContext:
    """What a step may use besides the model.

    Attributes:
        teacher: the frozen teacher network (transfer copies its weights).
        train_data: the training split (calibration samples come from its start, so they depend on nothing random).
        example: a few training inputs, shape (B, ...), to trace layer dependencies (structured pruning, QAT).
        recover: recovery distillation (see :data:`Recover`); :func:`no_recovery` in a dry run.
        where: ``compress[i] (name)``, the config position for error messages.
        tag: ``NN-name``, the step's folder under ``steps/`` (recovery phases write there).
    """

    teacher: nn.Module
    train_data: Any
    example: torch.Tensor
    recover: Recover
    where: str = ""
    tag: str = ""


@dataclass
class Outcome:
    """What a step leaves behind.

    Attributes:
        model: the float model after the step.
        quantized: the int8 model, when the step quantised.
        details: extra entries of the step's ladder record (``transfer``, ``lowrank``).
        edit: the structural change :func:`kdkit.compress.load_compressed` must replay to rebuild the model
            (structured pruning needs none: the saved tensors' shapes say it).
    """

    model: nn.Module
    quantized: Optional[nn.Module] = None
    details: Dict[str, Any] = field(default_factory=dict)
    edit: Optional[Dict[str, Any]] = None


class StepHandler:
    """How one step type applies itself; subclasses override :meth:`apply` and, when the step can fail on a
    given model, :meth:`check`."""

    def check(self, step, model: nn.Module, ctx: StepContext) -> nn.Module:
        return model

    def apply(self, step, model: nn.Module, ctx: StepContext) -> Outcome:
        raise NotImplementedError


class Distill(StepHandler):
    def apply(self, step, model, ctx):
        return Outcome(ctx.recover(model, step.epochs, step.lr, ctx.tag))


class Transfer(StepHandler):
    def check(self, step, model, ctx):
        transfer_weights(copy.deepcopy(model), ctx.teacher, step.layers)
        return model

    def apply(self, step, model, ctx):
        report = transfer_weights(model, ctx.teacher, step.layers)
        return Outcome(ctx.recover(model, step.epochs, step.lr, ctx.tag),
                       details={"transfer": {k: len(v) for k, v in report.items()}})


class Prune(StepHandler):
    """Reach the target in ``iterations`` rounds, each a geometric share of the way, each followed by recovery."""

    def check(self, step, model, ctx):
        return self._prune(step, copy.deepcopy(model), ctx.example, ctx.tag, no_recovery)

    def apply(self, step, model, ctx):
        return Outcome(self._prune(step, model, ctx.example, ctx.tag, ctx.recover))

    @staticmethod
    def _prune(step, model: nn.Module, example: torch.Tensor, tag: str, recover: Recover) -> nn.Module:
        # structured pruning removes parameters; unstructured zeroes them, so it counts the non-zero ones
        counted = count_parameters if step.structured else count_nonzero
        target = step.target_parameters or int((1 - step.sparsity) * counted(model))
        for it in range(step.iterations):
            current = counted(model)
            goal = int(current * (target / current) ** (1.0 / (step.iterations - it)))
            if step.structured:
                model = prune_structured(model, example, target_parameters=goal)
            else:
                # masks stay during recovery so that pruned weights stay zero while the rest trains
                prune_unstructured(model, target_parameters=goal, permanent=False)
            model = recover(model, step.epochs, step.lr, f"{tag}-{it + 1}" if step.iterations > 1 else tag)
            if not step.structured:
                make_permanent(model)
        return model


class LowRank(StepHandler):
    def check(self, step, model, ctx):
        model = copy.deepcopy(model)
        if step.rank is None:
            # the rank an energy gives depends on the trained weights; what shapes alone decide is whether
            # any layer can get smaller at all (rank 1 is the smallest an energy can give)
            if not factorize(copy.deepcopy(model), rank=1, layers=step.layers):
                raise self._nothing_smaller(ctx)
            factorize(model, energy=step.energy, layers=step.layers)
            return model
        if not factorize(model, rank=step.rank, layers=step.layers):
            raise self._nothing_smaller(ctx)
        return model

    def apply(self, step, model, ctx):
        layers = factorize(model, rank=step.rank, energy=step.energy, layers=step.layers)
        if not layers:
            raise self._nothing_smaller(ctx)
        return Outcome(ctx.recover(model, step.epochs, step.lr, ctx.tag), details={"lowrank": layers},
                       edit={"op": "lowrank", "layers": layers})

    @staticmethod
    def _nothing_smaller(ctx: StepContext) -> KdkitError:
        return KdkitError(f"{ctx.where}: no layer would get smaller at this rank/energy; lower the rank or energy, "
                          "or name layers explicitly")


def calibration_inputs(train_data, samples: int) -> torch.Tensor:
    """The first ``samples`` training inputs, (N, ...): what static quantisation observes (no randomness)."""
    n = min(samples, len(train_data))
    if hasattr(train_data, "x"):
        return train_data.x[:n]
    return torch.stack([train_data[j]["x"] for j in range(n)])


def quantize_like(step, model: nn.Module, train_data) -> nn.Module:
    """The int8 model of a ``dynamic`` or ``static`` quantize step (deterministic given model and data)."""
    if step.mode == "dynamic":
        return quantize_dynamic(model, step.backend)
    if step.mode == "static":
        return quantize_static(model, calibration_inputs(train_data, step.calibration_samples), step.backend)
    raise KdkitError(f"quantize mode {step.mode!r} cannot be redone without training (only dynamic and static)")


class Quantize(StepHandler):
    def check(self, step, model, ctx):
        if step.mode == "qat":
            prepare_qat(model, ctx.example, step.backend)
        else:  # two calibration samples are enough to trace and convert
            quantize_like(step.model_copy(update={"calibration_samples": 2}), model, ctx.train_data)
        return model

    def apply(self, step, model, ctx):
        if step.mode != "qat":
            return Outcome(model, quantized=quantize_like(step, model, ctx.train_data))
        # the float model stays the one before QAT: the fake-quantised weights live only in the int8 model
        prepared = ctx.recover(prepare_qat(model, ctx.example, step.backend), step.epochs, step.lr, ctx.tag)
        return Outcome(model, quantized=convert_qat(prepared))


#: One handler per step name of :data:`kdkit.config.COMPRESS_STEPS`.
HANDLERS: Dict[str, StepHandler] = {"distill": Distill(), "transfer": Transfer(), "prune": Prune(),
                                    "lowrank": LowRank(), "quantize": Quantize()}

__all__ = ["HANDLERS", "Outcome", "StepContext", "StepHandler", "calibration_inputs", "no_recovery", "quantize_like"]
