#!/usr/bin/env python
"""Function matching against cached KD: what the live teacher costs and where the recipe pays.

Function matching (Beyer et al., "Knowledge distillation: A good teacher is patient and consistent", CVPR 2022):
teacher and student see the same crop/flip + mixup view, the loss is KL to the teacher at T=1 with no labels,
and the schedule is long. Mixup weights are drawn afresh every step, so kdkit runs the teacher live
(no cache); plain KD reuses the teacher's cached outputs and only trains the student.

For each dataset, each schedule length (a short one and a longer one) and each seed, interleaved so the
variants run side by side on the same (shared, noisy) machine:

- ``scratch``: the student on labels (``kdkit.train``);
- ``kd_cached``: Hinton KD with labels, teacher outputs cached in memory (``train.teacher_cache: memory``);
- ``fm_live``: function matching (:func:`kdkit.recipes.function_matching.function_matching`), teacher live.

Reported: test accuracy (mean, sample std over seeds), seconds per epoch (median of a run's epochs, the batch
loop only; and the run's wall time including the cache build and evaluation), and the per-seed paired ratio of
``fm_live`` to ``kd_cached`` seconds per epoch (median over seeds). Everything runs on ONE thread.

    python benchmarks/function_matching.py            # digits + a 10,000-image Fashion-MNIST subset (~15 min)
    python benchmarks/function_matching.py --quick    # smoke run of every part (results/function_matching_quick.json)

Writes ``benchmarks/results/function_matching.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

import kdkit  # noqa: E402
from kdkit.recipes.function_matching import function_matching  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

SETTINGS = {
    # dataset: teacher, student, optimiser and KD settings (the shipped configs' values)
    "digits": {"student": {"hidden": [32]}, "lr": 0.01, "batch_size": 64, "temperature": 2.0, "alpha": 0.7, "pad": 1,
               "teacher_epochs": 30, "teacher_lr": 3e-3, "epochs": [30, 200]},
    "fashion_mnist": {"student": {"hidden": [64]}, "lr": 0.001, "batch_size": 128, "temperature": 2.0, "alpha": 0.5,
                      "pad": 2, "teacher_epochs": 4, "teacher_lr": 2e-3, "epochs": [5, 15], "subset": 10000},
}


def _data(name: str, args):
    if name == "digits":
        return kdkit.DATASETS.get("digits")()
    return kdkit.DATASETS.get("fashion_mnist")(train_subset=args.fashion_subset)


def _teacher(name: str, splits, s: Dict[str, Any]):
    """The teacher, trained once here with kdkit.train (seed 0): cnn_large for digits, the Fashion-MNIST
    benchmark's LeNet-style CNN for Fashion-MNIST."""
    torch.manual_seed(0)
    if name == "digits":
        model = kdkit.create_model("cnn_large", num_classes=10, input_shape=splits.input_shape, width=32)
        arch = "cnn_large (width 32)"
    else:
        from fashion_mnist import teacher_net

        model, arch = teacher_net(16), "LeNet-style CNN (width 16), benchmarks/fashion_mnist.py"
    t0 = time.perf_counter()
    run = kdkit.train(model, splits.train, splits.val, test_data=splits.test, seed=0, device="cpu",
                      batch_size=s["batch_size"], epochs=s["teacher_epochs"], lr=s["teacher_lr"], optimizer="adam",
                      schedule="cosine", progress=False, quiet=True, threads=1)
    info = {"architecture": arch, "parameters": sum(p.numel() for p in run.student.parameters()),
            "epochs": s["teacher_epochs"], "train_seconds": round(time.perf_counter() - t0, 1),
            "test_accuracy": run.metrics["student"]["accuracy"]}
    return run.student.eval(), info


def _student(splits, s):
    return kdkit.create_model("mlp", num_classes=10, input_shape=splits.input_shape, **s["student"])


def _one(variant: str, splits, teacher, s: Dict[str, Any], epochs: int, seed: int) -> Dict[str, Any]:
    common = dict(test_data=splits.test, seed=seed, device="cpu", batch_size=s["batch_size"], epochs=epochs,
                  lr=s["lr"], optimizer="adam", schedule="cosine", progress=False, quiet=True, threads=1)
    torch.manual_seed(seed)
    student = _student(splits, s)
    t0 = time.perf_counter()
    if variant == "scratch":
        run = kdkit.train(student, splits.train, splits.val, **common)
    elif variant == "kd_cached":
        run = kdkit.distill(teacher, student, splits.train, splits.val, method="kd", temperature=s["temperature"],
                            alpha=s["alpha"], teacher_cache="memory", **common)
    else:
        run = function_matching(teacher, student, splits.train, splits.val, mixup=1.0, pad=s["pad"], **common)
    wall = time.perf_counter() - t0
    hist = run.history
    return {"variant": variant, "epochs": epochs, "seed": seed, "accuracy": run.metrics["student"]["accuracy"],
            "agreement": run.metrics["student"].get("agreement"), "kept_epoch": run.metrics["student"]["kept_epoch"],
            "epoch_seconds": statistics.median(r["epoch_seconds"] for r in hist),
            "epoch_cpu_seconds": statistics.median(r["epoch_cpu_seconds"] for r in hist),
            "run_seconds": round(wall, 2)}


