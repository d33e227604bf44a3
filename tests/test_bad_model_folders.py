"""Model folders whose weights cannot be used end in one clear error: pickles, damaged files, other configs."""

import json

import pytest
import torch

pytest.importorskip("transformers")

import kdkit  # noqa: E402
from kdkit.errors import KdkitError  # noqa: E402


@pytest.fixture
def lm_dir(tmp_path):
    torch.manual_seed(0)
    model = kdkit.lm.tiny_gpt2(60, max_positions=16)
    model.hf.save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def test_a_pickled_checkpoint_is_refused_with_how_to_convert_it(lm_dir):
    weights = lm_dir / "model.safetensors"
    (lm_dir / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    weights.unlink()
    with pytest.raises(KdkitError, match=r"pytorch_model\.bin, a pickle, which kdkit never loads.*save_pretrained"):
        kdkit.lm.load(lm_dir)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_truncated_or_garbage_safetensors_file_is_named(lm_dir, damage):
    weights = lm_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:len(data) // 2] if damage == "truncated" else b"garbage" * 100)
    with pytest.raises(KdkitError, match="model.safetensors"):
        kdkit.lm.load(lm_dir)


def test_a_config_that_does_not_match_its_weights_is_refused(lm_dir):
    config = json.loads((lm_dir / "config.json").read_text())
    config["n_embd"] = config["n_embd"] * 2
    (lm_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(KdkitError, match="config.json|cannot load"):
        kdkit.lm.load(lm_dir)


def test_the_same_checks_guard_text_classifier_folders(tmp_path):
    from kdkit.hf.models import load, tiny_bert

    clf = tiny_bert(30, 3)
    clf.hf.save_pretrained(tmp_path / "clf")
    (tmp_path / "clf" / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(KdkitError, match="model.safetensors"):
        load(tmp_path / "clf", tokenizer=False)
