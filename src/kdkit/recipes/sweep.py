"""``kdkit sweep``: search a run's settings with Optuna; every trial an ordinary run, one teacher cache for all.

    kdkit sweep configs/digits_kd.yaml method.name=[kd,dist,dkd] method.temperature=1..8:log \\
        method.alpha=0..1 train.lr=1e-4..1e-2:log --trials 20

    result = kdkit.sweep("configs/digits_kd.yaml", trials=20, space={"method.temperature": "1..8:log"})
    result.best_config   # the best trial's resolved RunConfig (also SWEEP_DIR/best.yaml)

How a sweep runs (``out_dir`` of the config is the sweep directory):

1. setup: the base config (a config's ``sweep:`` block is read and removed first; the rest is an ordinary
   run config), the search space (:mod:`kdkit.recipes.sweep_space`), one resolved config per method choice
   validated before any work (so a bad option fails now, not at trial 7);
2. the teacher's outputs on the training set are written once to ``SWEEP_DIR/teacher-cache`` and every
   trial's ``train.cache_dir`` points there (each trial still goes through :mod:`kdkit.teacher.plan`, which
   runs the teacher live where a cache would be wrong: feature methods, random augmentation);
3. trials: each a resolved :class:`~kdkit.config.RunConfig` run by :func:`kdkit.api.execute` in
   ``SWEEP_DIR/trials/trial-NNNN`` (config.yaml, metrics.jsonl, checkpoints, report). Its score is the
   validation metric (``sweep.metric``, default ``val_accuracy``) at the epoch whose weights were kept;
   per-epoch scores go to the pruner through :func:`kdkit.training.loop.epoch_hook`;
4. outputs: ``best.yaml``, ``sweep.json``, ``report.html`` (:mod:`kdkit.recipes.sweep_report`).

Method-specific options. When ``method.name`` is searched, an option (searched, or set in the base config)
is applied to a trial only when the trial's method accepts it (its constructor's keyword arguments, as
``kdkit ls`` methods are checked); the TPE and random samplers do not even draw it then (a conditional
space), the grid sampler draws every grid point and the trial records what it ignored. An option that no
method in the choice accepts is an error before the sweep starts.

The study lives in a database: ``sqlite:///SWEEP_DIR/study.db`` by default, any SQLAlchemy URL with
``--storage``. ``--resume`` continues it (or joins it from another process): finished trials are kept,
a trial interrupted by Ctrl-C, or whose process stopped sending heartbeats, is marked failed and retried
with the same settings.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import json
import os
import socket
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from ..config import RunConfig, flatten, load_config, parse_yaml, quote
from ..errors import KdkitError
from .sweep_report import SweepResult, _safe_url
from .sweep_space import Dimension, SweepConfig, parse_space, parse_sweep_block, split_args

SweepSource = Union[str, Path, Dict[str, Any], RunConfig]
# Settings that say how a run is watched or where it writes, not what it computes: ignored when a resumed or
# joined sweep is compared with the one that created the study.
_NOT_COMPARED = ("out_dir", "train.progress", "train.quiet", "train.threads", "train.cache_dir")
_DIVERGED = ("loss became", "weights became non-finite")


def _optuna():
    try:
        import optuna
    except ImportError:
        raise KdkitError("kdkit sweep needs the optional extra 'sweep': pip install 'kdkit[sweep]'") from None
    # Errors only: a trial that fails (an error, Ctrl-C) ends the sweep with kdkit's own one line, which Optuna's
    # "Trial N failed" warning and its traceback would only precede.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    # heartbeats and their retry callback are marked experimental; kdkit relies on them knowingly
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


# ----------------------------------------------------------------------------- reading the sweep

def read_sweep_source(source: SweepSource, overrides: Sequence[str] = ()) -> Tuple[RunConfig, SweepConfig]:
    """The base run config and the ``sweep:`` block of a YAML file, a dict or a RunConfig (plus overrides)."""
    name = "config"
    if isinstance(source, RunConfig):
        raw: Dict[str, Any] = source.model_dump(mode="json")
    elif isinstance(source, dict):
        raw = copy.deepcopy(source)
    else:
        path = Path(source)
        name = str(path)
        if not path.is_file():
            raise KdkitError(f"config file {path} not found")
        try:
            raw = parse_yaml(path.read_text(encoding="utf-8"), name) or {}
        except (OSError, UnicodeDecodeError) as e:
            raise KdkitError(f"{path}: cannot read the config: {e}") from None
        if not isinstance(raw, dict):
            raise KdkitError(f"{path}: expected a mapping of sections at the top level; found {type(raw).__name__}")
    block = parse_sweep_block(raw.pop("sweep", None), name)
    try:
        base = load_config(raw, overrides)
    except KdkitError as e:
        raise KdkitError(str(e).replace("config:", f"{name}:", 1) if name != "config" else str(e)) from None
    return base, block


def _command(base: RunConfig) -> str:
    return "train" if base.model is not None and base.student is None else "distill"


def _set(raw: Dict[str, Any], key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[parts[-1]] = value


# ----------------------------------------------------------------------------- method-specific options

def _method_options(name: str) -> Optional[set]:
    """The options method ``name`` accepts (None: open-ended)."""
    from ..methods import METHODS
    from ..methods.build import INJECTED_METHOD_ARGS
    from ..registry import accepted_kwargs

    accepted = accepted_kwargs(METHODS.get(name))
    return None if accepted is None else set(accepted) - set(INJECTED_METHOD_ARGS) - {"student", "teacher"}


def _accepts(method: str, key: str) -> bool:
    """Whether ``method`` takes the option behind config key ``method.OPTION``."""
    options = _method_options(method)
    return options is None or key.split(".")[1] in options


class Space:
    """The searched dimensions of a sweep, with the rules for method-specific options."""

    def __init__(self, base: RunConfig, specs: Dict[str, Any], sampler: str):
        self.base, self.command, self.sampler = base, _command(base), sampler
        dims = parse_space(specs)
        self.fixed = {d.key: d.choices[0] for d in dims if d.is_choice and len(d.choices) == 1}
        # method.name first: the other method options depend on it
        self.dims: List[Dimension] = sorted((d for d in dims if d.key not in self.fixed),
                                            key=lambda d: d.key != "method.name")
        if not self.dims:
            raise KdkitError("kdkit sweep: nothing to search; give dimensions such as method.temperature=1..8:log "
                             "(or a sweep.space block in the config)")
        method_keys = [d.key for d in dims if d.key.startswith("method.") and d.key != "method.name"]
        if self.command == "train" and (method_keys or "method.name" in specs):
            raise KdkitError("kdkit sweep: this config trains a model from labels (a model section, no student); "
                             "method.* cannot be searched")
        self.methods = self._method_choices()
        base_options = [f"method.{k}" for k in base.method.options()] if self.command == "distill" else []
        for key in dict.fromkeys(method_keys + base_options):
            if not any(_accepts(m, key) for m in self.methods):
                raise KdkitError(f"kdkit sweep: {key} is an option of none of the methods searched "
                                 f"({', '.join(self.methods)}); check `kdkit ls` and the methods' options")
        if sampler == "grid":
            ranges = [d for d in self.dims if not d.is_choice]
            if ranges:
                d = ranges[0]
                raise KdkitError(f"kdkit sweep: the grid sampler needs points, not a range: {d.key}="
                                 f"{d.describe()}; write LO..HI/N for N points (e.g. {d.key}=1..8/4:log)")

    def _method_choices(self) -> List[str]:
        from ..methods import METHODS

        names = next((list(d.choices) for d in self.dims if d.key == "method.name"),
                     [self.fixed.get("method.name", self.base.method.name)])
        for n in names:
            METHODS.get(str(n))  # an unknown name fails now, listing the known ones
        return [str(n) for n in names]

    def grid(self) -> Dict[str, List[Any]]:
        return {d.key: d.labels() for d in self.dims}

    def size(self) -> Optional[int]:
        """Grid points (None for a continuous space)."""
        n = 1
        for d in self.dims:
            if not d.is_choice:
                return None
            n *= len(d.choices)
        return n

    def suggest(self, trial) -> Dict[str, Any]:
        """Draw the trial's values (config values, not Optuna's labels); conditional on the method (not grid)."""
        values: Dict[str, Any] = {}
        for d in self.dims:
            if (self.sampler != "grid" and d.key.startswith("method.") and d.key != "method.name"
                    and not _accepts(self._method(values), d.key)):
                continue
            if d.is_choice:
                values[d.key] = d.value_of(trial.suggest_categorical(d.key, d.labels()))
            elif d.integer:
                values[d.key] = trial.suggest_int(d.key, int(d.low), int(d.high), log=d.log)
            else:
                values[d.key] = trial.suggest_float(d.key, d.low, d.high, log=d.log)
        return values

    def _method(self, values: Dict[str, Any]) -> str:
        return str(values.get("method.name", self.fixed.get("method.name", self.base.method.name)))

    def config(self, values: Dict[str, Any], out_dir: Path, cache_dir: Optional[str],
               tracking: Any = None) -> Tuple[RunConfig, List[str]]:
        """The trial's resolved config, and the options left out because its method does not take them."""
        raw = self.base.model_dump(mode="json")
        ignored: List[str] = []
        settings = {**self.fixed, **values}
        if self.command == "distill":
            method = self._method(settings)
            if method != self.base.method.name:  # the base's options go only where the new method takes them
                options = raw["method"]
                for k in [k for k in options if k != "name" and not _accepts(method, f"method.{k}")]:
                    ignored.append(f"method.{k}")
                    del options[k]
        for key, value in settings.items():
            if self.command == "distill" and key.startswith("method.") and key != "method.name" \
                    and not _accepts(self._method(settings), key):
                ignored.append(key)
                continue
            _set(raw, key, value)
        raw["out_dir"] = str(out_dir)
        raw["train"]["quiet"] = True  # a trial is one line of the sweep's; its epochs are in its run directory
        if cache_dir is not None:
            raw["train"]["cache_dir"] = cache_dir
        if tracking is not None:
            raw["tracking"] = tracking
        try:
            return load_config(raw), list(dict.fromkeys(ignored))
        except KdkitError as e:
            shown = ", ".join(f"{k}={quote(v, 30)}" for k, v in settings.items())
            raise KdkitError(f"kdkit sweep: the trial config with {shown} is not valid: {e}") from None

    def check(self, sweep_dir: Path) -> None:
        """Validate one config per method choice, with every range at each end, before any work is done."""
        from ..assemble import validate

        for method in self.methods:
            for end in (0, -1):
                values = {d.key: d.corners()[end] for d in self.dims}
                if "method.name" in values:
                    values["method.name"] = method
                cfg, _ = self.config(values, sweep_dir / "trials" / "check", None)
                try:
                    validate(cfg, self.command)
                except KdkitError as e:
                    raise KdkitError(f"kdkit sweep: with method {method!r} and {self._show(values)}: {e}") from None

    @staticmethod
    def _show(values: Dict[str, Any]) -> str:
        return ", ".join(f"{k}={quote(v, 30)}" for k, v in values.items() if k != "method.name")


