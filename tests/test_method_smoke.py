"""One training step of EVERY registered method with tiny CPU models.

Each method must give a finite loss, change the student's weights in one optimiser step, return the
student's logits, and leave the teacher untouched. To cover a new method, usually nothing is needed;
a method that needs options gets them in ``EXTRA_OPTIONS``; one that needs a different construction
gets a factory in ``SPECIAL_SETUPS``. ``SKIPPED`` is only for methods whose own test file runs an
equivalent step (name that test in the reason).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict

import pytest
import torch
from torch import nn

from kdkit.errors import KdkitError
from kdkit.methods import METHODS, Method
from kdkit.methods.build import build_method
from kdkit.models import create_model
from kdkit.teacher import Teacher

SHAPE = (1, 8, 8)

NUM_CLASSES = 10
NUM_SAMPLES = 32

# Per-method options for the smoke step (extend for methods that cannot run on their defaults).
EXTRA_OPTIONS: Dict[str, Dict[str, Any]] = {
    "combo": {"parts": {"kd": {"weight": 1.0}, "fitnets": {"weight": 0.5}}},
    "crd": {"nce_k": 8},
}

# name -> factory(student, teacher_module, example_batch) -> Method, for methods built differently.
SPECIAL_SETUPS: Dict[str, Callable[[nn.Module, nn.Module, Dict[str, torch.Tensor]], Method]] = {}

# name -> reason naming the test that covers it.
SKIPPED: Dict[str, str] = {
    "lm_kd": "causal LMs on token batches: tests/test_lm_kd.py::test_one_training_step_of_lm_kd runs this step",
    "gkd": "causal LMs on token batches: tests/test_lm_onpolicy.py::test_gkd_trains_in_the_loop_deterministically "
           "runs its steps",
}

# Methods for transformer encoders: their step runs on tiny text models and token ids (kdkit.hf), not images.
TEXT_METHODS = {"attention_kl", "hidden_cosine", "hidden_mse", "minilm", "tinybert"}


def tiny_student() -> nn.Module:
    return create_model("cnn_small", num_classes=NUM_CLASSES, input_shape=SHAPE, width=4)


def tiny_teacher() -> nn.Module:
    return create_model("cnn_large", num_classes=NUM_CLASSES, input_shape=SHAPE, width=6)


def toy_batch(n: int = 16, seed: int = 0) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(n, *SHAPE, generator=g), "y": torch.randint(0, NUM_CLASSES, (n,), generator=g),
            "index": torch.randperm(NUM_SAMPLES, generator=g)[:n]}


def text_setup():
    """Tiny BERT student (2 layers, width 16) and teacher (4 layers, width 32), 2 heads each, and right-padded
    token-id batches (pad id 0)."""
    pytest.importorskip("transformers")
    from kdkit.hf import tiny_bert

    student = tiny_bert(vocab_size=50, num_labels=NUM_CLASSES, layers=2, hidden=16, heads=2)
    teacher = tiny_bert(vocab_size=50, num_labels=NUM_CLASSES, layers=4, hidden=32, heads=2)

    def ids(n, seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.randint(1, 50, (n, 7), generator=g)
        lengths = torch.randint(1, 8, (n,), generator=g)
        x[torch.arange(7)[None, :] >= lengths[:, None]] = 0
        return {"x": x, "y": torch.randint(0, NUM_CLASSES, (n,), generator=g),
                "index": torch.randperm(NUM_SAMPLES, generator=g)[:n]}

    return student, teacher, ids(16, 0), ids(8, 1)


def make_method(name: str, student: nn.Module, teacher: nn.Module, example_batch: Dict[str, torch.Tensor],
                **options: Any) -> Method:
    """Build registered method ``name`` as the API does (``build_method`` injecting the example batch,
    ``num_samples`` and ``num_classes``), with ``EXTRA_OPTIONS[name]`` and ``options``."""
    if name in SPECIAL_SETUPS:
        return SPECIAL_SETUPS[name](student, teacher, example_batch)
    cls = METHODS.get(name)
    t = Teacher(teacher) if getattr(cls, "needs_teacher", True) else None
    return build_method(name, student, t, {**EXTRA_OPTIONS.get(name, {}), **options}, example_batch=example_batch,
                        num_samples=NUM_SAMPLES, num_classes=NUM_CLASSES)


@pytest.mark.parametrize("name", METHODS.names())
def test_one_training_step(name):
    if name in SKIPPED:
        pytest.skip(SKIPPED[name])
    torch.manual_seed(0)
    if name in TEXT_METHODS:
        student, teacher, batch, example = text_setup()
    else:
        student, teacher, batch, example = tiny_student(), tiny_teacher(), toy_batch(), toy_batch(8, seed=1)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    method = make_method(name, student, teacher, example)
    params = [p for p in method.parameters() if p.requires_grad]
    assert not {id(p) for p in teacher.parameters()} & {id(p) for p in params}, "teacher must not be trained"
    before = [p.detach().clone() for p in method.student.parameters()]
    opt = torch.optim.SGD(params, lr=0.05)
    method.train()
    out = method(batch)
    loss = out["loss"]
    assert loss.dim() == 0 and math.isfinite(loss.item()), f"{name}: loss {loss.item()}"
    assert out["logits"].shape == (len(batch["x"]), NUM_CLASSES)
    for key, value in out.items():
        if key not in ("loss", "logits") and torch.is_tensor(value) and value.dim() == 0:
            assert math.isfinite(float(value)), f"{name}: part {key} = {float(value)}"
    opt.zero_grad()
    loss.backward()
    opt.step()
    changed = [not torch.equal(a, b.detach()) for a, b in zip(before, method.student.parameters())]
    assert any(changed), f"{name}: one step left the student's weights unchanged"
    assert all(torch.equal(v, teacher.state_dict()[k])
               for k, v in teacher_before.items()), f"{name} changed the teacher"


BEYOND_LOGITS = ["at", "attention_weighted", "cc", "crd", "dist", "dkd", "fitnets", "kd_ls", "nst", "pkt", "rkd", "sp"]
NEEDS_MAPS = {"at", "attention_weighted", "nst"}


@pytest.mark.parametrize("name", BEYOND_LOGITS)
def test_mlp_student_runs_on_defaults_or_says_what_to_give(name):
    """With the zoo's ``mlp`` student, defaults work except where conv maps are required: a clear error."""
    mlp = create_model("mlp", num_classes=NUM_CLASSES, input_shape=SHAPE, hidden=(12,))
    if name in NEEDS_MAPS:
        with pytest.raises(KdkitError, match=r"feature maps.*student_layer and teacher_layer"):
            make_method(name, mlp, tiny_teacher(), toy_batch(8))
        return
    method = make_method(name, mlp, tiny_teacher(), toy_batch(8))
    out = method(toy_batch())
    assert math.isfinite(out["loss"].item())
