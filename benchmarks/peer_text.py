"""Benchmark: kdkit against TextBrewer on one shared text-distillation job (issue 10's peer comparison).

    python benchmarks/peer_text.py                  # about 15 minutes on one core; --quick: a smoke run
    python benchmarks/peer_text.py --table benchmarks/results/peer_text.json

Needs the ``bench`` extra (``pip install 'kdkit[hf,bench]'``: MiniLM-L6 and TextBrewer 0.2.1).

The shared job (everything built by ``text_classification.py``'s own helpers, imported, not copied):

- Data: ``fortunes_topics``, the same six topics, the first ``--per-topic`` quotations of each, ``--max-length``
  tokens, kdkit's fixed 65 / 35 split. Both tools see the same batches in the same order: a new permutation per
  epoch (:func:`kdkit.data.core.epoch_permutation`, seed = the run's seed), no length buckets, each batch trimmed
  to its longest text (dynamic padding) with the attention mask ``ids != pad``.
- Teacher: MiniLM-L6 fine-tuned with ``kdkit.train`` (cached in ``benchmarks/out/peer_text/``, reused when the
  settings match). Student: ``kdkit.hf.shrink(teacher, layers=[0, 2, 4])`` (embeddings, blocks 0/2/4 and head
  copied), the same initial weights for both tools.
- Loss (Hinton, Vinyals & Dean 2015): ``alpha · T² · KL(p_t^T ‖ p_s^T) + (1 - alpha) · CE(s, y)``, T = 2. kdkit's
  ``kd`` method computes it as written. TextBrewer's ``kd_loss_type='ce'`` is the soft cross-entropy
  ``-Σ p_t^T log p_s^T`` without the T² factor; it equals the KL plus the teacher's entropy, which does not
  depend on the student, so its gradient is the KL's: ``kd_loss_weight = alpha · T²`` and
  ``hard_label_weight = 1 - alpha`` (the student model's own cross-entropy, returned by the adaptor as
  ``losses``) give the same gradients as kdkit's loss. AdamW (weight decay 0.01), the same lr, cosine decay per
  optimiser step to 0 over all steps (kdkit's ``schedule: cosine``; TextBrewer gets the same ``LambdaLR``), batch
  ``--batch-size``, ``--epochs`` epochs, no gradient clipping, one thread.
- Variants, each run in its own process, interleaved (kdkit live, TextBrewer live, kdkit cached, TextBrewer
  cached; the next repeat in reverse order, and so on), ``--repeats`` times with seed = the repeat's number:
  ``kdkit-live`` (``teacher_cache: off``: the teacher runs every step, the same work as TextBrewer's default),
  ``textbrewer-live`` (``BasicDistiller``), ``kdkit-cached`` (``teacher_cache: memory``: the teacher's logits are
  computed once before training) and ``textbrewer-cached`` (``DistillationConfig(is_caching_logits=True)``:
  TextBrewer caches the batches of the first pass with the teacher's logits and replays them, shuffled, each
  epoch; so its batches keep the first epoch's composition, while kdkit's cache is per sample and the batches
  change every epoch).
- Measured: seconds per epoch (each run's mean over the epochs after the first; kdkit: its loop's
  ``epoch_seconds``; TextBrewer: the time between the ends of consecutive epochs), the whole training call, test
  accuracy and macro-F1 of the student after the last epoch (the same scoring code for both), median over repeats,
  and the ratios kdkit / TextBrewer.

The one change to TextBrewer: ``BasicDistiller.save_and_callback`` (it writes the student's ``state_dict`` with
``torch.save`` at the end of every epoch) is overridden in a subclass to record the time instead, because kdkit's
side writes no checkpoint here; nothing else of TextBrewer is replaced. TextBrewer 0.2.1 imports no transformers
code; the models it gets are the ``BertForSequenceClassification`` modules inside kdkit's wrappers, called with
``input_ids``, ``attention_mask`` and ``labels``. torchdistill is not compared here: torchdistill 1.1.5 needs
torchvision, which does not work with this environment's CPU torch build.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kdkit  # noqa: E402
import text_classification as tc  # noqa: E402
from kdkit import ArrayData  # noqa: E402
from kdkit.data.core import epoch_permutation  # noqa: E402
from kdkit.hf.models import trim_to_longest  # noqa: E402

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "out" / "peer_text"
RESULT = ROOT / "results" / "peer_text.json"
VARIANTS = ["kdkit-live", "textbrewer-live", "kdkit-cached", "textbrewer-cached"]
PAIRS = {"live": ("kdkit-live", "textbrewer-live"), "cached": ("kdkit-cached", "textbrewer-cached"),
         "kdkit cached / textbrewer live": ("kdkit-cached", "textbrewer-live")}
STUDENT_LAYERS = "L3-init"  # tc.make_student: kdkit.hf.shrink(teacher, layers=[0, 2, 4])


def log(msg: str) -> None:
    print(msg, flush=True)


def require_textbrewer() -> None:
    if importlib.util.find_spec("textbrewer") is None:
        raise kdkit.KdkitError("benchmarks/peer_text.py needs the package 'textbrewer' (in the 'bench' extra): "
                               "pip install 'kdkit[hf,bench]'")


def cosine(total_steps: int):
    """kdkit's ``schedule: cosine`` with no warm-up, per optimiser step (kdkit.training.loop.lr_factor)."""
    return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(1.0, step / max(1, total_steps))))


