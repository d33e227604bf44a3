"""Experiment tracking: a run's config, per-epoch metrics and results sent to TensorBoard and/or MLflow.

The run config chooses (``tracking:``, see :class:`kdkit.config.TrackingConfig`)::

    tracking: auto                 # the default: run_dir/tensorboard/ when the tensorboard package is installed
    tracking: tensorboard          # TensorBoard, an error before any work when the package is missing
    tracking: mlflow               # MLflow, in a SQLite store beside the run directory
    tracking: none                 # neither
    tracking: {backend: [tensorboard, mlflow], uri: http://mlflow:5000, experiment: fashion}

Neither backend is needed for training: the default ``auto`` skips TensorBoard quietly when it is not
installed, MLflow is imported only when a config asks for it; a backend named in the config whose package is
missing (the ``track`` extra) fails before any work starts.

MLflow (rank 0 only, under DDP):

- **Store.** ``tracking.uri`` is any MLflow tracking URI (a server, ``sqlite:///...``, a database
  URL). Without one, the store is the SQLite database ``mlflow.db`` in the run directory's parent
  folder, artifacts in ``mlartifacts/`` beside it, so every run under ``runs/`` lands in one store that
  works offline: ``mlflow ui --backend-store-uri sqlite:///runs/mlflow.db``. (MLflow 3 deprecates the
  plain file store ``./mlruns``; SQLite is its recommended local store.)
- **What a run logs.** The resolved config as parameters (flattened keys: ``train.lr``,
  ``method.temperature``), every ``metrics.jsonl`` number as a metric of the same name with the epoch
  as its step, and at the end the report (``report.json``, ``report.html``), ``config.yaml``,
  ``metrics.jsonl`` and the kept student weights (``checkpoints/best.safetensors``) as artifacts, plus
  the report's numbers as ``final_<model>_<metric>`` metrics.
- **Resume.** The MLflow run id is kept in ``run_dir/tracking.json``; a resumed run continues the same
  MLflow run, and logs the epochs it had finished but not yet sent, so each epoch appears once.
- **Sweeps.** :func:`parent_run` opens a parent run; its trials set ``tracking.parent_run_id`` and
  appear as its children.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

from ..config import flatten
from ..errors import KdkitError

TRACKING_FILE = "tracking.json"  # in the run directory: which MLflow run this run directory is
DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"
PARAM_CHARS = 6000  # MLflow's limit on a parameter value
_BATCH = 100  # MLflow accepts at most 100 parameters per log_batch call


def require_mlflow():
    """Import and return ``mlflow``, or a one-line :class:`KdkitError` naming the extra to install."""
    try:
        import mlflow
    except ImportError:
        raise KdkitError("tracking: mlflow needs the optional extra 'track': pip install 'kdkit[track]'") from None
    for name in ("mlflow.store.db.utils", "alembic", "alembic.runtime.migration"):
        logging.getLogger(name).setLevel(logging.WARNING)  # no table-creation chatter on every new store
    return mlflow


def epoch_metrics(record: Dict[str, Any]) -> Dict[str, float]:
    """The numbers of one ``metrics.jsonl`` record, by their names there (``epoch`` is the step, not a metric)."""
    return {k: float(v) for k, v in record.items()
            if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def default_uri(directory: Path) -> str:
    """The local store of runs under ``directory``: ``sqlite:///<directory>/mlflow.db``."""
    return f"sqlite:///{(Path(directory).resolve() / DEFAULT_DB).as_posix()}"


# ----------------------------------------------------------------------------- backends

class Backend:
    """One place metrics go. ``start`` once, ``log_epoch`` after each committed epoch, ``finish`` at the end."""

    def start(self, run_dir: Path, params: Dict[str, Any], resume: bool) -> None:
        pass

    def connect(self, store_dir: Path) -> None:
        """Open the backend's store before the run directory is written (a store that cannot be opened then
        fails the run with nothing left behind); the default does nothing."""

    def catch_up(self, records: Sequence[Dict[str, Any]]) -> None:
        """After a resume: send the finished epochs this backend has not recorded yet."""

    def log_epoch(self, record: Dict[str, Any]) -> None:
        pass

    def log_results(self, run_dir: Path, models: Dict[str, Dict[str, Any]]) -> None:
        pass

    def end(self, status: str) -> None:
        pass


