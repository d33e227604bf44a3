"""One small registry used for models, methods and datasets (timm's pattern).

    MODELS = Registry("model")

    @MODELS.register("mlp")
    def mlp(num_classes, input_shape, hidden=(256,)): ...

    MODELS.get("mlp")          # -> the factory
    MODELS.names()             # -> sorted names

An unknown name is a :class:`KdkitError` listing the names that exist,
closest matches first.
"""

from __future__ import annotations

import difflib
import inspect
from typing import Callable, Dict, Iterator, List, Optional, TypeVar

from .errors import KdkitError

T = TypeVar("T")


def closest_first(name: str, names: List[str]) -> List[str]:
    """Return ``names`` with the closest matches to ``name`` first."""
    close = difflib.get_close_matches(name, names, n=len(names), cutoff=0.5)
    return close + sorted(n for n in names if n not in close)


class Registry:
    """A name -> object mapping with helpful errors."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: Dict[str, object] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._items:
                raise KdkitError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj

        return decorator

    def get(self, name: str):
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(closest_first(name, self.names()))
            raise KdkitError(f"unknown {self.kind} {name!r}; known {self.kind}s: {known}") from None

    def names(self) -> List[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def accepted_kwargs(fn: Callable) -> Optional[List[str]]:
    """Keyword names ``fn`` accepts, or None when it takes ``**kwargs``."""
    params = inspect.signature(fn).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def check_kwargs(fn: Callable, kwargs: Dict[str, object], where: str, reserved: List[str] = ()) -> None:
    """Raise a one-line error if ``kwargs`` holds a key ``fn`` does not take (``reserved`` keys are not user options)."""
    allowed = accepted_kwargs(fn)
    if allowed is None:
        return
    options = [a for a in allowed if a not in reserved]
    for k in kwargs:
        if k not in options:
            raise KdkitError(f"{where}: unknown option {k!r}; allowed: {', '.join(options) or 'none'}")


def call_checked(fn: Callable, kwargs: Dict[str, object], where: str, injected: Dict[str, object] = None):
    """Call ``fn(**injected, **kwargs)``, rejecting unknown keys with a one-line error.

    ``injected`` values (e.g. ``num_classes``) are passed only when ``fn`` accepts them;
    ``kwargs`` come from the user, so an unknown one names ``where`` and the allowed keys.
    """
    allowed = accepted_kwargs(fn)
    injected = {k: v for k, v in (injected or {}).items() if allowed is None or k in allowed}
    check_kwargs(fn, kwargs, where, reserved=list(injected))
    try:
        return fn(**injected, **kwargs)
    except TypeError as e:
        raise KdkitError(f"{where}: {e}") from None
