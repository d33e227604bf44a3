"""Function matching (Beyer et al., CVPR 2022): consistent mixup/CutMix views, a live teacher, replayable draws."""

import numpy as np
import pytest
import torch
from torch import nn

import kdkit
import kdkit.teacher.plan as plan
import kdkit.training.loop as engine
from kdkit.api import build_data
from kdkit.config import TrainConfig, load_config
from kdkit.errors import KdkitError
from kdkit.methods import METHODS
from kdkit.teacher import Teacher
from kdkit.teacher.augment import AugmentedData, CropFlip, Mix


def _images(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 6, 6, generator=g)
    return x, (x.mean((1, 2, 3)) > 0).long()


def _nets():
    torch.manual_seed(1)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(36, 16), nn.ReLU(), nn.Linear(16, 2))
    torch.manual_seed(2)
    return teacher, nn.Sequential(nn.Flatten(), nn.Linear(36, 2))


def test_mixup_is_the_convex_combination_with_the_rolled_partner():
    x, y = _images(8)
    mix = Mix(mixup=1.0, cutmix=0.0, seed=3)
    out = mix.batch({"x": x, "y": y, "index": torch.arange(8)}, epoch=2, step=5)
    # The weights, drawn independently with the same generator recipe (Beta(1, 1) = uniform).
    lam = np.random.default_rng([3, 2, 5, 0x4B444B]).beta(1.0, 1.0, 8)
    lam_t = torch.tensor(lam, dtype=torch.float32)
    assert torch.allclose(out["mix_lam"], lam_t)
    for i in range(8):
        expected = lam_t[i] * x[i] + (1 - lam_t[i]) * x[(i + 1) % 8]
        assert torch.allclose(out["x"][i], expected, atol=1e-6)
    assert "y" not in out and torch.equal(out["index"], torch.arange(8))  # mixed images have no single label


def test_cutmix_pastes_a_box_whose_area_is_one_minus_lambda():
    x = torch.arange(8.0)[:, None, None, None].expand(8, 1, 10, 10).clone()  # image i is all i: sources visible
    mix = Mix(mixup=0.0, cutmix=1.0, seed=0)
    p = mix.params(8, 10, 10, epoch=0, step=1)
    out = mix.mix(x, p)
    for i in range(8):
        from_partner = (out[i, 0] == (i + 1) % 8).sum().item()
        assert from_partner == round((1 - p["lam"][i].item()) * 100)  # the box's pixels, nothing else
        t, b, le, r = (int(p[k][i]) for k in ("top", "bottom", "left", "right"))
        assert from_partner == (b - t) * (r - le)
        assert torch.all(out[i, 0, t:b, le:r] == (i + 1) % 8)
    # Both on: each sample takes one of the two, and some of each occur over a few steps.
    both = Mix(mixup=1.0, cutmix=1.0, seed=0)
    kinds = torch.cat([both.params(16, 10, 10, 0, s)["cutmix"] for s in range(4)])
    assert 0 < int(kinds.sum()) < len(kinds)


def test_draws_are_a_pure_function_of_seed_epoch_and_step():
    x, _ = _images(16)
    batch = {"x": x, "index": torch.arange(16)}
    mix = Mix(mixup=1.0, cutmix=1.0, crop_flip=CropFlip(pad=1, seed=4), seed=4)
    a = mix.batch(batch, epoch=1, step=3)["x"]
    again = Mix(mixup=1.0, cutmix=1.0, crop_flip=CropFlip(pad=1, seed=4), seed=4).batch(batch, 1, 3)["x"]
    assert torch.equal(a, again)  # a new object (a resumed process) draws the same
    for other in (mix.batch(batch, 1, 4)["x"], mix.batch(batch, 2, 3)["x"],
                  Mix(1.0, 1.0, CropFlip(pad=1, seed=5), seed=5).batch(batch, 1, 3)["x"]):
        assert not torch.equal(a, other)


