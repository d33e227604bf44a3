"""Distillation methods, one per file, registered by name in :data:`METHODS`.

Importing this package registers every built-in method.
"""

from . import kd, supervised  # noqa: F401  (registration side effects)
from . import byot, combo, dml  # noqa: F401  (self-distillation; several methods by weights; mutual learning)
from . import at, attention_weighted, cc, crd, dist, dkd, fitnets, kd_ls, nst, pkt, rkd, sp  # noqa: F401  (beyond logits)
from .base import METHODS, Method

register_method = METHODS.register


def list_methods():
    """Names of the registered methods."""
    return METHODS.names()


__all__ = ["METHODS", "Method", "list_methods", "register_method"]
