#!/usr/bin/env python
"""Distilling a causal language model on the Debian fortunes: live teachers, teacher stores, TRL's GKDTrainer.

    python benchmarks/language_model.py --jobs 2           # the full run (README "Benchmark: language model")
    python benchmarks/language_model.py --seeds 0 --steps 20 --teachers brief --variants data,sampled16
    python benchmarks/language_model.py --summarise        # recompute the summary and comparisons of the JSON

Setting (about an hour on two CPU cores, the converged teacher's training included):

- corpus: every quotation of ``/usr/share/games/fortunes`` (kdkit's ``fortunes_lm`` dataset: one quotation per
  row, ending in ``<|endoftext|>``, right-padded to 64 tokens; fixed split by quotation), a byte-level BPE
  tokenizer of 1,024 tokens trained on the training quotations;
- two teachers, GPT-2s of about 2 million parameters of one architecture, trained once here and cached in
  ``benchmarks/out/language_model/`` (never committed): ``brief`` (one epoch over 4,800 training rows: a
  high-entropy teacher) and ``converged`` (five epochs over all 22,125 training rows, cosine schedule; its
  validation perplexity per epoch is in the JSON); student: a GPT-2 about 6x smaller;
- every variant trains the same seeded student for the same number of steps (batch 16, AdamW, constant
  learning rate, gradient clipping at 1, float32) on the same subset of training rows, and its final weights
  are measured on the held-out test rows (perplexity per target token, agreement with the teacher's arg-max);
- variants: ``data`` (method ``supervised``: cross-entropy on the data alone), ``forward_kl`` / ``reverse_kl`` /
  ``jsd`` (``lm_kd`` with the live teacher: its full logits), ``sampled16`` (forward KL against a sampled
  teacher store: 16 draws per position, kept as distinct tokens and counts), ``topk_same_bytes`` (a top-k store
  with as many bytes per position as ``sampled16``), ``topk8`` / ``topk32`` (top-k stores, the remaining mass
  kept as one bucket), ``on_policy`` (kdkit's ``gkd``: JSD(beta=0.5), lambda=0.5) and ``trl_gkd`` (TRL's
  ``GKDTrainer`` on the same teacher, student, rows and loss: JSD(beta=0.5), lambda=0.5, float32 and no
  gradient checkpointing, which TRL turns on by default). The converged teacher runs ``data``, ``forward_kl``,
  ``sampled16`` and ``topk_same_bytes``; the brief one all of them;
- the stores are written once per teacher by this process, before any student runs (the teacher's job), and
  every student run reads them through ``method.store`` without running the teacher;
- ``sampled16`` draws systematically (kdkit's default), ``sampled16_iid`` independently with replacement (the
  paper's Random-Sampling KD); both keep at most 16 entries per position;
- step time: five pairs of ``data`` and ``sampled16`` runs with the brief teacher, the two of a pair running
  at the same time (the same load on both), ratio per pair, median;
- streaming: students trained from a full and from a sampled store over the 1,600 student rows and over 4x as
  many (4x the steps), peak RSS of the training measured (``VmHWM`` after resetting it once the data is
  loaded), three repeats each.

Each (teacher, variant, seed) runs in its own process with one torch thread, seed by seed, every variant of a
seed before the next seed (interleaved). Time per step is the CPU time of the training steps of that process
divided by the steps (kdkit: the epochs' CPU seconds from ``metrics.jsonl``; TRL: from the first to the last
step's callback), so time other processes take on the shared machine is not counted; wall time is recorded as
well. Quality and speed ratios are per seed (the same student initialisation and rows), then the median.
Results: ``benchmarks/results/language_model.json`` (rewritten after every run, so an interrupted run keeps
what it measured).
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
    # Two teachers of one architecture: "brief" (one epoch over 4,800 rows: a high-entropy teacher) and
    # "converged" (every training row, several epochs with a cosine schedule: validation perplexity per epoch
    # is recorded to show where it levels off).
    "teachers": {"brief": {"epochs": 1, "rows": 4800}, "converged": {"epochs": 5, "rows": None}},
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
VARIANTS = ["data", "forward_kl", "sampled16", "topk_same_bytes", "sampled16_iid", "jsd", "topk32", "on_policy",
            "trl_gkd", "reverse_kl", "topk8"]
# Variants run with the converged teacher too (the others: the brief teacher only, as before).
CONVERGED_VARIANTS = ["data", "forward_kl", "sampled16", "topk_same_bytes", "sampled16_iid"]
KDKIT_OPTIONS: Dict[str, Dict[str, Any]] = {
    "data": {},  # method supervised: next-token cross-entropy
    "forward_kl": {"divergence": "forward_kl", "alpha": 1.0},
    "reverse_kl": {"divergence": "reverse_kl", "alpha": 1.0},
    "jsd": {"divergence": "jsd", "beta": 0.5, "alpha": 1.0},
    "sampled16": {"divergence": "forward_kl", "alpha": 1.0},
    "sampled16_iid": {"divergence": "forward_kl", "alpha": 1.0},
    "topk_same_bytes": {"divergence": "forward_kl", "alpha": 1.0},
    "topk8": {"divergence": "forward_kl", "alpha": 1.0},
    "topk32": {"divergence": "forward_kl", "alpha": 1.0},
    "on_policy": {"divergence": "jsd", "beta": 0.5, "alpha": 1.0, "on_policy": 0.5},
}
# Teacher stores, written once per teacher by the parent process (kdkit.lm.store.build_store) and read by every
# student run of that variant through method.store. topk_same_bytes: k chosen so that its bytes per position
# match the sampled16 store's (4 bytes per entry, 16-bit id and float16 log-probability, + 4 for the tail).
# sampled16: 16 systematic draws (kdkit's default); sampled16_iid: 16 independent draws (the paper's).
STORES: Dict[str, Dict[str, Any]] = {
    "sampled16": {"kind": "sampled", "size": 16, "sampling": "systematic"},
    "sampled16_iid": {"kind": "sampled", "size": 16, "sampling": "multinomial"},
    "topk8": {"kind": "topk", "size": 8}, "topk32": {"kind": "topk", "size": 32}, "topk_same_bytes": {"kind": "topk"}}
# Streaming: peak RSS of a student run over 1x and 4x the student rows (4x the steps), the same store kind.
RSS_VARIANTS = ["rss_full_1x", "rss_full_4x", "rss_sampled16_1x", "rss_sampled16_4x"]
# Step time: the data-only student and the sampled-store student, run two at a time (the same load on both).
SPEED_VARIANTS = ["speed_data", "speed_sampled16"]


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


def teacher_argmax(which: str) -> torch.Tensor:
    """Teacher ``which``'s arg-max token at every test position, computed once by :func:`prepare`."""
    from safetensors.torch import load_file

    return load_file(str(OUT / f"teacher_argmax-{which}.safetensors"))["teacher_argmax"]


