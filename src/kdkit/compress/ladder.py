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
at batch 1 and 256 on one thread (:func:`single_thread`). The run directory gets ``report.json``/``report.html``
with the ladder table and a plot of accuracy against latency and size, ``model.safetensors`` (the last float model)
and ``compressed.json``, which is what :func:`load_compressed` (and ``kdkit export``) need to rebuild the
compressed architecture.

Before the run directory is created, every step is dry-run on a copy of the starting model
(:func:`check_steps`; each step type's handler is in :mod:`kdkit.compress.steps`), and the run's seed is set
before the starting model is built and before each step, so the same config gives the same files.

Limits: an int8 model is not loaded back from ``model-int8.safetensors`` (that file is for size and shipping
inspection); :func:`evaluate_compressed` (``kdkit evaluate``) quantises the float model again and checks the
result against it. ``kdkit export`` exports the last float model and quantises the ONNX graph itself with
``--int8``. After ``mode: qat`` the float model saved is the one before QAT (the QAT-trained weights live
only in the int8 model).
"""

from __future__ import annotations

import copy
import html
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..config import ModelConfig, QuantizeStep, RunConfig, dump_config, parse_compress_steps
from ..errors import KdkitError
from ..evaluation.metrics import latency, predict, quality
from ..teacher import Teacher
from ..training.checkpoint import load_weights, read_tensors, save_weights, weights_path
from ..training.rundir import create_run_dir, read_json, write_json, write_text_atomic
from ..training.threads import single_thread
from .lowrank import apply_edits
from .prune import count_nonzero, count_parameters
from .quantize import quantized_tensors, save_quantized
from .steps import HANDLERS, Outcome, StepContext, no_recovery, quantize_like


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
    from ..assemble import resolve_model_spec
    from ..data import DATASETS
    from ..methods import METHODS
    from ..registry import check_kwargs
    from ..training.loop import resolve_device

    check_kwargs(DATASETS.get(cfg.data.name), cfg.data.options(), f"dataset {cfg.data.name!r}", reserved=["seed"])
    steps = parse_compress_steps(cfg.compress)
    if not steps:
        raise KdkitError("config: `kdkit compress` needs a compress section: a list of steps such as "
                         "{step: prune, sparsity: 0.5} (steps: distill, transfer, prune, lowrank, quantize)")
    if cfg.teacher is None:
        raise KdkitError("config: `kdkit compress` needs a teacher section (teacher: {checkpoint: RUN_DIR})")
    teacher = resolve_model_spec(cfg.teacher, "teacher")
    if teacher.checkpoint is None:
        raise KdkitError("config: teacher.checkpoint is required: a trained teacher's run directory "
                         "or .safetensors file")
    student = resolve_model_spec(cfg.student, "student") if cfg.student is not None else None
    if any(s.step == "transfer" for s in steps) and student is None:
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


def _plot(rows: Dict[str, Dict[str, Any]]) -> str:
    from ..evaluation.plots import ladder_html  # one marker per step, named in a legend: no overlapping labels

    return ladder_html(rows)


@dataclass
class _Setup:
    """Everything a ladder is built from, made before the run directory exists."""

    splits: Any
    test: Any  # the split every step is measured on (test, else validation)
    input_shape: Tuple[int, ...]
    teacher: Teacher
    model: nn.Module  # the model the first step starts from
    base_spec: ModelConfig  # the architecture compressed.json rebuilds from
    example: torch.Tensor  # (B <= 4, ...) training inputs that trace layer dependencies
    task: Any = None  # the kind of task (kdkit.tasks), chosen from the data


def _setup(cfg: RunConfig) -> _Setup:
    """Data, teacher and starting model (the student, or a trainable copy of the teacher); call after seeding."""
    from ..assemble import build_data, build_model, check_outputs_match
    from ..tasks import task_for

    splits = build_data(cfg.data, cfg.seed)
    task = task_for(splits)
    teacher_model = build_model(cfg.teacher, splits, task=task).eval()
    if cfg.student is not None:
        model = build_model(cfg.student, splits, task=task)
        check_outputs_match(teacher_model, model, splits.train[0]["x"].unsqueeze(0), task=task)
    else:
        model = copy.deepcopy(teacher_model).requires_grad_(True)
    example = torch.stack([splits.train[i]["x"] for i in range(min(4, len(splits.train)))])
    return _Setup(splits=splits, test=splits.test if splits.test is not None else splits.val,
                  input_shape=tuple(splits.input_shape), teacher=Teacher(teacher_model), model=model,
                  base_spec=cfg.student if cfg.student is not None else cfg.teacher, example=example, task=task)


def _context(setup: _Setup, recover, index: int = 0, step=None) -> StepContext:
    where = f"compress[{index - 1}] ({step.step})" if step is not None else ""
    tag = f"{index:02d}-{step.step}" if step is not None else ""
    return StepContext(teacher=setup.teacher.model, train_data=setup.splits.train, example=setup.example,
                       recover=recover, where=where, tag=tag)


def check_steps(steps: Sequence[Any], setup: _Setup) -> None:
    """Dry-run every step on a copy of the starting model, without training: a step the model cannot take
    fails here, before the run directory is created, not after the steps before it have trained."""
    model = setup.model
    for i, step in enumerate(steps, start=1):
        model = HANDLERS[step.step].check(step, model, _context(setup, no_recovery, i, step))


class _Recovery:
    """Recovery distillation from the teacher with the configured method (the one loop, :func:`fit`)."""

    def __init__(self, cfg: RunConfig, setup: _Setup, run_dir: Path) -> None:
        self.cfg, self.setup, self.run_dir = cfg, setup, run_dir
        self.histories: Dict[str, List[Dict[str, Any]]] = {}

    def __call__(self, net: nn.Module, epochs: int, lr: Optional[float], tag: str) -> nn.Module:
        """``epochs`` of distillation into ``net``; returns it (on the CPU) with the kept epoch's weights."""
        from ..methods.build import build_method
        from ..training.loop import fit

        if epochs <= 0:
            return net
        cfg, splits = self.cfg, self.setup.splits
        train_cfg = cfg.train.model_copy(update={"epochs": epochs, **({"lr": lr} if lr is not None else {})})
        method = build_method(cfg.method.name, net, self.setup.teacher, cfg.method.options(),
                              train_data=splits.train, num_classes=splits.num_classes)
        step_dir = self.run_dir / "steps" / tag
        step_dir.mkdir(parents=True, exist_ok=True)
        history = fit(method, splits.train, splits.val, train_cfg, run_dir=step_dir, seed=cfg.seed, device=cfg.device,
                      batch_size=cfg.data.batch_size, eval_batch_size=cfg.data.eval_batch_size,
                      num_workers=cfg.data.num_workers, name=tag, task=self.setup.task)
        self.histories[tag] = history.epochs
        best = step_dir / "checkpoints" / "best.safetensors"
        if best.exists():
            load_weights(net, best)
        return net.cpu()


def _save_and_measure(outcome: Outcome, step_dir: Path, setup: _Setup, t_out: torch.Tensor) -> Dict[str, Any]:
    """Write the step's model (int8 when it quantised) and measure it from that file."""
    step_dir.mkdir(parents=True, exist_ok=True)
    model = outcome.model.cpu().eval()
    if outcome.quantized is not None:
        file = step_dir / "model-int8.safetensors"
        save_quantized(outcome.quantized, file)
        # an int8 model has no nn.Parameters; count the weights it holds
        return measure(outcome.quantized, setup.test, t_out, file, setup.input_shape,
                       parameters=count_parameters(model))
    file = step_dir / "model.safetensors"
    save_weights(model, file)
    return measure(model, setup.test, t_out, file, setup.input_shape)


def run_compress(cfg: RunConfig) -> Ladder:
    """``kdkit compress``: validate and set up, dry-run the steps, then for each step apply it (with its
    recovery), save and measure it; write compressed.json and the report.

    Everything random comes from ``cfg.seed``: it is set before the starting model is built and again before
    each step, so two processes with the same config give the same weights (CPU, same thread count).
    """
    from ..evaluation.report import format_table, write_report
    from ..training.loop import seed_everything
    from ..training.threads import apply_threads

    cfg = validate_compress(cfg)
    steps = parse_compress_steps(cfg.compress)
    apply_threads(cfg.train.threads)
    seed_everything(cfg.seed)  # before the student (or anything random) is built
    setup = _setup(cfg)
    check_steps(steps, setup)
    run_dir = create_run_dir(cfg.out_dir)  # nothing is written before every check above has passed
    write_text_atomic(run_dir / "config.yaml", dump_config(cfg))

    t_out = predict(setup.teacher.model, setup.test, 512)["outputs"]
    rows: Dict[str, Dict[str, Any]] = {"teacher": measure(setup.teacher.model, setup.test, t_out,
                                                         weights_path(cfg.teacher.checkpoint), setup.input_shape)}
    if cfg.student is not None:
        rows["0. student (start)"] = _save_and_measure(Outcome(setup.model), run_dir / "steps" / "00-start",
                                                       setup, t_out)
    recover = _Recovery(cfg, setup, run_dir)
    model, final, records, edits = setup.model, setup.model, [], []
    for i, step in enumerate(steps, start=1):
        seed_everything(cfg.seed)  # a step's randomness does not depend on what the steps before it drew
        ctx = _context(setup, recover, i, step)
        t0 = time.perf_counter()
        outcome = HANDLERS[step.step].apply(step, model, ctx)
        record: Dict[str, Any] = {"step": step.model_dump(), "name": f"{i}. {step.describe()}", **outcome.details,
                                  "seconds": time.perf_counter() - t0}
        rows[record["name"]] = record["metrics"] = _save_and_measure(outcome, run_dir / "steps" / ctx.tag, setup, t_out)
        records.append(record)
        edits += [outcome.edit] if outcome.edit is not None else []
        model = outcome.model.train()
        final = outcome.quantized if outcome.quantized is not None else outcome.model

    model.eval()
    _save_final(run_dir, setup, model, final, steps, edits)
    summary = _summary(rows)
    from ..evaluation.report import run_info

    write_report(run_dir, rows, recover.histories, title=f"kdkit compress: {cfg.data.name}",
                 extra={"dataset": cfg.data.name, "ladder": records, "summary": summary,
                        "data_info": setup.splits.info, "headline": _headline(summary),
                        "run": {**run_info(cfg, student=model, teacher=setup.teacher, splits=setup.splits,
                                           command="compress"),
                                "method": {"name": "compress", "options": {
                                    "steps": " -> ".join(r["name"] for r in records)}}}},
                 extra_html=_plot(rows) + _summary_html(summary))
    print(format_table(rows))
    return Ladder(model=final, float_model=model, rows=rows, dir=run_dir, steps=records)


def _save_final(run_dir: Path, setup: _Setup, model: nn.Module, final: nn.Module, steps: Sequence[Any],
                edits: List[Dict[str, Any]]) -> None:
    """``model.safetensors`` (last float model), ``model-int8.safetensors`` and ``compressed.json``."""
    save_weights(model, run_dir / "model.safetensors")
    last_q = next((s for s in steps if s.step == "quantize"), None)
    if last_q is not None:
        save_quantized(final, run_dir / "model-int8.safetensors")
    write_json(run_dir / "compressed.json", {
        "base": {"name": setup.base_spec.name, **setup.base_spec.options()},
        "num_classes": setup.splits.num_classes, "input_shape": list(setup.input_shape),
        "edits": edits, "float_weights": "model.safetensors",
        "int8_weights": "model-int8.safetensors" if last_q is not None else None,
        "quantize": last_q.model_dump() if last_q is not None else None,
    })


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


def _headline(summary: Dict[str, Any]) -> str:
    """The ladder's result in a sentence."""
    parts = []
    if "bytes_reduction" in summary:
        parts.append(f"{summary['bytes_reduction']:.1f}x smaller on disk")
    if "latency_b1_speedup" in summary:
        parts.append(f"{summary['latency_b1_speedup']:.1f}x faster at batch 1")
    text = f"The last step ({summary['final']}) is " + (" and ".join(parts) or "measured") + " than the teacher"
    if "accuracy_drop_points" in summary:
        drop = summary["accuracy_drop_points"]
        text += f", {abs(drop):.2f} accuracy points {'below' if drop >= 0 else 'above'} it"
    return text + "."


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


def evaluate_compressed(run_dir, splits, data, teacher: Optional[nn.Module] = None) -> Dict[str, Dict[str, Any]]:
    """``kdkit evaluate`` of a compress run: its last float model and, when it ended with a ``dynamic`` or
    ``static`` quantize step, its int8 model, measured on ``data`` as the ladder measured them.

    The int8 model is rebuilt by quantising the float model again (calibrated on the same first training
    samples), and checked against ``model-int8.safetensors``: a mismatch is an error, not a silent new model.
    After ``mode: qat`` only the float model (the one before QAT) can be evaluated.

    Returns:
        ``{"compressed (float)": metrics, "compressed (int8)": metrics}`` (the second only when rebuildable).
    """
    run_dir = Path(run_dir)
    info = read_json(run_dir / "compressed.json")
    model = load_compressed(run_dir)
    t_out = predict(teacher, data, 512)["outputs"] if teacher is not None else None
    shape = tuple(info["input_shape"])
    quantized = info.get("quantize")
    name = "compressed (float, before QAT)" if quantized and quantized["mode"] == "qat" else "compressed (float)"
    out = {name: measure(model, data, t_out, run_dir / info["float_weights"], shape)}
    if quantized and quantized["mode"] != "qat":
        step = QuantizeStep.model_validate(quantized)
        int8 = quantize_like(step, model, splits.train)
        file = run_dir / info["int8_weights"]
        rebuilt, saved = quantized_tensors(int8)[0], read_tensors(file)
        if rebuilt.keys() != saved.keys() or any(not torch.equal(t, saved[k]) for k, t in rebuilt.items()):
            raise KdkitError(f"{file}: the int8 model rebuilt from {info['float_weights']} does not match it; "
                             "was the run directory edited, or the data changed?")
        out["compressed (int8)"] = measure(int8, data, t_out, file, shape, parameters=count_parameters(model))
    return out


__all__ = ["Ladder", "evaluate_compressed", "is_compress_run", "load_compressed", "measure", "run_compress",
           "validate_compress"]
