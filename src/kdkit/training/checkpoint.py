"""Checkpoints as safetensors (no pickles anywhere).

- ``save_weights`` / ``load_weights``: a model's ``state_dict``, the file users ship.
- ``save_training_state`` / ``load_training_state``: everything a resumed run needs
  (method weights incl. connectors, optimiser and scheduler state, RNG state, epoch),
  split into tensors (safetensors) and plain values (JSON).

Every write goes to a temporary file first and is then renamed, so an
interrupted write never destroys the previous good checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Tuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import KdkitError


def _atomic(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _contiguous(tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    # safetensors refuses shared or non-contiguous storage; a detached contiguous clone is always safe.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}


def save_weights(model: nn.Module, path: os.PathLike, metadata: Dict[str, str] = None) -> Path:
    """Write ``model.state_dict()`` to a ``.safetensors`` file atomically."""
    path = Path(path)
    _atomic(path, lambda tmp: save_file(_contiguous(model.state_dict()), str(tmp), metadata=metadata))
    return path


def weights_path(path: os.PathLike) -> Path:
    """A ``.safetensors`` file, or a run directory's best (else last) checkpoint."""
    p = Path(path)
    if p.is_dir():
        for name in ("best.safetensors", "last.safetensors"):
            if (p / "checkpoints" / name).is_file():
                return p / "checkpoints" / name
        raise KdkitError(f"no checkpoint in run directory {p} (looked for checkpoints/best.safetensors and last.safetensors)")
    if not p.is_file():
        raise KdkitError(f"checkpoint {p} not found")
    return p


def read_tensors(path: os.PathLike) -> Dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise KdkitError(f"cannot read checkpoint {path}: {e} (expected a .safetensors file)") from None


def load_weights(model: nn.Module, path: os.PathLike) -> nn.Module:
    """Load a ``.safetensors`` file (or a run directory's checkpoint) into ``model``, strictly.

    Raises:
        KdkitError: naming the first missing, unexpected or mis-shaped tensor.
    """
    path = weights_path(path)
    state = read_tensors(path)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shape = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or shape:
        parts = []
        if shape:
            k = shape[0]
            parts.append(f"{k} has shape {tuple(state[k].shape)} in the file but {tuple(own[k].shape)} in the model")
        if missing:
            parts.append(f"{len(missing)} tensor(s) missing, e.g. {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected, e.g. {unexpected[0]}")
        raise KdkitError(f"checkpoint {path} does not fit the model: {'; '.join(parts)}")
    model.load_state_dict(state)
    return model


def _flatten_optimizer(state: Dict[str, Any]) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    tensors, plain = {}, {"param_groups": state["param_groups"], "state": {}}
    for pid, slots in state["state"].items():
        plain["state"][str(pid)] = {}
        for k, v in slots.items():
            if torch.is_tensor(v):
                tensors[f"optim.{pid}.{k}"] = v
            else:
                plain["state"][str(pid)][k] = v
    return tensors, plain


def _unflatten_optimizer(tensors: Dict[str, torch.Tensor], plain: Dict[str, Any]) -> Dict[str, Any]:
    state: Dict[int, Dict[str, Any]] = {int(pid): dict(slots) for pid, slots in plain["state"].items()}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, pid, k = key.split(".", 2)
            state.setdefault(int(pid), {})[k] = v
    return {"state": state, "param_groups": plain["param_groups"]}


def save_training_state(path_stem: os.PathLike, method: nn.Module, optimizer: torch.optim.Optimizer,
                        scheduler, extra: Dict[str, Any]) -> None:
    """Write ``<stem>.safetensors`` (tensors) and ``<stem>.json`` (plain values) for resuming."""
    stem = Path(path_stem)
    opt_tensors, opt_plain = _flatten_optimizer(optimizer.state_dict())
    tensors = {f"method.{k}": v for k, v in method.state_dict().items()}
    tensors.update(opt_tensors)
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    plain = {"optimizer": opt_plain, "scheduler": scheduler.state_dict(), **extra}
    _atomic(stem.with_suffix(".safetensors"), lambda tmp: save_file(_contiguous(tensors), str(tmp)))
    # The JSON is written last: its presence marks a complete state.
    _atomic(stem.with_suffix(".json"), lambda tmp: tmp.write_text(json.dumps(plain)))


def load_training_state(path_stem: os.PathLike, method: nn.Module, optimizer: torch.optim.Optimizer,
                        scheduler) -> Dict[str, Any]:
    """Restore what :func:`save_training_state` wrote; returns the extra plain values (epoch, best, ...)."""
    stem = Path(path_stem)
    js, st = stem.with_suffix(".json"), stem.with_suffix(".safetensors")
    if not js.is_file() or not st.is_file():
        raise KdkitError(f"cannot resume: no training state at {st} (the run saved none yet)")
    plain = json.loads(js.read_text())
    tensors = read_tensors(st)
    method_state = {k[len("method."):]: v for k, v in tensors.items() if k.startswith("method.")}
    try:
        method.load_state_dict(method_state)
    except RuntimeError as e:
        raise KdkitError(f"cannot resume from {st}: it does not fit the model ({str(e).splitlines()[0]})") from None
    optimizer.load_state_dict(_unflatten_optimizer(tensors, plain.pop("optimizer")))
    scheduler.load_state_dict(plain.pop("scheduler"))
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    return plain