# ----------------------------------------------------------------------------- the study

def default_storage(sweep_dir: Path) -> str:
    return f"sqlite:///{Path(sweep_dir).resolve() / 'study.db'}"


def _storage(url: str, heartbeat: int, retries: int):
    optuna = _optuna()
    engine_kwargs: Dict[str, Any] = {}
    if url.startswith("sqlite"):
        # Several processes on one file: wait for the write lock instead of failing at once.
        engine_kwargs["connect_args"] = {"timeout": 60}
    try:
        return optuna.storages.RDBStorage(
            url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat, grace_period=3 * heartbeat,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=retries))
    except Exception as e:  # SQLAlchemy: bad URL, missing driver, unreachable server
        raise KdkitError(f"sweep storage {_safe_url(url)!r} cannot be opened: {str(e).splitlines()[0]}") from None


def _sampler(name: str, space: Space, seed: int, startup: int):
    optuna = _optuna()
    if name == "grid":
        return optuna.samplers.GridSampler(space.grid(), seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(1, startup))


def _identity(base: RunConfig, space_specs: Dict[str, Any], block: SweepConfig) -> Dict[str, str]:
    """What makes two processes work on the same sweep (kept in the study; compared on resume/join)."""
    flat = {k: v for k, v in flatten(base.model_dump(mode="json")).items() if k not in _NOT_COMPARED}
    return {"kdkit_base": json.dumps(flat, sort_keys=True, default=str),
            "kdkit_space": json.dumps(space_specs, sort_keys=True, default=str),
            "kdkit_metric": block.metric}


