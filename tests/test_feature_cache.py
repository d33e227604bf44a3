"""The teacher cache with features (issue 10): a feature method's teacher layers cached (fp16 by default) so the
teacher runs once. Cached values against a live pass (text: cut to the batch's run length, zeros past each
example), losses cached vs live, training and resume, refusals, and a cache without features never reused."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import kdkit
import kdkit.teacher.plan as plan
import kdkit.training.loop as engine
from kdkit.config import TrainConfig
from kdkit.data import ArrayData
from kdkit.errors import KdkitError
from kdkit.methods.base import Method
from kdkit.methods.build import build_method
from kdkit.teacher import Teacher
from kdkit.teacher.cache import BUILD_COUNTS, CacheSpec, TeacherCache, build_cache, probe, sequence_length
from kdkit.teacher.plan import cache_spec

from .conftest import tiny_config
from .test_trust_runs import _killed_after_saving, _same, _weights

# float16 keeps 11 significant bits: rounding to nearest is off by at most 2^-11 of the value (normal range), and
# by at most half the subnormal spacing, 2^-25, near zero. The live pass may differ from the build's pass by
# float32 noise (other batch shapes in the matrix products): a few float32 ulps, covered by 1e-5 relative.
FP16_RTOL, FP16_ATOL = 2.0 ** -11 + 1e-5, 2.0 ** -25 + 1e-7


def _close_fp16(cached: torch.Tensor, live: torch.Tensor) -> bool:
    return bool(((cached - live).abs() <= FP16_RTOL * live.abs() + FP16_ATOL).all())


# ----------------------------------------------------------------------------- text: a tiny random BERT

C, L = 3, 9


def _bert_pair():
    pytest.importorskip("transformers")
    from kdkit.hf import tiny_bert

    torch.manual_seed(0)
    student = tiny_bert(vocab_size=40, num_labels=C, layers=2, hidden=16, heads=2, dropout=0.0)
    teacher = tiny_bert(vocab_size=40, num_labels=C, layers=4, hidden=24, heads=2, dropout=0.0)
    return student, teacher


def _text_data(n=20):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(1, 40, (n, L), generator=g)
    lengths = torch.tensor([2, 9, 4, 3, 7, 5, 1, 6, 8, 3] * (n // 10))
    x[torch.arange(L)[None, :] >= lengths[:, None]] = 0  # right padding with pad id 0
    return ArrayData(x, torch.randint(0, C, (n,), generator=g), pad_token_id=0)


def _text_method(name, student, teacher, data):
    return build_method(name, student, Teacher(teacher), {}, train_data=data, num_classes=C).eval()


def test_sequence_length_is_the_trimming_rule_of_the_model():
    _, teacher = _bert_pair()
    x = torch.tensor([[5, 6, 0, 0, 0], [7, 0, 0, 0, 0]])
    assert sequence_length(teacher, x) == 2
    assert sequence_length(teacher, torch.zeros(2, 5, dtype=torch.long)) == 1  # at least one column, as trimmed
    teacher.trim = False
    assert sequence_length(teacher, x) is None  # runs at the width it is given
    assert sequence_length(nn.Linear(5, 2), x.float()) is None


def test_text_features_cached_equal_live_up_to_fp16_on_real_positions():
    student, teacher = _bert_pair()
    data = _text_data()
    method = _text_method("tinybert", student, teacher, data)
    spec = cache_spec(method, TrainConfig())
    assert spec.layers == tuple(method.teacher_layers) and spec.feature_dtype == "float16"
    # Built in batches of 8 (run lengths 9, 9, 8), read in other compositions: the shapes follow the reading batch.
    cache = build_cache(teacher, data, spec, batch_size=8, log=lambda m: None)
    assert cache.features.sequence == (True,) * len(method.teacher_layers)
    assert all(shape == (L, 24) for shape in cache.features.shapes)  # stored at the data's full padded length
    live_teacher, cached_teacher = Teacher(teacher), Teacher(teacher)
    cached_teacher.use_cache(cache)
    method.forward_pass({"x": data.x[:2], "index": torch.arange(2)})  # builds the method's hooks
    capture = method._captures[2]
    worst = 0.0
    for idx in (torch.tensor([0, 3]), torch.tensor([6]), torch.tensor([2, 5, 9, 12]), torch.arange(20)):
        batch = {"x": data.x[idx], "index": idx}
        run_len = int((batch["x"] != 0).sum(1).max())
        t_live, f_live = live_teacher.with_features(batch, capture)
        t_hit, f_hit = cached_teacher.with_features(batch, capture)
        assert torch.equal(t_hit, cache.get(idx)) and torch.allclose(t_hit, t_live, rtol=1e-5, atol=1e-6)
        real = batch["x"][:, :run_len] != 0
        for name in method.teacher_layers:
            a, b = f_hit[name], f_live[name]
            assert a.shape == b.shape == (len(idx), run_len, 24), name
            assert a.dtype == torch.float32
            assert _close_fp16(a[real], b[real]), name
            assert torch.equal(a[~real], torch.zeros_like(a[~real]))  # zeros past each example's real length
            worst = max(worst, float((a[real] - b[real]).abs().max()))
    assert cached_teacher.cache_hits == 4 and cached_teacher.live_calls == 0
    assert 0 < cache.meta["feature_fp16_max_abs_error"] and worst > 0  # fp16 really rounded something


@pytest.mark.parametrize("name", ["tinybert", "hidden_mse"])
def test_text_loss_from_the_cache_is_within_fp16_of_the_live_loss(name):
    student, teacher = _bert_pair()
    data = _text_data()
    method = _text_method(name, student, teacher, data)
    batch = {"x": data.x[[1, 2, 6, 11]], "y": data.y[[1, 2, 6, 11]], "index": torch.tensor([1, 2, 6, 11])}
    with torch.no_grad():
        live = method(batch)
        method.teacher.use_cache(build_cache(teacher, data, cache_spec(method, TrainConfig()), log=lambda m: None))
        cached = method(batch)
    assert method.teacher.cache_hits == 1
    part = "hidden"
    # Relative fp16 error of the teacher states (2^-11) moves an MSE against them by about that fraction or less.
    assert cached[part].item() == pytest.approx(live[part].item(), rel=2e-3)
    assert cached["loss"].item() == pytest.approx(live["loss"].item(), rel=2e-3)
    assert cached[part].item() != live[part].item()  # a real fp16 difference: the values came from the cache


def test_text_distillation_trains_from_the_feature_cache(tmp_path):
    student, teacher = _bert_pair()
    data = _text_data()
    method = _text_method("tinybert", student, teacher, data)
    cfg = TrainConfig(epochs=2, lr=1e-3, progress=False, teacher_cache="auto", cache_dir=str(tmp_path))
    hist = engine.fit(method, data, None, cfg, batch_size=8)
    n = len(method.teacher_layers)  # 2 hidden states + 2 x (query, key, value)
    assert f"{n} teacher layers (hf.bert.encoder.layer.1, ..., " in hist.teacher_cache
    assert "in float16" in hist.teacher_cache and n == 8
    assert method.teacher.live_calls == 0 and method.teacher.cache_hits == 6  # 2 epochs x 3 batches


# ----------------------------------------------------------------------------- images: fitnets on a tiny CNN

def _images(n=40):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(n, 1, 8, 8, generator=g)
    return ArrayData(x, (x.mean((1, 2, 3)) > 0).long())


def _cnn_fitnets(data, **options):
    from kdkit.models import create_model

    torch.manual_seed(3)
    teacher = create_model("cnn_small", num_classes=2, input_shape=(1, 8, 8), width=8).eval()
    student = create_model("cnn_small", num_classes=2, input_shape=(1, 8, 8), width=4)
    return build_method("fitnets", student, Teacher(teacher), options, train_data=data)


def test_image_features_and_fitnets_loss_cached_vs_live():
    data = _images()
    method = _cnn_fitnets(data)
    (layer,) = method.teacher_layers
    idx = torch.tensor([3, 0, 17, 39, 8])
    batch = {"x": data.x[idx], "y": data.y[idx], "index": idx}
    with torch.no_grad():
        live = method(batch)
        live_feat = method.forward_pass(batch).teacher_features[layer]
        for dtype in ("float16", "float32"):
            spec = cache_spec(method, TrainConfig(cache_feature_dtype=dtype))
            cache = build_cache(method.teacher.model, data, spec, batch_size=16, log=lambda m: None)
            assert cache.features.sequence == (False,) and cache.features.shapes == (tuple(live_feat.shape[1:]),)
            method.teacher.use_cache(cache)
            hit_feat = method.forward_pass(batch).teacher_features[layer]
            cached = method(batch)
            method.teacher.use_cache(None)
            if dtype == "float16":
                assert _close_fp16(hit_feat, live_feat) and not torch.equal(hit_feat, live_feat)
                assert cached["hint"].item() == pytest.approx(live["hint"].item(), rel=2e-3)
            else:  # float32 features: the live values up to float32 noise of other batch sizes
                assert torch.allclose(hit_feat, live_feat, rtol=1e-5, atol=1e-6)
                assert cached["hint"].item() == pytest.approx(live["hint"].item(), rel=1e-5)
    assert method.teacher.cache_hits == 4


def test_float32_feature_cache_trains_to_the_same_weights_as_the_live_teacher(tmp_path):
    # A linear teacher gives the same float32 values whatever the batch, so the cached run must equal the live one.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 6, generator=g)
    data = ArrayData(x, (x[:, 0] > 0).long())
    results = {}
    for mode in ("off", "memory"):
        torch.manual_seed(0)
        teacher = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 2)).eval()
        student = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
        method = build_method("fitnets", student, Teacher(teacher), {"connector": "learned"}, train_data=data)
        cfg = TrainConfig(epochs=2, lr=0.05, optimizer="sgd", progress=False, teacher_cache=mode,
                          cache_feature_dtype="float32", cache_dir=str(tmp_path))
        method.teacher.live_calls = 0  # not counting the method's dry run at construction
        hist = engine.fit(method, data, None, cfg, seed=3, batch_size=16)
        results[mode] = (method.state_dict(), method.teacher.live_calls, method.teacher.cache_hits, hist.teacher_cache)
    assert results["memory"][1:3] == (0, 12) and results["off"][1:3] == (12, 0)
    assert "teacher layers 2:input in float32" in results["memory"][3]
    for k, v in results["off"][0].items():
        assert torch.equal(v, results["memory"][0][k]), k


def test_resumed_distillation_is_bit_identical_with_a_feature_cache(tmp_path, teacher_run, monkeypatch):
    def cfg(out):
        c = tiny_config(out, student={"name": "mlp", "hidden": [16]}, teacher={"checkpoint": str(teacher_run)},
                        method={"name": "fitnets"}, train={"epochs": 3, "lr": 0.01, "progress": False,
                                                           "teacher_cache": "memory"})
        c["data"]["train_subset"] = 250  # a last batch of 58: which samples share it changes every epoch
        return c

    full = kdkit.run_config(kdkit.load_config(cfg(tmp_path / "full")), "distill")
    with _killed_after_saving(monkeypatch, 1):
        kdkit.run_config(kdkit.load_config(cfg(tmp_path / "cut")), "distill")
    kdkit.run_config(kdkit.load_config(cfg(tmp_path / "cut")), "distill", resume=True)
    assert _same(_weights(tmp_path / "cut"), _weights(full.dir))
    report = json.loads((tmp_path / "cut" / "report.json").read_text())
    assert "teacher layers" in json.dumps(report)  # the resumed run did read its features from the cache


# ----------------------------------------------------------------------------- what cannot be cached

class _ReadsTeacherGradients(Method):
    """Its own forward() takes gradients through the teacher at a layer: a cache of values cannot give those."""

    def __init__(self, student, teacher):
        super().__init__(student, teacher)
        self.teacher_layers = ["0"]

    def forward(self, batch):  # pragma: no cover - only planned here
        raise AssertionError("not trained in this test")


def test_refusals_name_why():
    data = _images()
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 2)).eval()
    own = _ReadsTeacherGradients(nn.Sequential(nn.Flatten(), nn.Linear(64, 2)), Teacher(net))
    mode, reason = plan.cache_plan(own, data, TrainConfig())
    assert mode == "off" and "reads the teacher's layers (0) in its own forward()" in reason
    assert "gradients" in reason
    # RKD and CRD override forward() but take the teacher from forward_pass only: cached
    for name, options in (("rkd", {}), ("crd", {"nce_k": 8})):
        method = build_method(name, nn.Sequential(nn.Flatten(), nn.Linear(64, 2)), Teacher(net), options,
                              train_data=data)
        mode, reason = plan.cache_plan(method, data, TrainConfig())
        assert mode == "memory" and "teacher layers 1:input" in reason, name
    # mixed batches (the teacher sees inputs other than the stored ones): refused as before, for a feature method
    from kdkit.teacher.augment import AugmentedData, Mix

    mixed = AugmentedData(data.x, data.y, Mix(mixup=1.0, seed=0))
    mode, reason = plan.cache_plan(_cnn_fitnets(data), mixed, TrainConfig())
    assert mode == "off" and "mixed" in reason
    # a loader kdkit cannot index
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data.x, data.y), batch_size=8)
    assert plan.cache_plan(_cnn_fitnets(data), loader, TrainConfig())[0] == "off"


# ----------------------------------------------------------------------------- reuse and what is never reused

def test_a_cache_without_features_is_never_used_for_a_feature_method(tmp_path):
    data = _images()
    method = _cnn_fitnets(data)
    teacher = method.teacher.model
    plain = build_cache(teacher, data, CacheSpec(storage="disk"), cache_dir=tmp_path, log=lambda m: None)
    assert plain.features is None
    # its slot is not the feature cache's: building with the layers makes a second cache, never reusing the first
    messages = []
    before = dict(BUILD_COUNTS)
    feat = build_cache(teacher, data, cache_spec(method, TrainConfig(), "disk"), cache_dir=tmp_path,
                       log=messages.append)
    assert BUILD_COUNTS["built"] == before["built"] + 1 and BUILD_COUNTS["reused"] == before["reused"]
    assert feat.path != plain.path and not any("reusing" in m for m in messages)
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 2
    # and if one is handed over anyway, reading features names what is missing
    method.teacher.use_cache(plain)
    with pytest.raises(KdkitError, match=r"holds no features of teacher layer\(s\) features.*outputs only"):
        method({"x": data.x[:4], "y": data.y[:4], "index": torch.arange(4)})
    # the fingerprint check says the layers differ
    assert "teacher layers (it holds none" in TeacherCache.open(plain.path).matches(
        {k: plain.meta[k] for k in ("teacher_fingerprint", "data_fingerprint")}, method.teacher_layers)


def test_kdkit_cache_prebuilds_the_feature_cache_that_distill_then_reuses(tmp_path, teacher_run):
    cfg = tiny_config(tmp_path / "run", student={"name": "mlp", "hidden": [16]},
                      teacher={"checkpoint": str(teacher_run)}, method={"name": "fitnets"},
                      train={"epochs": 1, "lr": 0.01, "progress": False, "teacher_cache": "disk",
                             "cache_dir": str(tmp_path / "cache")})
    info = kdkit.api.cache_config(kdkit.load_config(cfg), log=lambda m: None)
    assert info["layers"] and "teacher layers" in info["description"]
    before = dict(BUILD_COUNTS)
    run = kdkit.run_config(kdkit.load_config(cfg), "distill")
    assert BUILD_COUNTS["reused"] == before["reused"] + 1 and BUILD_COUNTS["built"] == before["built"]
    assert "teacher layers" in json.dumps(json.loads((run.dir / "report.json").read_text()))


def test_probe_tells_sequence_features_from_others():
    student, teacher = _bert_pair()
    data = _text_data()
    names = ["hf.bert.encoder.layer.0", "hf.classifier:input", "hf.bert.pooler"]
    out_shape, layout = probe(teacher, data, torch.device("cpu"), names)
    assert out_shape == (C,)
    assert layout.sequence == (True, False, False)
    assert layout.shapes == ((L, 24), (24,), (24,))
