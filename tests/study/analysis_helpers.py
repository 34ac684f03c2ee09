"""Tiny models and data for the analysis tests (no training needed)."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn


def tiny_cnn(seed: int = 0, in_channels: int = 2, classes: int = 6) -> nn.Module:
    """A small sequential CNN with paper-style layer names; deterministic weights, eval mode."""
    torch.manual_seed(seed)
    m = nn.Sequential(
        OrderedDict(
            [
                ("conv1", nn.Conv2d(in_channels, 6, 3, padding=1)),
                ("bn1", nn.BatchNorm2d(6)),
                ("relu1", nn.ReLU(inplace=True)),
                ("conv2", nn.Conv2d(6, 8, 3, padding=1)),
                ("relu2", nn.ReLU(inplace=True)),
                ("pool", nn.MaxPool2d(2)),
                ("conv3", nn.Conv2d(8, 8, 3, padding=1)),
                ("relu3", nn.ReLU(inplace=True)),
                ("flatten", nn.Flatten()),
                ("fc", nn.Linear(8 * 4 * 4, classes)),
            ]
        )
    )
    return m.eval()


def batches(
    n: int = 48, bs: int = 16, in_channels: int = 2, classes: int = 6, seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed random (images, labels) batches of 8x8 images."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_channels, 8, 8, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return [(x[i : i + bs], y[i : i + bs]) for i in range(0, n, bs)]
