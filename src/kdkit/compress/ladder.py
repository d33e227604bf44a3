"""``kdkit compress CONFIG``: a chain of compression steps, each measured, written as a "compression ladder".

    data:    {name: fashion_mnist, train_subset: 20000}
    teacher: {checkpoint: runs/fm-teacher}
    student: {name: cnn_small, width: 32}      # optional: without it the teacher itself is compressed
    method:  {name: kd, temperature: 4}        # the distillation used by every recovery phase
    train:   {epochs: 3, lr: 0.003}            # settings of the recovery phases (epochs is set per step)
    compress:
      - {step: transfer, layers: every_other}  # start the student from teacher weights
      - {step: distill, epochs: 5}
      - {step: prune, sparsity: 0.5, structured: true, epochs: 2}
      - {step: lowrank, energy: 0.9, epochs: 1}
      - {step: quantize, mode: static}

Every step may end with ``epochs`` of distillation from the teacher (the one loop, :func:`kdkit.training.loop.fit`,
with the configured method) to recover accuracy. After each step the model is saved under
``steps/NN-<step>/model.safetensors`` (``model-int8.safetensors`` once quantised) and measured on the test
split: accuracy, agreement with the teacher, parameters, non-zero parameters, bytes of that file, CPU latency
at batch 1 and 256 on one thread (:func:`single_thread`). The run directory gets ``report.json``/``report.html`` with the ladder table and a plot of
accuracy against latency and size, ``model.safetensors`` (the last float model) and ``compressed.json``,
which is what :func:`load_compressed` (and ``kdkit export``) need to rebuild the compressed architecture.

Limits: an int8 model is not reloaded from ``model-int8.safetensors`` (that file is for size and shipping
inspection); ``kdkit export`` exports the last float model and quantises the ONNX graph itself with
``--int8``. After ``mode: qat`` the float model saved is the one before QAT (the QAT-trained weights live
only in the int8 model).
"""

from __future__ import annotations

import base64
import contextlib
import copy
import html
import io
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch
from torch import nn

from ..training.checkpoint import load_weights, read_tensors, save_weights, weights_path
from ..config import (DistillStep, LowRankStep, PruneStep, QuantizeStep, RunConfig, TransferStep, dump_config,
                      parse_compress_steps)
from ..errors import KdkitError
from ..evaluation.metrics import latency, predict, quality
from ..training.rundir import create_run_dir, write_json
from ..teacher import Teacher
from .lowrank import apply_edits, factorize
from .prune import count_nonzero, count_parameters, prune_structured, prune_unstructured
from .quantize import convert_qat, prepare_qat, quantize_dynamic, quantize_static, save_quantized
from .transfer import transfer_weights


@dataclass
class Ladder:
    """What :func:`run_compress` hands back.

    Attributes:
        model: the final model (int8 when the last step quantised).
        float_model: the last float model (what ``model.safetensors`` holds).
        rows: ``{"teacher": metrics, "1 distill": metrics, ...}`` in order.
        dir: the run directory.
    """

    model: nn.Module
    float_model: nn.Module
    rows: Dict[str, Dict[str, Any]]
    dir: Path
    steps: List[Dict[str, Any]] = field(default_factory=list)


def validate_compress(cfg: RunConfig) -> RunConfig:
    """Every check that needs no data or training: steps, teacher, student, method, out_dir."""
    from ..api import resolve_model_spec
    from ..data import DATASETS
    from ..training.loop import resolve_device
    from ..methods import METHODS
    from ..registry import check_kwargs

    check_kwargs(DATASETS.get(cfg.data.name), cfg.data.options(), f"dataset {cfg.data.name!r}", reserved=["seed"])
    steps = parse_compress_steps(cfg.compress)
    if not steps:
        raise KdkitError("config: `kdkit compress` needs a compress section: a list of steps such as "
                         "{step: prune, sparsity: 0.5} (steps: distill, transfer, prune, lowrank, quantize)")
    if cfg.teacher is None:
        raise KdkitError("config: `kdkit compress` needs a teacher section (teacher: {checkpoint: RUN_DIR})")
    teacher = resolve_model_spec(cfg.teacher, "teacher")
    if teacher.checkpoint is None:
        raise KdkitError("config: teacher.checkpoint is required: a trained teacher's run directory or .safetensors file")
    student = resolve_model_spec(cfg.student, "student") if cfg.student is not None else None
    if any(isinstance(s, TransferStep) for s in steps) and student is None:
        raise KdkitError("config: a transfer step needs a student section (the smaller model to initialise)")
    cls = METHODS.get(cfg.method.name)
    from ..methods.build import INJECTED_METHOD_ARGS

    check_kwargs(cls, cfg.method.options(), f"method {cfg.method.name!r}", reserved=list(INJECTED_METHOD_ARGS))
    if cfg.out_dir is None:
        raise KdkitError("config: out_dir is required (where the run directory goes)")
    resolve_device(cfg.device)
    return cfg.model_copy(update={"teacher": teacher, "student": student})


