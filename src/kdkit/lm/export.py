"""ONNX export of a causal-LM student, with a parity check on real token ids.

The file computes the forward pass only: input ``input`` (batch, sequence) int64 ids right-padded with the pad id,
output ``logits`` (batch, sequence, vocab); both axes are dynamic. The attention mask is derived inside the graph
(``ids != pad``), as the PyTorch model does; the data-dependent trimming of all-pad columns is switched off in the
file (an ONNX graph has static control flow), so the output keeps the input's length.

**No key/value cache.** Generating n tokens with this file reruns the whole prefix for every new token (O(n²)
attention work, n forward passes over growing inputs) where ``hf.generate`` reuses cached keys and values. For the
short continuations a small device asks of a model this size (tens of tokens, a few-layer model) the cost is
measured and reported beside PyTorch's (``onnx_gen_tokens_per_s`` vs ``gen_tokens_per_s``); for long generations
export a decoder with past key/values (e.g. Hugging Face Optimum's ``decoder_with_past`` form) instead. Scoring,
ranking and classification with an LM (one forward pass per input) are served fully by this file.

The parity check runs the file and PyTorch on the first rows of the test split and on a second, differently
shaped batch (other batch size, shorter length: the dynamic axes at work); the maximum absolute difference over
real (non-pad) positions must stay within ``atol + rtol * max|logit|``, and the arg-max agreement is reported.
"""

from __future__ import annotations

import copy
import statistics
import time
from pathlib import Path
from typing import Any, Dict

import numpy as np
import torch
from torch import nn

from ..errors import KdkitError


def _forward_copy(model: nn.Module) -> nn.Module:
    m = copy.deepcopy(model).cpu().eval()
    if hasattr(m, "trim"):
        m.trim = False  # static graph: the output keeps the input's length
    return m


def export_lm_onnx(model: nn.Module, example: torch.Tensor, path, opset: int = 17) -> Path:
    """Write a causal LM ((B, L) ids -> (B, L, V) logits) as ONNX with dynamic batch and sequence axes."""
    from ..export.core import INPUT_NAME, OUTPUT_NAME, _quiet

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    m = _forward_copy(model)
    try:
        with _quiet(), torch.no_grad():
            torch.onnx.export(m, (example.cpu(),), str(path), dynamo=False, opset_version=opset,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: "batch", 1: "sequence"},
                                            OUTPUT_NAME: {0: "batch", 1: "sequence"}})
    except Exception as e:
        raise KdkitError(f"ONNX export of {type(model).__name__} failed: {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}") from None
    return path


def _parity(session, model: nn.Module, ids: torch.Tensor, pad: int) -> Dict[str, float]:
    with torch.inference_mode():
        ref = model(ids).float().numpy()
    out = session.run(None, {session.get_inputs()[0].name: ids.numpy().astype(np.int64)})[0]
    if out.shape != ref.shape:
        raise KdkitError(f"ONNX logits have shape {out.shape} but PyTorch's {ref.shape}")
    real = (ids != pad).numpy()
    diff = float(np.abs(out - ref)[real].max()) if real.any() else 0.0
    agree = float((out.argmax(-1) == ref.argmax(-1))[real].mean()) if real.any() else 1.0
    return {"max_abs_diff": diff, "argmax_agreement": agree, "scale": float(np.abs(ref[real]).max()),
            "positions": int(real.sum()), "shape": list(ids.shape)}


def _ort_greedy_seconds(session, prompt: np.ndarray, new_tokens: int) -> float:
    """Greedy generation with the forward-only file: the whole sequence is rerun for every new token."""
    name = session.get_inputs()[0].name
    seq = prompt.astype(np.int64)
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        logits = session.run(None, {name: seq})[0]
        seq = np.concatenate([seq, logits[:, -1:].argmax(-1).astype(np.int64)], axis=1)
    return time.perf_counter() - t0


def _perplexity(logits: np.ndarray, ids: np.ndarray, pad: int) -> float:
    """Next-token perplexity of (N, L, V) logits on the ids they were computed from (real positions only)."""
    logits = logits[:, :-1].astype(np.float64)
    target = ids[:, 1:]
    real = (ids[:, :-1] != pad) & (target != pad)
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, target[..., None], -1)[..., 0]
    return float(np.exp(nll[real].mean())) if real.any() else float("nan")


def _int8_check(session, model: nn.Module, ids: torch.Tensor, pad: int, max_rise: float, keep: bool,
                name: str) -> Dict[str, Any]:
    """The int8 file's perplexity on ``ids`` beside the float model's; beyond ``max_rise`` percent an error."""
    with torch.inference_mode():
        ref = model(ids).float().numpy()
    out = session.run(None, {session.get_inputs()[0].name: ids.numpy().astype(np.int64)})[0]
    p_ref, p_int8 = _perplexity(ref, ids.numpy(), pad), _perplexity(out, ids.numpy(), pad)
    rise = 100 * (p_int8 / p_ref - 1)
    record = {"perplexity_pytorch": p_ref, "perplexity_file": p_int8, "perplexity_rise_percent": rise,
              "int8_max_rise_percent": float(max_rise), "int8_within_bound": bool(rise <= max_rise),
              "rows": int(len(ids))}
    if not record["int8_within_bound"] and not keep:
        raise KdkitError(f"int8 export {name}: perplexity {p_int8:.3f} against {p_ref:.3f} in float on {len(ids)} "
                         f"test rows, {rise:.2f}% higher, beyond the bound {max_rise:g}%; not kept (pass "
                         f"--keep-int8 to keep it, or --int8-max-drop to change the bound)")
    return record


