"""Feature capture by module name, connectors, `kdkit inspect`, and the arguments build_method injects."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdkit.cli import run as cli_run
from kdkit.errors import KdkitError
from kdkit.methods import METHODS, Method
from kdkit.methods.base import run_networks
from kdkit.methods.build import build_method
from kdkit.methods.connectors import Resize, make_connector
from kdkit.methods.hooks import (
    FeatureCapture,
    capture,
    embedding_layer,
    feature_maps_by_resolution,
    format_trace,
    last_feature_map,
    trace,
)
from kdkit.models import create_model
from kdkit.teacher import Teacher

SHAPE = (1, 8, 8)



def cnn(name: str = "cnn_small", width: int = 4) -> nn.Module:
    return create_model(name, num_classes=10, input_shape=SHAPE, width=width)


class WithUnused(nn.Module):
    """A model owning a module that its forward never calls."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.unused = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))


# ----------------------------------------------------------------------------- capture


def test_capture_returns_the_modules_outputs_and_inputs():
    model = cnn().eval()
    x = torch.randn(3, *SHAPE)
    with capture(model, ["features.0", "features", "head:input"]) as feats:
        out = model(x)
    with torch.no_grad():
        f0 = model.features[0](x)
        f = model.features(x)
    torch.testing.assert_close(feats["features.0"], f0)
    torch.testing.assert_close(feats["features"], f)
    torch.testing.assert_close(feats["head:input"], torch.flatten(model.pool(f), 1))  # the embedding the head reads
    torch.testing.assert_close(out, model.head(feats["head:input"]))


def test_hooks_are_removed_on_exit_even_after_an_error():
    model = cnn()
    with capture(model, ["features.1"]):
        assert len(model.features[1]._forward_hooks) == 1
    assert len(model.features[1]._forward_hooks) == 0
    with pytest.raises(RuntimeError):
        with capture(model, ["features.1"]):
            model(torch.randn(2, 3, 8, 8))  # wrong channel count
    assert all(len(m._forward_hooks) == 0 for m in model.modules())


def test_unknown_name_lists_existing_names_closest_first():
    with pytest.raises(KdkitError) as err:
        capture(cnn(), "featurs.1")
    msg = str(err.value)
    assert "'featurs.1'" in msg and "kdkit inspect" in msg
    listed = msg.split("closest first: ")[1]
    assert listed.startswith("features.1")  # the closest match comes first
    assert "head" in listed


def test_layer_that_never_fires_is_a_clear_error():
    model = WithUnused()
    with capture(model, ["unused", "body"]) as feats:
        model(torch.randn(2, 4))
    assert feats["body"].shape == (2, 4)
    with pytest.raises(KdkitError, match="never ran"):
        feats["unused"]


def test_output_modified_in_place_after_capture_is_detected():
    model = cnn()  # blocks are conv -> BN -> ReLU(inplace=True) -> pool
    with capture(model, ["features.0.1"]) as feats:
        model(torch.randn(2, *SHAPE))
    with pytest.raises(KdkitError, match="in place"):
        feats["features.0.1"]


def test_teacher_features_are_copied_out_of_inference_mode_in_the_hook():
    t_model = cnn("cnn_large")
    teacher = Teacher(t_model)
    x = torch.randn(4, *SHAPE)
    t_cap = FeatureCapture(t_model, ["features.0.1"], "teacher", copy_out_of_inference=True)
    res = run_networks(cnn(), teacher, {"x": x}, None, t_cap)  # the path every feature method and combo take
    out, feat = res.teacher_logits, res.teacher_features["features.0.1"]  # an in-place ReLU follows this BN
    assert not out.is_inference() and not feat.is_inference()
    with torch.no_grad():
        bn = t_model.features[0][1](t_model.features[0][0](x))
    torch.testing.assert_close(feat, bn)  # copied in the hook: before the in-place ReLU changed it
    assert (feat < 0).any()
    # The copy can enter a student loss that saves it for backward (an inference tensor could not).
    w = nn.Parameter(torch.ones(()))
    ((w * feat - feat) ** 2).mean().backward()
    assert w.grad is not None
    assert all(len(m._forward_hooks) == 0 for m in t_model.modules())


