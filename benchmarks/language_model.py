#!/usr/bin/env python
"""Distilling a causal language model on the Debian fortunes, against TRL's GKDTrainer.

    python benchmarks/language_model.py --jobs 3           # the full run (README "Benchmark: language model")
    python benchmarks/language_model.py --seeds 0 --steps 20 --variants data,jsd,trl_gkd   # a quick look
    python benchmarks/language_model.py --summarise        # recompute the summary and comparisons of the JSON

Setting (cut to fit about 30 minutes of one CPU core):

- corpus: every quotation of ``/usr/share/games/fortunes`` (kdkit's ``fortunes_lm`` dataset: one quotation per
  row, ending in ``<|endoftext|>``, right-padded to 64 tokens; fixed split by quotation), a byte-level BPE
  tokenizer of 1,024 tokens trained on the training quotations;
- teacher: a GPT-2 of about 2 million parameters trained once here (one epoch over 4,800 training rows) and
  cached in ``benchmarks/out/language_model/`` (never committed); student: a GPT-2 about 6x smaller;
- every variant trains the same seeded student for the same number of steps (batch 16, AdamW, constant
  learning rate, gradient clipping at 1, float32) on the same subset of training rows, and its final weights
  are measured on the held-out test rows (perplexity per target token, agreement with the teacher's arg-max);
- variants: ``data`` (method ``supervised``: cross-entropy on the data alone), ``forward_kl`` / ``reverse_kl`` /
  ``jsd`` (``lm_kd`` with the live teacher: its full logits), ``topk8`` / ``topk32`` (forward KL against the
  teacher's top-k stored offline, the remaining mass kept as one bucket), ``on_policy`` (kdkit's ``gkd``:
  JSD(beta=0.5), lambda=0.5) and ``trl_gkd`` (TRL's ``GKDTrainer`` on the same teacher, student, rows and loss:
  JSD(beta=0.5), lambda=0.5, float32 and no gradient checkpointing, which TRL turns on by default).

Each (variant, seed) runs in its own process with one torch thread. Time per step is the CPU time of the
training steps of that process divided by the steps (kdkit: the epochs' CPU seconds from ``metrics.jsonl``;
TRL: from the first to the last step's callback), so time other processes take on the shared machine is not
counted; wall time is recorded as well. Results: ``benchmarks/results/language_model.json`` (rewritten after
every run, so an interrupted run keeps what it measured).
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
OUT = ROOT / "out" / "language_model"
RESULTS = ROOT / "results" / "language_model.json"

SETTING: Dict[str, Any] = {
    "vocab_size": 1024,
    "max_length": 64,
    "teacher": {"layers": 4, "hidden": 192, "heads": 4},
    "student": {"layers": 2, "hidden": 96, "heads": 2},
    "teacher_epochs": 1,
    "teacher_rows": 4800,     # training rows of the teacher (None: all): cut to fit the time budget
    "batch_size": 16,
    "lr": 2e-3,
    "teacher_lr": 1e-3,
    "grad_clip": 1.0,
    "prompt_tokens": 8,       # on-policy prompts: the first 8 tokens of each quotation
    "gen_temperature": 1.0,   # sampling temperature of on-policy generation (kdkit and TRL)
    "beta": 0.5,              # JSD's beta
    "on_policy": 0.5,         # lambda
}

# In the order they run within a seed (the most telling first, so that a run cut short keeps them).
VARIANTS = ["data", "forward_kl", "jsd", "topk32", "on_policy", "trl_gkd", "reverse_kl", "topk8"]
KDKIT_OPTIONS: Dict[str, Dict[str, Any]] = {
    "data": {},  # method supervised: next-token cross-entropy
    "forward_kl": {"divergence": "forward_kl", "alpha": 1.0},
    "reverse_kl": {"divergence": "reverse_kl", "alpha": 1.0},
    "jsd": {"divergence": "jsd", "beta": 0.5, "alpha": 1.0},
    "topk8": {"divergence": "forward_kl", "alpha": 1.0, "teacher_topk": 8},
    "topk32": {"divergence": "forward_kl", "alpha": 1.0, "teacher_topk": 32},
    "on_policy": {"divergence": "jsd", "beta": 0.5, "alpha": 1.0, "on_policy": 0.5},
}


def log(msg: str) -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------- shared pieces

def one_thread() -> None:
    torch.set_num_threads(1)


def splits():
    """The fortunes corpus through kdkit's ``fortunes_lm`` (tokenizer trained once, cached under OUT)."""
    from kdkit.lm.data import fortunes_lm

    return fortunes_lm(vocab_size=SETTING["vocab_size"], max_length=SETTING["max_length"],
                       cache_dir=str(OUT / "tokenizers"))