# ----------------------------------------------------------------------------- one run (a worker process)

def run_kdkit(teacher, student, train: ArrayData, cached: bool, args) -> Dict[str, Any]:
    t0 = time.perf_counter()
    run = kdkit.distill(teacher, student, train, method="kd", epochs=args.epochs, lr=args.lr,
                        batch_size=args.batch_size, optimizer="adamw", weight_decay=0.01, schedule="cosine",
                        keep="last", seed=args.seed, device="cpu", threads=1, progress=False, quiet=True,
                        temperature=args.temperature, alpha=args.alpha,
                        teacher_cache="memory" if cached else "off")
    call = time.perf_counter() - t0
    return {"tool": "kdkit", "epoch_seconds": [h["epoch_seconds"] for h in run.history],
            "epoch_cpu_seconds": [h["epoch_cpu_seconds"] for h in run.history], "call_seconds": call,
            "student": run.student}


class _EpochOrder(torch.utils.data.Sampler):
    """The sample order kdkit's loader uses (a new seeded permutation per epoch), for TextBrewer's DataLoader."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        order = epoch_permutation(self.n, self.seed, self.epoch)
        self.epoch += 1
        return iter(order.tolist())


def run_textbrewer(teacher, student, train: ArrayData, cached: bool, args) -> Dict[str, Any]:
    from textbrewer import BasicDistiller, DistillationConfig, TrainingConfig

    class TimedDistiller(BasicDistiller):
        """BasicDistiller whose end-of-epoch checkpoint write (torch.save of the student) records the time instead:
        kdkit's side writes no checkpoint in this benchmark."""
        epoch_ends: List[tuple] = []

        def save_and_callback(self, global_step, step, epoch, callback):
            self.epoch_ends.append((time.perf_counter(), time.process_time()))

    pad = student.pad_token_id

    def collate(samples):  # a TextBrewer user's collate: stack, trim to the longest text, mask, labels
        x = trim_to_longest(torch.stack([s[0] for s in samples]), pad)
        return {"input_ids": x, "attention_mask": (x != pad).long(), "labels": torch.stack([s[1] for s in samples])}

    def adaptor(batch, outputs):  # logits for the KD term, the model's own cross-entropy as the hard-label loss
        return {"logits": outputs.logits, "losses": outputs.loss}

    dataset = torch.utils.data.TensorDataset(train.x, train.y)
    order = _EpochOrder(len(train), args.seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, sampler=order, collate_fn=collate)
    t2 = args.temperature ** 2
    d_config = DistillationConfig(temperature=args.temperature, kd_loss_type="ce", kd_loss_weight=args.alpha * t2,
                                  hard_label_weight=1.0 - args.alpha, is_caching_logits=cached)
    with tempfile.TemporaryDirectory() as tmp:  # TrainingConfig creates output_dir; nothing is written to it
        t_config = TrainingConfig(device="cpu", output_dir=tmp, log_dir=None)
        distiller = TimedDistiller(t_config, d_config, model_T=teacher.hf, model_S=student.hf, adaptor_T=adaptor,
                                   adaptor_S=adaptor)
        optimizer = torch.optim.AdamW(student.hf.parameters(), lr=args.lr, weight_decay=0.01)
        torch.manual_seed(args.seed)  # dropout draws
        random.seed(args.seed)  # TextBrewer shuffles its cached batches with `random`
        t0, c0 = time.perf_counter(), time.process_time()
        with distiller:  # teacher eval(), student train() (TextBrewer's documented usage)
            distiller.train(optimizer, loader, num_epochs=args.epochs,
                            scheduler_class=torch.optim.lr_scheduler.LambdaLR,
                            scheduler_args={"lr_lambda": cosine(args.epochs * len(loader))})
        call = time.perf_counter() - t0
    ends = [(t0, c0)] + distiller.epoch_ends
    # The first "epoch" of the cached variant also holds TextBrewer's caching pass (the teacher over every batch).
    return {"tool": "textbrewer", "epoch_seconds": [b[0] - a[0] for a, b in zip(ends, ends[1:])],
            "epoch_cpu_seconds": [b[1] - a[1] for a, b in zip(ends, ends[1:])], "call_seconds": call,
            "student": student}


