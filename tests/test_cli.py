"""The `kdkit` command end to end on a digits slice, and every bad input as a one-line error with exit status 2."""

import json
import subprocess
import sys

import pytest
import yaml

from kdkit.cli import main
from tests.conftest import tiny_config


def _run(argv, capsys):
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    out, err = capsys.readouterr()
    return e.value.code, out, err


def _write(path, cfg):
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _one_line_error(code, err, *needles):
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_distill_end_to_end(tmp_path, teacher_run, capsys):
    out = tmp_path / "kd"
    cfg = tiny_config(out, student={"name": "mlp", "hidden": [16]}, teacher={"checkpoint": str(teacher_run)},
                      method={"name": "kd"})
    code, stdout, _ = _run(["distill", _write(tmp_path / "kd.yaml", cfg), "method.temperature=2", "train.epochs=2"],
                           capsys)
    assert code == 0 and "agreement" in stdout
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["method"]["temperature"] == 2 and resolved["teacher"]["name"] == "cnn_small"
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    report = json.loads((out / "report.json").read_text())
    assert 0 <= report["models"]["student"]["accuracy"] <= 1 and "teacher" in report["models"]
    for f in ("best.safetensors", "last.safetensors", "state.safetensors"):
        assert (out / "checkpoints" / f).is_file()
    html = (out / "report.html").read_text()
    assert "<table>" in html and "data:image/png;base64," in html

    code, stdout, _ = _run(["evaluate", str(out), "--json"], capsys)
    assert code == 0
    again = json.loads(stdout)
    assert again["student"]["accuracy"] == pytest.approx(report["models"]["student"]["accuracy"])


def test_resume_through_cli(tmp_path, capsys):
    out = tmp_path / "r"
    cfg = tiny_config(out, model={"name": "mlp", "hidden": [8]}, train={"epochs": 1, "progress": False})
    assert _run(["train", _write(tmp_path / "c.yaml", cfg)], capsys)[0] == 0
    stored = (out / "config.yaml").read_text()
    # A resumed run keeps its settings: asking for others is refused, and config.yaml still tells the truth.
    code, _, err = _run(["train", "--resume", str(out), "train.epochs=2"], capsys)
    assert code == 2 and "train.epochs=1" in err and "keeps its settings" in err
    assert (out / "config.yaml").read_text() == stored
    code, _, _ = _run(["train", "--resume", str(out)], capsys)  # finished: nothing left to do, still exit 0
    assert code == 0 and len((out / "metrics.jsonl").read_text().splitlines()) == 1


def test_ls_lists_registries(capsys):
    code, out, _ = _run(["ls"], capsys)
    assert code == 0 and "mlp" in out and "kd" in out and "digits" in out


