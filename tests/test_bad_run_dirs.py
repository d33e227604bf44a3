"""Commands that read run directories meet foreign or damaged files: one error line naming the file, no traceback,
nothing written."""

import shutil

import pytest

from kdkit.cli import main


def _run(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    out, err = capsys.readouterr()
    return e.value.code, out, err


DAMAGE = {
    "report.json not JSON": ("report.json", b"{", "report.json is damaged"),
    "report.json a list": ("report.json", b"[1, 2]", "report.json holds a JSON list"),
    "metrics.jsonl line a list": ("metrics.jsonl", b"[1]\n{}\n", "metrics.jsonl line 1 holds a JSON list"),
    "metrics.jsonl line not JSON": ("metrics.jsonl", b"{oops\n{}\n", "metrics.jsonl line 1 is damaged"),
    "config.yaml not UTF-8": ("config.yaml", b"\xff\xfe seed: 0", "not UTF-8"),
    "config.yaml a list": ("config.yaml", b"- 1\n", "config.yaml"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_compare_meets_a_damaged_or_foreign_run_file_with_one_error_line(teacher_run, tmp_path, capsys, case):
    name, data, said = DAMAGE[case]
    run = tmp_path / "run"
    shutil.copytree(teacher_run, run)
    (run / name).write_bytes(data)
    before = sorted(p.name for p in run.rglob("*"))
    code, out, err = _run(["compare", str(run), str(teacher_run), "--out", str(tmp_path / "c.html")], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and said in lines[0], err
    assert "Traceback" not in err and not (tmp_path / "c.html").exists()
    assert sorted(p.name for p in run.rglob("*")) == before


@pytest.mark.parametrize("case", [c for c in sorted(DAMAGE) if not c.startswith("config")])
def test_rebuilding_a_report_from_damaged_files_names_the_file(teacher_run, tmp_path, case):
    from kdkit.errors import KdkitError
    from kdkit.evaluation.report import render_report

    name, data, said = DAMAGE[case]
    run = tmp_path / "run"
    shutil.copytree(teacher_run, run)
    (run / name).write_bytes(data)
    with pytest.raises(KdkitError, match=said.replace(".", r"\.")):
        render_report(run)


def test_a_half_written_last_metrics_line_is_left_out(teacher_run, tmp_path):
    from kdkit.training.rundir import read_metrics

    run = tmp_path / "run"
    shutil.copytree(teacher_run, run)
    whole = read_metrics(run)
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"epoch": 4, "lo')
    assert read_metrics(run) == whole and len(whole) == 3


@pytest.mark.parametrize("case", ["report.json not JSON", "report.json a list"])
def test_export_refuses_a_damaged_report_before_writing_anything(teacher_run, tmp_path, capsys, case):
    name, data, said = DAMAGE[case]
    run = tmp_path / "run"
    shutil.copytree(teacher_run, run)
    (run / name).write_bytes(data)
    code, _, err = _run(["export", str(run), "--format", "onnx"], capsys)
    assert code == 2 and said in err and "Traceback" not in err
    assert not (run / "export").exists() or not any((run / "export").iterdir())
