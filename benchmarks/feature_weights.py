#!/usr/bin/env python
"""How much the loss weight of the feature-level methods matters, in the methods benchmark's setting.

    python benchmarks/feature_weights.py                 # ~15 min on 2 shared cores
    python benchmarks/feature_weights.py --seeds 0 --grid fitnets=1,100

The default weights of ``fitnets`` (beta 100), ``at`` (1000), ``nst`` (50), ``attention_weighted`` (100) and
``dkd`` (NCKD weight 8) come from papers trained for 240 CIFAR epochs. This script trains the same
Fashion-MNIST pair as ``benchmarks/methods.py`` (cnn_large teacher -> cnn_small student, a 2,000-image
training subset, 6 epochs, Adam 3e-3 with a cosine schedule, batch 64, final weights measured on the
10,000-image test set) with each method at several weights and 2 seeds, next to the scratch student.

The teacher is trained once (10 epochs, seed 1000, the recipe of ``benchmarks/methods.py``) and cached in
``benchmarks/out/feature_weights/``. Runs go to two worker processes with one thread each (on an
oversubscribed CPU one thread per process is far faster than two). Results:
``benchmarks/results/feature_weights.json``, rewritten after every run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "out" / "feature_weights"
RESULTS = ROOT / "results" / "feature_weights.json"

FEATURE = {"student_layer": "features.1", "teacher_layer": "features.3"}  # the 7x7 maps of both networks
GRID = "fitnets=1,10,100;at=10,100,1000;nst=5,50;attention_weighted=1,10,100;dkd=1,8"
DEFAULTS = {"fitnets": 100.0, "at": 1000.0, "nst": 50.0, "attention_weighted": 100.0, "dkd": 8.0}
SETTING = {"dataset": "fashion_mnist", "train_subset": 2000, "val_size": 1000, "epochs": 6, "teacher_epochs": 10,
           "batch_size": 64, "lr": 3e-3, "optimizer": "adam", "schedule": "cosine", "teacher": "cnn_large",
           "student": "cnn_small", "threads_per_run": 1}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _setup():
    from kdkit.api import build_data
    from kdkit.config import DataConfig, TrainConfig

    splits = build_data(DataConfig(name="fashion_mnist", train_subset=SETTING["train_subset"],
                                   val_size=SETTING["val_size"]))
    cfg = TrainConfig(epochs=SETTING["epochs"], optimizer="adam", lr=SETTING["lr"], schedule="cosine", progress=False)
    return splits, cfg


def _accuracy(model, data) -> float:
    from kdkit.evaluation.metrics import predict, quality

    pred = predict(model, data, 1000)
    return quality(pred["outputs"], pred["y"])["accuracy"]


def teacher_weights() -> Path:
    """Train (or reuse) the cnn_large teacher; return its safetensors path."""
    from kdkit.methods import METHODS
    from kdkit.models import create_model
    from kdkit.training.checkpoint import save_weights
    from kdkit.training.loop import fit

    OUT.mkdir(parents=True, exist_ok=True)
    path, meta = OUT / "teacher_cnn_large.safetensors", OUT / "teacher_cnn_large.json"
    if path.is_file() and meta.is_file() and json.loads(meta.read_text()).get("setting") == SETTING:
        return path
    splits, cfg = _setup()
    torch.manual_seed(1000)
    model = create_model("cnn_large", num_classes=10, input_shape=splits.input_shape)
    log("teacher cnn_large: training")
    fit(METHODS.get("supervised")(model), splits.train, None,
        cfg.model_copy(update={"epochs": SETTING["teacher_epochs"]}),
        seed=1000, device="cpu", batch_size=SETTING["batch_size"])
    save_weights(model, path)
    meta.write_text(json.dumps({"setting": SETTING, "test_accuracy": _accuracy(model, splits.test)}, indent=2))
    return path


def run_one(label: str, method: str, options: Dict[str, Any], seed: int, teacher_path: str) -> Dict[str, Any]:
    """One student: a fresh seeded cnn_small trained with ``method`` (or on labels for ``scratch``)."""
    torch.set_num_threads(1)
    from kdkit.methods.build import build_method
    from kdkit.models import create_model
    from kdkit.teacher import Teacher
    from kdkit.training.checkpoint import load_weights
    from kdkit.training.loop import fit

    splits, cfg = _setup()
    teacher = create_model("cnn_large", num_classes=10, input_shape=splits.input_shape)
    load_weights(teacher, teacher_path)
    torch.manual_seed(seed)
    student = create_model("cnn_small", num_classes=10, input_shape=splits.input_shape)
    m = build_method(method, student, Teacher(teacher) if method != "supervised" else None, options,
                     train_data=splits.train)
    t0 = time.perf_counter()
    history = fit(m, splits.train, None, cfg, seed=seed, device="cpu", batch_size=SETTING["batch_size"])
    return {"label": label, "method": method, "options": options, "seed": seed,
            "accuracy": _accuracy(m.student, splits.test), "wall_seconds": time.perf_counter() - t0,
            "last_epoch": {k: v for k, v in history.epochs[-1].items() if k.startswith("train_")}}


def plan(grid: str) -> List[Tuple[str, str, Dict[str, Any]]]:
    rows = [("scratch", "supervised", {})]
    for item in grid.split(";"):
        name, _, values = item.partition("=")
        for v in values.split(","):
            beta = float(v)
            opts = dict(FEATURE) if name != "dkd" else {}
            opts["beta"] = beta
            tag = " (default)" if beta == DEFAULTS.get(name) else ""
            rows.append((f"{name} beta={v}{tag}", name, opts))
    return rows


def summarise(rows: List[Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    by: Dict[str, List[Dict[str, Any]]] = {}
    for r in rows:
        by.setdefault(r["label"], []).append(r)
    out = {}
    for label, rs in by.items():
        accs = [100 * r["accuracy"] for r in sorted(rs, key=lambda r: r["seed"])]
        out[label] = {"method": rs[0]["method"], "options": rs[0]["options"], "seeds": sorted(r["seed"] for r in rs),
                      "accuracy": accs, "mean": statistics.mean(accs),
                      "std": statistics.stdev(accs) if len(accs) > 1 else 0.0}
    return out


def table(summary: Dict[str, Dict[str, Any]], teacher_acc: Optional[float]) -> str:
    scratch = summary.get("scratch", {}).get("mean")
    lines = ["| run | test acc. (%) mean ± std | vs scratch |", "|---|---|---|"]
    if teacher_acc is not None:
        lines.append(f"| teacher cnn_large | {100 * teacher_acc:.2f} | |")
    for label, s in summary.items():
        diff = f"{s['mean'] - scratch:+.2f}" if scratch is not None and label != "scratch" else ""
        lines.append(f"| {label} | {s['mean']:.2f} ± {s['std']:.2f} | {diff} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--grid", default=GRID, help="method=beta,beta;method=beta,...")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    path = teacher_weights()
    teacher_acc = json.loads((OUT / "teacher_cnn_large.json").read_text()).get("test_accuracy")
    log(f"teacher: {100 * teacher_acc:.2f}%")
    seeds = [int(s) for s in args.seeds.split(",")]
    jobs = [(label, method, opts, seed) for label, method, opts in plan(args.grid) for seed in seeds]
    rows: List[Dict[str, Any]] = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        futures = [pool.submit(run_one, label, method, opts, seed, str(path)) for label, method, opts, seed in jobs]
        for f in as_completed(futures):
            r = f.result()
            rows.append(r)
            log(f"{r['label']} seed {r['seed']}: {100 * r['accuracy']:.2f}% ({r['wall_seconds']:.0f}s)")
            order = {label: i for i, (label, _, _) in enumerate(plan(args.grid))}
            summary = dict(sorted(summarise(rows).items(), key=lambda kv: order[kv[0]]))
            out.write_text(json.dumps({"benchmark": "feature_weights", "setting": SETTING, "seeds": seeds,
                                       "teacher_accuracy": teacher_acc, "summary": summary, "runs": rows,
                                       "elapsed_seconds": time.perf_counter() - t_start}, indent=2))
    print(table(summary, teacher_acc))


if __name__ == "__main__":
    main()
