"""`kdkit compare`: the table's numbers are each run's report.json, the page names exactly the config keys that
differ and plots the runs' own metrics.jsonl; bad paths and an existing page are one-line errors."""

from __future__ import annotations

import base64
import json
import re
from html.parser import HTMLParser

import pytest

import kdkit
from kdkit.cli import main
from kdkit.config import load_config
from kdkit.evaluation.compare import RunSummary, compare_runs, curve_series, differing_keys
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cmp")
    runs = []
    for name, hidden, lr in (("small", [8], 0.01), ("wide", [16], 0.02)):
        cfg = tiny_config(root / name, model={"name": "mlp", "hidden": hidden},
                          train={"epochs": 2, "lr": lr, "progress": False}, tracking="none")
        kdkit.run_config(load_config(cfg), "train")
        runs.append(root / name)
    return runs


def _run(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    out, err = capsys.readouterr()
    return e.value.code, out, err


class _Tables(HTMLParser):
    """Every <table> of a page as rows of cell texts, and the <img> sources."""

    def __init__(self):
        super().__init__()
        self.tables, self.imgs, self._cell = [], [], None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = ""
        elif tag == "img":
            self.imgs.append(dict(attrs)["src"])

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append(self._cell)
            self._cell = None


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_table_and_page(two_runs, tmp_path, capsys):
    out = tmp_path / "cmp.html"
    code, stdout, _ = _run(["compare", *map(str, two_runs), "--out", str(out)], capsys)
    assert code == 0 and f"wrote {out}" in stdout
    for run in two_runs:
        report = json.loads((run / "report.json").read_text())
        model = report["models"]["student"]
        row = next(line for line in stdout.splitlines() if line.startswith(str(run)))
        assert f"{model['accuracy']:.2%}" in row and f"{model['nll']:.4f}" in row and f"{model['parameters']:,}" in row
        assert f" {report['kept_epoch']}/2 " in row + " "
        wall = report.get("run", {}).get("wall_seconds")
        assert wall is None or wall >= sum(r["epoch_seconds"] for r in _metrics(run))
        assert f"{wall if wall is not None else sum(r['epoch_seconds'] for r in _metrics(run)):.1f}" in row

    page = _Tables()
    page.feed(out.read_text())
    metrics_table, config_table = page.tables
    assert [r[0] for r in metrics_table[1:]] == [str(r) for r in two_runs]
    # exactly the keys that differ (out_dir always does and is left out), with each run's value
    assert {r[0]: r[1:] for r in config_table[1:]} == {"model.hidden": ["[8]", "[16]"], "train.lr": ["0.01", "0.02"]}
    (img,) = page.imgs
    assert base64.b64decode(img.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"


def test_curves_are_the_runs_metrics(two_runs):
    series = curve_series([kdkit.evaluation.compare.load_run(r) for r in two_runs])
    for run in two_runs:
        records = _metrics(run)
        xs, ys = series["validation accuracy (%)"][str(run)]
        assert xs == [1, 2] and ys == pytest.approx([100 * r["val_accuracy"] for r in records])
        assert series["validation NLL"][str(run)][1] == pytest.approx([r["val_nll"] for r in records])


def test_existing_page_needs_force(two_runs, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert _run(["compare", *map(str, two_runs)], capsys)[0] == 0  # default: compare.html here
    page = tmp_path / "compare.html"
    page.write_text("mine")
    code, _, err = _run(["compare", *map(str, two_runs)], capsys)
    assert code == 2 and err.count("\n") == 1 and "compare.html already exists" in err and "--force" in err
    assert page.read_text() == "mine"
    assert _run(["compare", *map(str, two_runs), "--force"], capsys)[0] == 0
    assert page.read_text().startswith("<!doctype html>")


def test_not_run_directories_named_in_one_line(two_runs, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    missing = tmp_path / "missing"
    code, _, err = _run(["compare", str(two_runs[0]), str(empty), str(missing), "--out", str(tmp_path / "x.html")],
                        capsys)
    assert code == 2 and err.count("\n") == 1
    assert re.search(r"error: not kdkit run directories.*: .*empty, .*missing$", err.strip())
    assert str(two_runs[0]) not in err and not (tmp_path / "x.html").exists()


def test_same_configs_and_no_page(two_runs):
    result = compare_runs([two_runs[0], two_runs[0]])
    assert result.differing == {} and result.html_path is None
    assert result.table.count(str(two_runs[0])) == 2


def test_absent_section_is_not_a_difference():
    """A distill config has `model: null`, a train config `model.name`: only the keys with values differ."""
    a = RunSummary("a", None, {}, {"model": None, "student.name": "mlp", "seed": 0, "out_dir": "a"})
    b = RunSummary("b", None, {}, {"model.name": "mlp", "student": None, "seed": 0, "out_dir": "b"})
    assert differing_keys([a, b]) == {"model.name": ["-", "mlp"], "student.name": ["mlp", "-"]}


def test_a_train_run_and_a_distill_run_differ_by_their_recipe_not_by_role_names(tmp_path):
    import kdkit
    from kdkit.evaluation.compare import compare_runs

    base = {"data": {"name": "digits"}, "train": {"epochs": 1, "quiet": True}}
    kdkit.run_config(kdkit.load_config({**base, "out_dir": str(tmp_path / "t"),
                                        "model": {"name": "mlp", "hidden": [16]}}), "train")
    kdkit.run_config(kdkit.load_config({**base, "out_dir": str(tmp_path / "s"),
                                        "model": {"name": "mlp", "hidden": [16]},
                                        "train": {"epochs": 1, "quiet": True, "progress": False}}), "train")
    kdkit.run_config(kdkit.load_config({**base, "out_dir": str(tmp_path / "k"), "teacher": {"checkpoint":
                                        str(tmp_path / "t")}, "student": {"name": "mlp", "hidden": [16]},
                                        "method": {"name": "kd"}}), "distill")
    same = compare_runs([tmp_path / "t", tmp_path / "s"])
    assert same.differing == {}  # progress is a console setting, not a recipe difference
    out = tmp_path / "cmp" / "page.html"
    out.parent.mkdir()
    both = compare_runs([tmp_path / "t", tmp_path / "k"], out=out)
    assert not any(k.startswith(("model.", "student.")) for k in both.differing)  # model: = student:
    page = out.read_text()
    assert 'href="../t/report.html"' in page and 'href="../k/report.html"' in page
