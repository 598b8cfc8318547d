"""Helpers for checking rewrites: models whose BatchNorm folding is not trivially a no-op.

Used by hant's tests and benchmarks, and useful to anyone proving a pass exact on their
own architecture: a freshly built network has BN statistics (mean 0, var 1, weight 1,
bias 0) under which folding changes nothing and proves nothing.
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["randomize_bn"]


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
