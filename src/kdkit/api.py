"""The Python API: ``train``, ``distill``, ``evaluate``, and running a config end to end.

    run = kdkit.distill(teacher, student, train_data, val_data, method="kd",
                        temperature=4.0, alpha=0.9, epochs=10, out_dir="runs/my-kd")
    run.metrics   # test/validation numbers of the student (and teacher)
    run.student   # the trained student (best validation weights)

Data may be a ``torch.utils.data.Dataset``, a DataLoader, an ``(x, y)`` tuple of
tensors or arrays, or a tensor of inputs alone (an unlabelled transfer set). For text models
with a tokenizer (``kdkit.hf.load``), data may also be raw ``(texts, labels)`` or a list of texts:
they are tokenised with the student's tokenizer (and the teacher's, when it has another one),
at most 128 tokens; :func:`kdkit.hf.text.tokenize` gives full control.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from .config import DataConfig, ModelConfig, RunConfig, TrainConfig, dump_config, flatten, load_config
from .data import DATASETS, ArrayData, DataSplits, as_dataset, hide_labels
from .data.core import check_targets, first_sample, teacher_view
from .errors import KdkitError
from .evaluation.metrics import evaluate
from .evaluation.report import format_table, run_info, write_report
from .methods import METHODS, Method
from .methods.build import INJECTED_METHOD_ARGS, build_method, example_batch_of, method_temperature
from .models import INJECTED_MODEL_ARGS, create_model, resolve_factory
from .registry import call_checked, check_kwargs
from .teacher import Teacher, as_teacher
from .training.checkpoint import load_weights, weights_path
from .training.distributed import dist_env
from .training.loop import History, fit, resolve_device, seed_everything
from .training.rundir import create_run_dir, write_text_atomic
from .training.threads import apply_threads
from .training.tracking import Tracking, check_tracking


@dataclass
class Run:
    """What ``train``/``distill`` hand back.

    Attributes:
        student: the trained model, with the kept weights loaded (``train.keep``: best validation score by
            default, see :class:`kdkit.training.loop.Keeper`), with or without a run directory.
        metrics: ``{"student": {...}, "teacher": {...}}`` numbers on the test split (validation when no test
            split); ``metrics["student"]["kept_epoch"]`` says whose weights they are.
        history: one record per epoch, as in ``metrics.jsonl``.
        dir: the run directory, if any.
        config: the resolved run description (what ``config.yaml`` holds).
    """

    student: nn.Module
    metrics: Dict[str, Dict[str, Any]]
    history: List[Dict[str, Any]] = field(default_factory=list)
    dir: Optional[Path] = None
    config: Optional[RunConfig] = None


def check_outputs_match(teacher: nn.Module, student: nn.Module, sample: torch.Tensor,
                        teacher_sample: Optional[torch.Tensor] = None) -> None:
    """Raise a clear error when teacher and student disagree on the output size (one forward on one sample;
    ``teacher_sample``: the same sample in the teacher's own token ids, when it has its own tokenizer)."""
    with torch.inference_mode():
        was = teacher.training, student.training
        teacher.eval(), student.eval()
        t_dev = next(teacher.parameters()).device
        s_dev = next(student.parameters()).device
        t = teacher((sample if teacher_sample is None else teacher_sample).to(t_dev))
        s = student(sample.to(s_dev))
        teacher.train(was[0]), student.train(was[1])
    if t.dim() == 3 and s.dim() == 3 and t.shape[-1] != s.shape[-1]:  # causal LMs: (B, L, V) next-token logits
        raise KdkitError(f"teacher vocabulary has {t.shape[-1]} tokens but the student's has {s.shape[-1]}; "
                         f"token-level distillation needs one shared tokenizer (mapping between vocabularies is not "
                         f"supported by kdkit)")
    if t.shape[1:] != s.shape[1:]:
        raise KdkitError(f"teacher outputs shape {tuple(t.shape[1:])} per sample but student outputs "
                         f"{tuple(s.shape[1:])}; the student's head must match the teacher's (e.g. num_classes)")


# ----------------------------------------------------------------------------- one way to assemble a run

@dataclass
class Parts:
    """The objects a run trains on, built from a config (:func:`build_parts`) or given to the Python API."""

    splits: DataSplits
    model: nn.Module  # the model of `kdkit train`, or the student
    teacher: Optional[Teacher] = None


PYTHON = "python"  # data/model names that stand for objects handed to the Python API (not rebuildable)


def _python_name(obj: Any) -> str:
    return f"{PYTHON}:{type(obj).__name__}"


def _api_config(command: str, model: nn.Module, teacher: Any, method: str, options: Dict[str, Any], *,
                seed: int, device: str, batch_size: int, out_dir) -> RunConfig:
    """The Python API's keyword arguments as the same resolved run description a YAML config gives."""
    train_keys = set(TrainConfig.model_fields)
    train = {k: v for k, v in options.items() if k in train_keys}
    method_options = {k: v for k, v in options.items() if k not in train_keys and k != "tracking"}
    if command == "train" and method_options:
        raise KdkitError(f"train(): unknown option {next(iter(method_options))!r}; "
                         f"allowed: {', '.join(TrainConfig.model_fields)}")
    raw: Dict[str, Any] = {"seed": seed, "device": device, "out_dir": None if out_dir is None else str(out_dir),
                           "data": {"name": PYTHON, "batch_size": batch_size}, "train": train}
    if "tracking" in options:  # tracking="mlflow" or a dict, as in a config's tracking section
        raw["tracking"] = options["tracking"]
    if command == "train":
        raw["model"] = {"name": _python_name(model)}
    else:
        raw["student"] = {"name": _python_name(model)}
        raw["method"] = {"name": method, **method_options}
        if isinstance(teacher, (list, tuple)):
            raw["teachers"] = [{"name": _python_name(t)} for t in teacher]
        elif teacher is not None:
            raw["teacher"] = {"name": _python_name(teacher)}
    return load_config(raw)


def _is_raw_text(data: Any) -> bool:
    """``(texts, labels)`` or a bare list of texts: raw strings the API tokenises itself."""
    texts = data[0] if isinstance(data, tuple) and len(data) in (1, 2) else data
    return isinstance(texts, (list, tuple)) and len(texts) > 0 and all(isinstance(t, str) for t in texts)


def _tokenised(data: Any, split: str, student: nn.Module, teacher: Any) -> Any:
    """Raw texts tokenised with the student's tokenizer (and the teacher's, when it has another one)."""
    if data is None or not _is_raw_text(data):
        return data
    from .hf.text import tokenize

    tok = getattr(student, "tokenizer", None)
    if tok is None:
        raise KdkitError(f"{split} data is raw text but the model has no tokenizer (model.tokenizer); tokenise it "
                         f"first with kdkit.hf.text.tokenize, or use a model from kdkit.hf.load")
    t_model = getattr(teacher, "model", teacher)
    t_tok = getattr(t_model, "tokenizer", None) if isinstance(t_model, nn.Module) else None
    texts, labels = (data[0], data[1] if len(data) == 2 else None) if isinstance(data, tuple) else (data, None)
    max_length = int(getattr(getattr(getattr(student, "hf", None), "config", None), "max_position_embeddings", 128))
    return tokenize(list(texts), labels, tok, min(max_length, 128), teacher_tokenizer=t_tok, log=lambda _: None)


def _api_splits(train_data, val_data, test_data, model: Optional[nn.Module] = None, teacher: Any = None
                ) -> DataSplits:
    if model is not None:
        train_data, val_data, test_data = (_tokenised(d, s, model, teacher) for d, s in
                                           ((train_data, "train"), (val_data, "val"), (test_data, "test")))
    train = as_dataset(train_data, "train")
    return DataSplits(train=train, val=as_dataset(val_data, "val"), test=as_dataset(test_data, "test"),
                      num_classes=None, input_shape=tuple(first_sample(train).shape))


def train(model: nn.Module, train_data, val_data=None, *, test_data=None, out_dir=None, seed: int = 0,
          device: str = "auto", batch_size: int = 128, resume: bool = False, **train_options: Any) -> Run:
    """Plain supervised training (cross-entropy, or MSE for float targets): teachers and baselines.

    ``train_options`` are :class:`kdkit.config.TrainConfig` fields (epochs, optimizer, lr, schedule, ...),
    and ``tracking`` (``"mlflow"`` or a dict, as a config's ``tracking:`` section).
    The run is described, validated, seeded and saved exactly as ``kdkit train CONFIG`` does; with
    ``out_dir`` it writes ``config.yaml`` and ``resume=True`` continues it.
    """
    cfg = _api_config("train", model, None, "supervised", train_options, seed=seed, device=device,
                      batch_size=batch_size, out_dir=out_dir)
    return execute(cfg, "train", resume, Parts(_api_splits(train_data, val_data, test_data, model), model))


def distill(teacher: nn.Module, student: nn.Module, train_data, val_data=None, *, method: str = "kd",
            test_data=None, out_dir=None, seed: int = 0, device: str = "auto", batch_size: int = 128,
            resume: bool = False, **options: Any) -> Run:
    """Distil ``teacher`` (a module, a :class:`Teacher`, or a list of them: an ensemble) into ``student``.

    ``options`` mix training settings (:class:`kdkit.config.TrainConfig` fields such as ``epochs``, ``lr``)
    and the method's own (for ``kd``: ``temperature``, ``alpha``); unknown keys are an error. ``tracking``
    is a config's ``tracking:`` section (``"mlflow"`` or a dict).
    """
    cfg = _api_config("distill", student, teacher, method, options, seed=seed, device=device,
                      batch_size=batch_size, out_dir=out_dir)
    if isinstance(teacher, (list, tuple)):  # several teachers: average their soft targets at the method's T
        from .teacher import TeacherEnsemble

        t = TeacherEnsemble(teacher, temperature=method_temperature(method, cfg.method.options()))
    else:
        t = as_teacher(teacher)
    return execute(cfg, "distill", resume,
                   Parts(_api_splits(train_data, val_data, test_data, student, teacher), student, t))


def execute(cfg: RunConfig, command: str, resume: bool = False, given: Optional[Parts] = None) -> Run:
    """Run ``kdkit train``/``kdkit distill``: the one path for configs and the Python API alike.

    validate -> (resume: the stored config must match) -> threads, seed -> build data, models, teacher,
    method (every value checked) -> create the run directory, write config.yaml -> fit -> evaluate, report.
    Nothing is written before everything that can be checked without training has been.
    """
    started = time.perf_counter()
    cfg = validate(cfg, command, from_python=given is not None)
    if resume:
        _check_resume(cfg)
    apply_threads(cfg.train.threads)
    seed_everything(cfg.seed)  # before any model, connector, head or subset is built
    parts = given if given is not None else build_parts(cfg, command)
    method = _build_run_method(cfg, command, parts)
    rank = dist_env()[0]  # under torchrun only rank 0 writes the run directory (and tracks)
    tracking = Tracking.from_config(cfg.tracking, enabled=rank == 0)
    run_dir = None
    if cfg.out_dir is not None:
        run_dir = create_run_dir(cfg.out_dir, resume) if rank == 0 else Path(cfg.out_dir)
        if not resume and rank == 0:
            write_text_atomic(run_dir / "config.yaml", dump_config(cfg))
    splits = parts.splits
    with tracking.session(run_dir if rank == 0 else None, flatten(cfg.model_dump(mode="json")), resume):
        history = fit(method, splits.train, splits.val, cfg.train, run_dir=run_dir, seed=cfg.seed, device=cfg.device,
                      batch_size=cfg.data.batch_size, eval_batch_size=cfg.data.eval_batch_size,
                      num_workers=cfg.data.num_workers, resume=resume,
                      name="model" if command == "train" else "student", tracking=tracking)
        if rank != 0:
            return Run(student=method.student, metrics={}, history=history.epochs, dir=None, config=cfg)
        title = f"kdkit {command}: {cfg.data.name}" + (f", {cfg.method.name}" if command == "distill" else "")
        wall = time.perf_counter() - started
        run = _finish(cfg, method, history, run_dir, splits, parts.teacher, title, command=command, wall=wall)
        if run_dir is not None:
            tracking.log_results(run_dir, run.metrics)
    return run


def _check_resume(cfg: RunConfig) -> None:
    """A resumed run continues with the settings it started with: refuse a config that differs from config.yaml."""
    if cfg.out_dir is None:
        raise KdkitError("resume needs the run directory: give out_dir (the one the interrupted run wrote)")
    stored_path = Path(cfg.out_dir) / "config.yaml"
    if not stored_path.is_file():
        raise KdkitError(f"cannot resume: {cfg.out_dir} is not a kdkit run directory (no config.yaml)")
    stored = flatten(load_config(stored_path).model_dump(mode="json"))
    given = flatten(cfg.model_dump(mode="json"))
    # how the run is watched or scheduled, not what it computes
    ignored = {"train.progress", "train.quiet", "train.threads"}
    for key in sorted(set(stored) | set(given)):
        if key not in ignored and stored.get(key) != given.get(key):
            raise KdkitError(f"cannot resume {cfg.out_dir}: its config.yaml has {key}={stored.get(key)!r} but this "
                             f"run asks for {given.get(key)!r}; a resumed run keeps its settings (start a new run "
                             f"to change them)")


def _build_run_method(cfg: RunConfig, command: str, parts: Parts) -> Method:
    """The method of the run (``supervised`` for ``kdkit train``), its options checked."""
    splits = parts.splits
    _check_text_fit(parts.model, parts.teacher, splits)
    _check_labels_fit(parts.model, splits)
    if command == "train":
        batch = example_batch_of(splits.train)
        if batch is None or "y" not in batch:
            raise KdkitError("kdkit train needs labelled training data (targets y); for an unlabelled transfer set "
                             "use kdkit distill with a teacher")
        return METHODS.get("supervised")(parts.model)
    if parts.teacher is not None:
        check_outputs_match(parts.teacher.model, parts.model, first_sample(splits.train).unsqueeze(0),
                            first_sample(teacher_view(splits.train)).unsqueeze(0))
    return build_method(cfg.method.name, parts.model, parts.teacher, cfg.method.options(), train_data=splits.train,
                        num_classes=splits.num_classes)


def _check_text_fit(model: nn.Module, teacher: Optional[Teacher], splits: DataSplits) -> None:
    """Tokenised text: pad ids, vocabulary and label count of the student and teacher match their data."""
    from .data.text import check_text_model

    for name in ("train", "val", "test"):
        data = getattr(splits, name)
        if data is None:
            continue
        check_text_model(model, data, f"{name} split", splits.num_classes)
        if teacher is not None and hasattr(teacher, "model"):
            check_text_model(teacher.model, teacher_view(data), f"teacher on the {name} split", splits.num_classes)


def _check_labels_fit(model: nn.Module, splits: DataSplits) -> None:
    """Class labels beyond the model's outputs fail now, not after training (a test label of 10 for 10 outputs)."""
    with torch.inference_mode():
        was = model.training
        out = model.eval()(first_sample(splits.train).unsqueeze(0).to(next(model.parameters()).device))
        model.train(was)
    classes = int(out.shape[-1]) if out.dim() == 2 else None
    for name in ("train", "val", "test"):
        data = getattr(splits, name)
        if data is not None:
            check_targets(data, name, classes if splits.num_classes is None else splits.num_classes)


def _finish(cfg: RunConfig, method: Method, history: History, run_dir: Optional[Path], splits: DataSplits,
            teacher: Optional[Teacher], title: str, command: str = "distill", wall: Optional[float] = None) -> Run:
    """Load the kept weights, evaluate on the test split (else validation), write the report."""
    student = method.student
    device = next(student.parameters()).device if any(True for _ in student.parameters()) else None
    if run_dir is not None and (run_dir / "checkpoints" / "best.safetensors").exists():
        load_weights(student, run_dir / "checkpoints" / "best.safetensors")
    elif history.kept_state is not None:
        student.load_state_dict(history.kept_state)
    data = splits.test if splits.test is not None else splits.val
    metrics: Dict[str, Dict[str, Any]] = {}
    if data is not None:
        student_cpu = student.to("cpu")
        if teacher is not None:
            teacher.to("cpu")
            metrics["teacher"] = evaluate(teacher.model, teacher_view(data))
        metrics["student"] = evaluate(student_cpu, data, teacher=teacher)
        metrics["student"]["kept_epoch"] = history.best_epoch
    if run_dir is not None:
        extra = {"split": "test" if splits.test is not None else "val", "dataset": cfg.data.name,
                 "data_info": splits.info, "teacher_cache": history.teacher_cache,
                 "kept_epoch": history.best_epoch, "epochs": cfg.train.epochs, "keep": cfg.train.keep,
                 "run": run_info(cfg, student=student, teacher=teacher, splits=splits, device=device,
                                 wall_seconds=wall, command=command,
                                 teacher_val_accuracy=_teacher_val_accuracy(teacher, splits.val))}
        write_report(run_dir, metrics, {"student": history.epochs}, title=title, extra=extra)
    return Run(student=student, metrics=metrics, history=history.epochs, dir=run_dir, config=cfg)


def _teacher_val_accuracy(teacher: Optional[Teacher], val) -> Optional[float]:
    """The teacher's validation accuracy: the reference line of the report's accuracy curves."""
    if teacher is None or val is None or not hasattr(teacher, "model"):
        return None
    from .evaluation.metrics import predict, quality

    try:
        pred = predict(teacher.model, val, 512)
    except (RuntimeError, TypeError, ValueError):  # a user loader kdkit cannot batch again: no reference line
        return None
    return quality(pred["outputs"], pred.get("y")).get("accuracy") if pred.get("y") is not None else None


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


def _text_context(splits: DataSplits, teacher: bool) -> Dict[str, Any]:
    """``vocab_size`` and ``pad_token_id`` of a tokenised dataset (the teacher's own when it has a tokenizer of
    its own), for text model factories; empty for other data."""
    text = splits.info.get("text") if isinstance(splits.info, dict) else None
    if not isinstance(text, dict):
        return {}
    prefix = "teacher_" if teacher and "teacher_vocab_size" in text else ""
    return {"vocab_size": text[prefix + "vocab_size"], "pad_token_id": text[prefix + "pad_token_id"]}


def build_model(spec: ModelConfig, splits: DataSplits, teacher: bool = False) -> nn.Module:
    """The model a config section describes, sized to the data (``teacher``: it reads the teacher's tokens)."""
    num_classes = splits.num_classes
    if num_classes is None:  # regression: one output per target column
        num_classes = getattr(splits, "output_dim", None) or int(splits.train[0]["y"].numel())
    model = create_model(spec.name, num_classes=num_classes, input_shape=splits.input_shape,
                         context=_text_context(splits, teacher), **spec.options())
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


def build_teacher(cfg: RunConfig, splits: DataSplits) -> Teacher:
    """The frozen teacher of a config: one ``teacher:``, or a :class:`TeacherEnsemble` of ``teachers:``."""
    if not cfg.teachers:
        return Teacher(build_model(cfg.teacher, splits, teacher=True))
    from .teacher import TeacherEnsemble

    e = cfg.ensemble
    members = [build_model(spec, splits, teacher=True) for spec in cfg.teachers]
    sample = first_sample(teacher_view(splits.train)).unsqueeze(0)
    for i, m in enumerate(members[1:], start=1):
        try:
            check_outputs_match(members[0], m, sample)
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
    if command == "train":
        return Parts(splits, build_model(cfg.model, splits))
    student = build_model(cfg.student, splits)
    teacher = build_teacher(cfg, splits) if (cfg.teacher is not None or cfg.teachers) else None
    return Parts(splits, student, teacher)


def run_config(cfg: RunConfig, command: str, resume: bool = False) -> Run:
    """``kdkit train`` / ``kdkit distill``: the same :func:`execute` the Python API uses."""
    return execute(cfg, command, resume)


def cache_config(cfg: RunConfig, log=print) -> Dict[str, Any]:
    """``kdkit cache``: precompute a distillation config's teacher outputs into a disk cache (resumable).

    The cache is written where ``train.cache_dir`` says (default ``$KDKIT_CACHE_DIR`` or
    ``~/.cache/kdkit/teacher``), in the form ``train.cache_dtype`` / ``train.cache_topk`` say, with the teacher
    layers the config's method reads (``train.cache_feature_dtype``) for a feature method; a later
    ``kdkit distill`` of the same config finds it by fingerprint and skips the teacher entirely.
    """
    from .teacher.cache import build_cache
    from .teacher.plan import cache_plan, cache_spec

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
    # With the method's teacher_layers (a feature method): `kdkit distill` of this config then finds this very slot.
    cache = build_cache(teacher.model, splits.train, cache_spec(method, cfg.train, "disk"),
                        cache_dir=Path(cfg.train.cache_dir) if cfg.train.cache_dir else None,
                        batch_size=cfg.data.eval_batch_size, progress=cfg.train.progress, log=log)
    return {"path": str(cache.path), "rows": len(cache), "bytes": cache.nbytes, "description": cache.describe(),
            **{k: v for k, v in cache.meta.items() if k.startswith(("topk_kl", "fp16", "feature_fp16", "layers"))}}


def evaluate_run(run_dir, split: str = "test") -> Dict[str, Dict[str, Any]]:
    """Re-evaluate a finished run's best checkpoint (and its teacher, if any) on a split; a ``kdkit compress``
    run's compressed models (see :func:`kdkit.compress.evaluate_compressed`)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise KdkitError(f"{run_dir} is not a kdkit run directory (no config.yaml)")
    cfg = load_config(run_dir / "config.yaml")
    splits = build_data(cfg.data, cfg.seed)
    data = getattr(splits, split, None)
    if data is None:
        raise KdkitError(f"dataset {cfg.data.name!r} has no {split!r} split; use test or val")
    from .compress.ladder import evaluate_compressed, is_compress_run

    metrics: Dict[str, Dict[str, Any]] = {}
    teacher = None
    if cfg.teacher is not None or cfg.teachers:
        teacher = build_teacher(cfg, splits).model
        metrics["teacher"] = evaluate(teacher, teacher_view(data))
    if is_compress_run(run_dir):  # pruned, factorised or int8: the config's architecture is not the model's
        return {**metrics, **evaluate_compressed(run_dir, splits, data, teacher)}
    spec = cfg.model or cfg.student
    model = build_model(spec.model_copy(update={"checkpoint": str(run_dir)}), splits)
    metrics["model" if cfg.model else "student"] = evaluate(model, data, teacher=teacher)
    return metrics


__all__ = ["Run", "build_data", "build_model", "distill", "evaluate", "evaluate_run", "format_table",
           "run_config", "train", "validate"]
