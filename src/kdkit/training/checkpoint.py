"""Checkpoints as safetensors (no pickles anywhere).

- ``save_weights`` / ``load_weights``: a model's ``state_dict``, the file users ship.
- ``save_training_state`` / ``load_training_state``: everything a resumed run needs
  (method weights incl. connectors, optimiser and scheduler state, RNG state, epoch),
  in ONE file, ``state.safetensors``: the tensors as safetensors, the plain values as
  JSON in the file's metadata. The resume point is therefore one atomic unit: a kill at
  any moment leaves either the previous complete state or the new complete state.

Every write goes to a temporary file first, is flushed to disk, and is then renamed,
so an interrupted write never destroys the previous good checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import KdkitError

STATE_FILE = "state.safetensors"


def _atomic(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb+") as fh:  # the bytes reach the disk before the rename makes them the checkpoint
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def non_finite(tensors: Dict[str, torch.Tensor]) -> Optional[str]:
    """The name of the first floating-point tensor holding NaN or inf, else None."""
    names = [k for k, v in tensors.items() if torch.is_tensor(v) and v.is_floating_point() and v.numel()]
    if not names:
        return None
    ok = torch.stack([torch.isfinite(tensors[k]).all().to("cpu") for k in names]).tolist()  # one host sync
    return next((k for k, good in zip(names, ok) if not good), None)


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
        raise KdkitError(f"no checkpoint in run directory {p} "
                         f"(looked for checkpoints/best.safetensors and last.safetensors)")
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
    # An integer tensor copied into a float parameter is silently converted (2**31-scale garbage weights):
    # the kinds (floating point / integer / bool) must match; float32 vs float16 is a legitimate cast.
    kind = [k for k in own if k in state and _kind(own[k]) != _kind(state[k])]
    if kind:
        k = kind[0]
        raise KdkitError(f"checkpoint {path} does not fit the model: {k} is {state[k].dtype} in the file but "
                         f"{own[k].dtype} in the model (expected a {_kind(own[k])} tensor)")
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


def _kind(t: torch.Tensor) -> str:
    return "floating-point" if t.is_floating_point() else "boolean" if t.dtype == torch.bool else "integer"


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


def save_training_state(path: os.PathLike, method: nn.Module, optimizer: torch.optim.Optimizer,
                        scheduler, extra: Dict[str, Any]) -> None:
    """Write everything a resumed run needs to ONE file, atomically.

    Tensors (method weights incl. connectors, optimiser slots, RNG states) are the safetensors payload; the
    plain values (optimiser hyper-parameters, scheduler, ``extra`` such as the epoch) are JSON in the file's
    metadata under ``"kdkit_state"``.

    Raises:
        KdkitError: a weight or optimiser tensor is NaN/inf (nothing is written, the previous state stays).
    """
    opt_tensors, opt_plain = _flatten_optimizer(optimizer.state_dict())
    tensors = {f"method.{k}": v for k, v in method.state_dict().items()}
    tensors.update(opt_tensors)
    bad = non_finite(tensors)
    if bad is not None:
        raise KdkitError(f"not saving a training state with a non-finite tensor ({bad}); the previous state is kept")
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    plain = {"optimizer": opt_plain, "scheduler": scheduler.state_dict(), **extra}
    meta = {"kdkit_state": json.dumps(plain)}
    _atomic(Path(path), lambda tmp: save_file(_contiguous(tensors), str(tmp), metadata=meta))


def read_training_state(path: os.PathLike) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """The tensors and plain values of a state file; a damaged file is a one-line KdkitError."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        plain = json.loads(meta["kdkit_state"])
        if not isinstance(plain, dict) or "epoch" not in plain:
            raise ValueError("no epoch recorded")
    except (SafetensorError, OSError, ValueError, KeyError) as e:
        raise KdkitError(f"cannot resume: training state {path} is damaged "
                         f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                         f"start a new run or delete it to restart this one from epoch 1") from None
    return tensors, plain


def load_training_state(path: os.PathLike, method: nn.Module, optimizer: torch.optim.Optimizer,
                        scheduler) -> Dict[str, Any]:
    """Restore what :func:`save_training_state` wrote; returns the extra plain values (epoch, best, ...)."""
    tensors, plain = read_training_state(path)
    method_state = {k[len("method."):]: v for k, v in tensors.items() if k.startswith("method.")}
    try:
        method.load_state_dict(method_state)
    except RuntimeError as e:
        raise KdkitError(f"cannot resume from {path}: it does not fit the model ({str(e).splitlines()[0]})") from None
    optimizer.load_state_dict(_unflatten_optimizer(tensors, plain.pop("optimizer")))
    scheduler.load_state_dict(plain.pop("scheduler"))
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    return plain