def train_rows(train, steps: int) -> torch.Tensor:
    """The training rows every variant sees: ``steps * batch`` rows drawn once (seed 0), one epoch of them
    (the first ``steps * batch`` of the 4x rows of the streaming runs are the 1x rows' superset's draw)."""
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


def teacher_path(which: str) -> Path:
    s = SETTING
    t, run = s["teacher"], s["teachers"][which]
    key = f"t{t['layers']}x{t['hidden']}-v{s['vocab_size']}-L{s['max_length']}-e{run['epochs']}"
    if run["rows"]:
        key += f"-r{run['rows']}"
    return OUT / f"teacher-{key}.safetensors"


def load_teacher(vocab: int, which: str):
    from kdkit.training.checkpoint import load_weights

    teacher = build("teacher", vocab, 0)
    load_weights(teacher, teacher_path(which))
    return teacher.eval()


def train_teacher(which: str, data) -> Dict[str, Any]:
    """Train teacher ``which`` once (cached at :func:`teacher_path`); its training time and validation curve."""
    from kdkit.config import TrainConfig
    from kdkit.methods.build import build_method
    from kdkit.training.checkpoint import save_weights
    from kdkit.training.loop import fit

    run = SETTING["teachers"][which]
    log(f"training the {which} teacher ({SETTING['teacher']}, {run['epochs']} epochs over "
        f"{run['rows'] or len(data.train)} rows) ...")
    teacher = build("teacher", data.num_classes, 0)
    rows = data.train if not run["rows"] else data.train.subset(torch.arange(run["rows"]))
    method = build_method("supervised", teacher, None, {}, train_data=rows)
    cfg = TrainConfig(epochs=run["epochs"], optimizer="adamw", lr=SETTING["teacher_lr"], schedule="cosine",
                      grad_clip=SETTING["grad_clip"], keep="last", progress=False, threads=1)
    t0, c0 = time.perf_counter(), time.process_time()
    history = fit(method, rows, data.val, cfg, seed=0, batch_size=SETTING["batch_size"], device="cpu",
                  name=f"teacher-{which}")
    meta = {"train_wall_s": time.perf_counter() - t0, "train_cpu_s": time.process_time() - c0,
            "epochs": run["epochs"], "rows": len(rows),
            "val_perplexity_per_epoch": [e.get("val_perplexity") for e in history.epochs]}
    save_weights(teacher, teacher_path(which))
    teacher_path(which).with_suffix(".json").write_text(json.dumps(meta))
    return meta


