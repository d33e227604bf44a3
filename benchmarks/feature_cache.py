"""Seconds per epoch of a feature method (``tinybert``) with the teacher live against the teacher's outputs and
hidden states read from the feature cache (issue 10).

    python benchmarks/feature_cache.py              # about 2-3 minutes on one core
    python benchmarks/feature_cache.py --repeats 5

Setting: the first ``--per-topic`` fortunes of six topics (``fortunes_topics``, MiniLM's tokenizer, ``--max-length``
tokens, kdkit's fixed split), a randomly initialised ``kdkit.hf.tiny_bert`` teacher of 4 layers, width 128 (4
heads), and a 2-layer, width-64 student (4 heads); ``tinybert`` (hidden MSE + attention KL on the uniform layer map
plus KD), AdamW, batch 32, one thread. The teacher is untrained: its cost, not its accuracy, is measured.

Each run is its own process (``kdkit.distill``, ``--epochs`` epochs), ``train.teacher_cache=off`` (live) or
``memory`` (cached; the cache, fp16 features, is built before the first step and counted in ``call_seconds``, not
in the epochs); the two are interleaved, the order reversed every other repeat. Per run the median of its epochs
after the first, in wall seconds and in the process's CPU seconds (less moved by other processes on a shared
machine); the ratios are live / cached of the medians over repeats, with the per-repeat ratios (same repeat,
side by side). After its timed run, each child also records what ``auto`` decides (``auto_plan``).
Writes ``benchmarks/results/feature_cache.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TOPICS = ["computers", "definitions", "people", "politics", "science", "songs-poems"]


def one_run(mode: str, args) -> dict:
    """Runs in the child process: one kdkit.distill with the teacher live (off) or cached (memory)."""
    import torch

    torch.set_num_threads(1)
    import kdkit
    from kdkit.hf import tiny_bert

    splits = kdkit.DATASETS.get("fortunes_topics")(
        tokenizer="minilm", max_length=args.max_length, topics=TOPICS, per_topic=args.per_topic, val_fraction=0.0,
        test_fraction=0.2, cache_dir=str(HERE / "out" / "feature_cache" / "tokens"))
    vocab = int(splits.train.x.max()) + 1
    torch.manual_seed(0)
    teacher = tiny_bert(vocab_size=vocab, num_labels=splits.num_classes, layers=4, hidden=128, heads=4,
                        max_length=args.max_length, dropout=0.0)
    student = tiny_bert(vocab_size=vocab, num_labels=splits.num_classes, layers=2, hidden=64, heads=4,
                        max_length=args.max_length)
    t0 = time.perf_counter()
    run = kdkit.distill(teacher, student, splits.train, method="tinybert", epochs=args.epochs, lr=1e-3,
                        batch_size=32, optimizer="adamw", seed=0, device="cpu", threads=1, progress=False,
                        quiet=True, teacher_cache=mode)
    call = time.perf_counter() - t0
    epochs = [h["epoch_seconds"] for h in run.history]
    cpu = [h["epoch_cpu_seconds"] for h in run.history]
    # After the timed run: what auto decides for this setting (the cache's size and the features' share of it).
    from kdkit.config import TrainConfig
    from kdkit.methods.build import build_method
    from kdkit.teacher import Teacher
    from kdkit.teacher.plan import cache_plan

    probe_student = tiny_bert(vocab_size=vocab, num_labels=splits.num_classes, layers=2, hidden=64, heads=4,
                              max_length=args.max_length)
    method = build_method("tinybert", probe_student, Teacher(teacher), {}, train_data=splits.train)
    return {"mode": mode, "epoch_seconds": epochs, "steady_median": statistics.median(epochs[1:]),
            "epoch_cpu_seconds": cpu, "steady_cpu_median": statistics.median(cpu[1:]),
            "call_seconds": call, "train_samples": len(splits.train), "width": int(splits.train.x.shape[1]),
            "final_train_loss": run.history[-1].get("train_loss"),
            "auto_plan": cache_plan(method, splits.train, TrainConfig())[1]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--per-topic", type=int, default=60)
    ap.add_argument("--max-length", type=int, default=48)
    ap.add_argument("--one", choices=["off", "memory"], help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(HERE / "results" / "feature_cache.json"))
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one_run(args.one, args)))
        return
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    runs = {"off": [], "memory": []}
    for r in range(args.repeats):
        for mode in (("off", "memory") if r % 2 == 0 else ("memory", "off")):
            out = subprocess.run([sys.executable, __file__, "--one", mode, "--repeats", "1", "--epochs",
                                  str(args.epochs), "--per-topic", str(args.per_topic), "--max-length",
                                  str(args.max_length)], env=env, cwd=ROOT, capture_output=True, text=True,
                                 check=True)
            line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")][-1]
            runs[mode].append(json.loads(line[len("RESULT "):]))
            print(f"repeat {r} {mode:6s}: steady epoch {runs[mode][-1]['steady_median']:.3f} s wall, "
                  f"{runs[mode][-1]['steady_cpu_median']:.3f} s CPU; call {runs[mode][-1]['call_seconds']:.1f} s",
                  flush=True)
    live = [x["steady_median"] for x in runs["off"]]
    cached = [x["steady_median"] for x in runs["memory"]]
    per_repeat = [a / b for a, b in zip(live, cached)]
    live_cpu = [x["steady_cpu_median"] for x in runs["off"]]
    cached_cpu = [x["steady_cpu_median"] for x in runs["memory"]]
    result = {
        "setting": {"data": f"fortunes_topics {TOPICS}, first {args.per_topic} per topic, MiniLM tokenizer, "
                            f"max_length {args.max_length}", "teacher": "tiny_bert 4 layers, width 128, 4 heads",
                    "student": "tiny_bert 2 layers, width 64, 4 heads", "method": "tinybert", "batch_size": 32,
                    "epochs": args.epochs, "threads": 1, "train_samples": runs["off"][0]["train_samples"]},
        "runs": runs,
        "live_epoch_median": statistics.median(live), "cached_epoch_median": statistics.median(cached),
        "ratio_live_over_cached": statistics.median(live) / statistics.median(cached),
        "ratio_per_repeat": per_repeat,
        "live_epoch_cpu_median": statistics.median(live_cpu), "cached_epoch_cpu_median": statistics.median(cached_cpu),
        "ratio_cpu_live_over_cached": statistics.median(live_cpu) / statistics.median(cached_cpu),
        "ratio_cpu_per_repeat": [a / b for a, b in zip(live_cpu, cached_cpu)],
        "call_seconds_median": {m: statistics.median(x["call_seconds"] for x in v) for m, v in runs.items()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"| teacher | wall s / epoch (median of {args.repeats}) | CPU s / epoch | distill call, s |")
    print("|---|---|---|---|")
    for m, name in (("off", "live"), ("memory", "cached (fp16 features)")):
        print(f"| {name} | {statistics.median(x['steady_median'] for x in runs[m]):.3f} | "
              f"{statistics.median(x['steady_cpu_median'] for x in runs[m]):.3f} | "
              f"{result['call_seconds_median'][m]:.1f} |")
    print(f"ratio live / cached, wall: {result['ratio_live_over_cached']:.2f} (per repeat: "
          f"{', '.join(f'{x:.2f}' for x in per_repeat)}); CPU: {result['ratio_cpu_live_over_cached']:.2f} "
          f"(per repeat: {', '.join(f'{x:.2f}' for x in result['ratio_cpu_per_repeat'])})")


if __name__ == "__main__":
    main()
