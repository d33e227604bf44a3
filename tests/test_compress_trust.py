"""Compress runs a user can trust: same config and seed -> same bytes in any process; every compress run
directory can be evaluated; a config the ladder cannot run is refused before anything is written."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kdkit.api import run_config
from kdkit.compress import HANDLERS, run_compress
from kdkit.config import COMPRESS_STEPS, load_config, parse_compress_steps
from kdkit.errors import KdkitError

LADDER = [{"step": "distill", "epochs": 1},
          {"step": "prune", "structured": False, "sparsity": 0.5, "epochs": 1},
          {"step": "lowrank", "rank": 4},
          {"step": "quantize", "mode": "dynamic"}]


def _kdkit(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "kdkit", *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("teacher") / "run"
    run_config(load_config({"out_dir": str(out), "data": {"name": "digits"}, "device": "cpu",
                            "model": {"name": "mlp", "hidden": [32]},
                            "train": {"epochs": 1, "lr": 0.01, "progress": False}}), "train")
    return out


def _config(tmp_path: Path, teacher: Path, steps, student=None) -> dict:
    cfg = {"seed": 3, "device": "cpu", "data": {"name": "digits"}, "teacher": {"checkpoint": str(teacher)},
           "method": {"name": "kd", "temperature": 4.0}, "train": {"lr": 0.005, "progress": False, "threads": 1},
           "compress": steps}
    if student is not None:
        cfg["student"] = student
    return cfg


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, teacher_dir):
    """The same compress config run by two separate processes (a freshly initialised student each time)."""
    root = tmp_path_factory.mktemp("compress")
    path = root / "c.yaml"
    path.write_text(yaml.safe_dump(_config(root, teacher_dir, LADDER, {"name": "mlp", "hidden": [16]})))
    runs = []
    for name in ("a", "b"):
        proc = _kdkit("compress", str(path), f"out_dir={root / name}")
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs.append(root / name)
    return runs


def test_compress_is_bit_identical_across_processes(two_runs):
    a, b = two_runs
    files = sorted(p.relative_to(a) for p in a.rglob("*.safetensors"))
    assert Path("model.safetensors") in files and Path("model-int8.safetensors") in files
    assert Path("steps/00-start/model.safetensors") in files  # the student's initial weights come from the seed
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    rows_a = json.loads((a / "report.json").read_text())["models"]
    rows_b = json.loads((b / "report.json").read_text())["models"]
    for name in rows_a:
        assert rows_a[name]["accuracy"] == rows_b[name]["accuracy"]


def test_evaluate_a_compress_run_via_the_cli(two_runs):
    run = two_runs[0]
    proc = _kdkit("evaluate", str(run), "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout)
    rows = json.loads((run / "report.json").read_text())["models"]
    # the float model is the low-rank step's, the int8 model the quantize step's: the same numbers as the ladder
    assert got["compressed (float)"]["accuracy"] == rows["3. lowrank rank 4"]["accuracy"]
    assert got["compressed (float)"]["bytes"] == rows["3. lowrank rank 4"]["bytes"]
    assert got["compressed (int8)"]["accuracy"] == rows["4. quantize int8 dynamic"]["accuracy"]
    assert got["compressed (int8)"]["agreement"] == rows["4. quantize int8 dynamic"]["agreement"]
    assert got["teacher"]["accuracy"] == rows["teacher"]["accuracy"]


def test_evaluate_refuses_an_edited_int8_file(two_runs, tmp_path):
    import shutil

    from kdkit.api import evaluate_run

    run = tmp_path / "copy"
    shutil.copytree(two_runs[0], run)
    # the int8 file of another step (the weights before the low-rank step differ in shape and values)
    shutil.copy(run / "steps" / "02-prune" / "model.safetensors", run / "model-int8.safetensors")
    with pytest.raises(KdkitError, match="does not match"):
        evaluate_run(run)


def test_evaluate_a_compressed_teacher_with_static_int8(teacher_dir, tmp_path):
    """No student section (the teacher itself is compressed) and a calibrated int8 model."""
    from kdkit.api import evaluate_run

    cfg = _config(tmp_path, teacher_dir, [{"step": "prune", "sparsity": 0.5},
                                          {"step": "quantize", "mode": "static", "calibration_samples": 64}])
    ladder = run_compress(load_config({**cfg, "out_dir": str(tmp_path / "c")}))
    got = evaluate_run(ladder.dir)
    assert got["compressed (int8)"]["accuracy"] == ladder.rows["2. quantize int8 static"]["accuracy"]
    assert got["compressed (float)"]["parameters"] == ladder.rows["1. prune structured 50%"]["parameters"]


@pytest.mark.parametrize("steps, student, message", [
    # each failed only after the run directory existed (and, for the first two, after a step had trained)
    ([{"step": "distill", "epochs": 1}, {"step": "lowrank", "rank": 1, "layers": ["nope"]}], None, "no module named"),
    ([{"step": "distill", "epochs": 1}, {"step": "lowrank", "rank": 64}], None, r"compress\[1\] \(lowrank\): no layer"),
    ([{"step": "prune", "sparsity": 0.5}], {"name": "linear"}, "output layer"),
    ([{"step": "distill", "epochs": 1}], {"name": "mlp", "hidden": "abc"}, "hidden"),
])
def test_rejected_before_the_run_directory_exists(teacher_dir, tmp_path, steps, student, message):
    out = tmp_path / "c"
    cfg = load_config({**_config(tmp_path, teacher_dir, steps, student), "out_dir": str(out)})
    with pytest.raises(KdkitError, match=message):
        run_compress(cfg)
    assert not out.exists()


def test_every_step_type_has_a_handler_and_a_name():
    assert set(HANDLERS) == set(COMPRESS_STEPS)
    steps = parse_compress_steps([{"step": "distill", "epochs": 20}, {"step": "transfer"},
                                  {"step": "prune", "sparsity": 0.5},
                                  {"step": "prune", "structured": False, "target_parameters": 1000},
                                  {"step": "lowrank", "rank": 4}, {"step": "lowrank", "energy": 0.8},
                                  {"step": "quantize", "mode": "static"}])
    assert [s.describe() for s in steps] == ["distill 20 ep", "transfer every_other", "prune structured 50%",
                                             "prune unstructured to 1,000", "lowrank rank 4", "lowrank energy 0.8",
                                             "quantize int8 static"]
