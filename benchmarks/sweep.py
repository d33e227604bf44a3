#!/usr/bin/env python
"""Sweep benchmark on Fashion-MNIST: does a swept distillation recipe beat training from scratch, and what does
the sweep cost?

1. The teacher of benchmarks/fashion_mnist.py (LeNet-style CNN, trained once and cached in
   ``benchmarks/out/fashion_mnist/``; trained here when absent) and its MLP student 784-64-10, all labels.
2. ``kdkit.sweep`` over method.name=[kd,dist,dkd], method.temperature=1..8:log, method.alpha=0..1 (TPE seeded
   from seed 0, median pruning after 2 epochs), N trials of E epochs each on the full training set, scored on
   the 5,000-image validation split (the test split is never seen by the sweep). The learning rate, schedule
   and epochs are fixed (those of fashion_mnist.py), so the comparison with scratch isolates the recipe.
3. The best config (best.yaml) retrained over 3 seeds, against the scratch student (kdkit train, same
   epochs, optimiser, lr) and the default recipe (kd, T=4, alpha=0.9) on the same seeds; test accuracy, mean and
   sample std. Verdict rule of fashion_mnist.py: beats scratch if gain > std(scratch) + std(swept).
4. Cost: the sweep's wall time against one distillation run of the best config with the teacher live in the
   loop (``train.teacher_cache=off``, seed 0), and teacher passes over the training set done vs saved.

    python benchmarks/sweep.py              # ~20 minutes on one busy core (writes results/sweep.json)
    python benchmarks/sweep.py --quick      # smoke run: 5,000 images, 3 trials of 1 epoch (OUT/quick/quick.json)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import fashion_mnist as fm  # noqa: E402  (the teacher and its cache, shared with benchmarks/fashion_mnist.py)
import kdkit  # noqa: E402
from kdkit.config import dump_config, load_config  # noqa: E402

DEFAULT_OUT = HERE / "out" / "sweep"
DEFAULT_JSON = HERE / "results" / "sweep.json"
SPACE = {"method.name": ["kd", "dist", "dkd"], "method.temperature": "1..8:log", "method.alpha": "0..1"}


def teacher_model(width: int = 16) -> torch.nn.Module:
    """The benchmark teacher as a registered model, so that trial configs can rebuild it."""
    return fm.teacher_net(width)


def base_config(args, teacher_ckpt: Path, out_dir: Path, epochs: int) -> Dict[str, Any]:
    data = {"name": "fashion_mnist", "root": args.data_root, "batch_size": 128}
    if args.train_subset:
        data["train_subset"] = args.train_subset
    return {"seed": 0, "device": "cpu", "out_dir": str(out_dir), "data": data,
            "teacher": {"name": "fmnist_lenet", "width": args.teacher_width, "checkpoint": str(teacher_ckpt)},
            "student": {"name": "mlp", "hidden": [64]},
            "method": {"name": "kd", "temperature": 4.0, "alpha": 0.9},
            "train": {"epochs": epochs, "optimizer": "adam", "lr": args.lr, "schedule": "cosine",
                      "progress": False, "quiet": True, "threads": 1}}


def run(raw: Dict[str, Any], command: str) -> Dict[str, Any]:
    t0 = time.perf_counter()
    result = kdkit.run_config(load_config(raw), command)
    key = "student"  # api._finish names the trained model "student" for both commands
    return {"seed": raw["seed"], "accuracy": result.metrics[key]["accuracy"],
            "seconds": round(time.perf_counter() - t0, 1), "kept_epoch": result.metrics[key].get("kept_epoch")}


def summary(runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    acc = [r["accuracy"] for r in runs]
    return {"runs": runs, "mean": statistics.mean(acc), "std": statistics.stdev(acc) if len(acc) > 1 else 0.0}


def main() -> None:  # noqa: C901 - one linear script
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-root", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--json", default=None, help=f"results file (default {DEFAULT_JSON})")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--trials", type=int, default=12)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--teacher-width", type=int, default=16)
    p.add_argument("--teacher-epochs", type=int, default=4)
    p.add_argument("--train-subset", type=int, default=None)
    args = p.parse_args()
    if args.quick:
        args.trials, args.epochs, args.seeds, args.train_subset, args.teacher_epochs = 3, 1, 2, 5000, 1
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    out = Path(args.out) / ("quick" if args.quick else "full")
    if out.exists():
        shutil.rmtree(out)  # our own previous run of this benchmark
    out.mkdir(parents=True)
    json_path = Path(args.json) if args.json else (out / "quick.json" if args.quick else DEFAULT_JSON)

    # 1. teacher (shared with benchmarks/fashion_mnist.py)
    # the teacher is trained on the full training set (as in fashion_mnist.py); --train-subset only shortens
    # the students' runs (quick: the teacher too, 1 epoch on the subset)
    splits = fm.load_data(Path(args.data_root), args.train_subset if args.quick else None)
    fm_args = argparse.Namespace(teacher_width=args.teacher_width, teacher_epochs=args.teacher_epochs, device="cpu")
    teacher = fm.get_teacher(splits, fm_args, fm.DEFAULT_OUT if not args.quick else out / "teacher")
    ckpt = Path(teacher["cache_dir"]).parent / "run" / "checkpoints" / "best.safetensors"
    kdkit.register_model("fmnist_lenet")(teacher_model)
    del splits

    # 2. the sweep
    sweep_dir = out / "sweep"
    base = base_config(args, ckpt, sweep_dir, args.epochs)
    base["sweep"] = {"trials": args.trials, "sampler": "tpe", "pruner": "median", "startup_trials": 5,
                     "warmup_epochs": 2 if args.epochs > 2 else 1}
    t0 = time.perf_counter()
    result = kdkit.sweep(base, space=SPACE)
    sweep_seconds = time.perf_counter() - t0
    best = result.best_config
    print(f"sweep: {len(result.trials)} trials in {sweep_seconds:.0f} s; best trial {result.best_trial} "
          f"({result.best_params}) val_accuracy {result.best_value:.4f}", flush=True)

    # 3. best config vs scratch vs the default recipe, same seeds and epochs
    seeds = list(range(args.seeds))
    best_raw = best.model_dump(mode="json")
    rows: Dict[str, List[Dict[str, Any]]] = {"swept": [], "scratch": [], "default_kd": []}
    for seed in seeds:
        rows["swept"].append(run({**best_raw, "seed": seed, "out_dir": str(out / f"swept-seed{seed}")}, "distill"))
        scratch = base_config(args, ckpt, out / f"scratch-seed{seed}", args.epochs)
        scratch = {**{k: v for k, v in scratch.items() if k not in ("teacher", "student", "method")},
                   "seed": seed, "model": scratch["student"]}
        rows["scratch"].append(run(scratch, "train"))
        default = {**base_config(args, ckpt, out / f"default-seed{seed}", args.epochs), "seed": seed}
        rows["default_kd"].append(run(default, "distill"))
        print(f"seed {seed}: " + ", ".join(f"{k} {v[-1]['accuracy']:.4f}" for k, v in rows.items()), flush=True)
    res = {k: summary(v) for k, v in rows.items()}
    gain = res["swept"]["mean"] - res["scratch"]["mean"]
    spread = res["swept"]["std"] + res["scratch"]["std"]
    verdict = "beats scratch" if gain > spread else ("trails scratch" if gain < -spread else "no clear difference")

    # 4. cost: one live-teacher distillation run of the best config (seed 0)
    live_raw = {**best_raw, "seed": 0, "out_dir": str(out / "live-seed0")}
    live_raw["train"] = {**live_raw["train"], "teacher_cache": "off"}
    live = run(live_raw, "distill")
    (out / "best.yaml").write_text(dump_config(best))

    report = {
        "benchmark": "sweep", "quick": args.quick,
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": "cpu"},
        "teacher": {k: v for k, v in teacher["info"].items() if k != "cached"},
        "student": "mlp 784-64-10", "epochs": args.epochs, "lr": args.lr, "optimizer": "adam",
        "schedule": "cosine", "train_subset": args.train_subset,
        "sweep": {"trials": args.trials, "space": SPACE, "sampler": "tpe (seed 0)",
                  "pruner": f"median after {base['sweep']['warmup_epochs']} epochs, {5} startup trials",
                  "score": "val_accuracy at the kept epoch (5,000 validation images)",
                  "seconds": round(sweep_seconds, 1),
                  "states": {s: sum(t["state"] == s for t in result.trials) for s in ("complete", "pruned", "fail")},
                  "best_trial": result.best_trial, "best_params": result.best_params,
                  "best_val_accuracy": result.best_value, "teacher": result.teacher,
                  "trials_table": [{k: t[k] for k in ("trial", "state", "params", "value", "epochs", "seconds",
                                                        "teacher")} for t in result.trials]},
        "seeds": seeds, "results": res, "gain": gain, "spread": spread,
        "verdict_rule": "beats scratch if gain > std(scratch) + std(swept); trails if gain < -(that)",
        "verdict": verdict,
        "default_kd_gain": res["default_kd"]["mean"] - res["scratch"]["mean"],
        "live_teacher_run": live,
        "cost": {"sweep_seconds": round(sweep_seconds, 1), "live_run_seconds": live["seconds"],
                 "sweep_over_live_run": round(sweep_seconds / live["seconds"], 2),
                 "cached_run_seconds_seed0": rows["swept"][0]["seconds"]},
    }
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    print(f"results: {json_path}")


def table(r: Dict[str, Any]) -> str:
    res = r["results"]
    t = r["sweep"]["teacher"]
    lines = ["| student (test accuracy, %d seeds) | mean | std |" % len(r["seeds"]), "|---|---:|---:|"]
    best = ", ".join(f"{k.split('.')[-1]}={v:.3g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
                     for k, v in r["sweep"]["best_params"].items())
    names = {"scratch": "scratch (kdkit train)", "default_kd": "kd T=4, alpha=0.9 (default recipe)",
             "swept": f"swept: {best}"}
    for k in ("scratch", "default_kd", "swept"):
        lines.append(f"| {names[k]} | {res[k]['mean']:.2%} | {res[k]['std']:.2%} |")
    lines += ["", f"gain of the swept recipe over scratch: {r['gain']:+.2%} (spread {r['spread']:.2%}): {r['verdict']}",
              f"sweep: {r['sweep']['trials']} trials x {r['epochs']} epochs ({r['sweep']['states']}) in "
              f"{r['cost']['sweep_seconds']:.0f} s = {r['cost']['sweep_over_live_run']:.1f} live-teacher runs "
              f"({r['cost']['live_run_seconds']:.0f} s each; a cached run took "
              f"{r['cost']['cached_run_seconds_seed0']:.0f} s)",
              f"teacher passes over the training set: {t['passes_done']} done; {t['passes_if_live_teacher']} with the "
              f"teacher live in every trial ({t['saved_vs_live_teacher']} saved), {t['passes_if_cache_per_trial']} "
              f"with a cache per trial ({t['saved_vs_cache_per_trial']} saved)"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
