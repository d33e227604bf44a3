"""Teacher-output cache: exact hits, fp16 and top-k errors, fingerprints, disk memmaps, and when auto refuses."""

import math

import numpy as np
import pytest
import torch
from torch import nn

import kdkit.teacher.plan as plan
import kdkit.training.loop as engine
from kdkit.config import TrainConfig
from kdkit.data import ArrayData
from kdkit.errors import KdkitError
from kdkit.methods import METHODS
from kdkit.methods.base import Method
from kdkit.teacher import Teacher
from kdkit.teacher.cache import (
    CacheSpec,
    TeacherCache,
    build_cache,
    cache_bytes,
    fingerprint_data,
    fingerprint_model,
    is_augmented,
    soft_target_kl,
    topk_compress,
    topk_expand,
)


def _data(n=64, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    return ArrayData(x, (x[:, 0] > 0).long())


def _net(d=6, c=5, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 16), nn.ReLU(), nn.Linear(16, c)).eval()


def test_fp32_cache_hit_returns_exactly_the_live_outputs(tmp_path):
    data, net = _data(), _net()
    cache = build_cache(net, data, CacheSpec("float32"), cache_dir=tmp_path, batch_size=16, log=lambda m: None)
    teacher = Teacher(net)
    idx = torch.tensor([5, 0, 63, 17])
    batch = {"x": data.x[idx], "index": idx}
    live = teacher(batch)
    teacher.use_cache(cache)
    hit = teacher(batch)
    assert teacher.cache_hits == 1
    assert hit.dtype == torch.float32 and torch.equal(hit, live)


def test_fp16_cache_within_half_precision_and_error_reported(tmp_path):
    data, net = _data(), _net()
    cache = build_cache(net, data, CacheSpec("float16"), cache_dir=tmp_path, log=lambda m: None)
    with torch.no_grad():
        live = net(data.x)
    got = cache.get(torch.arange(len(data)))
    err = (got - live).abs().max().item()
    assert 0 < err <= live.abs().max().item() * 2**-11 + 1e-6  # fp16 has an 11-bit significand
    assert cache.meta["fp16_max_abs_error"] == pytest.approx(err, rel=1e-6)
    assert cache.nbytes == len(data) * 5 * 2 + len(data)


def test_topk_reconstruction_on_a_hand_example():
    z = torch.tensor([[2.0, 1.0, 0.0, 0.0]])
    values, indices, rest = topk_compress(z, 1)
    assert values.tolist() == [[2.0]] and indices.tolist() == [[0]]
    # The three other classes share their probability mass uniformly: logit log((e^1 + 1 + 1) / 3).
    assert rest.item() == pytest.approx(math.log((math.e + 2) / 3), rel=1e-6)
    recon = topk_expand(values, indices, rest, 4)
    r = math.log((math.e + 2) / 3)
    assert recon.tolist()[0] == pytest.approx([2.0, r, r, r], rel=1e-6)
    # KL(p ‖ q) by hand at T=1: p = softmax(z); q keeps p_0 and gives each other class (1 - p_0) / 3.
    zs = [2.0, 1.0, 0.0, 0.0]
    p = [math.exp(v) / sum(math.exp(u) for u in zs) for v in zs]
    q = [p[0]] + [(1 - p[0]) / 3] * 3
    kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    assert soft_target_kl(z, recon, 1.0).item() == pytest.approx(kl, rel=1e-5)
    assert kl > 0


def test_topk_cache_reports_its_kl(tmp_path):
    data, net = _data(), _net(c=5)
    cache = build_cache(net, data, CacheSpec("float32", topk=2), cache_dir=tmp_path, log=lambda m: None)
    with torch.no_grad():
        live = net(data.x)
    recon = cache.get(torch.arange(len(data)))
    kl = soft_target_kl(live, recon, 1.0)
    assert cache.meta["topk_kl_mean_t1"] == pytest.approx(kl.mean().item(), rel=1e-4)
    assert cache.meta["topk_kl_max_t1"] == pytest.approx(kl.max().item(), rel=1e-4)
    assert torch.equal(recon.topk(2, dim=1).indices, live.topk(2, dim=1).indices)
    assert "top-2" in cache.describe() and "KL" in cache.describe()
    # values 2 x fp32, indices 2 x int16, rest fp32, done mask
    assert cache.nbytes == cache_bytes(len(data), (5,), CacheSpec("float32", topk=2)) == len(data) * (8 + 4 + 4 + 1)


