"""Experiment tracking: what a digits distillation leaves in the MLflow store, read back with MlflowClient."""

from __future__ import annotations

import contextlib
import json
import sys

import pytest
import torch
import yaml

import kdkit
from kdkit.config import load_config
from kdkit.errors import KdkitError
from kdkit.training import tracking as tr
from tests.conftest import tiny_config

mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _client(store_dir):
    return MlflowClient(tracking_uri=f"sqlite:///{store_dir / 'mlflow.db'}")


def _only_run(client):
    exp = client.get_experiment_by_name("kdkit")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    return runs[0]


def _distill(out, teacher_run, **extra):
    cfg = tiny_config(out, student={"name": "mlp", "hidden": [16]}, teacher={"checkpoint": str(teacher_run)},
                      method={"name": "kd", "temperature": 3.0, "alpha": 0.7}, tracking="mlflow", **extra)
    return kdkit.run_config(load_config(cfg), "distill")


def _flat_yaml(path):
    out = {}

    def walk(d, prefix):
        for k, v in d.items():
            key = f"{prefix}.{k}" if prefix else k
            if isinstance(v, dict):
                walk(v, key)
            else:
                out[key] = v
    walk(yaml.safe_load(path.read_text()), "")
    return out


def _as_param(v):
    """How a config value reads as an MLflow parameter (strings): written independently of kdkit's code."""
    if isinstance(v, str):
        return v
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return str(v)


def test_mlflow_store_holds_params_metrics_and_artifacts(tmp_path, teacher_run):
    out = tmp_path / "runs" / "kd"
    run = _distill(out, teacher_run)
    client = _client(tmp_path / "runs")  # default store: SQLite beside the run directory
    logged = _only_run(client)
    assert logged.info.status == "FINISHED" and logged.info.run_name == "kd"
    assert json.loads((out / "tracking.json").read_text())["run_id"] == logged.info.run_id

    # every key of the resolved config.yaml, with its value
    flat = _flat_yaml(out / "config.yaml")
    assert logged.data.params == {k: _as_param(v) for k, v in flat.items()}
    assert logged.data.params["method.temperature"] == "3.0" and logged.data.params["train.epochs"] == "2"

    # one value per epoch, equal to metrics.jsonl, for every number it holds
    records = _metrics(out)
    assert len(records) == 2
    keys = {k for r in records for k in r if k != "epoch"}
    assert {"train_loss", "train_kd", "val_accuracy", "lr"} <= keys
    for key in keys:
        history = sorted(client.get_metric_history(logged.info.run_id, key), key=lambda m: m.step)
        assert [m.step for m in history] == [1, 2], key
        assert [m.value for m in history] == pytest.approx([r[key] for r in records], rel=1e-12), key

    # the report's numbers, and the files
    assert logged.data.metrics["final_student_accuracy"] == pytest.approx(run.metrics["student"]["accuracy"])
    names = {f.path for f in client.list_artifacts(logged.info.run_id)}
    assert {"config.yaml", "metrics.jsonl", "report.json", "report.html", "checkpoints"} <= names
    weights = {f.path for f in client.list_artifacts(logged.info.run_id, "checkpoints")}
    assert weights == {"checkpoints/best.safetensors"}
    local = client.download_artifacts(logged.info.run_id, "checkpoints/best.safetensors", str(tmp_path / "dl"))
    assert open(local, "rb").read() == (out / "checkpoints" / "best.safetensors").read_bytes()
    assert (tmp_path / "runs" / "mlartifacts").is_dir()  # artifacts beside the store, not ./mlruns