# ----------------------------------------------------------------------------- trace, defaults, inspect


def test_trace_defaults_on_the_zoo():
    x = torch.randn(2, *SHAPE)
    small, large, mlp = cnn(), cnn("cnn_large"), create_model("mlp", num_classes=10, input_shape=SHAPE)
    rs, rl, rm = trace(small, x), trace(large, x), trace(mlp, x)
    assert last_feature_map(rs) == "features" and last_feature_map(rl) == "features"
    assert last_feature_map(rm) is None
    assert embedding_layer(rs) == "head:input" and embedding_layer(rm) == "3:input"
    assert feature_maps_by_resolution(rs) == {(8, 8): "features.0.2", (4, 4): "features.0", (2, 2): "features"}
    assert feature_maps_by_resolution(rl)[(4, 4)] == "features.2"
    table = format_trace(rs)
    assert "features.1.3" in table and "(B, 8, 2, 2)" in table
    assert small.training  # mode restored


def test_inspect_cli_prints_names_and_shapes(capsys):
    assert cli_run(["inspect", "cnn_small", "--input-shape", "1,8,8"]) == 0
    out = capsys.readouterr().out
    assert "features.1" in out and "(B, 32, 2, 2)" in out and "head" in out
    with pytest.raises(KdkitError, match="--input-shape"):
        cli_run(["inspect", "cnn_small"])


# ----------------------------------------------------------------------------- connectors


@pytest.mark.parametrize("s_shape, t_shape, kind, resize, expect", [
    ((2, 8), (2, 5), "auto", False, nn.Linear),
    ((2, 7, 8), (2, 7, 5), "auto", False, nn.Linear),
    ((2, 4, 3, 3), (2, 6, 3, 3), "auto", False, nn.Conv2d),
    ((2, 4, 3, 3), (2, 4, 3, 3), "auto", False, nn.Identity),
    ((2, 4, 3, 3), (2, 4, 3, 3), "learned", False, nn.Conv2d),
    ((2, 4, 6, 6), (2, 6, 3, 3), "auto", True, nn.Sequential),
])
def test_connector_maps_student_shape_to_teacher_shape(s_shape, t_shape, kind, resize, expect):
    c = make_connector(s_shape, t_shape, kind, resize)
    assert isinstance(c, expect)
    assert c(torch.randn(*s_shape)).shape == t_shape


def test_connector_resize_goes_both_ways():
    assert Resize((3, 3))(torch.randn(1, 2, 6, 6)).shape == (1, 2, 3, 3)
    up = Resize((4, 4))(torch.ones(1, 2, 2, 2))
    torch.testing.assert_close(up, torch.ones(1, 2, 4, 4))


@pytest.mark.parametrize("s_shape, t_shape, kind, resize, match", [
    ((2, 4, 6, 6), (2, 4, 3, 3), "auto", False, "spatial size"),
    ((2, 4, 3, 3), (2, 6, 3, 3), "none", False, "connector is 'none'"),
    ((2, 8), (2, 4, 3, 3), "auto", False, "different number of dimensions"),
    ((2, 8), (2, 8), "conv", False, "must be one of"),
])
def test_connector_errors(s_shape, t_shape, kind, resize, match):
    with pytest.raises(KdkitError, match=match):
        make_connector(s_shape, t_shape, kind, resize)


# ----------------------------------------------------------------------------- feature-method errors


def _batch(n: int = 8):
    return {"x": torch.randn(n, *SHAPE), "y": torch.randint(0, 10, (n,)), "index": torch.arange(n)}


def test_shape_mismatch_without_connector_is_an_error():
    teacher = Teacher(cnn("cnn_large", width=8))  # 16 channels against the student's 8
    with pytest.raises(KdkitError, match="connector is 'none'"):
        build_method("fitnets", cnn(), teacher, {"connector": "none"}, example_batch=_batch())
    # AT pairs maps of different spatial size only when told to resize.
    opts = {"student_layer": "features.0", "teacher_layer": "features.0"}  # 4x4 vs 8x8
    with pytest.raises(KdkitError, match="spatial size"):
        build_method("at", cnn(), teacher, opts, example_batch=_batch())
    m = build_method("at", cnn(), teacher, {**opts, "resize": True}, example_batch=_batch())
    assert torch.isfinite(m(_batch())["loss"])


