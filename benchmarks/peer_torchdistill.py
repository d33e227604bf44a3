"""The torchdistill side of benchmark (4) in ``speed.py``: the same KD job, run by torchdistill's DistillationBox.

Run in a separate virtual environment holding torchdistill (``pip install torch torchvision torchdistill``):

    /work/venvs/torchdistill/bin/python benchmarks/peer_torchdistill.py --work benchmarks/out/speed --out RESULT.json

Reads the data, the trained teacher and the student's initial weights that ``speed.py`` wrote (``.npz``), trains
the student with torchdistill's KDLoss (T=4; its ``alpha`` weighs the cross-entropy, so alpha=0.1 here equals
kdkit's alpha=0.9 on the soft term), SGD with Nesterov momentum, constant learning rate, and writes the time of
each epoch and the final test accuracy as JSON. torchdistill 1.x has no teacher-output cache, so only the live
teacher is measured.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import RandomSampler, TensorDataset

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
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import torchdistill
    from torchdistill.core.distillation import get_distillation_box

    work = Path(args.work)
    spec = json.loads((work / "job.json").read_text())
    data = load_arrays(work / "data.npz")
    teacher = load_state(mlp(spec["teacher_hidden"]), work / "teacher.npz")
    student = load_state(mlp(spec["student_hidden"]), work / "student_init.npz")
    torch.manual_seed(args.seed)  # RandomSampler draws the epoch orders from the global generator
    train_config = {
        "num_epochs": args.epochs,
        "train_data_loader": {"dataset_id": "train", "sampler": {"class_or_func": RandomSampler, "kwargs": {}},
                              "kwargs": {"batch_size": args.batch_size, "num_workers": 0, "drop_last": False}},
        "teacher": {"sequential": [], "forward_proc": "forward_batch_only", "requires_grad": False},
        "student": {"sequential": [], "forward_proc": "forward_batch_only", "requires_grad": True},
        "optimizer": {"key": "SGD", "kwargs": {"lr": args.lr, "momentum": 0.9, "nesterov": True, "weight_decay": 0.0}},
        "criterion": {"key": "WeightedSumLoss", "kwargs": {"sub_terms": {"kd": {
            "criterion": {"key": "KDLoss", "kwargs": {
                "student_module_path": ".", "student_module_io": "output",
                "teacher_module_path": ".", "teacher_module_io": "output",
                "temperature": spec["temperature"], "alpha": 1.0 - spec["alpha"], "reduction": "batchmean"}},
            "weight": 1.0}}}},
    }
    dataset = TensorDataset(data["x_train"], data["y_train"])
    box = get_distillation_box(teacher, student, {"train": dataset}, train_config, torch.device("cpu"), None, False, 1)
    epoch_seconds, epoch_cpu_seconds = [], []
    for epoch in range(args.epochs):
        box.pre_epoch_process(epoch=epoch)
        t0, c0 = time.perf_counter(), time.process_time()
        for sample_batch, targets, supp_dict in box.train_data_loader:
            loss = box.forward_process(sample_batch, targets, supp_dict)
            box.post_forward_process(loss)
        epoch_seconds.append(time.perf_counter() - t0)
        epoch_cpu_seconds.append(time.process_time() - c0)
    acc = accuracy(box.student_model, data["x_test"], data["y_test"])
    Path(args.out).write_text(json.dumps({"tool": f"torchdistill {torchdistill.__version__}",
                                          "torch": torch.__version__, "epoch_seconds": epoch_seconds,
                                          "epoch_cpu_seconds": epoch_cpu_seconds, "test_accuracy": acc}))


if __name__ == "__main__":
    main()
