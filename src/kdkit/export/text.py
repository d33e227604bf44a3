"""A text classifier's export that works without kdkit: the ONNX file, its tokenizer and its labels.

``kdkit export`` of a text classification run writes, beside ``model.onnx``:

- ``tokenizer.json``: the data's tokenizer (Hugging Face ``tokenizers`` format), padding and truncation off;
- ``labels.json``: ``{"labels": [...class names...], "max_length": L, "pad_token_id": p}``;
- the model card, whose loading snippet uses only ``onnxruntime``, ``numpy`` and ``tokenizers``.

The file is then checked on the whole test split: its accuracy is measured again beside the PyTorch model's
(``accuracy_file`` and ``accuracy_pytorch``, the drop in points, and the share of equal predictions). An int8 file
(onnxruntime's dynamic quantisation of the linear layers and embeddings) whose accuracy drops by more than
``int8_max_drop`` points is refused, and removed, unless ``keep_int8=True``; the card then says so.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import KdkitError

TOKENIZER_FILE = "tokenizer.json"
LABELS_FILE = "labels.json"


def tokenizer_json(tokenizer: Any) -> str:
    """The serialised ``tokenizers`` pipeline of a fast tokenizer, with padding and truncation turned off (the
    loading snippet sets truncation itself, and pads with the pad id)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise KdkitError(f"cannot write {TOKENIZER_FILE}: the tokenizer {type(tokenizer).__name__} is not a fast "
                         "(tokenizers-based) tokenizer; expected one saved with tokenizer.json")
    state = json.loads(backend.to_str())
    state["padding"] = state["truncation"] = None
    return json.dumps(state, ensure_ascii=False, indent=1)


def side_files(tokenizer: Any, labels: Sequence[Any], max_length: int, pad_token_id: int) -> Dict[str, str]:
    """The texts of the two files written beside the model, by name."""
    meta = {"labels": [str(c) for c in labels], "max_length": int(max_length), "pad_token_id": int(pad_token_id),
            "input": "input", "output": "logits"}
    return {TOKENIZER_FILE: tokenizer_json(tokenizer), LABELS_FILE: json.dumps(meta, indent=1) + "\n"}


def check_side_files(folder: Path, files: Dict[str, str]) -> None:
    """Refuse before writing when a file of another content already sits where one would go."""
    for name, text in files.items():
        p = folder / name
        if p.exists() and p.read_text(encoding="utf-8", errors="replace") != text:
            raise KdkitError(f"{p} already exists with other content (another tokenizer or other labels); remove it "
                             f"or export elsewhere (--out DIR/model.onnx)")


def write_side_files(folder: Path, files: Dict[str, str]) -> List[str]:
    from ..training.rundir import write_text_atomic

    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        write_text_atomic(folder / name, text)
    return [str(folder / name) for name in files]


def _batches_by_length(ids: torch.Tensor, pad: int, batch: int = 64):
    """Index batches of texts of similar length, each trimmed to its longest text (fast and exact)."""
    lengths = (ids != pad).sum(1)
    order = torch.argsort(lengths, stable=True)
    for start in range(0, len(order), batch):
        idx = order[start:start + batch]
        width = max(1, int(lengths[idx].max()))
        yield idx, ids[idx, :width]


@torch.no_grad()
def split_predictions(model: nn.Module, session, ids: torch.Tensor, pad: int) -> Dict[str, np.ndarray]:
    """Class predictions of the PyTorch model and of the onnxruntime session on every text of ``ids``."""
    model = model.eval()
    ours = np.empty(len(ids), dtype=np.int64)
    theirs = np.empty(len(ids), dtype=np.int64)
    name = session.get_inputs()[0].name
    for idx, x in _batches_by_length(ids, pad):
        ours[idx.numpy()] = model(x).argmax(1).numpy()
        theirs[idx.numpy()] = session.run(None, {name: x.numpy().astype(np.int64)})[0].argmax(1)
    return {"pytorch": ours, "file": theirs}


def check_split_accuracy(model: nn.Module, path: Path, data, int8: bool, int8_max_drop: float,
                         keep_int8: bool) -> Dict[str, Any]:
    """Accuracy of the exported file on a labelled split beside the PyTorch model's; an int8 file beyond the
    bound is an error (unless ``keep_int8``). Returns the record kept in the export's JSON."""
    from .core import onnx_session

    y = getattr(data, "y", None)
    if y is None or not hasattr(data, "x"):
        return {}
    keep = y >= 0
    ids, y = data.x[keep], y[keep].numpy()
    pred = split_predictions(model, onnx_session(path), ids, int(model.pad_token_id))
    acc_pt, acc_file = float(np.mean(pred["pytorch"] == y)), float(np.mean(pred["file"] == y))
    record = {"samples": int(len(y)), "accuracy_pytorch": acc_pt, "accuracy_file": acc_file,
              "accuracy_drop_points": 100 * (acc_pt - acc_file),
              "prediction_agreement": float(np.mean(pred["pytorch"] == pred["file"]))}
    if int8:
        record["int8_max_drop_points"] = float(int8_max_drop)
        record["int8_within_bound"] = record["accuracy_drop_points"] <= int8_max_drop
        if not record["int8_within_bound"] and not keep_int8:
            raise KdkitError(f"int8 export {path.name}: accuracy {100 * acc_file:.2f}% against {100 * acc_pt:.2f}% "
                             f"in float on {len(y):,} test texts, a drop of {record['accuracy_drop_points']:.2f} "
                             f"points beyond the bound {int8_max_drop:g}; not kept (pass --keep-int8 to keep it, "
                             f"or --int8-max-drop to change the bound)")
    return record


def timed_lengths(ids: torch.Tensor, pad: int, max_length: Optional[int] = None) -> Dict[str, int]:
    from ..evaluation.metrics import length_profile

    prof = length_profile(ids, pad)
    return {k: min(v, max_length) if max_length else v for k, v in prof.items()}


def paired_latency(model: nn.Module, path: Path, example: torch.Tensor, batches: Sequence[int] = (1, 32),
                   rounds: int = 15) -> Dict[str, float]:
    """PyTorch and onnxruntime timed in alternation on one thread (median ms per batch of each)."""
    import statistics
    import time

    from ..training.threads import single_thread
    from .core import onnx_session

    session = onnx_session(path, threads=1)
    name = session.get_inputs()[0].name
    model = model.eval()
    out: Dict[str, float] = {}
    with single_thread(), torch.inference_mode():
        for bs in batches:
            x = example.unsqueeze(0).expand(bs, -1).contiguous()
            x_np = x.numpy().astype(np.int64)
            for _ in range(3):  # warm-up
                model(x)
                session.run(None, {name: x_np})
            pt, ort = [], []
            for _ in range(rounds):
                t0 = time.perf_counter()
                model(x)
                t1 = time.perf_counter()
                session.run(None, {name: x_np})
                t2 = time.perf_counter()
                pt.append(t1 - t0)
                ort.append(t2 - t1)
            out[f"pytorch_ms_b{bs}"] = 1000 * statistics.median(pt)
            out[f"ort_ms_b{bs}"] = 1000 * statistics.median(ort)
    return out


__all__ = ["LABELS_FILE", "TOKENIZER_FILE", "check_side_files", "check_split_accuracy", "paired_latency",
           "side_files", "split_predictions", "tokenizer_json", "write_side_files"]
