"""Kinds of task: the one seam where arrays, regression, text classifiers and causal LMs differ.

    task = task_for(splits)          # chosen once, from the training data, while a run is assembled
    task.evaluate(model, data)       # the figures users decide on, for this kind of task

:data:`TASKS` is tried in order; the first whose :meth:`~kdkit.tasks.base.Task.matches` claims the training data
is the run's task (arrays are the fallback). See :mod:`kdkit.tasks.base` for what a task owns.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

from torch import nn

from ..data.core import DataSplits, as_dataset
from .base import Task
from .causal_lm import CausalLM
from .classification import Classification
from .regression import Regression
from .text_classification import TextClassification

#: The kinds of task, most specific first: the first that claims a run's training data is its task.
TASKS: Sequence[Task] = (CausalLM(), TextClassification(), Regression(), Classification())


def task_for(data: Any) -> Task:
    """The task of ``data``: a :class:`~kdkit.data.DataSplits` (its training split decides) or one split."""
    train = data.train if isinstance(data, DataSplits) else data
    return next(t for t in TASKS if t.matches(train))


def evaluate(model: nn.Module, data: Any, teacher: Optional[nn.Module] = None, batch_size: int = 512,
             measure_latency: bool = True, input_shape: Optional[Sequence[int]] = None) -> Dict[str, float]:
    """Everything about ``model`` on ``data``, as its kind of task measures it (``kdkit.evaluate``).

    Args:
        model: the model to measure.
        data: a Dataset, a DataLoader, an ``(x, y)`` tuple or a tensor of inputs.
        teacher: a module or :class:`kdkit.Teacher`; when given, agreement with it is reported.
        measure_latency: time the model on the CPU (batch 1 and 256; text: 1 and 32; causal LMs: generation).

    Returns:
        Classification: ``accuracy, macro_f1, nll, ece`` (+ ``agreement``); regression: ``mse, mae``
        (+ ``mse_to_teacher``), in the data's own units; both with ``parameters, bytes`` and ``latency_ms_b*``.
        Causal LMs: ``nll, perplexity, token_accuracy`` (+ ``agreement``), ``parameters, bytes``,
        ``gen_tokens_per_s`` and ``samples`` (see :mod:`kdkit.lm.evaluate`).
    """
    data = as_dataset(data)
    teacher = getattr(teacher, "model", teacher) if teacher is not None and not isinstance(teacher, nn.Module) \
        else teacher
    return task_for(data).evaluate(model, data, teacher, batch_size, measure_latency, input_shape)


__all__ = ["TASKS", "CausalLM", "Classification", "Regression", "Task", "TextClassification", "evaluate",
           "task_for"]
