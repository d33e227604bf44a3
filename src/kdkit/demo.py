"""``kdkit demo``: the main job on the embedded digits data, end to end, in about a minute on 2 CPU cores.

Trains a CNN teacher, then the same small MLP twice (from scratch on labels,
and distilled from the teacher), and writes one report comparing all three.
Each of the three is an ordinary config-driven run in its own sub-directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

from .api import run_config
from .config import load_config
from .report import format_table, write_report
from .rundir import create_run_dir, read_metrics

STUDENT = {"name": "mlp", "hidden": [32]}
DATA = {"name": "digits", "batch_size": 64}


def demo_configs(out: Path, epochs: int = 30, seed: int = 0) -> Dict[str, Dict[str, Any]]:
    train = {"epochs": epochs, "optimizer": "adam", "lr": 3e-3, "schedule": "cosine"}
    return {
        "teacher": {"seed": seed, "out_dir": str(out / "teacher"), "data": DATA,
                    "model": {"name": "cnn_large", "width": 32}, "train": train},
        "scratch": {"seed": seed, "out_dir": str(out / "scratch"), "data": DATA, "model": STUDENT, "train": train},
        "distilled": {"seed": seed, "out_dir": str(out / "distilled"), "data": DATA, "student": STUDENT,
                      "teacher": {"checkpoint": str(out / "teacher")},
                      "method": {"name": "kd", "temperature": 4.0, "alpha": 0.9}, "train": train},
    }


def run_demo(out: Path, epochs: int = 30, seed: int = 0, progress: bool = True) -> Dict[str, Any]:
    out = create_run_dir(out)
    configs = demo_configs(out, epochs, seed)
    rows: Dict[str, Dict[str, Any]] = {}
    for name, raw in configs.items():
        raw["train"] = {**raw["train"], "progress": progress}
        command = "train" if "model" in raw else "distill"
        print(f"== {name}: kdkit {command} ({raw.get('model', raw.get('student'))['name']})", flush=True)
        run = run_config(load_config(raw), command)
        rows[name] = run.metrics["student"]
    # The teacher's agreement with itself is 1 by definition; scratch's agreement is measured below.
    from .api import build_data, build_model
    from .config import ModelConfig
    from .evaluate import predict, quality

    splits = build_data(load_config(configs["teacher"]).data)
    teacher = build_model(ModelConfig(**configs["teacher"]["model"], checkpoint=str(out / "teacher")), splits)
    scratch = build_model(ModelConfig(**STUDENT, checkpoint=str(out / "scratch")), splits)
    t_out = predict(teacher, splits.test)["outputs"]
    rows["scratch"]["agreement"] = quality(predict(scratch, splits.test)["outputs"], None, t_out)["agreement"]
    rows["teacher"]["agreement"] = 1.0
    histories = {name: read_metrics(out / name) for name in configs}
    report = write_report(out, rows, histories, title="kdkit demo: digits, CNN teacher -> MLP student",
                          extra={"split": "test", "dataset": "digits"})
    print()
    print(format_table(rows))
    print(f"\nrun directory: {out}  (open {out / 'report.html'})")
    return report
