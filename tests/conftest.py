"""Shared fixtures: tiny models and a tiny trained teacher run on a slice of digits."""

from __future__ import annotations

import pytest
import torch

import kdkit

# Tiny tensors: one intra-op thread is faster than two, and far faster on a shared 2-core machine.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _default_output_level():
    """Every test starts at the default output level: an in-process `kdkit --quiet ...` (cli.run) sets it
    process-wide, as the command should, and must not leak into the next test."""
    from kdkit.training import progress

    progress.configure()
    yield
    progress.configure()


def tiny_config(out_dir, **sections):
    """A digits config small enough to train in a second or two."""
    cfg = {
        "seed": 0,
        "out_dir": str(out_dir),
        "data": {"name": "digits", "batch_size": 64, "train_subset": 256},
        "train": {"epochs": 2, "lr": 0.01, "progress": False},
    }
    cfg.update(sections)
    return cfg


@pytest.fixture(scope="session")
def teacher_run(tmp_path_factory):
    """A small CNN teacher trained for a few epochs on a digits slice; returns its run directory."""
    out = tmp_path_factory.mktemp("teacher") / "run"
    cfg = tiny_config(out, model={"name": "cnn_small", "width": 8}, train={"epochs": 3, "lr": 0.01, "progress": False})
    kdkit.run_config(kdkit.load_config(cfg), "train")
    return out
