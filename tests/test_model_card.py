"""MODEL_CARD.md beside an exported student: its fields come from the run, and a card is never clobbered."""

import json

import pytest
import yaml

import kdkit
from kdkit.errors import KdkitError
from kdkit.export import export_run
from tests.conftest import tiny_config


@pytest.fixture()
def kd_run(teacher_run, tmp_path):
    out = tmp_path / "kd"
    cfg = tiny_config(out, student={"name": "mlp", "hidden": [16]}, teacher={"checkpoint": str(teacher_run)},
                      method={"name": "kd", "temperature": 3.0, "alpha": 0.6})
    kdkit.run_config(kdkit.load_config(cfg), "distill")
    return out


def _section(card: str, title: str) -> str:
    return card.split(f"## {title}", 1)[1].split("\n## ", 1)[0]


def test_card_fields_come_from_config_and_report(kd_run):
    pytest.importorskip("onnxruntime")
    result = export_run(kd_run, "onnx")
    card_file = kd_run / "export" / "MODEL_CARD.md"
    assert result["model_card"] == str(card_file)
    card = card_file.read_text()
    cfg = yaml.safe_load((kd_run / "config.yaml").read_text())
    report = json.loads((kd_run / "report.json").read_text())
    for title in ("Intended use", "Data", "Training procedure", "Metrics", "How to load", "Limitations"):
        assert f"## {title}" in card
    proc = _section(card, "Training procedure")
    assert "Method: `kd` (temperature=3.0, alpha=0.6)" in proc
    assert f"Teacher: cnn_small (ConvNet, {report['run']['teacher']['parameters']:,} parameters)" in proc
    assert f"Epochs: {cfg['train']['epochs']}; kept epoch: {report['kept_epoch']} (best)" in proc
    assert f"Seed: {cfg['seed']};" in proc
    assert "splits: train 256, val 180, test 360" in _section(card, "Data")
    s = report["models"]["student"]
    assert (f"| student | {100 * s['accuracy']:.2f}% | {100 * s['agreement']:.2f}% | {s['ece']:.4f} | "
            f"{s['parameters']:,} |") in _section(card, "Metrics")
    load = _section(card, "How to load")
    assert 'ort.InferenceSession("model.onnx")' in load and "../checkpoints/best.safetensors" in load
    assert "torch.jit.load" not in load  # only formats that were exported
    # A second export into the same folder updates kdkit's own, unedited card: it now names both files.
    export_run(kd_run, "torchscript")
    assert 'torch.jit.load("model.pt"' in card_file.read_text()


def test_an_edited_or_foreign_card_stops_the_export_before_anything_is_written(kd_run):
    pytest.importorskip("onnxruntime")
    export_dir = kd_run / "export"
    export_dir.mkdir()
    card = export_dir / "MODEL_CARD.md"
    card.write_text("# my own notes\n")
    with pytest.raises(KdkitError, match="MODEL_CARD.md already exists and is not an unedited card"):
        export_run(kd_run, "onnx")
    assert card.read_text() == "# my own notes\n" and not (export_dir / "model.onnx").exists()
    card.unlink()
    export_run(kd_run, "onnx")
    card.write_text(card.read_text().replace("## Limitations", "## Limitations\n\n- edited by hand"))
    with pytest.raises(KdkitError, match="not an unedited card"):
        export_run(kd_run, "torchscript")
    assert "edited by hand" in card.read_text() and not (export_dir / "model.pt").exists()
