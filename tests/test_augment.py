"""Replayable crop/flip augmentation (FKD-style views) and the teacher cache that stores one row per view."""

import pytest
import torch
from torch import nn

import kdkit.teacher.plan as plan
import kdkit.training.loop as engine
from kdkit.config import TrainConfig
from kdkit.data import ArrayData
from kdkit.methods import METHODS
from kdkit.teacher import Teacher
from kdkit.teacher.augment import AugmentedData, CropFlip
from kdkit.teacher.cache import CacheSpec, build_cache


def test_crop_flip_on_a_hand_example():
    x = torch.arange(9.0).reshape(1, 1, 3, 3)  # [[0,1,2],[3,4,5],[6,7,8]]
    aug = CropFlip(pad=1, flip=True, views=4, seed=0)
    idx, view = torch.tensor([0]), torch.tensor([0])
    p = aug.params(idx, view)
    dy, dx, flip = int(p["dy"]), int(p["dx"]), bool(p["flip"])
    padded = torch.zeros(5, 5)
    padded[1:4, 1:4] = x[0, 0]
    expected = padded[dy:dy + 3, dx:dx + 3]
    if flip:
        expected = expected.flip(-1)
    assert torch.equal(aug.apply(x, idx, view)[0, 0], expected)
    # no padding, no flip: the identity
    assert torch.equal(CropFlip(pad=0, flip=False).apply(x, idx, view), x)


def test_views_are_a_pure_function_of_sample_and_view():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 2, 6, 6, generator=g)
    aug = CropFlip(pad=2, views=3, seed=5)
    idx = torch.arange(32)
    a = aug.apply(x, idx, torch.full_like(idx, 1))
    b = aug.apply(x[idx.flip(0)], idx.flip(0), torch.full_like(idx, 1)).flip(0)  # other batch order
    assert torch.equal(a, b)
    views = torch.stack([aug.view_of(idx, e) for e in range(6)])
    assert views.min() >= 0 and views.max() < 3 and len(views.unique()) > 1  # views change across epochs
    batch = aug.batch({"x": x[:8], "index": idx[:8]}, epoch=2)
    assert torch.equal(batch["cache_index"], idx[:8] * 3 + aug.view_of(idx[:8], 2))
    assert torch.equal(batch["x"], aug.apply(x[:8], idx[:8], aug.view_of(idx[:8], 2)))


def _setup():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 6, 6, generator=g)
    data = AugmentedData(x, (x.mean((1, 2, 3)) > 0).long(), CropFlip(pad=1, views=2, seed=3))
    torch.manual_seed(1)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(36, 16), nn.ReLU(), nn.Linear(16, 2))
    return data, teacher


def _student():
    torch.manual_seed(2)
    return nn.Sequential(nn.Flatten(), nn.Linear(36, 2))


def test_cached_training_on_augmented_data_equals_live_training(tmp_path):
    data, teacher = _setup()
    out = {}
    for mode in ("off", "memory"):
        method = METHODS.get("kd")(_student(), Teacher(teacher), temperature=2.0, alpha=0.5)
        cfg = TrainConfig(epochs=4, lr=0.05, optimizer="sgd", progress=False, teacher_cache=mode,
                          cache_dir=str(tmp_path))
        hist = engine.fit(method, data, None, cfg, batch_size=16, seed=1)
        out[mode] = (method.student.state_dict(), [h["train_loss"] for h in hist.epochs], method.teacher.live_calls,
                     hist.teacher_cache)
    assert out["off"][1] == pytest.approx(out["memory"][1], rel=1e-6)
    for k, v in out["off"][0].items():
        assert torch.allclose(v, out["memory"][0][k], atol=1e-6), k
    # Cached: the network never ran during training (the cache held every (sample, view) row before it began);
    # live: once per step.
    assert out["memory"][2] == 0 and out["off"][2] == 4 * 4 and "memory" in out["memory"][3]


def test_plan_accepts_replayable_views_and_eager_build_stores_every_view(tmp_path):
    data, teacher = _setup()
    method = METHODS.get("kd")(_student(), Teacher(teacher))
    assert plan.cache_plan(method, data, TrainConfig())[0] == "memory"
    cache = build_cache(teacher, data, CacheSpec(storage="disk"), cache_dir=tmp_path, batch_size=16, log=lambda m: None)
    assert len(cache) == 64 * 2 and cache.complete
    idx = torch.arange(64)
    for v in range(2):
        view = torch.full_like(idx, v)
        with torch.no_grad():
            live = teacher(data.augment.apply(data.x, idx, view))
        assert torch.allclose(cache.get(idx * 2 + v), live, atol=1e-6)
    plain = ArrayData(data.x, data.y)
    plain.augmented = True  # augmentation kdkit cannot replay: still refused
    assert plan.cache_plan(method, plain, TrainConfig())[0] == "off"
