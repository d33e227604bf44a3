"""``MODEL_CARD.md`` beside an exported student (Mitchell et al., "Model Cards for Model Reporting", FAT* 2019).

Written by ``kdkit export`` from the run directory alone (``config.yaml``, ``report.json``): intended use, data,
training procedure (method, teacher, epochs, seed), metrics, how to load each format, limitations. The card's
last line holds a hash of its text: a card kdkit wrote and nobody edited is brought up to date by the next export
into the same folder (it then lists every exported file there); any other existing ``MODEL_CARD.md`` is never
overwritten: the export stops before writing anything, as it does for an existing model file.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any, List, Mapping, Optional

from ..errors import KdkitError

CARD_NAME = "MODEL_CARD.md"
_STAMP = re.compile(r"\n<!-- kdkit model card, blake2b:([0-9a-f]{32}) -->\n?$")


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def card_path(export_file) -> Path:
    return Path(export_file).parent / CARD_NAME


def check_card_writable(path: Path) -> None:
    """Refuse to export when ``path`` holds a card kdkit may not overwrite (not its own, or edited since).

    Raises:
        KdkitError: an existing ``MODEL_CARD.md`` that kdkit did not write, or that was edited.
    """
    if not path.exists():
        return
    text = path.read_text(encoding="utf-8", errors="replace")
    m = _STAMP.search(text)
    if m is None or _digest(text[:m.start()]) != m.group(1):
        raise KdkitError(f"{path} already exists and is not an unedited card written by kdkit export; remove it or "
                         f"export elsewhere (--out DIR/model.onnx)")


def _pct(v: Any) -> str:
    return f"{100 * v:.2f}%" if isinstance(v, (int, float)) else "unknown"


def _num(v: Any, fmt: str = "{:,}") -> str:
    return fmt.format(v) if isinstance(v, (int, float)) else "unknown"


def _loading(files: List[Path], run_dir: Path, card_dir: Path, result: Mapping[str, Any]) -> List[str]:
    def rel(p: Path) -> str:  # paths as seen from the card's folder
        return os.path.relpath(p.resolve(), card_dir.resolve())

    shape = ", ".join(str(d) for d in result.get("input_shape", ["batch", "..."]))
    dtype = result.get("input_dtype", "float32")  # int64 for token ids
    out = [f"Input `{result.get('input_name', 'input')}` of shape ({shape}), {dtype}; output "
           f"`{result.get('output_name', 'logits')}`. Inputs: {result.get('normalisation', 'unknown')}.", ""]
    names = {Path(f).name for f in result.get("files", [])}
    if {"tokenizer.json", "labels.json"} <= names:  # a text classifier: raw strings in, class names out
        onnx_file = rel(Path(result["file"]))
        out += ["From raw strings, with onnxruntime, numpy and tokenizers only (`pip install onnxruntime "
                "tokenizers`), run from this folder:", "", "```python", "import json",
                "import numpy as np, onnxruntime as ort", "from tokenizers import Tokenizer", "",
                'meta = json.load(open("labels.json"))  # class names, max length, pad id',
                'tokenizer = Tokenizer.from_file("tokenizer.json")', 'tokenizer.enable_truncation(meta["max_length"])',
                f'session = ort.InferenceSession("{onnx_file}", providers=["CPUExecutionProvider"])', "", "",
                "def classify(texts):", "    rows = [e.ids for e in tokenizer.encode_batch(texts)]",
                '    x = np.full((len(rows), max(map(len, rows))), meta["pad_token_id"], dtype=np.int64)',
                "    for i, row in enumerate(rows):", "        x[i, :len(row)] = row  # right-padded with the pad id",
                '    logits = session.run(["logits"], {"input": x})[0]',
                '    return [meta["labels"][k] for k in logits.argmax(1)]', "", "",
                'print(classify(["a text to classify"]))', "```", ""]
    for f in files:
        if f.suffix == ".onnx":
            out += [f"ONNX (`{rel(f)}`), with onnxruntime:", "", "```python", "import numpy as np, onnxruntime as ort",
                    f'session = ort.InferenceSession("{rel(f)}")',
                    f'logits = session.run(["{result.get("output_name", "logits")}"], '
                    f'{{"{result.get("input_name", "input")}": x.astype(np.{dtype})}})[0]', "```", ""]
        elif f.suffix == ".pt":
            out += [f"TorchScript (`{rel(f)}`):", "", "```python", "import torch",
                    f'model = torch.jit.load("{rel(f)}", map_location="cpu").eval()', "logits = model(x)", "```", ""]
    weights = run_dir / "checkpoints" / "best.safetensors"
    out += [f"safetensors weights of the kept epoch (`{rel(weights)}`), with kdkit (the architecture is rebuilt "
            "from the run's `config.yaml`):", "", "```python", "from kdkit.api import build_data, build_model",
            "from kdkit.config import load_config", f'cfg = load_config("{rel(run_dir / "config.yaml")}")',
            "splits = build_data(cfg.data, cfg.seed)",
            f'model = build_model((cfg.student or cfg.model).model_copy(update={{"checkpoint": "{rel(run_dir)}"}}), '
            f'splits).eval()', "```", ""]
    return out


def model_card(run_dir, cfg, report: Optional[Mapping[str, Any]], result: Mapping[str, Any], card_dir: Path) -> str:
    """The card's Markdown text (without its stamp)."""
    run_dir, report = Path(run_dir), report or {}
    run = report.get("run") or {}
    models = report.get("models") or {}
    name = "student" if "student" in models else "model" if "model" in models else next(iter(models), "student")
    m = models.get(name, {})
    teacher = run.get("teacher") or {}
    student = run.get("student") or {}
    spec = cfg.student or cfg.model
    data = run.get("data") or {}
    splits = data.get("splits") or {}
    method = run.get("method") or {"name": cfg.method.name if cfg.student else "supervised",
                                   "options": cfg.method.options() if cfg.student else {}}
    opts = ", ".join(f"{k}={v}" for k, v in (method.get("options") or {}).items())
    files = sorted(p for p in card_dir.iterdir() if p.suffix in (".onnx", ".pt") and not p.name.startswith("."))
    split = report.get("split", "test")
    lm = any(isinstance(r, Mapping) and "perplexity" in r for r in models.values())
    does = (f"Predicts the next token of text like the `{cfg.data.name}` corpus it was trained on, tokenised with its "
            "tokenizer (kdkit's run directory holds it)" if lm else
            f"Classifies inputs like those of the `{cfg.data.name}` dataset it was trained on, prepared exactly as "
            "kdkit's dataset builder prepares them")
    lines = [
        f"# Model card: {spec.name if spec else 'model'} distilled with kdkit" if cfg.student
        else f"# Model card: {spec.name if spec else 'model'} trained with kdkit", "",
        "## Intended use", "",
        f"{does}. A small, fast " + ("student of the teacher below; " if cfg.student else "model; ")
        + "use it where that teacher's accuracy on this data is enough and its cost is not. Not for inputs from "
        "another distribution, nor for decisions about people without an evaluation on that population.", "",
        "## Data", "",
        f"- Dataset: `{cfg.data.name}`; splits: " + (", ".join(f"{k} {v:,}" for k, v in splits.items())
                                                      if splits else "unknown"),
        f"- Labelled training samples: {_num(data.get('labelled_train'))} ({_pct(data.get('labelled_fraction'))})",
        f"- Augmentation: {data.get('augment') or 'none'}", "",
        "## Training procedure", "",
        f"- Method: `{method.get('name')}`" + (f" ({opts})" if opts else ""),
        f"- Teacher: {teacher.get('name') or 'none'} ({teacher.get('class', 'n/a')}, "
        f"{_num(teacher.get('parameters'))} parameters)" if teacher else "- Teacher: none",
        f"- Model: `{spec.name if spec else 'unknown'}` ({student.get('class', 'unknown')}, "
        f"{_num(student.get('parameters', m.get('parameters')))} parameters)",
        f"- Epochs: {cfg.train.epochs}; kept epoch: {report.get('kept_epoch', 'unknown')} ({cfg.train.keep}); "
        f"optimiser {cfg.train.optimizer}, lr {cfg.train.lr:g}, schedule {cfg.train.schedule}; "
        f"batch size {cfg.data.batch_size}",
        f"- Seed: {cfg.seed}; device: {run.get('device', 'unknown')}; kdkit {run.get('kdkit', 'unknown')}, "
        f"torch {run.get('torch', 'unknown')}", "",
        f"## Metrics ({split} split, from `report.json`)", "",
    ]
    lines += _metrics_table(models, lm)
    lines += ["", "## How to load", ""] + _loading(files, run_dir, card_dir, result)
    parity = result.get("parity") or {}
    lines += ["## Limitations", "",
              f"- Measured on {_num(splits.get(split))} {split} samples of `{cfg.data.name}` only; accuracy "
              "elsewhere is unknown.",
              "- A distilled model copies its teacher's mistakes as well as its knowledge (agreement above)."
              if cfg.student else "- Trained on labels only.",
              f"- Export parity: max abs difference {parity.get('max_abs_diff', 'unknown')} and arg-max agreement "
              f"{parity.get('argmax_agreement', 'unknown')} with PyTorch on {parity.get('samples', 'unknown')} "
              "test inputs" + (" (int8: quantised outputs differ by design)." if result.get("int8") else "."),
              *_accuracy_lines(result),
              "- Latency is CPU wall time on the machine that trained it; measure on yours."]
    return "\n".join(lines) + "\n"


