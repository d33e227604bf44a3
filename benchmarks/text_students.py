"""Benchmark: text students that are really smaller and faster than MiniLM-L6, in fp32 and int8 ONNX.

    python benchmarks/text_students.py                 # about 100 minutes of training jobs once the teacher is cached
    python benchmarks/text_students.py --table benchmarks/results/text_students.json

1. Data: the fortunes topics of ``text_classification.py`` (six topics, 625 quotations each, 65 % training / 35 %
   test, 64 tokens) and a **transfer set**: every other Debian fortune (the same topics' later quotations and all
   other topic files), unlabelled, with exact duplicates of the labelled texts removed.
2. Teacher: ``text_classification.py``'s fine-tuned MiniLM-L6 (cached in its output folder, trained there once).
3. Students, every one initialised from the teacher and with its vocabulary trimmed to the tokens of the texts it
   trains on (:func:`kdkit.hf.slim.trim_vocabulary`):
   ``L2-384`` (layers 0 and 3 of the teacher, full width), ``L2-192`` and ``L3-192`` (those layers, then the 192
   most active hidden dimensions, 6 of 12 heads and 768 of 1,536 feed-forward units: :func:`kdkit.hf.slim.
   prune_width`), ``L2-128`` (4 heads, 512 units).
4. Regimes: ``labels`` (labels only, the training split), ``kd`` (logits KD on the training split),
   ``kd+transfer`` (logits KD on the training split and the transfer set: labels where there are labels, the
   teacher's outputs everywhere), ``minilm`` (MiniLM's last-layer attention and value relations with logits KD,
   six relation heads, training split), ``labels-long`` (labels only, as many epochs as ``kd+transfer`` makes
   steps, to tell a longer run from the teacher's knowledge) and ``textbrewer`` (the peer's BasicDistiller with
   the same KD loss on the training split, untrimmed student: it feeds ids to the model itself).
5. Every trained student is exported to ONNX in fp32 and int8 (onnxruntime dynamic quantisation) by kdkit's export
   code, and each file's accuracy is measured on the whole test split.
6. Latency: the teacher (fp32 and int8) and every student (fp32 and int8, seed 0 of ``kd+transfer``) in
   onnxruntime, and teacher and students in PyTorch, one thread, timed interleaved in one process at the test
   texts' median and 95th-percentile real length, batch 1 and 32; the speed-up of a student is the median over
   rounds of (teacher time / student time) in the same round. The machine's load average is recorded.

Jobs run in priority order under ``--budget-min``; what does not fit is cut and listed (in the JSON too).
Finished jobs are kept in ``benchmarks/out/text_students/jobs/`` and reused by a rerun with the same settings.
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
from typing import Any, Dict, List, Optional

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kdkit  # noqa: E402
import text_classification as tc  # noqa: E402
from kdkit import ArrayData  # noqa: E402
from kdkit.data.text import FORTUNES_ROOT, fortune_topics, read_fortune_file  # noqa: E402
from kdkit.evaluation.metrics import length_profile, text_latency_input  # noqa: E402
from kdkit.hf.slim import prune_width, trim_vocabulary  # noqa: E402

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "out" / "text_students"
RESULT = ROOT / "results" / "text_students.json"
PLOT = ROOT / "results" / "text_students.png"

STUDENTS = {  # name -> (teacher layers kept, hidden width or None for the teacher's, description)
    "L2-384": ([0, 3], None, "layers 0 and 3 of the teacher, full width 384"),
    "L3-192": ([0, 2, 4], 192, "layers 0, 2, 4; width pruned to 192 (6 heads, 768 units)"),
    "L2-192": ([0, 3], 192, "layers 0 and 3; width pruned to 192 (6 heads, 768 units)"),
    "L2-128": ([0, 3], 128, "layers 0 and 3; width pruned to 128 (4 heads, 512 units)"),
}
REGIMES = {
    "labels": "labels only, training split",
    "kd": "logits KD, training split",
    "kd+transfer": "logits KD, training split + unlabelled transfer set",
    "kd+transfer-long": "the same, twice the epochs",
    "minilm": "MiniLM last-layer attention + value relations (6 relation heads) + logits KD, training split",
    "labels-long": "labels only, training split, as many steps as kd+transfer",
    "textbrewer": "TextBrewer BasicDistiller, same KD loss, training split (untrimmed student)",
    "kd-untrimmed": "logits KD, training split, the student's vocabulary not trimmed (what textbrewer's student is)",
}


def log(msg: str) -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------- data

def transfer_texts(labelled: set, per_topic: int) -> List[str]:
    """Every Debian fortune that is not one of the labelled texts: the benchmark topics' quotations after the
    first ``per_topic`` and every other topic file, in file order, exact duplicates removed."""
    seen, texts = set(labelled), []
    for name, _ in fortune_topics():
        quotes = read_fortune_file(Path(FORTUNES_ROOT) / name)
        for q in quotes[per_topic:] if name in tc.TOPICS else quotes:
            if q not in seen:
                seen.add(q)
                texts.append(q)
    return texts


def load_data(args):
    splits = tc.load_data(args)
    texts = []
    for name in tc.TOPICS:
        texts += read_fortune_file(Path(FORTUNES_ROOT) / name)[:args.per_topic]
    extra = transfer_texts(set(texts), args.per_topic)[:args.transfer_limit]
    unl = kdkit.hf.tokenize(extra, [-1] * len(extra), "minilm", args.max_length,
                            cache_dir=str(ROOT / "out" / "text_classification" / "tokens"), log=lambda _m: None)
    train = splits.train
    splits.transfer = ArrayData(torch.cat([train.x, unl.x]), torch.cat([train.y, unl.y]),
                                pad_token_id=train.pad_token_id, bucket_by_length=True)
    splits.unlabelled = len(extra)
    return splits


# ----------------------------------------------------------------------------- students

def make_student(name: str, teacher, corpus: torch.Tensor, trim: bool = True):
    layers, hidden, _ = STUDENTS[name]
    student = kdkit.hf.shrink(teacher, layers=layers)
    if hidden is not None:
        student = prune_width(student, corpus[:512], hidden=hidden)
    return trim_vocabulary(student, corpus) if trim else student


def regime_epochs(regime: str, splits, args) -> int:
    if regime == "labels-long":  # the steps of kd+transfer, in epochs of the training split
        return round(args.epochs * len(splits.transfer) / len(splits.train))
    return 2 * args.epochs if regime.endswith("-long") else args.epochs


def train_job(student_name: str, regime: str, seed: int, teacher, splits, args):
    data = splits.transfer if regime.startswith("kd+transfer") else splits.train
    torch.manual_seed(seed)
    student = make_student(student_name, teacher, data.x, trim=regime not in ("textbrewer", "kd-untrimmed"))
    hidden = STUDENTS[student_name][1]
    lr = args.lr_pruned if hidden else args.lr_full
    common = dict(epochs=regime_epochs(regime, splits, args), lr=lr, batch_size=args.batch_size,
                  optimizer="adamw", weight_decay=0.01, seed=seed, device="cpu", threads=1, progress=False,
                  quiet=True)
    t0 = time.perf_counter()
    if regime in ("labels", "labels-long"):
        run = kdkit.train(student, data, **common)
        student = run.student
    elif regime == "textbrewer":
        import peer_text

        ns = argparse.Namespace(seed=seed, batch_size=args.batch_size, temperature=args.temperature,
                                alpha=args.alpha, lr=lr, epochs=args.epochs)
        student = peer_text.run_textbrewer(teacher, student, data, cached=True, args=ns)["student"]
    else:  # kd, kd-untrimmed, kd+transfer(-long), minilm
        options = dict(temperature=args.temperature, alpha=args.alpha)
        if regime == "minilm":
            options.update(relation_heads=6)
        else:
            options.update(teacher_cache="disk", cache_dir=str(OUT / "teacher_logits"))
        run = kdkit.distill(teacher, student, data, method="minilm" if regime == "minilm" else "kd", **common,
                            **options)
        student = run.student
    return student.eval(), time.perf_counter() - t0


def export_pair(student, splits, folder: Path) -> Dict[str, Any]:
    """fp32 and int8 ONNX files of a student, with kdkit's export code; each file's test accuracy."""
    from kdkit.data.core import trim_to_longest
    from kdkit.export.core import export_model
    from kdkit.export.text import check_split_accuracy

    folder.mkdir(parents=True, exist_ok=True)
    inputs = trim_to_longest(splits.test.x[:64], splits.test.pad_token_id)
    out = {}
    for kind in ("fp32", "int8"):
        path = folder / f"{kind}.onnx"
        if path.exists():
            path.unlink()
        rec = export_model(student, inputs, path, int8=kind == "int8", timing=False)
        acc = check_split_accuracy(student, path, splits.test, kind == "int8", 100.0, True)
        out[kind] = {"bytes": rec["bytes"], "accuracy": acc["accuracy_file"], "agreement": acc["prediction_agreement"]}
    out["pytorch_accuracy"] = acc["accuracy_pytorch"]
    return out


# ----------------------------------------------------------------------------- latency

def time_models(models: Dict[str, Any], example: torch.Tensor, batch: int, rounds: int) -> Dict[str, List[float]]:
    """Per-round milliseconds of each model (callables of an (B, L) int64 tensor), interleaved, after warm-up."""
    x = example.unsqueeze(0).expand(batch, -1).contiguous()
    for fn in models.values():
        for _ in range(3):
            fn(x)
    times: Dict[str, List[float]] = {k: [] for k in models}
    for r in range(rounds):
        names = list(models) if r % 2 == 0 else list(models)[::-1]  # alternate the order between rounds
        for name in names:
            t0 = time.perf_counter()
            models[name](x)
            times[name].append(1000 * (time.perf_counter() - t0))
    return times


def ort_callable(path: Path):
    from kdkit.export.core import onnx_session

    sess = onnx_session(path, threads=1)
    return lambda x: sess.run(None, {"input": x.numpy()})


def torch_callable(model):
    model = model.eval()

    @torch.inference_mode()
    def call(x):
        return model(x)
    return call


def latency(teacher, students: Dict[str, Any], files: Dict[str, Path], splits, rounds: int) -> Dict[str, Any]:
    """Median ms and median paired speed-ups (teacher / student per round), onnxruntime and PyTorch."""
    torch.set_num_threads(1)
    pad = splits.test.pad_token_id
    lengths = length_profile(splits.test.x, pad)
    ort_models = {name: ort_callable(p) for name, p in files.items()}
    pt_models = {"teacher": torch_callable(teacher), **{k: torch_callable(m) for k, m in students.items()}}
    out: Dict[str, Any] = {"lengths": lengths, "rounds": rounds, "load_average_before": list(os.getloadavg())}
    for runtime, models, ref in (("onnxruntime", ort_models, "teacher fp32"), ("pytorch", pt_models, "teacher")):
        for key, n in lengths.items():
            example = text_latency_input(splits.test.x[0], pad, n)
            for batch in (1, 32):
                times = time_models(models, example, batch, rounds)
                cell = {"ms": {k: statistics.median(v) for k, v in times.items()},
                        "speedup": {k: statistics.median(t / s for t, s in zip(times[ref], v))
                                    for k, v in times.items() if k != ref}}
                if runtime == "onnxruntime":  # against the int8 teacher as well
                    cell["speedup_vs_int8_teacher"] = {
                        k: statistics.median(t / s for t, s in zip(times["teacher int8"], v))
                        for k, v in times.items() if not k.startswith("teacher")}
                out[f"{runtime} {key} b{batch}"] = cell
                log(f"  latency {runtime} {key} ({n} tokens) b{batch}: " + ", ".join(
                    f"{k} {v:.2f} ms" for k, v in cell["ms"].items()))
    out["load_average_after"] = list(os.getloadavg())
    return out


# ----------------------------------------------------------------------------- the run

def jobs(args) -> List[tuple]:
    """(student, regime, seed) in priority order: the ship candidates (L2-192, L3-192) from labels and with the
    transfer set, then the other regimes on L2-192, then the smallest and the largest students."""
    order = []
    for s in ("L2-192", "L3-192"):
        for seed in args.seeds:
            for r in ("labels", "kd+transfer"):
                order.append((s, r, seed))
    for seed in args.seeds:
        order.append(("L3-192", "kd+transfer-long", seed))
    for seed in args.seeds:
        for r in ("kd", "minilm", "textbrewer", "labels-long", "kd-untrimmed"):
            order.append(("L2-192", r, seed))
    for s in ("L2-128", "L2-384"):
        for seed in args.seeds:
            for r in ("labels", "kd+transfer"):
                order.append((s, r, seed))
    if args.regimes:
        order = [j for j in order if j[1] in args.regimes]
    return order


def settings_of(args) -> Dict[str, Any]:
    keys = ("per_topic", "max_length", "teacher_epochs", "teacher_lr", "epochs", "batch_size", "lr_full",
            "lr_pruned", "temperature", "alpha", "transfer_limit")
    return {k: getattr(args, k) for k in keys}


def job_key(job) -> str:
    student_name, regime, seed = job
    return f"{student_name}_{regime}_{seed}".replace("+", "-")


def cached_job(job, args) -> Optional[Dict[str, Any]]:
    """A finished job of the same settings, from ``OUT/jobs`` (None: not run yet)."""
    path = OUT / "jobs" / f"{job_key(job)}.json"
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("settings") == settings_of(args):
            return saved
    return None


def run_job(job, teacher, splits, args) -> Optional[Dict[str, Any]]:
    student_name, regime, seed = job
    key = job_key(job)
    path = OUT / "jobs" / f"{key}.json"
    if regime == "textbrewer":
        try:
            import textbrewer  # noqa: F401
        except ImportError:
            log("  textbrewer is not installed (pip install textbrewer): its runs are cut")
            return None
    student, seconds = train_job(student_name, regime, seed, teacher, splits, args)
    files = export_pair(student, splits, OUT / "onnx" / key)
    result = {"settings": settings_of(args), "student": student_name, "regime": regime, "seed": seed,
              "train_seconds": seconds, "parameters": sum(p.numel() for p in student.parameters()), **files}
    if seed == args.seeds[0] and regime == "kd+transfer":  # for the PyTorch latency
        from kdkit.training.checkpoint import save_weights

        save_weights(student, OUT / "onnx" / key / "student.safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    log(f"  {student_name:7s} {regime:12s} seed {seed}: accuracy fp32 {100 * files['fp32']['accuracy']:.2f}%, int8 "
        f"{100 * files['int8']['accuracy']:.2f}% ({seconds:.0f} s, {files['int8']['bytes'] / 1e6:.1f} MB int8)")
    return result


def teacher_files(teacher, splits) -> Dict[str, Any]:
    """The teacher's own fp32 and int8 ONNX files (untrimmed) and their test accuracy."""
    folder = OUT / "onnx" / "teacher"
    record = folder / "record.json"
    if record.exists():
        return json.loads(record.read_text())
    out = export_pair(teacher, splits, folder)
    record.write_text(json.dumps(out, indent=1))
    return out


