"""int8 quantisation on the CPU with PyTorch's own kernels (fbgemm / x86 / qnnpack).

Which API, and why: torch 2.13 still ships ``torch.ao.quantization`` (eager dynamic quantisation and FX graph
mode static quantisation and QAT) with working int8 CPU kernels, marked deprecated in favour of torchao.
torchao's int8 paths target GPUs or ``torch.compile``/Inductor on the CPU; without a compiler toolchain in the
loop they do not give an eager model that runs int8 kernels. So kdkit uses the ``torch.ao`` path, silences its
deprecation warnings here, and measures what it produces for real (file bytes, wall-clock latency).

- ``dynamic``: weights of Linear layers stored in int8, activations quantised on the fly per batch
  (``quantize_dynamic``). Convolutions stay float.
- ``static``: FX graph mode (``prepare_fx`` -> calibration on training samples -> ``convert_fx``): weights
  per-channel int8, activations int8 with ranges observed during calibration; Conv-BN-ReLU are fused first.
- ``qat``: quantisation-aware training (Jacob et al. 2018): fake quantisation is inserted with
  ``prepare_qat_fx``, the model is distilled from the teacher for some epochs, then converted.

A quantised model is saved with :func:`save_quantized` as a safetensors file of its int8 weights, scales and
zero points (no pickles); its size in bytes is the size reported.
"""

from __future__ import annotations

import contextlib
import copy
import json
import warnings
from typing import Dict, Iterator, Tuple

import torch
from torch import nn

from ..errors import KdkitError

BACKENDS = ("x86", "fbgemm", "qnnpack")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.ao.*")
        yield


def _set_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise KdkitError(f"quantize: unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if backend not in torch.backends.quantized.supported_engines:
        raise KdkitError(f"quantize: backend {backend!r} is not available in this PyTorch build; available: "
                         f"{', '.join(torch.backends.quantized.supported_engines)}")
    torch.backends.quantized.engine = backend


def quantize_dynamic(model: nn.Module, backend: str = "x86") -> nn.Module:
    """int8 weights for every Linear layer, activations quantised at run time. Returns a new model."""
    _set_backend(backend)
    if not any(isinstance(m, nn.Linear) for m in model.modules()):
        raise KdkitError(f"quantize dynamic: {type(model).__name__} has no Linear layer; "
                         f"use mode static for convolutions")
    with _quiet():
        from torch.ao.quantization import quantize_dynamic as qd

        return qd(copy.deepcopy(model).cpu().eval(), {nn.Linear}, dtype=torch.qint8)


def _qconfig(backend: str, qat: bool):
    with _quiet():
        from torch.ao.quantization import get_default_qat_qconfig_mapping, get_default_qconfig_mapping

        return get_default_qat_qconfig_mapping(backend) if qat else get_default_qconfig_mapping(backend)


def _traceable(fn, model: nn.Module):
    try:
        with _quiet():
            return fn()
    except Exception as e:  # FX could not trace the model
        raise KdkitError(f"quantize: FX graph mode cannot trace {type(model).__name__} "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                         f"use mode dynamic") from None


def quantize_static(model: nn.Module, calibration: torch.Tensor, backend: str = "x86",
                    batch_size: int = 256) -> nn.Module:
    """Post-training static int8 quantisation (FX graph mode), calibrated on ``calibration`` inputs (N, ...)."""
    _set_backend(backend)
    model = copy.deepcopy(model).cpu().eval()
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    prepared = _traceable(lambda: prepare_fx(model, _qconfig(backend, False), example_inputs=(calibration[:1],)),
                          model)
    with torch.inference_mode():
        for start in range(0, len(calibration), batch_size):
            prepared(calibration[start:start + batch_size])
    with _quiet():
        return convert_fx(prepared)


def prepare_qat(model: nn.Module, example: torch.Tensor, backend: str = "x86") -> nn.Module:
    """A copy of ``model`` with fake quantisation inserted, ready to be trained (then :func:`convert_qat`)."""
    _set_backend(backend)
    model = copy.deepcopy(model).cpu().train()
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    return _traceable(lambda: prepare_qat_fx(model, _qconfig(backend, True), example_inputs=(example[:1].cpu(),)),
                      model)


def convert_qat(prepared: nn.Module) -> nn.Module:
    from torch.ao.quantization.quantize_fx import convert_fx

    with _quiet():
        return convert_fx(copy.deepcopy(prepared).cpu().eval())


def _flatten(prefix: str, value, out: Dict[str, torch.Tensor], meta: Dict[str, str]) -> None:
    if torch.is_tensor(value):
        if value.is_quantized:
            out[prefix] = value.int_repr().contiguous()
            if value.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric,
                                   torch.per_channel_affine_float_qparams):
                out[prefix + ".scales"] = value.q_per_channel_scales().float().contiguous()
                out[prefix + ".zero_points"] = value.q_per_channel_zero_points().to(torch.int32).contiguous()
                meta[prefix] = f"{value.dtype}:per_channel:axis={value.q_per_channel_axis()}"
            else:
                out[prefix + ".scale"] = torch.tensor([value.q_scale()], dtype=torch.float32)
                out[prefix + ".zero_point"] = torch.tensor([value.q_zero_point()], dtype=torch.int32)
                meta[prefix] = f"{value.dtype}:per_tensor"
        else:
            out[prefix] = value.detach().contiguous().clone()
    elif isinstance(value, (tuple, list)):
        for i, v in enumerate(value):
            _flatten(f"{prefix}.{i}", v, out, meta)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        out[prefix] = torch.tensor([value])
    elif isinstance(value, torch.dtype):
        meta[prefix] = str(value)