def measure(model: nn.Module, data, teacher_outputs: Optional[torch.Tensor], file: Path,
            input_shape: Sequence[int], parameters: Optional[int] = None, timing: bool = True) -> Dict[str, Any]:
    """Quality on ``data``, size of ``file`` (already written), CPU latency at batch 1 and 256."""
    pred = predict(model, data, 512, device=torch.device("cpu"))
    m: Dict[str, Any] = quality(pred["outputs"], pred.get("y"), teacher_outputs)
    m["parameters"] = parameters if parameters is not None else count_parameters(model)
    m["nonzero"] = count_nonzero(model) if parameters is None else parameters
    m["bytes"] = Path(file).stat().st_size
    if timing:
        with single_thread():
            m.update(latency(model.eval(), tuple(input_shape)))
    return m


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Time on one CPU thread: stable on a shared machine, and what one phone core or server worker gets."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _plot(rows: Dict[str, Dict[str, Any]]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    names = [n for n, r in rows.items() if "accuracy" in r]
    for ax, key, label in ((axes[0], "latency_ms_b1", "CPU latency, batch 1 (ms)"),
                           (axes[1], "bytes", "bytes on disk")):
        xs = [rows[n].get(key) for n in names]
        ys = [100 * rows[n]["accuracy"] for n in names]
        pts = [(x, y, n) for x, y, n in zip(xs, ys, names) if x is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", alpha=0.7)
        for x, y, n in pts:
            ax.annotate(n, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xscale("log")
        ax.set(xlabel=label, ylabel="test accuracy (%)")
        ax.grid(alpha=0.3)
    fig.suptitle("Compression ladder: accuracy against latency and size")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    img = base64.b64encode(buf.getvalue()).decode()
    return f'<h2>Compression ladder</h2><img alt="accuracy against latency and size" src="data:image/png;base64,{img}">'


def _step_name(i: int, step) -> str:
    detail = ""
    if isinstance(step, PruneStep):
        kind = "structured" if step.structured else "unstructured"
        detail = f" {kind} {step.sparsity:.0%}" if step.sparsity is not None else f" {kind} to {step.target_parameters:,}"
    elif isinstance(step, LowRankStep):
        detail = f" rank {step.rank}" if step.rank is not None else f" energy {step.energy:g}"
    elif isinstance(step, QuantizeStep):
        detail = f" int8 {step.mode}"
    elif isinstance(step, DistillStep):
        detail = f" {step.epochs} ep"
    elif isinstance(step, TransferStep):
        detail = f" {step.layers}"
    return f"{i}. {step.step}{detail}"


def run_compress(cfg: RunConfig) -> Ladder:
    """Validate, build teacher and starting model, run every step with its recovery phase, measure, report."""
    from ..api import build_data, build_model, check_outputs_match
    from ..methods.build import build_method
    from ..training.loop import fit
    from ..evaluation.report import format_table, write_report

    cfg = validate_compress(cfg)
    steps = parse_compress_steps(cfg.compress)
    run_dir = create_run_dir(cfg.out_dir)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    splits = build_data(cfg.data, cfg.seed)
    test = splits.test if splits.test is not None else splits.val
    input_shape = tuple(splits.input_shape)
    teacher_model = build_model(cfg.teacher, splits).eval()
    teacher = Teacher(teacher_model)
    base_spec = cfg.student if cfg.student is not None else cfg.teacher
    if cfg.student is not None:
        model = build_model(cfg.student, splits)
        check_outputs_match(teacher_model, model, splits.train[0]["x"].unsqueeze(0))
    else:
        model = copy.deepcopy(teacher_model).requires_grad_(True)
    example = torch.stack([splits.train[i]["x"] for i in range(min(4, len(splits.train)))])

    t_out = predict(teacher_model, test, 512)["outputs"]
    rows: Dict[str, Dict[str, Any]] = {}
    teacher_file = weights_path(cfg.teacher.checkpoint)
    rows["teacher"] = measure(teacher_model, test, t_out, teacher_file, input_shape)
    if cfg.student is not None:
        save_weights(model, run_dir / "steps" / "00-start" / "model.safetensors")
        rows["0. student (start)"] = measure(model, test, t_out, run_dir / "steps" / "00-start" / "model.safetensors",
                                             input_shape)
    histories: Dict[str, List[Dict[str, Any]]] = {}
    records: List[Dict[str, Any]] = []
    edits: List[Dict[str, Any]] = []

    def recover(net: nn.Module, epochs: int, lr: Optional[float], tag: str) -> nn.Module:
        """``epochs`` of distillation from the teacher with the configured method; keeps the best weights."""
        if epochs <= 0:
            return net
        update: Dict[str, Any] = {"epochs": epochs}
        if lr is not None:
            update["lr"] = lr
        train_cfg = cfg.train.model_copy(update=update)
        method = build_method(cfg.method.name, net, teacher, cfg.method.options(), train_data=splits.train,
                              num_classes=splits.num_classes)
        step_dir = run_dir / "steps" / tag
        step_dir.mkdir(parents=True, exist_ok=True)
        history = fit(method, splits.train, splits.val, train_cfg, run_dir=step_dir, seed=cfg.seed, device=cfg.device,
                      batch_size=cfg.data.batch_size, eval_batch_size=cfg.data.eval_batch_size,
                      num_workers=cfg.data.num_workers, name=tag)
        histories[tag] = history.epochs
        best = step_dir / "checkpoints" / "best.safetensors"
        if best.exists():
            load_weights(net, best)
        return net.cpu()

    final = model
    for i, step in enumerate(steps, start=1):
        tag = f"{i:02d}-{step.step}"
        t0 = time.perf_counter()
        record: Dict[str, Any] = {"step": step.model_dump(), "name": _step_name(i, step)}
        quantized = None
        if isinstance(step, DistillStep):
            model = recover(model, step.epochs, step.lr, tag)
        elif isinstance(step, TransferStep):
            record["transfer"] = {k: len(v) for k, v in transfer_weights(model, teacher_model, step.layers).items()}
            model = recover(model, step.epochs, step.lr, tag)
        elif isinstance(step, PruneStep):
            before = count_parameters(model) if step.structured else count_nonzero(model)
            target = step.target_parameters or int((1 - step.sparsity) * before)
            for it in range(step.iterations):
                current = count_parameters(model) if step.structured else count_nonzero(model)
                goal = int(current * (target / current) ** (1.0 / (step.iterations - it)))
                if step.structured:
                    model = prune_structured(model, example, target_parameters=goal)
                else:
                    prune_unstructured(model, target_parameters=goal, permanent=False)
                model = recover(model, step.epochs, step.lr, f"{tag}-{it + 1}" if step.iterations > 1 else tag)
                if not step.structured:
                    from .prune import make_permanent

                    make_permanent(model)
        elif isinstance(step, LowRankStep):
            layers = factorize(model, rank=step.rank, energy=step.energy, layers=step.layers)
            if not layers:
                raise KdkitError(f"compress[{i - 1}] (lowrank): no layer would get smaller at this rank/energy; "
                                 "lower the rank or energy, or name layers explicitly")
            edits.append({"op": "lowrank", "layers": layers})
            record["lowrank"] = layers
            model = recover(model, step.epochs, step.lr, tag)
        elif isinstance(step, QuantizeStep):
            if step.mode == "dynamic":
                quantized = quantize_dynamic(model, step.backend)
            elif step.mode == "static":
                n = min(step.calibration_samples, len(splits.train))
                calib = torch.stack([splits.train[j]["x"] for j in range(n)]) if not hasattr(splits.train, "x") \
                    else splits.train.x[:n]
                quantized = quantize_static(model, calib, step.backend)
            else:
                prepared = prepare_qat(model, example, step.backend)
                prepared = recover(prepared, step.epochs, step.lr, tag)
                quantized = convert_qat(prepared)
        record["seconds"] = time.perf_counter() - t0
        step_dir = run_dir / "steps" / tag
        step_dir.mkdir(parents=True, exist_ok=True)
        model = model.cpu().eval()
        if quantized is not None:
            file = step_dir / "model-int8.safetensors"
            save_quantized(quantized, file)
            float_params = count_parameters(model)  # an int8 model has no nn.Parameters; count the weights it holds
            rows[record["name"]] = measure(quantized, test, t_out, file, input_shape, parameters=float_params)
            final = quantized
        else:
            file = step_dir / "model.safetensors"
            save_weights(model, file)
            rows[record["name"]] = measure(model, test, t_out, file, input_shape)
            final = model
        record["metrics"] = rows[record["name"]]
        records.append(record)
        model.train()

    model.eval()
    save_weights(model, run_dir / "model.safetensors")
    last_q = next((s for s in steps if isinstance(s, QuantizeStep)), None)
    if last_q is not None:
        save_quantized(final, run_dir / "model-int8.safetensors")
    write_json(run_dir / "compressed.json", {
        "base": {"name": base_spec.name, **base_spec.options()},
        "num_classes": splits.num_classes, "input_shape": list(input_shape),
        "edits": edits, "float_weights": "model.safetensors",
        "int8_weights": "model-int8.safetensors" if last_q is not None else None,
        "quantize": last_q.model_dump() if last_q is not None else None,
    })
    summary = _summary(rows)
    write_report(run_dir, rows, histories, title=f"kdkit compress: {cfg.data.name}",
                 extra={"dataset": cfg.data.name, "ladder": records, "summary": summary, "data_info": splits.info},
                 extra_html=_plot(rows) + _summary_html(summary))
    print(format_table(rows))
    return Ladder(model=final, float_model=model, rows=rows, dir=run_dir, steps=records)


def _summary(rows: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """Teacher -> final model: size and batch-1 latency reductions and the accuracy change."""
    names = list(rows)
    t, f = rows[names[0]], rows[names[-1]]
    out: Dict[str, Any] = {"final": names[-1]}
    if t.get("bytes") and f.get("bytes"):
        out["bytes_reduction"] = t["bytes"] / f["bytes"]
    if t.get("latency_ms_b1") and f.get("latency_ms_b1"):
        out["latency_b1_speedup"] = t["latency_ms_b1"] / f["latency_ms_b1"]
    if t.get("latency_ms_b256") and f.get("latency_ms_b256"):
        out["latency_b256_speedup"] = t["latency_ms_b256"] / f["latency_ms_b256"]
    if "accuracy" in t and "accuracy" in f:
        out["accuracy_drop_points"] = 100 * (t["accuracy"] - f["accuracy"])
    return out


def _summary_html(summary: Dict[str, Any]) -> str:
    parts = []
    for key, label, fmt in (("bytes_reduction", "bytes on disk reduced", "{:.1f}x"),
                            ("latency_b1_speedup", "batch-1 CPU latency reduced", "{:.1f}x"),
                            ("latency_b256_speedup", "batch-256 CPU latency reduced", "{:.1f}x"),
                            ("accuracy_drop_points", "accuracy drop (points)", "{:.2f}")):
        if key in summary:
            parts.append(f"<li>{html.escape(label)}: {fmt.format(summary[key])}</li>")
    return f"<h2>Teacher to {html.escape(summary['final'])}</h2><ul>{''.join(parts)}</ul>"


def _resize_to(model: nn.Module, state: Dict[str, torch.Tensor]) -> None:
    """Give Linear/Conv2d/BatchNorm layers the shapes their tensors have in ``state`` (after structured pruning)."""
    from .lowrank import set_submodule

    for name, m in list(model.named_modules()):
        w = state.get(f"{name}.weight" if name else "weight")
        if w is None:
            continue
        if isinstance(m, nn.Conv2d) and w.shape != m.weight.shape:
            set_submodule(model, name, nn.Conv2d(w.shape[1] * m.groups, w.shape[0], m.kernel_size, m.stride, m.padding,
                                                 m.dilation, m.groups, bias=m.bias is not None))
        elif isinstance(m, nn.Linear) and w.shape != m.weight.shape:
            set_submodule(model, name, nn.Linear(w.shape[1], w.shape[0], bias=m.bias is not None))
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) and w.shape[0] != m.num_features:
            set_submodule(model, name, type(m)(w.shape[0], eps=m.eps, momentum=m.momentum))


def load_compressed(run_dir) -> nn.Module:
    """The last float model of a ``kdkit compress`` run, rebuilt from ``compressed.json`` and ``model.safetensors``."""
    from ..models import create_model
    from ..training.rundir import read_json

    run_dir = Path(run_dir)
    info = read_json(run_dir / "compressed.json")
    if info is None:
        raise KdkitError(f"{run_dir} is not a kdkit compress run (no compressed.json)")
    base = dict(info["base"])
    name = base.pop("name")
    model = create_model(name, num_classes=info["num_classes"], input_shape=tuple(info["input_shape"]), **base)
    for edit in info["edits"]:
        if edit["op"] == "lowrank":
            apply_edits(model, edit["layers"])
    path = run_dir / info["float_weights"]
    state = read_tensors(path)
    _resize_to(model, state)
    load_weights(model, path)
    return model.eval()


def is_compress_run(run_dir) -> bool:
    return (Path(run_dir) / "compressed.json").is_file()


__all__ = ["Ladder", "is_compress_run", "load_compressed", "measure", "run_compress", "validate_compress"]
