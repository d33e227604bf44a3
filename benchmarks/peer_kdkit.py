"""The kdkit side of benchmark (4) in ``speed.py``, as a script with the same inputs and output as
``peer_torchdistill.py``, so both tools can run in the same virtual environment (same torch build).

    PYTHONPATH=src /work/venvs/torchdistill/bin/python benchmarks/peer_kdkit.py --work benchmarks/out/speed \\
        --out RESULT.json --teacher-cache off|memory
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed_common import accuracy, load_arrays, load_state, mlp  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0, help="seed of the data order (and of nothing else)")
    ap.add_argument("--teacher-cache", default="memory")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import kdkit
    import kdkit.training.loop as engine
    from kdkit.config import TrainConfig
    from kdkit.data import ArrayData
    from kdkit.methods import METHODS
    from kdkit.teacher import Teacher

    work = Path(args.work)
    spec = json.loads((work / "job.json").read_text())
    data = load_arrays(work / "data.npz")
    teacher = load_state(mlp(spec["teacher_hidden"]), work / "teacher.npz")
    student = load_state(mlp(spec["student_hidden"]), work / "student_init.npz")
    method = METHODS.get("kd")(student, Teacher(teacher), temperature=spec["temperature"], alpha=spec["alpha"])
    cfg = TrainConfig(epochs=args.epochs, optimizer="sgd", lr=args.lr, momentum=0.9, schedule="constant",
                      progress=False, teacher_cache=args.teacher_cache)
    hist = engine.fit(method, ArrayData(data["x_train"], data["y_train"]), None, cfg, seed=args.seed,
                      batch_size=args.batch_size)
    acc = accuracy(student, data["x_test"], data["y_test"])
    Path(args.out).write_text(json.dumps({
        "tool": f"kdkit {getattr(kdkit, '__version__', '')}".strip(), "torch": torch.__version__,
        "teacher_cache": hist.teacher_cache, "epoch_seconds": [e["epoch_seconds"] for e in hist.epochs],
        "epoch_cpu_seconds": [e["epoch_cpu_seconds"] for e in hist.epochs], "test_accuracy": acc}))


if __name__ == "__main__":
    main()