def summarise(results: List[Dict[str, Any]]) -> Dict[str, Any]:
    groups: Dict[str, List[Dict[str, Any]]] = {}
    for r in results:
        groups.setdefault(f"{r['student']}/{r['regime']}", []).append(r)
    table = {}
    for key, runs in groups.items():
        runs = sorted(runs, key=lambda r: r["seed"])
        row: Dict[str, Any] = {"seeds": [r["seed"] for r in runs], "parameters": runs[0]["parameters"],
                               "train_seconds": statistics.median(r["train_seconds"] for r in runs)}
        for kind in ("fp32", "int8"):
            accs = [r[kind]["accuracy"] for r in runs]
            row[kind] = {"accuracy": statistics.mean(accs), "std": statistics.pstdev(accs), "runs": accs,
                         "bytes": runs[0][kind]["bytes"]}
        row["int8_drop_points"] = 100 * (row["fp32"]["accuracy"] - row["int8"]["accuracy"])
        table[key] = row
    return table


def verdict(table, teacher_rec, lat) -> Dict[str, Any]:
    """The ship candidate: the int8 student of the best mean accuracy among those at least 8x faster and 10x
    smaller than the fp32 teacher (else the most accurate int8 student), and what it meets."""
    t_acc, t_bytes, t_int8_bytes = teacher_rec["fp32"]["accuracy"], teacher_rec["fp32"]["bytes"], \
        teacher_rec["int8"]["bytes"]
    cell = lat.get("onnxruntime median b1", {})
    rows = []
    for key, row in table.items():
        name, regime = key.split("/")
        speed = cell.get("speedup", {}).get(f"{name} int8")
        rows.append({"key": key, "student": name, "regime": regime, "accuracy": row["int8"]["accuracy"],
                     "accuracy_kept": row["int8"]["accuracy"] / t_acc, "speedup": speed,
                     "speedup_vs_int8": cell.get("speedup_vs_int8_teacher", {}).get(f"{name} int8"),
                     "size_ratio": t_bytes / row["int8"]["bytes"], "size_vs_int8": t_int8_bytes / row["int8"]["bytes"],
                     "int8_drop": row["int8_drop_points"], "seeds": len(row["seeds"])})
    fast = [r for r in rows if r["speedup"] and r["speedup"] >= 8 and r["size_ratio"] >= 10]
    ship = max(fast or rows, key=lambda r: r["accuracy"])
    beats = {}
    for name in STUDENTS:
        lab = table.get(f"{name}/labels")
        for regime in ("kd+transfer", "kd+transfer-long", "kd", "minilm"):
            kd = table.get(f"{name}/{regime}")
            if lab and kd:
                gain = kd["fp32"]["accuracy"] - lab["fp32"]["accuracy"]
                spread = max(kd["fp32"]["std"], lab["fp32"]["std"], max(kd["fp32"]["runs"]) - min(kd["fp32"]["runs"]),
                             max(lab["fp32"]["runs"]) - min(lab["fp32"]["runs"]))
                beats[f"{name}/{regime}"] = {"gain_points": 100 * gain, "spread_points": 100 * spread,
                                             "beyond_spread": gain > spread}
    return {"ship": {"student": ship["key"] + " int8", "accuracy_kept": ship["accuracy_kept"],
                     "speedup_ort_b1_median_len": ship["speedup"], "size_ratio_onnx": ship["size_ratio"],
                     "speedup_vs_int8_teacher": ship["speedup_vs_int8"], "size_vs_int8_teacher": ship["size_vs_int8"],
                     "int8_accuracy_drop_points": ship["int8_drop"],
                     "beats_labels_beyond_spread": any(v["beyond_spread"] for v in beats.values()),
                     "seeds": ship["seeds"],
                     "goals": {"accuracy_kept_97": ship["accuracy_kept"] >= 0.97,
                               "faster_8x": bool(ship["speedup"] and ship["speedup"] >= 8),
                               "smaller_10x": ship["size_ratio"] >= 10,
                               "faster_2x_vs_int8_teacher": bool(ship["speedup_vs_int8"]
                                                                 and ship["speedup_vs_int8"] >= 2),
                               "smaller_2_5x_vs_int8_teacher": ship["size_vs_int8"] >= 2.5,
                               "int8_within_half_point": abs(ship["int8_drop"]) <= 0.5}},
            "kd_vs_labels": beats, "candidates": rows}


