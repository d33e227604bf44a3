"""Sharded training (train.strategy: fsdp): refusals before anything is written (one process), and with two
gloo processes: the 1-process result, half the bytes per rank, a kill -9 resumed bit-identically from the
distributed checkpoint, and a consolidated save_pretrained folder that transformers loads with the same logits."""

from __future__ import annotations

import json
import os
import signal
import socket

import pytest
import torch
import torch.multiprocessing as mp

pytest.importorskip("transformers")

import kdkit  # noqa: E402
import kdkit.training.loop as engine  # noqa: E402
from kdkit.config import TrainConfig  # noqa: E402
from kdkit.errors import KdkitError  # noqa: E402
from kdkit.lm import tiny_gpt2  # noqa: E402
from kdkit.lm.data import TokenData  # noqa: E402
from kdkit.methods.lm_kd import LMKD  # noqa: E402
from kdkit.teacher import Teacher  # noqa: E402
from kdkit.training.fsdp import blocks_of, checkpoint_world_size, sharding_problem  # noqa: E402

V, L, ROWS, BATCH, EPOCHS = 40, 8, 64, 16, 3


def _data():
    """Rows with no padding: both ranks see as many tokens per step as one process sees per half-batch."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(2, V, (ROWS, L), generator=g)
    y = torch.cat([x[:, 1:], torch.randint(2, V, (ROWS, 1), generator=g)], 1)
    return TokenData(x, y, pad_token_id=0, eos_token_id=1)


class _KillAt(LMKD):
    """lm_kd that SIGKILLs its process (rank 0) at one training step, once (a marker file remembers)."""

    kill_at, marker = None, None

    def forward(self, batch):
        if self.training and self.kill_at is not None:
            self.calls = getattr(self, "calls", 0) + 1
            if self.calls == self.kill_at and int(os.environ.get("RANK", 0)) == 0 and not self.marker.exists():
                self.marker.write_text("killed")
                os.kill(os.getpid(), signal.SIGKILL)
        return super().forward(batch)


def _method(kill_at=None, marker=None):
    torch.manual_seed(1)
    teacher = tiny_gpt2(V, layers=2, hidden=32, max_positions=L).eval()
    torch.manual_seed(2)
    student = tiny_gpt2(V, layers=2, hidden=16, max_positions=L)
    method = _KillAt(student, Teacher(teacher), alpha=0.5)
    method.kill_at, method.marker = kill_at, marker
    return method


def _cfg(strategy):
    return TrainConfig(epochs=EPOCHS, optimizer="adamw", lr=1e-2, progress=False, quiet=True, strategy=strategy,
                       threads=1, keep="last")


def _local_state(module):
    return {k: (v.to_local() if hasattr(v, "to_local") else v).detach().clone() for k, v in module.state_dict().items()}


def _worker(rank, world, port, out, run_dir, resume, kill_at):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    method = _method(kill_at, out / "killed")
    data = _data()
    hist = engine.fit(method, data, data, _cfg("fsdp"), seed=5, batch_size=BATCH, run_dir=run_dir, resume=resume)
    torch.save({"epochs": hist.epochs, "local": _local_state(method.student) if rank else {},
                "student": {k: v.clone() for k, v in method.student.state_dict().items()} if rank == 0 else {}},
               out / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(out, run_dir, resume=False, kill_at=None):
    mp.spawn(_worker, args=(2, _free_port(), out, run_dir, resume, kill_at), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


# ----------------------------------------------------------------------------- one process


def test_blocks_come_from_the_model():
    student = _method().student
    assert [type(b).__name__ for b in blocks_of(student)] == ["GPT2Block", "GPT2Block"]
    assert blocks_of(torch.nn.Linear(2, 2)) == []


def test_refusals_name_what_is_wrong():
    method = _method()
    assert "launch it with torchrun --nproc_per_node N" in sharding_problem(_cfg("fsdp"), method, 1)
    assert sharding_problem(_cfg("fsdp"), method, 2) is None
    cache = _cfg("fsdp").model_copy(update={"teacher_cache": "memory"})
    assert "teacher_cache: memory is not supported" in sharding_problem(cache, method, 2)
    frozen = _method()
    frozen.student.requires_grad_(False)
    assert "no trainable torch parameters" in sharding_problem(_cfg("fsdp"), frozen, 2)

    class Refusing(LMKD):
        sharding_refusal = "it needs the whole student on every process"

    refusing = Refusing(_method().student, _method().teacher)
    expected = "train.strategy: fsdp: it needs the whole student on every process"
    assert sharding_problem(_cfg("fsdp"), refusing, 2) == expected


def test_fsdp_without_torchrun_is_refused_before_the_run_directory_is_written(tmp_path):
    import random

    words = "the cat dog runs on a mat red blue code user".split()
    rng = random.Random(0)
    (tmp_path / "q.txt").write_text("\n%\n".join(" ".join(rng.choice(words) for _ in range(8)) for _ in range(40)))
    data = {"name": "text_lm", "path": str(tmp_path / "q.txt"), "vocab_size": 280, "max_length": 12,
            "batch_size": 8}
    train = {"epochs": 1, "threads": 1, "progress": False, "quiet": True}
    kdkit.run_config(kdkit.load_config({"out_dir": str(tmp_path / "t"), "data": data, "train": train,
                                        "model": {"name": "causal_lm", "layers": 1, "hidden": 16}}), "train")
    cfg = {"out_dir": str(tmp_path / "kd"), "data": data, "train": {**train, "strategy": "fsdp"},
           "teacher": {"checkpoint": str(tmp_path / "t")}, "student": {"name": "causal_lm", "layers": 1, "hidden": 8},
           "method": {"name": "lm_kd"}}
    with pytest.raises(KdkitError, match="this run has one process; launch it with torchrun") as e:
        kdkit.run_config(kdkit.load_config(cfg), "distill")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "kd").exists()


def test_resuming_on_another_world_size_is_refused(tmp_path, monkeypatch):
    from kdkit import api

    dcp = tmp_path / "run" / "checkpoints" / "dcp"
    dcp.mkdir(parents=True)
    (dcp / "kdkit.json").write_text(json.dumps({"world_size": 4}))
    assert checkpoint_world_size(tmp_path / "run" / "checkpoints") == 4
    monkeypatch.setattr(api, "dist_env", lambda: (0, 2, 0))
    cfg = kdkit.load_config({"out_dir": str(tmp_path / "run"), "data": {"name": "digits"},
                             "train": {"strategy": "fsdp"}, "student": {"name": "mlp"}, "method": {"name": "kd"}})
    with pytest.raises(KdkitError, match="written by 4 processes and this run has 2; resume with torchrun "
                                         "--nproc_per_node 4"):
        api._check_sharded_run(cfg, _method(), resume=True)


# ----------------------------------------------------------------------------- two processes


@pytest.mark.slow  # spawned interpreters: about a minute on two busy cores
def test_two_sharded_processes_match_one_and_resume_bit_identically(tmp_path):
    torch.set_num_threads(1)
    one = _method()
    data = _data()
    single = engine.fit(one, data, data, _cfg("ddp"), seed=5, batch_size=BATCH)
    (tmp_path / "a").mkdir()
    a = _spawn(tmp_path / "a", tmp_path / "a" / "run")
    # the same result as one process (the order of reduction differs)
    for e1, e2 in zip(single.epochs, a[0]["epochs"]):
        assert e2["train_loss"] == pytest.approx(e1["train_loss"], rel=1e-4)
        assert e2["val_perplexity"] == pytest.approx(e1["val_perplexity"], rel=1e-4)
    for k, v in one.student.state_dict().items():
        assert torch.allclose(a[0]["student"][k], v, atol=1e-5), k
    # each rank holds about half the parameter, gradient and optimiser bytes
    full = sum(p.numel() * 4 for p in one.student.parameters())
    for r in range(2):
        last = a[r]["epochs"][-1]
        assert 0.4 * full <= last["rank_parameters_bytes"] <= 0.6 * full
        assert last["rank_gradients_bytes"] == last["rank_parameters_bytes"]
        assert last["rank_optimizer_bytes"] == 2 * last["rank_parameters_bytes"]  # AdamW: two moments
    ckpt = tmp_path / "a" / "run" / "checkpoints"
    assert sorted(p.name for p in (ckpt / "dcp").iterdir() if p.suffix == ".distcp") == ["__0_0.distcp",
                                                                                      "__1_0.distcp"]
    # a save_pretrained folder that transformers loads, with the kept student's logits
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(ckpt / "pretrained")).eval()
    kept = _method().student
    kdkit.training.checkpoint.load_weights(kept, ckpt / "best.safetensors")
    with torch.no_grad():
        assert torch.allclose(hf(data.x[:4]).logits, kept.eval()(data.x[:4]), atol=1e-5)
    # killed with SIGKILL in the middle of epoch 2 (4 steps per epoch: 8 rows a rank; the 6th step is its 2nd)
    (tmp_path / "b").mkdir()
    with pytest.raises(Exception):
        _spawn(tmp_path / "b", tmp_path / "b" / "run", kill_at=6)
    assert (tmp_path / "b" / "killed").exists() and not (tmp_path / "b" / "rank0.pt").exists()
    assert checkpoint_world_size(tmp_path / "b" / "run" / "checkpoints") == 2
    b = _spawn(tmp_path / "b", tmp_path / "b" / "run", resume=True, kill_at=6)
    assert [e["train_loss"] for e in b[0]["epochs"]] == [e["train_loss"] for e in a[0]["epochs"]]
    for k, v in a[0]["student"].items():
        assert torch.equal(b[0]["student"][k], v), k
    for k, v in a[1]["local"].items():
        assert torch.equal(b[1]["local"][k], v), k