def prepare(teachers) -> Dict[str, Any]:
    """The tokenizer, the data and the teachers (trained once and cached); each teacher's test perplexity."""
    from safetensors.torch import save_file

    from kdkit.lm.evaluate import lm_quality

    one_thread()
    OUT.mkdir(parents=True, exist_ok=True)
    data = splits()
    vocab = data.num_classes
    info: Dict[str, Any] = {"data": data.info, "teachers": {}}
    for which in teachers:
        path = teacher_path(which)
        if not path.is_file():
            train_teacher(which, data)
        teacher = load_teacher(vocab, which)
        quality, argmax = lm_quality(teacher, data.test, teacher=teacher)
        save_file({"teacher_argmax": argmax}, str(OUT / f"teacher_argmax-{which}.safetensors"))  # agreement
        info["teachers"][which] = {"params": n_params(teacher), **json.loads(path.with_suffix(".json").read_text()),
                                   **quality}
    info["student_params"] = n_params(build("student", vocab, 0))
    return info


def store_path(which: str, name: str, steps: int) -> Path:
    return OUT / "stores" / which / f"{name}-steps{steps}"


def write_stores(which: str, steps: int, names: List[str]) -> Dict[str, Any]:
    """Write (or reuse) teacher ``which``'s stores over the students' rows: the teacher's one job."""
    from kdkit.lm.store import build_store

    one_thread()
    data = splits()
    teacher = load_teacher(data.num_classes, which)
    out: Dict[str, Any] = {}
    for name in names:
        spec = dict(STORES.get(name) or {"kind": name.split("-")[0]})
        if name == "topk_same_bytes":  # as many bytes per position as the sampled store
            sampled = out.get("sampled16") or write_stores(which, steps, ["sampled16"])["sampled16"]
            spec["size"] = max(1, round((sampled["bytes_per_position"] - 4) / 4))
        rows = data.train.subset(train_rows(data.train, steps))
        t0, c0 = time.perf_counter(), time.process_time()
        store = build_store(teacher, rows, spec["kind"], spec.get("size"), path=store_path(which, name, steps),
                            sampling=spec.get("sampling", "systematic"))
        m = store.meta
        out[name] = {k: m.get(k) for k in ("kind", "size", "rows", "tokens", "entries", "entries_per_position",
                                           "bytes", "bytes_per_position", "bytes_per_entry", "entry_bytes",
                                           "sampled_mass_mean", "tail_mass_mean", "truncation_kl_mean",
                                           "float16_kl_mean")
                     if m.get(k) is not None}
        if not store.reused:
            out[name].update(write_wall_s=time.perf_counter() - t0, write_cpu_s=time.process_time() - c0)
        log(f"  {which}/{name}: {store.describe()}")
    return out


def storage_info(steps: int) -> Dict[str, Any]:
    """What the students train on, and what storing the teacher's full logits for it would take (fp16)."""
    data = splits()
    rows = data.train.subset(train_rows(data.train, steps))
    tokens = int((rows.y != -100).sum())
    info = {"student_rows": len(rows), "student_target_tokens": tokens,
            "full_logits_fp16_bytes": tokens * data.num_classes * 2}
    return info


# ----------------------------------------------------------------------------- one variant, one process

