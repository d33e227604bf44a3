#!/usr/bin/env python
"""Sharded training (``train.strategy: fsdp``) against one process: the same result, half the bytes per rank.

    python benchmarks/fsdp.py                  # 3 repeats of each variant (about 5 minutes on two cores)
    python benchmarks/fsdp.py --repeats 1 --steps 20

Setting: ``lm_kd`` (forward KL, alpha 0.5) from a GPT-2 teacher (6 layers x 256, random initialisation: this
measures the engine, not distillation) into a GPT-2 student (4 layers x 192), vocabulary 1,024, on the Debian
fortunes packed into rows of 64 tokens (no padding, so a rank's token mean over its half of a batch averages
to the batch's token mean), global batch 16, AdamW, float32 on the CPU. Variants, each in its own process
(torchrun for the sharded ones, gloo), interleaved repeat by repeat:

- ``single``: one process;
- ``fsdp2``: two processes, FSDP2 (student per block, teacher per block resharded after each forward);
- ``fsdp2_bf16``: the same with the bf16 mixed-precision policy (parameters gathered and gradients reduced in
  bfloat16, float32 master weights); on a CPU bf16 is emulated and slow, its row is there to show it runs.

Measured per rank: the final training loss, the bytes of trainable parameters, gradients and AdamW state it
holds (from its tensors: the shards under FSDP, ``metrics.jsonl``'s ``rank_*_bytes``), the peak RSS of the
training (``VmHWM`` after resetting it once the data and models are built), and tokens per second (wall, all
ranks together). Results: ``benchmarks/results/fsdp.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "out" / "fsdp"
RESULTS = ROOT / "results" / "fsdp.json"
SETTING = {"vocab_size": 1024, "length": 64, "rows": 1600, "batch_size": 16,
           "teacher": {"layers": 6, "hidden": 256, "heads": 4}, "student": {"layers": 4, "hidden": 192, "heads": 4},
           "lr": 1e-3, "alpha": 0.5}
VARIANTS = ["single", "fsdp2", "fsdp2_bf16"]


def packed_rows(rows: int):
    """The fortunes training quotations as one token stream cut into rows of ``length`` + 1 (no padding)."""
    from kdkit.lm.data import TokenData, fortunes_lm

    data = fortunes_lm(vocab_size=SETTING["vocab_size"], max_length=SETTING["length"],
                       cache_dir=str(OUT / "tokenizers")).train
    stream = data.x[data.x != data.pad_token_id]
    n = SETTING["length"] + 1
    cut = stream[:rows * n].reshape(rows, n)
    return TokenData(cut[:, :-1].contiguous(), cut[:, 1:].contiguous(), pad_token_id=data.pad_token_id,
                     eos_token_id=data.eos_token_id, tokenizer_path=data.tokenizer_path)


def _vm(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def child(variant: str, out: Path, steps: int) -> None:
    from kdkit.config import TrainConfig
    from kdkit.lm import tiny_gpt2
    from kdkit.methods.lm_kd import LMKD
    from kdkit.teacher import Teacher
    from kdkit.training.loop import fit

    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", 0))
    data = packed_rows(steps * SETTING["batch_size"])
    t, s = SETTING["teacher"], SETTING["student"]
    torch.manual_seed(1)
    teacher = tiny_gpt2(SETTING["vocab_size"], layers=t["layers"], hidden=t["hidden"], heads=t["heads"],
                        max_positions=SETTING["length"]).eval()
    torch.manual_seed(2)
    student = tiny_gpt2(SETTING["vocab_size"], layers=s["layers"], hidden=s["hidden"], heads=s["heads"],
                        max_positions=SETTING["length"])
    method = LMKD(student, Teacher(teacher), alpha=SETTING["alpha"])
    cfg = TrainConfig(epochs=1, optimizer="adamw", lr=SETTING["lr"], schedule="constant", progress=False,
                      quiet=True, threads=1, keep="last", strategy="ddp" if variant == "single" else "fsdp",
                      precision="bf16" if variant.endswith("bf16") else "fp32")
    run_dir = OUT / "runs" / variant
    if rank == 0 and run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    Path("/proc/self/clear_refs").write_text("5")
    rss0 = _vm("VmRSS")
    t0, c0 = time.perf_counter(), time.process_time()
    history = fit(method, data, None, cfg, seed=0, batch_size=SETTING["batch_size"], run_dir=run_dir, name=variant)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    last = history.epochs[-1]
    own = {k: last[k] for k in ("rank_parameters_bytes", "rank_gradients_bytes", "rank_optimizer_bytes") if k in last}
    if not own:  # one process: its full tensors
        params = [p for p in method.parameters() if p.requires_grad]
        nbytes = sum(p.numel() * p.element_size() for p in params)
        own = {"rank_parameters_bytes": nbytes, "rank_gradients_bytes": nbytes, "rank_optimizer_bytes": 2 * nbytes}
    tokens = int((data.y != -100).sum())
    result = {"variant": variant, "rank": rank, "final_loss": last["train_loss"], "wall_s": wall, "cpu_s": cpu,
              "fit_cpu_s": last["epoch_cpu_seconds"], "tokens": tokens, "tokens_per_s": tokens / last["epoch_seconds"],
              "rss_before_bytes": rss0, "peak_rss_bytes": _vm("VmHWM"), **own}
    (out / f"{variant}-rank{rank}.json").write_text(json.dumps(result))


def run_variant(variant: str, steps: int, rep: int) -> List[Dict[str, Any]]:
    folder = OUT / f"rep{rep}"
    folder.mkdir(parents=True, exist_ok=True)
    for f in folder.glob(f"{variant}-rank*.json"):
        f.unlink()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT.parent / "src")}
    script = [__file__, "--child", variant, str(folder), "--steps", str(steps)]
    if variant == "single":
        command = [sys.executable] + script
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                   str(29500 + rep)] + script
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return [json.loads(f.read_text()) for f in sorted(folder.glob(f"{variant}-rank*.json"))]


def summarise(runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for v in VARIANTS:
        rs = [r for r in runs if r["variant"] == v]
        if not rs:
            continue
        by_rank = sorted({r["rank"] for r in rs})
        out[v] = {"processes": len(by_rank), "final_loss": rs[0]["final_loss"],
                  "final_loss_all_repeats_equal": len({r["final_loss"] for r in rs}) == 1,
                  "tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in rs if r["rank"] == 0),
                  **{f"{k}_per_rank": max(r[f"rank_{k}_bytes"] for r in rs)
                     for k in ("parameters", "gradients", "optimizer")},
                  "peak_rss_mib_per_rank_median": {str(k): statistics.median(r["peak_rss_bytes"] for r in rs
                                                                              if r["rank"] == k) / 2**20
                                                   for k in by_rank}}
    single = out.get("single")
    for v in ("fsdp2", "fsdp2_bf16"):
        if single and v in out:
            o = out[v]
            o["loss_relative_difference"] = abs(o["final_loss"] - single["final_loss"]) / abs(single["final_loss"])
            o["bytes_per_rank_over_single"] = {k: o[f"{k}_per_rank"] / single[f"{k}_per_rank"]
                                               for k in ("parameters", "gradients", "optimizer")}
    if single and "fsdp2" in out:
        o = out["fsdp2"]
        out["goals"] = {"same_loss_within_1e-4_relative": o["loss_relative_difference"] <= 1e-4,
                        "bytes_about_half": all(0.45 <= x <= 0.55 for x in o["bytes_per_rank_over_single"].values())}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--child", nargs=2, metavar=("VARIANT", "FOLDER"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], Path(args.child[1]), args.steps)
        return
    variants = [v for v in args.variants.split(",") if v]
    runs: List[Dict[str, Any]] = []
    t0 = time.perf_counter()
    for rep in range(args.repeats):
        for v in variants:
            got = run_variant(v, args.steps, rep)
            runs += [{**r, "repeat": rep} for r in got]
            r0 = got[0]
            print(f"rep {rep} {v:<11} loss {r0['final_loss']:.6f}  {r0['tokens_per_s']:.0f} tokens/s  "
                  f"params/rank {r0['rank_parameters_bytes'] / 2**20:.2f} MiB  "
                  f"peak RSS rank0 {r0['peak_rss_bytes'] / 2**20:.0f} MiB", flush=True)
    summary = summarise(runs)
    payload = {"setting": SETTING, "steps": args.steps, "repeats": args.repeats, "runs": runs, "summary": summary,
               "gpu": "not run: no GPU was lent to this measurement", "machine": platform.platform(),
               "torch": torch.__version__, "wall_s": time.perf_counter() - t0}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=1))
    print(f"\n{'variant':<11} {'procs':>5} {'final loss':>12} {'rel. diff':>10} {'params/rank':>12} "
          f"{'grads/rank':>11} {'AdamW/rank':>11} {'peak RSS/rank':>14} {'tokens/s':>9}")
    for v in variants:
        o = summary[v]
        rss = "/".join(f"{x:.0f}" for x in o["peak_rss_mib_per_rank_median"].values())
        diff = f"{o['loss_relative_difference']:.1e}" if "loss_relative_difference" in o else "-"
        print(f"{v:<11} {o['processes']:>5} {o['final_loss']:>12.6f} {diff:>10} "
              f"{o['parameters_per_rank'] / 2**20:>9.2f} MiB {o['gradients_per_rank'] / 2**20:>8.2f} MiB "
              f"{o['optimizer_per_rank'] / 2**20:>8.2f} MiB {rss:>10} MiB {o['tokens_per_s_median']:>9.0f}")
    print(json.dumps(summary.get("goals", {})))


if __name__ == "__main__":
    main()