def export_lm(model: nn.Module, ids: torch.Tensor, path, atol: float = 1e-4, rtol: float = 1e-4,
              timing: bool = True, new_tokens: int = 32, repeats: int = 5, int8: bool = False,
              int8_max_rise: float = 1.0, keep_int8: bool = False) -> Dict[str, Any]:
    """Export ``model`` to ONNX, load it back with onnxruntime, check parity on real ``ids`` (N, L), time it.

    ``int8``: onnxruntime's dynamic quantisation of the float file (int8 weights of the matrix products and the
    embeddings, :func:`kdkit.export.core.quantize_onnx_dynamic`). Its logits differ by design, so it is held to
    its perplexity on ``ids`` instead: at most ``int8_max_rise`` percent above the float model's (else an error
    and no file, unless ``keep_int8``).

    Returns:
        ``{"file", "format", "bytes", "parity": {...}, "kv_cache": False, ...}`` and, with ``timing``, greedy
        generation speed at batch 1 of onnxruntime (no KV cache) and of PyTorch (``hf.generate``, KV cache).

    Raises:
        KdkitError: an existing file, or outputs beyond tolerance (the file is then removed).
    """
    from ..export.core import _ort, onnx_session

    path = Path(path)
    if path.exists():
        raise KdkitError(f"{path} already exists; remove it or choose another output path")
    _ort()
    pad = int(getattr(model, "pad_token_id", 0))
    ref_model = _forward_copy(model)
    ids = ids.cpu()
    if int8:
        from ..export.core import quantize_onnx_dynamic

        float_path = path.with_name(f".{path.stem}.float.partial.onnx")
        try:
            export_lm_onnx(ref_model, ids[:2], float_path)
            quantize_onnx_dynamic(float_path, path)
        finally:
            float_path.unlink(missing_ok=True)
    else:
        export_lm_onnx(ref_model, ids[:2], path)
    import onnx

    onnx.checker.check_model(str(path))
    sess = onnx_session(path)
    used = int((ids != pad).any(0).nonzero().max()) + 1 if bool((ids != pad).any()) else ids.shape[1]
    checks = [_parity(sess, ref_model, ids[:, :used], pad)]
    if len(ids) > 1 and used > 2:  # another batch size and length: the dynamic axes at work
        checks.append(_parity(sess, ref_model, ids[:max(1, len(ids) // 2), :max(2, used // 2)], pad))
    diff = max(c["max_abs_diff"] for c in checks)
    tol = atol + rtol * max(c["scale"] for c in checks)
    agree = min(c["argmax_agreement"] for c in checks)
    parity = {"max_abs_diff": diff, "argmax_agreement": agree, "tolerance": tol, "samples": int(len(ids)),
              "checks": checks}
    int8_record = None
    if int8:  # held to its perplexity, not to a logit tolerance
        parity["tolerance"] = None
        try:
            int8_record = _int8_check(sess, ref_model, ids[:, :used], pad, int8_max_rise, keep_int8, path.name)
        except KdkitError:
            path.unlink(missing_ok=True)
            raise
    elif not np.isfinite(diff) or diff > tol:
        path.unlink(missing_ok=True)
        raise KdkitError(f"ONNX export {path.name}: logits differ from the PyTorch model by up to {diff:.3g}, beyond "
                         f"the tolerance {tol:.3g} (arg-max agreement {agree:.4f})")
    result: Dict[str, Any] = {"format": "onnx", "int8": int8, "file": str(path), "bytes": path.stat().st_size,
                              "input_name": "input", "output_name": "logits",
                              "input_shape": ["batch", "sequence"], "output_shape": ["batch", "sequence", "vocab"],
                              "kv_cache": False, "parity": parity,
                              "normalisation": "none: the file takes token ids right-padded with the pad id "
                                               f"({pad}) and derives the attention mask itself"}
    if int8_record is not None:
        result["test_perplexity"] = int8_record
    if timing:
        result.update(_generation_timing(ref_model, ids, pad, path, new_tokens, repeats))
    return result


def _generation_timing(ref_model: nn.Module, ids: torch.Tensor, pad: int, path: Path, new_tokens: int,
                       repeats: int) -> Dict[str, Any]:
    """Greedy generation at batch 1 on one thread: the file (no KV cache) and PyTorch (hf.generate, KV cache)."""
    from ..export.core import onnx_session
    from ..training.threads import single_thread
    from .evaluate import _room, generation_speed

    prompt = ids[:1][:, :8]
    prompt = prompt[:, :max(1, int((prompt != pad).sum()))]
    steps = _room(ref_model, prompt.shape[1], new_tokens)
    result: Dict[str, Any] = {}
    with single_thread():
        sess1 = onnx_session(path, threads=1)
        _ort_greedy_seconds(sess1, prompt.numpy(), 2)  # warm-up
        times = [_ort_greedy_seconds(sess1, prompt.numpy(), steps) for _ in range(repeats)]
        result["onnxruntime"] = {"onnx_gen_tokens_per_s": steps / statistics.median(times)}
        result["pytorch"] = generation_speed(ref_model, prompt, steps, repeats)
    result["generation"] = {"prompt_tokens": int(prompt.shape[1]), "new_tokens": steps, "repeats": repeats,
                            "note": "batch 1, greedy, one thread; onnxruntime reruns the prefix per token "
                                    "(no KV cache), PyTorch hf.generate uses its KV cache"}
    return result
