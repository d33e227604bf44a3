"""Runs a user can trust: same config -> same weights in any process, the kept checkpoint, resume after a
kill at any point, and nothing created before a config is known to be valid."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

import kdkit
from kdkit.config import TrainConfig
from kdkit.data import ArrayData
from kdkit.errors import KdkitError
from kdkit.methods import METHODS
from kdkit.training import checkpoint as ckpt_mod
from kdkit.training.loop import Keeper, fit
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args, cwd=None, env=None):
    """`python -m kdkit ...` in a fresh process, with torch's default thread count."""
    env = {**os.environ, **(env or {})}
    env.pop("OMP_NUM_THREADS", None)
    return subprocess.run([sys.executable, "-m", "kdkit", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or ROOT, env=env, timeout=300)


def _write(path: Path, cfg) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def _weights(run_dir: Path, name: str = "last") -> dict:
    return load_file(str(run_dir / "checkpoints" / f"{name}.safetensors"))


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- same config, same weights

def test_two_processes_same_config_same_weights_train_and_distill(tmp_path, teacher_run):
    train_cfg = tiny_config(None, model={"name": "mlp", "hidden": [16]})
    distill_cfg = tiny_config(None, student={"name": "mlp", "hidden": [16]}, teacher={"checkpoint": str(teacher_run)},
                              method={"name": "kd", "temperature": 2.0, "alpha": 0.5})
    for command, cfg in (("train", train_cfg), ("distill", distill_cfg)):
        path = _write(tmp_path / f"{command}.yaml", {k: v for k, v in cfg.items() if k != "out_dir"})
        runs = []
        for i in (1, 2):
            out = tmp_path / f"{command}-{i}"
            r = _cli(command, path, f"out_dir={out}", "train.progress=false")
            assert r.returncode == 0, r.stderr
            runs.append(out)
        assert _same(_weights(runs[0]), _weights(runs[1])), command
        assert _same(_weights(runs[0], "best"), _weights(runs[1], "best")), command


API_SCRIPT = """
import random
import sys

import numpy
import torch
from torch import nn

import kdkit

numpy.random.seed(random.randrange(2**32))  # a process whose global RNGs are in some other state
torch.manual_seed(random.randrange(2**32))
splits = kdkit.DATASETS.get("digits")(train_subset=256)
torch.manual_seed(0)  # the user's own models: seeded by the user; whatever kdkit builds comes from seed=
model = kdkit.create_model("mlp", num_classes=10, input_shape=splits.input_shape, hidden=[16])
torch.manual_seed(0)
student = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
torch.manual_seed(random.randrange(2**32))  # disturb again: kdkit.distill must seed what it builds
run = kdkit.distill(model, student, splits.train, splits.val, method="fitnets", epochs=2, progress=False,
                    out_dir=sys.argv[1])
"""


def test_two_processes_same_api_call_same_weights(tmp_path):
    # fitnets builds a connector inside kdkit: it must come from the run's seed, not the process's.
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        r = subprocess.run([sys.executable, "-c", API_SCRIPT, str(out)], capture_output=True, text=True, cwd=ROOT,
                           timeout=300)
        assert r.returncode == 0, r.stderr
    state_a = load_file(str(outs[0] / "checkpoints" / "state.safetensors"))
    state_b = load_file(str(outs[1] / "checkpoints" / "state.safetensors"))
    weights = [k for k in state_a if k.startswith("method.")]
    assert any("connector" in k for k in weights)
    assert all(torch.equal(state_a[k], state_b[k]) for k in weights)


# ----------------------------------------------------------------------------- the kept checkpoint

def test_keeper_breaks_accuracy_ties_by_nll_then_prefers_the_later_epoch():
    k = Keeper("best")
    assert k.consider(1, {"accuracy": 0.9, "nll": 0.50})
    assert k.consider(2, {"accuracy": 0.9, "nll": 0.40})      # same accuracy, lower NLL: kept
    assert not k.consider(3, {"accuracy": 0.9, "nll": 0.45})  # same accuracy, higher NLL: not kept
    assert k.consider(4, {"accuracy": 0.9, "nll": 0.40})      # full tie: the later epoch
    assert not k.consider(5, {"accuracy": 0.8, "nll": 0.01})  # accuracy first
    assert k.epoch == 4
    last = Keeper("last")
    assert last.consider(1, {"accuracy": 0.9}) and last.consider(2, {"accuracy": 0.1}) and last.epoch == 2
    reg = Keeper("best")
    assert reg.consider(1, {"mse": 2.0}) and reg.consider(2, {"mse": 1.0}) and not reg.consider(3, {"mse": 1.5})


def _tie_data():
    # Two well separated blobs: validation accuracy is 100 % after the first epoch, so every epoch ties on it.
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(64, 4, generator=g) + 4, torch.randn(64, 4, generator=g) - 4])
    y = torch.cat([torch.zeros(64), torch.ones(64)]).long()
    return ArrayData(x, y)


