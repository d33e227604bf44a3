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

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from torch import nn

from .assemble import (
    PYTHON,
    Parts,
    build_data,
    build_model,
    build_parts,
    build_teacher,
    check_outputs_match,
    validate,
)
from .config import RunConfig, TrainConfig, dump_config, flatten, load_config
from .data import DataSplits, as_dataset
from .data.core import first_sample, teacher_view
from .errors import KdkitError
from .evaluation.report import format_table, run_info, write_report
from .methods import METHODS, Method
from .methods.build import build_method, example_batch_of, method_temperature
from .tasks import evaluate, task_for
from .teacher import as_teacher
from .training.checkpoint import load_weights
from .training.distributed import dist_env
from .training.loop import History, fit, resolve_device, seed_everything
from .training.rundir import create_run_dir, write_text_atomic
from .training.threads import apply_threads
from .training.tracking import Tracking


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


# ----------------------------------------------------------------------------- one way to assemble a run

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


def execute(cfg: RunConfig, command: str, resume: bool = False, given: Optional[Parts] = None,
            warn: bool = True) -> Run:
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
    if cfg.train.strategy == "fsdp":
        _check_sharded_run(cfg, method, resume)
    rank = dist_env()[0]  # under torchrun only rank 0 writes the run directory (and tracks)
    tracking = Tracking.from_config(cfg.tracking, enabled=rank == 0)
    run_dir = None
    if cfg.out_dir is not None:
        if rank == 0:
            tracking.connect(Path(cfg.out_dir).parent)  # an unreachable store fails now, with nothing written
        run_dir = create_run_dir(cfg.out_dir, resume) if rank == 0 else Path(cfg.out_dir)
        if not resume and rank == 0:
            write_text_atomic(run_dir / "config.yaml", dump_config(cfg))
    splits = parts.splits
    with tracking.session(run_dir if rank == 0 else None, flatten(cfg.model_dump(mode="json")), resume):
        history = fit(method, splits.train, splits.val, cfg.train, run_dir=run_dir, seed=cfg.seed, device=cfg.device,
                      batch_size=cfg.data.batch_size, eval_batch_size=cfg.data.eval_batch_size,
                      num_workers=cfg.data.num_workers, resume=resume,
                      name="model" if command == "train" else "student", tracking=tracking, task=parts.task)
        if rank != 0:
            return Run(student=method.student, metrics={}, history=history.epochs, dir=None, config=cfg)
        title = f"kdkit {command}: {cfg.data.name}" + (f", {cfg.method.name}" if command == "distill" else "")
        wall = time.perf_counter() - started
        run = _finish(cfg, method, history, run_dir, parts, title, command=command, wall=wall, warn=warn)
        if run_dir is not None:
            tracking.log_results(run_dir, run.metrics)
    return run


def _check_sharded_run(cfg: RunConfig, method: Method, resume: bool) -> None:
    """``train.strategy: fsdp``: refuse what cannot run sharded, and a resume on another world size."""
    from .training.fsdp import checkpoint_world_size, sharding_problem

    world = dist_env()[1]
    problem = sharding_problem(cfg.train, method, world)
    if problem:
        raise KdkitError(problem)
    if resume and cfg.out_dir is not None:
        saved = checkpoint_world_size(Path(cfg.out_dir) / "checkpoints")
        if saved is not None and saved != world:
            raise KdkitError(f"cannot resume {cfg.out_dir}: its sharded checkpoint was written by {saved} processes "
                             f"and this run has {world}; resume with torchrun --nproc_per_node {saved}")


def _check_resume(cfg: RunConfig) -> None:
    """A resumed run continues with the settings it started with: refuse a config that differs from config.yaml."""
    if cfg.out_dir is None:
        raise KdkitError("resume needs the run directory: give out_dir (the one the interrupted run wrote)")
    stored_path = Path(cfg.out_dir) / "config.yaml"
    if not stored_path.is_file():
        raise KdkitError(f"cannot resume: {cfg.out_dir} is not a kdkit run directory (no config.yaml)")
    stored = flatten(load_config(stored_path).model_dump(mode="json"))
    given = flatten(cfg.model_dump(mode="json"))
    # How the run is watched or scheduled, not what it computes; and where its directory lies now: a run directory
    # that was moved, copied to another machine or named another way (a trailing slash, an absolute path) is
    # the same run, and its stored out_dir is only where it started.
    ignored = {"train.progress", "train.quiet", "train.threads", "out_dir"}
    for key in sorted(set(stored) | set(given)):
        if key not in ignored and stored.get(key) != given.get(key):
            raise KdkitError(f"cannot resume {cfg.out_dir}: its config.yaml has {key}={stored.get(key)!r} but this "
                             f"run asks for {given.get(key)!r}; a resumed run keeps its settings (start a new run "
                             f"to change them)")


def _build_run_method(cfg: RunConfig, command: str, parts: Parts) -> Method:
    """The method of the run (``supervised`` for ``kdkit train``), its options checked."""
    splits = parts.splits
    cross = cfg.method.options().get("teacher_tokenizer") is not None  # the teacher never reads these ids
    parts.task.check_fit(parts.model, None if cross else parts.teacher, splits)
    if command == "train":
        batch = example_batch_of(splits.train)
        if batch is None or "y" not in batch:
            raise KdkitError("kdkit train needs labelled training data (targets y); for an unlabelled transfer set "
                             "use kdkit distill with a teacher")
        return METHODS.get("supervised")(parts.model)
    if parts.teacher is not None and not cross:
        check_outputs_match(parts.teacher.model, parts.model, first_sample(splits.train).unsqueeze(0),
                            first_sample(teacher_view(splits.train)).unsqueeze(0), task=parts.task)
    return build_method(cfg.method.name, parts.model, parts.teacher, cfg.method.options(), train_data=splits.train,
                        num_classes=splits.num_classes)


