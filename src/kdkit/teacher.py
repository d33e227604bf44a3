"""The frozen teacher.

A :class:`Teacher` is deliberately *not* an ``nn.Module``: it is never a
submodule of a method, so ``method.parameters()`` never includes it, it never
reaches the optimiser, and ``method.train()`` never switches it out of eval
mode. It runs under ``torch.inference_mode()``.
"""

from __future__ import annotations

from typing import Dict, Optional, Union

import torch
from torch import nn

Batch = Dict[str, torch.Tensor]


class Teacher:
    """Frozen, eval-mode wrapper around a trained model.

    Call it with a batch dict (or an input tensor) to get its outputs.

    Args:
        model: the trained teacher network.
    """

    def __init__(self, model: nn.Module):
        self.model = model.eval().requires_grad_(False)

    def to(self, device: Union[str, torch.device]) -> "Teacher":
        self.model.to(device)
        return self

    @property
    def device(self) -> torch.device:
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def __call__(self, batch: Union[Batch, torch.Tensor]) -> torch.Tensor:
        x = batch["x"] if isinstance(batch, dict) else batch
        with torch.inference_mode():
            out = self.model(x)
        # Inference tensors cannot be saved for the student's backward pass; a copy of the
        # (B, C) outputs is cheap and turns them into ordinary constants.
        return out.clone()


def as_teacher(teacher: Optional[Union[Teacher, nn.Module]]) -> Optional[Teacher]:
    """Wrap a module as a :class:`Teacher` (an existing Teacher or None pass through)."""
    if teacher is None or isinstance(teacher, Teacher):
        return teacher
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher must be a torch.nn.Module or kdkit.Teacher; got {type(teacher).__name__}")
    return Teacher(teacher)
