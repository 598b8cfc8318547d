"""The candidate library of operator substitution (HANT / LANA).

A *site* is a single-entry single-exit region of the teacher that maps a
``(N, C_in, H, W)`` tensor to ``(N, C_out, H/s, W/s)``. A *candidate* is a module that
does the same: it can stand in for the site once it has been distilled to imitate it.

Families, each a function ``SiteShape -> {name: factory}`` in :data:`FAMILIES`, which
users extend with :func:`register_family`:

* ``teacher``: the site's own subgraph (built by the substitution pass, not here);
* ``identity`` where shapes allow;
* ``conv_k{1,3,5}_{act}``: conv-BN-act;
* ``dws_k{3,5,7}_{act}``: depthwise-separable;
* ``ir_k{3,5,7}_e{1,2,3,4,6}[_se]_{act}``: MobileNetV2/V3 inverted residual;
* ``fmb_k{3,5}_e{1,2,4}_{act}``: fused-MBConv (EfficientNetV2);
* ``basic_k3_{act}``, ``bottleneck_e{2,4}_{act}``: ResNet blocks;
* ``svd_r{...}``: low-rank factorisation of the teacher's convs (built by the pass from
  the teacher's weights, see :func:`low_rank_conv`).

Every factory returns a freshly initialised ``nn.Module``; names are readable
(``ir_k5_e4_se_hswish``) and unique within a site.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from hant.errors import PassError

__all__ = ["SiteShape", "FAMILIES", "ACTIVATIONS", "register_family", "candidates_for", "low_rank_conv",
           "ConvBNAct", "InvertedResidual", "FusedMBConv", "BasicBlock", "Bottleneck", "SqueezeExcite"]

Factory = Callable[[], nn.Module]

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": lambda: nn.ReLU(inplace=False),
    "hswish": lambda: nn.Hardswish(),
    "silu": lambda: nn.SiLU(),
}


@dataclass(frozen=True)
class SiteShape:
    """What a candidate must match: channels in and out, and the spatial stride."""
    in_channels: int
    out_channels: int
    stride: int = 1

    def __post_init__(self):
        if self.in_channels < 1 or self.out_channels < 1 or self.stride not in (1, 2):
            raise PassError(f"unsupported site shape {self}: channels must be positive and stride 1 or 2")

    @property
    def keeps_shape(self) -> bool:
        return self.stride == 1 and self.in_channels == self.out_channels


def _make_divisible(value: float, divisor: int = 8) -> int:
    return max(divisor, int(value + divisor / 2) // divisor * divisor)


class ConvBNAct(nn.Sequential):
    """conv(k, stride, groups) -> BN -> optional activation, 'same' padding."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: str | None = "relu"):
        layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
                                   nn.BatchNorm2d(cout)]
        if act is not None:
            layers.append(ACTIVATIONS[act]())
        super().__init__(*layers)


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation with a hard-sigmoid gate (MobileNetV3)."""

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        hidden = _make_divisible(channels / reduction)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.act = nn.ReLU()
        self.fc2 = nn.Conv2d(hidden, channels, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.fc2(self.act(self.fc1(self.pool(x)))))


class _Residual(nn.Module):
    """``body(x) + shortcut(x)``; the shortcut is identity when shapes match, else a 1x1 conv-BN."""

    def __init__(self, body: nn.Module, cin: int, cout: int, stride: int, always_project: bool = False,
                 final_act: str | None = None):
        super().__init__()
        self.body = body
        self.use_identity = stride == 1 and cin == cout and not always_project
        self.shortcut = nn.Identity() if self.use_identity else ConvBNAct(cin, cout, 1, stride, act=None)
        self.act = ACTIVATIONS[final_act]() if final_act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))


class InvertedResidual(nn.Module):
    """MobileNetV2/V3 block: 1x1 expand -> k x k depthwise -> [SE] -> 1x1 project (+ identity when shapes keep)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expansion: int, se: bool, act: str):
        super().__init__()
        hidden = cin * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers.append(ConvBNAct(cin, hidden, 1, act=act))
        layers.append(ConvBNAct(hidden, hidden, kernel, stride, groups=hidden, act=act))
        if se:
            layers.append(SqueezeExcite(hidden))
        layers.append(ConvBNAct(hidden, cout, 1, act=None))
        self.body = nn.Sequential(*layers)
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return out + x if self.use_residual else out


