"""The lean loop: no host sync per step, exact non-finite step, gradient accumulation, bf16 / channels_last."""

import pytest
import torch
from torch import nn

import kdkit.training.loop as engine
from kdkit.config import TrainConfig
from kdkit.data import ArrayData
from kdkit.errors import KdkitError
from kdkit.methods import METHODS
from kdkit.teacher import Teacher


def _data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    return ArrayData(x, (x[:, 0] > 0).long())


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 2))


def test_host_syncs_per_epoch_not_per_step(monkeypatch):
    """Count tensor -> Python conversions during training: a handful per epoch, none per step."""
    counts = {"n": 0}
    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, **k):
            counts["n"] += 1
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    method = METHODS.get("kd")(_mlp(1), Teacher(_mlp(2)), temperature=2.0, alpha=0.5)
    cfg = TrainConfig(epochs=2, lr=0.05, optimizer="sgd", progress=False, sync_every=1000, teacher_cache="off")
    engine.fit(method, _data(192), None, cfg, batch_size=8)  # 24 steps per epoch
    assert counts["n"] <= 2 * 6, counts  # per epoch: one finiteness check + one metrics sync (+ slack)


@pytest.mark.parametrize("sync_every", [1, 4, 50])
def test_non_finite_loss_names_the_exact_step_whatever_the_sync_interval(tmp_path, sync_every):
    class NaNAt(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.calls = nn.Linear(6, 2), 0

        def forward(self, x):
            if self.training:
                self.calls += 1
                if self.calls == 9:  # 96 / 16 = 6 steps per epoch: epoch 2, step 3
                    return self.lin(x) * float("inf")
            return self.lin(x)

    method = METHODS.get("supervised")(NaNAt())
    (tmp_path / "run").mkdir()
    cfg = TrainConfig(epochs=3, lr=0.05, progress=False, sync_every=sync_every)
    with pytest.raises(KdkitError) as e:
        engine.fit(method, _data(), None, cfg, batch_size=16, run_dir=tmp_path / "run")
    msg = str(e.value)
    assert "epoch 2, step 3 (global step 9)" in msg and "last good checkpoint" in msg


def test_gradient_accumulation_equals_the_big_batch():
    data = _data(96)
    big = METHODS.get("supervised")(_mlp())
    engine.fit(big, data, None, TrainConfig(epochs=2, lr=0.1, optimizer="sgd", progress=False), batch_size=16)
    acc = METHODS.get("supervised")(_mlp())
    cfg = TrainConfig(epochs=2, lr=0.1, optimizer="sgd", progress=False, grad_accum_steps=2)
    # batch 8 x 2 micro-batches: consecutive slices of the same epoch order form the same 16-sample batches
    engine.fit(acc, data, None, cfg, batch_size=8)
    for (k, a), b in zip(big.state_dict().items(), acc.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), k


def test_bf16_autocast_and_channels_last_train_a_cnn():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 8, 8, generator=g)
    data = ArrayData(x, (x.mean((1, 2, 3)) > 0).long())
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(4, 2))
    cfg = TrainConfig(epochs=2, lr=0.05, progress=False, precision="bf16", channels_last=True)
    hist = engine.fit(METHODS.get("supervised")(net), data, None, cfg, batch_size=16)
    assert all(torch.isfinite(torch.tensor(h["train_loss"])) for h in hist.epochs)
    assert net[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert net[0].weight.dtype == torch.float32  # autocast leaves the master weights in fp32
