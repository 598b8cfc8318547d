"""Shared test helpers: models with randomised BatchNorm statistics, output comparison."""

from __future__ import annotations

import torch
import torch.nn as nn

from hant.tools.testing import randomize_bn  # noqa: F401  (re-exported for the tests)


def max_rel_error(expected: torch.Tensor, actual: torch.Tensor) -> float:
    """max |expected - actual| / max |expected| (0 when both are zero)."""
    scale = expected.abs().max().clamp_min(torch.finfo(expected.dtype).tiny)
    return float((expected - actual).abs().max() / scale)


class TwoBranches(nn.Module):
    """conv-BN-ReLU and conv-BN summed; ``swap`` lists the branches in the other order, so
    the traced graphs of one network have their nodes in different orders."""

    def __init__(self, swap: bool):
        super().__init__()
        self.swap = swap
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8))

    def forward(self, x):
        if self.swap:
            b = self.b(x)
            return self.a(x) + b
        a = self.a(x)
        return a + self.b(x)
