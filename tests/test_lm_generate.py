"""Generation from causal LMs and sequence-level KD data (kdkit.lm.generate)."""

import pytest
import torch
from torch import nn

from kdkit.errors import KdkitError
from kdkit.lm.generate import GenerationConfig, generate, prompt_lengths, sequence_kd_data

transformers = pytest.importorskip("transformers")

PAD = 0
V = 16


class Counter(nn.Module):
    """A contract causal LM whose next token is always (current token + 1) mod V, skipping the pad id.

    Logits are 8 on that token and 0 elsewhere, so greedy decoding gives hand-computable continuations."""

    pad_token_id = PAD

    def __init__(self):
        super().__init__()
        self.calls = 0
        self.w = nn.Parameter(torch.zeros(()))  # something for fingerprints and train()/eval()

    def forward(self, x):
        self.calls += 1
        nxt = (x + 1) % V
        nxt = torch.where(nxt == PAD, torch.ones_like(nxt), nxt)
        return 8.0 * nn.functional.one_hot(nxt, V).float() + self.w


def Wrapped(seed=0):
    """A tiny random GPT-2 behind the contract (kdkit.lm.HFCausalLM: ids -> logits, mask from pad, ``.hf``)."""
    from kdkit.lm import tiny_gpt2

    torch.manual_seed(seed)
    return tiny_gpt2(V, layers=2, hidden=32, heads=2, max_positions=24, pad_token_id=PAD, eos_token_id=2)


PROMPTS = torch.tensor([[5, 6, 0, 0], [9, 10, 11, 12], [3, 0, 0, 0]])


def test_greedy_continuations_eos_and_targets_by_hand():
    out = generate(Counter(), PROMPTS, max_new_tokens=4, temperature=0, eos_token_id=13)
    # row 0: 5 6 | 7 8 9 10; row 1: 9 10 11 12 | 13 (eos, kept) then pad; row 2: 3 | 4 5 6 7
    expected = torch.tensor([[5, 6, 7, 8, 9, 10, 0, 0],
                             [9, 10, 11, 12, 13, 0, 0, 0],
                             [3, 4, 5, 6, 7, 0, 0, 0]])
    assert torch.equal(out.x, expected)
    assert out.prompt_lengths.tolist() == [2, 4, 1] and out.lengths.tolist() == [6, 5, 5]
    m = -100  # targets only where a generated token is predicted: from the last prompt token on
    assert out.y.tolist() == [[m, 7, 8, 9, 10, m, m, m],
                              [m, m, m, 13, m, m, m, m],
                              [4, 5, 6, 7, m, m, m, m]]


def test_max_length_caps_prompt_plus_continuation():
    out = generate(Counter(), PROMPTS, max_new_tokens=4, temperature=0, max_length=5)
    assert out.x.shape == (3, 5)
    assert out.lengths.tolist() == [5, 5, 5]
    assert out.x[1].tolist() == [9, 10, 11, 12, 13]  # 4 prompt tokens: room for one
    assert out.x[0].tolist() == [5, 6, 7, 8, 9] and out.x[2].tolist() == [3, 4, 5, 6, 7]


def test_sampling_is_deterministic_per_seed_and_leaves_the_global_rng_alone():
    model = Wrapped()
    state = torch.get_rng_state()
    a = generate(model, PROMPTS, max_new_tokens=8, temperature=1.0, seed=7)
    b = generate(model, PROMPTS, max_new_tokens=8, temperature=1.0, seed=7)
    c = generate(model, PROMPTS, max_new_tokens=8, temperature=1.0, seed=8)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert not torch.equal(a.x, c.x)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_key_value_cache_gives_the_tokens_of_plain_reruns(temperature):
    model = Wrapped()
    a = generate(model, PROMPTS, max_new_tokens=6, temperature=temperature, seed=3)
    b = generate(model, PROMPTS, max_new_tokens=6, temperature=temperature, seed=3, use_cache=False)
    assert torch.equal(a.x, b.x)


def test_padding_and_prompt_tokens_never_targets_and_pad_after_end():
    out = generate(Wrapped(), PROMPTS, max_new_tokens=5, temperature=1.0, seed=0, eos_token_id=2)
    cols = torch.arange(out.x.shape[1])[None, :]
    assert bool((out.x[cols >= out.lengths[:, None]] == PAD).all())
    assert bool((out.y[cols < out.prompt_lengths[:, None] - 1] == -100).all())
    assert bool((out.y[cols >= out.lengths[:, None] - 1] == -100).all())
    assert torch.equal(out.x[:, :4][cols[:, :4] < out.prompt_lengths[:, None]], PROMPTS[PROMPTS != PAD])
    assert bool(((out.lengths - out.prompt_lengths) <= 5).all())


