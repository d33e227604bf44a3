#!/usr/bin/env python
"""Every registered distillation method on one Fashion-MNIST teacher/student pair, several seeds.

    python benchmarks/methods.py                      # full run (see README "Methods benchmark")
    python benchmarks/methods.py --seeds 0 --methods kd,dkd --epochs 1   # a quick look

Setting (sized for a shared 2-core CPU): a training *subset* of Fashion-MNIST, few epochs, Adam
with a cosine schedule. Teacher: ``cnn_large`` trained once on the same subset and cached in
``benchmarks/out/methods/`` (a second teacher, ``resnet_small``, for the two-teacher ensemble row).
Student: ``cnn_small`` (two conv blocks, so feature methods apply). For every method and seed the
student starts from the same seeded initialisation as the scratch baseline of that seed; its final
weights are measured on the full 10,000-image test set (no early stopping: no validation split is
used, so no teacher forward passes are spent on validation).

Rows beyond the registry: ``scratch`` (the student trained on labels alone), ``ensemble_kd`` (KD from
the cnn_large + resnet_small ensemble, entropy-based per-sample weights) and ``born_again_g1/g2``
(cnn_small distilled from the scratch cnn_small of the same seed, then from generation 1).

Time per epoch is the median epoch wall time of the run divided by that of plain ``kd`` in the same
seed (teacher outputs may be cached by the engine for logit-only methods; feature methods run the
teacher every step), then the median over seeds. Results are written after every run to
``benchmarks/results/methods.json`` so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from kdkit.api import build_data
from kdkit.config import DataConfig, TrainConfig
from kdkit.evaluation.metrics import predict, quality
from kdkit.methods import METHODS
from kdkit.methods.build import build_method
from kdkit.models import create_model
from kdkit.teacher import Teacher, TeacherEnsemble
from kdkit.training.checkpoint import load_weights, save_weights
from kdkit.training.loop import fit

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "out" / "methods"
RESULTS = ROOT / "results" / "methods.json"

# Options per method for this pair. cnn_large: features.0..3 (28,28,14,14 -> pooled to 7x7 after .3),
# cnn_small: features.0 (14x14), features.1 (7x7). Feature methods match the last 7x7 maps;
# relational/contrastive methods use their default (the embedding the classifier head reads).
FEATURE = {"student_layer": "features.1", "teacher_layer": "features.3"}
OPTIONS: Dict[str, Dict[str, Any]] = {
    "kd": {"temperature": 4.0, "alpha": 0.9},
    "fitnets": dict(FEATURE),
    "at": dict(FEATURE),
    "nst": dict(FEATURE),
    "attention_weighted": dict(FEATURE),
    "dml": {"peers": 1},
    "combo": {"parts": {"kd": {"weight": 1.0, "temperature": 4.0, "alpha": 0.9},
                        "at": {"weight": 1.0, "ce_weight": 0.0, **FEATURE}}},
}
SKIP = {"supervised"}  # the scratch row

# Published CIFAR-100 top-1 (%) for ResNet32x4 -> ResNet8x4, for context only (different data, models,
# schedule). Sources: CRD paper (Tian et al., ICLR 2020) Table 1 as reproduced in the RepDistiller README
# (teacher 79.42, student 72.50, KD ... CRD); DKD paper (Zhao et al., CVPR 2022) Table 1 / mdistiller README;
# logit standardisation (Sun et al., CVPR 2024) Table 1 / its README ("KD+Ours").
PUBLISHED = {
    "teacher": (79.42, "CRD paper Table 1"), "scratch": (72.50, "CRD paper Table 1"),
    "kd": (73.33, "CRD paper Table 1"), "fitnets": (73.50, "CRD paper Table 1"),
    "at": (73.44, "CRD paper Table 1"), "sp": (72.94, "CRD paper Table 1"), "cc": (72.97, "CRD paper Table 1"),
    "rkd": (71.90, "CRD paper Table 1"), "pkt": (73.64, "CRD paper Table 1"), "nst": (73.30, "CRD paper Table 1"),
    "crd": (75.51, "CRD paper Table 1"), "dkd": (76.32, "DKD paper Table 1"),
    "kd_ls": (76.62, "Sun et al. 2024 Table 1 (KD + logit standardisation)"),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def test_accuracy(model: torch.nn.Module, data) -> float:
    pred = predict(model, data, 1000)
    return quality(pred["outputs"], pred["y"])["accuracy"]


def cached_teacher(name: str, options: Dict[str, Any], splits, cfg: TrainConfig, seed: int,
                   batch_size: int) -> torch.nn.Module:
    """Train a teacher once; reuse it while its recipe (model, options, data, schedule) is unchanged."""
    OUT.mkdir(parents=True, exist_ok=True)
    recipe = {"model": name, "options": options, "data": splits.info, "seed": seed, "batch_size": batch_size,
              "train": {k: getattr(cfg, k) for k in ("epochs", "optimizer", "lr", "schedule")}}
    tag = f"teacher_{name}"
    weights, meta = OUT / f"{tag}.safetensors", OUT / f"{tag}.json"
    torch.manual_seed(seed)
    model = create_model(name, num_classes=splits.num_classes, input_shape=splits.input_shape, **options)
    if weights.is_file() and meta.is_file() and json.loads(meta.read_text()).get("recipe") == recipe:
        load_weights(model, weights)
        log(f"teacher {name}: cached ({weights})")
        return model
    log(f"teacher {name}: training {cfg.epochs} epochs")
    t0 = time.perf_counter()
    fit(METHODS.get("supervised")(model), splits.train, None, cfg, seed=seed, device="cpu", batch_size=batch_size)
    save_weights(model, weights)
    meta.write_text(json.dumps({"recipe": recipe, "train_seconds": time.perf_counter() - t0}, indent=2))
    return model


def run_one(method: str, options: Dict[str, Any], teacher, splits, cfg: TrainConfig, seed: int,
            batch_size: int) -> Tuple[Dict[str, Any], torch.nn.Module]:
    """Train a fresh seeded cnn_small with ``method``; return test accuracy and epoch times."""
    torch.manual_seed(seed)
    student = create_model("cnn_small", num_classes=splits.num_classes, input_shape=splits.input_shape)
    m = build_method(method, student, teacher, options, train_data=splits.train)
    t0 = time.perf_counter()
    history = fit(m, splits.train, None, cfg, seed=seed, device="cpu", batch_size=batch_size)
    wall = time.perf_counter() - t0
    row: Dict[str, Any] = {"accuracy": test_accuracy(m.student, splits.test),
                           "epoch_seconds": statistics.median(r["epoch_seconds"] for r in history.epochs),
                           "wall_seconds": wall,
                           "train_parts": {k: v for k, v in history.epochs[-1].items() if k.startswith("train_")}}
    if hasattr(m, "evaluate_peers"):  # mutual learning: every peer's test accuracy
        row["peer_accuracy"] = [q["accuracy"] for q in m.evaluate_peers(splits.test)]
    return row, m.student


def summarise(rows: List[Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    by: Dict[str, List[Dict[str, Any]]] = {}
    for r in rows:
        by.setdefault(r["label"], []).append(r)
    kd_time = {r["seed"]: r["epoch_seconds"] for r in rows if r["label"] == "kd"}
    out = {}
    for label, rs in by.items():
        accs = [100 * r["accuracy"] for r in rs]
        ratios = [r["epoch_seconds"] / kd_time[r["seed"]] for r in rs if r["seed"] in kd_time]
        out[label] = {"method": rs[0]["method"], "seeds": [r["seed"] for r in rs], "accuracy": accs,
                      "mean": statistics.mean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                      "time_vs_kd": statistics.median(ratios) if ratios else None,
                      "epoch_seconds": statistics.median(r["epoch_seconds"] for r in rs)}
    return out


def table(summary: Dict[str, Dict[str, Any]], teacher_acc: Dict[str, float]) -> str:
    scratch = summary.get("scratch", {}).get("mean")
    kd = summary.get("kd", {})
    lines = ["| method | test acc. (%) mean ± std | vs scratch | vs KD | time/epoch vs KD "
             "| CIFAR-100 R32x4→R8x4 (published) |",
             "|---|---|---|---|---|---|"]
    for name, acc in teacher_acc.items():
        pub = PUBLISHED["teacher"][0] if name == "cnn_large" else None
        lines.append(f"| teacher {name} | {100 * acc:.2f} | | | | {pub if pub else ''} |")
    order = sorted(summary, key=lambda k: (k != "scratch", k != "kd", -summary[k]["mean"]))
    for label in order:
        s = summary[label]
        d_scr = f"{s['mean'] - scratch:+.2f}" if scratch is not None and label != "scratch" else ""
        d_kd = f"{s['mean'] - kd['mean']:+.2f}" if kd and label not in ("kd", "scratch") else ""
        t = f"{s['time_vs_kd']:.2f}×" if s["time_vs_kd"] is not None else "-"
        pub = PUBLISHED.get(label, ("", ""))[0]
        lines.append(f"| {label} | {s['mean']:.2f} ± {s['std']:.2f} | {d_scr} | {d_kd} | {t} | {pub} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-subset", type=int, default=2000)
    p.add_argument("--val-size", type=int, default=1000, help="held out of training (unused for selection)")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--teacher-epochs", type=int, default=10)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--methods", default="all", help="comma-separated row labels, or all")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--threads", type=int, default=1, help="1 is much faster than 2 on an oversubscribed machine")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]

    splits = build_data(DataConfig(name="fashion_mnist", train_subset=args.train_subset, val_size=args.val_size))
    cfg = TrainConfig(epochs=args.epochs, optimizer="adam", lr=args.lr, schedule="cosine", progress=False)
    t_cfg = cfg.model_copy(update={"epochs": args.teacher_epochs})
    teacher_model = cached_teacher("cnn_large", {}, splits, t_cfg, seed=1000, batch_size=args.batch_size)
    second_model = cached_teacher("resnet_small", {"width": 8}, splits, t_cfg, seed=1001, batch_size=args.batch_size)
    teacher = Teacher(teacher_model)
    teacher_acc = {"cnn_large": test_accuracy(teacher_model, splits.test),
                   "resnet_small(width 8)": test_accuracy(second_model, splits.test)}
    ensemble = TeacherEnsemble([teacher_model, second_model], weighting="entropy", temperature=4.0)
    teacher_acc["ensemble (entropy weights)"] = test_accuracy(ensemble.model, splits.test)
    log("teachers: " + ", ".join(f"{k} {100 * v:.2f}%" for k, v in teacher_acc.items()))

    # (label, method, options, teacher); born-again rows get their teacher per seed.
    plan: List[Tuple[str, str, Dict[str, Any], Any]] = [("scratch", "supervised", {}, None),
                                                        ("kd", "kd", OPTIONS["kd"], teacher)]
    for name in METHODS.names():
        if name in SKIP or name == "kd":
            continue
        cls = METHODS.get(name)
        plan.append((name, name, OPTIONS.get(name, {}), teacher if getattr(cls, "needs_teacher", True) else None))
    plan.append(("ensemble_kd", "kd", OPTIONS["kd"], ensemble))
    plan += [("born_again_g1", "kd", OPTIONS["kd"], "gen0"), ("born_again_g2", "kd", OPTIONS["kd"], "gen1")]
    if args.methods != "all":
        wanted = set(args.methods.split(","))
        plan = [row for row in plan if row[0] in wanted]

    rows: List[Dict[str, Any]] = []
    failures: List[Dict[str, Any]] = []
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    for seed in seeds:  # seed-major: an interrupted run still covers every method
        generations: Dict[str, torch.nn.Module] = {}
        for label, method, options, t in plan:
            if t in ("gen0", "gen1"):
                if t not in generations:
                    continue
                t = Teacher(generations[t])
            try:
                row, student = run_one(method, options, t, splits, cfg, seed, args.batch_size)
            except Exception as e:  # keep measuring the others; the failure is reported in the JSON
                failures.append({"label": label, "seed": seed, "error": f"{type(e).__name__}: {e}"})
                log(f"seed {seed} {label}: FAILED {type(e).__name__}: {e}")
                continue
            if label == "scratch":
                generations["gen0"] = student
            elif label == "born_again_g1":
                generations["gen1"] = student
            rows.append({"label": label, "method": method, "seed": seed, "options": options, **row})
            log(f"seed {seed} {label}: {100 * row['accuracy']:.2f}% ({row['epoch_seconds']:.1f}s/epoch)")
            summary = summarise(rows)
            result = {
                "benchmark": "methods", "dataset": "fashion_mnist",
                "setting": {"train_subset": args.train_subset, "epochs": args.epochs,
                            "teacher_epochs": args.teacher_epochs,
                            "batch_size": args.batch_size, "optimizer": "adam", "lr": args.lr, "schedule": "cosine",
                            "student": "cnn_small", "teacher": "cnn_large", "second_teacher": "resnet_small(width=8)",
                            "test_size": len(splits.test), "seeds": seeds, "threads": args.threads},
                "machine": {"python": platform.python_version(), "torch": torch.__version__,
                            "processor": platform.processor() or platform.machine()},
                "teacher_accuracy": teacher_acc, "summary": summary, "runs": rows, "failures": failures,
                "published_cifar100_resnet32x4_resnet8x4": {k: {"top1": v[0], "source": v[1]}
                                                            for k, v in PUBLISHED.items()},
                "elapsed_seconds": time.perf_counter() - started,
            }
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(table(summarise(rows), teacher_acc) if rows else "no runs")
    if failures:
        print("failures:", json.dumps(failures, indent=2))
    print(f"wrote {args.out} in {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    sys.exit(main())
