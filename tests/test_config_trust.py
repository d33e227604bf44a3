"""Configs that read as written, honest one-line messages, clean logs and thread control (issue 8: items 8,
10, 11, 12, 17 and 18, config parts)."""

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from kdkit.api import evaluate_run
from kdkit.config import ALIAS_BUDGET, load_config, parse_override
from kdkit.errors import KdkitError
from kdkit.training import progress
from kdkit.training.progress import Progress, progress_bar, progress_for
from kdkit.training.threads import resolve_threads
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]


def _error(source, overrides=()):
    """The KdkitError message of load_config, checked to be one short line."""
    with pytest.raises(KdkitError) as e:
        load_config(source, overrides)
    text = str(e.value)
    assert "\n" not in text and len(text) < 300, text
    return text


def _file(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


# ---- YAML booleans: only true/false -------------------------------------------------------------------------

def test_teacher_cache_off_in_a_file_and_an_override(tmp_path):
    # YAML 1.1 reads `off` as False, which the Literal field rejected although the README lists it.
    assert load_config(_file(tmp_path, "train: {teacher_cache: off}")).train.teacher_cache == "off"
    assert load_config({}, ["train.teacher_cache=off"]).train.teacher_cache == "off"


def test_yes_no_on_stay_strings_true_false_stay_booleans():
    assert parse_override("method.mode=yes")[1] == "yes"
    assert parse_override("method.mode=on")[1] == "on"
    assert parse_override("method.mode=no")[1] == "no"
    assert parse_override("a=true")[1] is True and parse_override("a=False")[1] is False


def test_float_without_a_dot_is_a_float():
    # YAML 1.1 reads 1e-3 as the string '1e-3'; a method option would then fail deep inside the method.
    assert load_config({}, ["method.temperature=4e0", "method.alpha=9E-1"]).method.options() == {
        "temperature": 4.0, "alpha": 0.9}
    assert load_config({}, ["train.epochs=12"]).train.epochs == 12  # integers stay integers


# ---- duplicate keys, aliases, tags, binary, lists -----------------------------------------------------------

def test_duplicate_key_names_key_and_lines(tmp_path):
    msg = _error(_file(tmp_path, "seed: 0\ntrain:\n  epochs: 3\n  lr: 0.1\n  epochs: 30\n"))
    assert "duplicate key 'epochs'" in msg and "lines 3 and 5" in msg


def test_merge_keys_may_be_overridden(tmp_path):
    # A key brought in by a merge (<<) and then set again is an override, not a duplicate.
    cfg = load_config(_file(tmp_path, "model: {<<: {name: mlp, hidden: [8]}, hidden: [4]}\n"))
    assert cfg.model.options() == {"hidden": [4]} and cfg.model.name == "mlp"


def test_alias_bomb_is_one_short_line(tmp_path):
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    text = "\n".join(lines) + "\n"
    assert len(text) < 450
    msg = _error(_file(tmp_path, text))
    assert "aliases expand to" in msg and str(ALIAS_BUDGET) in msg


def test_small_aliases_are_fine(tmp_path):
    text = "student: &s {name: mlp, hidden: [16]}\nmodel: *s\n"
    cfg = load_config(_file(tmp_path, text + "teacher: {name: mlp}\n"))
    assert cfg.model.options() == {"hidden": [16]}


def test_python_tag_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "MARKER"
    text = f"seed: !!python/object/apply:os.system ['touch {marker}']\n"
    msg = _error(_file(tmp_path, text))
    assert "is not allowed" in msg and "python/object/apply" in msg
    assert not marker.exists()


def test_binary_garbage_is_one_line(tmp_path):
    msg = _error(_file(tmp_path, bytes(range(256)) * 4))
    assert "not UTF-8" in msg


def test_top_level_list_is_one_line(tmp_path):
    msg = _error(_file(tmp_path, "- seed: 0\n- train: {}\n"))
    assert "mapping of sections" in msg and "list" in msg


def test_run_directory_configs_go_through_the_same_checks(tmp_path):
    # `kdkit evaluate RUN_DIR` (and teacher.checkpoint=RUN_DIR) read the run's config.yaml with load_config.
    for i, text in enumerate([b"\xff\xfe\x00garbage", b"- 1\n- 2\n", b"a: 1\na: 2\n",
                              b"seed: !!python/name:os.system\n"]):
        run = tmp_path / f"run{i}"
        run.mkdir()
        (run / "config.yaml").write_bytes(text)
        with pytest.raises(KdkitError) as e:
            evaluate_run(run)
        assert "\n" not in str(e.value) and str(run) in str(e.value)


# ---- overrides and type errors ------------------------------------------------------------------------------

def test_override_through_a_setting_names_it():
    assert "train.epochs is a setting, not a section" in _error({}, ["train.epochs.x=1"])
    assert "seed is a setting" in _error({}, ["seed.value=1"])
    assert "teachers is a list" in _error({}, ["teachers.0.name=mlp"])
    assert "model.hidden is [8], not a section" in _error({"model": {"name": "mlp", "hidden": [8]}},
                                                          ["model.hidden.x=1"])
    assert "key.path=value" in _error({}, ["train..epochs=1"])


def test_type_error_names_path_expectation_and_truncated_value():
    msg = _error({}, ["data.batch_size=" + "x" * 5000])
    assert msg.startswith("config: data.batch_size: expected a valid integer") and "given 'xxx" in msg
    assert len(msg) < 200
    msg = _error({}, ["train.lr=fast"])
    assert "train.lr" in msg and "expected a valid number" in msg and "'fast'" in msg


def test_overrides_do_not_change_the_callers_dict():
    raw = {"train": {"epochs": 3}}
    load_config(raw, ["train.epochs=5"])
    assert raw == {"train": {"epochs": 3}}


# ---- threads ------------------------------------------------------------------------------------------------

def test_train_threads_values():
    assert load_config({}).train.threads == "auto"
    assert load_config({}, ["train.threads=3"]).train.threads == 3
    for bad in ("0", "-2", "true", "many", "1.5"):
        assert "train.threads: expected an integer >= 1 or 'auto'" in _error({}, [f"train.threads={bad}"])


def test_resolve_threads():
    assert resolve_threads(3, env={}) == 3
    assert resolve_threads("auto", cpus=2, env={}) == 1  # a 2-core machine: one thread (measured, see module)
    assert resolve_threads("auto", cpus=1, env={}) == 1
    assert resolve_threads("auto", cpus=16, env={}) == 8
    assert resolve_threads("auto", cpus=16, env={"OMP_NUM_THREADS": "2"}) == 2  # the user's explicit choice
    assert resolve_threads("auto", cpus=16, env={"OMP_NUM_THREADS": "junk"}) == 8
    for bad in (0, True, "2", None):
        with pytest.raises(KdkitError):
            resolve_threads(bad)


# ---- progress output ----------------------------------------------------------------------------------------

class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture
def reset_progress():
    yield
    progress.configure()


RECORD = {"epoch": 1, "train_loss": 0.5, "epoch_seconds": 0.25}


def test_no_bar_when_not_a_terminal(reset_progress):
    stream = io.StringIO()
    out = Progress(bar=True, stream=stream)
    batches = [1, 2, 3]
    assert out(batches, total=3, desc="model 1/1") is batches  # not wrapped: nothing drawn
    out.epoch("model", RECORD)
    assert stream.getvalue() == "model epoch 1: train_loss=0.5000 (0.2s)\n"


def test_bar_on_a_terminal_and_levels(reset_progress):
    term = _Terminal()
    assert list(Progress(bar=True, stream=term)(range(3), total=3, desc="x")) == [0, 1, 2]
    assert "\r" in term.getvalue()  # a bar was drawn
    term = _Terminal()
    lines = Progress(bar=False, stream=term)
    assert lines(range(3), total=3) == range(3)
    lines.line("hello")
    assert term.getvalue() == "hello\n"
    quiet = Progress(quiet=True, stream=term)
    quiet.epoch("model", RECORD)
    assert term.getvalue() == "hello\n"


def test_progress_for_and_process_limits(reset_progress):
    cfg = load_config({}, ["train.quiet=true"]).train
    assert progress_for(cfg).quiet and not progress_for(load_config({}).train).quiet
    assert progress_for(load_config({}).train, main=False).quiet  # only rank 0 prints
    progress.configure(quiet=True, bar=False)  # what `kdkit --quiet` sets
    assert progress_bar(True).quiet and progress_for(load_config({}).train).quiet


# ---- the command line (each in its own process, as a user runs it) -----------------------------------------

def _kdkit(*args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "kdkit", *args], capture_output=True, text=True, env=env,
                          cwd=kw.get("cwd", ROOT), timeout=300)