def worker(args) -> int:
    """One training run in this process; its numbers as JSON at ``args.worker_out``."""
    torch.set_num_threads(1)
    splits = tc.load_data(args)
    t = tc.get_teacher(splits, args, OUT)
    student = tc.make_student(STUDENT_LAYERS, t["model"], splits, args.seed)
    train = ArrayData(splits.train.x, splits.train.y)  # plain order (no buckets): the same batches as TextBrewer's
    tool, mode = args.worker.split("-")
    run = (run_kdkit if tool == "kdkit" else run_textbrewer)(t["model"], student, train, mode == "cached", args)
    result = {k: v for k, v in run.items() if k != "student"}
    result.update(tc.score(run["student"], splits.test, splits.num_classes), variant=args.worker, seed=args.seed,
                  steady_epoch_seconds=statistics.fmean(run["epoch_seconds"][1:] or run["epoch_seconds"]),
                  steady_epoch_cpu_seconds=statistics.fmean(run["epoch_cpu_seconds"][1:] or run["epoch_cpu_seconds"]))
    Path(args.worker_out).write_text(json.dumps(result))
    return 0


# ----------------------------------------------------------------------------- the interleaved plan

SHARED = ("per_topic", "max_length", "teacher_epochs", "teacher_lr", "epochs", "batch_size", "lr", "temperature",
          "alpha")


def spawn(variant: str, seed: int, args) -> Dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run.json"
        cmd = [sys.executable, __file__, "--worker", variant, "--seed", str(seed), "--worker-out", str(out)]
        for key in SHARED:
            cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
        cmd += ["--quick"] if args.quick else []
        env = dict(os.environ, OMP_NUM_THREADS="1")
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not out.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise kdkit.KdkitError(f"{variant} seed {seed} failed (exit {proc.returncode}): {tail[0]}")
        result = json.loads(out.read_text())
    result["process_seconds"] = time.perf_counter() - t0
    result["load_average_after"] = os.getloadavg()
    log(f"  {variant:17s} seed {seed}: {result['steady_epoch_seconds']:.2f} s/epoch "
        f"({result['steady_epoch_cpu_seconds']:.2f} CPU s; epochs "
        f"{', '.join(f'{s:.1f}' for s in result['epoch_seconds'])}), call {result['call_seconds']:.1f} s, accuracy "
        f"{100 * result['accuracy']:.2f}%, macro-F1 {100 * result['macro_f1']:.2f}%")
    return result


def check_loss_mapping(args) -> Dict[str, float]:
    """Both tools' loss on the same random logits and labels: the gradients w.r.t. the student's logits must be
    equal, and the losses must differ by alpha · T² · H(p_t^T) (the teacher's entropy, constant for the student)."""
    from textbrewer.losses import kd_ce_loss

    from kdkit.losses import kd_loss

    g = torch.Generator().manual_seed(0)
    s0, t_logits = 3 * torch.randn(16, 6, generator=g, dtype=torch.float64), 3 * torch.randn(16, 6, generator=g,
                                                                                                dtype=torch.float64)
    y = torch.randint(0, 6, (16,), generator=g)
    T, a = args.temperature, args.alpha
    ce = torch.nn.functional.cross_entropy
    s_k, s_b = s0.clone().requires_grad_(), s0.clone().requires_grad_()
    loss_k = a * kd_loss(s_k, t_logits, T) + (1 - a) * ce(s_k, y)  # kdkit's kd method with every label present
    loss_b = a * T ** 2 * kd_ce_loss(s_b, t_logits, T) + (1 - a) * ce(s_b, y)  # BasicDistiller.compute_loss
    loss_k.backward()
    loss_b.backward()
    p_t = torch.softmax(t_logits / T, 1)
    entropy = -(p_t * p_t.log()).sum(1).mean()
    return {"max_grad_difference": float((s_k.grad - s_b.grad).abs().max()),
            "max_constant_error": abs(float(loss_b.detach() - loss_k.detach()) - a * T ** 2 * float(entropy))}


def medians(runs: List[Dict[str, Any]]) -> Dict[str, float]:
    keys = ("steady_epoch_seconds", "steady_epoch_cpu_seconds", "call_seconds", "accuracy", "macro_f1")
    return {k: statistics.median(r[k] for r in runs) for k in keys}