def test_resume_continues_the_same_mlflow_run(tmp_path, teacher_run, monkeypatch):
    """Killed after epoch 1 was saved but before it was sent: the resume sends it, then epoch 2, in one run."""
    out = tmp_path / "runs" / "kd"
    real = tr.MlflowBackend.log_epoch

    def killed(self, record):
        raise KeyboardInterrupt

    monkeypatch.setattr(tr.MlflowBackend, "log_epoch", killed)
    with pytest.raises(KeyboardInterrupt):
        _distill(out, teacher_run)
    client = _client(tmp_path / "runs")
    first = _only_run(client)
    assert first.info.status == "KILLED" and len(_metrics(out)) == 1
    assert client.get_metric_history(first.info.run_id, "train_loss") == []

    monkeypatch.setattr(tr.MlflowBackend, "log_epoch", real)
    cfg = load_config(out / "config.yaml")
    kdkit.run_config(cfg, "distill", resume=True)
    again = _only_run(client)
    assert again.info.run_id == first.info.run_id and again.info.status == "FINISHED"
    records = _metrics(out)
    history = sorted(client.get_metric_history(again.info.run_id, "train_loss"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in history] == [(r["epoch"], pytest.approx(r["train_loss"])) for r in records]
    assert len(history) == 2


def test_parent_run_holds_children(tmp_path, teacher_run):
    sweep = tmp_path / "sweep"
    parent_cfg = load_config({"tracking": "mlflow"}).tracking
    with tr.parent_run(parent_cfg, sweep, "my-sweep", {"trials": 2}) as child:
        # the store every run beside the sweep directory uses: mlflow.db in its parent folder
        assert child.uri == f"sqlite:///{(tmp_path / 'mlflow.db').resolve()}" and child.parent_run_id
        for i in range(2):  # trials in a deeper folder still land in the parent's store
            cfg = tiny_config(sweep / "trials" / f"t{i}", student={"name": "mlp", "hidden": [8]},
                              teacher={"checkpoint": str(teacher_run)}, train={"epochs": 1, "progress": False})
            kdkit.run_config(load_config(cfg).model_copy(update={"tracking": child}), "distill")
    client = _client(tmp_path)
    exp = client.get_experiment_by_name("kdkit")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {"my-sweep", "t0", "t1"}
    parent = runs["my-sweep"]
    assert parent.info.status == "FINISHED" and parent.data.params == {"trials": "2"}
    for name in ("t0", "t1"):
        assert runs[name].data.tags["mlflow.parentRunId"] == parent.info.run_id
    # a resumed sweep continues the same parent run
    with tr.parent_run(parent_cfg, sweep, "my-sweep") as child2:
        assert child2.parent_run_id == parent.info.run_id


def test_tracking_config_forms():
    assert load_config({"tracking": "mlflow"}).tracking.backends() == ["mlflow"]
    assert load_config({"tracking": ["tensorboard", "mlflow"]}).tracking.backends() == ["tensorboard", "mlflow"]
    assert load_config({}).tracking.backends() == ["auto"]  # TensorBoard when installed, quietly nothing else
    assert load_config({"tracking": "none"}).tracking.backends() == []
    cfg = load_config({"tracking": {"backend": "mlflow", "uri": "http://x:5000", "experiment": "e"}})
    assert (cfg.tracking.uri, cfg.tracking.experiment) == ("http://x:5000", "e")
    with pytest.raises(KdkitError, match="tracking.backend: expected one of auto, tensorboard, mlflow, none"):
        load_config({"tracking": "mlfow"})
    with pytest.raises(KdkitError, match="unknown key 'tracking.url'"):
        load_config({"tracking": {"backend": "mlflow", "url": "x"}})


def test_mlflow_without_out_dir_is_refused_before_work():
    net = torch.nn.Linear(4, 3)
    data = (torch.randn(16, 4), torch.randint(0, 3, (16,)))
    with pytest.raises(KdkitError, match="tracking: mlflow needs a run directory"):
        kdkit.train(net, data, epochs=1, tracking="mlflow")


def test_missing_extra_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if mlflow were not installed
    cfg = tiny_config(tmp_path / "r", model={"name": "mlp", "hidden": [4]}, tracking="mlflow")
    with pytest.raises(KdkitError, match=r"extra 'track': pip install 'kdkit\[track\]'"):
        kdkit.run_config(load_config(cfg), "train")
    assert not (tmp_path / "r").exists()  # refused before the run directory was made


def test_tensorboard_default_writes_scalars(tmp_path):
    """The default backend: TensorBoard event files when the package is installed (skipped otherwise)."""
    pytest.importorskip("tensorboard")
    out = tmp_path / "r"
    kdkit.run_config(load_config(tiny_config(out, model={"name": "mlp", "hidden": [4]})), "train")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    values = [e.value for e in acc.Scalars("train_loss")]
    assert values == pytest.approx([r["train_loss"] for r in _metrics(out)], rel=1e-6)


class _Recorder(tr.Backend):
    def __init__(self):
        self.calls = []

    def start(self, run_dir, params, resume):
        self.calls.append(("start", resume))

    def end(self, status):
        self.calls.append(("end", status))


class TrialPruned(Exception):  # what Optuna raises to stop a poor trial (matched by name: no optuna import)
    pass


@pytest.mark.parametrize("raised, status", [(None, "FINISHED"), (KeyboardInterrupt, "KILLED"),
                                            (TrialPruned, "KILLED"), (KdkitError, "FAILED")])
def test_session_ends_with_the_runs_status(tmp_path, raised, status):
    rec = _Recorder()
    with contextlib.suppress(BaseException):
        with tr.Tracking([rec]).session(tmp_path, {}, resume=True):
            if raised is not None:
                raise raised("stop")
    assert rec.calls == [("start", True), ("end", status)]


def test_an_mlflow_store_that_cannot_be_opened_fails_before_the_run_directory_is_written(tmp_path):
    pytest.importorskip("mlflow")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = tmp_path / "run"
    cfg = tiny_config(out, model={"name": "mlp", "hidden": [8]}, train={"epochs": 1, "progress": False},
                      tracking={"backend": "mlflow", "uri": f"sqlite:///{blocker}/inside/mlflow.db"})
    with pytest.raises(KdkitError, match="tracking: cannot open the MLflow store"):
        kdkit.run_config(load_config(cfg), "train")
    assert not out.exists()  # the retry, with a store that works, is not refused
    cfg["tracking"] = {"backend": "mlflow"}  # the default store beside the run, its artifacts with it
    assert kdkit.run_config(load_config(cfg), "train").dir == out


def test_tensorboard_asked_for_by_name_without_its_package_is_an_error(monkeypatch):
    monkeypatch.setattr(tr, "tensorboard_installed", lambda: False)
    with pytest.raises(KdkitError, match="tracking: tensorboard needs the tensorboard package"):
        tr.Tracking.from_config(load_config({"tracking": "tensorboard"}).tracking)
    quiet = tr.Tracking.from_config(load_config({}).tracking)  # auto: skipped, nothing written
    assert len(quiet.backends) == 1 and quiet.backends[0].writer is None


def test_an_explicit_tensorboard_without_its_package_stops_the_cli_before_the_run_dir(tmp_path, monkeypatch, capsys):
    from kdkit.cli import main

    monkeypatch.setattr(tr, "tensorboard_installed", lambda: False)
    with pytest.raises(SystemExit) as exit_:
        main(["train", "-q", "configs/digits_scratch.yaml", "tracking=tensorboard", f"out_dir={tmp_path / 'r'}"])
    assert exit_.value.code == 2 and not (tmp_path / "r").exists()
    assert capsys.readouterr().err.strip().startswith("error: tracking: tensorboard needs")