def _open_study(block: SweepConfig, storage_url: str, identity: Dict[str, str], resume: bool, space: Space,
                seed: int):
    optuna = _optuna()
    storage = _storage(storage_url, block.heartbeat_seconds, block.retries)
    direction = block.resolved_direction()
    existing = [s.study_name for s in optuna.study.get_all_study_summaries(storage)]
    if block.study in existing:
        if not resume:
            raise KdkitError(f"sweep storage {_safe_url(storage_url)} already holds study {block.study!r}; continue "
                             f"it with --resume (Python: resume=True) or give another study name (--study)")
        study = optuna.load_study(study_name=block.study, storage=storage)
        _check_identity(study.user_attrs, identity)
    else:
        if resume:
            raise KdkitError(f"nothing to resume: sweep storage {_safe_url(storage_url)} has no study "
                             f"{block.study!r}")
        study = optuna.create_study(study_name=block.study, storage=storage, direction=direction)
        for k, v in identity.items():
            study.set_user_attr(k, v)
    # Seeded from the config's seed and the trials already in the study: a resumed random sampler does not
    # replay the draws it made before.
    study.sampler = _sampler(block.sampler, space, seed + len(study.trials), block.startup_trials)
    if block.pruner == "median":
        # epochs 1..warmup_epochs are never pruned (steps are 1-based epochs)
        study.pruner = optuna.pruners.MedianPruner(n_startup_trials=block.startup_trials,
                                                   n_warmup_steps=block.warmup_epochs + 1)
    else:
        study.pruner = optuna.pruners.NopPruner()
    return study