def test_disk_memmap_roundtrip_and_reuse(tmp_path):
    data, net = _data(), _net()
    messages = []
    cache = build_cache(net, data, CacheSpec("float32", storage="disk"), cache_dir=tmp_path, batch_size=16,
                        log=messages.append)
    assert cache.path is not None and (cache.path / "values.npy").is_file() and cache.complete
    assert isinstance(np.load(cache.path / "values.npy", mmap_mode="r", allow_pickle=False), np.memmap)
    again = build_cache(net, data, CacheSpec("float32", storage="disk"), cache_dir=tmp_path, log=messages.append)
    assert any("reusing" in m for m in messages)
    assert isinstance(again._np["values"], np.memmap)
    with torch.no_grad():
        assert torch.equal(again.get(torch.arange(len(data))), net(data.x))


def test_disk_build_resumes_an_interrupted_cache(tmp_path, monkeypatch):
    data, net = _data(), _net()
    spec = CacheSpec("float32", storage="disk")

    real_forward, calls = net.forward, {"n": 0}

    def dies_after_one_chunk(x):  # a build interrupted (Ctrl-C) after its first 20 rows
        calls["n"] += 1
        if calls["n"] == 3:  # call 1 probes the output shape, call 2 computes the first chunk
            raise KeyboardInterrupt
        return real_forward(x)

    monkeypatch.setattr(net, "forward", dies_after_one_chunk)
    with pytest.raises(KeyboardInterrupt):
        build_cache(net, data, spec, cache_dir=tmp_path, batch_size=20, log=lambda m: None)
    monkeypatch.setattr(net, "forward", real_forward)
    messages = []
    done = build_cache(net, data, spec, cache_dir=tmp_path, log=messages.append)
    assert any("resuming" in m and "20/64" in m for m in messages)
    with torch.no_grad():
        assert torch.equal(done.get(torch.arange(len(data))), net(data.x))


def test_changed_teacher_or_dataset_invalidates_with_a_message(tmp_path):
    data, net = _data(), _net()
    spec = CacheSpec("float32", storage="disk")
    build_cache(net, data, spec, cache_dir=tmp_path, log=lambda m: None)
    fp_model, fp_data = fingerprint_model(net), fingerprint_data(data)
    with torch.no_grad():
        net[0].weight[0, 0] += 1e-3
    assert fingerprint_model(net) != fp_model
    messages = []
    rebuilt = build_cache(net, data, spec, cache_dir=tmp_path, log=messages.append)
    assert any("stale" in m and "teacher weights changed" in m for m in messages)
    with torch.no_grad():
        assert torch.equal(rebuilt.get(torch.arange(len(data))), net(data.x))
    other = ArrayData(data.x.clone(), data.y)
    other.x[3, 2] += 1.0
    assert fingerprint_data(other) != fp_data
    messages.clear()
    build_cache(net, other, spec, cache_dir=tmp_path, log=messages.append)
    assert any("stale" in m and "dataset changed" in m for m in messages)


def _kd(net, c=5):
    student = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, c))
    return METHODS.get("kd")(student, Teacher(net), temperature=4.0, alpha=0.5)


def test_training_with_the_cache_equals_live_training(tmp_path):
    data, net = _data(96), _net(c=2)
    results = {}
    for mode in ("off", "memory"):
        torch.manual_seed(1)
        method = _kd(net, c=2)
        cfg = TrainConfig(epochs=3, lr=0.05, optimizer="sgd", progress=False, teacher_cache=mode,
                          cache_dir=str(tmp_path))
        hist = engine.fit(method, data, None, cfg, seed=3, batch_size=16)
        results[mode] = ([h["train_loss"] for h in hist.epochs], method.student.state_dict(), hist.teacher_cache,
                         method.teacher.live_calls, method.teacher.cache_hits)
    assert results["off"][0] == results["memory"][0]
    for k, v in results["off"][1].items():
        assert torch.equal(v, results["memory"][1][k]), k
    assert results["memory"][2].startswith("dense float32 in memory")
    # Filled before the first step (dataset order): every one of the 3 x 6 batches is answered by the cache.
    assert results["memory"][3:] == (0, 18)
    assert results["off"][2].startswith("off")


class _Augmented(ArrayData):
    augmented = True


def test_auto_refuses_augmented_data_and_explicit_modes_fail():
    net = _net(c=2)
    data = _Augmented(_data().x, _data().y)
    assert is_augmented(data)
    mode, reason = plan.cache_plan(_kd(net, 2), data, TrainConfig(teacher_cache="auto"))
    assert mode == "off" and "augmented" in reason
    with pytest.raises(KdkitError, match="augmented"):
        plan.cache_plan(_kd(net, 2), data, TrainConfig(teacher_cache="memory"))


