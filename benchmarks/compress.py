#!/usr/bin/env python
"""Compression and export benchmark on Fashion-MNIST: from a CNN teacher to a small int8 file, and to simple models.

What it measures (everything goes to ``benchmarks/results/compress.json`` and a printed table):

1. A CNN teacher (``cnn_large``, width 32: four conv-BN-ReLU blocks) trained with ``kdkit train`` on a
   training subset for a few epochs, cached in ``benchmarks/out/compress/teacher`` (reused when present).
2. The compression ladder, run by ``kdkit compress`` (:func:`kdkit.compress.run_compress`):
   ``cnn_small`` (width 32, two blocks) initialised from the teacher by parameter transfer (blocks 0 and 2,
   as DistilBERT keeps every other layer) -> KD -> structured pruning (channels removed, with KD recovery)
   -> static int8 quantisation (FX graph mode, calibrated). Per step: test accuracy, agreement with the
   teacher, parameters, bytes of the saved file, single-thread CPU latency at batch 1 and 256 (medians).
3. Export of the final float student to ONNX (float and onnxruntime int8) with parity checks, and its
   onnxruntime latency beside PyTorch's.
4. Simple students: a decision tree and logistic regression distilled from the teacher's soft targets vs the
   same models trained on labels (accuracy and fidelity to the teacher), logistic regression also on the
   teacher's pooled features (feature transfer), and the tree's if-then rules checked against the tree.

Sizing: the machine has 2 CPU cores shared with other jobs, so everything runs on ONE thread
(``torch.set_num_threads(1)``, BLAS/OpenMP limited for scikit-learn), on a training subset with few epochs.
Latencies are single-thread medians; the teacher and student are timed in the same run.

    python benchmarks/compress.py            # about 15 minutes
    python benchmarks/compress.py --quick    # a smoke run of every part (writes compress_quick.json)
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "src"))

import kdkit  # noqa: E402
from kdkit.api import build_data, run_config  # noqa: E402
from kdkit.compress import run_compress  # noqa: E402
from kdkit.config import load_config  # noqa: E402
from kdkit.export import export_model  # noqa: E402
from kdkit.recipes.classical import compare_students, parse_rules, predict_rules, tree_rules  # noqa: E402

OUT = ROOT / "out" / "compress"
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def teacher_run(data: dict, epochs: int, quick: bool) -> Path:
    """Train the teacher once; reuse the cached run directory afterwards."""
    run_dir = OUT / ("teacher-quick" if quick else "teacher")
    if (run_dir / "checkpoints" / "best.safetensors").is_file() and (run_dir / "report.json").is_file():
        print(f"teacher: cached in {run_dir}")
        return run_dir
    if run_dir.exists():  # an interrupted earlier attempt
        import shutil

        shutil.rmtree(run_dir)
    cfg = load_config({"out_dir": str(run_dir), "seed": 0, "device": "cpu", "data": data,
                       "model": {"name": "cnn_large", "width": 32},
                       "train": {"epochs": epochs, "optimizer": "adam", "lr": 3e-3, "schedule": "cosine",
                                 "progress": False}})
    t0 = time.perf_counter()
    run_config(cfg, "train")
    print(f"teacher trained in {time.perf_counter() - t0:.0f}s")
    return run_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, to check the script runs")
    ap.add_argument("--train-subset", type=int, default=8000)
    ap.add_argument("--teacher-epochs", type=int, default=3)
    ap.add_argument("--prune", type=float, default=0.6, help="fraction of the student's parameters removed")
    ap.add_argument("--distill-epochs", type=int, default=8)
    ap.add_argument("--prune-epochs", type=int, default=3, help="recovery KD epochs after pruning")
    ap.add_argument("--out", default="compress.json", help="file name under benchmarks/results/")
    args = ap.parse_args()
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    quick = args.quick
    subset = 1500 if quick else args.train_subset
    data = {"name": "fashion_mnist", "train_subset": subset, "batch_size": 128}
    t_start = time.perf_counter()

    # 1. teacher
    teacher_dir = teacher_run(data, 1 if quick else args.teacher_epochs, quick)

    # 2. the ladder
    stamp = time.strftime("%Y%m%d-%H%M%S")
    ladder_dir = OUT / f"ladder{'-quick' if quick else ''}-{stamp}"
    e = 1 if quick else args.distill_epochs
    cfg = load_config({
        "out_dir": str(ladder_dir), "seed": 0, "device": "cpu", "data": data,
        "teacher": {"checkpoint": str(teacher_dir)},
        "student": {"name": "cnn_small", "width": 32},
        "method": {"name": "kd", "temperature": 4.0, "alpha": 0.9},
        "train": {"optimizer": "adam", "lr": 3e-3, "schedule": "cosine", "progress": False},
        "compress": [
            {"step": "transfer", "layers": "every_other"},
            {"step": "distill", "epochs": e},
            {"step": "prune", "structured": True, "sparsity": args.prune, "iterations": 1,
             "epochs": 1 if quick else args.prune_epochs, "lr": 1e-3},
            {"step": "quantize", "mode": "static", "calibration_samples": 1024},
        ]})
    t0 = time.perf_counter()
    ladder = run_compress(cfg)
    ladder_seconds = time.perf_counter() - t0
    report = json.loads((ladder.dir / "report.json").read_text())

    # 3. export of the final float student
    splits = build_data(cfg.data)
    x_test, y_test = splits.test.x, splits.test.y
    export_dir = ladder.dir / "export"
    exports = {}
    for name, kw in (("onnx", {}), ("onnx_int8", {"int8": True, "calibration": splits.train.x[:512]})):
        try:
            exports[name] = export_model(ladder.float_model, x_test[:512], export_dir / f"student-{name}.onnx",
                                         "onnx", **kw)
        except kdkit.KdkitError as err:
            exports[name] = {"error": str(err)}
    try:
        exports["torchscript"] = export_model(ladder.float_model, x_test[:512], export_dir / "student.pt",
                                              "torchscript")
    except kdkit.KdkitError as err:
        exports["torchscript"] = {"error": str(err)}

    # 4. simple students
    from kdkit.api import build_model
    from kdkit.config import ModelConfig

    teacher = build_model(ModelConfig(name="cnn_large", width=32, checkpoint=str(teacher_dir)), splits).eval()
    n_simple = 1000 if quick else 5000
    xs, ys = splits.train.x[:n_simple], splits.train.y[:n_simple].numpy()
    t0 = time.perf_counter()
    simple = compare_students(teacher, xs, ys, x_test, y_test.numpy(), kinds=("decision_tree", "logistic_regression"),
                              temperature=2.0, options={"decision_tree": {"max_depth": 10},
                                                        "logistic_regression": {"max_iter": 200}})
    feat = compare_students(teacher, xs, ys, x_test, y_test.numpy(), kinds=("logistic_regression",),
                            temperature=2.0, features="pool", options={"logistic_regression": {"max_iter": 300}})
    simple_seconds = time.perf_counter() - t0
    tree = simple[0].model
    rules = tree_rules(tree, image_shape=splits.input_shape, class_names=CLASSES)
    parsed = parse_rules(rules, image_shape=splits.input_shape)
    flat = x_test.reshape(len(x_test), -1).numpy()
    rules_exact = float(np.mean(predict_rules(parsed, x_test) == tree.predict(flat)))
    from kdkit.export import export_sklearn

    sk_exports = {}
    for r in simple:
        try:
            sk_exports[r.kind] = export_sklearn(r.model, flat[:512], export_dir / f"{r.kind}.onnx")
        except kdkit.KdkitError as err:
            sk_exports[r.kind] = {"error": str(err)}

    rows = report["models"]
    summary = report["summary"]
    result = {
        "benchmark": "compress", "quick": quick, "dataset": "fashion_mnist",
        "train_subset": subset, "teacher_epochs": 1 if quick else args.teacher_epochs,
        "settings": {"distill_epochs": e, "prune_sparsity": args.prune, "prune_epochs": args.prune_epochs},
        "threads": 1, "machine": {"python": platform.python_version(), "torch": torch.__version__,
                                  "cpus": __import__("os").cpu_count()},
        "ladder_dir": str(ladder.dir), "ladder": rows, "ladder_steps": [
            {k: v for k, v in s.items() if k != "metrics"} for s in report["ladder"]],
        "summary": summary,
        "targets": {"bytes_10x": summary.get("bytes_reduction", 0) >= 10,
                    "latency_b1_5x": summary.get("latency_b1_speedup", 0) >= 5,
                    "within_2_points": summary.get("accuracy_drop_points", 99) <= 2.0},
        "export": exports,
        "simple_students": {"transfer_set": n_simple, "temperature": 2.0,
                            "raw_pixels": [r.as_dict() for r in simple],
                            "teacher_features_pool": [r.as_dict() for r in feat],
                            "tree_rules": {"leaves": len(parsed), "rules_match_tree": rules_exact,
                                           "first_rules": rules.splitlines()[:3]},
                            "sklearn_onnx": sk_exports},
        "seconds": {"ladder": ladder_seconds, "simple_students": simple_seconds,
                    "total": time.perf_counter() - t_start},
    }
    (ROOT / "results").mkdir(exist_ok=True)
    out = ROOT / "results" / ("compress_quick.json" if quick else args.out)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print_tables(result)
    print(f"wrote {out}")


def print_tables(r: dict) -> None:
    print("\nCompression ladder (test split, single-thread CPU latency):")
    print(f"{'step':32s} {'acc':>7s} {'agree':>7s} {'params':>8s} {'bytes':>9s} {'b1 ms':>7s} {'b256 ms':>8s}")
    for name, m in r["ladder"].items():
        print(f"{name:32s} {100 * m['accuracy']:6.2f}% {100 * m.get('agreement', 1):6.2f}% {m['parameters']:8,d} "
              f"{m['bytes']:9,d} {m['latency_ms_b1']:7.3f} {m['latency_ms_b256']:8.2f}")
    s = r["summary"]
    print(f"teacher -> final: bytes {s.get('bytes_reduction', 0):.1f}x smaller, batch-1 latency "
          f"{s.get('latency_b1_speedup', 0):.1f}x lower, accuracy drop {s.get('accuracy_drop_points', 0):.2f} points")
    for name, e in r["export"].items():
        if "error" in e:
            print(f"export {name}: ERROR {e['error']}")
            continue
        p = e["parity"]
        lat = e.get("onnxruntime") or e.get("torchscript") or {}
        print(f"export {name}: {e['bytes']:,} bytes, max|diff| {p['max_abs_diff']:.2e}, arg-max agreement "
              f"{p['argmax_agreement']:.4f}, pytorch b1 {e['pytorch']['latency_ms_b1']:.3f} ms, exported "
              + ", ".join(f"{k} {v:.3f} ms" for k, v in lat.items()))
    print("\nSimple students (distilled from the teacher vs trained on labels):")
    for group in ("raw_pixels", "teacher_features_pool"):
        for x in r["simple_students"][group]:
            d, b = x["distilled"], x["labels_only"]
            print(f"{group:22s} {x['kind']:20s} distilled acc {100 * d['accuracy']:.2f}% fid {100 * d['fidelity']:.2f}%"
                  f" | labels acc {100 * b['accuracy']:.2f}% fid {100 * b['fidelity']:.2f}%")
    print(f"tree rules reproduce the tree on {100 * r['simple_students']['tree_rules']['rules_match_tree']:.2f}% "
          "of test images")


if __name__ == "__main__":
    main()
