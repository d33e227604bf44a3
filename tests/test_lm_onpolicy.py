"""On-policy batches (kdkit.lm.onpolicy) and the gkd method (kdkit.methods.gkd)."""

import pytest
import torch

from kdkit.errors import KdkitError
from kdkit.lm.generate import GenerationConfig
from kdkit.lm.onpolicy import OnPolicy, batch_seed

from .test_lm_generate import Counter

pytest.importorskip("transformers")


def policy(fraction, **gen):
    return OnPolicy(fraction, GenerationConfig(**{"max_new_tokens": 4, "temperature": 0, **gen}), 2, seed=3)


def test_which_batches_are_generated_is_a_function_of_seed_and_batch_number():
    half = policy(0.5)
    picks = [half.chosen(k) for k in range(200)]
    assert picks == [half.chosen(k) for k in range(200)]  # deterministic
    # the same draw made independently: one uniform number from a generator seeded with (seed, k)
    expected = [bool(torch.rand((), generator=torch.Generator().manual_seed(batch_seed(3, k))) < 0.5)
                for k in range(200)]
    assert picks == expected
    assert 70 < sum(picks) < 130
    assert not any(policy(0.0).chosen(k) for k in range(50)) and all(policy(1.0).chosen(k) for k in range(50))
    other = OnPolicy(0.5, GenerationConfig(), 2, seed=4)
    assert [other.chosen(k) for k in range(200)] != picks


def test_generated_batch_keeps_prompts_and_shape_and_drops_the_index():
    x = torch.tensor([[5, 6, 7, 8, 9, 0], [3, 4, 5, 0, 0, 0]])
    y = torch.full_like(x, -100)
    y[:, :-1] = torch.where(x[:, 1:] != 0, x[:, 1:], -100)  # plain text: targets from position 0
    batch = {"x": x, "y": y, "index": torch.tensor([0, 1])}
    pol = policy(1.0, eos_token_id=8)
    out = pol.batch(Counter(), batch, pol.generator(0, torch.device("cpu")))
    assert set(out) == {"x", "y"}
    # prompts: the first 2 tokens; the counter continues 7 8 (eos) in row 0 and 5 6 7 8 in row 1 (cut at width 6)
    assert out["x"].tolist() == [[5, 6, 7, 8, 0, 0], [3, 4, 5, 6, 7, 8]]
    assert out["y"].tolist() == [[-100, 7, 8, -100, -100, -100], [-100, 5, 6, 7, 8, -100]]


def test_bad_fraction_is_a_one_line_error():
    with pytest.raises(KdkitError, match="on_policy"):
        policy(1.5)
