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


# ----------------------------------------------------------------------------- the gkd method

def _pair(seed=0):
    from kdkit.lm import tiny_gpt2
    from kdkit.teacher import Teacher

    torch.manual_seed(100)
    teacher = Teacher(tiny_gpt2(48, layers=2, hidden=32, heads=2, max_positions=16).eval())
    torch.manual_seed(seed)
    student = tiny_gpt2(48, layers=1, hidden=16, heads=2, max_positions=16)
    return student, teacher


def _batch(n=4, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(2, 48, (n, length), generator=g)
    for i in range(n):  # ragged rows: eos (1) then padding
        end = length - 1 - i
        x[i, end] = 1
        x[i, end + 1:] = 0
    y = torch.full_like(x, -100)
    y[:, :-1] = torch.where(x[:, 1:] != 0, x[:, 1:], -100)
    return {"x": x, "y": y, "index": torch.arange(n)}


def _methods(fraction, **options):
    import copy

    from kdkit.methods.gkd import GKD
    from kdkit.methods.lm_kd import LMKD

    student, teacher = _pair()
    plain = LMKD(copy.deepcopy(student), teacher, divergence="jsd", beta=0.5, alpha=0.7)
    gkd = GKD(student, teacher, divergence="jsd", beta=0.5, alpha=0.7, on_policy=fraction, max_new_tokens=6,
              prompt_tokens=3, seed=5, **options)
    return plain, gkd


def test_gkd_with_lambda_zero_is_lm_kd_exactly():
    plain, gkd = _methods(0.0)
    plain.train(), gkd.train()
    state = torch.get_rng_state()
    for s in range(3):
        batch = _batch(seed=s)
        a, b = plain(batch), gkd(batch)
        assert torch.equal(a["loss"], b["loss"])
        a["loss"].backward(), b["loss"].backward()
    grads_a = [p.grad for p in plain.student.parameters()]
    grads_b = [p.grad for p in gkd.student.parameters()]
    assert all(torch.equal(u, v) for u, v in zip(grads_a, grads_b))
    assert torch.equal(torch.get_rng_state(), state) and int(gkd.batches) == 0


def test_gkd_with_lambda_one_trains_on_generated_tokens_only():
    from kdkit.lm import losses
    from kdkit.lm.generate import generate, prompt_lengths

    _, gkd = _methods(1.0)
    gkd.train()
    batch = _batch()
    out = gkd(batch)
    assert float(out["on_policy"]) == 1.0
    # the same generation, made independently: prompts = the first 3 tokens, generator seeded with (5, batch 0)
    lengths = prompt_lengths(batch["y"], batch["x"], 0, default=3)
    assert lengths.tolist() == [3, 3, 3, 3]
    gen = generate(gkd.student, batch["x"][:, :3], lengths, generator=gkd.policy.generator(0, torch.device("cpu")),
                   max_new_tokens=6, temperature=1.0, eos_token_id=1, max_length=12)
    assert bool((gen.y[:, :2] == -100).all())  # prompt positions predict nothing
    with torch.no_grad():
        s_logits = gkd.student(gen.x)
        t_logits = gkd.teacher.model(gen.x)
    expected = losses.lm_distill_loss(s_logits, t_logits, gen.y[:, :s_logits.shape[1]], divergence="jsd", beta=0.5,
                                      alpha=1.0).loss
    assert torch.allclose(out["loss"], expected, atol=1e-6)
    # the data's continuations play no part: change every token after the prompts, same loss
    _, again = _methods(1.0)
    again.train()
    other = dict(batch, x=torch.cat([batch["x"][:, :3], (batch["x"][:, 3:] + 7) % 46 + 2], dim=1))
    other["x"] = torch.where(batch["x"] == 0, 0, torch.where(batch["x"] == 1, 1, other["x"]))
    assert torch.allclose(again(other)["loss"], out["loss"], atol=1e-6)


def test_gkd_is_deterministic_given_its_seed_and_counts_batches():
    runs = []
    for _ in range(2):
        _, gkd = _methods(0.5)
        gkd.train()
        runs.append([(o["loss"].item(), o["on_policy"].item()) for o in (gkd(_batch(seed=s)) for s in range(6))])
    assert runs[0] == runs[1]
    assert [flag for _, flag in runs[0]] == [float(gkd.policy.chosen(k)) for k in range(6)]
    assert int(gkd.batches) == 6
    gkd.eval()
    gkd(_batch())  # evaluation never generates nor counts
    assert int(gkd.batches) == 6


def test_gkd_trains_in_the_loop_deterministically(tmp_path):
    """The smoke step of tests/test_method_smoke.py for gkd, through kdkit's loop: two runs with one seed give the
    same weights; the logged on_policy part is the fraction of generated batches; the teacher never changes; with
    an offline top-k teacher the data batches read the store and the generated ones run the teacher live."""
    from kdkit.config import TrainConfig
    from kdkit.data.core import ArrayData
    from kdkit.methods.build import build_method
    from kdkit.training.loop import fit

    rows = [_batch(n=4, seed=s) for s in range(4)]
    data = ArrayData(torch.cat([r["x"] for r in rows]), torch.cat([r["y"] for r in rows]))
    cfg = TrainConfig(epochs=1, optimizer="adamw", lr=1e-2, schedule="constant", progress=False, quiet=True)
    results = []
    for topk in (None, None, 4):
        student, teacher = _pair()
        before_t = {k: v.clone() for k, v in teacher.model.state_dict().items()}
        before_s = {k: v.clone() for k, v in student.state_dict().items()}
        torch.manual_seed(11)  # the run's seed, read by gkd when it is built
        options = {"on_policy": 0.5, "max_new_tokens": 5, "prompt_tokens": 3, "divergence": "jsd"}
        if topk:
            options.update(teacher_topk=topk, topk_dir=str(tmp_path / "topk"))
        method = build_method("gkd", student, teacher, options, train_data=data)
        history = fit(method, data, None, cfg, seed=11, batch_size=4, device="cpu")
        record = history.epochs[-1]
        expected = sum(method.policy.chosen(k) for k in range(4)) / 4
        assert record["train_on_policy"] == pytest.approx(expected)
        assert torch.isfinite(torch.tensor(record["train_loss"]))
        assert all(torch.equal(v, teacher.model.state_dict()[k]) for k, v in before_t.items())
        assert any(not torch.equal(v, student.state_dict()[k]) for k, v in before_s.items())
        results.append((student.state_dict(), record, method))
    (a, rec_a, m), (b, _, _), (_, rec_topk, m_topk) = results
    assert all(torch.equal(v, b[k]) for k, v in a.items())
    assert 0.0 < rec_a["train_on_policy"] < 1.0  # this seed mixes both kinds of batches
    assert m_topk.store is not None and rec_topk["train_on_policy"] == rec_a["train_on_policy"]