def tensorboard_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


class TensorBoardBackend(Backend):
    """Per-epoch scalars in ``run_dir/tensorboard``. ``required``: asked for by name, so a missing tensorboard
    package is an error before any work; else (``tracking: auto``) it is skipped quietly."""

    def __init__(self, required: bool = False) -> None:
        self.writer = None
        if required and not tensorboard_installed():
            raise KdkitError("tracking: tensorboard needs the tensorboard package: pip install 'kdkit[track]' "
                             "(or tracking: auto, which writes TensorBoard scalars only when it is installed)")

    def start(self, run_dir: Path, params: Dict[str, Any], resume: bool) -> None:
        if not tensorboard_installed():
            return
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def log_epoch(self, record: Dict[str, Any]) -> None:
        if self.writer is None:
            return
        for key, value in epoch_metrics(record).items():
            self.writer.add_scalar(key, value, record["epoch"])
        self.writer.flush()

    def end(self, status: str) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class MlflowBackend(Backend):
    """One MLflow run per run directory (see the module docstring)."""

    def __init__(self, uri: Optional[str] = None, experiment: str = "kdkit", run_name: Optional[str] = None,
                 artifact_location: Optional[str] = None, parent_run_id: Optional[str] = None,
                 tags: Optional[Dict[str, str]] = None) -> None:
        require_mlflow()
        self.uri, self.experiment, self.run_name = uri, experiment, run_name
        self.artifact_location, self.parent_run_id, self.tags = artifact_location, parent_run_id, dict(tags or {})
        self.client = None
        self.run_id: Optional[str] = None

    def _connect(self, store_dir: Path):
        from mlflow.tracking import MlflowClient

        uri = self.uri or default_uri(store_dir)
        location = self.artifact_location
        if location is None and self.uri is None:
            # A SQLite store's default artifact root is ./mlruns in the current directory: keep them together.
            location = (Path(store_dir).resolve() / DEFAULT_ARTIFACTS).as_uri()
        try:
            self.client = MlflowClient(tracking_uri=uri)
            return self.client, _experiment_id(self.client, self.experiment, location)
        except KdkitError:
            raise
        except Exception as e:  # MLflow raises many types (connection, SQL, permission): one line either way
            raise KdkitError(f"tracking: cannot open the MLflow store {uri}: {_first_line(e)}") from None

    def connect(self, store_dir: Path) -> None:
        self._connect(store_dir)

    def start(self, run_dir: Path, params: Dict[str, Any], resume: bool) -> None:
        run_dir = Path(run_dir)
        client, experiment_id = self._connect(run_dir.parent)
        saved = _read_tracking_file(run_dir) if resume else None
        if saved is not None:
            self.run_id = saved["run_id"]
            try:
                client.get_run(self.run_id)
            except Exception:
                raise KdkitError(f"cannot resume the MLflow run {self.run_id} of {run_dir}: not found in "
                                 f"{client.tracking_uri}") from None
            client.update_run(self.run_id, status="RUNNING")
            return
        tags = {"kdkit.run_dir": str(run_dir.resolve()), **self.tags}
        if self.parent_run_id:
            tags["mlflow.parentRunId"] = self.parent_run_id
        run = client.create_run(experiment_id, run_name=self.run_name or run_dir.name, tags=tags)
        self.run_id = run.info.run_id
        _write_tracking_file(run_dir, {"backend": "mlflow", "tracking_uri": client.tracking_uri,
                                       "experiment_id": experiment_id, "run_id": self.run_id})
        self._log_params(params)

    def _log_params(self, params: Dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, _param_value(v)) for k, v in params.items()]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, params=items[i:i + _BATCH])

    def logged_epochs(self) -> int:
        """The last epoch (step) this run has metrics for; 0 when none."""
        history = self.client.get_metric_history(self.run_id, "epoch_seconds")
        return max((m.step for m in history), default=0)

    def catch_up(self, records: Sequence[Dict[str, Any]]) -> None:
        done = self.logged_epochs()
        for record in records:
            if record.get("epoch", 0) > done:
                self.log_epoch(record)

    def log_epoch(self, record: Dict[str, Any]) -> None:
        from mlflow.entities import Metric

        step = int(record["epoch"])
        now = _now_ms()
        metrics = [Metric(k, v, now, step) for k, v in epoch_metrics(record).items() if math.isfinite(v)]
        self.client.log_batch(self.run_id, metrics=metrics)

    def log_results(self, run_dir: Path, models: Dict[str, Dict[str, Any]]) -> None:
        from mlflow.entities import Metric

        run_dir = Path(run_dir)
        now = _now_ms()
        final = [Metric(f"final_{model}_{k}", float(v), now, 0) for model, m in models.items() for k, v in m.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))]
        if final:
            self.client.log_batch(self.run_id, metrics=final)
        for name in ("config.yaml", "metrics.jsonl", "report.json", "report.html"):
            if (run_dir / name).is_file():
                self.client.log_artifact(self.run_id, str(run_dir / name))
        best = run_dir / "checkpoints" / "best.safetensors"
        if best.is_file():
            self.client.log_artifact(self.run_id, str(best), artifact_path="checkpoints")

    def end(self, status: str) -> None:
        if self.client is not None and self.run_id is not None:
            self.client.set_terminated(self.run_id, status=status)