def test_ties_keep_a_late_confident_epoch_and_the_api_returns_it_without_out_dir(tmp_path):
    data = _tie_data()
    torch.manual_seed(0)
    run = kdkit.train(nn.Linear(4, 2), data, data, epochs=6, lr=0.05, optimizer="sgd", schedule="constant",
                      progress=False)
    accs = [r["val_accuracy"] for r in run.history]
    assert accs.count(1.0) >= 3  # the case of the issue: several epochs tie on accuracy
    nll = [r["val_nll"] for r in run.history]
    expected = max(range(6), key=lambda i: (accs[i], -nll[i], i)) + 1  # independent statement of the rule
    assert expected > accs.index(1.0) + 1  # the earliest tied epoch is NOT the one kept
    assert run.metrics["student"]["kept_epoch"] == expected
    # With a run directory the same weights are kept, and run.student holds them in both cases.
    torch.manual_seed(0)
    run2 = kdkit.train(nn.Linear(4, 2), data, data, epochs=6, lr=0.05, optimizer="sgd", schedule="constant",
                       progress=False, out_dir=tmp_path / "r")
    best = _weights(tmp_path / "r", "best")
    assert _same(best, run2.student.state_dict()) and _same(best, run.student.state_dict())
    assert json.loads((tmp_path / "r" / "report.json").read_text())["kept_epoch"] == expected


# ----------------------------------------------------------------------------- resume after a kill

def _tiny_train_cfg(out, epochs=3):
    return tiny_config(out, model={"name": "mlp", "hidden": [16]},
                       train={"epochs": epochs, "lr": 0.01, "progress": False, "optimizer": "adam"})


class _Killed(BaseException):
    """Stands in for kill -9: not an Exception, so nothing in kdkit catches it."""


@contextlib.contextmanager
def _killed_after_saving(monkeypatch, n: int):
    """The run inside dies right after its ``n``-th resume state is on disk (as a kill between epochs would)."""
    import kdkit.training.loop as loop_mod

    real, calls = loop_mod.save_training_state, {"n": 0}

    def save_then_die(*a, **kw):
        real(*a, **kw)
        calls["n"] += 1
        if calls["n"] == n:
            raise _Killed

    monkeypatch.setattr(loop_mod, "save_training_state", save_then_die)
    with pytest.raises(_Killed):
        yield
    monkeypatch.setattr(loop_mod, "save_training_state", real)


def test_killed_between_any_two_checkpoint_files_resumes_bit_identical(tmp_path, monkeypatch):
    full = kdkit.run_config(kdkit.load_config(_tiny_train_cfg(tmp_path / "full")), "train")
    reference = _weights(full.dir)
    real_replace = os.replace
    # Each epoch renames: best (when kept), last, state (and config.yaml once): die right before each of them.
    for k in range(1, 8):
        calls = {"n": 0}

        def dying_replace(src, dst, k=k, calls=calls):
            calls["n"] += 1
            if calls["n"] == k:
                raise _Killed
            return real_replace(src, dst)

        out = tmp_path / f"cut{k}"
        monkeypatch.setattr(os, "replace", dying_replace)
        try:
            kdkit.run_config(kdkit.load_config(_tiny_train_cfg(out)), "train")
        except _Killed:
            pass
        monkeypatch.setattr(os, "replace", real_replace)
        if not (out / "config.yaml").is_file():  # killed before the run directory was a run: start it anew
            kdkit.run_config(kdkit.load_config(_tiny_train_cfg(out)), "train")
        else:
            kdkit.run_config(kdkit.load_config(_tiny_train_cfg(out)), "train", resume=True)
        assert _same(_weights(out), reference), k
        lines = (out / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3], k