def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak_rss() -> int:
    """Reset the process's peak RSS (Linux: ``5`` into ``/proc/self/clear_refs``); the RSS now, in bytes."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS") * 1024


def peak_rss() -> int:
    """The peak RSS since :func:`reset_peak_rss` (``VmHWM``), in bytes."""
    return _status_kib("VmHWM") * 1024


def run_kdkit(variant: str, seed: int, steps: int, which: str) -> Dict[str, Any]:
    from kdkit.config import TrainConfig
    from kdkit.lm.evaluate import lm_quality
    from kdkit.methods.build import build_method
    from kdkit.teacher import Teacher
    from kdkit.training.loop import fit

    data = splits()
    vocab = data.num_classes
    rss = variant.startswith("rss_")
    speed = variant.startswith("speed_")
    variant_name, variant = variant, variant.removeprefix("speed_")
    scale = 4 if variant.endswith("_4x") else 1
    train = data.train.subset(train_rows(data.train, steps * scale))
    teacher = None if variant == "data" else Teacher(load_teacher(vocab, which))
    student = build("student", vocab, seed)
    if rss:  # forward KL from a store over 1x or 4x the rows
        options = {"divergence": "forward_kl", "alpha": 1.0,
                   "store": str(store_path(which, variant.split("_")[1], steps * scale))}
    else:
        options = dict(KDKIT_OPTIONS[variant])
        if variant in STORES:
            options["store"] = str(store_path(which, variant, steps))  # written by the parent: read only here
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
    run_dir = OUT / "runs" / f"{which}-{variant_name}-s{seed}"
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    # Peak RSS of the training alone (store opened, steps run), not of loading the corpus before it.
    rss_before = reset_peak_rss()
    t0 = time.perf_counter()
    history = fit(method, train, None, cfg, run_dir=run_dir, seed=seed, batch_size=SETTING["batch_size"],
                  device="cpu", name=variant)
    wall = time.perf_counter() - t0
    rss_peak = peak_rss()
    record = history.epochs[-1]
    n_steps = math.ceil(len(train) / SETTING["batch_size"])
    out = {"variant": variant_name, "teacher": which, "seed": seed, "steps": n_steps, "rows": len(train),
           "step_cpu_s": record["epoch_cpu_seconds"] / n_steps, "step_wall_s": record["epoch_seconds"] / n_steps,
           "total_wall_s": wall, "rss_before_training_bytes": rss_before, "peak_rss_bytes": rss_peak,
           "teacher_cache": history.teacher_cache,
           "store": options.get("store"), "train_loss": record.get("train_loss")}
    if not (rss or speed):
        quality, _ = lm_quality(student, data.test, teacher_argmax=teacher_argmax(which))
        out.update({f"test_{k}": v for k, v in quality.items()})
    return out


def run_trl(seed: int, steps: int, which: str) -> Dict[str, Any]:
    """TRL's GKDTrainer on the same teacher, student, rows and loss (JSD beta=0.5, lambda=0.5)."""
    import datasets
    import transformers
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from kdkit.lm.evaluate import lm_quality

    data = splits()
    vocab = data.num_classes
    pad, eos = data.train.pad_token_id, data.train.eos_token_id
    train = data.train.subset(train_rows(data.train, steps))
    teacher = load_teacher(vocab, which)
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
    quality, _ = lm_quality(trained.eval(), data.test, teacher_argmax=teacher_argmax(which))
    return {"variant": "trl_gkd", "teacher": which, "seed": seed, "steps": clock.steps,
            # c0 is taken at the start of the first step and c1 at the end of the last: all the steps.
            "step_cpu_s": (clock.c1 - clock.c0) / clock.steps, "step_wall_s": (clock.t1 - clock.t0) / clock.steps,
            "step_divisor": clock.steps,
            "total_wall_s": wall, "teacher_cache": "none (TRL runs the teacher every step)",
            "train_loss": losses[-1] if losses else None, **{f"test_{k}": v for k, v in quality.items()}}


def child(variant: str, seed: int, steps: int, out: Path, which: str) -> None:
    one_thread()
    result = run_trl(seed, steps, which) if variant == "trl_gkd" else run_kdkit(variant, seed, steps, which)
    out.write_text(json.dumps(result))


# ----------------------------------------------------------------------------- the whole run

def _key(r: Dict[str, Any]) -> str:
    return f"{r.get('teacher', 'brief')}/{r['variant']}"