def _experiment_id(client, name: str, location: Optional[str]) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # another process created it first
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text if len(text) <= PARAM_CHARS else text[:PARAM_CHARS - 3] + "..."


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]


def _read_tracking_file(run_dir: Path) -> Optional[Dict[str, Any]]:
    path = Path(run_dir) / TRACKING_FILE
    if not path.is_file():
        return None  # killed before the MLflow run was created: a new one is started
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise KdkitError(f"cannot resume: {path} is damaged (expected the JSON written by kdkit)") from None
    if not isinstance(data, dict) or not data.get("run_id"):
        raise KdkitError(f"cannot resume: {path} names no MLflow run_id")
    return data


def _write_tracking_file(run_dir: Path, data: Dict[str, Any]) -> None:
    from .rundir import write_text_atomic

    write_text_atomic(Path(run_dir) / TRACKING_FILE, json.dumps(data, indent=2) + "\n")


# ----------------------------------------------------------------------------- what the loop and api see

class Tracking:
    """The backends of one run, behind one small interface (what :func:`kdkit.training.loop.fit` calls)."""

    def __init__(self, backends: Sequence[Backend] = ()) -> None:
        self.backends: List[Backend] = list(backends)
        self.started = False

    @classmethod
    def from_config(cls, tracking: Any, enabled: bool = True) -> "Tracking":
        """The backends a :class:`kdkit.config.TrackingConfig` names (none when not ``enabled``: DDP rank > 0).

        Checks what can be checked before any work (the MLflow extra is installed); writes nothing.
        """
        if not enabled or tracking is None:
            return cls()
        backends: List[Backend] = []
        for name in tracking.backends():
            if name in ("tensorboard", "auto"):
                backends.append(TensorBoardBackend(required=name == "tensorboard"))
            elif name == "mlflow":
                backends.append(MlflowBackend(tracking.uri, tracking.experiment, tracking.run_name,
                                              tracking.artifact_location, tracking.parent_run_id, tracking.tags))
        return cls(backends)

    def connect(self, store_dir: Path) -> None:
        """Open every backend's store (see :meth:`Backend.connect`): call before writing the run directory."""
        for b in self.backends:
            b.connect(Path(store_dir))

    def start(self, run_dir: Path, params: Dict[str, Any], resume: bool = False) -> "Tracking":
        for b in self.backends:
            b.start(Path(run_dir), params, resume)
        self.started = True
        return self

    def catch_up(self, records: Sequence[Dict[str, Any]]) -> None:
        for b in self.backends:
            b.catch_up(records)

    def log_epoch(self, record: Dict[str, Any]) -> None:
        for b in self.backends:
            b.log_epoch(record)

    def log_results(self, run_dir: Path, models: Dict[str, Dict[str, Any]]) -> None:
        for b in self.backends:
            b.log_results(Path(run_dir), models)

    def end(self, status: str = "FINISHED") -> None:
        if self.started:
            for b in self.backends:
                b.end(status)
            self.started = False

    @contextlib.contextmanager
    def session(self, run_dir: Optional[Path], params: Dict[str, Any], resume: bool = False) -> Iterator["Tracking"]:
        """Start the backends on ``run_dir`` (nothing without one) and end them with the run's status:
        FINISHED; KILLED on Ctrl-C or when a sweep prunes the run (Optuna's ``TrialPruned``); FAILED on any
        other error."""
        if run_dir is not None:
            self.start(run_dir, params, resume)
        try:
            yield self
        except BaseException as e:
            stopped = isinstance(e, KeyboardInterrupt) or type(e).__name__ == "TrialPruned"
            self.end("KILLED" if stopped else "FAILED")
            raise
        self.end("FINISHED")