def test_run_killed_in_its_first_epoch_resumes_from_scratch(tmp_path):
    cfg = _tiny_train_cfg(tmp_path / "r", epochs=2)
    full = kdkit.run_config(kdkit.load_config(_tiny_train_cfg(tmp_path / "full", epochs=2)), "train")
    # What a kill in epoch 1 leaves: the run directory with its config and nothing else.
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "config.yaml").write_text(
        (full.dir / "config.yaml").read_text().replace(str(full.dir), str(tmp_path / "r")))
    with pytest.raises(KdkitError, match="already exists"):
        kdkit.run_config(kdkit.load_config(cfg), "train")  # never overwritten...
    kdkit.run_config(kdkit.load_config(cfg), "train", resume=True)  # ...but resumable
    assert _same(_weights(tmp_path / "r"), _weights(full.dir))


@pytest.mark.slow
def test_kill_9_at_random_moments_resumes_bit_identical(tmp_path, teacher_run):
    """Real SIGKILLs of a CLI distillation at several moments, default threads, each resumed to the end."""
    import signal
    import time

    cfg = tiny_config(None, student={"name": "mlp", "hidden": [16]}, teacher={"checkpoint": str(teacher_run)},
                      method={"name": "kd"}, train={"epochs": 6, "lr": 0.01, "progress": False})
    cfg["data"]["train_subset"] = 1024
    path = _write(tmp_path / "c.yaml", {k: v for k, v in cfg.items() if k != "out_dir"})
    assert _cli("distill", path, f"out_dir={tmp_path / 'full'}").returncode == 0
    reference = _weights(tmp_path / "full")
    for i, delay in enumerate((2.5, 3.0, 3.5, 4.0, 5.0)):
        out = tmp_path / f"k{i}"
        env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
        proc = subprocess.Popen([sys.executable, "-m", "kdkit", "distill", str(path), f"out_dir={out}"], cwd=ROOT,
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if (out / "config.yaml").is_file():
            r = _cli("distill", "--resume", out)
        else:
            r = _cli("distill", path, f"out_dir={out}")
        assert r.returncode == 0, r.stderr
        assert _same(_weights(out), reference), delay


def test_resumed_distillation_is_bit_identical_with_a_cached_teacher(tmp_path, teacher_run, monkeypatch):
    def cfg(out):
        c = tiny_config(out, student={"name": "mlp", "hidden": [16]}, teacher={"checkpoint": str(teacher_run)},
                        method={"name": "kd"}, train={"epochs": 3, "lr": 0.01, "progress": False,
                                                      "teacher_cache": "memory", "threads": 2})
        c["data"]["train_subset"] = 250  # a last batch of 58: which samples share it changes every epoch
        return c

    try:
        full = kdkit.run_config(kdkit.load_config(cfg(tmp_path / "full")), "distill")
        with _killed_after_saving(monkeypatch, 1):
            kdkit.run_config(kdkit.load_config(cfg(tmp_path / "cut")), "distill")
        kdkit.run_config(kdkit.load_config(cfg(tmp_path / "cut")), "distill", resume=True)
    finally:
        torch.set_num_threads(1)
    assert _same(_weights(tmp_path / "cut"), _weights(full.dir))


def test_damaged_resume_files_are_one_line_errors_or_harmless(tmp_path):
    run = kdkit.run_config(kdkit.load_config(_tiny_train_cfg(tmp_path / "r", epochs=2)), "train")
    with open(run.dir / "metrics.jsonl", "a") as fh:  # a half-written line after the saved epochs
        fh.write('{"epoch": 3, "train_lo')
    kdkit.run_config(kdkit.load_config(_tiny_train_cfg(run.dir, epochs=2)), "train", resume=True)
    assert len((run.dir / "metrics.jsonl").read_text().splitlines()) == 2
    state = run.dir / "checkpoints" / "state.safetensors"
    state.write_bytes(state.read_bytes()[:100])  # truncated
    with pytest.raises(KdkitError, match="damaged"):
        kdkit.run_config(kdkit.load_config(_tiny_train_cfg(run.dir, epochs=2)), "train", resume=True)


def test_api_resume_continues_an_interrupted_run(tmp_path, monkeypatch):
    data = _tie_data()

    def go(out, resume=False):
        torch.manual_seed(0)
        return kdkit.train(nn.Linear(4, 2), data, data, epochs=4, lr=0.05, optimizer="sgd", progress=False,
                           out_dir=out, resume=resume)

    full = go(tmp_path / "full")
    with _killed_after_saving(monkeypatch, 2):
        go(tmp_path / "cut")
    resumed = go(tmp_path / "cut", resume=True)
    assert _same(resumed.student.state_dict(), full.student.state_dict())
    assert (tmp_path / "cut" / "config.yaml").is_file()
    with pytest.raises(KdkitError, match="keeps its settings"):
        kdkit.train(nn.Linear(4, 2), data, data, epochs=9, progress=False, out_dir=tmp_path / "cut", resume=True)


# ----------------------------------------------------------------------------- NaN that is not in the loss

class _NaNGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


class _BadLastStep(nn.Module):
    """A finite loss whose gradient is NaN on the ``n``-th training forward."""

    def __init__(self, n):
        super().__init__()
        self.lin, self.n, self.calls = nn.Linear(4, 2), n, 0

    def forward(self, x):
        out = self.lin(x)
        if self.training:
            self.calls += 1
            if self.calls == self.n:
                return _NaNGrad.apply(out)
        return out


def test_nan_gradient_on_an_epochs_last_step_saves_nothing_bad(tmp_path):
    data = _tie_data()  # 128 samples, batch 32: 4 steps per epoch; step 8 is epoch 2's last
    with pytest.raises(KdkitError, match="non-finite in epoch 2"):
        kdkit.train(_BadLastStep(8), data, epochs=3, lr=0.1, optimizer="sgd", batch_size=32, progress=False,
                    out_dir=tmp_path / "r")
    for name in ("last", "best"):
        assert all(torch.isfinite(t).all() for t in _weights(tmp_path / "r", name).values())
    state = load_file(str(tmp_path / "r" / "checkpoints" / "state.safetensors"))
    assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())