def _metrics_table(models: Mapping[str, Any], lm: bool) -> List[str]:
    """The card's metrics table: classification figures, or perplexity and bits per byte for language models.
    The teacher's agreement with itself is not a figure: its cell reads "-"."""
    if lm:
        out = ["| model | perplexity | bits per byte | token agreement w/ teacher | parameters | bytes |",
               "|---|---:|---:|---:|---:|---:|"]
    else:
        out = ["| model | accuracy | agreement w/ teacher | ECE | parameters | bytes | latency b1 (ms) |",
               "|---|---:|---:|---:|---:|---:|---:|"]
    for key, row in models.items():
        if not isinstance(row, Mapping):
            continue
        agree = "-" if key == "teacher" else _pct(row.get("agreement"))
        if lm:
            out.append(f"| {key} | {_num(row.get('perplexity'), '{:.3f}')} | {_num(row.get('bits_per_byte'), '{:.3f}')}"
                       f" | {agree} | {_num(row.get('parameters'))} | {_num(row.get('bytes'))} |")
        else:
            out.append(f"| {key} | {_pct(row.get('accuracy'))} | {agree} | {_num(row.get('ece'), '{:.4f}')} | "
                       f"{_num(row.get('parameters'))} | {_num(row.get('bytes'))} | "
                       f"{_num(row.get('latency_ms_b1'), '{:.3f}')} |")
    return out


