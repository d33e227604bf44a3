"""Benchmark: distil a fine-tuned MiniLM-L6 into small, fast text classifiers on the Debian fortunes topics (issue 10).

    python benchmarks/text_classification.py            # over an hour of one core (README); --quick: a smoke run
    python benchmarks/text_classification.py --labelled-fraction 0.25   # a quarter labelled, all as transfer set
    python benchmarks/text_classification.py --table benchmarks/results/text_classification.json

1. Data: ``fortunes_topics`` (six topic files, the first ``--per-topic`` quotations of each, kdkit's fixed
   split: 65 % training, 35 % test), tokenised once with MiniLM's tokenizer, ``--max-length`` tokens.
2. Teacher: MiniLM-L6 (``kdkit.hf.load("minilm")``, a fresh 6-way head) fine-tuned with ``kdkit.train``; its
   weights are cached in ``benchmarks/out/text_classification/`` (ignored by git) and reused when the
   settings match.
3. Students: 3- and 2-layer BERTs initialised from the teacher's layers (``kdkit.hf.shrink``), the same
   shapes from random init, and a bag-of-embeddings model (``boe``, Tang et al. 2019's kind of
   non-transformer student); each trained from labels alone (``kdkit.train``), with logits KD (``kd``, teacher
   logits cached on disk) and with hidden states + attention + logits (``tinybert``; the teacher's logits and
   layers cached, fp16 layers).
4. Measured: test accuracy and macro-F1 (mean ± std over seeds, the weights after the last epoch), parameters,
   safetensors bytes, CPU latency at batch 1 (one thread, a fixed sequence of ``--max-length`` tokens, all
   models timed in interleaved rounds, median), and kdkit's seconds per epoch against a minimal hand-written
   Hugging Face loop doing the same work (KD from cached logits, AdamW, cosine schedule, dynamic padding).

Jobs run in priority order under ``--budget-min``; what does not fit is cut and listed (in the JSON too).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import kdkit  # noqa: E402
from kdkit import ArrayData  # noqa: E402
from kdkit.evaluation.metrics import predict, size  # noqa: E402
from kdkit.training.checkpoint import load_weights, save_weights  # noqa: E402

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "out" / "text_classification"
RESULT = ROOT / "results" / "text_classification.json"
LOOP_RESULT = ROOT / "results" / "text_classification_loop.json"  # --loop-only writes here
TOPICS = ["computers", "definitions", "people", "politics", "science", "songs-poems"]

STUDENTS = {  # name -> description (built by make_student)
    "L3-init": "3 layers copied from the teacher (blocks 0, 2, 4), embeddings and head too",
    "L2-init": "2 layers copied from the teacher (blocks 0, 3), embeddings and head too",
    "L3-rand": "the same 3-layer shape (width 384, 12 heads), random init",
    "L2-rand": "the same 2-layer shape, random init",
    "boe": "bag of embeddings (Tang et al. 2019 style): mean of 128-d token embeddings, MLP 128-128-6",
}
REGIMES = {"labels": "labels only (kdkit.train)", "kd": "logits KD (kd)",
           "tinybert": "hidden + attention + logits (tinybert)"}


def log(msg: str) -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------- data and models

def load_data(args):
    """The fortunes splits; with ``--labelled-fraction F < 1`` also ``splits.labelled`` (the labelled share of the
    training texts: the teacher's and the labels-only students' training set) and ``splits.transfer`` (every
    training text, the unlabelled ones with target -1: the distilled students' transfer set)."""
    splits = kdkit.DATASETS.get("fortunes_topics")(
        tokenizer="minilm", max_length=args.max_length, topics=TOPICS, per_topic=args.per_topic, val_fraction=0.0,
        test_fraction=0.35, cache_dir=str(OUT.parent / "text_classification" / "tokens"))
    splits.labelled = splits.transfer = splits.train
    fraction = getattr(args, "labelled_fraction", 1.0)
    if fraction < 1.0:
        train = splits.train
        keep = labelled_indices(train.y, fraction)
        mask = torch.zeros(len(train), dtype=torch.bool)
        mask[keep] = True
        common = dict(pad_token_id=train.pad_token_id, bucket_by_length=train.bucket_by_length)
        splits.labelled = ArrayData(train.x[keep], train.y[keep], **common)
        splits.transfer = ArrayData(train.x, torch.where(mask, train.y, torch.full_like(train.y, -1)), **common)
    return splits


def labelled_indices(y: torch.Tensor, fraction: float) -> torch.Tensor:
    """A fixed, class-stratified share of the training texts that keeps its labels: in each class, the first
    ``round(fraction · n_c)`` of a permutation drawn with seed 0 (sorted, so the subset keeps dataset order)."""
    g = torch.Generator().manual_seed(0)
    keep = []
    for c in sorted(set(y.tolist())):
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        keep.append(idx[:max(1, round(fraction * len(idx)))])
    return torch.cat(keep).sort().values


def fresh_teacher(num_classes: int):
    torch.manual_seed(0)  # the fresh head's init
    return kdkit.hf.load("minilm", num_labels=num_classes, log=lambda _m: None)


def get_teacher(splits, args, out: Optional[Path] = None) -> Dict[str, Any]:
    """Fine-tune MiniLM once with kdkit.train; later runs load the weights (from ``out``, default this benchmark's
    output folder) when the settings match."""
    settings = {"topics": TOPICS, "per_topic": args.per_topic, "max_length": args.max_length,
                "epochs": args.teacher_epochs, "lr": args.teacher_lr, "batch_size": args.batch_size}
    if getattr(args, "labelled_fraction", 1.0) < 1.0:
        settings["labelled_fraction"] = args.labelled_fraction
    out = out or OUT
    out.mkdir(parents=True, exist_ok=True)
    path, meta_path = out / "teacher.safetensors", out / "teacher.json"
    teacher = fresh_teacher(splits.num_classes)
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else None
    if path.exists() and meta and meta["settings"] == settings:
        load_weights(teacher, path)
        log(f"teacher: loaded {path} (fine-tuned earlier in {meta['train_seconds']:.0f} s)")
        return {"model": teacher.eval(), "train_seconds": meta["train_seconds"], "reused": True, "settings": settings}
    log(f"teacher: fine-tuning MiniLM-L6 on {len(splits.labelled)} labelled texts, {args.teacher_epochs} epochs ...")
    t0 = time.perf_counter()
    kdkit.train(teacher, splits.labelled, epochs=args.teacher_epochs, lr=args.teacher_lr, batch_size=args.batch_size,
                optimizer="adamw", weight_decay=0.01, seed=0, device="cpu", threads=1, progress=False, quiet=True)
    seconds = time.perf_counter() - t0
    save_weights(teacher, path)
    meta_path.write_text(json.dumps({"settings": settings, "train_seconds": seconds}, indent=1))
    log(f"teacher: fine-tuned in {seconds:.0f} s, saved to {path}")
    return {"model": teacher.eval(), "train_seconds": seconds, "reused": False, "settings": settings}


def make_student(name: str, teacher, splits, seed: int):
    torch.manual_seed(seed)
    if name == "L3-init":
        return kdkit.hf.shrink(teacher, layers=[0, 2, 4])
    if name == "L2-init":
        return kdkit.hf.shrink(teacher, layers=[0, 3])
    if name == "L3-rand":
        return kdkit.hf.shrink(teacher, layers=[0, 2, 4], hidden=384)
    if name == "L2-rand":
        return kdkit.hf.shrink(teacher, layers=[0, 3], hidden=384)
    text = splits.info["text"]
    return kdkit.create_model("boe", num_classes=splits.num_classes, vocab_size=text["vocab_size"],
                              pad_token_id=text["pad_token_id"], embed_dim=128, hidden=128)


def macro_f1(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """Unweighted mean over the classes present of 2TP / (2TP + FP + FN) (scikit-learn's average='macro')."""
    scores = []
    for c in range(num_classes):
        tp = int(((pred == c) & (labels == c)).sum())
        fp, fn = int(((pred == c) & (labels != c)).sum()), int(((pred != c) & (labels == c)).sum())
        if tp + fp + fn:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores)


def score(model, data, num_classes: int) -> Dict[str, float]:
    out = predict(model, data, batch_size=64)
    pred, y = out["outputs"].argmax(1), out["y"]
    return {"accuracy": float((pred == y).float().mean()), "macro_f1": macro_f1(pred, y, num_classes)}


# ----------------------------------------------------------------------------- one training run

def train_student(student_name: str, regime: str, seed: int, teacher, splits, args) -> Dict[str, Any]:
    student = make_student(student_name, teacher, splits, seed)
    lr = args.lr_boe if student_name == "boe" else (args.lr_init if student_name.endswith("init") else args.lr_rand)
    common = dict(epochs=args.epochs, lr=lr, batch_size=args.batch_size, optimizer="adamw", weight_decay=0.01,
                  seed=seed, device="cpu", threads=1, progress=False, quiet=True)
    t0 = time.perf_counter()
    if regime == "labels":
        run = kdkit.train(student, splits.labelled, **common)
    else:
        options = dict(temperature=args.temperature, alpha=args.alpha)
        if regime == "kd":
            options.update(teacher_cache="disk", cache_dir=str(OUT / "teacher_logits"))
        else:
            if args.beta is not None:  # else the method's default (0.1 for tinybert)
                options.update(beta=args.beta)
        run = kdkit.distill(teacher, student, splits.transfer, method=regime, **common, **options)
    seconds = time.perf_counter() - t0
    result = score(run.student, splits.test, splits.num_classes)
    result.update(seed=seed, seconds=seconds, epoch_seconds=[h["epoch_seconds"] for h in run.history])
    log(f"  {student_name:8s} {regime:8s} seed {seed}: accuracy {100 * result['accuracy']:.2f}%, macro-F1 "
        f"{100 * result['macro_f1']:.2f}% ({seconds:.0f} s)")
    return result


# ----------------------------------------------------------------------------- latency and loop cost

@torch.inference_mode()
def latency_b1(models: Dict[str, torch.nn.Module], ids: torch.Tensor, rounds: int) -> Dict[str, float]:
    """Median milliseconds of one batch-1 forward per model, the models timed in interleaved rounds."""
    times: Dict[str, List[float]] = {k: [] for k in models}
    for m in models.values():
        m.eval()
        for _ in range(3):
            m(ids)
    for _ in range(rounds):
        for name, m in models.items():
            t0 = time.perf_counter()
            m(ids)
            times[name].append(1000 * (time.perf_counter() - t0))
    return {k: statistics.median(v) for k, v in times.items()}


def hand_written_epoch(student, x: torch.Tensor, y: torch.Tensor, t_logits: torch.Tensor, seed: int, args) -> float:
    """The minimal Hugging Face loop kdkit's epoch is compared with: KD from cached teacher logits, AdamW, cosine
    schedule per step, batches trimmed to their longest text. Seconds of the batch loop alone."""
    hf, pad = student.hf, student.pad_token_id
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr_init, weight_decay=0.01)
    steps = math.ceil(len(x) / args.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    student.train()
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    temp, alpha = args.temperature, args.alpha
    t0 = time.perf_counter()
    for start in range(0, len(x), args.batch_size):
        idx = order[start:start + args.batch_size]
        xb, yb, tb = x[idx], y[idx], t_logits[idx]
        xb = xb[:, :int((xb != pad).sum(1).max())]
        s = hf(input_ids=xb, attention_mask=(xb != pad).long()).logits
        kd = F.kl_div(F.log_softmax(s / temp, 1), F.log_softmax(tb / temp, 1), reduction="batchmean",
                      log_target=True) * temp ** 2
        loss = alpha * kd + (1 - alpha) * F.cross_entropy(s, yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return time.perf_counter() - t0


def loop_cost(teacher, splits, args) -> Dict[str, Any]:
    """Interleaved repeats of one kdkit.distill(kd) epoch and one hand-written epoch on the L3-init student."""
    n = min(args.loop_samples, len(splits.train))
    x, y = splits.train.x[:n], splits.train.y[:n]
    data = ArrayData(x, y)  # plain order for both loops (no length buckets)
    with torch.inference_mode():
        t_logits = torch.cat([teacher(x[i:i + 64]) for i in range(0, n, 64)]).clone()
    kdkit_epoch, kdkit_call, hand = [], [], []
    for r in range(args.loop_repeats):
        for which in ((0, 1) if r % 2 == 0 else (1, 0)):  # alternate who goes first
            student = make_student("L3-init", teacher, splits, r)
            if which == 0:
                t0 = time.perf_counter()
                run = kdkit.distill(teacher, student, data, method="kd", epochs=1, lr=args.lr_init,
                                    batch_size=args.batch_size, optimizer="adamw", weight_decay=0.01, seed=r,
                                    device="cpu", threads=1, progress=False, quiet=True,
                                    temperature=args.temperature, alpha=args.alpha, teacher_cache="disk",
                                    cache_dir=str(OUT / "teacher_logits"))
                kdkit_call.append(time.perf_counter() - t0)
                kdkit_epoch.append(run.history[0]["epoch_seconds"])
            else:
                hand.append(hand_written_epoch(student, x, y, t_logits, r, args))
    k, c, h = statistics.median(kdkit_epoch), statistics.median(kdkit_call), statistics.median(hand)
    log(f"loop cost: kdkit {k:.2f} s/epoch ({c:.2f} s per distill call), hand-written {h:.2f} s/epoch, "
        f"ratio {k / h:.3f}")
    return {"samples": n, "repeats": args.loop_repeats, "kdkit_epoch_seconds": kdkit_epoch,
            "kdkit_call_seconds": kdkit_call, "hand_epoch_seconds": hand, "kdkit_median": k, "kdkit_call_median": c,
            "hand_median": h, "ratio": k / h, "ratio_call": c / h}


# ----------------------------------------------------------------------------- the plan, under a budget

def jobs(args) -> List[tuple]:
    """(student, regime, seed) in priority order: the issue's main comparison first, every seed of it."""
    boe = [("boe", r, s) for s in args.seeds for r in ("labels", "kd")]  # seconds each: first
    main = [("L3-init", r, s) for s in args.seeds for r in REGIMES]
    first = [("L2-init", r, args.seeds[0]) for r in REGIMES]
    first += [(st, r, args.seeds[0]) for st in ("L3-rand", "L2-rand") for r in ("labels", "kd")]
    rest = [(st, r, s) for s in args.seeds[1:] for st, r, _ in first]
    return boe + main + first + rest


# settings that choose which jobs run, not what a job computes: a --resume may change them
JOB_SELECTION = ("budget_min", "regimes", "students", "resume", "quick", "loop_only", "latency_only", "seeds",
                 "latency_rounds")


def previous_runs(settings: Dict[str, Any]):
    """The per-cell runs of an earlier RESULT whose settings match these (apart from the job selection), and that
    result; an earlier result with other settings is an error rather than silently mixed in."""
    if not RESULT.exists():
        return {}, {}
    old = json.loads(RESULT.read_text())
    ignore = set(JOB_SELECTION)
    if not any(k.endswith("/tinybert") for k in old["results"]):
        ignore.add("beta")  # only the tinybert runs read it
    same = {k: v for k, v in old["settings"].items() if k not in ignore}
    new = {k: v for k, v in settings.items() if k not in ignore}
    if same != new:
        diff = sorted(k for k in set(same) | set(new) if same.get(k) != new.get(k))
        raise kdkit.KdkitError(f"--resume: {RESULT} was run with other settings ({', '.join(diff)}); "
                               "move it away or run without --resume")
    return {k: list(v["runs"]) for k, v in old["results"].items()}, old


def summarise(runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    out = {"seeds": [r["seed"] for r in runs], "runs": runs}
    for key in ("accuracy", "macro_f1", "seconds"):
        vals = [r[key] for r in runs]
        out[key] = {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0}
    return out


def run_all(args) -> Dict[str, Any]:
    start = time.perf_counter()
    deadline = start + 60 * args.budget_min
    torch.set_num_threads(1)
    splits = load_data(args)
    log(f"data: {len(splits.train)} training ({len(splits.labelled)} labelled) / {len(splits.test)} test texts, "
        f"{splits.num_classes} topics, max_length {args.max_length}")
    t = get_teacher(splits, args)
    teacher = t["model"]
    teacher_scores = score(teacher, splits.test, splits.num_classes)
    log(f"teacher: accuracy {100 * teacher_scores['accuracy']:.2f}%, macro-F1 {100 * teacher_scores['macro_f1']:.2f}%")
    result: Dict[str, Any] = {
        "settings": {k: v for k, v in vars(args).items() if k not in ("table",)}, "topics": TOPICS,
        "data": {"train": len(splits.train), "labelled": len(splits.labelled), "test": len(splits.test),
                 "source": splits.info.get("source")},
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "threads": 1,
                    "cpu_count": os.cpu_count()},
        "teacher": {**teacher_scores, **size(teacher), "train_seconds": t["train_seconds"], "reused": t["reused"]},
        "students": {k: v for k, v in STUDENTS.items()}, "regimes": REGIMES, "results": {}, "cut": [],
    }
    costs: Dict[tuple, float] = {}
    per_cell, earlier = previous_runs(result["settings"]) if args.resume else ({}, {})
    if per_cell:
        log(f"--resume: keeping {sum(map(len, per_cell.values()))} runs of {RESULT.name} (same settings)")
        result["results"] = {k: summarise(v) for k, v in per_cell.items()}
    loop_done = "loop_cost" in earlier
    if loop_done:
        result["loop_cost"] = earlier["loop_cost"]
    for student_name, regime, seed in jobs(args):
        if args.regimes and regime not in args.regimes or args.students and student_name not in args.students:
            continue
        if any(r["seed"] == seed for r in per_cell.get(f"{student_name}/{regime}", [])):
            continue  # kept from the earlier run
        if not loop_done and args.labelled_fraction < 1.0:
            loop_done = True  # measured in the fully labelled setting (same students, same work per text)
        if not loop_done and student_name not in ("L3-init", "boe"):  # after the main comparison: the loop cost
            if time.perf_counter() + costs.get(("L3-init", "kd"), 0) * 0.8 < deadline:
                result["loop_cost"] = loop_cost(teacher, splits, args)
            else:
                result["cut"].append("loop cost (kdkit vs hand-written epoch)")
            loop_done = True
        estimate = costs.get((student_name, regime), 0.0)
        if time.perf_counter() + estimate > deadline:
            result["cut"].append(f"{student_name} {regime} seed {seed}")
            continue
        r = train_student(student_name, regime, seed, teacher, splits, args)
        costs[(student_name, regime)] = r["seconds"]
        per_cell.setdefault(f"{student_name}/{regime}", []).append(r)
        result["results"] = {k: summarise(v) for k, v in per_cell.items()}
        RESULT.write_text(json.dumps(result, indent=1))  # partial results survive an interruption
    measure_latency(result, teacher, splits, args)
    result["wall_seconds"] = time.perf_counter() - start
    result["verdict"] = verdict(result)
    RESULT.write_text(json.dumps(result, indent=1))
    return result


def measure_latency(result: Dict[str, Any], teacher, splits, args) -> None:
    """Sizes and batch-1 latency, once per architecture in ``result["results"]`` (seed 0's initial weights: the
    cost does not depend on the values), written into ``result``."""
    models = {"teacher": teacher}
    for name in STUDENTS:
        if any(k.startswith(name + "/") for k in result["results"]):
            models[name] = make_student(name, teacher, splits, 0)
    ids = splits.test.x[(splits.test.x != teacher.pad_token_id).sum(1).argmax()].unsqueeze(0)  # longest test text
    lat = latency_b1(models, ids, args.latency_rounds)
    result["latency_seq_len"] = int((ids != teacher.pad_token_id).sum())
    result["latency_rounds"] = args.latency_rounds
    result["latency_load_average"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    result["teacher"]["latency_ms_b1"] = lat["teacher"]
    result["architectures"] = {name: {**size(m), "latency_ms_b1": lat[name]} for name, m in models.items()
                               if name != "teacher"}


def latency_only(args) -> int:
    """Measure the latencies of an existing result again (e.g. on a quieter machine) and rewrite its verdict."""
    if not RESULT.exists():
        raise kdkit.KdkitError(f"--latency-only needs an earlier result at {RESULT}")
    torch.set_num_threads(1)
    result = json.loads(RESULT.read_text())
    splits = load_data(args)
    teacher = get_teacher(splits, args)["model"]
    measure_latency(result, teacher, splits, args)
    result["verdict"] = verdict(result)
    RESULT.write_text(json.dumps(result, indent=1))
    print(table(result))
    log(f"rewrote the latencies of {RESULT}")
    return 0


def loop_only(args) -> int:
    """The loop cost alone, in its own process (e.g. beside a main run that the budget stopped before it)."""
    torch.set_num_threads(1)
    splits = load_data(args)
    t = get_teacher(splits, args)
    if not t["reused"]:
        log("note: the teacher was fine-tuned now; the main run reuses it")
    LOOP_RESULT.write_text(json.dumps({"settings": vars(args), "loop_cost": loop_cost(t["model"], splits, args)},
                                      indent=1))
    log(f"wrote {LOOP_RESULT}")
    return 0


def ahead_on_seeds(cell: Dict[str, Any], labels: Dict[str, Any]) -> List[int]:
    """[seeds where the regime beat labels alone, seeds both ran]: the comparison paired by seed."""
    lab = {r["seed"]: r["accuracy"] for r in labels["runs"]}
    both = [r for r in cell["runs"] if r["seed"] in lab]
    return [sum(r["accuracy"] > lab[r["seed"]] for r in both), len(both)]


def verdict(result: Dict[str, Any]) -> Dict[str, Any]:
    """The issue's expectation for the 3-layer teacher-initialised student, per distillation regime."""
    out = {}
    teacher = result["teacher"]
    arch = result.get("architectures", {}).get("L3-init")
    labels = result["results"].get("L3-init/labels")
    for regime in ("kd", "tinybert"):
        cell = result["results"].get(f"L3-init/{regime}")
        if not cell or not labels or not arch:
            continue
        acc, lab = cell["accuracy"], labels["accuracy"]
        spread = acc["std"] + lab["std"]
        out[regime] = {
            "accuracy_kept": acc["mean"] / teacher["accuracy"],
            "keeps_97_percent": acc["mean"] >= 0.97 * teacher["accuracy"],
            "speedup_b1": teacher["latency_ms_b1"] / arch["latency_ms_b1"],
            "at_least_2x_faster": teacher["latency_ms_b1"] >= 2 * arch["latency_ms_b1"],
            "gain_over_labels": acc["mean"] - lab["mean"], "seed_spread": spread,
            "beats_labels_beyond_spread": acc["mean"] - lab["mean"] > spread, "seeds": len(cell["seeds"]),
            "ahead_on_seeds": ahead_on_seeds(cell, labels),
        }
    return out


# ----------------------------------------------------------------------------- report

def pct(cell: Dict[str, Any], key: str) -> str:
    return f"{100 * cell[key]['mean']:.2f} ± {100 * cell[key]['std']:.2f}"


def table(result: Dict[str, Any]) -> str:
    t = result["teacher"]
    lines = [f"Teacher MiniLM-L6 fine-tuned: test accuracy {100 * t['accuracy']:.2f}%, macro-F1 "
             f"{100 * t['macro_f1']:.2f}%, {t['parameters']:,} params, {t['bytes']:,} bytes, "
             f"{t.get('latency_ms_b1', float('nan')):.1f} ms at batch 1 ({result.get('latency_seq_len')} tokens)",
             "",
             "| student | regime | seeds | accuracy (%) | macro-F1 (%) | of teacher acc. | params | bytes | "
             "latency b1 (ms) | speed-up | train s/run |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, cell in result["results"].items():
        student, regime = key.split("/")
        arch = result.get("architectures", {}).get(student, {})
        lat = arch.get("latency_ms_b1")
        speed = f"{t['latency_ms_b1'] / lat:.2f}x" if lat and "latency_ms_b1" in t else "-"
        lines.append(f"| {student} | {regime} | {len(cell['seeds'])} | {pct(cell, 'accuracy')} | "
                     f"{pct(cell, 'macro_f1')} | {100 * cell['accuracy']['mean'] / t['accuracy']:.1f}% | "
                     f"{arch.get('parameters', 0):,} | {arch.get('bytes', 0):,} | "
                     f"{lat if lat is None else round(lat, 1)} | {speed} | {cell['seconds']['mean']:.0f} |")
    lc = result.get("loop_cost")
    if lc is None and LOOP_RESULT.exists() and result["settings"].get("labelled_fraction", 1.0) == 1.0:
        lc = json.loads(LOOP_RESULT.read_text())["loop_cost"]
    if lc:
        lines += ["", f"Loop cost (L3-init, kd from cached logits, {lc['samples']} texts, {lc['repeats']} interleaved "
                  f"repeats, median): kdkit {lc['kdkit_median']:.2f} s/epoch, hand-written HF loop "
                  f"{lc['hand_median']:.2f} s/epoch, ratio {lc['ratio']:.3f} "
                  f"(whole distill call {lc['ratio_call']:.3f})"]
    if result.get("cut"):
        lines += ["", "Cut to fit the budget: " + "; ".join(result["cut"])]
    for regime, v in result.get("verdict", {}).items():
        lines.append(f"Verdict L3-init {regime}: keeps {100 * v['accuracy_kept']:.1f}% of the teacher's accuracy "
                     f"(>= 97%: {v['keeps_97_percent']}), {v['speedup_b1']:.2f}x faster at batch 1 (>= 2x: "
                     f"{v['at_least_2x_faster']}), {100 * v['gain_over_labels']:+.2f} points over labels-only vs a "
                     f"seed spread of {100 * v['seed_spread']:.2f} (beyond: {v['beats_labels_beyond_spread']}; "
                     f"ahead on {v['ahead_on_seeds'][0]} of {v['ahead_on_seeds'][1]} seeds)")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--per-topic", type=int, default=625, help="quotations kept per topic (the first ones)")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--teacher-epochs", type=int, default=3)
    p.add_argument("--teacher-lr", type=float, default=1e-4)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr-init", type=float, default=1e-4)
    p.add_argument("--lr-rand", type=float, default=3e-4)
    p.add_argument("--lr-boe", type=float, default=3e-3)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--beta", type=float, default=None,
                   help="tinybert: weight of hidden MSE + attention KL (default: the method's own, 0.1)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--labelled-fraction", type=float, default=1.0,
                   help="keep labels for this class-stratified share of the training texts: the teacher and the "
                        "labels-only students train on it, distilled students on all training texts (the rest "
                        "unlabelled); results go to text_classification_labelled<percent>.json")
    p.add_argument("--loop-samples", type=int, default=96)
    p.add_argument("--loop-repeats", type=int, default=3)
    p.add_argument("--latency-rounds", type=int, default=20)
    p.add_argument("--regimes", nargs="+", choices=list(REGIMES), help="run only these regimes")
    p.add_argument("--students", nargs="+", choices=list(STUDENTS), help="run only these students")
    p.add_argument("--resume", action="store_true",
                   help="keep the runs of an existing result file with the same settings and add the missing ones")
    p.add_argument("--budget-min", type=float, default=30.0, help="stop starting new runs after this many minutes")
    p.add_argument("--quick", action="store_true", help="a tiny smoke run (results not for the README)")
    p.add_argument("--loop-only", action="store_true",
                   help=f"only the loop cost (the teacher must be cached), written to {LOOP_RESULT.name}")
    p.add_argument("--latency-only", action="store_true",
                   help="measure the batch-1 latencies of the existing result again and rewrite them")
    p.add_argument("--table", help="reprint the table of a result JSON and exit")
    args = p.parse_args(argv)
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return 0
    global OUT, RESULT
    if not 0.0 < args.labelled_fraction <= 1.0:
        print(f"error: --labelled-fraction must be in (0, 1]; given {args.labelled_fraction}", file=sys.stderr)
        return 2
    if args.labelled_fraction < 1.0:
        tag = f"labelled{round(100 * args.labelled_fraction)}"
        OUT, RESULT = OUT.with_name(f"text_classification_{tag}"), RESULT.with_name(f"text_classification_{tag}.json")
    if args.quick:
        args.per_topic, args.teacher_epochs, args.epochs, args.seeds = 12, 1, 1, [0, 1]
        args.loop_samples, args.loop_repeats, args.latency_rounds = 32, 1, 3
        OUT, RESULT = OUT.with_name("text_classification_quick"), OUT.with_name("text_classification_quick.json")
    try:
        kdkit.hf.require_hf()
        if args.loop_only:
            return loop_only(args)
        if args.latency_only:
            return latency_only(args)
        result = run_all(args)
    except kdkit.KdkitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print()
    print(table(result))
    print(f"\nwrote {RESULT} ({result['wall_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