def summarise(runs: List[Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """Per teacher/variant: seeds, perplexity (median, mean, std), agreement, CPU s/step, peak RSS."""
    table: Dict[str, Dict[str, Any]] = {}
    for key in dict.fromkeys(_key(r) for r in runs):
        rs = [r for r in runs if _key(r) == key]
        cpu = [r["step_cpu_s"] for r in rs if r.get("step_cpu_s")]
        row: Dict[str, Any] = {"seeds": len(rs), "step_cpu_s_median": statistics.median(cpu) if cpu else None,
                               "peak_rss_mib_median": statistics.median(r["peak_rss_bytes"] for r in rs) / 2**20
                               if all(r.get("peak_rss_bytes") for r in rs) else None}
        ppl = [r["test_perplexity"] for r in rs if "test_perplexity" in r]
        if ppl:
            row.update(perplexity_median=statistics.median(ppl), perplexity_mean=statistics.mean(ppl),
                       perplexity_std=statistics.stdev(ppl) if len(ppl) > 1 else 0.0,
                       agreement_mean=statistics.mean(r.get("test_agreement", float("nan")) for r in rs))
        table[key] = row
    return table


def _paired(runs: List[Dict[str, Any]], a: str, b: str, field: str) -> List[float]:
    """Per seed, ``a``'s figure over ``b``'s (the same seed: the same student initialisation and rows)."""
    by = {(_key(r), r["seed"]): r for r in runs}
    return [by[(a, s)][field] / by[(b, s)][field] for (k, s) in by if k == a and (b, s) in by
            and by[(b, s)].get(field)]


def comparisons(runs: List[Dict[str, Any]], table: Dict[str, Dict[str, Any]], stores: Dict[str, Any]
                ) -> Dict[str, Any]:
    """The questions of the README, answered from the runs (every percentage from per-seed pairs, median)."""
    out: Dict[str, Any] = {}
    data = table.get("brief/data")
    if data and "perplexity_mean" in data:
        spread = data["perplexity_std"]
        out["vs_data"] = {k.split("/")[1]: {"perplexity_gain": data["perplexity_mean"] - r["perplexity_mean"],
                                            "largest_std": max(spread, r["perplexity_std"]),
                                            "beats_by_more_than_spread": data["perplexity_mean"] - r["perplexity_mean"]
                                            > max(spread, r["perplexity_std"])}
                          for k, r in table.items() if k.startswith("brief/") and k != "brief/data"
                          and "perplexity_mean" in r}
    if "brief/topk32" in table and "brief/forward_kl" in table:
        full, top = table["brief/forward_kl"]["perplexity_mean"], table["brief/topk32"]["perplexity_mean"]
        out["topk32_vs_full_percent"] = 100.0 * (top - full) / full
    ratios = _paired(runs, "brief/on_policy", "brief/trl_gkd", "step_cpu_s")
    if ratios:
        out["kdkit_over_trl_step_cpu"] = {"per_seed": ratios, "median": statistics.median(ratios)}
    for which in ("brief", "converged"):
        t = f"{which}/"
        for store in ("sampled16", "topk_same_bytes", "sampled16_iid"):
            pairs = _paired(runs, t + store, t + "forward_kl", "test_perplexity")
            if pairs:
                pct = [100.0 * (r - 1.0) for r in pairs]
                name = "topk_at_sampled16_bytes" if store == "topk_same_bytes" else store
                entry = {"per_seed_percent": pct, "median_percent": statistics.median(pct),
                         "perplexity_median": table[t + store]["perplexity_median"],
                         "live_full_perplexity_median": table[t + "forward_kl"]["perplexity_median"],
                         "data_only_perplexity_median": (table.get(t + "data") or {}).get("perplexity_median"),
                         "bytes_per_position": (stores.get(which, {}).get(store) or {}).get("bytes_per_position")}
                if store.startswith("sampled16"):
                    entry.update(goal_percent=2.0, met=statistics.median(pct) <= 2.0)
                else:
                    entry["k"] = (stores.get(which, {}).get(store) or {}).get("size")
                out[f"{name}_vs_live_full_percent_{which}"] = entry
        st = stores.get(which, {}).get("sampled16")
        if st:
            from kdkit.lm.store import id_dtype

            entry = st.get("entry_bytes", id_dtype(SETTING["vocab_size"]).itemsize + 1)  # id + 8-bit count
            out[f"sampled16_bytes_percent_of_dense_fp16_{which}"] = {
                "bytes_per_position": st["bytes_per_position"], "entries_per_position": st["entries_per_position"],
                "entry_bytes": entry, "bytes_per_entry_with_row_index": st["bytes_per_entry"],
                "dense_fp16_bytes_per_position": 2 * SETTING["vocab_size"],
                "percent_of_dense_fp16": 100.0 * st["bytes_per_position"] / (2 * SETTING["vocab_size"]),
                "goal_bytes_per_entry": 3.0, "met": entry <= 3.0}
        steps = _paired(runs, t + "speed_sampled16", t + "speed_data", "step_cpu_s")
        if steps:
            out[f"sampled16_step_over_data_percent_{which}"] = {
                "per_pair_ratio": steps, "median_ratio": statistics.median(steps),
                "overhead_percent": 100.0 * (statistics.median(steps) - 1.0), "goal_percent": 10.0,
                "met": statistics.median(steps) <= 1.1}
    for kind in ("full", "sampled16"):
        one, four = table.get(f"converged/rss_{kind}_1x"), table.get(f"converged/rss_{kind}_4x")
        if one and four and one["peak_rss_mib_median"] and four["peak_rss_mib_median"]:
            growth = 100.0 * (four["peak_rss_mib_median"] / one["peak_rss_mib_median"] - 1.0)
            out[f"sampled_rss_4x_over_1x_percent_{kind}_store"] = {
                "peak_rss_mib_1x": one["peak_rss_mib_median"], "peak_rss_mib_4x": four["peak_rss_mib_median"],
                "store_mib_1x": (stores.get("converged", {}).get(f"{kind}-1x") or {}).get("bytes", 0) / 2**20,
                "store_mib_4x": (stores.get("converged", {}).get(f"{kind}-4x") or {}).get("bytes", 0) / 2**20,
                "growth_percent": growth, "goal_percent": 10.0, "met": growth <= 10.0}
    return out


def resummarise(path: Path) -> None:
    """Recompute the summary and comparisons of a finished (or interrupted) run from its JSON."""
    payload = json.loads(path.read_text())
    payload["summary"] = summarise(payload["runs"])
    payload["comparisons"] = comparisons(payload["runs"], payload["summary"], payload["info"].get("stores", {}))
    path.write_text(json.dumps(payload, indent=1))
    print_table(payload["info"], payload["summary"])
    log(json.dumps(payload["comparisons"], indent=1))


def print_table(info: Dict[str, Any], table: Dict[str, Dict[str, Any]]) -> None:
    for which, t in info["teachers"].items():
        log(f"{which} teacher: {t['params']:,} parameters, test perplexity {t['perplexity']:.2f}")
    log(f"student: {info['student_params']:,} parameters")
    log(f"{'teacher/variant':<28} {'seeds':>5} {'test ppl median':>15} {'mean ± std':>16} {'agreement':>9} "
        f"{'s/step (CPU)':>12} {'peak RSS':>10}")
    for k, r in table.items():
        step = f"{r['step_cpu_s_median']:.3f}" if r["step_cpu_s_median"] else "-"
        rss = f"{r['peak_rss_mib_median']:.0f} MiB" if r.get("peak_rss_mib_median") else "-"
        if "perplexity_median" in r:
            ppl = f"{r['perplexity_median']:>15.2f} {r['perplexity_mean']:>8.2f} ± {r['perplexity_std']:<5.2f}"
            agree = f"{r['agreement_mean']:>9.3f}"
        else:
            ppl, agree = f"{'-':>15} {'':>16}", f"{'-':>9}"
        log(f"{k:<28} {r['seeds']:>5} {ppl} {agree} {step:>12} {rss:>10}")


def jobs_for(seeds: List[int], teachers: List[str], variants: List[str], rss_repeats: int, speed_repeats: int):
    """(seed, teacher, variant) in the order they run: seed by seed, every teacher's variants interleaved; then
    the step-time pairs and the streaming runs, repeat by repeat."""
    jobs = []
    for seed in seeds:
        for which in teachers:
            allowed = VARIANTS if which == "brief" else CONVERGED_VARIANTS
            jobs += [(seed, which, v) for v in variants if v in allowed]
    if "brief" in teachers and "sampled16" in variants:
        jobs += [(rep, "brief", v) for rep in range(speed_repeats) for v in SPEED_VARIANTS]
    if "converged" in teachers:
        jobs += [(rep, "converged", v) for rep in range(rss_repeats) for v in RSS_VARIANTS]
    return jobs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=100, help="optimiser steps per student run")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--teachers", default="brief,converged", help="teachers to distil from")
    ap.add_argument("--rss-repeats", type=int, default=3, help="repeats of each streaming (peak RSS) run")
    ap.add_argument("--speed-repeats", type=int, default=5, help="pairs of step-time runs (data, sampled16)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--jobs", type=int, default=1, help="variant processes run at once (each with one thread)")
    ap.add_argument("--summarise", action="store_true", help="recompute the summary of --out and print it")
    ap.add_argument("--prepare-only", action="store_true", help="train (or load) the teachers and stop")
    ap.add_argument("--smoke", action="store_true", help="teachers trained on 256 rows: checks the script only")
    ap.add_argument("--child", nargs=4, metavar=("VARIANT", "SEED", "FILE", "TEACHER"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.smoke:
        global OUT
        SETTING["teachers"] = {w: {"epochs": 1, "rows": 256} for w in SETTING["teachers"]}
        OUT = OUT.with_name("language_model_smoke")
    if args.summarise:
        resummarise(Path(args.out))
        return
    if args.child:
        variant, seed, out, which = args.child
        child(variant, int(seed), args.steps, Path(out), which)
        return
    variants = [v for v in args.variants.split(",") if v]
    teachers = [t for t in args.teachers.split(",") if t]
    unknown = sorted(set(variants) - set(VARIANTS)) + sorted(set(teachers) - set(SETTING["teachers"]))
    if unknown:
        raise SystemExit(f"unknown variant(s) or teacher(s) {unknown}; expected some of {VARIANTS} and "
                         f"{list(SETTING['teachers'])}")
    seeds = [int(s) for s in args.seeds.split(",")]
    t_start = time.perf_counter()
    info = prepare(teachers)
    for which, t in info["teachers"].items():
        log(f"{which} teacher ready: {t['params']:,} parameters, test perplexity {t['perplexity']:.2f} "
            f"({time.perf_counter() - t_start:.0f} s)")
    if args.prepare_only:
        return
    info["storage"] = storage_info(args.steps)
    # The teachers' one job: every store the students read, written before any student runs.
    info["stores"] = {}
    for which in teachers:
        allowed = VARIANTS if which == "brief" else CONVERGED_VARIANTS
        info["stores"][which] = write_stores(which, args.steps, [v for v in variants if v in STORES and v in allowed])
        if which == "converged" and args.rss_repeats:
            for kind, name in (("full", "full"), ("sampled", "sampled16")):
                for scale in (1, 4):
                    info["stores"][which][f"{name}-{scale}x"] = write_stores(
                        which, args.steps * scale, [name if name != "full" else "full"])[name]
    runs: List[Dict[str, Any]] = []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT.parent / "src")}

    def one(job) -> Optional[Dict[str, Any]]:
        seed, which, variant = job
        out = OUT / f"result-{which}-{variant}-s{seed}.json"
        out.unlink(missing_ok=True)
        c0 = time.perf_counter()
        command = [sys.executable, __file__, "--steps", str(args.steps), "--child", variant, str(seed), str(out),
                   which]
        proc = subprocess.run(command + (["--smoke"] if args.smoke else []), env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not out.is_file():
            log(f"{which}/{variant} seed {seed} FAILED:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
            return None
        r = json.loads(out.read_text())
        r["process_wall_s"] = time.perf_counter() - c0
        return r

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for r in pool.map(one, jobs_for(seeds, teachers, variants, args.rss_repeats, args.speed_repeats)):
            if r is None:
                continue
            runs.append(r)
            ppl = f"test ppl {r['test_perplexity']:.2f}, " if "test_perplexity" in r else ""
            log(f"{_key(r):<28} seed {r['seed']}: {ppl}{r['step_cpu_s']:.3f} s/step CPU, peak RSS "
                f"{r.get('peak_rss_bytes', 0) / 2**20:.0f} MiB, {r['process_wall_s']:.0f} s")
            summary = summarise(runs)
            payload = {"setting": SETTING, "steps": args.steps, "seeds": seeds, "variants": variants,
                       "teachers": teachers, "info": info, "jobs": args.jobs, "runs": runs, "summary": summary,
                       "comparisons": comparisons(runs, summary, info["stores"]),
                       "machine": platform.platform(), "python": platform.python_version(),
                       "torch": torch.__version__, "wall_s": time.perf_counter() - t_start}
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(payload, indent=1))
    print_table(info, summarise(runs))
    log(json.dumps(comparisons(runs, summarise(runs), info["stores"]), indent=1))
    log(f"total wall time {time.perf_counter() - t_start:.0f} s; results in {args.out}")


if __name__ == "__main__":
    main()
