"""``kdkit demo``: the main job on the embedded digits data, end to end, in well under two minutes on 2 CPU cores.

Trains a CNN teacher, then the same small MLP from scratch (labels only) and
distilled from the teacher, in two regimes: with every training label, and
with labels for 10% of the training images (the rest an unlabelled transfer
set that only distillation can use). Each model is an ordinary config-driven
run in its own sub-directory; one report compares them all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

from ..api import run_config
from ..assemble import build_data, build_model
from ..config import ModelConfig, load_config
from ..evaluation.metrics import predict, quality
from ..evaluation.report import format_table, write_report
from ..training.rundir import create_run_dir, read_metrics

TEACHER = {"name": "cnn_large", "width": 32}
STUDENT = {"name": "mlp", "hidden": [32]}
METHOD = {"name": "kd", "temperature": 2.0, "alpha": 0.7}
SCARCE = 0.1  # share of training images that keep their label in the label-scarce regime


def demo_configs(out: Path, epochs: int = 30, seed: int = 0) -> Dict[str, Dict[str, Any]]:
    """The demo's runs, in order, as plain config dicts (the same thing a YAML file holds)."""
    train = {"epochs": epochs, "optimizer": "adam", "lr": 1e-2, "schedule": "cosine"}
    data = {"name": "digits", "batch_size": 64}
    scarce = {**data, "labelled_fraction": SCARCE}
    teacher = {"checkpoint": str(out / "teacher")}
    common = {"seed": seed, "train": train}
    return {
        "teacher": {**common, "out_dir": str(out / "teacher"), "data": data, "model": TEACHER,
                    "train": {**train, "lr": 3e-3}},
        "scratch": {**common, "out_dir": str(out / "scratch"), "data": data, "model": STUDENT},
        "distilled": {**common, "out_dir": str(out / "distilled"), "data": data, "student": STUDENT,
                      "teacher": teacher, "method": METHOD},
        f"scratch_{int(SCARCE * 100)}pct_labels": {**common, "out_dir": str(out / "scratch_scarce"), "data": scarce,
                                                   "model": STUDENT},
        f"distilled_{int(SCARCE * 100)}pct_labels": {**common, "out_dir": str(out / "distilled_scarce"),
                                                     "data": scarce, "student": STUDENT, "teacher": teacher,
                                                     "method": METHOD},
    }


def _describe(spec: Dict[str, Any]) -> str:
    opts = ", ".join(f"{k}={v}" for k, v in spec.items() if k != "name")
    return f"{spec['name']}" + (f" ({opts})" if opts else "")


def _runs(configs: Dict[str, Dict[str, Any]], out: Path) -> list:
    """What each of the demo's runs was, for the report's "What was run" table (with links to their reports)."""
    rows = []
    for name, raw in configs.items():
        distill = "student" in raw
        fraction = raw["data"].get("labelled_fraction", 1.0)
        rows.append({"name": name, "command": "distill" if distill else "train",
                     "model": _describe(raw["student"] if distill else raw["model"]),
                     "teacher": _describe(TEACHER) + " (the teacher run)" if distill else None,
                     "method": _describe(METHOD) if distill else "labels only",
                     "labels": f"{100 * fraction:.0f}% of the training images" + (
                         " (the rest unlabelled)" if distill and fraction < 1 else ""),
                     "epochs": raw["train"]["epochs"], "seed": raw.get("seed", 0),
                     "dir": Path(raw["out_dir"]).relative_to(out).as_posix()})
    return rows


def _headline(rows: Dict[str, Dict[str, Any]]) -> str:
    """The demo's result in a sentence: distilled against labels-only, with all labels and with a few."""
    pct = int(SCARCE * 100)

    def acc(name: str) -> str:
        return f"{100 * rows[name]['accuracy']:.2f}%"

    return (f"With every label, the distilled student reached {acc('distilled')} test accuracy against "
            f"{acc('scratch')} for the same student trained on labels alone; with {pct}% of the labels, "
            f"{acc(f'distilled_{pct}pct_labels')} against {acc(f'scratch_{pct}pct_labels')} (teacher "
            f"{acc('teacher')}, {rows['teacher']['parameters'] // rows['distilled']['parameters']}x the parameters).")


def run_demo(out: Path, epochs: int = 30, seed: int = 0, progress: bool = True) -> Dict[str, Any]:
    out = create_run_dir(out)
    configs = demo_configs(out, epochs, seed)
    rows: Dict[str, Dict[str, Any]] = {}
    for name, raw in configs.items():
        raw["train"] = {**raw["train"], "progress": progress}
        command = "train" if "model" in raw else "distill"
        print(f"== {name}: kdkit {command} ({raw.get('model', raw.get('student'))['name']})", flush=True)
        rows[name] = run_config(load_config(raw), command).metrics["student"]

    # Runs trained on labels alone know nothing of the teacher: measure their agreement with it here.
    splits = build_data(load_config(configs["teacher"]).data)
    teacher = build_model(ModelConfig(**TEACHER, checkpoint=str(out / "teacher")), splits)
    t_out = predict(teacher, splits.test)["outputs"]
    for name, raw in configs.items():
        if "model" in raw:
            model = build_model(ModelConfig(**raw["model"], checkpoint=raw["out_dir"]), splits)
            rows[name]["agreement"] = quality(predict(model, splits.test)["outputs"], None, t_out)["agreement"]

    histories = {name: read_metrics(raw["out_dir"]) for name, raw in configs.items()}
    report = write_report(out, rows, histories, title="kdkit demo: digits, CNN teacher -> MLP student",
                          extra={"split": "test", "dataset": "digits", "labelled_fraction_scarce": SCARCE,
                                 "runs": _runs(configs, out), "headline": _headline(rows)})
    print()
    print(format_table(rows))
    print(f"\nrun directory: {out}  (open {out / 'report.html'})")
    return report