def test_top_p_near_zero_is_greedy_and_training_flag_restored():
    model = Wrapped()
    model.train()
    greedy = generate(model, PROMPTS, max_new_tokens=5, temperature=0)
    nucleus = generate(model, PROMPTS, max_new_tokens=5, temperature=1.0, top_p=1e-6, seed=1)
    assert torch.equal(greedy.x, nucleus.x)
    assert model.training


def test_prompt_lengths_from_targets():
    x = torch.tensor([[4, 5, 6, 7, 0], [4, 5, 6, 7, 8], [4, 5, 0, 0, 0]])
    y = torch.tensor([[-100, -100, 7, -100, -100],   # prompt 4 5 6, predicts 7
                      [5, 6, 7, 8, -100],            # plain text: default prompt length
                      [-100, -100, -100, -100, -100]])  # nothing predicted: the whole row
    assert prompt_lengths(y, x, PAD, default=3).tolist() == [3, 3, 2]
    assert prompt_lengths(y, x, PAD).tolist() == [3, 1, 2]


def test_bad_inputs_are_one_line_errors():
    with pytest.raises(KdkitError, match="top_p"):
        GenerationConfig(top_p=0)
    with pytest.raises(KdkitError, match="all padding"):
        generate(Counter(), torch.tensor([[0, 0]]), max_new_tokens=2)
    with pytest.raises(KdkitError, match="pad_token_id"):
        generate(nn.Linear(2, 2), PROMPTS, max_new_tokens=2)


def test_sequence_kd_data_holds_the_teachers_continuations_and_is_cached(tmp_path):
    x = torch.tensor([[5, 6, 7, 8, 0], [9, 10, 11, 0, 0]])
    y = torch.tensor([[-100, 7, 8, -100, -100], [-100, -100, -100, -100, -100]])
    teacher = Counter()
    data = sequence_kd_data(teacher, x, y, max_new_tokens=3, temperature=0, cache_dir=tmp_path)
    # prompts: "5 6" (targets start at position 1), "9 10 11" (nothing predicted: the whole row)
    assert data.x.tolist() == [[5, 6, 7, 8, 9, 0], [9, 10, 11, 12, 13, 14]]
    assert data.y.tolist() == [[-100, 7, 8, 9, -100, -100], [-100, -100, 12, 13, 14, -100]]
    files = list(tmp_path.glob("seqkd-*.safetensors"))
    assert len(files) == 1
    calls = teacher.calls
    again = sequence_kd_data(teacher, x, y, max_new_tokens=3, temperature=0, cache_dir=tmp_path)
    assert teacher.calls == calls and torch.equal(again.x, data.x)  # read from disk, no generation
    with torch.no_grad():
        teacher.w.add_(1.0)  # new teacher weights: a new fingerprint, generated again
    sequence_kd_data(teacher, x, y, max_new_tokens=3, temperature=0, cache_dir=tmp_path)
    assert teacher.calls > calls and len(list(tmp_path.glob("seqkd-*.safetensors"))) == 2


def test_sequence_kd_data_takes_token_data_and_trains_with_cross_entropy():
    from kdkit.lm.data import TokenData
    from kdkit.methods.supervised import Supervised

    x = torch.tensor([[5, 6, 7, 8, 0], [9, 10, 11, 0, 0]])
    y = torch.full_like(x, -100)
    y[:, :-1] = torch.where(x[:, 1:] != PAD, x[:, 1:], -100)  # plain text
    data = sequence_kd_data(Counter(), TokenData(x, y, PAD, eos_token_id=8), max_new_tokens=3, temperature=0,
                            prompt_tokens=2)
    assert isinstance(data, TokenData) and data.pad_token_id == PAD and data.eos_token_id == 8
    # prompts "5 6" and "9 10"; the counter continues 7 8 (eos ends the first row) and 11 12 13
    assert data.x.tolist() == [[5, 6, 7, 8, 0], [9, 10, 11, 12, 13]]
    out = Supervised(Wrapped())({"x": data.x, "y": data.y})  # next-token CE on the teacher's tokens only
    logits = out["logits"]
    picked = data.y[:, :logits.shape[1]] != -100
    expected = torch.nn.functional.cross_entropy(logits[picked], data.y[:, :logits.shape[1]][picked])
    assert torch.allclose(out["loss"], expected)
    assert picked.sum() == 5  # 7 8 | 11 12 13: the prompts' tokens are never targets
