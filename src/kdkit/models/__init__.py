"""Model zoo and ``create_model``: registered names, or ``module:factory`` from a plugin the user loaded.

:func:`resolve_factory` is the one place a model name becomes code; names that point outside kdkit's
zoo resolve only through plugins (see :mod:`kdkit.models.plugins`), so configs and run directories
never run code the user did not choose.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

from torch import nn

from ..errors import KdkitError
from ..registry import call_checked
from . import text as _text  # noqa: F401  (registers the text models)
from .plugins import load_env_plugins, load_plugin, loaded_plugins, trusted_factory
from .zoo import MODELS

register_model = MODELS.register


def list_models():
    """Names of the registered models (with those of plugins in ``KDKIT_PLUGINS``)."""
    load_env_plugins()
    return MODELS.names()


def resolve_factory(name: str) -> Callable[..., nn.Module]:
    """The factory a model name stands for: a registered name, or ``module:factory`` of a loaded plugin.

    Raises:
        KdkitError: an unknown name (listing the known ones), or an import string whose module the
            user has not loaded as a plugin (nothing is imported then).
    """
    if not isinstance(name, str) or not name.strip():
        raise KdkitError(f"model name must be a non-empty string; got {name!r}")
    load_env_plugins()
    if ":" in name:
        return trusted_factory(name)
    return MODELS.get(name)


#: What kdkit fills into a model factory from the data when the factory takes it (never a user option).
INJECTED_MODEL_ARGS = ("num_classes", "input_shape", "vocab_size", "pad_token_id", "corpus_ids")


def create_model(name: str, num_classes: Optional[int] = None, input_shape: Optional[Tuple[int, ...]] = None,
                 context: Optional[Dict[str, Any]] = None, **kwargs: Any) -> nn.Module:
    """Build a model by registered name or ``package.module:factory``.

    ``num_classes`` and ``input_shape`` are passed to the factory when it accepts
    them; so are the entries of ``context`` (tokenised text: ``vocab_size``, ``pad_token_id``);
    other keyword arguments are the model's own options and are checked.
    """
    factory = resolve_factory(name)
    injected: Dict[str, Any] = {"num_classes": num_classes, "input_shape": input_shape, **(context or {})}
    try:
        model = call_checked(factory, kwargs, f"model {name!r}", injected)
    except ValueError as e:
        raise KdkitError(f"model {name!r}: {e}") from None
    if not isinstance(model, nn.Module):
        raise KdkitError(f"model factory {name!r} returned {type(model).__name__}, expected a torch.nn.Module")
    return model


__all__ = ["INJECTED_MODEL_ARGS", "MODELS", "create_model", "list_models", "load_env_plugins", "load_plugin",
           "loaded_plugins", "register_model", "resolve_factory"]
