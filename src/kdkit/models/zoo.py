"""A small model zoo sized for CPU machines.

Every factory takes ``num_classes`` and ``input_shape`` (one sample's shape,
e.g. ``(1, 28, 28)`` or ``(64,)``) plus its own options, and returns a plain
``nn.Module`` with readable module names for feature hooks (``features.3``,
``layer2``, ``head``).
"""

from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch
from torch import nn

from ..registry import Registry

MODELS = Registry("model")


def _flat(input_shape: Tuple[int, ...]) -> int:
    return int(math.prod(input_shape))


@MODELS.register("linear")
def linear(num_classes: int, input_shape: Tuple[int, ...]) -> nn.Module:
    """Multinomial logistic regression: flatten, one linear layer."""
    return nn.Sequential(nn.Flatten(), nn.Linear(_flat(input_shape), num_classes))


@MODELS.register("mlp")
def mlp(num_classes: int, input_shape: Tuple[int, ...], hidden: Sequence[int] = (256,),
        dropout: float = 0.0) -> nn.Module:
    """Fully connected network: flatten, ``len(hidden)`` ReLU layers, a linear head."""
    layers: list = [nn.Flatten()]
    width = _flat(input_shape)
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


class ConvNet(nn.Module):
    """Stacked 3x3 conv-BN-ReLU blocks with max-pooling, global average pooling and a linear head.

    Module names: ``features`` (the conv trunk, a Sequential of blocks), ``pool``, ``head``.
    """

    def __init__(self, num_classes: int, in_channels: int, widths: Sequence[int], pool_after: Sequence[int],
                 dropout: float = 0.0):
        super().__init__()
        blocks = []
        c = in_channels
        for i, w in enumerate(widths):
            block = [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            if i in pool_after:
                block.append(nn.MaxPool2d(2))
            blocks.append(nn.Sequential(*block))
            c = w
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.head = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # (B, C, H', W')
        return self.head(self.dropout(torch.flatten(self.pool(x), 1)))


def _channels(input_shape: Tuple[int, ...]) -> int:
    if len(input_shape) != 3:
        raise ValueError(f"a CNN needs image inputs of shape (C, H, W); got {tuple(input_shape)}")
    return input_shape[0]


@MODELS.register("cnn_small")
def cnn_small(num_classes: int, input_shape: Tuple[int, ...], width: int = 16) -> nn.Module:
    """Two conv blocks (width, 2*width): a small CNN student."""
    return ConvNet(num_classes, _channels(input_shape), [width, 2 * width], pool_after=[0, 1])


@MODELS.register("cnn_large")
def cnn_large(num_classes: int, input_shape: Tuple[int, ...], width: int = 32, dropout: float = 0.2) -> nn.Module:
    """Four conv blocks (w, w, 2w, 2w) with pooling after the 2nd and 4th: a CNN teacher."""
    return ConvNet(num_classes, _channels(input_shape), [width, width, 2 * width, 2 * width], pool_after=[1, 3],
                   dropout=dropout)


class BasicBlock(nn.Module):
    """ResNet basic block (He et al. 2016): two 3x3 convs with an identity or 1x1 projection shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet for small images: stem, three stages (``layer1..3``), pooling, ``head``."""

    def __init__(self, num_classes: int, in_channels: int, blocks_per_stage: int, width: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True))
        stages, c = [], width
        for i, w in enumerate((width, 2 * width, 4 * width)):
            layers = []
            for b in range(blocks_per_stage):
                layers.append(BasicBlock(c, w, stride=2 if (b == 0 and i > 0) else 1))
                c = w
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.head(torch.flatten(self.pool(x), 1))


@MODELS.register("resnet_small")
def resnet_small(num_classes: int, input_shape: Tuple[int, ...], depth: int = 8, width: int = 16) -> nn.Module:
    """ResNet-``depth`` for 28x28/32x32 inputs; depth = 6n + 2 (8, 14, 20, ...)."""
    if (depth - 2) % 6:
        raise ValueError(f"resnet_small depth must be 6n+2 (8, 14, 20, ...); got {depth}")
    return ResNet(num_classes, _channels(input_shape), (depth - 2) // 6, width)
