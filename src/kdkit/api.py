"""The Python API: ``train``, ``distill``, ``evaluate``, and running a config end to end.

    run = kdkit.distill(teacher, student, train_data, val_data, method="kd",
                        temperature=4.0, alpha=0.9, epochs=10, out_dir="runs/my-kd")
    run.metrics   # test/validation numbers of the student (and teacher)
    run.student   # the trained student (best validation weights)

Data may be a ``torch.utils.data.Dataset``, a DataLoader, an ``(x, y)`` tuple of
tensors or arrays, or a tensor of inputs alone (an unlabelled transfer set).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import yaml
from torch import nn

from .training.checkpoint import load_weights, weights_path
from .config import DataConfig, ModelConfig, RunConfig, TrainConfig, dump_config
from .data import DATASETS, ArrayData, DataSplits, as_dataset, hide_labels
from .training.distributed import dist_env
from .training.loop import History, fit, resolve_device
from .errors import KdkitError
from .evaluation.metrics import evaluate
from .methods import METHODS, Method
from .methods.build import INJECTED_METHOD_ARGS, build_method, method_temperature
from .models import create_model, resolve_factory
from .registry import call_checked, check_kwargs
from .evaluation.report import format_table, write_report
from .training.rundir import create_run_dir
from .teacher import Teacher, as_teacher


@dataclass
class Run:
    """What ``train``/``distill`` hand back.

    Attributes:
        student: the trained model, with the best validation weights loaded when a run directory was written.
        metrics: ``{"student": {...}, "teacher": {...}}`` numbers on the test split (validation when no test split).
        history: one record per epoch, as in ``metrics.jsonl``.
        dir: the run directory, if any.
    """

    student: nn.Module
    metrics: Dict[str, Dict[str, Any]]
    history: List[Dict[str, Any]] = field(default_factory=list)
    dir: Optional[Path] = None


def _split_options(options: Dict[str, Any]) -> Tuple[TrainConfig, Dict[str, Any]]:
    train_keys = set(TrainConfig.model_fields)
    train = {k: v for k, v in options.items() if k in train_keys}
    rest = {k: v for k, v in options.items() if k not in train_keys}
    try:
        return TrainConfig(**train), rest
    except Exception as e:  # pydantic ValidationError -> one line
        raise KdkitError(f"invalid training option: {str(e).splitlines()[1:3]}") from None


def check_outputs_match(teacher: nn.Module, student: nn.Module, sample: torch.Tensor) -> None:
    """Raise a clear error when teacher and student disagree on the output size (one forward on one sample)."""
    with torch.inference_mode():
        was = teacher.training, student.training
        teacher.eval(), student.eval()
        t_dev = next(teacher.parameters()).device
        s_dev = next(student.parameters()).device
        t = teacher(sample.to(t_dev))
        s = student(sample.to(s_dev))
        teacher.train(was[0]), student.train(was[1])
    if t.shape[1:] != s.shape[1:]:
        raise KdkitError(f"teacher outputs shape {tuple(t.shape[1:])} per sample but student outputs "
                         f"{tuple(s.shape[1:])}; the student's head must match the teacher's (e.g. num_classes)")


def _finish(method: Method, history: History, run_dir: Optional[Path], test_data, val_data,
            teacher: Optional[Teacher], title: str, extra: Dict[str, Any] = None) -> Run:
    student = method.student
    if run_dir is not None and (run_dir / "checkpoints" / "best.safetensors").exists():
        load_weights(student, run_dir / "checkpoints" / "best.safetensors")
    data = test_data if test_data is not None else val_data
    metrics: Dict[str, Dict[str, Any]] = {}
    if data is not None:
        student_cpu = student.to("cpu")
        if teacher is not None:
            teacher.to("cpu")
            metrics["teacher"] = evaluate(teacher.model, data)
        metrics["student"] = evaluate(student_cpu, data, teacher=teacher)
        metrics["student"]["best_epoch"] = history.best_epoch
    if run_dir is not None:
        write_report(run_dir, metrics, {"student": history.epochs}, title=title,
                     extra={"split": "test" if test_data is not None else "val", **(extra or {})})
    return Run(student=student, metrics=metrics, history=history.epochs, dir=run_dir)


def train(model: nn.Module, train_data, val_data=None, *, test_data=None, out_dir=None, seed: int = 0,
          device: str = "auto", batch_size: int = 128, resume: bool = False, **train_options: Any) -> Run:
    """Plain supervised training (cross-entropy, or MSE for float targets): teachers and baselines.

    ``train_options`` are :class:`kdkit.config.TrainConfig` fields (epochs, optimizer, lr, schedule, ...).
    """
    cfg, rest = _split_options(train_options)
    if rest:
        raise KdkitError(f"train(): unknown option {next(iter(rest))!r}; allowed: {', '.join(TrainConfig.model_fields)}")
    run_dir = create_run_dir(out_dir, resume) if out_dir is not None else None
    method = METHODS.get("supervised")(model)
    history = fit(method, as_dataset(train_data), as_dataset(val_data), cfg, run_dir=run_dir, seed=seed,
                  device=device, batch_size=batch_size, resume=resume, name="model")
    return _finish(method, history, run_dir, as_dataset(test_data), as_dataset(val_data), None, "kdkit train")


def distill(teacher: nn.Module, student: nn.Module, train_data, val_data=None, *, method: str = "kd",
            test_data=None, out_dir=None, seed: int = 0, device: str = "auto", batch_size: int = 128,
            resume: bool = False, **options: Any) -> Run:
    """Distil ``teacher`` into ``student``.

    ``options`` mix training settings (:class:`kdkit.config.TrainConfig` fields such as ``epochs``, ``lr``)
    and the method's own (for ``kd``: ``temperature``, ``alpha``); unknown keys are an error.
    """
    cfg, method_options = _split_options(options)
    if isinstance(teacher, (list, tuple)):  # several teachers: average their soft targets at the method's T
        from .teacher import TeacherEnsemble

        t = TeacherEnsemble(teacher, temperature=method_temperature(method, method_options))
    else:
        t = as_teacher(teacher)
    train_ds = as_dataset(train_data)
    first = train_ds[0]
    sample = (first["x"] if isinstance(first, dict) else first[0] if isinstance(first, (tuple, list)) else first)
    if t is not None:  # teacher-free methods (e.g. dml) take teacher=None
        check_outputs_match(t.model, student, torch.as_tensor(sample).unsqueeze(0))
    m = build_method(method, student, t, method_options, train_data=train_ds)
    run_dir = create_run_dir(out_dir, resume) if out_dir is not None else None
    history = fit(m, train_ds, as_dataset(val_data), cfg, run_dir=run_dir, seed=seed, device=device,
                  batch_size=batch_size, resume=resume, name="student")
    return _finish(m, history, run_dir, as_dataset(test_data), as_dataset(val_data), t, f"kdkit distill ({method})")


# ----------------------------------------------------------------------------- config-driven runs

def _model_spec_from_run(run_dir: Path) -> ModelConfig:
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise KdkitError(f"{run_dir} has no config.yaml, so the architecture is unknown; give the model's name too")
    raw = yaml.safe_load(cfg_path.read_text()) or {}
    spec = raw.get("model") or raw.get("student")
    if not spec or not spec.get("name"):
        raise KdkitError(f"{cfg_path} names no model")
    spec = dict(spec)
    spec["checkpoint"] = str(run_dir)
    return ModelConfig(**spec)


def resolve_model_spec(spec: ModelConfig, where: str) -> ModelConfig:
    """Fill a missing ``name`` from a checkpoint run directory; check the name and options exist."""
    if spec.name is None:
        if spec.checkpoint and Path(spec.checkpoint).is_dir():
            spec = _model_spec_from_run(Path(spec.checkpoint)).model_copy(update={**spec.options(), "checkpoint": spec.checkpoint})
        else:
            raise KdkitError(f"{where}.name is required (a model name, or a run directory as {where}.checkpoint)")
    check_kwargs(resolve_factory(spec.name), spec.options(), f"{where} {spec.name!r}", reserved=["num_classes", "input_shape"])
    if spec.checkpoint is not None:
        weights_path(spec.checkpoint)  # fails early if missing
    return spec


def build_model(spec: ModelConfig, splits: DataSplits) -> nn.Module:
    num_classes = splits.num_classes if splits.num_classes is not None else int(splits.train[0]["y"].numel())
    model = create_model(spec.name, num_classes=num_classes, input_shape=splits.input_shape, **spec.options())
    if spec.checkpoint is not None:
        load_weights(model, spec.checkpoint)
    return model


def build_data(cfg: DataConfig, seed: int = 0) -> DataSplits:
    builder = DATASETS.get(cfg.name)
    splits = call_checked(builder, cfg.options(), f"dataset {cfg.name!r}", {"seed": 0})
    if cfg.unlabelled and isinstance(splits.train, ArrayData):
        splits.train = splits.train.without_labels()
    elif cfg.labelled_fraction < 1.0 and isinstance(splits.train, ArrayData):
        splits.train = hide_labels(splits.train, cfg.labelled_fraction, seed=seed)
    if cfg.augment == "crop_flip":
        from .teacher.augment import AugmentedData, CropFlip

        if not isinstance(splits.train, ArrayData) or splits.train.x.dim() != 4:
            raise KdkitError(f"data.augment=crop_flip needs an in-memory image dataset (N, C, H, W); "
                             f"dataset {cfg.name!r} is not one")
        splits.train = AugmentedData(splits.train.x, splits.train.y,
                                     CropFlip(cfg.augment_pad, True, cfg.augment_views, seed))
    return splits


def _validate_teachers(cfg: RunConfig) -> Optional[List[ModelConfig]]:
    """Resolve a ``teachers:`` list (several teachers), or None when the config has none."""
    if not cfg.teachers:
        return None
    if cfg.teacher is not None:
        raise KdkitError("config: give either teacher (one) or teachers (a list), not both")
    weights = cfg.ensemble.weights
    if weights is not None and len(weights) != len(cfg.teachers):
        raise KdkitError(f"config: ensemble.weights has {len(weights)} entries for {len(cfg.teachers)} teachers")
    resolved = []
    for i, spec in enumerate(cfg.teachers):
        spec = resolve_model_spec(spec, f"teachers.{i}")
        if spec.checkpoint is None:
            raise KdkitError(f"config: teachers.{i}.checkpoint is required: a trained teacher's run directory or .safetensors file")
        resolved.append(spec)
    return resolved


def build_teacher(cfg: RunConfig, splits: DataSplits) -> Teacher:
    """The frozen teacher of a config: one ``teacher:``, or a :class:`TeacherEnsemble` of ``teachers:``."""
    if not cfg.teachers:
        return Teacher(build_model(cfg.teacher, splits))
    from .teacher import TeacherEnsemble

    e = cfg.ensemble
    members = [build_model(spec, splits) for spec in cfg.teachers]
    sample = splits.train[0]["x"].unsqueeze(0)
    for i, m in enumerate(members[1:], start=1):
        try:
            check_outputs_match(members[0], m, sample)
        except KdkitError as err:
            raise KdkitError(f"teachers.{i} does not match teachers.0: {err}") from None
    temperature = e.temperature if e.temperature is not None else method_temperature(cfg.method.name, cfg.method.options())
    try:
        return TeacherEnsemble(members, e.weights, e.weighting, temperature, e.combine)
    except ValueError as err:
        raise KdkitError(f"config: ensemble: {err}") from None


def validate(cfg: RunConfig, command: str) -> RunConfig:
    """Every check that needs no data or training, so a bad config fails before any work starts."""
    check_kwargs(DATASETS.get(cfg.data.name), cfg.data.options(), f"dataset {cfg.data.name!r}", reserved=["seed"])
    if command == "train":
        if cfg.model is None:
            raise KdkitError("config: `kdkit train` needs a model section (model: {name: ...})")
        cfg = cfg.model_copy(update={"model": resolve_model_spec(cfg.model, "model")})
    else:
        if cfg.student is None:
            raise KdkitError("config: `kdkit distill` needs a student section (student: {name: ...})")
        cls = METHODS.get(cfg.method.name)
        check_kwargs(cls, cfg.method.options(), f"method {cfg.method.name!r}", reserved=list(INJECTED_METHOD_ARGS))
        teacher = None
        teachers = _validate_teachers(cfg) if getattr(cls, "needs_teacher", True) else None
        if getattr(cls, "needs_teacher", True) and teachers is None:
            if cfg.teacher is None:
                raise KdkitError(f"config: method {cfg.method.name!r} needs a teacher section (teacher: {{checkpoint: RUN_DIR}})")
            teacher = resolve_model_spec(cfg.teacher, "teacher")
            if teacher.checkpoint is None:
                raise KdkitError("config: teacher.checkpoint is required: a trained teacher's run directory or .safetensors file")
        cfg = cfg.model_copy(update={"student": resolve_model_spec(cfg.student, "student"), "teacher": teacher,
                                     "teachers": teachers})
    if cfg.out_dir is None:
        raise KdkitError("config: out_dir is required (where the run directory goes)")
    resolve_device(cfg.device)
    return cfg


def run_config(cfg: RunConfig, command: str, resume: bool = False) -> Run:
    """``kdkit train`` / ``kdkit distill``: validate, build, train, evaluate, report."""
    cfg = validate(cfg, command)
    rank = dist_env()[0]  # under torchrun only rank 0 writes the run directory
    run_dir = create_run_dir(cfg.out_dir, resume) if rank == 0 else Path(cfg.out_dir)
    if not resume and rank == 0:
        (run_dir / "config.yaml").write_text(dump_config(cfg))
    splits = build_data(cfg.data, cfg.seed)
    teacher = None
    if command == "train":
        method = METHODS.get("supervised")(build_model(cfg.model, splits))
        name = "model"
    else:
        student = build_model(cfg.student, splits)
        if cfg.teacher is not None or cfg.teachers:
            teacher = build_teacher(cfg, splits)
            check_outputs_match(teacher.model, student, splits.train[0]["x"].unsqueeze(0))
        method = build_method(cfg.method.name, student, teacher, cfg.method.options(), train_data=splits.train,
                              num_classes=splits.num_classes)
        name = "student"
    history = fit(method, splits.train, splits.val, cfg.train, run_dir=run_dir, seed=cfg.seed, device=cfg.device,
                  batch_size=cfg.data.batch_size, eval_batch_size=cfg.data.eval_batch_size,
                  num_workers=cfg.data.num_workers, resume=resume, name=name)
    if rank != 0:
        return Run(student=method.student, metrics={}, history=history.epochs, dir=None)
    title = f"kdkit {command}: {cfg.data.name}" + (f", {cfg.method.name}" if command == "distill" else "")
    return _finish(method, history, run_dir, splits.test, splits.val, teacher, title,
                   extra={"dataset": cfg.data.name, "data_info": splits.info, "teacher_cache": history.teacher_cache})


def cache_config(cfg: RunConfig, log=print) -> Dict[str, Any]:
    """``kdkit cache``: precompute a distillation config's teacher outputs into a disk cache (resumable).

    The cache is written where ``train.cache_dir`` says (default ``$KDKIT_CACHE_DIR`` or
    ``~/.cache/kdkit/teacher``), in the form ``train.cache_dtype`` / ``train.cache_topk`` say; a later
    ``kdkit distill`` of the same config finds it by fingerprint and skips the teacher entirely.
    """
    from .teacher.cache import CacheSpec, build_cache
    from .teacher.plan import cache_plan

    cfg = validate(cfg.model_copy(update={"out_dir": cfg.out_dir or "(unused)"}), "distill")
    splits = build_data(cfg.data, cfg.seed)
    if cfg.teacher is None and not cfg.teachers:
        raise KdkitError(f"kdkit cache: method {cfg.method.name!r} has no teacher, so there is nothing to cache")
    teacher = build_teacher(cfg, splits)
    method = build_method(cfg.method.name, build_model(cfg.student, splits), teacher, cfg.method.options(),
                          train_data=splits.train, num_classes=splits.num_classes)
    train = cfg.train.model_copy(update={"teacher_cache": "auto"})
    mode, reason = cache_plan(method, splits.train, train)
    if mode == "off":
        raise KdkitError(f"kdkit cache: this run cannot use a teacher cache: {reason}")
    teacher.to(resolve_device(cfg.device))
    cache = build_cache(teacher.model, splits.train, CacheSpec(cfg.train.cache_dtype, cfg.train.cache_topk, "disk"),
                        cache_dir=Path(cfg.train.cache_dir) if cfg.train.cache_dir else None,
                        batch_size=cfg.data.eval_batch_size, progress=cfg.train.progress, log=log)
    return {"path": str(cache.path), "rows": len(cache), "bytes": cache.nbytes, "description": cache.describe(),
            **{k: v for k, v in cache.meta.items() if k.startswith(("topk_kl", "fp16"))}}


def evaluate_run(run_dir, split: str = "test") -> Dict[str, Dict[str, Any]]:
    """Re-evaluate a finished run's best checkpoint (and its teacher, if any) on a split."""
    from .config import load_config

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise KdkitError(f"{run_dir} is not a kdkit run directory (no config.yaml)")
    cfg = load_config(run_dir / "config.yaml")
    splits = build_data(cfg.data, cfg.seed)
    data = getattr(splits, split, None)
    if data is None:
        raise KdkitError(f"dataset {cfg.data.name!r} has no {split!r} split; use test or val")
    spec = cfg.model or cfg.student
    model = build_model(spec.model_copy(update={"checkpoint": str(run_dir)}), splits)
    metrics: Dict[str, Dict[str, Any]] = {}
    teacher = None
    if cfg.teacher is not None or cfg.teachers:
        teacher = build_teacher(cfg, splits).model
        metrics["teacher"] = evaluate(teacher, data)
    metrics["model" if cfg.model else "student"] = evaluate(model, data, teacher=teacher)
    return metrics


__all__ = ["Run", "build_data", "build_model", "distill", "evaluate", "evaluate_run", "format_table",
           "run_config", "train", "validate"]
