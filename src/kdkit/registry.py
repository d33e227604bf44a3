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

import collections.abc
import difflib
import inspect
import typing
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, TypeVar, Union

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
            hint = ("; your own models: --plugin MODULE (or KDKIT_PLUGINS) registers them, or name one as "
                    "module:factory") if self.kind == "model" else ""
            raise KdkitError(f"unknown {self.kind} {name!r}; known {self.kind}s: {known}{hint}") from None

    def names(self) -> List[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def keyword_params(fn: Callable) -> Optional[Dict[str, Tuple[inspect.Parameter, Callable]]]:
    """Keyword parameters ``fn`` accepts, each with the function that declares it (for its annotations).

    A class is read through its ``__init__``; when an ``__init__`` takes ``**kwargs`` (a subclass forwarding
    options to its base), the next ``__init__`` up the MRO is read too, so a method that forwards its base's
    options stays fully checkable. A subclass's declaration wins over its base's (its own default). Returns
    None when the options are open-ended: a plain function with ``**kwargs``.
    """
    if inspect.isclass(fn):
        inits = [k.__dict__["__init__"] for k in fn.__mro__ if "__init__" in k.__dict__ and k is not object]
    else:
        inits = [fn]
    params: Dict[str, Tuple[inspect.Parameter, Callable]] = {}
    for init in inits:
        if inspect.isclass(fn) and getattr(init, "__module__", "").startswith("torch."):
            break  # nn.Module.__init__(*args, **kwargs) takes no options of ours: the chain ends here
        sig = inspect.signature(init)
        for p in sig.parameters.values():
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self":
                params.setdefault(p.name, (p, init))
        if not any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
            return params
        if not inspect.isclass(fn):
            return None
    return params


def accepted_kwargs(fn: Callable) -> Optional[List[str]]:
    """Keyword names ``fn`` accepts (a class: its ``__init__`` chain), or None when they are open-ended."""
    params = keyword_params(fn)
    return None if params is None else list(params)


_NUMBER = "a number"


def _describe(hint: Any) -> Optional[str]:
    """What a value of type ``hint`` is called in an error ("a number", "a list of integers"), or None when
    kdkit does not check that type (modules, tensors, Any, user classes)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is bool:
        return "true or false"
    if hint is int:
        return "an integer"
    if hint is float:
        return _NUMBER
    if hint is str:
        return "a string"
    if origin is Union:
        kinds = [_describe(a) for a in args if a is not type(None)]
        if any(k is None for k in kinds):
            return None
        return " or ".join(dict.fromkeys(kinds))
    if hint in (list, tuple) or origin in (list, tuple, collections.abc.Sequence):
        inner = _describe(args[0]) if args and (len(args) == 1 or args[-1] is Ellipsis) else None
        plural = {"an integer": "integers", _NUMBER: "numbers", "a string": "strings", "true or false": "booleans"}
        return f"a list of {plural[inner]}" if inner in plural else "a list"
    if hint is dict or origin in (dict, collections.abc.Mapping):
        return "a mapping"
    return None


def _matches(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is Union:
        return any(_matches(value, a) for a in args)
    if hint in (list, tuple) or origin in (list, tuple, collections.abc.Sequence):
        if not isinstance(value, (list, tuple)):
            return False
        item = args[0] if args and (len(args) == 1 or args[-1] is Ellipsis) else None
        return item is None or _describe(item) is None or all(_matches(v, item) for v in value)
    if hint is dict or origin in (dict, collections.abc.Mapping):
        return isinstance(value, dict)
    return True  # a type kdkit does not check


def _expected_type(param: inspect.Parameter, owner: Callable) -> Any:
    """The type an option should have: its annotation, else the type of its default (None: unchecked)."""
    try:
        hint = typing.get_type_hints(owner).get(param.name)
    except Exception:  # an annotation that cannot be resolved here: fall back to the default
        hint = None
    if hint is not None and _describe(hint) is not None:
        return hint
    default = param.default
    if isinstance(default, bool):
        return bool
    if isinstance(default, (int, float)):
        return float  # an unannotated numeric default: any number
    if isinstance(default, str):
        return str
    if isinstance(default, (list, tuple)):
        return list
    return None


def check_kwargs(fn: Callable, kwargs: Dict[str, object], where: str, reserved: Sequence[str] = ()) -> None:
    """Raise a one-line error if ``kwargs`` holds a key ``fn`` does not take (``reserved`` keys are not user
    options) or a value of the wrong type (checked against the parameter's annotation, else its default's type:
    ``method 'kd': option temperature must be a number; given 'hot'``)."""
    params = keyword_params(fn)
    if params is None:
        return
    options = [a for a in params if a not in reserved]
    for k, v in kwargs.items():
        if k not in options:
            raise KdkitError(f"{where}: unknown option {k!r}; allowed: {', '.join(options) or 'none'}")
        hint = _expected_type(*params[k])
        if hint is not None and not _matches(v, hint):
            raise KdkitError(f"{where}: option {k} must be {_describe(hint)}; given {v!r}")


def call_checked(fn: Callable, kwargs: Dict[str, object], where: str, injected: Dict[str, object] = None):
    """Call ``fn(**injected, **kwargs)``, rejecting unknown keys and wrongly typed values with a one-line error.

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