def test_version_and_plain_kdkit():
    from kdkit import __version__

    r = _kdkit("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"kdkit {__version__}"
    r = _kdkit()
    assert r.returncode == 0 and "usage: kdkit" in r.stdout and "distill" in r.stdout and r.stderr == ""


def test_redirected_log_is_one_clean_line_per_epoch(tmp_path):
    cfg = tiny_config(tmp_path / "run", model={"name": "mlp", "hidden": [8]}, train={"epochs": 3, "lr": 0.01})
    path = _file(tmp_path, yaml.safe_dump(cfg))
    r = _kdkit("train", str(path), "--threads", "1")
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stderr and "it/s" not in r.stderr
    epoch_lines = [line for line in r.stderr.splitlines() if line.startswith("model epoch ")]
    assert [line.split(":")[0] for line in epoch_lines] == ["model epoch 1", "model epoch 2", "model epoch 3"]
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["train"]["threads"] == 1

    cfg["out_dir"] = str(tmp_path / "quiet")
    r = _kdkit("--quiet", "train", _file(tmp_path, yaml.safe_dump(cfg), "q.yaml").as_posix())
    assert r.returncode == 0 and r.stderr.strip() == "", r.stderr
    assert "accuracy" in r.stdout and "run directory" in r.stdout


def test_bad_threads_flag_exits_2():
    r = _kdkit("ls", "--threads", "0")
    assert r.returncode == 2 and "--threads" in r.stderr


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child process")
def test_ctrl_c_names_the_real_run_directory(tmp_path):
    out = tmp_path / "long-run"
    cfg = tiny_config(out, model={"name": "mlp", "hidden": [8]}, train={"epochs": 100000, "lr": 0.01})
    path = _file(tmp_path, yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "kdkit", "train", str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        deadline = time.time() + 120
        while not (out / "metrics.jsonl").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert f"kdkit train --resume {out}" in err and "RUN_DIR" not in err


def test_resolved_config_reads_back_as_written(tmp_path):
    # Strings that look like numbers or YAML 1.1 booleans are quoted in config.yaml, so a run directory's
    # config reads back to the same run.
    cfg = load_config({"out_dir": "1e5", "train": {"teacher_cache": "off"}, "method": {"name": "kd", "mode": "yes"}})
    from kdkit.config import dump_config

    assert load_config(_file(tmp_path, dump_config(cfg))) == cfg