def test_nan_in_inputs_is_named_as_a_data_problem():
    x = torch.randn(16, 4)
    x[5, 2] = float("nan")
    with pytest.raises(KdkitError, match="inputs contain NaN or inf .* position 5"):
        kdkit.train(nn.Linear(4, 2), (x, torch.zeros(16).long()), epochs=1, progress=False)


# ----------------------------------------------------------------------------- validate before creating

@pytest.mark.parametrize("override", ["method.alpha=5", "method.temperature=0", "train.lr=.inf",
                                      "train.warmup_epochs=.inf", "seed=1208925819614629174706176",
                                      "data.train_subset=0"])
def test_values_rejected_before_the_run_directory_exists(tmp_path, teacher_run, override, capsys):
    from kdkit.cli import main

    cfg = tiny_config(None, student={"name": "mlp", "hidden": [8]}, teacher={"checkpoint": str(teacher_run)},
                      method={"name": "kd"})
    path = _write(tmp_path / "c.yaml", {k: v for k, v in cfg.items() if k != "out_dir"})
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as e:  # the CLI in this process: same code path, no interpreter start-up
        main(["distill", str(path), f"out_dir={out}", override])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert e.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    assert not out.exists()


def test_out_dir_under_a_file_is_a_one_line_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(KdkitError, match="cannot create run directory"):
        kdkit.run_config(kdkit.load_config(_tiny_train_cfg(tmp_path / "file" / "run")), "train")


def test_integer_tensors_never_load_into_float_weights(tmp_path):
    model = nn.Linear(4, 2)
    save_file({"weight": torch.ones(2, 4, dtype=torch.int32), "bias": torch.zeros(2, dtype=torch.int32)},
              str(tmp_path / "w.safetensors"))
    with pytest.raises(KdkitError, match="int32 in the file but torch.float32"):
        ckpt_mod.load_weights(model, tmp_path / "w.safetensors")


def test_missing_teacher_checkpoint_path_is_named(tmp_path):
    cfg = tiny_config(tmp_path / "r", student={"name": "mlp"}, teacher={"checkpoint": str(tmp_path / "nope")})
    with pytest.raises(KdkitError, match="teacher.checkpoint .*nope not found"):
        kdkit.run_config(kdkit.load_config(cfg), "distill")
    assert not (tmp_path / "r").exists()


def test_unlabelled_data_in_train_is_a_clear_error():
    with pytest.raises(KdkitError, match="needs labelled training data"):
        kdkit.train(nn.Linear(4, 2), torch.randn(8, 4), epochs=1, progress=False)


def test_fit_without_run_dir_keeps_best_in_memory():
    data = _tie_data()
    torch.manual_seed(0)
    method = METHODS.get("supervised")(nn.Linear(4, 2))
    hist = fit(method, data, data, TrainConfig(epochs=3, progress=False, lr=0.05, optimizer="sgd"), batch_size=32)
    assert hist.best_epoch is not None and hist.kept_state is not None