def teacher_argmax() -> torch.Tensor:
    """The teacher's arg-max token at every test position, computed once by :func:`prepare`."""
    from safetensors.torch import load_file

    return load_file(str(OUT / "teacher_argmax.safetensors"))["teacher_argmax"]


def train_rows(train, steps: int) -> torch.Tensor:
    """The training rows every variant sees: ``steps * batch`` rows drawn once (seed 0), one epoch of them."""
    n = min(len(train), steps * SETTING["batch_size"])
    g = torch.Generator().manual_seed(0)
    return torch.randperm(len(train), generator=g)[:n].sort().values


def build(kind: str, vocab: int, seed: int):
    from kdkit.lm import tiny_gpt2

    torch.manual_seed(seed)
    s = SETTING[kind]
    return tiny_gpt2(vocab, layers=s["layers"], hidden=s["hidden"], heads=s["heads"],
                     max_positions=SETTING["max_length"])


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def teacher_path() -> Path:
    s = SETTING
    t = s["teacher"]
    key = f"t{t['layers']}x{t['hidden']}-v{s['vocab_size']}-L{s['max_length']}-e{s['teacher_epochs']}"
    if s["teacher_rows"]:
        key += f"-r{s['teacher_rows']}"
    return OUT / f"teacher-{key}.safetensors"


def load_teacher(vocab: int):
    from kdkit.training.checkpoint import load_weights

    teacher = build("teacher", vocab, 0)
    load_weights(teacher, teacher_path())
    return teacher.eval()


def prepare() -> Dict[str, Any]:
    """The tokenizer, the data and the teacher (trained once and cached); the teacher's test perplexity."""
    from kdkit.config import TrainConfig
    from kdkit.lm.evaluate import lm_quality
    from kdkit.methods.build import build_method
    from kdkit.training.checkpoint import save_weights
    from kdkit.training.loop import fit

    one_thread()
    OUT.mkdir(parents=True, exist_ok=True)
    data = splits()
    vocab = data.num_classes
    info = {"data": data.info}
    path = teacher_path()
    meta_path = path.with_suffix(".json")
    if not path.is_file():
        log(f"training the teacher ({SETTING['teacher']}, {SETTING['teacher_epochs']} epochs) ...")
        teacher = build("teacher", vocab, 0)
        rows = data.train if not SETTING["teacher_rows"] else data.train.subset(torch.arange(SETTING["teacher_rows"]))
        method = build_method("supervised", teacher, None, {}, train_data=rows)
        cfg = TrainConfig(epochs=SETTING["teacher_epochs"], optimizer="adamw", lr=SETTING["teacher_lr"],
                          schedule="cosine", grad_clip=SETTING["grad_clip"], keep="last", progress=False, threads=1)
        t0, c0 = time.perf_counter(), time.process_time()
        fit(method, rows, None, cfg, seed=0, batch_size=SETTING["batch_size"], device="cpu", name="teacher")
        meta = {"train_wall_s": time.perf_counter() - t0, "train_cpu_s": time.process_time() - c0}
        save_weights(teacher, path)
        meta_path.write_text(json.dumps(meta))
    teacher = load_teacher(vocab)
    quality, argmax = lm_quality(teacher, data.test, teacher=teacher)
    from safetensors.torch import save_file

    save_file({"teacher_argmax": argmax}, str(OUT / "teacher_argmax.safetensors"))  # agreement in every child
    info["teacher"] = {"params": n_params(teacher), **json.loads(meta_path.read_text()), **quality}
    info["student_params"] = n_params(build("student", vocab, 0))
    return info


