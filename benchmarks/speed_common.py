"""What the speed benchmark and its torchdistill peer share: the model definitions and the data/weights files.

Plain torch + numpy only, so the peer script can import it from a separate virtual environment without kdkit.
Files are ``.npz`` of plain arrays, loaded with ``allow_pickle=False``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Sequence

import numpy as np
import torch
from torch import nn


def mlp(hidden: Sequence[int], in_features: int = 784, num_classes: int = 10) -> nn.Module:
    """Flatten -> (Linear -> ReLU) per hidden width -> Linear."""
    layers, width = [nn.Flatten()], in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_state(model: nn.Module, path: Path) -> None:
    np.savez(path, **{k: v.detach().cpu().numpy() for k, v in model.state_dict().items()})


def load_state(model: nn.Module, path: Path) -> nn.Module:
    with np.load(path, allow_pickle=False) as f:
        model.load_state_dict({k: torch.from_numpy(f[k]) for k in f.files})
    return model


def load_arrays(path: Path) -> Dict[str, torch.Tensor]:
    with np.load(path, allow_pickle=False) as f:
        return {k: torch.from_numpy(f[k]) for k in f.files}


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    model.eval()
    hits = sum(int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum()) for i in range(0, len(x), batch))
    return hits / len(x)
