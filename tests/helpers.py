"""Shared test helpers: models with randomised BatchNorm statistics, output comparison."""

from __future__ import annotations

import torch
import torch.nn as nn


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm random running statistics and affine parameters, in place.

    Freshly built torchvision models have mean 0, var 1, weight 1, bias 0: folding such a
    BN is a no-op and proves nothing. Returns ``model`` (eval mode) for chaining.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.25)
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                    m.bias.copy_(torch.randn(n, generator=gen) * 0.2)
    return model.eval()


def max_rel_error(expected: torch.Tensor, actual: torch.Tensor) -> float:
    """max |expected - actual| / max |expected| (0 when both are zero)."""
    scale = expected.abs().max().clamp_min(torch.finfo(expected.dtype).tiny)
    return float((expected - actual).abs().max() / scale)