def check_tracking(tracking: Any, out_dir: Optional[str]) -> None:
    """Config checks that need no store: MLflow needs a run directory (its run id and artifacts live there)."""
    if tracking is not None and "mlflow" in tracking.backends() and out_dir is None:
        raise KdkitError("tracking: mlflow needs a run directory (out_dir) for the report and weights it logs; "
                         "set out_dir or tracking: none")


@contextlib.contextmanager
def parent_run(tracking: Any, directory, name: str, params: Optional[Dict[str, Any]] = None) -> Iterator[Any]:
    """A parent MLflow run for a group of runs (a sweep): yields the ``tracking`` config its children use.

    Args:
        tracking: the group's :class:`kdkit.config.TrackingConfig`. Without MLflow in its backends this is a
            no-op that yields ``tracking`` unchanged.
        directory: the group's folder (the sweep directory). The default store is the one a run directory
            there would use, ``mlflow.db`` in its parent folder (so ``kdkit sweep`` with ``out_dir: runs/s``
            and ``kdkit distill`` with ``out_dir: runs/kd`` share ``runs/mlflow.db``); the parent's run id is
            kept in ``directory/tracking.json``, so a resumed group continues the same parent run.
        name: the parent run's name; ``params`` (flattened if nested) are logged on a new parent run.

    Yields:
        A copy of ``tracking`` with ``uri`` set to the store used and ``parent_run_id`` to the parent's id:
        put it in each child's run config (``cfg.model_copy(update={"tracking": child})``) and the child
        runs appear under the parent, in the same store, whatever folder they run in.

    Example::

        with parent_run(cfg.tracking, sweep_dir, "sweep") as child_tracking:
            for trial in trials:
                execute(trial_cfg.model_copy(update={"tracking": child_tracking}), "distill")
    """
    if tracking is None or "mlflow" not in tracking.backends():
        yield tracking
        return
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    backend = MlflowBackend(tracking.uri, tracking.experiment, name, tracking.artifact_location, None,
                            {**tracking.tags, "kdkit.kind": "parent"})
    # The parent's store is the one any run directory beside `directory` uses: mlflow.db in the parent folder.
    backend.uri = tracking.uri or default_uri(directory.resolve().parent)
    if backend.artifact_location is None and tracking.uri is None:
        backend.artifact_location = (directory.resolve().parent / DEFAULT_ARTIFACTS).as_uri()
    session = Tracking([backend])
    resume = (directory / TRACKING_FILE).is_file()
    with session.session(directory, flatten(params or {}), resume=resume):
        yield tracking.model_copy(update={"uri": backend.uri, "artifact_location": backend.artifact_location,
                                          "parent_run_id": backend.run_id})