def _check_identity(stored: Dict[str, Any], identity: Dict[str, str]) -> None:
    for key, what in (("kdkit_metric", "sweep.metric"), ("kdkit_space", "search space")):
        if key in stored and stored[key] != identity[key]:
            raise KdkitError(f"cannot resume: the study was created with {what} {stored[key]} but this sweep asks "
                             f"for {identity[key]}; a resumed sweep keeps its space (start a new study to change it)")
    if "kdkit_base" in stored:
        old, new = json.loads(stored["kdkit_base"]), json.loads(identity["kdkit_base"])
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                raise KdkitError(f"cannot resume: the study's base config has {key}={old.get(key)!r} but this sweep "
                                 f"asks for {new.get(key)!r}; a resumed sweep keeps its settings")


def _retry_failed(study, retries: int) -> List[int]:
    """Queue failed trials (Ctrl-C, crashes) again with the same values, each at most ``retries`` times."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    taken = {t.user_attrs.get("retry_of") for t in trials} | {t.system_attrs.get("failed_trial") for t in trials}
    queued = []
    for t in trials:
        if t.state == TrialState.FAIL and t.number not in taken and t.user_attrs.get("retry_depth", 0) < retries:
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number,
                                                      "retry_depth": t.user_attrs.get("retry_depth", 0) + 1})
            queued.append(t.number)
    return queued


def _counted(study) -> int:
    """Trials that count toward ``trials``: finished (complete, pruned) and running (another process's)."""
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED,
                                                        TrialState.RUNNING)))


# ----------------------------------------------------------------------------- the shared teacher cache

def build_shared_cache(base: RunConfig, cache_dir: Path, log: Callable[[str], None]) -> Dict[str, Any]:
    """Write the teacher's training-set outputs once into ``cache_dir`` (reused when already there).

    Returns ``{"status": "built"|"reused"|"off", "reason": ...}``. Whether a trial may read it is still
    decided by each trial's own plan (:func:`kdkit.teacher.plan.cache_plan`).
    """
    from ..assemble import build_data, build_teacher, validate
    from ..teacher.cache import BUILD_COUNTS, CacheSpec, build_cache
    from ..teacher.plan import cache_plan
    from ..training.loop import resolve_device, seed_everything

    if _command(base) != "distill" or (base.teacher is None and not base.teachers):
        return {"status": "off", "reason": "the runs have no teacher"}
    cfg = validate(base, "distill")
    seed_everything(cfg.seed)
    splits = build_data(cfg.data, cfg.seed)
    teacher = build_teacher(cfg, splits)
    # A stand-in method that reads only the teacher's outputs: the trials' own plans add the method's say.
    mode, reason = cache_plan(SimpleNamespace(teacher=teacher), splits.train, cfg.train)
    if mode == "off":
        return {"status": "off", "reason": reason}
    teacher.to(resolve_device(cfg.device))
    before = dict(BUILD_COUNTS)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _file_lock(cache_dir / ".lock"):  # several processes on one machine: one builds, the others reuse
        cache = build_cache(teacher.model, splits.train, CacheSpec(cfg.train.cache_dtype, cfg.train.cache_topk, "disk"),
                            cache_dir=cache_dir, batch_size=cfg.data.eval_batch_size, progress=cfg.train.progress,
                            log=log)
    status = "built" if BUILD_COUNTS["built"] > before["built"] else "reused"
    return {"status": status, "reason": reason, "path": str(cache.path), "rows": len(cache)}