def _finish(cfg: RunConfig, method: Method, history: History, run_dir: Optional[Path], parts: Parts, title: str,
            command: str = "distill", wall: Optional[float] = None, warn: bool = True) -> Run:
    """Load the kept weights, evaluate on the test split (else validation) as the task measures, write the report."""
    splits, teacher, task = parts.splits, parts.teacher, parts.task
    student = method.student
    device = next(student.parameters()).device if any(True for _ in student.parameters()) else None
    if run_dir is not None and (run_dir / "checkpoints" / "best.safetensors").exists():
        load_weights(student, run_dir / "checkpoints" / "best.safetensors")
    elif history.kept_state is not None:
        student.load_state_dict(history.kept_state)
    data = splits.test if splits.test is not None else splits.val
    metrics: Dict[str, Dict[str, Any]] = {}
    cross = getattr(method, "cross_tokenizer", False)  # a teacher with its own tokenizer: its own tokens
    if data is not None:
        student_cpu = student.to("cpu")
        if teacher is not None:
            teacher.to("cpu")
            metrics["teacher"] = task.evaluate(teacher.model, method.teacher_tokens(data) if cross
                                               else teacher_view(data))
        metrics["student"] = task.evaluate(student_cpu, data,
                                           teacher=None if cross else getattr(teacher, "model", teacher))
        metrics["student"]["kept_epoch"] = history.best_epoch
    if run_dir is not None:
        extra = {"split": "test" if splits.test is not None else "val", "dataset": cfg.data.name,
                 "data_info": splits.info, "teacher_cache": history.teacher_cache,
                 "kept_epoch": history.best_epoch, "epochs": cfg.train.epochs, "keep": cfg.train.keep,
                 "run": run_info(cfg, student=student, teacher=teacher, splits=splits, device=device,
                                 wall_seconds=wall, command=command, task=task,
                                 teacher_val_accuracy=task.teacher_val_accuracy(
                                     teacher, method.teacher_tokens(splits.val) if cross and splits.val is not None
                                     else splits.val))}
    from .evaluation.verdict import summary

    verdict = summary(metrics, history.epochs, cfg.train.epochs, history.best_epoch,
                      "test" if splits.test is not None else "val")
    for line in verdict["warnings"] if warn else ():  # a sweep's trials keep theirs in their reports
        print(f"warning: {line}", file=sys.stderr)
    if run_dir is not None:
        write_report(run_dir, metrics, {"student": history.epochs}, title=title, extra={**extra, **verdict})
    return Run(student=student, metrics=metrics, history=history.epochs, dir=run_dir, config=cfg)


def run_config(cfg: RunConfig, command: str, resume: bool = False) -> Run:
    """``kdkit train`` / ``kdkit distill``: the same :func:`execute` the Python API uses."""
    return execute(cfg, command, resume)


def cache_config(cfg: RunConfig, log=print) -> Dict[str, Any]:
    """``kdkit cache``: precompute a distillation config's teacher outputs into a disk cache (resumable), or, for
    ``lm_kd`` with ``method.store_kind``, write its teacher store (:mod:`kdkit.lm.store`).

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
    task = task_for(splits)
    teacher = build_teacher(cfg, splits, task)
    method = build_method(cfg.method.name, build_model(cfg.student, splits, task=task), teacher, cfg.method.options(),
                          train_data=splits.train, num_classes=splits.num_classes)
    if getattr(method, "uses_store", False):  # lm_kd's teacher store: written once, read by every student run
        teacher.to(resolve_device(cfg.device))
        description = method.prepare(splits.train, batch_size=cfg.data.eval_batch_size)  # the caller prints it
        store = method.store
        return {"path": str(store.path), "rows": len(store), "bytes": store.nbytes, "description": description}
    train = cfg.train.model_copy(update={"teacher_cache": "auto"})
    mode, reason = cache_plan(method, splits.train, train, task=task)
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
    from .assemble import check_rebuildable

    check_rebuildable(cfg, run_dir, "evaluate")
    apply_threads(cfg.train.threads)  # the run's thread count, so latency reads as in the run's own report
    splits = build_data(cfg.data, cfg.seed)
    data = getattr(splits, split, None)
    if data is None:
        raise KdkitError(f"dataset {cfg.data.name!r} has no {split!r} split; use test or val")
    from .compress.ladder import evaluate_compressed, is_compress_run

    task = task_for(splits)
    metrics: Dict[str, Dict[str, Any]] = {}
    teacher = None
    if cfg.teacher is not None or cfg.teachers:
        teacher = build_teacher(cfg, splits, task).model
        metrics["teacher"] = task.evaluate(teacher, teacher_view(data))
    if is_compress_run(run_dir):  # pruned, factorised or int8: the config's architecture is not the model's
        return {**metrics, **evaluate_compressed(run_dir, splits, data, teacher)}
    spec = cfg.model or cfg.student
    model = build_model(spec.model_copy(update={"checkpoint": str(run_dir)}), splits, task=task)
    metrics["model" if cfg.model else "student"] = task.evaluate(model, data, teacher=teacher)
    return metrics


__all__ = ["Run", "build_data", "build_model", "distill", "evaluate", "evaluate_run", "format_table",
           "run_config", "train", "validate"]