def test_feature_method_errors_name_the_problem():
    teacher = Teacher(cnn("cnn_large"))
    with pytest.raises(KdkitError, match="closest first: features.1"):
        build_method("fitnets", cnn(), teacher, {"student_layer": "feature.1", "teacher_layer": "features"},
                     example_batch=_batch())
    unused_teacher = Teacher(WithUnused())
    with pytest.raises(KdkitError, match="never ran"):
        build_method("sp", WithUnused(), unused_teacher, {"student_layer": "unused", "teacher_layer": "body"},
                     example_batch={"x": torch.randn(4, 4)})
    with pytest.raises(KdkitError, match="both student_layer and teacher_layer"):
        build_method("sp", cnn(), teacher, {"student_layer": "features"}, example_batch=_batch())
    mlp = create_model("mlp", num_classes=10, input_shape=SHAPE)
    with pytest.raises(KdkitError, match=r"needs \(B, C, H, W\) feature maps"):
        build_method("at", mlp, teacher, {}, example_batch=_batch())
    with pytest.raises(KdkitError, match="example_batch"):
        build_method("fitnets", cnn(), teacher, {})


# ----------------------------------------------------------------------------- build_method injection


def test_build_method_injects_example_batch_num_samples_and_num_classes():
    seen = {}

    @METHODS.register("_probe_injection")
    class Probe(Method):
        def __init__(self, student, teacher, example_batch=None, num_samples=None, num_classes=None, scale=1.0):
            super().__init__(student, teacher)
            seen.update(example_batch=example_batch, num_samples=num_samples, num_classes=num_classes)

    try:
        data = torch.randn(40, *SHAPE), torch.randint(0, 10, (40,))
        from kdkit.data import as_dataset

        build_method("_probe_injection", cnn(), Teacher(cnn("cnn_large")), {"scale": 2.0}, train_data=as_dataset(data))
        assert seen["num_samples"] == 40 and seen["num_classes"] == 10
        assert set(seen["example_batch"]) == {"x", "y", "index"} and len(seen["example_batch"]["x"]) == 16
        torch.testing.assert_close(seen["example_batch"]["x"], data[0][:16])
        with pytest.raises(KdkitError, match="unknown option 'num_samples'"):  # injected, never a user option
            build_method("_probe_injection", cnn(), Teacher(cnn("cnn_large")), {"num_samples": 3})
    finally:
        METHODS._items.pop("_probe_injection", None)


def test_distill_injects_what_feature_methods_need():
    import kdkit

    x, y = torch.randn(48, *SHAPE), torch.randint(0, 10, (48,))
    run = kdkit.distill(cnn("cnn_large"), cnn(), (x, y), method="crd", nce_k=16, epochs=1, batch_size=16,
                        progress=False)
    assert run.student is not None
    run = kdkit.distill(cnn("cnn_large"), cnn(), (x, y), method="fitnets", student_layer="features.0",
                        teacher_layer="features.2", epochs=1, batch_size=16, progress=False)
    assert run.student is not None


@pytest.mark.slow
def test_run_config_injects_what_feature_methods_need(tmp_path, teacher_run):
    import kdkit

    def config(out, method):
        return {"seed": 0, "out_dir": str(out), "data": {"name": "digits", "batch_size": 64, "train_subset": 256},
                "student": {"name": "cnn_small", "width": 4}, "teacher": {"checkpoint": str(teacher_run)},
                "method": method, "train": {"epochs": 1, "lr": 0.01, "progress": False}}

    # CRD sizes its memory bank from the training split; its options are checked before any work starts
    run = kdkit.run_config(kdkit.load_config(config(tmp_path / "crd", {"name": "crd", "nce_k": 32})), "distill")
    assert 0.0 <= run.metrics["student"]["accuracy"] <= 1.0
    with pytest.raises(KdkitError, match="unknown option 'num_samples'"):
        kdkit.run_config(kdkit.load_config(config(tmp_path / "bad", {"name": "crd", "num_samples": 5})), "distill")