def storage_info(steps: int) -> Dict[str, Any]:
    """What the students train on, and what storing the teacher's full logits for it would take (fp16)."""
    data = splits()
    rows = data.train.subset(train_rows(data.train, steps))
    tokens = int((rows.y != -100).sum())
    info = {"student_rows": len(rows), "student_target_tokens": tokens,
            "full_logits_fp16_bytes": tokens * data.num_classes * 2}
    return info


# ----------------------------------------------------------------------------- one variant, one process

def run_kdkit(variant: str, seed: int, steps: int) -> Dict[str, Any]:
    from kdkit.config import TrainConfig
    from kdkit.lm.evaluate import lm_quality
    from kdkit.methods.build import build_method
    from kdkit.teacher import Teacher
    from kdkit.training.loop import fit

    data = splits()
    vocab = data.num_classes
    train = data.train.subset(train_rows(data.train, steps))
    teacher = None if variant == "data" else Teacher(load_teacher(vocab))
    student = build("student", vocab, seed)
    options = dict(KDKIT_OPTIONS[variant])
    cache_dir = OUT / "topk" / variant
    if "teacher_topk" in options:
        options["topk_dir"] = str(cache_dir)  # one folder per variant: its size is that store's
    method_name = "supervised" if variant == "data" else "lm_kd"
    if "on_policy" in options:
        method_name = "gkd"
        options.update(prompt_tokens=SETTING["prompt_tokens"],
                       max_new_tokens=SETTING["max_length"] - SETTING["prompt_tokens"],
                       gen_temperature=SETTING["gen_temperature"])
    method = build_method(method_name, student, teacher, options, train_data=train)
    cfg = TrainConfig(epochs=1, optimizer="adamw", lr=SETTING["lr"], schedule="constant",
                      grad_clip=SETTING["grad_clip"], keep="last", progress=False, quiet=True, threads=1,
                      teacher_cache="auto")
    run_dir = OUT / "runs" / f"{variant}-s{seed}"
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    t0 = time.perf_counter()
    history = fit(method, train, None, cfg, run_dir=run_dir, seed=seed, batch_size=SETTING["batch_size"],
                  device="cpu", name=variant)
    wall = time.perf_counter() - t0
    record = history.epochs[-1]
    n_steps = math.ceil(len(train) / SETTING["batch_size"])
    quality, _ = lm_quality(student, data.test, teacher_argmax=teacher_argmax())
    cache_bytes = sum(f.stat().st_size for f in cache_dir.rglob("*") if f.is_file()) if cache_dir.exists() else 0
    return {"variant": variant, "seed": seed, "steps": n_steps, "step_cpu_s": record["epoch_cpu_seconds"] / n_steps,
            "step_wall_s": record["epoch_seconds"] / n_steps, "total_wall_s": wall,
            "teacher_cache": history.teacher_cache, "cache_bytes": cache_bytes,
            "train_loss": record.get("train_loss"), **{f"test_{k}": v for k, v in quality.items()}}


