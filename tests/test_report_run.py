"""report.html says what was run: fields equal config.yaml / report.json, plotted data, old reports still render."""

import json
import re
from html.parser import HTMLParser

import pytest
import yaml

import kdkit
from kdkit.errors import KdkitError
from kdkit.evaluation.plots import curve_data, ladder_figure, ladder_points
from kdkit.evaluation.report import render_report
from tests.conftest import tiny_config


class _Page(HTMLParser):
    """Text of every element with an id, the hrefs, and the JSON of the plot-data script."""

    def __init__(self, text):
        super().__init__()
        self.by_id, self.hrefs, self._stack = {}, [], []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "a":
            self.hrefs.append(a.get("href"))
        self._stack.append(a.get("id"))
        if a.get("id"):
            self.by_id[a["id"]] = ""

    def handle_endtag(self, tag):
        if self._stack:
            self._stack.pop()

    def handle_data(self, data):
        for i in self._stack:
            if i:
                self.by_id[i] += data


@pytest.fixture(scope="module")
def kd_run(teacher_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("rep") / "kd"
    cfg = tiny_config(out, student={"name": "mlp", "hidden": [16]}, teacher={"checkpoint": str(teacher_run)},
                      method={"name": "kd", "temperature": 3.0, "alpha": 0.6},
                      train={"epochs": 3, "lr": 0.02, "optimizer": "sgd", "progress": False})
    cfg["data"]["labelled_fraction"] = 0.5
    kdkit.run_config(kdkit.load_config(cfg), "distill")
    return out


def test_report_names_what_was_run_with_the_values_of_config_and_report_json(kd_run):
    page = _Page((kd_run / "report.html").read_text())
    cfg = yaml.safe_load((kd_run / "config.yaml").read_text())
    report = json.loads((kd_run / "report.json").read_text())
    run = report["run"]
    f = page.by_id
    assert f["run-teacher"] == f"{cfg['teacher']['name']} (ConvNet, {run['teacher']['parameters']:,} parameters)"
    assert cfg["teacher"]["name"] == "cnn_small"
    assert f["run-student"] == f"mlp (Sequential, {report['models']['student']['parameters']:,} parameters)"
    labelled = run["data"]["labelled_train"]
    assert run["data"]["splits"] == {"train": 256, "val": 180, "test": 360} and labelled == 128  # half of 256
    assert f["run-data"] == ("digits; train 256, val 180, test 360; labelled 128 of the training samples (50.0%)")
    assert f["run-method"] == "kd (temperature=3.0, alpha=0.6)"
    assert f["run-optimizer"] == f"sgd (lr=0.02, weight_decay=0.0, momentum={cfg['train']['momentum']})"
    assert f["run-schedule"] == f"{cfg['train']['schedule']} (epochs=3, warmup_epochs=0.0)"
    assert f["run-seed"] == str(cfg["seed"]) and f["run-batch_size"] == str(cfg["data"]["batch_size"])
    assert f["run-device"] == "cpu" and f["run-threads"] == "1"
    import torch

    assert f["run-versions"].startswith(f"kdkit {kdkit.__version__}, torch {torch.__version__}")
    assert re.fullmatch(r"\d+\.\d s", f["run-wall_time"]) and run["wall_seconds"] > 0
    assert f["run-kept_epoch"] == f"{report['kept_epoch']} of 3 (best)"
    assert {"config.yaml", "metrics.jsonl"} <= set(page.hrefs)  # relative links to files that exist
    assert f["latency-threads"] == str(report["models"]["student"]["latency_threads"])
    s = report["models"]["student"]
    assert s["latency_ms_b1_q1"] <= s["latency_ms_b1"] <= s["latency_ms_b1_q3"]


def test_plotted_curves_are_the_metrics_in_percent_with_the_kept_epoch_and_teacher_line(kd_run):
    text = (kd_run / "report.html").read_text()
    data = json.loads(re.search(r'<script type="application/json" id="plot-data">(.*?)</script>', text).group(1))
    history = [json.loads(line) for line in (kd_run / "metrics.jsonl").read_text().splitlines()]
    report = json.loads((kd_run / "report.json").read_text())
    panels = {p["name"]: p for p in data["panels"]}
    loss = {s["key"]: s for s in panels["loss"]["series"]}
    assert {"train_loss", "train_kd", "train_ce"} <= set(loss)  # each part separately
    assert loss["train_kd"]["y"] == [r["train_kd"] for r in history]
    assert panels["val_loss"]["series"][0]["y"] == [r["val_nll"] for r in history]
    acc = {s["key"]: s for s in panels["accuracy"]["series"]}
    assert acc["val_accuracy"]["y"] == pytest.approx([100 * r["val_accuracy"] for r in history])
    assert data["kept_epochs"] == {"student": report["kept_epoch"]}
    (marker,) = panels["accuracy"]["markers"]
    assert marker["x"] == report["kept_epoch"]
    assert marker["y"] == pytest.approx(100 * history[report["kept_epoch"] - 1]["val_accuracy"])
    (ref,) = panels["accuracy"]["hlines"]
    assert ref["y"] == pytest.approx(100 * report["run"]["teacher_val_accuracy"]) and 0 < ref["y"] <= 100
    assert text.count("data:image/png;base64,") == 1


def test_an_old_report_without_a_run_block_renders_with_unknowns(kd_run, tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    report = json.loads((kd_run / "report.json").read_text())
    del report["run"]
    for m in report["models"].values():  # an old run: no quartiles, no thread count
        for k in [k for k in m if k.endswith(("_q1", "_q3")) or k.startswith("latency_t")]:
            del m[k]
    (old / "report.json").write_text(json.dumps(report))
    (old / "metrics.jsonl").write_text((kd_run / "metrics.jsonl").read_text() + '{"epoch": 4, "tra')  # torn line
    page = _Page(render_report(old).read_text())
    for key in ("teacher", "student", "method", "optimizer", "seed", "device", "threads", "versions", "wall_time"):
        assert page.by_id[f"run-{key}"] == "unknown", key
    assert page.by_id["run-data"] == "digits; splits unknown; labelled fraction unknown"
    assert page.by_id["run-kept_epoch"] == f"{report['kept_epoch']} of 3 (best)"
    assert page.by_id["latency-threads"] == "unknown"
    with pytest.raises(KdkitError, match="no readable report.json"):
        render_report(tmp_path)


def test_curve_data_by_hand_and_ladder_without_text_labels():
    hist = [{"epoch": 1, "train_loss": 2.0, "train_kd": 1.5, "val_accuracy": 0.5, "val_nll": 1.0},
            {"epoch": 2, "train_loss": 1.0, "train_kd": 0.5, "val_accuracy": 0.75, "val_nll": 0.8}]
    d = curve_data({"student": hist}, {"student": 2}, 0.9)
    acc = d["panels"][2]
    assert acc["series"][0]["y"] == [50.0, 75.0] and acc["hlines"][0]["y"] == 90.0
    assert acc["markers"] == [{"label": "student: kept epoch 2", "x": 2, "y": 75.0}]
    rows = {"teacher": {"accuracy": 0.9, "latency_ms_b1": 1.0, "bytes": 1000},
            "1. prune": {"accuracy": 0.899, "latency_ms_b1": 1.01, "bytes": 1001},  # nearly on top of the teacher
            "2. int8": {"accuracy": 0.8, "latency_ms_b1": None, "bytes": 300}}
    assert [p["label"] for p in ladder_points(rows, "latency_ms_b1")] == ["teacher", "1. prune"]
    fig = ladder_figure(rows)
    for ax in fig.axes:
        assert not ax.texts  # no names beside points: nothing to overlap
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["teacher", "1. prune", "2. int8"]
    import matplotlib.pyplot as plt

    plt.close(fig)
