"""Assembling a run: a validated config (or the Python API's objects) into data, models, teacher and task.

This is the one place that turns a :class:`~kdkit.config.RunConfig` into objects; ``kdkit.api`` (train, distill,
cache, evaluate), ``kdkit compress`` and ``kdkit export`` all build through it. The run's kind of task
(:mod:`kdkit.tasks`) is chosen here, once, from the data, and handed to what needs it.

    cfg = validate(cfg, "distill")        # every check that needs no data
    parts = build_parts(cfg, "distill")   # data -> task -> student, teacher
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import torch
from torch import nn

from .config import DataConfig, ModelConfig, RunConfig, load_config
from .data import DATASETS, ArrayData, DataSplits, hide_labels
from .data.core import first_sample, teacher_view
from .errors import KdkitError
from .methods import METHODS
from .methods.build import INJECTED_METHOD_ARGS, method_temperature
from .models import INJECTED_MODEL_ARGS, create_model, resolve_factory
from .registry import call_checked, check_kwargs
from .tasks import Task, task_for
from .teacher import Teacher
from .training.checkpoint import load_weights, weights_path
from .training.loop import resolve_device
from .training.tracking import check_tracking


def check_outputs_match(teacher: nn.Module, student: nn.Module, sample: torch.Tensor,
                        teacher_sample: Optional[torch.Tensor] = None, task: Optional[Task] = None) -> None:
    """Raise a clear error when teacher and student disagree on the output size (one forward on one sample;
    ``teacher_sample``: the same sample in the teacher's own token ids, when it has its own tokenizer); what
    "disagree" means is the task's (:meth:`kdkit.tasks.base.Task.check_outputs`)."""
    with torch.inference_mode():
        was = teacher.training, student.training
        teacher.eval(), student.eval()
        t_dev = next(teacher.parameters()).device
        s_dev = next(student.parameters()).device
        t = teacher((sample if teacher_sample is None else teacher_sample).to(t_dev))
        s = student(sample.to(s_dev))
        teacher.train(was[0]), student.train(was[1])
    (task or Task()).check_outputs(t, s)



@dataclass
class Parts:
    """The objects a run trains on, built from a config (:func:`build_parts`) or given to the Python API."""

    splits: DataSplits
    model: nn.Module  # the model of `kdkit train`, or the student
    teacher: Optional[Teacher] = None
    task: Optional[Task] = None  # chosen from the data when the run is assembled (kdkit.tasks.task_for)

    def __post_init__(self) -> None:
        if self.task is None:
            self.task = task_for(self.splits)


PYTHON = "python"  # data/model names that stand for objects handed to the Python API (not rebuildable)



# ----------------------------------------------------------------------------- config-driven runs

def _model_spec_from_run(run_dir: Path) -> ModelConfig:
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise KdkitError(f"{run_dir} has no config.yaml, so the architecture is unknown; give the model's name too")
    stored = load_config(cfg_path)  # the same checks as any config: data only, never code
    spec = stored.model or stored.student
    if spec is None or not spec.name:
        raise KdkitError(f"{cfg_path} names no model")
    if spec.name.startswith(PYTHON + ":"):
        raise KdkitError(f"{run_dir} was trained from Python objects ({spec.name}); its architecture cannot be rebuilt "
                         f"from config.yaml: name the model too (e.g. teacher.name) or load it in Python")
    return spec.model_copy(update={"checkpoint": str(run_dir)})


def check_rebuildable(cfg: RunConfig, run_dir: Path, command: str) -> None:
    """Refuse, in one line, a run made from Python objects: its config.yaml cannot rebuild them."""
    specs = [s for s in (cfg.model, cfg.student) if s is not None]
    if cfg.data.name == PYTHON or any((s.name or "").startswith(PYTHON + ":") for s in specs):
        raise KdkitError(f"{run_dir} was made from Python objects (your own data or model), which its config.yaml "
                         f"cannot rebuild, so `kdkit {command}` cannot load it; from Python use "
                         + ("kdkit.export.export_model(run.student, inputs, 'model.onnx')" if command == "export"
                            else "kdkit.evaluate(run.student, data, teacher=teacher)"))


def resolve_model_spec(spec: ModelConfig, where: str) -> ModelConfig:
    """Fill a missing ``name`` from a checkpoint run directory; check the name and options exist."""
    if spec.name is None:
        if spec.checkpoint and Path(spec.checkpoint).is_dir():
            spec = _model_spec_from_run(Path(spec.checkpoint)).model_copy(
                update={**spec.options(), "checkpoint": spec.checkpoint})
        elif spec.checkpoint:
            raise KdkitError(f"{where}.checkpoint {spec.checkpoint} not found (expected a run directory or a "
                             f".safetensors file)")
        else:
            raise KdkitError(f"{where}.name is required (a model name, or a run directory as {where}.checkpoint)")
    check_kwargs(resolve_factory(spec.name), spec.options(), f"{where} {spec.name!r}",
                 reserved=list(INJECTED_MODEL_ARGS))
    if spec.checkpoint is not None:
        weights_path(spec.checkpoint)  # fails early if missing
    return spec


def build_model(spec: ModelConfig, splits: DataSplits, teacher: bool = False, task: Optional[Task] = None
                ) -> nn.Module:
    """The model a config section describes, sized to the data (``teacher``: it reads the teacher's tokens);
    ``task`` (else the splits' own) gives the factory its context (a tokenizer's vocabulary and pad id)."""
    num_classes = splits.num_classes
    if num_classes is None:  # regression: one output per target column
        num_classes = getattr(splits, "output_dim", None) or int(splits.train[0]["y"].numel())
    model = create_model(spec.name, num_classes=num_classes, input_shape=splits.input_shape,
                         context=(task or task_for(splits)).model_context(splits, teacher), **spec.options())
    if spec.checkpoint is not None:
        load_weights(model, spec.checkpoint)
    return model


def build_data(cfg: DataConfig, seed: int = 0) -> DataSplits:
    builder = DATASETS.get(cfg.name)
    splits = call_checked(builder, cfg.options(), f"dataset {cfg.name!r}", {"seed": 0})
    if cfg.unlabelled and isinstance(splits.train, ArrayData):
        splits.train = splits.train.without_labels()
    elif cfg.labelled_fraction < 1.0 and isinstance(splits.train, ArrayData):
        splits.train = hide_labels(splits.train, cfg.labelled_fraction, seed=cfg.labelled_seed)
    from .teacher.augment import augment_train

    splits.train = augment_train(splits.train, cfg, seed, cfg.name)  # crop/flip, mixup/cutmix (function matching)
    return splits


def _validate_teachers(cfg: RunConfig, resolve=None, from_python: bool = False) -> Optional[List[ModelConfig]]:
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
        spec = (resolve or resolve_model_spec)(spec, f"teachers.{i}")
        if spec.checkpoint is None and not from_python:
            raise KdkitError(f"config: teachers.{i}.checkpoint is required: a trained teacher's run directory "
                             f"or .safetensors file")
        resolved.append(spec)
    return resolved


def build_teacher(cfg: RunConfig, splits: DataSplits, task: Optional[Task] = None) -> Teacher:
    """The frozen teacher of a config: one ``teacher:``, or a :class:`TeacherEnsemble` of ``teachers:``."""
    if not cfg.teachers:
        tokenizer = cfg.method.options().get("teacher_tokenizer")
        if tokenizer is not None:  # a language-model teacher over its own vocabulary (kdkit.lm.cross)
            import copy

            from .lm.tokenizer import load_tokenizer

            vocab = load_tokenizer(tokenizer).get_vocab_size(with_added_tokens=True)
            splits = copy.copy(splits)  # the same data; the teacher's outputs span its own vocabulary
            splits.num_classes = vocab
        return Teacher(build_model(cfg.teacher, splits, teacher=True, task=task))
    from .teacher import TeacherEnsemble

    e = cfg.ensemble
    members = [build_model(spec, splits, teacher=True, task=task) for spec in cfg.teachers]
    sample = first_sample(teacher_view(splits.train)).unsqueeze(0)
    for i, m in enumerate(members[1:], start=1):
        try:
            check_outputs_match(members[0], m, sample, task=task)
        except KdkitError as err:
            raise KdkitError(f"teachers.{i} does not match teachers.0: {err}") from None
    temperature = (e.temperature if e.temperature is not None
                   else method_temperature(cfg.method.name, cfg.method.options()))
    try:
        return TeacherEnsemble(members, e.weights, e.weighting, temperature, e.combine)
    except ValueError as err:
        raise KdkitError(f"config: ensemble: {err}") from None


def validate(cfg: RunConfig, command: str, from_python: bool = False) -> RunConfig:
    """Every check that needs no data or training, so a bad config fails before any work starts.

    ``from_python``: data and models are objects handed to the Python API (named ``python:...`` in the
    resolved config), so there is no dataset or model factory to check.
    """
    if not from_python:
        check_kwargs(DATASETS.get(cfg.data.name), cfg.data.options(), f"dataset {cfg.data.name!r}", reserved=["seed"])
    resolve = (lambda spec, where: spec) if from_python else resolve_model_spec
    if command == "train":
        if cfg.model is None:
            raise KdkitError("config: `kdkit train` needs a model section (model: {name: ...})")
        cfg = cfg.model_copy(update={"model": resolve(cfg.model, "model")})
    else:
        if cfg.student is None:
            raise KdkitError("config: `kdkit distill` needs a student section (student: {name: ...})")
        cls = METHODS.get(cfg.method.name)
        check_kwargs(cls, cfg.method.options(), f"method {cfg.method.name!r}", reserved=list(INJECTED_METHOD_ARGS))
        teacher = None
        needs_teacher = getattr(cls, "needs_teacher", True)
        teachers = _validate_teachers(cfg, resolve, from_python) if needs_teacher else None
        if needs_teacher and teachers is None:
            if cfg.teacher is None:
                raise KdkitError(f"config: method {cfg.method.name!r} needs a teacher section "
                                 f"(teacher: {{checkpoint: RUN_DIR}})")
            teacher = resolve(cfg.teacher, "teacher")
            if teacher.checkpoint is None and not from_python:
                raise KdkitError("config: teacher.checkpoint is required: a trained teacher's run directory "
                                 "or .safetensors file")
        cfg = cfg.model_copy(update={"student": resolve(cfg.student, "student"), "teacher": teacher,
                                     "teachers": teachers})
    if cfg.out_dir is None and not from_python:
        raise KdkitError("config: out_dir is required (where the run directory goes)")
    check_tracking(cfg.tracking, cfg.out_dir)
    resolve_device(cfg.device)
    return cfg


def build_parts(cfg: RunConfig, command: str) -> Parts:
    """Data, model (or student) and teacher of a validated config; call after seeding."""
    splits = build_data(cfg.data, cfg.seed)
    task = task_for(splits)
    if command == "train":
        return Parts(splits, build_model(cfg.model, splits, task=task), task=task)
    student = build_model(cfg.student, splits, task=task)
    teacher = build_teacher(cfg, splits, task) if (cfg.teacher is not None or cfg.teachers) else None
    return Parts(splits, student, teacher, task)


__all__ = ["PYTHON", "Parts", "build_data", "build_model", "build_parts", "build_teacher", "check_outputs_match",
           "check_rebuildable",
           "resolve_model_spec", "validate"]
