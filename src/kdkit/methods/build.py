"""Building a registered method: its options checked, the arguments kdkit supplies injected."""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import nn

from ..errors import KdkitError
from ..registry import call_checked, keyword_params
from ..teacher import Teacher
from .base import METHODS, Method, MethodContext

# Constructor arguments build_method supplies itself (never user options): the fields of MethodContext.
INJECTED_METHOD_ARGS = MethodContext.names()


def example_batch_of(train_data, size: int = 16) -> Optional[Dict[str, torch.Tensor]]:
    """The first ``size`` training samples as one batch dict (on the CPU), or None when there is no data."""
    if train_data is None:
        return None
    from ..data.core import make_loader

    try:
        return next(iter(make_loader(train_data, batch_size=min(size, max(1, len(train_data))))))
    except (StopIteration, TypeError):
        return None


def method_context(student: nn.Module, teacher: Optional[Teacher], *, train_data=None,
                   example_batch: Optional[Dict[str, torch.Tensor]] = None, num_samples: Optional[int] = None,
                   num_classes: Optional[int] = None) -> MethodContext:
    """The :class:`MethodContext` of a run: what is not given is taken from ``train_data`` (the first small
    batch, the number of samples) and from the teacher (its output width on that batch)."""
    if example_batch is None:
        example_batch = example_batch_of(train_data)
    if num_samples is None and train_data is not None and hasattr(train_data, "__len__"):
        num_samples = len(train_data)
    if num_classes is None and teacher is not None and example_batch is not None:
        try:
            num_classes = int(teacher(example_batch).shape[-1])
        except Exception:  # a teacher that cannot say; methods needing it will complain themselves
            num_classes = None
    return MethodContext(student, teacher, example_batch, num_samples, num_classes)


def instantiate(name: str, options: Dict[str, Any], context: MethodContext, where: Optional[str] = None) -> Method:
    """Construct registered method ``name`` from the user's ``options`` and the ``context``.

    The one place a method's constructor is called: unknown options and wrongly typed values are one-line
    errors naming ``where`` (default ``method 'NAME'``); so is a constructor's ``ValueError``.
    """
    where = where or f"method {name!r}"
    cls = METHODS.get(name)
    if getattr(cls, "needs_teacher", True) and context.teacher is None:
        raise KdkitError(f"{where} needs a teacher")
    try:
        return call_checked(cls, options, where, context.arguments())
    except ValueError as e:
        raise KdkitError(f"{where}: {e}") from None


def build_method(name: str, student: nn.Module, teacher: Optional[Teacher], options: Dict[str, Any], *,
                 train_data=None, example_batch: Optional[Dict[str, torch.Tensor]] = None,
                 num_samples: Optional[int] = None, num_classes: Optional[int] = None) -> Method:
    """Instantiate a registered method, checking its options.

    Besides ``student`` and ``teacher``, a method's constructor receives, when it declares them,
    ``example_batch`` (one small training batch, for dry runs), ``num_samples`` (training-set size) and
    ``num_classes`` (see :class:`~kdkit.methods.base.MethodContext`); ``train_data`` fills the first two when
    they are not given.
    """
    METHODS.get(name)  # an unknown name fails before any work
    context = method_context(student, teacher, train_data=train_data, example_batch=example_batch,
                             num_samples=num_samples, num_classes=num_classes)
    return instantiate(name, options, context)


def method_temperature(name: str, options: Dict[str, Any]) -> float:
    """The distillation temperature method ``name`` will use (its option, else its default, else 1)."""
    if "temperature" in options:
        return float(options["temperature"])
    param = (keyword_params(METHODS.get(name)) or {}).get("temperature", (None,))[0]  # a base's default too
    return float(param.default) if param is not None and isinstance(param.default, (int, float)) else 1.0


