"""Regression: float targets (N,) or (N, D); measured with MSE and MAE in the data's own units."""

from __future__ import annotations

from typing import Tuple

from .base import Task, first_target


class Regression(Task):
    """Float targets (NaN marks an unlabelled sample). Quality, cache and export are the array task's; the
    metrics (``mse``, ``mae``, ``mse_to_teacher``) follow from the float targets."""

    name = "regression"

    @staticmethod
    def matches(data) -> bool:
        y = first_target(data)
        return y is not None and y.is_floating_point()

    def validation_metrics(self, teacher: bool) -> Tuple[str, ...]:
        return ("mse", "mae") + (("mse_to_teacher",) if teacher else ())


__all__ = ["Regression"]