def run_trl(seed: int, steps: int) -> Dict[str, Any]:
    """TRL's GKDTrainer on the same teacher, student, rows and loss (JSD beta=0.5, lambda=0.5)."""
    import datasets
    import transformers
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from kdkit.lm.evaluate import lm_quality

    data = splits()
    vocab = data.num_classes
    pad, eos = data.train.pad_token_id, data.train.eos_token_id
    train = data.train.subset(train_rows(data.train, steps))
    teacher = load_teacher(vocab)
    student = build("student", vocab, seed)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=data.train.tokenizer_path, pad_token="<pad>",
                                               eos_token="<|endoftext|>")
    rows = datasets.Dataset.from_dict({"input_ids": train.x.tolist(), "labels": train.y.tolist()})
    p_max = SETTING["prompt_tokens"]

    def collate(items: List[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
        ids = torch.tensor([r["input_ids"] for r in items])
        y = torch.tensor([r["labels"] for r in items])
        real = ids != pad
        # TRL shifts the labels itself (labels[:, 1:] against logits[:, :-1]); kdkit's y[:, t] is the target of
        # position t, so the same targets are labels = [-100, y[:, :-1]].
        labels = torch.cat([torch.full_like(y[:, :1], -100), y[:, :-1]], dim=1)
        # prompts: the first prompt_tokens real tokens, left-padded for generation
        lengths = real.sum(1).clamp(max=p_max)
        width = int(lengths.max())
        prompts = torch.full((len(ids), width), pad, dtype=torch.long)
        pmask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, n in enumerate(lengths.tolist()):
            prompts[i, width - n:] = ids[i, :n]
            pmask[i, width - n:] = 1
        return {"input_ids": ids, "attention_mask": real.long(), "labels": labels, "prompts": prompts,
                "prompt_attention_mask": pmask}

    student.hf.generation_config.eos_token_id = eos
    student.hf.generation_config.pad_token_id = pad
    args = GKDConfig(output_dir=str(OUT / "trl" / f"s{seed}"), per_device_train_batch_size=SETTING["batch_size"],
                     num_train_epochs=1, learning_rate=SETTING["lr"], lr_scheduler_type="constant", warmup_steps=0,
                     weight_decay=0.0, max_grad_norm=SETTING["grad_clip"], lmbda=SETTING["on_policy"],
                     beta=SETTING["beta"], temperature=SETTING["gen_temperature"],
                     max_new_tokens=SETTING["max_length"] - SETTING["prompt_tokens"], seed=seed, data_seed=seed,
                     logging_steps=50, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
                     dataloader_num_workers=0, max_length=SETTING["max_length"],
                     # TRL's defaults differ from the Trainer's: bf16 autocast and gradient checkpointing are on.
                     # kdkit trains in float32 without checkpointing: the same work on both sides.
                     bf16=False, gradient_checkpointing=False)

    class Clock(transformers.TrainerCallback):
        steps = 0

        def on_step_begin(self, *a, **k):
            if self.steps == 0:
                self.c0, self.t0 = time.process_time(), time.perf_counter()

        def on_step_end(self, *a, **k):
            self.steps += 1
            self.c1, self.t1 = time.process_time(), time.perf_counter()

    clock = Clock()
    trainer = GKDTrainer(model=student.hf, teacher_model=teacher.hf, args=args, train_dataset=rows,
                         processing_class=tok, data_collator=collate, callbacks=[clock])
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    losses = [h["train_loss"] for h in trainer.state.log_history if "train_loss" in h]
    # Measured on a fresh copy: the trainer leaves accelerate's and TRL's wrappers on the model's forward.
    trained = build("student", vocab, seed)
    trained.hf.load_state_dict(student.hf.state_dict())
    quality, _ = lm_quality(trained.eval(), data.test, teacher_argmax=teacher_argmax())
    return {"variant": "trl_gkd", "seed": seed, "steps": clock.steps,
            # c0 is taken at the start of the first step and c1 at the end of the last: all the steps.
            "step_cpu_s": (clock.c1 - clock.c0) / clock.steps, "step_wall_s": (clock.t1 - clock.t0) / clock.steps,
            "step_divisor": clock.steps,
            "total_wall_s": wall, "teacher_cache": "none (TRL runs the teacher every step)", "cache_bytes": 0,
            "train_loss": losses[-1] if losses else None, **{f"test_{k}": v for k, v in quality.items()}}


def child(variant: str, seed: int, steps: int, out: Path) -> None:
    one_thread()
    result = run_trl(seed, steps) if variant == "trl_gkd" else run_kdkit(variant, seed, steps)
    out.write_text(json.dumps(result))


# ----------------------------------------------------------------------------- the whole run

def summarise(runs: List[Dict[str, Any]], variants: List[str]) -> Dict[str, Dict[str, Any]]:
    table: Dict[str, Dict[str, Any]] = {}
    for v in variants:
        rs = [r for r in runs if r["variant"] == v]
        if not rs:
            continue
        ppl = [r["test_perplexity"] for r in rs]
        cpu = [r["step_cpu_s"] for r in rs if r.get("step_cpu_s")]
        table[v] = {"seeds": len(rs), "perplexity_mean": statistics.mean(ppl),
                    "perplexity_std": statistics.stdev(ppl) if len(ppl) > 1 else 0.0,
                    "agreement_mean": statistics.mean(r.get("test_agreement", float("nan")) for r in rs),
                    "step_cpu_s_median": statistics.median(cpu) if cpu else None,
                    "cache_bytes": max(r["cache_bytes"] for r in rs)}
    return table


def store_meta() -> Dict[str, Dict[str, Any]]:
    """The offline top-k stores' own records (tokens, bytes, mean tail mass and truncation KL), per variant."""
    out = {}
    for meta in sorted((OUT / "topk").glob("*/*/meta.json")):
        m = json.loads(meta.read_text())
        out[meta.parent.parent.name] = {k: m.get(k) for k in ("k", "rows", "tokens", "vocab_size", "bytes",
                                                              "tail_mass_mean", "truncation_kl_mean")}
    return out


def comparisons(runs: List[Dict[str, Any]], table: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """The three questions of the README, answered from the runs."""
    out: Dict[str, Any] = {}
    data = table.get("data")
    if data:
        spread = data["perplexity_std"]
        out["vs_data"] = {v: {"perplexity_gain": data["perplexity_mean"] - r["perplexity_mean"],
                              "largest_std": max(spread, r["perplexity_std"]),
                              "beats_by_more_than_spread": data["perplexity_mean"] - r["perplexity_mean"]
                              > max(spread, r["perplexity_std"])}
                          for v, r in table.items() if v != "data"}
    if "topk32" in table and "forward_kl" in table:
        full, top = table["forward_kl"]["perplexity_mean"], table["topk32"]["perplexity_mean"]
        out["topk32_vs_full_percent"] = 100.0 * (top - full) / full
    by_seed = {}
    for r in runs:
        by_seed.setdefault(r["seed"], {})[r["variant"]] = r
    ratios = [s["on_policy"]["step_cpu_s"] / s["trl_gkd"]["step_cpu_s"] for s in by_seed.values()
              if "on_policy" in s and "trl_gkd" in s and s["trl_gkd"].get("step_cpu_s")]
    if ratios:
        out["kdkit_over_trl_step_cpu"] = {"per_seed": ratios, "median": statistics.median(ratios)}
    return out


def resummarise(path: Path) -> None:
    """Recompute the summary of a finished (or interrupted) run from its JSON, adding the stores' records."""
    payload = json.loads(path.read_text())
    for r in payload["runs"]:
        if r["variant"] == "trl_gkd" and "step_divisor" not in r:
            # Runs measured before the fix divided the time of all the steps by (steps - 1): rescale them.
            r["step_cpu_s"] *= (r["steps"] - 1) / r["steps"]
            r["step_wall_s"] *= (r["steps"] - 1) / r["steps"]
            r["step_divisor"] = r["steps"]
    payload["summary"] = summarise(payload["runs"], payload["variants"])
    payload["topk_stores"] = store_meta()
    payload["comparisons"] = comparisons(payload["runs"], payload["summary"])
    path.write_text(json.dumps(payload, indent=1))
    print_table(payload["info"], payload["summary"])
    log(json.dumps(payload["comparisons"], indent=1))


def print_table(info: Dict[str, Any], table: Dict[str, Dict[str, Any]]) -> None:
    t = info["teacher"]
    log(f"\nteacher: {t['params']:,} parameters, test perplexity {t['perplexity']:.2f}; "
        f"student: {info['student_params']:,} parameters")
    log(f"{'variant':<12} {'seeds':>5} {'test ppl (mean ± std)':>22} {'agreement':>9} {'s/step (CPU)':>12} "
        f"{'cache':>10}")
    for v, r in table.items():
        cache = f"{r['cache_bytes'] / 2**20:.1f} MiB" if r["cache_bytes"] else "-"
        step = f"{r['step_cpu_s_median']:.3f}" if r["step_cpu_s_median"] else "-"
        log(f"{v:<12} {r['seeds']:>5} {r['perplexity_mean']:>13.2f} ± {r['perplexity_std']:<6.2f} "
            f"{r['agreement_mean']:>9.3f} {step:>12} {cache:>10}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=100, help="optimiser steps per student run")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--jobs", type=int, default=1, help="variant processes run at once (each with one thread)")
    ap.add_argument("--summarise", action="store_true", help="recompute the summary of --out and print it")
    ap.add_argument("--prepare-only", action="store_true", help="train (or load) the teacher and stop")
    ap.add_argument("--smoke", action="store_true", help="a teacher trained on 256 rows: checks the script only")
    ap.add_argument("--child", nargs=3, metavar=("VARIANT", "SEED", "FILE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.smoke:
        global OUT
        SETTING["teacher_rows"] = 256
        OUT = OUT.with_name("language_model_smoke")
    if args.summarise:
        resummarise(Path(args.out))
        return
    if args.child:
        variant, seed, out = args.child
        child(variant, int(seed), args.steps, Path(out))
        return
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; expected some of {VARIANTS}")
    seeds = [int(s) for s in args.seeds.split(",")]
    t_start = time.perf_counter()
    info = prepare()
    log(f"teacher ready: {info['teacher']['params']:,} parameters, test perplexity "
        f"{info['teacher']['perplexity']:.2f} ({time.perf_counter() - t_start:.0f} s)")
    if args.prepare_only:
        return
    info["storage"] = storage_info(args.steps)
    runs: List[Dict[str, Any]] = []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT.parent / "src")}

    def one(job) -> Optional[Dict[str, Any]]:
        seed, variant = job
        out = OUT / f"result-{variant}-s{seed}.json"
        out.unlink(missing_ok=True)
        c0 = time.perf_counter()
        command = [sys.executable, __file__, "--steps", str(args.steps), "--child", variant, str(seed), str(out)]
        proc = subprocess.run(command + (["--smoke"] if args.smoke else []), env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not out.is_file():
            log(f"{variant} seed {seed} FAILED:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
            return None
        r = json.loads(out.read_text())
        r["process_wall_s"] = time.perf_counter() - c0
        return r

    jobs = [(seed, variant) for seed in seeds for variant in variants]
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for r in pool.map(one, jobs):
            if r is None:
                continue
            runs.append(r)
            log(f"{r['variant']:<12} seed {r['seed']}: test ppl {r['test_perplexity']:.2f}, "
                f"{r['step_cpu_s']:.3f} s/step CPU, {r['process_wall_s']:.0f} s")
            payload = {"setting": SETTING, "steps": args.steps, "seeds": seeds, "variants": variants, "info": info,
                       "jobs": args.jobs, "runs": runs, "summary": summarise(runs, variants),
                       "machine": platform.platform(), "python": platform.python_version(),
                       "torch": torch.__version__, "wall_s": time.perf_counter() - t_start}
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(payload, indent=1))
    print_table(info, summarise(runs, variants))
    log(f"total wall time {time.perf_counter() - t_start:.0f} s; results in {args.out}")


if __name__ == "__main__":
    main()
