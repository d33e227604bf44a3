"""The cached distillation loop against hand-written PyTorch loops, each variant in its own process.

    python benchmarks/cached_loop.py                 # ~10 min on 2 shared cores
    python benchmarks/cached_loop.py --repeats 3     # quicker

The question (issue "One core, readable pieces"): with the teacher's outputs cached, how much does one kdkit
epoch cost beyond a hand-written loop doing the same work? Fashion-MNIST (``--train-subset`` 20,000 images),
student MLP 784-256-10, a CNN teacher (``cnn_small``, trained one epoch once and kept in the output folder),
KD T=4, alpha=0.9, SGD (momentum 0.9, Nesterov) lr 0.05, batch 128, one torch thread.

Variants, each run as ``python benchmarks/cached_loop.py --variant NAME`` in a fresh process:

- ``student_only``: a hand-written loop training the student on labels (cross-entropy) alone;
- ``hand_cached``: a hand-written KD loop reading the teacher's outputs from a precomputed table by index;
- ``kdkit_cached``: :func:`kdkit.training.loop.fit` with the ``kd`` method and ``teacher_cache: memory``
  (the cache is filled before the first epoch, outside the timed epochs).

Each process runs ``--epochs`` epochs and reports the CPU and wall time of each; the first epoch is a warm-up
and is dropped. Repeats are interleaved (every variant once per repeat, the order reversed every other repeat),
ratios are taken per repeat from the median steady epoch, and the table gives the median ratio with its
min-max over repeats. CPU time (``time.process_time`` of a one-thread process) is the headline: it does not
count the time another process held the core. Writes ``benchmarks/results/cached_loop.json``.

``--parts`` says where the time goes instead (``benchmarks/results/cached_loop_parts.json``), in one process:
CPU microseconds of single pieces of a step (best of 7 rounds), and paired epoch ratios against the
hand-written cached loop (one epoch of each, alternating, ``--pairs`` times) for kdkit's loop running the
hand-written loss itself, the same with the epoch statistics and scheduler stubbed out, the ``kd`` method
through the ``Teacher``, and the ``kd`` method with the ``Teacher`` replaced by a plain table lookup.
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
from typing import Dict, List

HERE = Path(__file__).resolve().parent
T, ALPHA, LR, SEED, BATCH = 4.0, 0.9, 0.05, 0, 128
ORDER = ["student_only", "hand_cached", "kdkit_cached"]


def _setup(work: Path, train_subset: int):
    """Data, the student's initial weights, the teacher's output table (built once, cached in ``work``)."""
    import torch
    from safetensors.torch import load_file, save_file

    import kdkit
    import kdkit.api

    splits = kdkit.api.build_data(kdkit.load_config({"data": {"name": "fashion_mnist",
                                                             "train_subset": train_subset}}).data)
    train = splits.train
    files = work / "setup.safetensors"
    if not files.is_file():
        torch.manual_seed(SEED)
        teacher = kdkit.create_model("cnn_small", num_classes=10, input_shape=(1, 28, 28))
        kdkit.train(teacher, train, epochs=1, lr=0.002, batch_size=BATCH, quiet=True, threads=1)
        teacher.eval()
        with torch.inference_mode():
            table = torch.cat([teacher(train.x[i:i + 1024]) for i in range(0, len(train), 1024)])
        torch.manual_seed(SEED + 1)
        student = kdkit.create_model("mlp", num_classes=10, input_shape=(1, 28, 28), hidden=[256])
        save_file({"table": table.contiguous(), **{f"student.{k}": v for k, v in student.state_dict().items()},
                   **{f"teacher.{k}": v.contiguous() for k, v in teacher.state_dict().items()}}, str(files))
    stored = load_file(str(files))
    return train, stored


def _student(stored):
    import kdkit

    student = kdkit.create_model("mlp", num_classes=10, input_shape=(1, 28, 28), hidden=[256])
    student.load_state_dict({k[len("student."):]: v for k, v in stored.items() if k.startswith("student.")})
    return student


def _hand(student, train, table, epochs: int) -> List[List[float]]:
    """The minimal loop: shuffle, slice, forward, (table lookup), loss, backward, step."""
    import torch
    import torch.nn.functional as F

    from kdkit.losses import kd_loss

    opt = torch.optim.SGD(student.parameters(), lr=LR, momentum=0.9, nesterov=True)
    x_all, y_all = train.x, train.y
    g = torch.Generator().manual_seed(SEED)
    times = []
    for _ in range(epochs):
        student.train()
        t0, c0 = time.perf_counter(), time.process_time()
        perm = torch.randperm(len(x_all), generator=g)
        for i in range(0, len(perm), BATCH):
            idx = perm[i:i + BATCH]
            logits = student(x_all[idx])
            if table is None:
                loss = F.cross_entropy(logits, y_all[idx])
            else:
                loss = ALPHA * kd_loss(logits, table[idx], T) + (1 - ALPHA) * F.cross_entropy(logits, y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        times.append([time.process_time() - c0, time.perf_counter() - t0])
    return times


def _kdkit(student, train, stored, epochs: int) -> List[List[float]]:
    import kdkit
    from kdkit.config import TrainConfig
    from kdkit.methods import METHODS
    from kdkit.teacher import Teacher
    from kdkit.training.loop import fit

    teacher = kdkit.create_model("cnn_small", num_classes=10, input_shape=(1, 28, 28))
    teacher.load_state_dict({k[len("teacher."):]: v for k, v in stored.items() if k.startswith("teacher.")})
    method = METHODS.get("kd")(student, Teacher(teacher), temperature=T, alpha=ALPHA)
    cfg = TrainConfig(epochs=epochs, optimizer="sgd", lr=LR, schedule="constant", teacher_cache="memory",
                      progress=False, quiet=True, threads=1)
    history = fit(method, train, None, cfg, seed=SEED, batch_size=BATCH)
    assert history.teacher_cache.startswith("dense"), history.teacher_cache
    return [[r["epoch_cpu_seconds"], r["epoch_seconds"]] for r in history.epochs]


# ----------------------------------------------------------------------------- --parts: where the time goes

def _micro(fn, n: int = 2000) -> float:
    """Best-of-7 CPU microseconds per call of ``fn``."""
    for _ in range(200):
        fn()
    best = float("inf")
    for _ in range(7):
        c0 = time.process_time()
        for _ in range(n):
            fn()
        best = min(best, (time.process_time() - c0) / n * 1e6)
    return best


def micro_pieces(train, stored) -> Dict[str, float]:
    import torch
    import torch.nn.functional as F

    from kdkit.losses import kd_loss
    from kdkit.methods import METHODS
    from kdkit.methods.base import Outputs
    from kdkit.teacher import Teacher
    from kdkit.teacher.cache import CacheSpec, TeacherCache
    from kdkit.training.tracker import Tracker

    table = stored["table"]
    idx = torch.randperm(len(train))[:BATCH]
    batch = {"x": train.x[idx], "y": train.y[idx], "index": idx}
    logits, t_logits = torch.randn(BATCH, 10, requires_grad=True), table[idx]
    cache = TeacherCache.allocate(len(train), (10,), CacheSpec("float32", None, "memory"), {})
    cache._t["values"][:] = table
    cache.finish()
    teacher = Teacher(torch.nn.Linear(1, 1))
    teacher.use_cache(cache)
    method = METHODS.get("kd")(_student(stored), teacher, temperature=T, alpha=ALPHA)
    out = method.compute_loss(batch, Outputs(logits, {}, t_logits, {}))
    tracker, step = Tracker(torch.device("cpu"), 10**7), [0]

    def add():
        tracker.add(step[0], out, batch)
        step[0] += 1

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=LR)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    opt.step()  # the scheduler expects an optimiser step before its own
    return {
        "hand_loss_forward": _micro(lambda: ALPHA * kd_loss(logits, t_logits, T)
                                    + (1 - ALPHA) * F.cross_entropy(logits, batch["y"])),
        "kd_method_loss_forward": _micro(lambda: method.compute_loss(batch, Outputs(logits, {}, t_logits, {}))),
        "tracker_add": _micro(add),
        "table_index": _micro(lambda: table[idx]),
        "teacher_cached_call": _micro(lambda: teacher(batch)),
        "scheduler_step": _micro(sched.step),
    }


def paired_ratios(train, stored, pairs: int) -> Dict[str, Dict[str, float]]:
    import torch
    import torch.nn.functional as F

    import kdkit.training.tracker as tracker_mod
    from kdkit.config import TrainConfig
    from kdkit.losses import kd_loss
    from kdkit.methods.base import Method
    from kdkit.teacher import Teacher
    from kdkit.training.loop import fit

    table = stored["table"]

    class HandLoss(Method):
        """The hand-written loop's loss as a kdkit method (teacher outputs indexed from the same table)."""

        needs_teacher = False

        def forward(self, batch):
            logits = self.student(batch["x"])
            loss = (ALPHA * kd_loss(logits, table[batch["index"]], T)
                    + (1 - ALPHA) * F.cross_entropy(logits, batch["y"]))
            return {"loss": loss, "logits": logits}

    def loop_hand_loss(student) -> float:
        cfg = TrainConfig(epochs=1, optimizer="sgd", lr=LR, schedule="constant", teacher_cache="off", quiet=True,
                          threads=1)
        return fit(HandLoss(student), train, None, cfg, seed=SEED, batch_size=BATCH).epochs[0]["epoch_cpu_seconds"]

    def stubbed(fn):  # epoch statistics and scheduler replaced by no-ops for the duration of one call
        def run(student):
            saved = (tracker_mod.Tracker.add, tracker_mod.Tracker.first_bad, torch.optim.lr_scheduler.LambdaLR.step)
            tracker_mod.Tracker.add = lambda self, step, out, batch: None
            tracker_mod.Tracker.first_bad = lambda self, upto: None
            torch.optim.lr_scheduler.LambdaLR.step = lambda self, *a, **k: None
            try:
                return fn(student)
            finally:
                (tracker_mod.Tracker.add, tracker_mod.Tracker.first_bad,
                 torch.optim.lr_scheduler.LambdaLR.step) = saved
        return run

    def kd_table_teacher(student) -> float:
        real = Teacher.__call__
        Teacher.__call__ = lambda self, batch: table[batch["index"]]
        try:
            return _kdkit(student, train, stored, 1)[0][0]
        finally:
            Teacher.__call__ = real

    variants = {"kdkit loop, hand-written loss": loop_hand_loss,
                "kdkit loop, hand-written loss, statistics and scheduler stubbed": stubbed(loop_hand_loss),
                "kdkit kd method through the Teacher": lambda s: _kdkit(s, train, stored, 1)[0][0],
                "kdkit kd method, Teacher replaced by a table lookup": kd_table_teacher}
    result = {}
    for name, fn in variants.items():
        hand_student, kdkit_student = _student(stored), _student(stored)
        _hand(hand_student, train, table, 1), fn(kdkit_student)  # warm-up
        ratios = []
        for i in range(pairs):
            if i % 2 == 0:
                h = _hand(hand_student, train, table, 1)[0][0]
                k = fn(kdkit_student)
            else:
                k = fn(kdkit_student)
                h = _hand(hand_student, train, table, 1)[0][0]
            ratios.append(k / h)
        q = statistics.quantiles(ratios, n=4)
        result[name] = {"median": statistics.median(ratios), "q1": q[0], "q3": q[2]}
        print(f"{name:<66} {result[name]['median']:.3f} (quartiles {q[0]:.3f}-{q[2]:.3f})", flush=True)
    return result


