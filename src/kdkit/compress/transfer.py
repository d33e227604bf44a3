"""Parameter transfer: initialise a student from its teacher's weights where shapes allow.

DistilBERT (Sanh et al. 2019) builds its student by taking one layer out of two from BERT. The rule here
generalises that to any pair of models whose modules have the same names:

1. Every ``nn.Sequential`` that exists in both models under the same name, but with fewer children in the
   student, is a stack of layers. The student's child ``i`` takes the teacher's child ``map(i)``:
   ``every_other``: ``i * n_teacher // n_student`` (for half the depth: 0, 2, 4, ...), ``first``: ``i``,
   ``last``: ``n_teacher - n_student + i``.
2. Every other name is taken as it is.
3. A student tensor is copied when the teacher has a tensor under the mapped name with the same shape;
   everything else keeps its fresh initialisation and is listed as skipped.

Example: ``cnn_large(width=32)`` has blocks (1->32, 32->32, 32->64, 64->64); ``cnn_small(width=32)`` has blocks
(1->32, 32->64). ``every_other`` maps student blocks 0, 1 to teacher blocks 0, 2, whose shapes match, and the
heads (64 -> classes) match too: the whole student starts from teacher weights.
"""

from __future__ import annotations

from typing import Dict, List

import torch
from torch import nn

from ..errors import KdkitError

RULES = ("every_other", "first", "last")


def _stack_lengths(model: nn.Module) -> Dict[str, int]:
    return {n: len(m) for n, m in model.named_modules() if isinstance(m, nn.Sequential)}


def map_index(i: int, n_student: int, n_teacher: int, rule: str) -> int:
    if rule == "every_other":
        return i * n_teacher // n_student
    if rule == "first":
        return i
    if rule == "last":
        return n_teacher - n_student + i
    raise KdkitError(f"transfer: unknown layer rule {rule!r}; use one of {', '.join(RULES)}")


def teacher_name(key: str, student_stacks: Dict[str, int], teacher_stacks: Dict[str, int], rule: str) -> str:
    """The teacher tensor name a student tensor ``key`` maps to."""
    parts = key.split(".")
    out: List[str] = []
    for j, part in enumerate(parts):
        prefix_s = ".".join(parts[:j])
        prefix_t = ".".join(out)
        if part.isdigit() and prefix_s in student_stacks and prefix_t in teacher_stacks:
            ns, nt = student_stacks[prefix_s], teacher_stacks[prefix_t]
            if ns < nt:
                part = str(map_index(int(part), ns, nt, rule))
        out.append(part)
    return ".".join(out)


def transfer_weights(student: nn.Module, teacher: nn.Module, layers: str = "every_other") -> Dict[str, List[str]]:
    """Copy teacher tensors into ``student`` (in place) by the rule above.

    Returns:
        ``{"copied": [student names], "skipped": [student names]}``.

    Raises:
        KdkitError: an unknown rule, or no tensor at all could be copied (the models share nothing).
    """
    if layers not in RULES:
        raise KdkitError(f"transfer: unknown layer rule {layers!r}; use one of {', '.join(RULES)}")
    s_stacks, t_stacks = _stack_lengths(student), _stack_lengths(teacher)
    t_state = teacher.state_dict()
    copied, skipped = [], []
    new_state = {}
    for key, value in student.state_dict().items():
        src = teacher_name(key, s_stacks, t_stacks, layers)
        t = t_state.get(src)
        if t is not None and t.shape == value.shape and t.dtype == value.dtype:
            new_state[key] = t.detach().clone().to(value.device)
            copied.append(key)
        else:
            skipped.append(key)
    if not copied:
        raise KdkitError(f"transfer: no tensor of {type(student).__name__} matches a tensor of "
                         f"{type(teacher).__name__} in name and shape; parameter transfer needs related architectures")
    with torch.no_grad():
        student.load_state_dict(new_state, strict=False)
    return {"copied": copied, "skipped": skipped}
