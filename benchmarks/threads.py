"""One torch thread against two for kdkit's small CPU models: what ``train.threads: auto`` rests on.

    python benchmarks/threads.py              # ~1 min on 2 cores
    python benchmarks/threads.py --repeats 5

Runs ``kdkit train configs/digits_scratch.yaml train.epochs=3`` with ``train.threads=1`` and ``=2``, each run in
its own process (``OMP_NUM_THREADS`` unset), interleaved (1, 2, 2, 1, ...), and records the per-epoch wall
seconds from each run's ``metrics.jsonl``. Writes ``benchmarks/results/threads.json`` and prints the median
and min-max of the epoch times per thread count. On a shared machine the spread matters more than the
median: threads that wait for a busy core cost far more than one thread does.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", default=str(HERE / "out" / "threads"))
    ap.add_argument("--out", default=str(HERE / "results" / "threads.json"))
    args = ap.parse_args()
    work = Path(args.work)
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    epochs = {1: [], 2: []}
    for r in range(args.repeats):
        for threads in ((1, 2) if r % 2 == 0 else (2, 1)):
            out = work / f"t{threads}-r{r}"
            shutil.rmtree(out, ignore_errors=True)
            subprocess.run([sys.executable, "-m", "kdkit", "train", str(ROOT / "configs" / "digits_scratch.yaml"),
                            f"out_dir={out}", "train.epochs=3", f"train.threads={threads}", "--quiet"],
                           check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
            lines = (out / "metrics.jsonl").read_text().splitlines()
            epochs[threads] += [json.loads(line)["epoch_seconds"] for line in lines]
    summary = {str(t): {"median": statistics.median(v), "min": min(v), "max": max(v), "epochs": v}
               for t, v in epochs.items()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"config": "configs/digits_scratch.yaml", "repeats": args.repeats,
                                          "epoch_seconds": summary}, indent=2) + "\n")
    for t, s in summary.items():
        print(f"{t} thread(s): epoch {s['median']:.3f} s median ({s['min']:.3f}-{s['max']:.3f})")


if __name__ == "__main__":
    main()