def plot(result: Dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cell = result["latency"].get("onnxruntime median b1", {}).get("ms", {})
    fig, ax = plt.subplots(figsize=(8, 5.5))
    t = result["teacher"]
    markers = {"labels": "o", "kd": "s", "kd-untrimmed": "X", "kd+transfer": "D", "kd+transfer-long": "d",
               "minilm": "^", "labels-long": "v", "textbrewer": "P"}
    colors = dict(zip(STUDENTS, ["tab:blue", "tab:orange", "tab:green", "tab:purple"]))
    for kind, face in (("fp32", "k"), ("int8", "none")):
        ms = cell.get(f"teacher {kind}")
        if ms:
            ax.scatter(ms, 100 * t[kind]["accuracy"], marker="*", s=220, edgecolors="k", facecolors=face,
                       label=f"teacher MiniLM-L6 {kind}")
    for key, row in result["table"].items():
        name, regime = key.split("/")
        for kind in ("fp32", "int8"):
            ms = cell.get(f"{name} {kind}")
            if ms is None:
                continue
            ax.scatter(ms, 100 * row[kind]["accuracy"], marker=markers[regime], s=60, edgecolors=colors[name],
                       facecolors=colors[name] if kind == "fp32" else "none", linewidths=1.5)
    for name, c in colors.items():
        ax.scatter([], [], color=c, label=name)
    for regime, m in markers.items():
        ax.scatter([], [], marker=m, color="gray", label=regime)
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter, LogLocator

    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _pos: ""))
    ax.set_xlabel("onnxruntime latency, batch 1, median test length, one thread (ms, log scale)", fontsize=11)
    ax.set_ylabel("test accuracy (%), mean of seeds", fontsize=11)
    ax.set_title("Fortunes topics: accuracy against latency (filled: fp32, hollow: int8)", fontsize=12)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=9, loc="lower right", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_table(result: Dict[str, Any]) -> str:
    t = result["teacher"]
    lat = result["latency"]
    cell = lat.get("onnxruntime median b1", {})
    lines = [f"Teacher MiniLM-L6: fp32 {100 * t['fp32']['accuracy']:.2f}% ({t['fp32']['bytes'] / 1e6:.1f} MB), "
             f"int8 {100 * t['int8']['accuracy']:.2f}% ({t['int8']['bytes'] / 1e6:.1f} MB); test lengths "
             f"{lat.get('lengths')}", "",
             f"{'student/regime':24s} {'seeds':>5s} {'fp32 acc':>14s} {'int8 acc':>14s} {'int8 MB':>8s} "
             f"{'x fp32 T':>8s} {'x int8 T':>8s}"]
    for key, row in result["table"].items():
        name = key.split("/")[0]
        sp = cell.get("speedup", {}).get(f"{name} int8")
        sp8 = cell.get("speedup_vs_int8_teacher", {}).get(f"{name} int8")
        lines.append(f"{key:24s} {len(row['seeds']):5d} {100 * row['fp32']['accuracy']:7.2f} ± "
                     f"{100 * row['fp32']['std']:4.2f} {100 * row['int8']['accuracy']:7.2f} ± "
                     f"{100 * row['int8']['std']:4.2f} {row['int8']['bytes'] / 1e6:8.2f} "
                     f"{sp if sp is None else f'{sp:8.2f}'} {sp8 if sp8 is None else f'{sp8:8.2f}'}")
    lines += ["", "Latency (median ms; speed-up = median of per-round teacher/student ratios):"]
    for k, v in lat.items():
        if isinstance(v, dict) and "ms" in v:
            lines.append(f"  {k}: " + ", ".join(f"{n} {ms:.2f}" for n, ms in v["ms"].items()))
    ship = result["verdict"]["ship"]
    lines += ["", "verdict.ship: " + json.dumps({k: (round(v, 3) if isinstance(v, float) else v)
                                               for k, v in ship.items()})]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--per-topic", type=int, default=625)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--teacher-epochs", type=int, default=3)
    p.add_argument("--teacher-lr", type=float, default=1e-4)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr-full", type=float, default=1e-4)
    p.add_argument("--lr-pruned", type=float, default=3e-4)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--budget-min", type=float, default=85.0)
    p.add_argument("--transfer-limit", type=int, default=None, help="use at most this many transfer texts")
    p.add_argument("--regimes", nargs="+", default=None, help="run only the jobs of these regimes")
    p.add_argument("--jobs-only", action="store_true",
                   help="train and export the jobs, then stop (no latency, no results file): a second process")
    p.add_argument("--quick", action="store_true", help="a smoke run: tiny data, one seed, one epoch, own folders")
    p.add_argument("--table", type=Path, default=None, help="print the table of a results JSON and exit")
    p.add_argument("--plot", type=Path, default=None, help="redraw the plot of a results JSON (next to it) and exit")
    args = p.parse_args(argv)
    global OUT, RESULT, PLOT
    if args.quick:
        args.per_topic, args.seeds, args.epochs, args.teacher_epochs, args.rounds = 40, [0], 1, 1, 5
        args.transfer_limit = 300
        OUT, RESULT, PLOT = (OUT.with_name("text_students_quick"), RESULT.with_name("text_students_quick.json"),
                             PLOT.with_name("text_students_quick.png"))
        tc.OUT = tc.OUT.with_name("text_classification_quick")
    if args.table:
        print(format_table(json.loads(args.table.read_text())))
        return 0
    if args.plot:
        plot(json.loads(args.plot.read_text()), args.plot.with_suffix(".png"))
        return 0
    torch.set_num_threads(1)
    start = time.perf_counter()
    args.labelled_fraction = 1.0
    splits = load_data(args)
    log(f"data: {len(splits.train)} labelled training texts, {splits.unlabelled} unlabelled transfer texts, "
        f"{len(splits.test)} test texts")
    teacher = tc.get_teacher(splits, args)["model"].eval()
    t_rec = teacher_files(teacher, splits)
    log(f"teacher: fp32 {100 * t_rec['fp32']['accuracy']:.2f}%, int8 {100 * t_rec['int8']['accuracy']:.2f}%")
    results, cut = [], []
    for job in jobs(args):
        r = cached_job(job, args)  # finished jobs are read back whatever the budget
        if r is not None:
            results.append(r)
            continue
        if (time.perf_counter() - start) / 60 > args.budget_min:
            cut.append(" ".join(map(str, job)))
            continue
        r = run_job(job, teacher, splits, args)
        if r is None:
            cut.append(" ".join(map(str, job)))
        else:
            results.append(r)
    if args.jobs_only:
        log(f"jobs done: {len(results)}; cut: {cut}")
        return 0
    table = summarise(results)
    from kdkit.training.checkpoint import load_weights

    students, files = {}, {"teacher fp32": OUT / "onnx" / "teacher" / "fp32.onnx",
                           "teacher int8": OUT / "onnx" / "teacher" / "int8.onnx"}
    for name in STUDENTS:
        key = f"{name}_kd-transfer_{args.seeds[0]}"
        if (OUT / "onnx" / key / "student.safetensors").exists():
            m = make_student(name, teacher, splits.transfer.x)
            students[name] = load_weights(m, OUT / "onnx" / key / "student.safetensors").eval()
            files[f"{name} fp32"], files[f"{name} int8"] = (OUT / "onnx" / key / f"{k}.onnx" for k in ("fp32", "int8"))
    log("latency: teacher and students interleaved, one thread")
    lat = latency(teacher, students, files, splits, args.rounds)
    result = {"settings": settings_of(args), "seeds": args.seeds, "topics": tc.TOPICS,
              "data": {"train": len(splits.train), "transfer_unlabelled": splits.unlabelled, "test": len(splits.test)},
              "machine": {"python": platform.python_version(), "torch": torch.__version__, "threads": 1,
                          "cpu_count": os.cpu_count()},
              "students": {k: v[2] for k, v in STUDENTS.items()}, "regimes": REGIMES, "teacher": t_rec,
              "table": table, "latency": lat, "cut": cut, "wall_seconds": time.perf_counter() - start}
    result["verdict"] = verdict(table, t_rec, lat)
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=1))
    plot(result, PLOT)
    print(format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