def run_parts(work: Path, train_subset: int, pairs: int, out: Path) -> None:
    import torch

    torch.set_num_threads(1)
    train, stored = _setup(work, train_subset)
    micro = micro_pieces(train, stored)
    for k, v in micro.items():
        print(f"{k:<28} {v:8.1f} us", flush=True)
    result = {"setup": {"train_samples": train_subset, "batch": BATCH, "threads": 1, "pairs": pairs},
              "micro_us_per_call": micro, "paired_epoch_ratio_vs_hand_cached": paired_ratios(train, stored, pairs)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


def run_variant(name: str, work: Path, train_subset: int, epochs: int) -> None:
    import torch

    torch.set_num_threads(1)
    train, stored = _setup(work, train_subset)
    student = _student(stored)
    if name == "student_only":
        times = _hand(student, train, None, epochs)
    elif name == "hand_cached":
        times = _hand(student, train, stored["table"], epochs)
    else:
        times = _kdkit(student, train, stored, epochs)
    print(json.dumps({"variant": name, "epochs": times}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", choices=ORDER)
    ap.add_argument("--train-subset", type=int, default=20000)
    ap.add_argument("--epochs", type=int, default=4, help="per process; the first is a warm-up")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--work", default=str(HERE / "out" / "cached_loop"))
    ap.add_argument("--out", default=str(HERE / "results" / "cached_loop.json"))
    ap.add_argument("--parts", action="store_true", help="where the time goes (cached_loop_parts.json)")
    ap.add_argument("--pairs", type=int, default=20, help="--parts: alternations per variant")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.parts:
        return run_parts(work, args.train_subset, args.pairs, HERE / "results" / "cached_loop_parts.json")
    if args.variant:
        return run_variant(args.variant, work, args.train_subset, args.epochs)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    base = [sys.executable, __file__, "--work", str(work), "--train-subset", str(args.train_subset),
            "--epochs", str(args.epochs)]
    subprocess.run(base + ["--variant", "student_only", "--epochs", "1"], check=True, env=env,
                   stdout=subprocess.DEVNULL)  # builds the teacher table once, outside the measurement
    runs: Dict[str, List[List[List[float]]]] = {v: [] for v in ORDER}
    for r in range(args.repeats):
        for name in (ORDER if r % 2 == 0 else ORDER[::-1]):
            out = subprocess.run(base + ["--variant", name], check=True, env=env, capture_output=True, text=True)
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1])["epochs"])
        print(f"repeat {r + 1}/{args.repeats} done", flush=True)

    def steady(rep: List[List[float]], col: int) -> float:
        return statistics.median(e[col] for e in rep[1:])

    def ratio(a: str, b: str, col: int) -> Dict[str, float]:
        per = [steady(ra, col) / steady(rb, col) for ra, rb in zip(runs[a], runs[b])]
        return {"median": statistics.median(per), "min": min(per), "max": max(per)}

    pairs = [("kdkit_cached", "hand_cached"), ("kdkit_cached", "student_only"), ("hand_cached", "student_only")]
    result = {"setup": {"dataset": "fashion_mnist", "train_samples": args.train_subset, "student": "mlp 784-256-10",
                        "teacher": "cnn_small (1 epoch)", "batch": BATCH, "temperature": T, "alpha": ALPHA,
                        "epochs_per_process": args.epochs, "repeats": args.repeats, "threads": 1},
              "epoch_seconds_median": {clock: {v: statistics.median(steady(rep, col) for rep in runs[v]) for v in ORDER}
                                       for clock, col in (("cpu", 0), ("wall", 1))},
              "ratios": {clock: {f"{a} / {b}": ratio(a, b, col) for a, b in pairs}
                         for clock, col in (("cpu", 0), ("wall", 1))},
              "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'ratio':<32} {'CPU median (min-max)':>24} {'wall median (min-max)':>24}")
    for a, b in pairs:
        c, w = result["ratios"]["cpu"][f"{a} / {b}"], result["ratios"]["wall"][f"{a} / {b}"]
        print(f"{a + ' / ' + b:<32} {c['median']:>8.3f} ({c['min']:.3f}-{c['max']:.3f}) "
              f"{w['median']:>8.3f} ({w['min']:.3f}-{w['max']:.3f})")
    print("median steady epoch, CPU s: " + ", ".join(f"{v} {s:.3f}" for v, s in
                                                      result["epoch_seconds_median"]["cpu"].items()))


if __name__ == "__main__":
    main()