def run_all(args) -> Dict[str, Any]:
    start = time.perf_counter()
    torch.set_num_threads(1)
    splits = tc.load_data(args)
    t = tc.get_teacher(splits, args, OUT)  # fine-tuned here once, so that the workers only load it
    teacher_scores = tc.score(t["model"], splits.test, splits.num_classes)
    log(f"data: {len(splits.train)} training / {len(splits.test)} test texts; teacher accuracy "
        f"{100 * teacher_scores['accuracy']:.2f}%, macro-F1 {100 * teacher_scores['macro_f1']:.2f}%")
    import textbrewer
    check = check_loss_mapping(args)
    log(f"loss mapping: largest gradient difference {check['max_grad_difference']:.2e}, loss difference - alpha T² "
        f"H(p_t) {check['max_constant_error']:.2e}")
    load_start = os.getloadavg()
    runs: Dict[str, List[Dict[str, Any]]] = {v: [] for v in args.variants}
    for seed in range(args.repeats):
        # ABBA: odd repeats run the variants in reverse order, so that no variant always holds the same position
        for variant in (args.variants if seed % 2 == 0 else args.variants[::-1]):
            runs[variant].append(spawn(variant, seed, args))
    med = {v: medians(r) for v, r in runs.items()}
    ratios = {}
    for name, (k, b) in PAIRS.items():
        if k in med and b in med:
            ratios[name] = {key: med[k][key] / med[b][key]
                            for key in ("steady_epoch_seconds", "steady_epoch_cpu_seconds", "call_seconds")}
    result = {
        "settings": {k: getattr(args, k) for k in SHARED + ("repeats", "variants")},
        "student": "kdkit.hf.shrink(teacher, layers=[0, 2, 4]) (text_classification.py's L3-init)",
        "topics": tc.TOPICS, "data": {"train": len(splits.train), "test": len(splits.test)},
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "textbrewer": textbrewer.__version__, "threads": 1, "cpu_count": os.cpu_count(),
                    "load_average_at_start": load_start, "load_average_at_end": os.getloadavg()},
        "loss_check": check,
        "teacher": {**teacher_scores, "train_seconds": t["train_seconds"], "reused": t["reused"],
                    "cache": str(OUT.relative_to(ROOT.parent))},
        "loss_mapping": {"kdkit": f"kd: temperature {args.temperature}, alpha {args.alpha}",
                         "textbrewer": f"DistillationConfig(temperature={args.temperature}, kd_loss_type='ce', "
                                       f"kd_loss_weight={args.alpha * args.temperature ** 2}, "
                                       f"hard_label_weight={1 - args.alpha})"},
        "patched": ["textbrewer BasicDistiller.save_and_callback overridden in a subclass: records the epoch's end "
                    "time instead of torch.save-ing the student (kdkit writes no checkpoint here)"],
        "cut": ["torchdistill 1.1.5: needs torchvision, which does not work with this environment's CPU torch"],
        "runs": runs, "medians": med, "ratios_kdkit_over_textbrewer": ratios,
    }
    result["wall_seconds"] = time.perf_counter() - start
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=1))
    return result


def table(result: Dict[str, Any]) -> str:
    s, t = result["settings"], result["teacher"]
    lines = [f"{result['data']['train']} training / {result['data']['test']} test texts, {s['epochs']} epochs, batch "
             f"{s['batch_size']}, {s['repeats']} interleaved repeats (median); teacher accuracy "
             f"{100 * t['accuracy']:.2f}%", "",
             "| variant | s/epoch (after the first) | CPU s/epoch | training call (s) | accuracy (%) | macro-F1 (%) |",
             "|---|---|---|---|---|---|"]
    for v, m in result["medians"].items():
        lines.append(f"| {v} | {m['steady_epoch_seconds']:.2f} | {m['steady_epoch_cpu_seconds']:.2f} | "
                     f"{m['call_seconds']:.1f} | {100 * m['accuracy']:.2f} | {100 * m['macro_f1']:.2f} |")
    lines.append("")
    for name, r in result["ratios_kdkit_over_textbrewer"].items():
        lines.append(f"kdkit / TextBrewer, {name}: {r['steady_epoch_seconds']:.3f} per epoch "
                     f"({r['steady_epoch_cpu_seconds']:.3f} in CPU time), {r['call_seconds']:.3f} per training call")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--per-topic", type=int, default=80, help="quotations kept per topic (the first ones)")
    p.add_argument("--max-length", type=int, default=32)
    p.add_argument("--teacher-epochs", type=int, default=3)
    p.add_argument("--teacher-lr", type=float, default=1e-4)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    p.add_argument("--quick", action="store_true", help="a tiny smoke run (results not for the README)")
    p.add_argument("--table", help="reprint the table of a result JSON and exit")
    p.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return 0
    global OUT, RESULT
    if args.quick:
        args.per_topic, args.teacher_epochs, args.epochs, args.repeats = 12, 1, 2, 1
        OUT, RESULT = OUT.with_name("peer_text_quick"), OUT.with_name("peer_text_quick.json")
    try:
        kdkit.hf.require_hf()
        require_textbrewer()
        if args.worker:
            return worker(args)
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