def quantized_tensors(model: nn.Module) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """Every number an int8 model holds as plain tensors: int8 weights, their scales/zero points, float biases.

    Packed weights (``_packed_params``) are unpacked through the modules' ``weight()``/``bias()`` accessors.
    """
    out: Dict[str, torch.Tensor] = {}
    meta: Dict[str, str] = {}
    with _quiet():
        for key, value in model.state_dict().items():
            if key.endswith("_packed_params._packed_params") or key.endswith("._packed_params"):
                continue
            _flatten(key, value, out, meta)
        for name, module in model.named_modules():
            w = getattr(module, "weight", None)
            if callable(w) and not isinstance(w, nn.Parameter):
                _flatten(f"{name}.weight", w(), out, meta)
                b = module.bias() if callable(getattr(module, "bias", None)) else None
                if b is not None:
                    _flatten(f"{name}.bias", b, out, meta)
    return out, meta


def _sorted_metadata(data: bytes) -> bytes:
    """``data`` (a safetensors file) with its metadata entries in sorted order, same length.

    safetensors keeps metadata in a hash map whose order changes from process to process, so two runs that
    hold identical tensors would write different bytes; sorting makes the file a function of its contents.
    """
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    if "__metadata__" not in header:
        return data
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) > n:  # never reached for ASCII names; keep the file as written rather than shift the data
        return data
    return data[:8] + text.ljust(n, b" ") + data[8 + n:]


def save_quantized(model: nn.Module, path) -> int:
    """Write the int8 model's tensors to a safetensors file; returns its size in bytes.

    The same model gives the same bytes in any process (see :func:`_sorted_metadata`).
    """
    from pathlib import Path

    from safetensors.torch import save

    tensors, meta = quantized_tensors(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_sorted_metadata(save(tensors, metadata=meta)))
    return path.stat().st_size


def is_quantized(model: nn.Module) -> bool:
    """True when the model holds int8 (packed or quantised) weights."""
    for m in model.modules():
        if type(m).__module__.startswith(("torch.ao.nn.quantized", "torch.nn.quantized",
                                          "torch.ao.nn.intrinsic.quantized")):
            return True
    return False
