"""The bundled example network: a small MobileNetV2-like CNN that needs no download.

It is what ``hant inspect`` (and later ``hant demo``) works on when no model is named.
Its layers are the ones hant's passes are about: conv-BN-ReLU6 stems, inverted-residual
blocks (1x1 expand, 3x3 depthwise, 1x1 project, BN, residual add), global pooling,
dropout and a classifier. It is sized for 32x32 single-channel images (digits scaled up).
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["ExampleNet", "InvertedResidual", "example_network", "EXAMPLE_INPUT_SHAPE"]

EXAMPLE_INPUT_SHAPE = (1, 1, 32, 32)
"""The input shape the example network is built for: a batch of one 32x32 greyscale image."""


def _conv_bn_relu6(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                   groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    """MobileNetV2's block: expand (1x1), depthwise (3x3), project (1x1, linear), plus a
    residual connection when stride is 1 and the channel count is unchanged."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = in_channels * expand_ratio
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(_conv_bn_relu6(in_channels, hidden, 1))
        layers += [
            _conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


# (expand ratio, output channels, repeats, stride of the first repeat), as in MobileNetV2's table.
_BLOCKS = ((1, 8, 1, 1), (4, 16, 2, 2), (4, 24, 2, 2), (4, 32, 2, 2))


class ExampleNet(nn.Module):
    """A MobileNetV2 in miniature: ``features`` (stem, inverted residuals, head conv) then ``classifier``."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, stem_channels: int = 16,
                 head_channels: int = 64, dropout: float = 0.2):
        super().__init__()
        features: list[nn.Module] = [_conv_bn_relu6(in_channels, stem_channels, 3)]
        channels = stem_channels
        for expand_ratio, out_channels, repeats, stride in _BLOCKS:
            for i in range(repeats):
                features.append(InvertedResidual(channels, out_channels, stride if i == 0 else 1, expand_ratio))
                channels = out_channels
        features.append(_conv_bn_relu6(channels, head_channels, 1))
        self.features = nn.Sequential(*features)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(head_channels, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def example_network(seed: int = 0, **kwargs) -> ExampleNet:
    """The example network in eval mode, with weights drawn from ``seed``.

    The same seed gives the same weights on every call and machine; the global RNG state
    is left as it was. ``kwargs`` go to :class:`ExampleNet`.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ExampleNet(**kwargs)
    return model.eval()
