"""Export: ONNX and TorchScript files that compute what the PyTorch model does."""

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from kdkit.errors import KdkitError
from kdkit.export import compare, export_model, export_sklearn, run_onnx
from kdkit.models import create_model

pytest.importorskip("onnxruntime")



def _cnn():
    torch.manual_seed(0)
    return create_model("cnn_small", num_classes=4, input_shape=(1, 10, 10), width=4).eval()


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
@pytest.mark.parametrize("fmt,name", [("onnx", "m.onnx"), ("torchscript", "m.pt")])
def test_export_parity_and_dynamic_batch(fmt, name, tmp_path):
    model = _cnn()
    x = torch.randn(16, 1, 10, 10)
    result = export_model(model, x, tmp_path / name, fmt, timing=False)
    assert result["parity"]["max_abs_diff"] <= 1e-4
    assert result["parity"]["argmax_agreement"] == 1.0
    assert result["bytes"] == (tmp_path / name).stat().st_size
    other = torch.randn(3, 1, 10, 10)  # a batch size never seen at export time
    with torch.inference_mode():
        ref = model(other).numpy()
    if fmt == "onnx":
        import onnxruntime as ort

        sess = ort.InferenceSession(str(tmp_path / name), providers=["CPUExecutionProvider"])
        assert [i.name for i in sess.get_inputs()] == ["input"] and [o.name for o in sess.get_outputs()] == ["logits"]
        out = run_onnx(sess, other.numpy())
    else:
        out = torch.jit.load(str(tmp_path / name))(other).detach().numpy()
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_onnx_latency_beside_pytorch(tmp_path):
    result = export_model(_cnn(), torch.randn(8, 1, 10, 10), tmp_path / "m.onnx")
    assert result["pytorch"]["latency_ms_b1"] > 0 and result["onnxruntime"]["ort_latency_ms_b1"] > 0


def test_int8_onnx_export_within_tolerance(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.Adam(model.parameters(), 0.02)
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    result = export_model(model.eval(), x, tmp_path / "q.onnx", int8=True, calibration=x[:128], timing=False)
    assert result["parity"]["argmax_agreement"] >= 0.95
    assert result["parity"]["max_abs_diff"] <= result["parity"]["tolerance"]


def test_mismatch_beyond_tolerance_is_an_error():
    ref = np.array([[1.0, 2.0], [3.0, 0.0]])
    assert compare(ref, ref + 1e-6)["argmax_agreement"] == 1.0
    with pytest.raises(KdkitError, match="beyond the tolerance"):
        compare(ref, ref + np.array([[0.0, 0.1], [0.0, 0.0]]))
    with pytest.raises(KdkitError, match="shape"):
        compare(ref, ref[:1])


def test_bad_format_and_existing_file(tmp_path):
    model, x = _cnn(), torch.randn(2, 1, 10, 10)
    with pytest.raises(KdkitError, match="unknown export format 'tflite'"):
        export_model(model, x, tmp_path / "m.tflite", "tflite")
    with pytest.raises(KdkitError, match="onnx only"):
        export_model(model, x, tmp_path / "m.pt", "torchscript", int8=True)
    (tmp_path / "m.onnx").write_bytes(b"")
    with pytest.raises(KdkitError, match="already exists"):
        export_model(model, x, tmp_path / "m.onnx")


def test_sklearn_student_to_onnx(tmp_path):
    pytest.importorskip("skl2onnx")
    from sklearn.tree import DecisionTreeClassifier

    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5)).astype(np.float32)
    y = (x[:, 0] > 0).astype(int) + (x[:, 1] > 0.5).astype(int)
    tree = DecisionTreeClassifier(max_depth=4, random_state=0).fit(x, y)
    result = export_sklearn(tree, x, tmp_path / "tree.onnx")
    assert result["label_agreement"] == 1.0 and result["parity"]["max_abs_diff"] <= 1e-5


def test_export_cli_on_a_run(tmp_path, capsys):
    from kdkit.api import run_config
    from kdkit.cli import main
    from kdkit.config import load_config

    run_dir = tmp_path / "run"
    run_config(load_config({"out_dir": str(run_dir), "data": {"name": "digits"}, "device": "cpu",
                            "model": {"name": "mlp", "hidden": [16]},
                            "train": {"epochs": 1, "progress": False}}), "train")
    with pytest.raises(SystemExit) as e:
        main(["export", str(run_dir), "--format", "onnx", "--samples", "64"])
    assert e.value.code == 0
    assert (run_dir / "export" / "model.onnx").is_file()
    assert "export_model" in (run_dir / "report.json").read_text()
    with pytest.raises(SystemExit) as e:
        main(["export", str(run_dir), "--format", "keras"])
    assert e.value.code == 2 and "unknown export format" in capsys.readouterr().err


@pytest.mark.parametrize("failure", ["parity", "onnxruntime", "interrupt"])
def test_a_failed_or_interrupted_export_leaves_no_file_behind(tmp_path, monkeypatch, failure):
    import kdkit.export.core as core

    model = create_model("mlp", num_classes=3, input_shape=(4,), hidden=[8]).eval()
    x = torch.randn(16, 4)
    if failure == "parity":
        monkeypatch.setattr(core, "run_onnx", lambda path, x: np.zeros((len(x), 3), dtype=np.float32) + 99)
        expected, match = KdkitError, "differ"
    elif failure == "onnxruntime":
        def broken(float_path, out_path, calibration):
            Path(out_path).write_bytes(b"half-written")
            raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : quantisation broke\nmore lines")
        monkeypatch.setattr(core, "quantize_onnx", broken)
        expected, match = KdkitError, "int8 onnx export model.onnx failed: RuntimeError: .ONNXRuntimeError"
    else:
        def interrupted(*a, **k):
            raise KeyboardInterrupt
        monkeypatch.setattr(core, "run_onnx", interrupted)
        expected, match = KeyboardInterrupt, None
    with pytest.raises(expected, match=match):
        export_model(model, x, tmp_path / "model.onnx", "onnx", int8=failure == "onnxruntime", calibration=x,
                     timing=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
