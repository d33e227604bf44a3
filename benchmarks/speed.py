"""Speed benchmark (issue 4): how close kdkit's distillation gets to the cost of training the student alone.

    python benchmarks/speed.py                       # ~15 min on 2 shared cores
    python benchmarks/speed.py --quick               # smoke run, a minute or two

Writes ``benchmarks/results/speed.json`` and prints a table. Five measurements, side by side in one run, each a
median over repeats that are *interleaved* (repeat r runs every variant once before repeat r+1 starts), so that
load from other processes on the machine hits all variants alike:

1. cached distillation epoch / student-only (supervised) epoch, same student, same data;
2. live-teacher distillation epoch / cached, for teacher/student parameter ratios ~1x, 10x, 50x;
3. kdkit's loop / a minimal hand-written PyTorch KD loop doing the same work (live teacher, and cached);
4. kdkit / torchdistill on the same job (same modules, data in memory, optimiser, batch, epochs, KD T=4):
   time per epoch and final test accuracy; torchdistill runs in its own virtual environment
   (``--peer-python``, script ``peer_torchdistill.py``);
5. bytes of the teacher cache, dense fp32 / fp16 / top-k, for 60,000 x 10 (real teacher logits on
   Fashion-MNIST) and a synthetic 100,000 x 1,000 problem, with the top-k reconstruction KL.

Data: Fashion-MNIST (``/usr/share/datasets/fashion-mnist``), a training subset (``--train-subset``) and few
epochs, so the whole run stays near 15 minutes on 2 shared cores. Models are MLPs (student 784-128-10). All
timings use one intra-op thread (``--threads``) to limit interference with other processes. Cached epochs are
the epochs after the first: kdkit fills its cache from the first epoch's live teacher outputs.
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
from typing import Any, Dict, List

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import kdkit  # noqa: E402
import kdkit.api  # noqa: E402
import kdkit.training.loop as engine  # noqa: E402
from kdkit.config import TrainConfig  # noqa: E402
from kdkit.data import ArrayData  # noqa: E402
from kdkit.losses import kd_loss, masked_cross_entropy  # noqa: E402
from kdkit.methods import METHODS  # noqa: E402
from kdkit.teacher import Teacher  # noqa: E402
from kdkit.teacher.cache import CacheSpec, TeacherCache  # noqa: E402
from speed_common import accuracy, load_state, mlp, n_params, save_state  # noqa: E402

STUDENT = [128]
TEACHERS = {"1x": [128], "10x": [1024, 256], "50x": [2048, 1536]}
T, ALPHA, LR, SEED = 4.0, 0.9, 0.05, 0


def median(xs: List[float]) -> float:
    return float(statistics.median(xs))


# ----------------------------------------------------------------------------- kdkit runs

def kdkit_epochs(method, data, epochs: int, batch: int, **train) -> List[List[float]]:
    """[[wall seconds, CPU seconds] per epoch] of one kdkit run."""
    cfg = TrainConfig(epochs=epochs, optimizer="sgd", lr=LR, schedule="constant", progress=False, **train)
    hist = engine.fit(method, data, None, cfg, seed=SEED, batch_size=batch)
    return [[e["epoch_seconds"], e["epoch_cpu_seconds"]] for e in hist.epochs]


def kd_method(student, teacher):
    return METHODS.get("kd")(student, Teacher(teacher), temperature=T, alpha=ALPHA)


# ----------------------------------------------------------------------------- the hand-written loop

def hand_kd_epochs(student, teacher, data: ArrayData, epochs: int, batch: int, table=None,
                   ce=F.cross_entropy) -> List[List[float]]:
    """The minimal KD loop: shuffle, slice, student forward, teacher forward (or table lookup), loss, step."""
    opt = torch.optim.SGD(student.parameters(), lr=LR, momentum=0.9, nesterov=True)
    teacher.eval()
    x_all, y_all = data.x, data.y
    g = torch.Generator().manual_seed(SEED)
    times = []
    for _ in range(epochs):
        student.train()
        t0, c0 = time.perf_counter(), time.process_time()
        perm = torch.randperm(len(x_all), generator=g)
        for i in range(0, len(perm), batch):
            idx = perm[i:i + batch]
            x, y = x_all[idx], y_all[idx]
            logits = student(x)
            if table is None:
                with torch.inference_mode():
                    t_logits = teacher(x)
                t_logits = t_logits.clone()
            else:
                t_logits = table[idx]
            loss = ALPHA * kd_loss(logits, t_logits, T) + (1 - ALPHA) * ce(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        times.append([time.perf_counter() - t0, time.process_time() - c0])
    return times


# ----------------------------------------------------------------------------- profile

def profile_epoch(make_method, data, batch: int, train: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Top operators (self CPU time) of one kdkit epoch, for the README's "where the time goes"."""
    from torch.profiler import ProfilerActivity, profile

    method = make_method()
    cfg = TrainConfig(epochs=1, optimizer="sgd", lr=LR, schedule="constant", progress=False, **train)
    if train.get("teacher_cache") == "disk":
        engine.fit(make_method(), data, None, cfg, seed=SEED, batch_size=batch)  # fills the disk cache
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        hist = engine.fit(method, data, None, cfg, seed=SEED, batch_size=batch)
    print(f"  profiled epoch: teacher cache {hist.teacher_cache}", flush=True)
    rows = []
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:10]:
        rows.append({"op": e.key, "self_cpu_ms": round(e.self_cpu_time_total / 1000, 2),
                     "share": round(e.self_cpu_time_total / max(total, 1), 3), "calls": e.count})
    return rows


