"""Shared test helpers: models with randomised BatchNorm statistics, output comparison."""

from __future__ import annotations

import torch

from hant.tools.testing import randomize_bn  # noqa: F401  (re-exported for the tests)


def max_rel_error(expected: torch.Tensor, actual: torch.Tensor) -> float:
    """max |expected - actual| / max |expected| (0 when both are zero)."""
    scale = expected.abs().max().clamp_min(torch.finfo(expected.dtype).tiny)
    return float((expected - actual).abs().max() / scale)