def test_teacher_and_student_receive_the_identical_mixed_view_every_step():
    x, y = _images(48)
    data = AugmentedData(x, y, Mix(mixup=1.0, cutmix=1.0, crop_flip=CropFlip(pad=1, seed=0), seed=0))
    teacher_net, student = _nets()
    seen = {"student": [], "teacher": []}
    hooks = [student.register_forward_pre_hook(lambda m, a: seen["student"].append(a[0].clone())),
             teacher_net.register_forward_pre_hook(lambda m, a: seen["teacher"].append(a[0].clone()))]
    method = METHODS.get("kd")(student, Teacher(teacher_net), temperature=1.0, alpha=1.0)
    cfg = TrainConfig(epochs=2, lr=0.05, optimizer="sgd", progress=False)
    hist = engine.fit(method, data, None, cfg, batch_size=16, seed=0)
    for h in hooks:
        h.remove()
    assert len(seen["student"]) == len(seen["teacher"]) == 2 * 3
    for s, t in zip(seen["student"], seen["teacher"]):
        assert torch.equal(s, t)
        # a mixed view: no row equals a training image (nor any crop of one would be a blend of two images)
        assert not any(torch.equal(row, img) for row in s for img in x)
    assert method.teacher.live_calls == 6 and method.teacher.cache_hits == 0  # live on every step
    assert "off" in hist.teacher_cache and "mixup" in hist.teacher_cache
    assert all("train_accuracy" not in r and "train_kd" in r for r in hist.epochs)  # no labels on mixed views


def test_plan_refuses_a_teacher_cache_for_random_mixing():
    x, y = _images(32)
    teacher_net, student = _nets()
    method = METHODS.get("kd")(student, Teacher(teacher_net))
    mixed = AugmentedData(x, y, Mix(mixup=1.0, seed=0))
    mode, reason = plan.cache_plan(method, mixed, TrainConfig())
    assert mode == "off" and "mixup" in reason and "live" in reason
    for asked in ("memory", "disk"):
        with pytest.raises(KdkitError, match=f"teacher_cache={asked} cannot be used: .*mixed"):
            plan.cache_plan(method, mixed, TrainConfig(teacher_cache=asked))
    # crop/flip alone is a finite set of views: still cached
    assert plan.cache_plan(method, AugmentedData(x, y, CropFlip(pad=1, views=2)), TrainConfig())[0] == "memory"


def test_config_switch_builds_the_mixed_views_and_refuses_non_images(tmp_path):
    cfg = load_config({"data": {"name": "digits", "augment": "crop_flip", "augment_pad": 1, "mixup": 1.0,
                                "cutmix": 0.5}})
    train = build_data(cfg.data, seed=7).train
    assert isinstance(train.augment, Mix) and train.augment.crop_flip.pad == 1
    assert (train.augment.mixup, train.augment.cutmix, train.augment.seed) == (1.0, 0.5, 7)
    plain = build_data(load_config({"data": {"name": "digits"}}).data).train
    assert not hasattr(plain, "augment")
    csv = tmp_path / "t.csv"
    csv.write_text("a,b,target\n" + "".join(f"{i},{i % 3},{i % 2}\n" for i in range(20)))
    bad = load_config({"data": {"name": "csv", "path": str(csv), "mixup": 1.0}})
    with pytest.raises(KdkitError, match="data.mixup=1 needs an in-memory image dataset"):
        build_data(bad.data)
    with pytest.raises(KdkitError, match="data.cutmix"):
        load_config({"data": {"cutmix": -1}})


def test_resumed_function_matching_run_replays_the_same_views(tmp_path, monkeypatch):
    from tests.test_trust_runs import _killed_after_saving

    x, y = _images(48)
    from kdkit.recipes.function_matching import function_matching

    def go(out, resume=False):
        teacher_net, student = _nets()
        return function_matching(teacher_net, student, (x, y), (x, y), epochs=3, lr=0.05, optimizer="sgd",
                                 batch_size=16, progress=False, out_dir=out, resume=resume, cutmix=1.0)

    full = go(tmp_path / "full")
    with _killed_after_saving(monkeypatch, 1):
        go(tmp_path / "cut")
    resumed = go(tmp_path / "cut", resume=True)
    for k, v in full.student.state_dict().items():
        assert torch.equal(v, resumed.student.state_dict()[k]), k
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in full.history]
    # The recipe is KL at T=1 without labels: the logged loss is the kd part alone.
    assert all(r["train_loss"] == pytest.approx(r["train_kd"]) for r in full.history)
    with pytest.raises(KdkitError, match="needs in-memory images"):
        kdkit.recipes.function_matching.function_matching(*_nets(), torch.randn(10, 4))
