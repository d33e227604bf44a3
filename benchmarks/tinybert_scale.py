"""Why ``tinybert`` hurt the teacher-initialised student of the text benchmark, and what the new defaults do.

    python benchmarks/tinybert_scale.py                                 # about 12 minutes on one free core
    python benchmarks/tinybert_scale.py --set ablations --seeds 0       # one change at a time, 6 minutes

The setting is the one in which ``benchmarks/text_classification.py`` first ran (issue 10; its helpers build the
data, the teacher and the students): MiniLM-L6 fine-tuned on six fortunes topics (70 quotations per topic), 273
training and 147 test texts of at most 32 tokens, and the 3-layer student
``kdkit.hf.shrink(teacher, layers=[0, 2, 4])`` trained 3 epochs (AdamW lr 1e-4, weight decay 0.01, cosine,
batch 16), KD ``temperature`` 2 and ``alpha`` 0.5 as there, the teacher run live (``teacher_cache: off``). The
teacher is fine-tuned once into ``benchmarks/out/tinybert_scale/`` (never into the text benchmark's folder; copy
its ``teacher.safetensors`` and ``teacher.json`` there to reuse a teacher fine-tuned with the same settings).

1. ``terms``: the teacher's hidden-state magnitudes per layer (mean square, the largest per-dimension mean
   square), then, for the old defaults (``layer_map: uniform``, ``beta`` 1) and the new ones (``auto``: the
   layers the student was copied from, ``beta`` 0.1), every loss term (CE, KD, the hidden MSE and the attention
   KL of each layer pair) and the norm of the gradient it alone puts on the student's shared parameters
   (embeddings and encoder blocks, not the head), on a fixed batch of 32 texts, at the start and after some
   training steps with that method.
2. ``accuracy``: test accuracy of the weights after the last epoch, per configuration and seed.

Results: ``benchmarks/results/tinybert_scale.json`` (``tinybert_scale_ablations.json`` for ``--set ablations``,
which skips part 1) and a table on stdout.
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
import torch.nn.functional as F  # noqa: E402

import kdkit  # noqa: E402
from kdkit.losses import kd_loss  # noqa: E402
from kdkit.losses_text import attention_kl_loss, masked_hidden_mse  # noqa: E402
from kdkit.methods.build import build_method  # noqa: E402
from kdkit.teacher import Teacher  # noqa: E402

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
import text_classification as tc  # noqa: E402  (its data, teacher and students: one setting, not two copies)

RESULTS = {"main": ROOT / "results" / "tinybert_scale.json",
           "ablations": ROOT / "results" / "tinybert_scale_ablations.json"}

OLD = {"layer_map": "uniform", "beta": 1.0}  # tinybert's and hidden_mse's defaults before this change
CONFIGS = {  # name -> (method, options beside temperature/alpha); the main set
    "labels": ("labels", {}),
    "tinybert (old defaults: uniform, beta 1)": ("tinybert", OLD),
    "tinybert (new defaults: auto, beta 0.1)": ("tinybert", {}),
    "hidden_mse (new defaults: auto, beta 0.1)": ("hidden_mse", {}),
}
ABLATIONS = {  # one change at a time
    "kd": ("kd", {}),
    "tinybert uniform, beta 0.1": ("tinybert", {"layer_map": "uniform", "beta": 0.1}),
    "tinybert auto (copied layers), beta 1": ("tinybert", {"layer_map": "auto", "beta": 1.0}),
    "tinybert uniform, beta 1, hidden term only": ("tinybert", {**OLD, "attention_weight": 0.0}),
    "tinybert uniform, beta 1, attention term only": ("tinybert", {**OLD, "hidden_weight": 0.0}),
    "hidden_mse (old defaults: uniform, beta 1)": ("hidden_mse", OLD),
    "attention_kl (new defaults: auto, beta 0.1)": ("attention_kl", {}),
}


def log(msg: str) -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------- 1. term magnitudes and gradients

@torch.no_grad()
def teacher_hidden_stats(teacher, x: torch.Tensor) -> List[Dict[str, Any]]:
    """Per hidden state (embeddings, then each block's output): mean square over real tokens and dimensions,
    and the largest / median per-dimension mean square (outlier dimensions show as a large ratio)."""
    mask = x != teacher.pad_token_id
    out = teacher.hf(input_ids=x, attention_mask=mask.long(), output_hidden_states=True)
    stats = []
    for i, h in enumerate(out.hidden_states):
        per_dim = h[mask].pow(2).mean(0)  # (D,)
        top = per_dim.topk(3)
        stats.append({"state": "embeddings" if i == 0 else f"block {i - 1}", "mean_square": float(per_dim.mean()),
                      "top_dims": top.indices.tolist(), "top_dim_mean_square": top.values.tolist(),
                      "median_dim_mean_square": float(per_dim.median())})
    return stats


def term_values(method, batch) -> Dict[str, torch.Tensor]:
    """Every unweighted term of the combined loss, in the student's graph."""
    o = method.forward_pass(batch)
    terms = {"ce": F.cross_entropy(o.logits, batch["y"]), "kd": kd_loss(o.logits, o.teacher_logits,
                                                                         method.temperature)}
    for s, t in method.hidden_pairs:
        hs, ht = method.hidden_states(o, s, t)
        terms[f"hidden {s}-{t}"] = masked_hidden_mse(method.projection(hs), ht, method.mask(batch, hs, ht))
    heads = (method.s_layout.heads, method.t_layout.heads, method.relation_heads)
    for s, t in method.attention_pairs:
        (sq, sk, _), (tq, tk, _) = method.qkv(o, s, t)
        terms[f"attn {s}-{t}"] = attention_kl_loss(sq, sk, tq, tk, method.mask(batch, sq, tq), *heads)
    return terms


def measure(method, params, batch) -> Dict[str, Dict[str, float]]:
    out = {}
    for name, value in term_values(method, batch).items():
        grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads if g is not None))
        out[name] = {"value": float(value.detach()), "grad_norm": float(norm)}
    return out