# ----------------------------------------------------------------------------- per-step components

def step_components(teacher, train: ArrayData, batch: int, cache_dir: str) -> Dict[str, float]:
    """CPU microseconds of the pieces of one training step (best of 5 rounds of 200 calls), to say where the
    time of a cached distillation step goes beyond the student's own forward/backward/step."""
    from kdkit.teacher.cache import build_cache
    from kdkit.training.loop import _Tracker

    def cpu_us(fn, n=200):
        for _ in range(20):
            fn()
        best = float("inf")
        for _ in range(5):
            c0 = time.process_time()
            for _ in range(n):
                fn()
            best = min(best, (time.process_time() - c0) / n * 1e6)
        return best

    s = mlp(STUDENT)
    opt = torch.optim.SGD(s.parameters(), lr=LR, momentum=0.9, nesterov=True)
    t = Teacher(teacher)
    t.use_cache(build_cache(teacher, train, CacheSpec(), cache_dir=Path(cache_dir), log=lambda m: None))
    method = METHODS.get("kd")(s, t, temperature=T, alpha=ALPHA)
    idx = torch.randperm(len(train))[:batch]
    b = {"x": train.x[idx], "y": train.y[idx], "index": idx}
    table = t.cache._t["values"]
    logits = s(b["x"]).detach()

    def grad_of(loss_fn):
        def f():
            z = logits.clone().requires_grad_()
            loss_fn(z).backward()
        return f

    def student_step():
        out = F.cross_entropy(s(b["x"]), b["y"])
        opt.zero_grad(set_to_none=True)
        out.backward()
        opt.step()

    def kdkit_method_step():
        out = method(b)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()

    tracker = _Tracker(torch.device("cpu"), 10**6)
    out = method(b)
    step = iter(range(10**6))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0)
    return {
        "student_fwd_bwd_step_plain_ce": cpu_us(student_step),
        "kdkit_kd_method_fwd_bwd_step_cached": cpu_us(kdkit_method_step),
        "teacher_cached_call": cpu_us(lambda: t(b)),
        "plain_table_lookup": cpu_us(lambda: table[idx]),
        "kd_loss_fwd_bwd": cpu_us(grad_of(lambda z: kd_loss(z, table[idx], T))),
        "masked_ce_fwd_bwd": cpu_us(grad_of(lambda z: masked_cross_entropy(z, b["y"]))),
        "plain_ce_fwd_bwd": cpu_us(grad_of(lambda z: F.cross_entropy(z, b["y"]))),
        "engine_epoch_stats_per_step": cpu_us(lambda: tracker.add(next(step), out, b)),
        "lr_scheduler_step": cpu_us(lambda: (opt.step(), sched.step()) and None) - cpu_us(opt.step),
    }


