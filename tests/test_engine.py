"""The loop: resume equals uninterrupted, NaN stops with the step and keeps the last good checkpoint."""

import json

import pytest
import torch
from torch import nn

import kdkit
import kdkit.training.loop as engine
from kdkit.config import TrainConfig
from kdkit.data import ArrayData
from kdkit.errors import KdkitError
from kdkit.methods import METHODS
from kdkit.training.checkpoint import read_tensors


def _data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    return ArrayData(x, (x[:, 0] > 0).long())


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 2))


CFG = TrainConfig(epochs=4, optimizer="sgd", lr=0.1, schedule="cosine", warmup_epochs=1, progress=False)


def test_resume_equals_uninterrupted(tmp_path, monkeypatch):
    train, val = _data(), _data(32, seed=1)
    full = METHODS.get("supervised")(_model())
    engine.fit(full, train, val, CFG, run_dir=tmp_path / "full", seed=7, batch_size=16)

    # Interrupt after the second epoch's checkpoint is on disk, as a kill between epochs would.
    real_save = engine.save_training_state
    calls = {"n": 0}

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(engine, "save_training_state", save_then_die)
    broken = METHODS.get("supervised")(_model())
    with pytest.raises(KeyboardInterrupt):
        engine.fit(broken, train, val, CFG, run_dir=tmp_path / "cut", seed=7, batch_size=16)
    monkeypatch.setattr(engine, "save_training_state", real_save)

    resumed = METHODS.get("supervised")(_model())  # fresh weights: everything must come from the checkpoint
    torch.manual_seed(12345)  # disturb the global RNG: resume must restore it
    engine.fit(resumed, train, val, CFG, run_dir=tmp_path / "cut", seed=7, batch_size=16, resume=True)

    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3, 4]


class _NaNAfter(nn.Module):
    """Returns NaN outputs from the ``n``-th training forward on."""

    def __init__(self, n):
        super().__init__()
        self.lin = nn.Linear(6, 2)
        self.n, self.calls = n, 0

    def forward(self, x):
        if self.training:
            self.calls += 1
            if self.calls >= self.n:
                return self.lin(x) * float("nan")
        return self.lin(x)


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path):
    model = _NaNAfter(n=8)  # 96 samples / 16 = 6 steps per epoch: epoch 2, step 2 goes bad
    with pytest.raises(KdkitError) as e:
        kdkit.train(model, _data(), out_dir=tmp_path / "run", epochs=3, lr=0.1, batch_size=16, progress=False)
    msg = str(e.value)
    assert "nan" in msg and "epoch 2, step 2" in msg and "global step 8" in msg and "last good checkpoint" in msg
    saved = read_tensors(tmp_path / "run" / "checkpoints" / "last.safetensors")
    assert all(torch.isfinite(t).all() for t in saved.values())


def test_existing_run_directory_is_never_overwritten(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(KdkitError, match="already exists"):
        kdkit.train(_model(), _data(), out_dir=out, epochs=1, progress=False)
    assert (out / "precious.txt").read_text() == "keep me"


def test_lr_schedule_shapes():
    cfg = TrainConfig(epochs=10, schedule="cosine", warmup_epochs=2)
    assert engine.lr_factor(0, 1, cfg) == pytest.approx(0.5)
    assert engine.lr_factor(2, 1, cfg) == pytest.approx(1.0)
    assert engine.lr_factor(10, 1, cfg) == pytest.approx(0.0, abs=1e-9)
    step = TrainConfig(epochs=10, schedule="step", step_size=3, gamma=0.5)
    assert [engine.lr_factor(e, 1, step) for e in (0, 3, 6)] == [1.0, 0.5, 0.25]


def test_distill_api_on_tensors_improves_over_chance():
    train, val = _data(256), _data(64, seed=1)
    teacher = kdkit.train(_model(), train, val, epochs=20, lr=0.05, optimizer="sgd", progress=False).student
    student = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2))
    run = kdkit.distill(teacher, student, (train.x, train.y), (val.x, val.y), temperature=2.0, alpha=0.5,
                        epochs=20, lr=0.05, optimizer="sgd", progress=False)
    assert run.metrics["student"]["accuracy"] > 0.8
    assert 0.0 <= run.metrics["student"]["agreement"] <= 1.0 and len(run.history) == 20