def _accuracy_lines(result: Mapping[str, Any]) -> List[str]:
    """The exported file's own accuracy on the test split, and the int8 bound it was held to."""
    acc = result.get("test_accuracy") or {}
    if "accuracy_file" not in acc:
        return []
    name = Path(result.get("file", "model.onnx")).name
    line = (f"- `{name}` on the {acc['samples']:,} test texts: accuracy {_pct(acc['accuracy_file'])} against "
            f"{_pct(acc['accuracy_pytorch'])} in PyTorch ({_pct(acc['prediction_agreement'])} equal predictions)")
    if "int8_within_bound" in acc:
        bound = acc["int8_max_drop_points"]
        line += (f"; an int8 drop of {acc['accuracy_drop_points']:.2f} points, within the bound of {bound:g}."
                 if acc["int8_within_bound"] else
                 f"; kept on request although its int8 drop of {acc['accuracy_drop_points']:.2f} points exceeds "
                 f"the bound of {bound:g}.")
    return [line + ("" if line.endswith(".") else ".")]


def write_model_card(run_dir, cfg, result: Mapping[str, Any]) -> Path:
    """Write (or bring up to date) ``MODEL_CARD.md`` beside ``result["file"]``; returns its path."""
    from ..training.rundir import read_json, write_text_atomic

    path = card_path(result["file"])
    check_card_writable(path)
    text = model_card(run_dir, cfg, read_json(Path(run_dir) / "report.json"), result, path.parent)
    write_text_atomic(path, text + f"\n<!-- kdkit model card, blake2b:{_digest(text)} -->\n")
    return path


__all__ = ["CARD_NAME", "card_path", "check_card_writable", "model_card", "write_model_card"]