# ----------------------------------------------------------------------------- (5) cache memory

def cache_memory(teacher, x60k: torch.Tensor) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    with torch.inference_mode():
        logits = torch.cat([teacher(x60k[i:i + 4096]) for i in range(0, len(x60k), 4096)])
    g = torch.Generator().manual_seed(0)
    n, c = 100_000, 1000
    labels = torch.randint(0, c, (n,), generator=g)
    # Synthetic "trained teacher" logits: N(0, 1) noise plus a margin of 8 on a random true class and 4 on a
    # random runner-up (real many-class teachers put most mass on a few classes; uniform noise alone would not).
    synth = torch.randn(n, c, generator=g)
    synth[torch.arange(n), labels] += 8.0
    synth[torch.arange(n), torch.randint(0, c, (n,), generator=g)] += 4.0
    for name, z, ks in (("fashion_mnist_60000x10", logits, [1, 3]), ("synthetic_100000x1000", synth, [10, 50])):
        rows = {}
        forms = [("dense_fp32", CacheSpec("float32")), ("dense_fp16", CacheSpec("float16"))]
        forms += [(f"top{k}_fp16", CacheSpec("float16", topk=k)) for k in ks]
        for label, spec in forms:
            cache = TeacherCache.allocate(len(z), tuple(z.shape[1:]), spec, {})
            for i in range(0, len(z), 8192):
                idx = torch.arange(i, min(i + 8192, len(z)))
                cache.put(idx, z[idx])
                cache.mark_done(idx)
            cache.finish()
            row = {"bytes": cache.nbytes, "MiB": round(cache.nbytes / 2**20, 2),
                   "bytes_per_sample": cache.nbytes / len(z)}
            row.update({k: v for k, v in cache.meta.items() if k.startswith(("topk_kl", "fp16"))})
            rows[label] = row
            del cache
        out[name] = rows
    return out


# ----------------------------------------------------------------------------- main