def _mean_std(xs: List[float]) -> Dict[str, float]:
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0}


def summarise(runs: List[Dict[str, Any]], epochs_list: List[int], seeds: List[int]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for e in epochs_list:
        row: Dict[str, Any] = {}
        for v in ("scratch", "kd_cached", "fm_live"):
            rs = [r for r in runs if r["epochs"] == e and r["variant"] == v]
            row[v] = {"accuracy": _mean_std([r["accuracy"] for r in rs]),
                      "epoch_seconds_median": statistics.median(r["epoch_seconds"] for r in rs),
                      "run_seconds_median": statistics.median(r["run_seconds"] for r in rs)}
        ratios = []
        for seed in seeds:
            fm = next(r for r in runs if r["epochs"] == e and r["variant"] == "fm_live" and r["seed"] == seed)
            kd = next(r for r in runs if r["epochs"] == e and r["variant"] == "kd_cached" and r["seed"] == seed)
            ratios.append(fm["epoch_seconds"] / kd["epoch_seconds"])
        row["fm_over_kd_epoch_seconds"] = {"per_seed": ratios, "median": statistics.median(ratios),
                                           "min": min(ratios), "max": max(ratios)}
        row["fm_minus_kd_points"] = 100 * (row["fm_live"]["accuracy"]["mean"] - row["kd_cached"]["accuracy"]["mean"])
        row["fm_minus_scratch_points"] = 100 * (row["fm_live"]["accuracy"]["mean"]
                                                - row["scratch"]["accuracy"]["mean"])
        out[str(e)] = row
    return out


def table(result: Dict[str, Any]) -> str:
    lines = ["| dataset | epochs | scratch | KD, cached teacher | function matching, live teacher | FM − KD (points) "
             "| s/epoch KD | s/epoch FM | FM/KD s/epoch (median, min-max) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, d in result["datasets"].items():
        for e, row in d["summary"].items():
            def acc(v):
                a = row[v]["accuracy"]
                return f"{100 * a['mean']:.2f} ± {100 * a['std']:.2f}"
            r = row["fm_over_kd_epoch_seconds"]
            lines.append(f"| {name} | {e} | {acc('scratch')} | {acc('kd_cached')} | {acc('fm_live')} | "
                         f"{row['fm_minus_kd_points']:+.2f} | {row['kd_cached']['epoch_seconds_median']:.3f} | "
                         f"{row['fm_live']['epoch_seconds_median']:.3f} | {r['median']:.1f}× "
                         f"({r['min']:.1f}-{r['max']:.1f}) |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", default="digits,fashion_mnist")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--fashion-subset", type=int, default=SETTINGS["fashion_mnist"]["subset"])
    p.add_argument("--epochs", default=None, help="schedule lengths, e.g. 20,60 (default: per dataset)")
    p.add_argument("--quick", action="store_true", help="tiny schedules and one seed: checks that every part runs")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.quick:
        seeds, args.fashion_subset = [0, 1], 1000
    out_path = Path(args.out) if args.out else HERE / "results" / (
        "function_matching_quick.json" if args.quick else "function_matching.json")
    t_start = time.perf_counter()
    result: Dict[str, Any] = {
        "benchmark": "function_matching", "quick": args.quick,
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    "kdkit": kdkit.__version__, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "seeds": seeds, "datasets": {}}
    for name in args.datasets.split(","):
        s = dict(SETTINGS[name])
        if args.epochs:
            s["epochs"] = [int(e) for e in args.epochs.split(",")]
        if args.quick:
            s.update(epochs=[1, 2], teacher_epochs=1)
        splits = _data(name, args)
        teacher, tinfo = _teacher(name, splits, s)
        print(f"{name}: teacher {tinfo['architecture']}, test accuracy {tinfo['test_accuracy']:.4f}, "
              f"{tinfo['train_seconds']} s", flush=True)
        runs = []
        for e in s["epochs"]:
            for seed in seeds:
                for variant in ("scratch", "kd_cached", "fm_live"):  # interleaved: side by side on the machine
                    r = _one(variant, splits, teacher, s, e, seed)
                    runs.append(r)
                    print(f"  {variant:9s} epochs={e:3d} seed={seed} acc={r['accuracy']:.4f} "
                          f"s/epoch={r['epoch_seconds']:.3f} run={r['run_seconds']:.1f}s", flush=True)
        result["datasets"][name] = {
            "data": {"train": len(splits.train), "val": len(splits.val), "test": len(splits.test)},
            "teacher": tinfo, "settings": {k: v for k, v in s.items()},
            "student_parameters": sum(p.numel() for p in _student(splits, s).parameters()),
            "kd": {"temperature": s["temperature"], "alpha": s["alpha"], "labels": "all"},
            "function_matching": {"temperature": 1.0, "alpha": 1.0, "labels": "none", "mixup": 1.0,
                                  "crop_flip_pad": s["pad"]},
            "runs": runs, "summary": summarise(runs, s["epochs"], seeds)}
    result["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2))
    print(table(result))
    print(f"wrote {out_path} ({result['wall_seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
