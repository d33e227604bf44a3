"""Classification of arrays: images, tabular rows and any tensor input with class labels (the default task)."""

from __future__ import annotations

from .base import Task


class Classification(Task):
    """Class labels ``y`` (N,) (``-1`` unlabelled) for float inputs; every method of :class:`Task` as it is."""

    name = "classification"


__all__ = ["Classification"]
