"""Model zoo and ``create_model``: registered names or ``package.module:factory`` strings."""

from __future__ import annotations

import importlib
from typing import Any, Callable, Dict, Optional, Tuple

from torch import nn

from ..errors import KdkitError
from ..registry import call_checked
from .zoo import MODELS

register_model = MODELS.register


def list_models():
    """Names of the registered models."""
    return MODELS.names()


def resolve_factory(name: str) -> Callable[..., nn.Module]:
    """A registered factory by name, or ``pkg.mod:attr`` imported from the user's code."""
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise KdkitError(f"cannot import model factory {name!r}: {e}") from None
    return MODELS.get(name)


def create_model(name: str, num_classes: Optional[int] = None, input_shape: Optional[Tuple[int, ...]] = None,
                 **kwargs: Any) -> nn.Module:
    """Build a model by registered name or ``package.module:factory``.

    ``num_classes`` and ``input_shape`` are passed to the factory when it accepts
    them; other keyword arguments are the model's own options and are checked.
    """
    factory = resolve_factory(name)
    injected: Dict[str, Any] = {"num_classes": num_classes, "input_shape": input_shape}
    try:
        model = call_checked(factory, kwargs, f"model {name!r}", injected)
    except ValueError as e:
        raise KdkitError(f"model {name!r}: {e}") from None
    if not isinstance(model, nn.Module):
        raise KdkitError(f"model factory {name!r} returned {type(model).__name__}, expected a torch.nn.Module")
    return model


__all__ = ["MODELS", "create_model", "list_models", "register_model", "resolve_factory"]