def test_existing_run_dir(tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep").write_text("x")
    cfg = tiny_config(out, model={"name": "mlp"})
    _one_line_error(*_run(["train", _write(tmp_path / "c.yaml", cfg)], capsys)[::2], "already exists")
    assert (out / "keep").read_text() == "x"


def test_checkpoint_that_does_not_fit(tmp_path, teacher_run, capsys):
    cfg = tiny_config(tmp_path / "x", student={"name": "mlp"},
                      teacher={"name": "cnn_small", "width": 16, "checkpoint": str(teacher_run)})
    code, _, err = _run(["distill", _write(tmp_path / "c.yaml", cfg)], capsys)
    _one_line_error(code, err, "does not fit the model", "shape")


def test_teacher_student_output_mismatch(tmp_path, teacher_run, capsys):
    # A user factory that ignores num_classes gives the student a 5-way head.
    cfg = tiny_config(tmp_path / "x", student={"name": "tests.factories:five_way"},
                      teacher={"checkpoint": str(teacher_run)})
    code, _, err = _run(["--plugin", "tests.factories", "distill", _write(tmp_path / "c.yaml", cfg)], capsys)
    _one_line_error(code, err, "(10,)", "(5,)")


@pytest.mark.parametrize("section,value,needle", [
    ("model", {"name": "resnet_huge"}, "resnet_small"),
    ("data", {"name": "cifar100"}, "fashion_mnist"),
])
def test_unknown_names_list_known(tmp_path, capsys, section, value, needle):
    cfg = tiny_config(tmp_path / "x", model={"name": "mlp"})
    cfg[section] = value
    code, _, err = _run(["train", _write(tmp_path / "c.yaml", cfg)], capsys)
    _one_line_error(code, err, needle)
    assert not (tmp_path / "x").exists()


def test_unknown_method(tmp_path, teacher_run, capsys):
    cfg = tiny_config(tmp_path / "x", student={"name": "mlp"}, teacher={"checkpoint": str(teacher_run)},
                      method={"name": "hinton"})
    _one_line_error(*_run(["distill", _write(tmp_path / "c.yaml", cfg)], capsys)[::2], "unknown method 'hinton'", "kd")


def test_missing_dataset_path(tmp_path, capsys):
    cfg = tiny_config(tmp_path / "x", model={"name": "mlp"})
    cfg["data"] = {"name": "fashion_mnist", "root": str(tmp_path / "no-data")}
    code, _, err = _run(["train", _write(tmp_path / "c.yaml", cfg)], capsys)
    _one_line_error(code, err, "no-data", "apt-get install dataset-fashion-mnist")


def test_real_process_exit_status(tmp_path):
    """The installed entry point exits non-zero with the one-line message (not a traceback)."""
    proc = subprocess.run([sys.executable, "-m", "kdkit", "train", str(tmp_path / "missing.yaml")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: config file") and "Traceback" not in proc.stderr


@pytest.mark.parametrize("body, said", [("import sys\nsys.exit(3)\n", "called sys.exit(3)"),
                                        ("raise KeyboardInterrupt\n", "interrupted while importing"),
                                        ("class Stop(BaseException):\n    pass\nraise Stop('no')\n",
                                         "failed while importing: Stop: no")])
def test_a_plugin_that_exits_or_raises_a_base_exception_is_one_error_line(tmp_path, capsys, body, said):
    plugin = tmp_path / "quitting_plugin.py"
    plugin.write_text(body)
    code, out, err = _run(["--plugin", str(plugin), "ls"], capsys)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: plugin") and said in lines[0], err
    assert "quitting_plugin" in lines[0] and "Traceback" not in err


def test_overrides_may_come_after_an_option(tmp_path, capsys):
    cfg = _write(tmp_path / "c.yaml", tiny_config(tmp_path / "unused", model={"name": "mlp", "hidden": [8]},
                                                  train={"epochs": 1, "progress": False}))
    code, _, err = _run(["train", cfg, "-q", f"out_dir={tmp_path / 'r'}", "train.lr=0.02"], capsys)
    assert code == 0, err
    assert (tmp_path / "r" / "config.yaml").is_file() and "lr: 0.02" in (tmp_path / "r" / "config.yaml").read_text()
    code, _, err = _run(["train", cfg, "-q", "--no-such-flag"], capsys)
    assert code == 2 and "unrecognized arguments: --no-such-flag" in err


def test_an_unknown_model_name_points_to_plugins(tmp_path, capsys):
    cfg = _write(tmp_path / "c.yaml", tiny_config(tmp_path / "r", model={"name": "my_own_net"}))
    code, _, err = _run(["train", cfg], capsys)
    assert code == 2 and "unknown model 'my_own_net'" in err and "--plugin MODULE" in err
    assert not (tmp_path / "r").exists()


def test_evaluate_times_with_the_runs_own_thread_count(tmp_path):
    import torch

    import kdkit

    cfg = tiny_config(tmp_path / "r", model={"name": "mlp", "hidden": [8]},
                      train={"epochs": 1, "progress": False, "threads": 1})
    kdkit.run_config(kdkit.load_config(cfg), "train")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        metrics = kdkit.evaluate_run(tmp_path / "r")
    finally:
        torch.set_num_threads(before)
    assert metrics["model"]["latency_threads"] == 1