@contextlib.contextmanager
def _file_lock(path: Path):
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock (one process per sweep directory there)
        yield
        return
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------- one trial

class _Objective:
    """Runs one trial: its config, :func:`kdkit.api.execute`, per-epoch reports to the pruner, its score."""

    def __init__(self, space: Space, block: SweepConfig, sweep_dir: Path, cache_dir: Optional[str], tracking,
                 say: Callable[[str], None]):
        self.space, self.block, self.sweep_dir, self.cache_dir = space, block, sweep_dir, cache_dir
        self.tracking, self.say = tracking, say

    def __call__(self, trial) -> float:
        optuna = _optuna()
        from ..api import execute
        from ..teacher.cache import BUILD_COUNTS
        from ..training.loop import epoch_hook

        values = self.space.suggest(trial)
        run_dir = self.sweep_dir / "trials" / f"trial-{trial.number:04d}"
        tracking = self._tracking(trial.number)
        cfg, ignored = self.space.config(values, run_dir, self.cache_dir, tracking)
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("method", self.space._method({**self.space.fixed, **values}))
        if ignored:
            trial.set_user_attr("ignored", ignored)
        before, epochs, t0 = dict(BUILD_COUNTS), [], time.perf_counter()

        def report(record: Dict[str, Any]) -> None:
            epochs.append(record["epoch"])
            value = record.get(self.block.metric)
            if value is None:
                return
            trial.report(float(value), step=int(record["epoch"]))
            if trial.should_prune():
                raise optuna.TrialPruned(f"{self.block.metric} {value:.4f} at epoch {record['epoch']}")

        try:
            with epoch_hook(report):
                execute(cfg, self.space.command, warn=False)
        except optuna.TrialPruned:
            self._record(trial, cfg, before, epochs, t0)
            self.say(f"trial {trial.number}: {self._show(values)} -> pruned at epoch {epochs[-1]}")
            raise
        except KdkitError as e:
            self._record(trial, cfg, before, epochs, t0)
            if any(s in str(e) for s in _DIVERGED):  # a diverging trial is a poor trial, not a broken sweep
                trial.set_user_attr("error", str(e))
                self.say(f"trial {trial.number}: {self._show(values)} -> diverged ({str(e)[:80]}); pruned")
                raise optuna.TrialPruned(str(e)) from None
            raise
        self._record(trial, cfg, before, epochs, t0)
        score = self._score(run_dir)
        self.say(f"trial {trial.number}: {self._show(values)} -> {self.block.metric} {score:.4f} "
                 f"({time.perf_counter() - t0:.1f} s)")
        return score

    def _tracking(self, number: int):
        if self.tracking is None:
            return None
        data = dict(self.tracking)
        data["tags"] = {**(data.get("tags") or {}), "kdkit.sweep_trial": str(number)}
        return data

    @staticmethod
    def _show(values: Dict[str, Any]) -> str:
        def fmt(v):
            return f"{v:.4g}" if isinstance(v, float) else str(v)
        return " ".join(f"{k.split('.')[-1] if k.startswith('method.') else k}={fmt(v)}" for k, v in values.items())

    def _record(self, trial, cfg: RunConfig, before: Dict[str, int], epochs: List[int], t0: float) -> None:
        """Seconds, epochs run and what the teacher did (cache built, reused, or live every epoch)."""
        from ..methods import METHODS
        from ..teacher.cache import BUILD_COUNTS

        built = BUILD_COUNTS["built"] - before["built"]
        reused = BUILD_COUNTS["reused"] - before["reused"]
        has_teacher = self.space.command == "distill" and getattr(METHODS.get(cfg.method.name), "needs_teacher", True)
        if not has_teacher:
            teacher = "none"
        elif built or reused:
            teacher = "cache built" if built else "shared cache"
        else:
            teacher = "live"
        trial.set_user_attr("seconds", round(time.perf_counter() - t0, 2))
        trial.set_user_attr("epochs", len(epochs))
        trial.set_user_attr("teacher", teacher)
        # teacher passes over the training set: a cache build is one, a live teacher one per epoch
        trial.set_user_attr("teacher_passes", built + (len(epochs) if teacher == "live" else 0))

    def _score(self, run_dir: Path) -> float:
        from ..training.rundir import read_json, read_metrics

        records = read_metrics(run_dir)
        kept = (read_json(run_dir / "report.json") or {}).get("kept_epoch")
        record = next((r for r in records if r.get("epoch") == kept), records[-1] if records else {})
        if self.block.metric not in record:
            have = sorted(k for k in record if k.startswith("val_"))
            raise KdkitError(f"kdkit sweep: the runs record no {self.block.metric} (sweep.metric); their validation "
                             f"metrics are {', '.join(have) or 'none (no validation split)'}")
        return float(record[self.block.metric])