def main() -> None:  # noqa: C901  (one long benchmark script: setup, timed variants, report)
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--train-subset", type=int, default=10000)
    ap.add_argument("--epochs", type=int, default=3, help="epochs per timing run (the first fills the cache)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--peer-epochs", type=int, default=5)
    ap.add_argument("--peer-repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--peer-python", default="/work/venvs/torchdistill/bin/python")
    ap.add_argument("--out", default=str(HERE / "results" / "speed.json"))
    ap.add_argument("--work", default=str(HERE / "out" / "speed"))
    args = ap.parse_args()
    if args.quick:
        args.train_subset, args.repeats, args.peer_repeats, args.peer_epochs = 2000, 2, 1, 2
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    B, E = args.batch_size, args.epochs

    splits = kdkit.api.build_data(
        kdkit.load_config({"data": {"name": "fashion_mnist", "train_subset": args.train_subset}}).data)
    train, test = splits.train, splits.test
    result: Dict[str, Any] = {
        "setup": {"dataset": "fashion_mnist", "train_samples": len(train), "test_samples": len(test),
                  "batch_size": B, "epochs_per_run": E, "repeats": args.repeats, "threads": args.threads,
                  "student": f"mlp {STUDENT}", "torch": torch.__version__,
                  "note": ("ratios: per repeat, median epoch time of A / of B (variants back to back, ABBA order), "
                           "then the median over repeats; CPU time = process_time of the (1-thread) process, "
                           "robust to the load of other processes; kdkit cached epochs exclude the first "
                           "(cache-filling) epoch")}}

    # Teacher for (1), (3), (4): the 10x MLP, trained once and kept in benchmarks/out/.
    teacher_file = work / "teacher.npz"
    teacher = mlp(TEACHERS["10x"])
    if teacher_file.is_file():
        load_state(teacher, teacher_file)
    else:
        torch.manual_seed(SEED)
        kdkit.train(teacher, train, None, epochs=5, optimizer="sgd", lr=LR, schedule="cosine", progress=False,
                    batch_size=B, seed=SEED)
        save_state(teacher, teacher_file)
    teacher.eval()
    result["setup"]["teacher_test_accuracy"] = accuracy(teacher, test.x, test.y)
    teachers = {k: (teacher if k == "10x" else mlp(h)) for k, h in TEACHERS.items()}
    s_params = n_params(mlp(STUDENT))
    result["setup"]["params"] = {"student": s_params, **{k: n_params(m) for k, m in teachers.items()}}
    torch.manual_seed(SEED + 1)
    init = mlp(STUDENT)

    def student():
        return load_state(mlp(STUDENT), work / "student_init.npz")

    save_state(init, work / "student_init.npz")
    np.savez(work / "data.npz", x_train=train.x.numpy(), y_train=train.y.numpy(), x_test=test.x.numpy(),
             y_test=test.y.numpy())
    (work / "job.json").write_text(json.dumps({"teacher_hidden": TEACHERS["10x"], "student_hidden": STUDENT,
                                               "temperature": T, "alpha": ALPHA, "seed": SEED}))
    with torch.inference_mode():
        table = torch.cat([teacher(train.x[i:i + 2048]) for i in range(0, len(train), 2048)]).clone()

    # ------------------------------------------------------------------ (1)-(3), interleaved
    # runs[variant] = one list per repeat of [wall, cpu] per epoch. The variants of one repeat run back to back,
    # in reversed order every other repeat (ABBA), and ratios are taken per repeat, then the median over repeats.
    runs: Dict[str, List[List[List[float]]]] = {}
    cache_dir = str(work / "cache")
    variants = {
        "student_only": lambda: kdkit_epochs(METHODS.get("supervised")(student()), train, E, B),
        "hand_live_10x": lambda: hand_kd_epochs(student(), teacher, train, E, B),
        "hand_cached_10x": lambda: hand_kd_epochs(student(), teacher, train, E, B, table=table),
        # the same hand loop with kdkit's label-masked cross-entropy (kd method's CE; unlabelled samples allowed)
        "hand_cached_10x_masked_ce": lambda: hand_kd_epochs(student(), teacher, train, E, B, table=table,
                                                            ce=masked_cross_entropy),
        "cached_10x_bf16": lambda: kdkit_epochs(kd_method(student(), teacher), train, E, B, teacher_cache="memory",
                                                precision="bf16"),
    }
    for k, tm in teachers.items():
        variants[f"cached_{k}"] = (lambda tm=tm: kdkit_epochs(kd_method(student(), tm), train, E, B,
                                                              teacher_cache="memory", cache_dir=cache_dir))
        variants[f"live_{k}"] = (lambda tm=tm: kdkit_epochs(kd_method(student(), tm), train, E, B,
                                                            teacher_cache="off"))
    order = ["student_only", "cached_10x", "hand_cached_10x", "hand_cached_10x_masked_ce", "live_10x", "hand_live_10x",
             "cached_1x", "live_1x", "cached_50x", "live_50x", "cached_10x_bf16"]
    for r in range(args.repeats):
        print(f"repeat {r + 1}/{args.repeats} ({time.time() - t_start:.0f}s)", flush=True)
        for name in (order if r % 2 == 0 else order[::-1]):
            runs.setdefault(name, []).append(variants[name]())

    def steady(name: str, rep: List[List[float]], col: int) -> List[float]:
        # kdkit cached runs: drop the first epoch, which ran the teacher live to fill the cache
        skip = 1 if name.startswith("cached") else 0
        return [e[col] for e in rep[skip:]]

    def ratio(a: str, b: str, col: int = 1) -> float:
        return median([median(steady(a, ra, col)) / median(steady(b, rb, col)) for ra, rb in zip(runs[a], runs[b])])

    result["epoch_seconds_median"] = {
        clock: {name: median([v for rep in reps for v in steady(name, rep, col)]) for name, reps in runs.items()}
        for clock, col in (("cpu", 1), ("wall", 0))}
    result["fill_epoch_cpu_seconds_median"] = {k: median([rep[0][1] for rep in runs[f"cached_{k}"]]) for k in TEACHERS}
    result["runs"] = runs
    ratios: Dict[str, Any] = {}
    for clock, col in (("cpu", 1), ("wall", 0)):
        ratios[clock] = {
            "1_cached_distill_over_student_only": ratio("cached_10x", "student_only", col),
            "2_live_over_cached": {k: ratio(f"live_{k}", f"cached_{k}", col) for k in TEACHERS},
            "3_kdkit_over_hand_loop_live": ratio("live_10x", "hand_live_10x", col),
            "3_kdkit_over_hand_loop_cached": ratio("cached_10x", "hand_cached_10x", col),
            "hand_cached_over_student_only": ratio("hand_cached_10x", "student_only", col),
            "kdkit_over_hand_loop_with_masked_ce_cached": ratio("cached_10x", "hand_cached_10x_masked_ce", col),
            "hand_masked_ce_over_hand_plain_ce_cached": ratio("hand_cached_10x_masked_ce", "hand_cached_10x", col),
            "bf16_over_fp32_cached": ratio("cached_10x_bf16", "cached_10x", col),
        }
    result["ratios"] = ratios
    c = ratios["cpu"]
    result["expectations_cpu_time"] = {
        "1_cached_distill_over_student_only<=1.10": c["1_cached_distill_over_student_only"] <= 1.10,
        "3_kdkit_over_hand_loop<=1.05 (live)": c["3_kdkit_over_hand_loop_live"] <= 1.05,
        "3_kdkit_over_hand_loop<=1.05 (cached)": c["3_kdkit_over_hand_loop_cached"] <= 1.05,
    }
    print(json.dumps(ratios, indent=1), flush=True)

    # ------------------------------------------------------------------ where the time goes
    print(f"profiles ({time.time() - t_start:.0f}s)", flush=True)
    result["profile_top_ops"] = {
        "student_only": profile_epoch(lambda: METHODS.get("supervised")(student()), train, B, {}),
        "kdkit_cached_10x": profile_epoch(lambda: kd_method(student(), teacher), train, B,
                                          {"teacher_cache": "disk", "cache_dir": str(work / "profile_cache")}),
    }

    result["step_components_cpu_us"] = step_components(teacher, train, B, str(work / "profile_cache"))
    print(json.dumps(result["step_components_cpu_us"], indent=1), flush=True)

    # ------------------------------------------------------------------ (4) kdkit vs torchdistill
    # Both tools run as scripts in the same virtual environment (the one holding torchdistill, so the same torch
    # build), one after the other, order alternating per repeat; repeat r uses data-order seed r in both tools
    # (same teacher, same initial student), so the accuracies are means over seeds.
    print(f"peer comparison ({time.time() - t_start:.0f}s)", flush=True)
    peer: Dict[str, Any] = {"kdkit_live": [], "kdkit_cached": [], "torchdistill_live": [], "errors": []}
    env = dict(os.environ, PYTHONPATH=str(HERE.parent / "src"))
    common = ["--work", str(work), "--epochs", str(args.peer_epochs), "--batch-size", str(B), "--lr", str(LR),
              "--threads", str(args.threads)]
    jobs = {"kdkit_live": ["peer_kdkit.py", "--teacher-cache", "off"],
            "kdkit_cached": ["peer_kdkit.py", "--teacher-cache", "memory"],
            "torchdistill_live": ["peer_torchdistill.py"]}
    if Path(args.peer_python).is_file():
        for r in range(args.peer_repeats):
            for name in (list(jobs) if r % 2 == 0 else list(jobs)[::-1]):
                out = work / f"peer_{name}_{r}.json"
                script, *extra = jobs[name]
                proc = subprocess.run([args.peer_python, str(HERE / script), *common, "--out", str(out),
                                       "--seed", str(r), *extra],
                                      capture_output=True, text=True, env=env)
                if proc.returncode == 0:
                    peer[name].append(json.loads(out.read_text()))
                else:
                    peer["errors"].append(f"{name}: {proc.stderr[-1500:]}")
    summary: Dict[str, Any] = {}
    for key in jobs:
        reps = peer[key]
        if not reps:
            continue
        skip = 1 if key == "kdkit_cached" else 0
        summary[key] = {
            "epoch_cpu_seconds_median": median([s for run in reps for s in run["epoch_cpu_seconds"][skip:]]),
            "epoch_seconds_median": median([s for run in reps for s in run["epoch_seconds"][skip:]]),
            "test_accuracy_mean": float(np.mean([run["test_accuracy"] for run in reps])),
            "test_accuracy_std": float(np.std([run["test_accuracy"] for run in reps])),
            "test_accuracy_runs": [run["test_accuracy"] for run in reps],
            "tool": reps[0]["tool"], "torch": reps[0]["torch"],
        }
    peer["summary"] = summary
    if len(summary) == 3:
        td = summary["torchdistill_live"]
        pr = {}
        for key in ("kdkit_live", "kdkit_cached"):
            pr[f"{key}_over_torchdistill_cpu"] = median([
                median(a["epoch_cpu_seconds"][1 if key == "kdkit_cached" else 0:]) / median(b["epoch_cpu_seconds"])
                for a, b in zip(peer[key], peer["torchdistill_live"])])
            pr[f"{key}_over_torchdistill_wall"] = summary[key]["epoch_seconds_median"] / td["epoch_seconds_median"]
            pr[f"accuracy_points_{key}_minus_torchdistill"] = 100 * (summary[key]["test_accuracy_mean"]
                                                                    - td["test_accuracy_mean"])
        peer["ratios"] = pr
    peer["torchdistill_cache"] = "none: torchdistill 1.x has no teacher-output cache (checked its source), so only live"
    result["peer"] = peer
    print(json.dumps(peer.get("ratios", summary), indent=1), flush=True)

    # ------------------------------------------------------------------ (5) cache memory
    print(f"cache memory ({time.time() - t_start:.0f}s)", flush=True)
    full = kdkit.api.build_data(kdkit.load_config({"data": {"name": "fashion_mnist"}}).data)
    x60k = torch.cat([full.train.x, full.val.x])[:60000]
    result["cache_memory"] = cache_memory(teacher, x60k)
    result["wall_seconds"] = time.time() - t_start
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print_table(result)
    print(f"wrote {args.out} ({result['wall_seconds']:.0f}s)")


def print_table(r: Dict[str, Any]) -> None:
    med, ra = r["epoch_seconds_median"], r["ratios"]
    print("\nepoch seconds (median)        cpu      wall")
    for k in med["cpu"]:
        print(f"  {k:28s} {med['cpu'][k]:8.3f} {med['wall'][k]:8.3f}")
    print("\nratios (cpu | wall):")
    for k, v in ra["cpu"].items():
        w = ra["wall"][k]
        if isinstance(v, dict):
            print(f"  {k:40s} " + ", ".join(f"{t}: {v[t]:.2f} | {w[t]:.2f}" for t in v))
        else:
            print(f"  {k:40s} {v:.3f} | {w:.3f}")
    for name, rows in r["cache_memory"].items():
        print(f"\ncache memory {name}:")
        for form, row in rows.items():
            print(f"  {form:12s} {row['MiB']:10.2f} MiB  " + " ".join(f"{k}={v:.2e}" for k, v in row.items()
                                                                if k.startswith(("topk_kl_mean", "fp16"))))


if __name__ == "__main__":
    main()