def test_teacher_cache_is_complete_before_the_first_step():
    """What makes a resumed distillation read the same teacher values: the cache is filled in dataset order
    before training, not from whichever epoch's shuffled batches first met each sample."""
    from kdkit.methods.build import build_method
    from kdkit.teacher import Teacher
    from kdkit.teacher.plan import prepare_teacher_cache

    data = _tie_data()
    method = build_method("kd", nn.Linear(4, 2), Teacher(nn.Linear(4, 2)), {}, train_data=data)
    cache, _ = prepare_teacher_cache(method, data, TrainConfig(teacher_cache="memory", progress=False))
    assert cache.has(torch.arange(len(data)))


def test_api_test_label_beyond_the_outputs_fails_before_training(tmp_path):
    x, y = torch.randn(32, 4), torch.randint(0, 2, (32,))
    bad_test = (torch.randn(8, 4), torch.tensor([0, 1, 2, 0, 1, 0, 1, 0]))  # label 2 for a 2-output model
    with pytest.raises(KdkitError, match="test split: label 2 at position 2 is out of range"):
        kdkit.train(nn.Linear(4, 2), (x, y), test_data=bad_test, epochs=1, progress=False, out_dir=tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_api_resume_without_out_dir_is_a_clear_error():
    with pytest.raises(KdkitError, match="resume needs the run directory"):
        kdkit.train(nn.Linear(4, 2), _tie_data(), epochs=1, quiet=True, resume=True)


def test_a_moved_or_copied_run_directory_resumes_wherever_it_lies(tmp_path, monkeypatch):
    """A run directory is something users copy and send: resuming it under another name, a trailing slash or an
    absolute path continues the same run to the same weights; a changed setting is still refused."""
    import shutil

    full = kdkit.run_config(kdkit.load_config(_tiny_train_cfg(tmp_path / "full")), "train")
    with _killed_after_saving(monkeypatch, 1):
        kdkit.run_config(kdkit.load_config(_tiny_train_cfg(tmp_path / "orig")), "train")
    for i, spelling in enumerate([lambda p: str(p), lambda p: str(p) + "/", lambda p: str(p.resolve())]):
        moved = tmp_path / f"elsewhere{i}"
        shutil.copytree(tmp_path / "orig", moved)
        monkeypatch.chdir(tmp_path)
        where = spelling(moved.relative_to(tmp_path)) if i < 2 else spelling(moved)
        cfg = kdkit.load_config(moved / "config.yaml", [f"out_dir={where}"])
        kdkit.run_config(cfg, "train", resume=True)
        assert _same(_weights(moved), _weights(full.dir)), where
    changed = tmp_path / "changed"
    shutil.copytree(tmp_path / "orig", changed)
    cfg = kdkit.load_config(changed / "config.yaml", [f"out_dir={changed}", "train.lr=0.5"])
    with pytest.raises(KdkitError, match="train.lr"):
        kdkit.run_config(cfg, "train", resume=True)


def _torchrun(*args, wait=True):
    """``torchrun --nproc_per_node 2 -m kdkit ...`` on the CPU (gloo), one thread per process, its own session."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), "-m", "kdkit", *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if wait:
        return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_two_process_ddp_distillation_killed_mid_epoch_resumes_bit_identical(tmp_path, teacher_run):
    """kill -9 of the whole torchrun group (both ranks) during an epoch, then --resume under torchrun: the same
    weights as the uninterrupted two-process run."""
    import signal
    import time

    cfg = tiny_config(None, student={"name": "mlp", "hidden": [16]}, teacher={"checkpoint": str(teacher_run)},
                      method={"name": "kd"}, train={"epochs": 8, "lr": 0.01, "progress": False})
    cfg["data"]["train_subset"] = 1024
    path = _write(tmp_path / "c.yaml", {k: v for k, v in cfg.items() if k != "out_dir"})
    r = _torchrun("distill", path, f"out_dir={tmp_path / 'full'}")
    assert r.returncode == 0, r.stderr[-2000:]
    reference = _weights(tmp_path / "full")
    out = tmp_path / "killed"
    proc = _torchrun("distill", path, f"out_dir={out}", wait=False)
    deadline = time.time() + 300
    while not (out / "checkpoints" / "state.safetensors").is_file() and time.time() < deadline:
        time.sleep(0.05)  # killed once the first epoch's resume state is on disk: inside a later epoch
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert 1 <= len(done) < 8  # it really died mid-run
    r = _torchrun("distill", "--resume", out)
    assert r.returncode == 0, r.stderr[-2000:]
    assert _same(_weights(out), reference)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == list(range(1, 9))