def trajectory(teacher, splits, options: Dict[str, Any], args) -> Dict[str, Any]:
    """Train the L3-init student with ``tinybert`` and ``options`` for ``--term-steps`` steps (the benchmark's
    optimiser, constant lr), measuring every term on a fixed batch at the listed steps."""
    torch.manual_seed(0)
    student = tc.make_student("L3-init", teacher, splits, 0)
    method = build_method("tinybert", student, Teacher(teacher),
                          {"temperature": args.temperature, "alpha": args.alpha, **options}, train_data=splits.train)
    params = [p for n, p in student.named_parameters() if ".encoder." in n or ".embeddings." in n]
    x, y = splits.train.x, splits.train.y
    probe = torch.randperm(len(x), generator=torch.Generator().manual_seed(123))[:32]
    probe_batch = {"x": x[probe], "y": y[probe], "index": probe}
    opt = torch.optim.AdamW(method.parameters(), lr=args.lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(0)
    points, step = {}, 0
    checkpoints = sorted(set(args.term_steps))
    method.train()
    while True:
        if step in checkpoints:
            method.eval()
            points[str(step)] = measure(method, params, probe_batch)
            method.train()
            log(f"  step {step:3d}: " + ", ".join(f"{k} {v['value']:.3f} (|g| {v['grad_norm']:.3f})"
                                                    for k, v in points[str(step)].items()))
        if step >= checkpoints[-1]:
            break
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), args.batch_size):
            idx = order[start:start + args.batch_size]
            loss = method({"x": x[idx], "y": y[idx], "index": idx})["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step in checkpoints:
                break
    return {"options": options, "hidden_pairs": method.hidden_pairs, "attention_pairs": method.attention_pairs,
            "beta": method.beta, "shared_parameters": "student embeddings and encoder blocks", "steps": points}


# ----------------------------------------------------------------------------- 2. accuracy

def train_once(method: str, options: Dict[str, Any], seed: int, teacher, splits, args) -> Dict[str, Any]:
    student = tc.make_student("L3-init", teacher, splits, seed)
    common = dict(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, optimizer="adamw", weight_decay=0.01,
                  seed=seed, device="cpu", threads=1, progress=False, quiet=True)
    t0 = time.perf_counter()
    if method == "labels":
        run = kdkit.train(student, splits.train, **common)
    else:
        run = kdkit.distill(teacher, student, splits.train, method=method, temperature=args.temperature,
                            alpha=args.alpha, teacher_cache="off", **common, **options)
    result = tc.score(run.student, splits.test, splits.num_classes)
    last = run.history[-1]
    result.update(seed=seed, seconds=time.perf_counter() - t0,
                  last_epoch={k: v for k, v in last.items() if k.startswith("train_") and isinstance(v, float)})
    return result


def summarise(runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    acc = [r["accuracy"] for r in runs]
    return {"accuracy_mean": statistics.fmean(acc), "accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
            "seeds": [r["seed"] for r in runs], "runs": runs}


def table(result: Dict[str, Any]) -> str:
    lines = ["| configuration | seeds | test accuracy (%) | vs labels |", "|---|---|---|---|"]
    base = result["accuracy"].get("labels", {}).get("accuracy_mean")
    for name, cell in result["accuracy"].items():
        diff = "" if base is None or name == "labels" else f"{100 * (cell['accuracy_mean'] - base):+.2f}"
        lines.append(f"| {name} | {len(cell['seeds'])} | {100 * cell['accuracy_mean']:.2f} ± "
                     f"{100 * cell['accuracy_std']:.2f} | {diff} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--per-topic", type=int, default=70)
    p.add_argument("--max-length", type=int, default=32)
    p.add_argument("--teacher-epochs", type=int, default=3)
    p.add_argument("--teacher-lr", type=float, default=1e-4)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--term-steps", type=int, nargs="+", default=[0, 17, 34], help="steps at which terms are measured")
    p.add_argument("--set", choices=["main", "ablations"], default="main",
                   help="main: term magnitudes, then labels and the old and new defaults; ablations: one change at a "
                        "time (accuracy only)")
    p.add_argument("--only", nargs="+", help="run only these configuration names (accuracy part)")
    p.add_argument("--skip-terms", action="store_true")
    p.add_argument("--out", help="result JSON (default benchmarks/results/tinybert_scale[_ablations].json)")
    p.add_argument("--table", help="reprint the table of a result JSON and exit")
    args = p.parse_args(argv)
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return 0
    torch.set_num_threads(1)
    start = time.perf_counter()
    splits = tc.load_data(args)
    teacher = tc.get_teacher(splits, args, out=ROOT / "out" / "tinybert_scale")["model"]  # never the text job's
    result: Dict[str, Any] = {
        "settings": {k: v for k, v in vars(args).items() if k not in ("table", "out")},
        "student": "kdkit.hf.shrink(teacher, layers=[0, 2, 4])",
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "threads": 1,
                    "cpu_count": os.cpu_count()},
        "teacher": tc.score(teacher, splits.test, splits.num_classes), "accuracy": {},
    }
    out = Path(args.out or RESULTS[args.set])
    if args.set == "main" and not args.skip_terms:
        result["teacher_hidden"] = teacher_hidden_stats(teacher, splits.train.x[:64])
        result["terms"] = {}
        for name, options in (("old defaults (uniform, beta 1)", OLD), ("new defaults (auto, beta 0.1)", {})):
            log(f"terms, {name}:")
            result["terms"][name] = trajectory(teacher, splits, options, args)
        out.write_text(json.dumps(result, indent=1))
    configs = CONFIGS if args.set == "main" else ABLATIONS
    if args.only:
        configs = {k: v for k, v in configs.items() if k in args.only}
    for name, (method, options) in configs.items():
        runs = []
        for seed in args.seeds:
            r = train_once(method, options, seed, teacher, splits, args)
            log(f"{name} seed {seed}: accuracy {100 * r['accuracy']:.2f}% ({r['seconds']:.0f} s)")
            runs.append(r)
            result["accuracy"][name] = summarise(runs)
            result["wall_seconds"] = time.perf_counter() - start
            out.write_text(json.dumps(result, indent=1))  # partial results survive an interruption
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
