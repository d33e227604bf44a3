"""Building a registered method: its options checked, the arguments kdkit supplies injected."""

from __future__ import annotations

import inspect
from typing import Any, Dict, Optional

import torch
from torch import nn

from ..errors import KdkitError
from ..registry import call_checked
from ..teacher import Teacher
from .base import METHODS, Method


# Constructor arguments build_method supplies itself (never user options): one small training batch for
# dry runs that size connectors, the training-set size (CRD's memory bank) and the number of classes.
INJECTED_METHOD_ARGS = ("student", "teacher", "example_batch", "num_samples", "num_classes")


def example_batch_of(train_data, size: int = 16) -> Optional[Dict[str, torch.Tensor]]:
    """The first ``size`` training samples as one batch dict (on the CPU), or None when there is no data."""
    if train_data is None:
        return None
    from ..data.core import make_loader

    try:
        return next(iter(make_loader(train_data, batch_size=min(size, max(1, len(train_data))))))
    except (StopIteration, TypeError):
        return None


def build_method(name: str, student: nn.Module, teacher: Optional[Teacher], options: Dict[str, Any], *,
                 train_data=None, example_batch: Optional[Dict[str, torch.Tensor]] = None,
                 num_samples: Optional[int] = None, num_classes: Optional[int] = None) -> Method:
    """Instantiate a registered method, checking its options.

    Besides ``student`` and ``teacher``, a method's constructor receives, when it declares them,
    ``example_batch`` (one small training batch, for dry runs), ``num_samples`` (training-set size) and
    ``num_classes``; ``train_data`` fills the first two when they are not given.
    """
    cls = METHODS.get(name)
    if getattr(cls, "needs_teacher", True) and teacher is None:
        raise KdkitError(f"method {name!r} needs a teacher")
    if example_batch is None:
        example_batch = example_batch_of(train_data)
    if num_samples is None and train_data is not None and hasattr(train_data, "__len__"):
        num_samples = len(train_data)
    if num_classes is None and teacher is not None and example_batch is not None:
        try:
            num_classes = int(teacher(example_batch).shape[-1])
        except Exception:  # a teacher that cannot say; methods needing it will complain themselves
            num_classes = None
    injected = {"student": student, "teacher": teacher, "example_batch": example_batch,
                "num_samples": num_samples, "num_classes": num_classes}
    try:
        return call_checked(cls, options, f"method {name!r}", injected)
    except ValueError as e:
        raise KdkitError(f"method {name!r}: {e}") from None



def method_temperature(name: str, options: Dict[str, Any]) -> float:
    """The distillation temperature method ``name`` will use (its option, else its default, else 1)."""
    if "temperature" in options:
        return float(options["temperature"])
    param = inspect.signature(METHODS.get(name)).parameters.get("temperature")
    return float(param.default) if param is not None and isinstance(param.default, (int, float)) else 1.0