class FusedMBConv(nn.Module):
    """EfficientNetV2 fused-MBConv: k x k expand conv -> 1x1 project (+ identity when shapes keep)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expansion: int, act: str):
        super().__init__()
        hidden = cin * expansion
        if expansion == 1:
            self.body = ConvBNAct(cin, cout, kernel, stride, act=act)
        else:
            self.body = nn.Sequential(ConvBNAct(cin, hidden, kernel, stride, act=act), ConvBNAct(hidden, cout, 1, act=None))
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return out + x if self.use_residual else out


def BasicBlock(cin: int, cout: int, stride: int, act: str) -> nn.Module:
    """ResNet basic block: two 3x3 conv-BN with a residual and a final activation."""
    body = nn.Sequential(ConvBNAct(cin, cout, 3, stride, act=act), ConvBNAct(cout, cout, 3, act=None))
    return _Residual(body, cin, cout, stride, final_act=act)


def Bottleneck(cin: int, cout: int, stride: int, expansion: int, act: str) -> nn.Module:
    """ResNet bottleneck: 1x1 reduce (to cout/expansion) -> 3x3 -> 1x1 expand, residual, activation."""
    mid = max(8, cout // expansion)
    body = nn.Sequential(ConvBNAct(cin, mid, 1, act=act), ConvBNAct(mid, mid, 3, stride, act=act),
                         ConvBNAct(mid, cout, 1, act=None))
    return _Residual(body, cin, cout, stride, final_act=act)


def low_rank_conv(conv: nn.Conv2d, rank: int) -> nn.Sequential:
    """A k x k conv factored by truncated SVD into k x k (rank outputs) -> 1x1 (out channels).

    The factors are initialised from the teacher's weights, so distillation starts from
    the best rank-``rank`` approximation in the Frobenius norm. Only ungrouped convs.
    """
    if conv.groups != 1:
        raise PassError(f"low-rank factorisation needs an ungrouped conv, this one has groups={conv.groups}")
    w = conv.weight.detach()
    cout = w.shape[0]
    u, s, vh = torch.linalg.svd(w.reshape(cout, -1), full_matrices=False)
    rank = max(1, min(rank, s.numel()))
    first = nn.Conv2d(conv.in_channels, rank, conv.kernel_size, conv.stride, conv.padding, conv.dilation, bias=False)
    second = nn.Conv2d(rank, cout, 1, bias=conv.bias is not None)
    root = s[:rank].sqrt()
    with torch.no_grad():
        first.weight.copy_((root[:, None] * vh[:rank]).reshape(rank, *w.shape[1:]))
        second.weight.copy_((u[:, :rank] * root[None, :]).reshape(cout, rank, 1, 1))
        if conv.bias is not None:
            second.bias.copy_(conv.bias.detach())
    return nn.Sequential(first, second)


# ---------------------------------------------------------------- families

def _identity(site: SiteShape) -> dict[str, Factory]:
    return {"identity": nn.Identity} if site.keeps_shape else {}


def _conv(site: SiteShape) -> dict[str, Factory]:
    return {f"conv_k{k}_{a}": (lambda k=k, a=a: ConvBNAct(site.in_channels, site.out_channels, k, site.stride, act=a))
            for k in (1, 3, 5) for a in ACTIVATIONS}


def _depthwise_separable(site: SiteShape) -> dict[str, Factory]:
    def build(k: int, a: str) -> nn.Module:
        return nn.Sequential(ConvBNAct(site.in_channels, site.in_channels, k, site.stride, site.in_channels, act=a),
                             ConvBNAct(site.in_channels, site.out_channels, 1, act=None))
    return {f"dws_k{k}_{a}": (lambda k=k, a=a: build(k, a)) for k in (3, 5, 7) for a in ACTIVATIONS}


def _inverted_residual(site: SiteShape) -> dict[str, Factory]:
    out = {}
    for k in (3, 5, 7):
        for e in (1, 2, 3, 4, 6):
            for se in (False, True):
                for a in ACTIVATIONS:
                    name = f"ir_k{k}_e{e}{'_se' if se else ''}_{a}"
                    out[name] = (lambda k=k, e=e, se=se, a=a:
                                 InvertedResidual(site.in_channels, site.out_channels, k, site.stride, e, se, a))
    return out


def _fused_mbconv(site: SiteShape) -> dict[str, Factory]:
    return {f"fmb_k{k}_e{e}_{a}": (lambda k=k, e=e, a=a:
                                   FusedMBConv(site.in_channels, site.out_channels, k, site.stride, e, a))
            for k in (3, 5) for e in (1, 2, 4) for a in ACTIVATIONS}


def _resnet_blocks(site: SiteShape) -> dict[str, Factory]:
    out: dict[str, Factory] = {f"basic_k3_{a}": (lambda a=a: BasicBlock(site.in_channels, site.out_channels,
                                                                         site.stride, a)) for a in ACTIVATIONS}
    for e in (2, 4):
        for a in ACTIVATIONS:
            out[f"bottleneck_e{e}_{a}"] = (lambda e=e, a=a: Bottleneck(site.in_channels, site.out_channels,
                                                                        site.stride, e, a))
    return out


FAMILIES: dict[str, Callable[[SiteShape], dict[str, Factory]]] = {
    "identity": _identity,
    "conv": _conv,
    "dws": _depthwise_separable,
    "ir": _inverted_residual,
    "fmb": _fused_mbconv,
    "resnet": _resnet_blocks,
}


def register_family(name: str, family: Callable[[SiteShape], dict[str, Factory]]) -> None:
    """Add (or replace) a candidate family: a function from a SiteShape to named factories."""
    FAMILIES[name] = family


def candidates_for(site: SiteShape, families: list[str] | None = None, *,
                   activations: list[str] | None = None) -> dict[str, Factory]:
    """Every candidate of the chosen families (all by default) that fits ``site``, by name.

    ``activations`` (names from :data:`ACTIVATIONS`) keeps only the candidates whose name
    ends in one of them, plus those without an activation suffix (``identity``); None keeps
    every activation choice.
    """
    chosen = list(FAMILIES) if families is None else families
    unknown = [f for f in chosen if f not in FAMILIES]
    if unknown:
        raise PassError(f"unknown candidate families {unknown}; known: {', '.join(FAMILIES)}")
    if activations is not None and not set(activations) <= set(ACTIVATIONS):
        raise PassError(f"unknown activations {sorted(set(activations) - set(ACTIVATIONS))}; "
                        f"known: {', '.join(ACTIVATIONS)}")
    dropped = set(ACTIVATIONS) - set(activations) if activations is not None else set()
    out: dict[str, Factory] = {}
    for family in chosen:
        for name, factory in FAMILIES[family](site).items():
            if name in out:
                raise PassError(f"candidate name {name!r} is produced by two families; names must be unique")
            if name.rpartition("_")[2] in dropped:
                continue
            out[name] = factory
    return out
