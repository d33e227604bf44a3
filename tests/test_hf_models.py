"""HFClassifier and tiny_bert: the text-model contract (ids in, mask derived, trailing pad trimmed)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from kdkit import KdkitError  # noqa: E402
from kdkit.hf import HFClassifier, require_hf, tiny_bert  # noqa: E402
from kdkit.hf.models import trim_to_longest  # noqa: E402


def test_require_hf_returns_transformers():
    assert require_hf().__name__ == "transformers"


def test_trim_drops_only_all_pad_columns():
    x = torch.tensor([[5, 6, 0, 0, 0], [7, 0, 0, 0, 0]])
    assert trim_to_longest(x, 0).tolist() == [[5, 6], [7, 0]]
    assert trim_to_longest(torch.zeros(2, 3, dtype=torch.long), 0).shape == (2, 1)


def test_padding_never_changes_logits():
    model = tiny_bert(vocab_size=40, num_labels=3, pad_token_id=1).eval()
    x = torch.tensor([[5, 6, 7, 1], [8, 9, 1, 1]])
    wide = torch.cat([x, torch.ones(2, 6, dtype=torch.long)], 1)  # six more pad columns
    with torch.no_grad():
        a, b = model(x), model(wide)
        # Independent reference: the wrapped model called by hand on the trimmed ids with an explicit mask.
        ref = model.hf(input_ids=x[:, :3], attention_mask=(x[:, :3] != 1).long()).logits
        no_trim = HFClassifier(model.hf, 1, trim=False)(wide)
    assert a.shape == (2, 3)
    torch.testing.assert_close(a, ref)
    torch.testing.assert_close(b, ref)
    torch.testing.assert_close(no_trim, ref, atol=1e-5, rtol=1e-5)  # masked keys: same logits without trimming


def test_tiny_bert_config_and_hook_names():
    model = tiny_bert(vocab_size=30, num_labels=4, layers=3, hidden=16, heads=4)
    cfg = model.hf.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_labels) == (3, 16, 4, 4)
    assert model.pad_token_id == 0 and model.num_labels == 4 and model.vocab_size == 30
    names = dict(model.named_modules())
    assert "hf.bert.encoder.layer.2" in names and "hf.bert.encoder.layer.2.attention.self.query" in names


def test_bad_inputs_are_errors():
    with pytest.raises(KdkitError, match="divisible"):
        tiny_bert(vocab_size=30, num_labels=2, hidden=10, heads=3)
    model = tiny_bert(vocab_size=30, num_labels=2)
    with pytest.raises(KdkitError, match="integer token ids"):
        model(torch.zeros(2, 4))
    with pytest.raises(KdkitError, match="pad id"):
        HFClassifier(model.hf, None)
