"""Capture intermediate outputs of a model by module name, with forward hooks.

    with capture(student, ["features.0", "head:input"]) as feats:
        logits = student(x)
    f0, emb = feats["features.0"], feats["head:input"]     # (B, C, H, W), (B, D)

Names are those of ``model.named_modules()`` (``features.1``, ``layer3``,
``encoder.layer.4``); ``kdkit inspect MODEL`` prints them with their output
shapes. A name may end in ``:input`` to capture what the module *receives*
(its first positional argument): ``head:input`` is the embedding a classifier
head sees. Hooks are installed when the ``with`` block opens and removed when
it closes, so the user's model is never edited and carries nothing afterwards.

Errors are one-line :class:`~kdkit.errors.KdkitError`: an unknown name lists the
names that exist (closest first); a layer that never ran during the forward
pass, or whose output was changed in place after it was captured (a following
``ReLU(inplace=True)``), says so instead of handing back a wrong tensor.

Teacher features are captured with ``copy_out_of_inference=True`` while the frozen
model runs under ``torch.inference_mode()`` (:meth:`kdkit.teacher.Teacher.with_features`, when no
feature cache answers):
only the captured tensors are copied out of inference mode (inference tensors
cannot be saved for the student's backward pass; the copy is made in the hook,
so a later in-place op cannot alter it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..errors import KdkitError
from ..registry import closest_first

INPUT_SUFFIX = ":input"


def module_names(model: nn.Module) -> List[str]:
    """Every named submodule of ``model`` (the root, named ``""``, excluded)."""
    return [n for n, _ in model.named_modules() if n]


def _split(spec: str) -> Tuple[str, bool]:
    if spec.endswith(INPUT_SUFFIX):
        return spec[: -len(INPUT_SUFFIX)], True
    return spec, False


def get_module(model: nn.Module, name: str, who: str = "model") -> nn.Module:
    """The submodule called ``name`` (a ``:input`` suffix is ignored here).

    Raises:
        KdkitError: when no such module exists; the message lists the names that do, closest first.
    """
    base, _ = _split(name)
    modules = dict(model.named_modules())
    if base and base in modules:
        return modules[base]
    names = module_names(model)
    shown = closest_first(base, names)
    more = f" (+{len(shown) - 30} more)" if len(shown) > 30 else ""
    raise KdkitError(f"{who} {type(model).__name__} has no module named {name!r}; existing names, closest first: "
                     f"{', '.join(shown[:30])}{more} (see `kdkit inspect`)")


def _first_tensor(value) -> Optional[torch.Tensor]:
    """A module's output as one tensor: the tensor itself, or the first tensor of a tuple/list (e.g. RNNs,
    transformer blocks returning ``(hidden, attention)``)."""
    if torch.is_tensor(value):
        return value
    if isinstance(value, (tuple, list)):
        for v in value:
            if torch.is_tensor(v):
                return v
    return None


def _version(t: torch.Tensor) -> Optional[int]:
    try:
        return t._version
    except RuntimeError:  # inference tensors keep no version counter
        return None


class FeatureCapture:
    """Context manager holding forward hooks on named modules of ``model``.

    Args:
        model: the network (not modified; hooks are removed on exit).
        names: module names to capture, optionally with the ``:input`` suffix.
        who: how errors refer to the model (``student``, ``teacher``).
        copy_out_of_inference: copy each captured tensor out of inference mode inside the hook
            (used for the teacher: the one copy a method reads, safe from later in-place ops).

    Reading ``capture[name]`` after the forward pass returns the captured tensor.
    """

    def __init__(self, model: nn.Module, names: Sequence[str], who: str = "model",
                 copy_out_of_inference: bool = False):
        self.model = model
        self.names = list(dict.fromkeys(names))
        self.who = who
        self.copy = copy_out_of_inference
        self._modules = {n: get_module(model, n, who) for n in self.names}  # fail before any forward
        self._handles: List[torch.utils.hooks.RemovableHandle] = []
        self._store: Dict[str, Tuple[torch.Tensor, Optional[int]]] = {}

    def _hook_for(self, spec: str):
        _, want_input = _split(spec)

        def hook(module, inputs, output):
            value = _first_tensor(inputs if want_input else output)
            if value is None:
                kind = "input" if want_input else "output"
                raise KdkitError(f"{self.who} layer {spec!r} ({type(module).__name__}) has no tensor {kind} "
                                 f"to capture; pick another layer (see `kdkit inspect`)")
            if self.copy and value.is_inference():
                with torch.inference_mode(False):
                    value = value.clone()
            # A module called several times (a shared activation) keeps its last call.
            self._store[spec] = (value, _version(value))

        return hook

    def __enter__(self) -> "FeatureCapture":
        self._store.clear()
        for spec, module in self._modules.items():
            self._handles.append(module.register_forward_hook(self._hook_for(spec)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def clear(self) -> None:
        """Forget the tensors of the previous forward pass."""
        self._store.clear()

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._modules:
            raise KdkitError(f"{name!r} was not among the captured {self.who} layers: {', '.join(self.names)}")
        if name not in self._store:
            raise KdkitError(f"{self.who} layer {name!r} ({type(self._modules[name]).__name__}) exists but never ran "
                             f"during the forward pass (an unused or skipped branch); pick a layer that forward() "
                             f"calls (see `kdkit inspect`)")
        value, version = self._store[name]
        if version is not None and _version(value) != version:
            raise KdkitError(f"the captured output of {self.who} layer {name!r} was modified in place later in the "
                             f"forward pass (e.g. by a ReLU(inplace=True)); capture the module after it instead")
        return value

    def features(self) -> List[torch.Tensor]:
        """The captured tensors, in the order of ``names``."""
        return [self[n] for n in self.names]


def capture(model: nn.Module, names: Union[str, Sequence[str]], who: str = "model",
            copy_out_of_inference: bool = False) -> FeatureCapture:
    """Shorthand for :class:`FeatureCapture` (one name or a list)."""
    return FeatureCapture(model, [names] if isinstance(names, str) else names, who, copy_out_of_inference)


# ----------------------------------------------------------------------------- shapes (inspect, defaults)

@dataclass
class LayerRecord:
    """One module seen during a dry-run forward.

    Attributes:
        name: the module's name.
        type: its class name.
        depth: number of dots in the name plus one (``features.1`` -> 2).
        shape: output shape (batch dimension included), or None when the output is not a tensor.
        input_shape: shape of the first tensor input, or None.
        start: the order in which the module was entered; ``end`` the order in which it returned.
        params: number of parameters it owns directly and through its children.
    """

    name: str
    type: str
    depth: int
    shape: Optional[Tuple[int, ...]]
    input_shape: Optional[Tuple[int, ...]]
    start: int
    end: int
    params: int


def trace(model: nn.Module, x: torch.Tensor) -> List[LayerRecord]:
    """One forward pass of ``x`` through ``model`` (eval mode, no grad) recording every module that ran.

    Returns the records in call order (a parent before its children). Modules that never ran are absent.
    The model's train/eval mode is restored afterwards.
    """
    counter = {"start": 0, "end": 0}
    starts: Dict[str, int] = {}
    records: Dict[str, LayerRecord] = {}
    handles = []
    named = [(n, m) for n, m in model.named_modules() if n]

    def pre(name):
        def hook(module, inputs):
            if name not in starts:
                starts[name] = counter["start"]
                counter["start"] += 1
        return hook

    def post(name):
        def hook(module, inputs, output):
            out, inp = _first_tensor(output), _first_tensor(inputs)
            records[name] = LayerRecord(
                name=name, type=type(module).__name__, depth=name.count(".") + 1,
                shape=tuple(out.shape) if out is not None else None,
                input_shape=tuple(inp.shape) if inp is not None else None,
                start=starts[name], end=counter["end"], params=sum(p.numel() for p in module.parameters()))
            counter["end"] += 1
        return hook

    was_training = model.training
    try:
        for name, module in named:
            handles.append(module.register_forward_pre_hook(pre(name)))
            handles.append(module.register_forward_hook(post(name)))
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return sorted(records.values(), key=lambda r: r.start)


def format_trace(records: Iterable[LayerRecord]) -> str:
    """A readable table of :func:`trace` records: indented name, type, output shape, parameters."""
    rows = [("name", "type", "output shape", "params")]
    for r in records:
        shape = "(" + ", ".join(["B", *(str(s) for s in r.shape[1:])]) + ")" if r.shape else "-"
        rows.append(("  " * (r.depth - 1) + r.name, r.type, shape, f"{r.params:,}"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [" ".join(cell.ljust(w) if i < 3 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def embedding_layer(records: Sequence[LayerRecord]) -> Optional[str]:
    """The input of the last ``nn.Linear`` that ran (``head:input``): the embedding a classifier head reads."""
    linears = [r for r in records if r.type == "Linear" and r.input_shape is not None and len(r.input_shape) == 2]
    if not linears:
        return None
    return max(linears, key=lambda r: r.end).name + INPUT_SUFFIX


def feature_maps(records: Sequence[LayerRecord]) -> List[LayerRecord]:
    """Records with a 4-D output of spatial size above 1x1 (conv feature maps), in return order."""
    maps = [r for r in records if r.shape is not None and len(r.shape) == 4 and r.shape[2] * r.shape[3] > 1]
    return sorted(maps, key=lambda r: r.end)


def last_feature_map(records: Sequence[LayerRecord]) -> Optional[str]:
    """The last feature map computed before pooling: the last-returning module with a (B, C, H, W) output, H·W > 1."""
    maps = feature_maps(records)
    return maps[-1].name if maps else None


def feature_maps_by_resolution(records: Sequence[LayerRecord]) -> Dict[Tuple[int, int], str]:
    """For each spatial size, the stage output at that size: among the shallowest-named modules with that
    output size, the last one to return (``features.0``, ``layer2``, ...)."""
    by_size: Dict[Tuple[int, int], List[LayerRecord]] = {}
    for r in feature_maps(records):
        by_size.setdefault((r.shape[2], r.shape[3]), []).append(r)
    out = {}
    for size, rs in by_size.items():
        top = min(r.depth for r in rs)
        out[size] = max((r for r in rs if r.depth == top), key=lambda r: r.end).name
    return out


__all__ = ["FeatureCapture", "LayerRecord", "capture", "embedding_layer", "feature_maps_by_resolution",
           "format_trace", "get_module", "last_feature_map", "module_names", "trace"]
