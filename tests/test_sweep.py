"""kdkit sweep: the space grammar, method-specific options, grid coverage, the best config reproducing its
trial, resume (finished trials kept, an interrupted one retried), one teacher pass for a whole sweep, pruning."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import kdkit
from kdkit import KdkitError
from kdkit.recipes.sweep import Space, read_sweep_source
from kdkit.recipes.sweep_space import parse_dimension, parse_space_arg, parse_sweep_block, split_args

from .conftest import tiny_config

optuna = pytest.importorskip("optuna")


def _cfg(teacher_run, out, epochs=1, **sweep):
    cfg = tiny_config(out, teacher={"checkpoint": str(teacher_run)}, student={"name": "mlp", "hidden": [16]},
                      method={"name": "kd", "temperature": 4.0, "alpha": 0.9},
                      train={"epochs": epochs, "lr": 0.01, "progress": False, "quiet": True, "threads": 1})
    cfg["sweep"] = sweep
    return cfg


# ----------------------------------------------------------------------------- grammar (no training)

@pytest.mark.parametrize("spec, why", [
    ("1..", None), ("8..1", "range is empty"), ("0..1:lgo", None), ("0..1:log", "LO > 0"),
    ("1.5..3:int", "integer ends"), ("0..1/1", "N >= 2"), ("[kd, dist", "not valid YAML"), ("[]", "at least one"),
    ("[kd,kd]", "twice"),
])
def test_malformed_spec_is_one_line_naming_spec_and_grammar(spec, why):
    with pytest.raises(KdkitError) as e:
        parse_dimension(*parse_space_arg(f"method.temperature={spec}"))
    msg = str(e.value)
    assert "\n" not in msg and "method.temperature=" in msg and "expected KEY=[A,B,...]" in msg
    if why:
        assert why in msg


def test_spec_values_parsed():
    assert parse_dimension("a", "0..1/5").choices == (0.0, 0.25, 0.5, 0.75, 1.0)
    assert parse_dimension("a", "1..8/4:log").choices == (1.0, 2.0, 4.0, 8.0)  # 8^(i/3)
    d = parse_dimension("a", "16..256:log:int")
    assert (d.low, d.high, d.log, d.integer) == (16, 256, True, True)
    d = parse_dimension("a", "0..1")  # integers written, floats meant (alpha=0..1)
    assert (d.low, d.high, d.integer) == (0.0, 1.0, False)
    space, overrides = split_args(["method.name=[kd,dist]", "train.lr=1e-4..1e-2:log", "train.epochs=3",
                                   "teacher.checkpoint=../runs/t", "student.hidden=[[64,32]]"])
    assert space == {"method.name": ["kd", "dist"], "train.lr": "1e-4..1e-2:log", "student.hidden": [[64, 32]]}
    assert overrides == ["train.epochs=3", "teacher.checkpoint=../runs/t"]


def test_sweep_block_is_typed(tmp_path):
    with pytest.raises(KdkitError, match=r"unknown key 'sweep.trails'; allowed here: trials"):
        parse_sweep_block({"trails": 3}, "c.yaml")
    with pytest.raises(KdkitError, match=r"sweep.sampler: expected 'tpe', 'random' or 'grid'"):
        parse_sweep_block({"sampler": "bayes"}, "c.yaml")
    with pytest.raises(KdkitError, match=r"search space method.alpha='0..'"):
        parse_sweep_block({"space": {"method.alpha": "0.."}}, "c.yaml")


def test_method_specific_options_apply_only_where_accepted(teacher_run, tmp_path):
    base, block = read_sweep_source(_cfg(teacher_run, tmp_path / "s"))
    space = Space(base, {"method.name": ["kd", "dist"], "method.alpha": "0..1", "method.beta": "0.5..4"}, "tpe")
    # dist takes beta but not alpha: TPE/random do not draw alpha for it (FixedTrial fails on a param it lacks)
    values = space.suggest(optuna.trial.FixedTrial({"method.name": "dist", "method.beta": 3.0}))
    assert values == {"method.name": "dist", "method.beta": 3.0}
    cfg, ignored = space.config(values, tmp_path / "t", None)
    assert cfg.method.options() == {"temperature": 4.0, "beta": 3.0}  # the base's alpha dropped, temperature kept
    assert ignored == ["method.alpha"]
    values = space.suggest(optuna.trial.FixedTrial({"method.name": "kd", "method.alpha": 0.25}))
    cfg, ignored = space.config(values, tmp_path / "t", None)
    assert cfg.method.options() == {"temperature": 4.0, "alpha": 0.25} and ignored == []
    # the grid sampler draws every point; the option is recorded as ignored instead
    grid = Space(base, {"method.name": ["kd", "dist"], "method.alpha": [0.1, 0.5]}, "grid")
    cfg, ignored = grid.config({"method.name": "dist", "method.alpha": 0.5}, tmp_path / "t", None)
    assert "alpha" not in cfg.method.options() and ignored == ["method.alpha"]
    with pytest.raises(KdkitError, match="method.gamma is an option of none of the methods searched"):
        Space(base, {"method.name": ["kd", "kd_ls"], "method.gamma": "1..2"}, "tpe")
    with pytest.raises(KdkitError, match="grid sampler needs points, not a range: method.alpha"):
        Space(base, {"method.alpha": "0..1"}, "grid")


def test_without_optuna_the_error_names_the_extra(teacher_run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)
    with pytest.raises(KdkitError, match=r"optional extra 'sweep': pip install 'kdkit\[sweep\]'"):
        kdkit.sweep(_cfg(teacher_run, tmp_path / "s", trials=1), space={"method.alpha": "0..1"}, quiet=True)


def test_an_unknown_sweep_metric_is_refused_before_the_first_trial(teacher_run, tmp_path):
    out = tmp_path / "s"
    with pytest.raises(KdkitError, match="sweep.metric 'val_bogus' is not a validation metric.*val_agreement"):
        kdkit.sweep(_cfg(teacher_run, out, trials=1, metric="val_bogus"), space={"method.alpha": "0..1"},
                    quiet=True)
    assert not out.exists()  # nothing written: the retry is not refused


def test_the_declared_validation_metrics_are_what_validation_reports():
    run = kdkit.distill(kdkit.create_model("cnn_small", num_classes=10, input_shape=(1, 8, 8), width=8),
                        kdkit.create_model("mlp", num_classes=10, input_shape=(1, 8, 8), hidden=[8]),
                        *_digits_slice(), epochs=1, progress=False, quiet=True)
    from kdkit.tasks import task_for

    reported = {k[len("val_"):] for k in run.history[0] if k.startswith("val_")}
    assert reported == set(task_for(_digits_slice()[0]).validation_metrics(teacher=True))


def _digits_slice():
    splits = kdkit.DATASETS.get("digits")()
    return splits.train, splits.val


# ----------------------------------------------------------------------------- sweeps on digits

def _puts(monkeypatch):
    """Count the teacher rows written into caches (an independent count of teacher passes)."""
    from kdkit.teacher.cache import TeacherCache

    rows = []
    orig = TeacherCache.put

    def put(self, index, outputs):
        rows.append(len(index))
        return orig(self, index, outputs)

    monkeypatch.setattr(TeacherCache, "put", put)
    return rows


@pytest.fixture(scope="module")
def grid_sweep(teacher_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("grid") / "sweep"
    mp = pytest.MonkeyPatch()
    rows = _puts(mp)
    try:
        result = kdkit.sweep(_cfg(teacher_run, out, epochs=2, trials=10, sampler="grid"),
                             space={"method.temperature": [1.0, 4.0], "method.alpha": [0.3, 0.9]}, quiet=True)
    finally:
        mp.undo()
    return result, rows


def test_grid_covers_the_grid_and_stops(grid_sweep):
    result, _ = grid_sweep
    assert [t["state"] for t in result.trials] == ["complete"] * 4  # 4 points, although trials=10
    seen = {(t["params"]["method.temperature"], t["params"]["method.alpha"]) for t in result.trials}
    assert seen == set(itertools.product([1.0, 4.0], [0.3, 0.9]))
    for t in result.trials:  # each trial an ordinary run directory with the values it ran with
        cfg = kdkit.load_config(Path(t["run_dir"]) / "config.yaml")
        assert (cfg.method.options()["temperature"], cfg.method.options()["alpha"]) == \
            (t["params"]["method.temperature"], t["params"]["method.alpha"])
    summary = json.loads((result.dir / "sweep.json").read_text())
    assert summary["best"]["trial"] == result.best_trial and len(summary["trials"]) == 4
    page = (result.dir / "report.html").read_text()
    assert page.count("<tr") == 5 and "Parallel coordinates" in page and "Best trial's curves" in page


def test_teacher_ran_once_for_the_whole_sweep(grid_sweep, teacher_run):
    result, rows = grid_sweep
    n_train = 256  # tiny_config's train_subset
    assert sum(rows) == n_train  # one teacher pass, for 4 trials
    t = result.teacher
    assert (t["passes_done"], t["trials_on_shared_cache"], t["trials_live_teacher"]) == (1, 4, 0)
    assert t["passes_if_live_teacher"] == 4 * 2 and t["saved_vs_live_teacher"] == 8 - 1
    assert t["saved_vs_cache_per_trial"] == 4 - 1


def test_best_config_reproduces_the_best_trial(grid_sweep):
    result, _ = grid_sweep
    best_yaml = result.dir / "best.yaml"
    cfg = kdkit.load_config(best_yaml)
    assert cfg.out_dir == str(result.dir / "best")
    from kdkit.cli import run as cli

    assert cli(["distill", str(best_yaml), "-q"]) == 0
    trial_dir = Path(next(t["run_dir"] for t in result.trials if t["trial"] == result.best_trial))
    again = [json.loads(x)["val_accuracy"] for x in (result.dir / "best" / "metrics.jsonl").read_text().splitlines()]
    before = [json.loads(x)["val_accuracy"] for x in (trial_dir / "metrics.jsonl").read_text().splitlines()]
    assert again == before
    kept = json.loads((result.dir / "best" / "report.json").read_text())["kept_epoch"]
    assert again[kept - 1] == pytest.approx(result.best_value, abs=0)


def test_resume_keeps_finished_trials_and_retries_an_interrupted_one(teacher_run, tmp_path, monkeypatch):
    cfg = _cfg(teacher_run, tmp_path / "s", trials=2, sampler="random", pruner="none")
    space = {"method.temperature": "1..8:log"}
    first = kdkit.sweep(cfg, space=space, quiet=True)
    assert [t["state"] for t in first.trials] == ["complete"] * 2
    stamps = {t["trial"]: (Path(t["run_dir"]) / "metrics.jsonl").stat().st_mtime_ns for t in first.trials}
    with pytest.raises(KdkitError, match="already holds study|already exists"):
        kdkit.sweep(cfg, space=space, quiet=True)  # without resume nothing is overwritten
    import kdkit.api as api

    real = api.execute

    def interrupted(cfg, command, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "execute", interrupted)
    with pytest.raises(KeyboardInterrupt):
        kdkit.sweep(cfg, space=space, trials=4, resume=True, quiet=True)
    monkeypatch.setattr(api, "execute", real)
    result = kdkit.sweep(cfg, space=space, trials=4, resume=True, quiet=True)
    states = {t["trial"]: t["state"] for t in result.trials}
    assert states == {0: "complete", 1: "complete", 2: "fail", 3: "complete", 4: "complete"}
    retry = next(t for t in result.trials if t["retry_of"] == 2)
    assert retry["params"] == next(t for t in result.trials if t["trial"] == 2)["params"]
    for n, stamp in stamps.items():  # finished trials were not rerun
        assert (Path(result.trials[n]["run_dir"]) / "metrics.jsonl").stat().st_mtime_ns == stamp
    with pytest.raises(KdkitError, match="cannot resume: the study was created with search space"):
        kdkit.sweep(cfg, space={"method.temperature": "1..4:log"}, trials=5, resume=True, quiet=True)


def test_a_trial_whose_process_died_is_failed_and_retried(teacher_run, tmp_path):
    cfg = _cfg(teacher_run, tmp_path / "s", trials=1, sampler="random", pruner="none", heartbeat_seconds=1)
    space = {"method.temperature": "1..8:log"}
    kdkit.sweep(cfg, space=space, quiet=True)
    # a trial left RUNNING by a killed process: it sent one heartbeat, then nothing
    study = optuna.load_study(study_name="kdkit-sweep", storage=f"sqlite:///{tmp_path / 's' / 'study.db'}")
    dead = study.ask()
    dead.suggest_float("method.temperature", 1.0, 8.0, log=True)
    study._storage.record_heartbeat(dead._trial_id)
    time.sleep(3.5)  # past the grace period (3 heartbeats)
    result = kdkit.sweep(cfg, space=space, trials=2, resume=True, quiet=True)
    states = {t["trial"]: t["state"] for t in result.trials}
    assert states == {0: "complete", 1: "fail", 2: "complete"}
    assert result.trials[2]["retry_of"] == 1
    assert result.trials[2]["params"] == result.trials[1]["params"]


def test_pruning_stops_a_poor_trial(teacher_run, tmp_path):
    out = tmp_path / "s"
    out.mkdir()
    # crafted: a good trial first (lr 0.01), then one that barely moves (lr 1e-6); median pruning from epoch 1
    study = optuna.create_study(study_name="kdkit-sweep", storage=f"sqlite:///{out / 'study.db'}",
                                direction="maximize")
    study.enqueue_trial({"train.lr": 0.01})
    study.enqueue_trial({"train.lr": 1e-6})
    cfg = _cfg(teacher_run, out, epochs=3, trials=2, sampler="random", startup_trials=1, warmup_epochs=0)
    result = kdkit.sweep(cfg, space={"train.lr": "1e-6..1e-2:log"}, resume=True, quiet=True)
    assert [t["state"] for t in result.trials] == ["complete", "pruned"]
    assert result.trials[1]["params"]["train.lr"] == 1e-6 and result.trials[1]["epochs"] == 1
    lines = (Path(result.trials[1]["run_dir"]) / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1  # the run stopped after the epoch that was pruned


@pytest.mark.slow
def test_two_processes_share_one_sqlite_study(teacher_run, tmp_path):
    cfg = _cfg(teacher_run, tmp_path / "s", epochs=2, trials=6, sampler="random", pruner="none")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "kdkit", "sweep", str(path), "method.temperature=1..8:log", "-q"]
    a = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (tmp_path / "s" / "trials").is_dir() and time.time() < deadline:
        time.sleep(0.2)
    b = subprocess.Popen(cmd + ["--resume"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert a.wait(300) == 0, a.stderr.read().decode()[-2000:]
    assert b.wait(300) == 0, b.stderr.read().decode()[-2000:]
    summary = json.loads((tmp_path / "s" / "sweep.json").read_text())
    done = [t for t in summary["trials"] if t["state"] == "complete"]
    assert 6 <= len(done) <= 7  # each process stops at the target; at most one extra when both start at once
    assert len({t["run_dir"] for t in done}) == len(done)
    assert summary["teacher"]["shared_cache_builds"] == 1  # one process built it, the other reused it


def test_trials_are_mlflow_children_of_the_sweep_run(teacher_run, tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    cfg = _cfg(teacher_run, tmp_path / "s", trials=2, sampler="random", pruner="none")
    cfg["tracking"] = {"backend": "mlflow"}
    result = kdkit.sweep(cfg, space={"method.temperature": "1..8:log"}, quiet=True)
    client = MlflowClient(tracking_uri=f"sqlite:///{(tmp_path / 'mlflow.db').resolve()}")  # beside the runs' store
    exp = client.get_experiment_by_name("kdkit")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("kdkit.kind") == "parent"]
    assert len(parents) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(r.data.tags["kdkit.sweep_trial"] for r in children) == ["0", "1"]
    for r in children:  # each child logged its trial's values and per-epoch metrics
        trial = result.trials[int(r.data.tags["kdkit.sweep_trial"])]
        assert float(r.data.params["method.temperature"]) == pytest.approx(trial["params"]["method.temperature"])
        assert trial["epochs"] == 1 and r.data.metrics["val_accuracy"] == pytest.approx(trial["value"])


@pytest.mark.slow
@pytest.mark.parametrize("quiet", [[], ["-q"]])
def test_ctrl_c_during_a_sweep_is_one_line_with_the_resume_command(tmp_path, quiet):
    import signal

    cfg = tiny_config(tmp_path / "s", model={"name": "mlp", "hidden": [16]},
                      train={"epochs": 40, "lr": 0.01, "progress": False, "threads": 1})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen([sys.executable, "-m", "kdkit", *quiet, "sweep", str(path), "train.lr=1e-3..1e-2:log",
                             "--trials", "500", "--pruner", "none"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=Path(__file__).resolve().parents[1])
    deadline = time.time() + 120
    while not any((tmp_path / "s" / "trials").glob("*/metrics.jsonl")) and time.time() < deadline:
        time.sleep(0.1)  # inside a trial
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "Traceback" not in err and "failed" not in err
    assert err.strip().splitlines()[-1] == "interrupted; continue the same study with the same command and --resume"


def test_a_quiet_sweep_prints_no_line_per_trial_not_even_the_cache(teacher_run, tmp_path, capsys):
    cfg = _cfg(teacher_run, tmp_path / "s", trials=2, sampler="random", pruner="none")
    cfg["train"]["quiet"] = False  # the trials are quiet whatever the base config says
    kdkit.sweep(cfg, space={"method.temperature": "1..8:log"}, quiet=True)
    captured = capsys.readouterr()
    assert "teacher cache" not in captured.err + captured.out and "warning:" not in captured.err
    assert len(list((tmp_path / "s" / "trials").iterdir())) == 2
