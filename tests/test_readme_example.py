"""The docs' "Adding a method" example (docs/methods.md), run as written: it registers, trains, caches and
combines."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

import kdkit
from kdkit.methods import METHODS
from kdkit.methods.build import build_method
from kdkit.teacher import Teacher

README = Path(__file__).resolve().parents[1] / "docs" / "methods.md"


def _example_source() -> str:
    text = README.read_text()
    marker = "<!-- example: new method"
    block = re.search(r"```python\n(.*?)```", text[text.index(marker):], re.S)
    return block.group(1)


def test_readme_method_example_runs_as_written():
    if "prob_mse" not in METHODS:
        exec(compile(_example_source(), str(README), "exec"), {"__name__": "readme_example"})
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 6, generator=g)
    y = (x[:, 0] > 0).long()
    teacher = kdkit.train(nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 2)), (x, y), epochs=30, lr=0.3,
                          optimizer="sgd", quiet=True).student
    run = kdkit.distill(teacher, nn.Linear(6, 2), (x, y), (x, y), method="prob_mse", temperature=4.0, epochs=20,
                        lr=0.3, optimizer="sgd", quiet=True)
    assert {"train_match", "train_ce"} <= set(run.history[-1]) and run.metrics["student"]["accuracy"] > 0.7
    # The value the README's formula gives, computed independently.
    method = build_method("prob_mse", nn.Linear(6, 2), Teacher(teacher), {"temperature": 4.0, "ce_weight": 0.5})
    batch = {"x": x[:8], "y": y[:8], "index": torch.arange(8)}
    out = method(batch)
    s, t = method.student(x[:8]), teacher(x[:8])
    expected = ((s / 4).softmax(1) - (t / 4).softmax(1)).pow(2).mean() + 0.5 * nn.functional.cross_entropy(s, y[:8])
    assert torch.allclose(out["loss"], expected, atol=1e-6)
    # It shares the forward inside a combo (it computes its loss from Outputs).
    combo = build_method("combo", nn.Linear(6, 2), Teacher(teacher), {"parts": {"prob_mse": {"weight": 1.0}}},
                         example_batch=batch)
    assert combo.shared == ["prob_mse"]
