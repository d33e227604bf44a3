#!/usr/bin/env python
"""Distilling across tokenizers on the Debian fortunes, compared in bits per byte.

    python benchmarks/cross_tokenizer.py --jobs 2      # 3 seeds (about 6 minutes on two cores, teachers cached)

Setting: the student and the same-tokenizer teacher are those of ``benchmarks/language_model.py`` (its
``brief`` teacher: GPT-2 4 x 192 trained one epoch on 4,800 rows, byte-level BPE of 1,024 tokens; the student:
GPT-2 2 x 96 on the same BPE). The cross-tokenizer teacher has the same architecture and recipe on another
byte-level BPE trained by kdkit on the same training quotations, with 2,048 tokens (another size, other
merges): one epoch over its first 4,800 rows. Every student: the same seeded initialisation, 100 steps of batch
16 over the same 1,600 rows, AdamW 2e-3, clipping at 1, ``alpha: 0.5`` (half the distillation term, half the
data's cross-entropy) for every distilled variant.

Variants: ``data`` (cross-entropy alone), ``same`` (forward KL from the same-tokenizer teacher), ``uld``,
``merged`` and ``hybrid`` (``lm_kd`` with ``method.teacher_tokenizer``, see :mod:`kdkit.lm.cross`). Measured:
held-out bits per byte of the test quotations' UTF-8 text (each model on its own tokenization of the same test
documents), CPU seconds per step, and what the alignment costs: its one pass over the training rows (CPU
seconds, before the first step) and per step (selecting a batch's groups), against the step. Each (variant,
seed) runs in its own process with one thread. Results: ``benchmarks/results/cross_tokenizer.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
import language_model as lm  # noqa: E402

OUT = ROOT / "out" / "cross_tokenizer"
RESULTS = ROOT / "results" / "cross_tokenizer.json"
TEACHER_VOCAB = 2048
VARIANTS = ["data", "same", "uld", "merged", "hybrid"]
ALPHA = 0.5


def teacher_splits():
    from kdkit.lm.data import fortunes_lm

    return fortunes_lm(vocab_size=TEACHER_VOCAB, max_length=lm.SETTING["max_length"],
                       cache_dir=str(lm.OUT / "tokenizers"))


def cross_teacher_path() -> Path:
    return OUT / f"teacher-t4x192-v{TEACHER_VOCAB}-e1-r4800.safetensors"


def prepare() -> Dict[str, Any]:
    """Both teachers (the same-tokenizer one from language_model.py, the other trained here) and their bpb."""
    from kdkit.config import TrainConfig
    from kdkit.lm.evaluate import lm_quality
    from kdkit.methods.build import build_method
    from kdkit.training.checkpoint import load_weights, save_weights
    from kdkit.training.loop import fit

    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    info: Dict[str, Any] = {}
    s_data = lm.splits()
    if not lm.teacher_path("brief").is_file():
        lm.train_teacher("brief", s_data)
    same = lm.load_teacher(s_data.num_classes, "brief")
    info["same_teacher"] = {"params": lm.n_params(same), **lm_quality(same, s_data.test)[0]}
    t_data = teacher_splits()
    path = cross_teacher_path()
    teacher = lm.build("teacher", t_data.num_classes, 0)
    if not path.is_file():
        rows = t_data.train.subset(torch.arange(4800))
        method = build_method("supervised", teacher, None, {}, train_data=rows)
        cfg = TrainConfig(epochs=1, optimizer="adamw", lr=lm.SETTING["teacher_lr"], schedule="cosine",
                          grad_clip=lm.SETTING["grad_clip"], keep="last", progress=False, threads=1)
        c0 = time.process_time()
        fit(method, rows, None, cfg, seed=0, batch_size=lm.SETTING["batch_size"], device="cpu", name="teacher")
        save_weights(teacher, path)
        path.with_suffix(".json").write_text(json.dumps({"train_cpu_s": time.process_time() - c0}))
    load_weights(teacher, path)
    info["cross_teacher"] = {"params": lm.n_params(teacher), "vocab_size": t_data.num_classes,
                             **json.loads(path.with_suffix(".json").read_text()),
                             **lm_quality(teacher.eval(), t_data.test)[0]}
    info["student_vocab_size"] = s_data.num_classes
    return info


def run(variant: str, seed: int, steps: int) -> Dict[str, Any]:
    from kdkit.config import TrainConfig
    from kdkit.lm.evaluate import lm_quality
    from kdkit.methods.build import build_method
    from kdkit.teacher import Teacher
    from kdkit.training.checkpoint import load_weights
    from kdkit.training.loop import fit

    torch.set_num_threads(1)
    data = lm.splits()
    train = data.train.subset(lm.train_rows(data.train, steps))
    student = lm.build("student", data.num_classes, seed)
    options: Dict[str, Any] = {"alpha": ALPHA}
    teacher = None
    if variant == "same":
        teacher = Teacher(lm.load_teacher(data.num_classes, "brief"))
    elif variant != "data":
        t_data = teacher_splits()
        net = lm.build("teacher", t_data.num_classes, 0)
        load_weights(net, cross_teacher_path())
        teacher = Teacher(net.eval())
        options.update(teacher_tokenizer=t_data.train.tokenizer_path, cross_loss=variant)
    method = build_method("supervised" if variant == "data" else "lm_kd", student, teacher,
                          {} if variant == "data" else options, train_data=train)
    cfg = TrainConfig(epochs=1, optimizer="adamw", lr=lm.SETTING["lr"], schedule="constant",
                      grad_clip=lm.SETTING["grad_clip"], keep="last", progress=False, quiet=True, threads=1)
    c0 = time.process_time()
    history = fit(method, train, None, cfg, seed=seed, batch_size=lm.SETTING["batch_size"], device="cpu",
                  name=variant)
    setup_cpu = time.process_time() - c0 - history.epochs[-1]["epoch_cpu_seconds"]
    n_steps = math.ceil(len(train) / lm.SETTING["batch_size"])
    out = {"variant": variant, "seed": seed, "steps": n_steps,
           "step_cpu_s": history.epochs[-1]["epoch_cpu_seconds"] / n_steps, "setup_cpu_s": setup_cpu,
           "teacher_cache": history.teacher_cache}
    cross = getattr(method, "cross", None)
    if cross is not None:
        from kdkit.lm.cross import align, batch_groups
        from kdkit.lm.tokenizer import load_tokenizer

        s_tok, t_tok = load_tokenizer(train.tokenizer_path), load_tokenizer(options["teacher_tokenizer"])
        c1 = time.process_time()
        align(train, s_tok, t_tok, max_length=lm.SETTING["max_length"])
        out["align_cpu_s"] = time.process_time() - c1
        g = torch.Generator().manual_seed(0)
        c2 = time.process_time()
        for _ in range(n_steps):
            batch_groups(cross, torch.randperm(len(train), generator=g)[:lm.SETTING["batch_size"]])
        out["groups_cpu_s_per_step"] = (time.process_time() - c2) / n_steps
        out["alignment_over_step"] = (out["align_cpu_s"] / n_steps + out["groups_cpu_s_per_step"]) / out["step_cpu_s"]
        out["unaligned_rows"] = cross.unaligned
        out["aligned_share"] = cross.aligned_share
    quality, _ = lm_quality(student, data.test)
    out.update({f"test_{k}": v for k, v in quality.items()})
    return out


def summarise(runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    table: Dict[str, Any] = {}
    for v in VARIANTS:
        rs = [r for r in runs if r["variant"] == v]
        if not rs:
            continue
        bpb = [r["test_bits_per_byte"] for r in rs]
        table[v] = {"seeds": len(rs), "bpb_mean": statistics.mean(bpb),
                    "bpb_std": statistics.stdev(bpb) if len(bpb) > 1 else 0.0, "bpb_median": statistics.median(bpb),
                    "perplexity_mean": statistics.mean(r["test_perplexity"] for r in rs),
                    "step_cpu_s_median": statistics.median(r["step_cpu_s"] for r in rs)}
        if "alignment_over_step" in rs[0]:
            table[v]["alignment_over_step_median"] = statistics.median(r["alignment_over_step"] for r in rs)
    comparisons: Dict[str, Any] = {}
    data, same = table.get("data"), table.get("same")
    for v in ("uld", "merged", "hybrid"):
        if data and v in table:
            r = table[v]
            gain = data["bpb_mean"] - r["bpb_mean"]
            spread = max(data["bpb_std"], r["bpb_std"])
            entry = {"bpb_gain_over_data": gain, "largest_std": spread,
                     "beats_by_more_than_spread": gain > spread,
                     "alignment_over_step_median": r.get("alignment_over_step_median"),
                     "alignment_at_most_10_percent": (r.get("alignment_over_step_median") or 1.0) <= 0.10}
            if same:
                same_gain = data["bpb_mean"] - same["bpb_mean"]
                entry.update(same_tokenizer_gain=same_gain, share_of_same_tokenizer_gain=gain / same_gain
                             if same_gain else None, recovers_half=gain >= 0.5 * same_gain)
            comparisons[f"cross_{v}_vs_data"] = entry
    return {"table": table, "comparisons": comparisons}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--child", nargs=3, metavar=("VARIANT", "SEED", "FILE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        variant, seed, out = args.child
        Path(out).write_text(json.dumps(run(variant, int(seed), args.steps)))
        return
    t0 = time.perf_counter()
    info = prepare()
    print(f"same-tokenizer teacher: {info['same_teacher']['bits_per_byte']:.3f} bits/byte; cross-tokenizer teacher "
          f"(V={info['cross_teacher']['vocab_size']}): {info['cross_teacher']['bits_per_byte']:.3f} bits/byte",
          flush=True)
    variants = [v for v in args.variants.split(",") if v]
    seeds = [int(s) for s in args.seeds.split(",")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT.parent / "src")}
    runs: List[Dict[str, Any]] = []

    def one(job) -> Optional[Dict[str, Any]]:
        seed, variant = job
        out = OUT / f"result-{variant}-s{seed}.json"
        out.unlink(missing_ok=True)
        proc = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--child", variant, str(seed),
                               str(out)], env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not out.is_file():
            print(f"{variant} seed {seed} FAILED:\n{proc.stderr[-3000:]}", flush=True)
            return None
        return json.loads(out.read_text())

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for r in pool.map(one, [(s, v) for s in seeds for v in variants]):
            if r is None:
                continue
            runs.append(r)
            extra = f", alignment {r['alignment_over_step']:.1%} of a step" if "alignment_over_step" in r else ""
            print(f"{r['variant']:<7} seed {r['seed']}: {r['test_bits_per_byte']:.4f} bits/byte, ppl "
                  f"{r['test_perplexity']:.1f}, {r['step_cpu_s']:.3f} s/step{extra}", flush=True)
    result = summarise(runs)
    payload = {"setting": {"alpha": ALPHA, "teacher_vocab": TEACHER_VOCAB, **lm.SETTING}, "steps": args.steps,
               "seeds": seeds, "info": info, "runs": runs, **result, "machine": platform.platform(),
               "torch": torch.__version__, "wall_s": time.perf_counter() - t0}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=1))
    print(f"\n{'variant':<8} {'seeds':>5} {'bits/byte (mean ± std)':>24} {'perplexity':>10} {'s/step':>7} "
          f"{'alignment/step':>14}")
    for v, r in result["table"].items():
        al = f"{r['alignment_over_step_median']:.1%}" if "alignment_over_step_median" in r else "-"
        print(f"{v:<8} {r['seeds']:>5} {r['bpb_mean']:>15.4f} ± {r['bpb_std']:.4f} {r['perplexity_mean']:>10.1f} "
              f"{r['step_cpu_s_median']:>7.3f} {al:>14}")
    print(json.dumps(result["comparisons"], indent=1))


if __name__ == "__main__":
    main()