# ----------------------------------------------------------------------------- the sweep

def sweep(config: SweepSource, *, trials: Optional[int] = None, space: Optional[Dict[str, Any]] = None,
          storage: Optional[str] = None, sampler: Optional[str] = None, pruner: Optional[str] = None,
          study: Optional[str] = None, resume: bool = False, overrides: Sequence[str] = (),
          out_dir: Optional[Union[str, Path]] = None, quiet: bool = False) -> SweepResult:
    """Search a run's settings with Optuna (see the module docstring); the Python twin of ``kdkit sweep``.

    Args:
        config: a YAML path, a dict or a :class:`~kdkit.config.RunConfig`; may hold a ``sweep:`` block.
        trials: finished trials (complete or pruned) the study should reach (default ``sweep.trials``).
        space: ``{key: spec}`` search dimensions, added to (and overriding) the config's ``sweep.space``;
            a spec is a list (a choice) or a range string ``"LO..HI[/N][:log]"``.
        storage: SQLAlchemy URL of the study (default ``sqlite:///SWEEP_DIR/study.db``).
        sampler: ``tpe`` (default), ``random`` or ``grid``; ``pruner``: ``median`` (default) or ``none``.
        study: the study's name in the storage (default ``kdkit-sweep``).
        resume: continue (or join) the study instead of creating it.
        overrides: ``key.path=value`` settings for every trial (as on the command line).
        out_dir: the sweep directory (default: the config's ``out_dir``).
        quiet: no line per trial.

    Returns:
        A :class:`SweepResult`; ``SWEEP_DIR`` holds ``best.yaml``, ``sweep.json`` and ``report.html``.
    """
    from .sweep_report import write_outputs

    base, block = read_sweep_source(config, overrides)
    updates = {k: v for k, v in (("trials", trials), ("storage", storage), ("sampler", sampler),
                                 ("pruner", pruner), ("study", study)) if v is not None}
    if updates:
        block = _updated(block, updates)
    specs = {**block.space, **(space or {})}
    if out_dir is not None:
        base = base.model_copy(update={"out_dir": str(out_dir)})
    if base.out_dir is None:
        raise KdkitError("config: out_dir is required (the sweep directory: trials, study.db, best.yaml go there)")
    sweep_dir = Path(base.out_dir)
    space_obj = Space(base, specs, block.sampler)
    space_obj.check(sweep_dir)
    _check_sweep_dir(sweep_dir, resume, block.storage)
    _check_metric(base, block)
    say = (lambda _m: None) if quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    storage_url = block.storage or default_storage(sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    st = _open_study(block, storage_url, _identity(base, specs, block), resume, space_obj, base.seed)
    if resume:
        queued = _retry_failed(st, block.retries)
        if queued:
            say(f"sweep: retrying interrupted trial(s) {', '.join(map(str, queued))} with the same settings")
    cache_dir = base.train.cache_dir or str(sweep_dir / "teacher-cache")
    shared = build_shared_cache(base.model_copy(update={"train": base.train.model_copy(
        update={"cache_dir": cache_dir})}), Path(cache_dir), say) if base.train.teacher_cache != "off" else \
        {"status": "off", "reason": "train.teacher_cache is off"}
    st.set_user_attr(f"kdkit_prebuild:{socket.gethostname()}:{os.getpid()}:{datetime.datetime.now().isoformat()}",
                     1 if shared["status"] == "built" else 0)
    say(f"sweep: {sweep_dir} ({block.sampler}, {block.trials} trials, metric {block.metric}); teacher cache: "
        f"{shared['status']}" + (f" ({shared['reason']})" if shared["status"] == "off" else ""))
    try:
        with _parent_tracking(base, sweep_dir, specs) as tracking:
            objective = _Objective(space_obj, block, sweep_dir, cache_dir, tracking, say)
            _run_trials(st, objective, block.trials, space_obj, block.heartbeat_seconds)
    except KeyboardInterrupt:
        with contextlib.suppress(Exception):  # what finished so far, then the interruption as it was
            write_outputs(st, sweep_dir, block, space_obj, storage_url, time.perf_counter() - t0)
        raise
    return write_outputs(st, sweep_dir, block, space_obj, storage_url, time.perf_counter() - t0)


def _check_metric(base: RunConfig, block: SweepConfig) -> None:
    """The scored metric is one the runs' validation reports (their kind of task says which), checked before the
    first trial and before anything is written."""
    from ..assemble import build_data
    from ..tasks import task_for

    with_teacher = _command(base) == "distill" and (base.teacher is not None or bool(base.teachers))
    names = task_for(build_data(base.data, base.seed)).validation_metrics(with_teacher)
    if block.metric[len("val_"):] not in names:
        raise KdkitError(f"sweep.metric {block.metric!r} is not a validation metric of these runs; expected one of "
                         f"{', '.join('val_' + n for n in names)}")


def _updated(block: SweepConfig, updates: Dict[str, Any]) -> SweepConfig:
    from .sweep_space import parse_sweep_block

    return parse_sweep_block({**block.model_dump(), **updates}, "sweep options")


def _check_sweep_dir(sweep_dir: Path, resume: bool, storage: Optional[str]) -> None:
    if resume:
        if storage is None and not (sweep_dir / "study.db").is_file():
            raise KdkitError(f"nothing to resume: {sweep_dir} has no study.db (give --storage URL to join a "
                             f"study kept elsewhere)")
        return
    if sweep_dir.exists() and (not sweep_dir.is_dir() or any(sweep_dir.iterdir())):
        raise KdkitError(f"sweep directory {sweep_dir} already exists and is not empty; choose another out_dir "
                         f"(e.g. out_dir={sweep_dir}-2) or continue its study with --resume")


@contextlib.contextmanager
def _parent_tracking(base: RunConfig, sweep_dir: Path, specs: Dict[str, Any]):
    """With experiment tracking configured: a parent run for the sweep, its trials as children (else None)."""
    tracking = getattr(base, "tracking", None)
    if tracking is None:
        yield None
        return
    try:
        from ..training.tracking import parent_run
    except ImportError:
        yield None
        return
    with parent_run(tracking, sweep_dir, f"sweep {sweep_dir.name}", {"space": specs}) as child:
        yield None if child is None else child.model_dump(mode="json")


def _run_trials(study, objective: _Objective, target: int, space: Space, heartbeat: int) -> None:
    """Trials until the study has ``target`` finished ones (complete or pruned) or the grid is done.

    Other processes' running trials count; while they run this process waits for them (so that its report is
    complete), and one whose heartbeat stops is marked failed and queued again (it then runs here).
    """
    optuna = _optuna()
    from optuna.trial import TrialState

    grid = space.size() if space.sampler == "grid" else None
    while True:
        optuna.storages.fail_stale_trials(study)  # a dead process's trial: failed, and queued again
        running = len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
        queued = len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
        full = _counted(study) >= target or (grid is not None and _counted(study) >= grid)
        if full and not queued:
            if not running:
                return
            time.sleep(heartbeat)  # wait for the other processes' trials (or for their heartbeats to stop)
            continue
        # One trial per call: the count is read again between trials, so several processes stop together.
        study.optimize(objective, n_trials=1, catch=())


def sweep_cli(config: str, args: Sequence[str], *, trials: Optional[int], storage: Optional[str],
              sampler: Optional[str], pruner: Optional[str], study: Optional[str], resume: bool,
              quiet: bool = False) -> SweepResult:
    """``kdkit sweep CONFIG [KEY=SPEC | KEY=VALUE ...]``: split search dimensions from overrides, run."""
    space, overrides = split_args(args)
    return sweep(config, trials=trials, space=space, storage=storage, sampler=sampler, pruner=pruner, study=study,
                 resume=resume, overrides=overrides, quiet=quiet)
