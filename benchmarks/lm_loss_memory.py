"""Peak memory of the token-level LM distillation loss, chunked vs unchunked, for a 32k vocabulary (CPU).

Each measurement runs in its own process: it builds student and teacher logits (B, L, V) float32 (the student's
requiring a gradient) and labels, notes its resident memory (RSS), runs ``lm_distill_loss`` forward and backward
once, and reports the peak RSS (``ru_maxrss``) above that baseline: the extra memory the loss needs, which
includes the student logits' gradient (one (B, L, V) float32 tensor, produced by any implementation). Runs are
interleaved over modes and repeated; the table shows the median.

    python benchmarks/lm_loss_memory.py            # a few minutes on one quiet core
    python benchmarks/lm_loss_memory.py --quick    # smaller, for a smoke check

Writes benchmarks/results/lm_loss_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "lm_loss_memory.json"


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(tokens: int, vocab: int, chunk: str, divergence: str) -> dict:
    import torch

    from kdkit.lm.losses import lm_distill_loss

    torch.set_num_threads(1)
    torch.manual_seed(0)
    batch = 4
    length = tokens // batch
    student = torch.randn(batch, length, vocab).requires_grad_(True)
    teacher = torch.randn(batch, length, vocab)
    labels = torch.randint(0, vocab, (batch, length))
    # Warm the code path on a tiny input so lazy initialisation is not counted.
    tiny = torch.randn(1, 4, vocab, requires_grad=True)
    lm_distill_loss(tiny, tiny.detach(), labels[:1, :4], divergence=divergence, alpha=0.5).loss.backward()
    del tiny
    base = _rss_bytes()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    chunk_size = None if chunk == "none" else ("auto" if chunk == "auto" else int(chunk))
    t0 = time.perf_counter()
    out = lm_distill_loss(student, teacher, labels, divergence=divergence, alpha=0.5, chunk_size=chunk_size)
    out.loss.backward()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"tokens": tokens, "vocab": vocab, "chunk": chunk, "divergence": divergence,
            "extra_bytes": peak - base, "baseline_bytes": base, "peak_before_bytes": peak_before,
            "baseline_was_peak": peak_before <= base + (8 << 20), "seconds": seconds,
            "loss": float(out.loss), "grad_bytes": student.grad.numel() * 4}


def run_child(*args) -> dict:
    # Large blocks straight from mmap and back to the system on free (glibc otherwise raises its mmap threshold
    # after the first free and keeps freed heap pages resident, which RSS would count as the loss's memory).
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"), MALLOC_MMAP_THRESHOLD_="131072")
    cmd = [sys.executable, __file__, "--child", *map(str, args)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"child {args} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", nargs=4)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    if args.child:
        tokens, vocab, chunk, divergence = args.child
        print(json.dumps(child(int(tokens), int(vocab), chunk, divergence)))
        return
    vocab = 32_000
    sizes = [256] if args.quick else [512, 2048]
    chunks = ["none", "auto"]
    divergences = ["forward_kl", "jsd"]
    runs = []
    for rep in range(1 if args.quick else args.repeats):
        for tokens in sizes:
            for divergence in divergences:
                for chunk in chunks:
                    r = run_child(tokens, vocab, chunk, divergence)
                    r["repeat"] = rep
                    runs.append(r)
                    print(f"  rep {rep} N={tokens} {divergence:10s} chunk={chunk:5s} "
                          f"+{r['extra_bytes'] / 2**20:7.0f} MiB {r['seconds']:.2f} s", flush=True)
    rows = []
    for tokens in sizes:
        for divergence in divergences:
            for chunk in chunks:
                sel = [r for r in runs if (r["tokens"], r["divergence"], r["chunk"]) == (tokens, divergence, chunk)]
                chunk_tokens = tokens if chunk == "none" else 2 ** 22 // vocab if chunk == "auto" else int(chunk)
                rows.append({"tokens": tokens, "vocab": vocab, "divergence": divergence, "chunk": chunk,
                             "chunk_tokens": chunk_tokens,
                             "extra_mib_median": statistics.median(r["extra_bytes"] for r in sel) / 2 ** 20,
                             "extra_mib_all": [round(r["extra_bytes"] / 2 ** 20, 1) for r in sel],
                             "seconds_median": statistics.median(r["seconds"] for r in sel),
                             "logits_mib": tokens * vocab * 4 / 2 ** 20,
                             "baseline_was_peak": all(r["baseline_was_peak"] for r in sel)})
    print(f"\nPeak extra memory of lm_distill_loss forward + backward (alpha 0.5), V = {vocab}, float32, CPU, "
          "one thread; median of repeats")
    print(f"{'tokens':>7} {'divergence':>10} {'chunk':>7} {'extra MiB':>10} {'x logits':>9} {'seconds':>8}")
    for r in rows:
        print(f"{r['tokens']:>7} {r['divergence']:>10} {r['chunk_tokens']:>7} {r['extra_mib_median']:>10.0f} "
              f"{r['extra_mib_median'] / r['logits_mib']:>9.2f} {r['seconds_median']:>8.2f}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    meta = {"what": "peak RSS above the baseline (inputs built) during one forward+backward of lm_distill_loss; "
                    "includes the (B, L, V) float32 gradient of the student logits ('x logits' = 1.0 of it)",
            "cpu_threads": 1, "repeats": 1 if args.quick else args.repeats, "torch": __import__("torch").__version__}
    if not args.quick:
        OUT.write_text(json.dumps({"meta": meta, "rows": rows, "runs": runs}, indent=1))
        print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
