"""Export a trained (or compressed) model to ONNX or TorchScript, and prove the file computes what PyTorch does.

    kdkit export RUN_DIR --format onnx [--int8]
    kdkit export RUN_DIR --format torchscript

The exported file is loaded back (onnxruntime for ONNX, ``torch.jit.load`` for TorchScript) and run on real
inputs from the run's dataset (the first ``samples`` of the test split); its outputs are compared with the
PyTorch model's: the maximum absolute difference and the share of inputs with the same arg-max are reported,
and a mismatch beyond tolerance is a :class:`KdkitError`:

- float exports: ``max|diff| <= atol + rtol * max|reference|`` (defaults 1e-4, 1e-4);
- ``--int8`` (onnxruntime static QDQ quantisation, per-tensor scales, calibrated on training inputs): int8
  outputs differ from float ones by design, so the tolerance is ``max|diff| <= 0.1 * max|reference|`` (a tenth
  of the logit range; ``int8_rtol``), and the arg-max agreement is reported beside it;
- ``--int8`` of a token-id model (a transformer): onnxruntime's dynamic quantisation (:func:`quantize_onnx_dynamic`),
  held to its accuracy on the whole test split instead: at most ``--int8-max-drop`` points below the float model
  (:mod:`kdkit.export.text`).

Interface: one input named ``input`` of shape (batch, *input_shape) with a dynamic batch axis, one output named
``logits`` of shape (batch, classes) (regression: (batch, targets)). Preprocessing that a dataset records in
``info["preprocess"]`` is folded into the file (:class:`Preprocessed`): a ``csv`` run's export takes the CSV's raw
feature columns (in the order the export's record, ``model.onnx.json``, lists) and, for regression, returns
predictions in the CSV's units.
Image datasets record no such step: their inputs are expected exactly as the dataset builder produces them
(pixels / 255, then standardised with the training split's mean and std, given in the report's
``data_info.normalisation``). The export's record (``model.onnx.json``) says which applies.

ONNX export uses the TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``): in torch 2.13 the
default dynamo exporter needs the ``onnxscript`` package, while the legacy path works with ``onnx`` alone and
gives a dynamic batch axis through ``dynamic_axes``.

scikit-learn students go to ONNX through skl2onnx (:func:`export_sklearn`), with the same parity check
against ``predict_proba``.
"""

from __future__ import annotations

import contextlib
import copy
import os
import statistics
import time
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import KdkitError

FORMATS = ("onnx", "torchscript")
INPUT_NAME = "input"
OUTPUT_NAME = "logits"


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _ort():
    try:
        import onnxruntime
    except ImportError:  # pragma: no cover - depends on the environment
        raise KdkitError("ONNX export needs onnx and onnxruntime: pip install 'kdkit[export]'") from None
    return onnxruntime


class Preprocessed(nn.Module):
    """``model`` with a dataset's preprocessing folded in, so an exported file takes raw rows.

    ``forward(raw) = model((raw - input_mean) / input_std)``, then, when target scaling is given (regression),
    ``* target_std + target_mean``: the inverse of the standardisation the ``csv`` builder applied to the
    targets, so predictions come out in the data's units.

    Args:
        model: the trained model (it saw standardised inputs).
        preprocess: ``{"input_mean", "input_std"[, "target_mean", "target_std"]}``, lists of floats
            (``DataSplits.preprocess``).
    """

    def __init__(self, model: nn.Module, preprocess: Dict[str, Any]):
        super().__init__()
        self.model = model
        self.register_buffer("input_mean", torch.tensor(preprocess["input_mean"], dtype=torch.float32))
        self.register_buffer("input_std", torch.tensor(preprocess["input_std"], dtype=torch.float32))
        self.scales_targets = "target_mean" in preprocess
        if self.scales_targets:
            self.register_buffer("target_mean", torch.tensor(preprocess["target_mean"], dtype=torch.float32))
            self.register_buffer("target_std", torch.tensor(preprocess["target_std"], dtype=torch.float32))

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        out = self.model((raw - self.input_mean) / self.input_std)  # (B, F) standardised features
        if self.scales_targets:
            out = out * self.target_std + self.target_mean  # (B, D) in the data's units
        return out

    def raw(self, standardised: torch.Tensor) -> torch.Tensor:
        """Raw rows back from standardised ones (for parity checks on the dataset's own inputs)."""
        return standardised * self.input_std + self.input_mean


