"""What a new user meets in the first hour: own split files, the labelled subset's own seed, runs made from
Python objects, warnings about teachers and students, tracking without its package."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import kdkit
from kdkit import KdkitError
from kdkit.assemble import build_data
from kdkit.config import load_config


def _write_csv(path, rows, header=("a", "b", "target")):
    path.write_text(",".join(header) + "\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))
    return str(path)


def test_csv_takes_your_own_split_files(tmp_path):
    rng = np.random.default_rng(0)
    rows = [(round(float(a), 3), round(float(b), 3), int(a > 0)) for a, b in rng.normal(size=(40, 2))]
    train = _write_csv(tmp_path / "train.csv", rows[:30])
    test = _write_csv(tmp_path / "test.csv", rows[30:])
    splits = build_data(load_config({"data": {"name": "csv", "train_path": train, "test_path": test}}).data)
    assert len(splits.train) == 30 and len(splits.test) == 10 and splits.val is None
    # standardised with the training file's own mean and std (sample std, n - 1), by hand
    a = np.array([r[0] for r in rows[:30]], dtype=np.float32)
    expect = (rows[30][0] - a.mean()) / a.std(ddof=1)
    assert float(splits.test.x[0, 0]) == pytest.approx(float(expect), rel=1e-4, abs=1e-5)
    assert splits.test.y.tolist() == [r[2] for r in rows[30:]]
    other = _write_csv(tmp_path / "other.csv", rows[30:], header=("a", "c", "target"))
    with pytest.raises(KdkitError, match="same columns in every split file"):
        build_data(load_config({"data": {"name": "csv", "train_path": train, "test_path": other}}).data)
    extra = _write_csv(tmp_path / "extra.csv", [(0.1, 0.2, 7)])
    with pytest.raises(KdkitError, match="class '7'.*never"):
        build_data(load_config({"data": {"name": "csv", "train_path": train, "val_path": extra}}).data)
    with pytest.raises(KdkitError, match="either data.path .* or data.train_path"):
        build_data(load_config({"data": {"name": "csv", "path": train, "train_path": train}}).data)


def test_image_folder_takes_one_folder_per_split(tmp_path):
    from PIL import Image

    for split, n in (("train", 3), ("test", 2)):
        for cls, value in (("cat", 30), ("dog", 220)):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(np.full((6, 6), value + i, dtype=np.uint8)).save(folder / f"{i}.png")
    cfg = {"data": {"name": "image_folder", "train_path": str(tmp_path / "train"),
                    "test_path": str(tmp_path / "test"), "image_size": 4, "grayscale": True}}
    splits = build_data(load_config(cfg).data)
    assert (len(splits.train), len(splits.test), splits.val) == (6, 4, None)
    assert splits.info["classes"] == ["cat", "dog"] and splits.test.y.tolist() == [0, 0, 1, 1]
    (tmp_path / "test" / "fox").mkdir()
    Image.fromarray(np.zeros((6, 6), dtype=np.uint8)).save(tmp_path / "test" / "fox" / "0.png")
    with pytest.raises(KdkitError, match="class folder 'fox'"):
        build_data(load_config(cfg).data)


def test_the_labelled_subset_has_its_own_seed():
    """A teacher (seed 0) and a student (seed 3) of one config keep the same labelled rows; labelled_seed moves
    them."""
    cfg = {"data": {"name": "digits", "labelled_fraction": 0.1}}
    a = build_data(load_config({**cfg, "seed": 0}).data, seed=0).train.y
    b = build_data(load_config({**cfg, "seed": 3}).data, seed=3).train.y
    assert torch.equal(a >= 0, b >= 0) and int((a >= 0).sum()) == round(0.1 * len(a))
    c = build_data(load_config({"data": {**cfg["data"], "labelled_seed": 5}}).data).train.y
    assert not torch.equal(a >= 0, c >= 0)


def test_a_run_made_from_python_objects_is_refused_by_export_and_evaluate(tmp_path):
    from kdkit.api import evaluate_run
    from kdkit.export import export_run

    x = torch.randn(40, 3)
    y = (x[:, 0] > 0).long()
    kdkit.train(torch.nn.Linear(3, 2), (x, y), (x, y), epochs=1, out_dir=str(tmp_path / "run"), quiet=True,
                progress=False)
    for call, name in ((lambda: export_run(tmp_path / "run"), "export"), (lambda: evaluate_run(tmp_path / "run"),
                                                                           "evaluate")):
        with pytest.raises(KdkitError, match=f"made from Python objects.*kdkit {name}"):
            call()
    assert not (tmp_path / "run" / "export").exists()
    assert json.loads((tmp_path / "run" / "report.json").read_text())


def test_the_report_says_what_came_out_and_flags_a_worse_teacher_or_a_student_stopped_too_early():
    from kdkit.evaluation.verdict import headline, run_warnings

    models = {"teacher": {"accuracy": 0.99, "parameters": 65834},
              "student": {"accuracy": 0.63, "parameters": 2410, "agreement": 0.64}}
    assert headline(models) == ("The student reached a test accuracy of 63.00% against its teacher's 99.00%, "
                                "agreeing with it on 64.0% of inputs, with 27.3x fewer parameters.")
    history = [{"epoch": 1}, {"epoch": 2}]
    far = run_warnings(models, history, epochs=10, kept_epoch=10)
    assert len(far) == 1 and "36.0 points below" in far[0] and "train.epochs" in far[0]
    assert run_warnings(models, history, epochs=10, kept_epoch=4) == []  # it had converged: not "too early"
    worse = run_warnings({"teacher": {"perplexity": 60.0}, "student": {"perplexity": 40.0}})
    assert len(worse) == 1 and "teacher (perplexity 60) is worse than its student (40)" in worse[0]
    assert run_warnings({"teacher": {"accuracy": 0.95}, "student": {"accuracy": 0.953}}) == []  # within 0.5 points
    assert run_warnings({"teacher": {"perplexity": 115.9}, "student": {"perplexity": 113.5}}) == []  # within 5 %


def test_a_distilled_run_prints_its_warning_and_puts_it_in_the_report(tmp_path, capsys):
    x = torch.randn(200, 6, generator=torch.Generator().manual_seed(0))
    y = (x[:, 0] + x[:, 1] > 0).long()
    teacher = kdkit.train(torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2)),
                          (x, y), epochs=40, lr=1e-2, quiet=True, progress=False).student
    # A student held back on purpose (a tiny learning rate, two epochs): far below its teacher, still improving.
    kdkit.distill(teacher, torch.nn.Linear(6, 2), (x, y), (x, y), test_data=(x, y), epochs=2, lr=1e-5,
                  out_dir=str(tmp_path / "kd"), quiet=True, progress=False)
    err = capsys.readouterr().err
    report = json.loads((tmp_path / "kd" / "report.json").read_text())
    gap = report["models"]["teacher"]["accuracy"] - report["models"]["student"]["accuracy"]
    assert gap > 0.05 and report["kept_epoch"] == 2, (gap, report["kept_epoch"])  # the setting is what it should be
    assert len(report["warnings"]) == 1 and f"warning: {report['warnings'][0]}" in err
    assert report["headline"].startswith("The student reached a test accuracy of")
    page = (tmp_path / "kd" / "report.html").read_text()
    assert report["headline"].replace("'", "&#x27;") in page


def test_demo_into_a_taken_folder_suggests_what_the_demo_accepts(tmp_path, capsys):
    from kdkit.cli import main

    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "x").write_text("mine")
    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--out", str(tmp_path / "demo"), "--epochs", "1"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"--out {tmp_path / 'demo'}-2" in err
    assert "--resume" not in err and "out_dir=" not in err and (tmp_path / "demo" / "x").read_text() == "mine"


def test_the_demo_report_says_what_was_run_and_links_each_run(tmp_path):
    from kdkit.recipes.demo import run_demo

    report = run_demo(tmp_path / "demo", epochs=1, progress=False)
    page = (tmp_path / "demo" / "report.html").read_text()
    assert [r["name"] for r in report["runs"]][:3] == ["teacher", "scratch", "distilled"]
    for r in report["runs"]:
        assert f'href="{r["dir"]}/report.html"' in page and (tmp_path / "demo" / r["dir"] / "report.html").exists()
    assert "<em>unknown</em>" not in page
    assert report["headline"].startswith("With every label, the distilled student reached")
    acc = f"{100 * report['models']['distilled']['accuracy']:.2f}%"
    assert acc in report["headline"]


def test_latency_is_timed_on_one_thread_whatever_the_process_uses():
    from kdkit.evaluation.metrics import latency

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out = latency(torch.nn.Linear(4, 2), (4,), batch_sizes=(1,), repeats=3, warmup=1)
        assert out["latency_threads"] == 1 and torch.get_num_threads() == 2  # restored afterwards
        m = kdkit.evaluate(torch.nn.Linear(4, 2), (torch.randn(8, 4), torch.randint(0, 2, (8,))))
        assert m["latency_threads"] == 1
    finally:
        torch.set_num_threads(before)


def test_plots_give_every_line_its_colour_label_every_choice_and_zoom_accuracy():
    from kdkit.evaluation.plots import accuracy_floor, series_colors
    from kdkit.recipes.sweep_space import parse_space

    assert len(set(series_colors(12))) == 12 and len(set(series_colors(5))) == 5
    # first epochs (30 %) are left off the scale; the rest starts just below its lowest value, on a multiple of 5
    series = [{"y": [30.0, 91.0, 97.5]}, {"y": [40.0, 88.2, 96.0]}]
    assert accuracy_floor(series, [99.4]) == 85.0 and accuracy_floor([]) is None
    from kdkit.recipes.sweep_report import axis_labels

    (dim,) = parse_space({"method.name": ["kd", "dist", "dkd"]})
    assert axis_labels(dim) == [("kd", 0.0), ("dist", 0.5), ("dkd", 1.0)]  # the middle choice is named too


def test_kdkit_train_calls_its_model_a_model(tmp_path, capsys):
    from kdkit.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["train", "configs/digits_teacher.yaml", "-q", "train.epochs=1", f"out_dir={tmp_path / 't'}"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    table = out.splitlines()
    assert table[0].startswith("model ") and table[2].startswith("model ") and "student" not in out


def test_the_sweep_page_shows_accuracies_in_percent_like_the_other_pages():
    from kdkit.recipes.sweep_report import _score

    assert _score("val_accuracy", 0.90556) == "90.56%" and _score("val_nll", 0.3123) == "0.3123"
    assert _score("val_accuracy", None) == "-"
