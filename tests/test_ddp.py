"""Data-parallel training: 2 CPU processes (gloo) match one process with the same global batch."""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import kdkit.training.loop as engine
from kdkit.config import TrainConfig
from kdkit.data import ArrayData
from kdkit.methods import METHODS
from kdkit.teacher import Teacher

EPOCHS, BATCH = 3, 16


def _setup():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 6, generator=g)  # 128 = 8 global batches of 16: no padding, no ragged batch
    data = ArrayData(x, (x[:, 0] + x[:, 1] > 0).long())
    torch.manual_seed(1)
    teacher = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 2))
    torch.manual_seed(2)
    student = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2))  # no BatchNorm/dropout: exact DDP equivalence
    method = METHODS.get("kd")(student, Teacher(teacher), temperature=4.0, alpha=0.7)
    return method, data


def _run(cache_dir, run_dir=None):
    torch.set_num_threads(1)
    method, data = _setup()
    cfg = TrainConfig(epochs=EPOCHS, optimizer="sgd", lr=0.1, momentum=0.9, progress=False, cache_dir=str(cache_dir))
    hist = engine.fit(method, data, data, cfg, seed=5, batch_size=BATCH, run_dir=run_dir)
    return [h["train_loss"] for h in hist.epochs], method.student.state_dict(), hist.teacher_cache


def _worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    run_dir = out_dir / "run" if rank == 0 else None
    losses, state, cache = _run(out_dir / "cache", run_dir)
    torch.save({"losses": losses, "state": state, "cache": cache}, out_dir / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two spawned interpreters: ~15 s idle, 35 s on a busy machine
def test_two_gloo_processes_match_one_process(tmp_path):
    single_losses, single_state, _ = _run(tmp_path / "single_cache")
    mp.spawn(_worker, args=(2, _free_port(), tmp_path), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for res in results:
        # The all-reduced epoch losses equal the single-process curve; the weights too (float32 round-off).
        assert res["losses"] == pytest.approx(single_losses, rel=1e-5, abs=1e-6)
        for k, v in single_state.items():
            assert torch.allclose(res["state"][k], v, rtol=1e-5, atol=1e-6), k
        assert "disk" in res["cache"]  # the teacher cache was shared through one memory-mapped file
    assert torch.equal(results[0]["state"]["0.weight"], results[1]["state"]["0.weight"])
    # Only rank 0 wrote the run directory.
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3] and "val_accuracy" in records[-1]
    assert single_losses[-1] < single_losses[0]
