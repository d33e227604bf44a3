"""The method contract.

A method is a small ``nn.Module`` that owns the student (and any trainable
extras such as connectors) and holds a reference to the frozen teacher.
``forward(batch)`` returns a dict with:

- ``loss``: the scalar to minimise;
- named parts (``kd``, ``ce``, ...): detached-or-not scalars, logged separately;
- ``logits``: the student's outputs on ``batch["x"]`` (used for training accuracy).

The engine knows nothing else about methods.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

from ..losses import masked_cross_entropy
from ..registry import Registry
from ..teacher import Teacher

METHODS = Registry("method")

Batch = Dict[str, torch.Tensor]


class Method(nn.Module):
    """Base class: stores the student as a submodule and the teacher as a plain attribute.

    Attributes:
        needs_teacher: whether the method requires a teacher.
    """

    needs_teacher = True

    def __init__(self, student: nn.Module, teacher: Optional[Teacher] = None):
        super().__init__()
        self.student = student
        self.teacher = teacher  # not an nn.Module, so not a submodule: never trained, never saved

    def forward(self, batch: Batch) -> Dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def on_optimizer_step(self) -> None:
        """Called by the loop after every optimiser step (not every micro-batch under gradient accumulation).

        Methods with a schedule of their own (DKD's warm-up) count steps here; the default passes the call on
        to the methods this one contains (a combo's parts), each of which passes it on to its own.
        """
        stack = list(self.children())
        while stack:
            child = stack.pop()
            if isinstance(child, Method):
                child.on_optimizer_step()
            else:
                stack.extend(child.children())

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
