"""Distillation methods, one per file, registered by name in :data:`METHODS`.

Importing this package registers every built-in method.
"""

# Registration side effects: logits (kd, supervised); self-distillation, several methods by weights,
# mutual learning (byot, combo, dml); beyond logits (the rest).
from . import (  # noqa: F401
    at,
    attention_kl,
    attention_weighted,
    byot,
    cc,
    combo,
    crd,
    dist,
    dkd,
    dml,
    fitnets,
    gkd,
    hidden_cosine,
    hidden_mse,
    kd,
    kd_ls,
    lm_kd,
    minilm,
    nst,
    pkt,
    rkd,
    sp,
    supervised,
    tinybert,
)
from .base import METHODS, Method

register_method = METHODS.register


def list_methods():
    """Names of the registered methods."""
    return METHODS.names()


__all__ = ["METHODS", "Method", "list_methods", "register_method"]