def _fitnets(net, c=2):
    from kdkit.methods.build import build_method

    student = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, c))
    return build_method("fitnets", student, Teacher(net), {}, train_data=_data())


class _OwnTeacherForward(Method):
    """Reads a teacher layer in its own forward() (and the teacher's weights): no cache can stand in for that."""

    teacher_layers = ("0",)

    def forward(self, batch):  # pragma: no cover - never trained here
        return {"loss": self.teacher.model[0].weight.sum()}


def test_the_cache_is_decided_from_what_the_method_declares():
    net = _net(c=2)
    fit = _fitnets(net)
    assert fit.reads_teacher_features and list(fit.teacher_layers) == ["2:input"]
    # auto: cached with the teacher layer it reads, whose bytes the reason names: 64 rows x 16 floats x 2 bytes
    mode, reason = plan.cache_plan(fit, _data(), TrainConfig(teacher_cache="auto"))
    assert mode == "memory"
    assert f"of which {64 * 16 * 2 / 2**20:.1f} MiB the teacher layers 2:input in float16" in reason
    # a method whose own forward() reads the teacher network: refused, saying why; explicit modes are errors
    own = _OwnTeacherForward(nn.Linear(6, 2), Teacher(net))
    mode, reason = plan.cache_plan(own, _data(), TrainConfig(teacher_cache="auto"))
    assert mode == "off" and "_OwnTeacherForward reads the teacher's layers (0) in its own forward()" in reason
    for mode in ("memory", "disk"):
        with pytest.raises(KdkitError, match=f"teacher_cache={mode} cannot be used: method _OwnTeacherForward"):
            plan.cache_plan(own, _data(), TrainConfig(teacher_cache=mode))
    # a logits method: cached in memory
    kd = _kd(net, 2)
    assert not kd.reads_teacher_features
    assert plan.cache_plan(kd, _data(), TrainConfig(teacher_cache="auto"))[0] == "memory"
    # a combination reads what its parts read: the union of their teacher layers is cached
    from kdkit.methods.build import build_method

    student = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
    combo = build_method("combo", student, Teacher(net), {"parts": {"kd": {}, "fitnets": {}}}, train_data=_data())
    mode, reason = plan.cache_plan(combo, _data(), TrainConfig(teacher_cache="auto"))
    assert mode == "memory" and "teacher layers 2:input" in reason
    combo = build_method("combo", student, Teacher(net), {"parts": {"kd": {}, "mse": {}}}, train_data=_data())
    assert plan.cache_plan(combo, _data(), TrainConfig(teacher_cache="auto"))[0] == "memory"


def test_the_teacher_reads_no_private_hook_state():
    # A forward hook on the teacher no longer changes how the teacher answers (that was read from PyTorch's private
    # _forward_hooks on every call): with a cache attached, a batch with indices is answered from the cache.
    net = _net(c=2)
    teacher = Teacher(net)
    cache = build_cache(net, _data(), CacheSpec(), log=lambda m: None)
    teacher.use_cache(cache)
    handle = net[1].register_forward_hook(lambda *a: None)
    try:
        idx = torch.arange(4)
        teacher({"x": _data().x[idx], "index": idx})
    finally:
        handle.remove()
    assert teacher.cache_hits == 1 and teacher.live_calls == 0


def test_auto_chooses_memory_when_it_fits_else_disk():
    net, data = _net(c=2), _data()
    assert plan.cache_plan(_kd(net, 2), data, TrainConfig())[0] == "memory"
    assert plan.cache_plan(_kd(net, 2), data, TrainConfig(cache_memory_mb=0))[0] == "disk"
    assert plan.cache_plan(METHODS.get("supervised")(_net(c=2)), data, TrainConfig())[0] == "off"
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data.x, data.y), batch_size=8)
    assert plan.cache_plan(_kd(net, 2), loader, TrainConfig())[0] == "off"


def test_disk_cache_is_built_before_training_and_reused(tmp_path):
    data, net = _data(96), _net(c=2)
    cfg = TrainConfig(epochs=1, lr=0.05, progress=False, teacher_cache="disk", cache_dir=str(tmp_path))
    engine.fit(_kd(net, 2), data, None, cfg, batch_size=16)
    (slot,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    reopened = TeacherCache.open(slot)
    assert reopened is not None and reopened.complete
    with torch.no_grad():
        assert torch.equal(reopened.get(torch.arange(96)), net(data.x))
    method = _kd(net, 2)
    engine.fit(method, data, None, cfg, batch_size=16)
    assert method.teacher.live_calls == 0 and method.teacher.cache_hits == 6