def export_onnx(model: nn.Module, example: torch.Tensor, path, opset: int = 17) -> Path:
    """Write ``model`` as ONNX with a dynamic batch axis, input ``input`` and output ``logits``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = copy.deepcopy(model).cpu().eval()
    axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
    if is_token_ids(example):
        # Token ids (B, L): the sequence axis is dynamic too, and the model must not trim padded columns
        # (a data-dependent slice would be traced as a constant length).
        axes[INPUT_NAME][1] = "sequence"
        if hasattr(model, "trim"):
            model.trim = False
    try:
        with _quiet(), torch.no_grad():
            torch.onnx.export(model, (example.cpu(),), str(path), dynamo=False, opset_version=opset,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_axes=axes)
    except Exception as e:
        raise KdkitError(f"ONNX export of {type(model).__name__} failed: {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}") from None
    return path


def is_token_ids(x: torch.Tensor) -> bool:
    """Integer (B, L) inputs: token ids of a text model."""
    return not x.is_floating_point() and x.dim() == 2


def export_torchscript(model: nn.Module, example: torch.Tensor, path) -> Path:
    """Write ``model`` as a traced TorchScript archive (loads with ``torch.jit.load``, no Python class needed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = copy.deepcopy(model).cpu().eval()
    if is_token_ids(example) and hasattr(model, "trim"):
        model.trim = False  # a traced data-dependent slice would fix the sequence length
    try:
        with _quiet(), torch.no_grad():
            traced = torch.jit.trace(model, example.cpu(), check_trace=False)
            torch.jit.save(traced, str(path))
    except Exception as e:
        raise KdkitError(f"TorchScript export of {type(model).__name__} failed: {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}") from None
    return path


def onnx_session(path, threads: int = 0):
    """An onnxruntime CPU session (``threads`` 0: onnxruntime's default)."""
    ort = _ort()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_onnx(session_or_path, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Outputs of an ONNX model (first output) on ``x`` (N, ...), batched."""
    sess = onnx_session(session_or_path) if isinstance(session_or_path, (str, Path)) else session_or_path
    name = sess.get_inputs()[0].name
    x = np.ascontiguousarray(x, dtype=np.int64 if np.issubdtype(np.asarray(x).dtype, np.integer) else np.float32)
    outs = [sess.run(None, {name: x[i:i + batch_size]})[0] for i in range(0, len(x), batch_size)]
    return np.concatenate(outs)


def compare(reference: np.ndarray, exported: np.ndarray, atol: float = 1e-4, rtol: float = 1e-4,
            what: str = "export") -> Dict[str, float]:
    """Max abs difference and arg-max agreement; raise unless ``max|diff| <= atol + rtol * max|reference|``."""
    reference, exported = np.asarray(reference, dtype=np.float64), np.asarray(exported, dtype=np.float64)
    if reference.shape != exported.shape:
        raise KdkitError(f"{what}: output shape {exported.shape} differs from PyTorch's {reference.shape}")
    diff = float(np.max(np.abs(reference - exported))) if reference.size else 0.0
    agree = float(np.mean(reference.argmax(1) == exported.argmax(1))) if reference.ndim == 2 else 1.0
    tol = atol + rtol * float(np.max(np.abs(reference))) if reference.size else atol
    result = {"max_abs_diff": diff, "argmax_agreement": agree, "samples": int(len(reference)), "tolerance": tol}
    if not np.isfinite(diff) or diff > tol:
        raise KdkitError(f"{what}: outputs differ from the PyTorch model by up to {diff:.3g}, beyond the "
                         f"tolerance {tol:.3g} (arg-max agreement {agree:.4f})")
    return result


def onnx_latency(path, input_shape: Sequence[int], batch_sizes: Sequence[int] = (1, 256), repeats: int = 30,
                 warmup: int = 5, example: Optional[np.ndarray] = None) -> Dict[str, float]:
    """Median onnxruntime CPU wall time per batch (ms) after warm-up, on one thread, as kdkit times PyTorch.

    Random float inputs, or ``example`` (one sample, e.g. token ids) repeated over the batch."""
    sess = onnx_session(path, threads=1)
    name = sess.get_inputs()[0].name
    result = {}
    for bs in batch_sizes:
        if example is not None:
            x = np.ascontiguousarray(np.broadcast_to(example, (bs, *example.shape)))
        else:
            x = np.random.default_rng(0).standard_normal((bs, *input_shape)).astype(np.float32)
        for _ in range(warmup):
            sess.run(None, {name: x})
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            sess.run(None, {name: x})
            times.append(time.perf_counter() - t0)
        result[f"ort_latency_ms_b{bs}"] = 1000 * statistics.median(times)
    return result


def quantize_onnx(float_path, out_path, calibration: np.ndarray) -> Path:
    """Static int8 (QDQ, per-tensor scales: onnxruntime's per-channel Gemm weights lost accuracy here) with
    onnxruntime, calibrated on ``calibration`` inputs (N, ...)."""
    _ort()
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class _Reader(CalibrationDataReader):
        def __init__(self, x: np.ndarray, batch: int = 32):
            self.batches = iter([{INPUT_NAME: x[i:i + batch]} for i in range(0, len(x), batch)])

        def get_next(self):
            return next(self.batches, None)

    out_path = Path(out_path)
    pre = out_path.with_name(out_path.stem + ".pre.onnx")
    import logging

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # onnxruntime's quantiser logs advice through the root logger
    with _quiet():
        try:
            quant_pre_process(str(float_path), str(pre), skip_symbolic_shape=True)
            source = pre
        except Exception:  # pre-processing is an optimisation only
            source = Path(float_path)
        import onnx

        graph = onnx.load(str(source)).graph
        outputs = {o.name for o in graph.output}
        # The layer producing the logits stays float: int8 logits clip at the calibrated range, so inputs
        # beyond it would get saturated scores (a common choice: first and last layers kept in float).
        last = [n.name for n in graph.node if outputs & set(n.output) and n.name]
        quantize_static(str(source), str(out_path), _Reader(np.ascontiguousarray(calibration, dtype=np.float32)),
                        quant_format=QuantFormat.QDQ, per_channel=False, activation_type=QuantType.QInt8,
                        weight_type=QuantType.QInt8, nodes_to_exclude=last)
    root.setLevel(level)
    if pre.exists():
        pre.unlink()
    return out_path


def _gemm_as_matmul(model) -> int:
    """Rewrite plain ``Gemm`` nodes (alpha = beta = 1, A not transposed) as ``MatMul`` + ``Add`` in place, so that
    onnxruntime's dynamic quantiser, which knows MatMul but not Gemm, quantises them too (GPT-2's Conv1D layers
    export as Gemm). A transposed B initializer is stored transposed. Returns the number of nodes rewritten."""
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    uses: Dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    rewritten, nodes = 0, []
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        plain = (node.op_type == "Gemm" and attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0
                 and not attrs.get("transA", 0) and len(node.input) >= 2)
        b = node.input[1] if plain else None
        if plain and attrs.get("transB", 0) and not (b in inits and uses.get(b) == 1):
            plain = False  # a transposed B that is not a private constant: left as it is
        if not plain:
            nodes.append(node)
            continue
        if attrs.get("transB", 0):
            inits[b].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(inits[b]).T.copy(), b))
        product = node.output[0] + "_kdkit_matmul" if len(node.input) > 2 else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], b], [product], name=(node.name or "gemm") + "_mm"))
        if len(node.input) > 2:
            nodes.append(helper.make_node("Add", [product, node.input[2]], list(node.output),
                                          name=(node.name or "gemm") + "_add"))
        rewritten += 1
    del graph.node[:]
    graph.node.extend(nodes)
    return rewritten


def quantize_onnx_dynamic(float_path, out_path) -> Path:
    """Dynamic int8 with onnxruntime (``quantize_dynamic``): int8 weights of the matrix products and embedding
    tables, activations quantised on the fly per batch, no calibration. The layer producing the logits stays
    float. Used for token-id models (transformers), whose inputs cannot be calibrated as floats."""
    _ort()
    import logging

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(float_path))
    if _gemm_as_matmul(model):
        onnx.save(model, str(float_path))
    graph = model.graph
    outputs = {o.name for o in graph.output}
    last = [n.name for n in graph.node if outputs & set(n.output) and n.name]
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with _quiet():
            quantize_dynamic(str(float_path), str(out_path), weight_type=QuantType.QInt8, nodes_to_exclude=last)
    finally:
        root.setLevel(level)
    return Path(out_path)


def export_model(model: nn.Module, inputs: torch.Tensor, path, fmt: str = "onnx", int8: bool = False,
                 calibration: Optional[torch.Tensor] = None, atol: float = 1e-4, rtol: float = 1e-4,
                 int8_rtol: float = 0.1, timing: bool = True) -> Dict[str, Any]:
    """Export ``model``, load the file back, compare on ``inputs`` (N, ...), time it.

    Args:
        model: a float PyTorch model.
        inputs: real inputs for the parity check (and the example for tracing).
        path: the file to write (``.onnx`` or ``.pt``); an existing file is an error.
        fmt: ``onnx`` or ``torchscript``.
        int8: ONNX only: quantise the exported graph to int8 with onnxruntime (``calibration`` inputs needed).

    Returns:
        ``{"file", "format", "int8", "bytes", "parity": {...}, "pytorch": latency, "onnxruntime": latency}``.
    """
    if fmt not in FORMATS:
        raise KdkitError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    if int8 and fmt != "onnx":
        raise KdkitError("--int8 is available for --format onnx only (onnxruntime quantisation)")
    path = Path(path)
    if path.exists():
        raise KdkitError(f"{path} already exists; remove it or choose another output path")
    from ..compress.quantize import is_quantized

    if is_quantized(model):
        raise KdkitError("export takes a float model; for int8 ONNX export the float model with --int8")
    model = model.cpu().eval()
    inputs = inputs.cpu()
    with torch.inference_mode():
        reference = model(inputs).float().numpy()
    result: Dict[str, Any] = {"format": fmt, "int8": int8, "input_name": INPUT_NAME, "output_name": OUTPUT_NAME,
                              "input_shape": ["batch", *inputs.shape[1:]]}
    result["input_dtype"] = "float32"
    if is_token_ids(inputs):  # int64 token ids, any sequence length up to the model's positions
        result["input_shape"], result["input_dtype"] = ["batch", "sequence"], "int64"
    # Written under a temporary name, checked, then renamed: a failed check, an error or an interruption leaves
    # no unchecked file behind (and no second file a model card could list).
    work = path.with_name(f".{path.stem}.partial{path.suffix}")
    float_path = path.with_name(f".{path.stem}.float.partial.onnx")
    try:
        # int8 token-id models are held to their accuracy on the test split instead (kdkit.export.text).
        int8_tol = (float("inf"), 0.0) if is_token_ids(inputs) else (0.0, int8_rtol)
        loaded, result["parity"] = _write_checked(model, inputs, reference, work, float_path, fmt, int8, calibration,
                                                  int8_tol if int8 else (atol, rtol), path.name)
        if int8 and is_token_ids(inputs):
            result["parity"]["tolerance"] = None  # no logit rule: the caller checks accuracy or perplexity
        os.replace(work, path)
    except KdkitError:
        raise
    except Exception as e:  # noqa: BLE001 - an exporter or onnxruntime failure is one line, the files removed
        raise KdkitError(f"{'int8 ' if int8 else ''}{fmt} export {path.name} failed: {type(e).__name__}: "
                         f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from None
    finally:
        for leftover in (work, float_path, work.with_name(work.stem + ".pre.onnx")):
            leftover.unlink(missing_ok=True)
    result["file"] = str(path)
    result["bytes"] = path.stat().st_size
    if timing:
        result.update(_timings(model, inputs, path, fmt, loaded))
    return result


def _write_checked(model: nn.Module, inputs: torch.Tensor, reference: np.ndarray, work: Path, float_path: Path,
                   fmt: str, int8: bool, calibration: Optional[torch.Tensor], tolerance, name: str):
    """Write the file at ``work`` (int8: a float ONNX at ``float_path`` first), load it back and compare its
    outputs with ``reference``; returns ``(the loaded TorchScript module or None, the parity record)``."""
    if fmt == "onnx":
        if int8 and is_token_ids(inputs):
            export_onnx(model, inputs[:1], float_path)
            quantize_onnx_dynamic(float_path, work)
        elif int8:
            if calibration is None:
                raise KdkitError("int8 export needs calibration inputs")
            export_onnx(model, inputs[:1], float_path)
            quantize_onnx(float_path, work, calibration.cpu().numpy())
        else:
            export_onnx(model, inputs[:1], work)
        import onnx

        onnx.checker.check_model(str(work))
        exported = run_onnx(work, inputs.numpy())
        return None, compare(reference, exported, *tolerance, what=f"ONNX export {name}")
    export_torchscript(model, inputs[:1], work)
    with _quiet():  # torch 2.13 marks torch.jit deprecated; TorchScript is still the format asked for
        loaded = torch.jit.load(str(work), map_location="cpu")
    with torch.inference_mode():
        exported = loaded(inputs).float().numpy()
    return loaded, compare(reference, exported, *tolerance, what=f"TorchScript export {name}")


def _timings(model: nn.Module, inputs: torch.Tensor, path: Path, fmt: str, loaded=None) -> Dict[str, Any]:
    """One-thread latency of the PyTorch model and of the exported file (onnxruntime, or the loaded TorchScript
    module), on token ids repeated to the full length for text models, else random inputs."""
    from ..evaluation.metrics import TEXT_LATENCY_BATCHES, latency, text_latency_input
    from ..training.threads import single_thread

    shape = tuple(inputs.shape[1:])
    example, batches = None, (1, 256)
    result: Dict[str, Any] = {}
    if is_token_ids(inputs) and getattr(model, "pad_token_id", None) is not None:
        example, batches = text_latency_input(inputs[0], int(model.pad_token_id)), TEXT_LATENCY_BATCHES
        result["latency_seq_len"] = int(example.shape[0])
    with single_thread():
        result["pytorch"] = latency(model, shape, batches, example=example)
        if fmt == "onnx":
            result["onnxruntime"] = onnx_latency(path, shape, batches,
                                                 example=None if example is None else example.numpy())
        else:
            result["torchscript"] = {k.replace("latency", "ts_latency"): v
                                     for k, v in latency(loaded, shape, batches, example=example).items()}
    return result


def export_sklearn(estimator, x: np.ndarray, path, atol: float = 1e-4) -> Dict[str, Any]:
    """Convert a fitted scikit-learn classifier to ONNX with skl2onnx and check ``predict_proba`` parity on ``x``.

    Raises:
        KdkitError: skl2onnx missing, an estimator it cannot convert, or outputs beyond tolerance.
    """
    try:
        from skl2onnx import to_onnx
    except ImportError:  # pragma: no cover - depends on the environment
        raise KdkitError("exporting scikit-learn models needs skl2onnx: pip install 'kdkit[export]'") from None
    path = Path(path)
    if path.exists():
        raise KdkitError(f"{path} already exists; remove it or choose another output path")
    x = np.ascontiguousarray(x, dtype=np.float32)
    try:
        with _quiet():
            onx = to_onnx(estimator, x[:1], options={id(estimator): {"zipmap": False}}
                          if hasattr(estimator, "predict_proba") else None, target_opset=17)
    except Exception as e:
        raise KdkitError(f"skl2onnx cannot convert {type(estimator).__name__}: {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(onx.SerializeToString())
    sess = onnx_session(path)
    outs = sess.run(None, {sess.get_inputs()[0].name: x})
    names = [o.name for o in sess.get_outputs()]
    result: Dict[str, Any] = {"file": str(path), "bytes": path.stat().st_size, "outputs": names}
    labels = np.asarray(outs[0]).ravel()
    result["label_agreement"] = float(np.mean(labels == estimator.predict(x)))
    if hasattr(estimator, "predict_proba") and len(outs) > 1:
        result["parity"] = compare(estimator.predict_proba(x), np.asarray(outs[1]), atol, 1e-4,
                                   what=f"skl2onnx export {path.name}")
    if result["label_agreement"] < 1.0 and "parity" not in result:
        raise KdkitError(f"skl2onnx export {path.name}: predicted labels agree with scikit-learn on only "
                         f"{result['label_agreement']:.4f} of inputs")
    return result


__all__ = ["FORMATS", "Preprocessed", "compare", "export_model", "export_onnx", "export_sklearn",
           "export_torchscript", "onnx_latency", "quantize_onnx", "quantize_onnx_dynamic", "run_onnx"]
