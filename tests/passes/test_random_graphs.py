"""Property-based: random conv graphs end exact (float64, <= 1e-9) or cleanly refused; no pass crashes.

hypothesis generates chains of convs (strides, paddings, dilations, groups, reflect padding),
BatchNorm before and after, average pools (padded, count_include_pad either way,
ceil_mode), per-channel scale/shift constants, ReLUs, RepVGG/ACNet/DBB-style branch sums
(with BN identity and pooled branches), residual ``x + f(x)``, sibling convs (horizontal
fusion) and a linear head. Each graph is checked three ways: fold_linear and fuse_parallel
alone (they must not raise, their output must match, every decision must carry a reason),
and the whole ``"exact"`` preset under the PassManager (nothing rolled back, output within
1e-9, a second run changes nothing).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from helpers import randomize_bn
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from linear_fixtures import MacCost, context, output_error

import hant
from hant.passes import PassManager
from hant.passes.fold_linear import FoldLinear
from hant.passes.fuse_parallel import FuseParallel

TOL = 1e-9
ACTIONS = {"applied", "refused", "not_cheaper"}


# ---------------------------------------------------------------- building blocks

class Scale(nn.Module):
    """``x * per-channel buffer + scalar``, or ``scalar * x``."""

    def __init__(self, channels: int, per_channel: bool):
        super().__init__()
        self.per_channel = per_channel
        self.register_buffer("gain", torch.linspace(0.5, 1.5, channels).view(1, channels, 1, 1))

    def forward(self, x):
        return x * self.gain + 0.25 if self.per_channel else 1.5 * x


class BranchSum(nn.Module):
    def __init__(self, branches: list[nn.Module]):
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, x):
        y = self.branches[0](x)
        for branch in self.branches[1:]:
            y = y + branch(x)
        return y


class Residual(nn.Module):
    def __init__(self, body: nn.Module, scale_skip: bool):
        super().__init__()
        self.body, self.scale_skip = body, scale_skip

    def forward(self, x):
        return self.body(x) + (x * 0.5 if self.scale_skip else x)


class Siblings(nn.Module):
    """Same-configured convs on one input, each through a ReLU, concatenated (inception-like)."""

    def __init__(self, convs: list[nn.Module]):
        super().__init__()
        self.convs = nn.ModuleList(convs)

    def forward(self, x):
        return torch.cat([torch.relu(conv(x)) for conv in self.convs], 1)


class Head(nn.Module):
    """Global average pool, flatten, then linear -> (scale) -> linear."""

    def __init__(self, channels: int, hidden: int, scale: bool):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.fc2, self.scale = nn.Linear(channels, hidden), nn.Linear(hidden, 3), scale

    def forward(self, x):
        h = self.fc1(torch.flatten(self.pool(x), 1))
        return self.fc2(h * 2.0 if self.scale else h)


def _out(size: int, k: int, s: int, p: int, d: int = 1) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


@st.composite
def conv_layer(draw, cin: int, size: int, allow_reflect: bool = True):
    """(module, cout, new size) for a random plain conv that keeps the spatial size >= 1."""
    cout = draw(st.sampled_from([4, 8]))
    k = draw(st.sampled_from([1, 3]))
    d = draw(st.sampled_from([1, 2])) if k > 1 else 1
    p = draw(st.integers(0, d * (k - 1)))
    s = draw(st.sampled_from([1, 2]))
    if _out(size, k, s, p, d) < 1:
        k, d, p, s = 1, 1, 0, 1
    groups = draw(st.sampled_from([g for g in (1, 2, 4) if cin % g == 0 and cout % g == 0]))
    mode = "reflect" if allow_reflect and p and p < size and draw(st.integers(0, 9)) == 0 else "zeros"
    conv = nn.Conv2d(cin, cout, k, s, p, d, groups, bias=draw(st.booleans()), padding_mode=mode)
    return conv, cout, _out(size, k, s, p, d)


@st.composite
def branch_sum(draw, cin: int, size: int):
    """RepVGG / ACNet / DBB / MobileOne-like branches with one stride and centred paddings."""
    cout = draw(st.sampled_from([cin, 8]))
    stride = draw(st.sampled_from([1, 2])) if size >= 3 else 1
    groups = draw(st.sampled_from([1, 2] if cout % 2 == 0 and cin % 2 == 0 else [1]))
    branches = []
    for kernel in draw(st.lists(st.sampled_from([(3, 3), (1, 1), (1, 3), (3, 1)]), min_size=1, max_size=3)):
        pad = (kernel[0] // 2, kernel[1] // 2)
        layers = [nn.Conv2d(cin, cout, kernel, stride, pad, groups=groups, bias=draw(st.booleans()))]
        if draw(st.booleans()):
            layers.append(nn.BatchNorm2d(cout))
        branches.append(nn.Sequential(*layers))
    if draw(st.booleans()):  # DBB: 1x1 -> kxk (bias-free 1x1 keeps the border exact; with a bias: bias map)
        branches.append(nn.Sequential(nn.Conv2d(cin, cout, 1, bias=draw(st.booleans())),
                                      nn.Conv2d(cout, cout, 3, stride, 1), nn.BatchNorm2d(cout)))
    if draw(st.booleans()):  # DBB: 1x1 -> avg pool -> BN
        branches.append(nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.AvgPool2d(3, stride, 1),
                                      nn.BatchNorm2d(cout)))
    if cout == cin and stride == 1 and draw(st.booleans()):  # identity through BN
        branches.append(nn.BatchNorm2d(cin))
    out = _out(size, 3, stride, 1)
    return BranchSum(branches), cout, out


@st.composite
def block(draw, cin: int, size: int):
    kind = draw(st.sampled_from(["conv", "conv", "bn", "relu", "pool", "scale", "branches", "residual",
                                 "siblings"]))
    if kind == "conv":
        return draw(conv_layer(cin, size))
    if kind == "bn":
        return nn.BatchNorm2d(cin), cin, size
    if kind == "relu":
        return nn.ReLU(), cin, size
    if kind == "scale":
        return Scale(cin, draw(st.booleans())), cin, size
    if kind == "pool":
        k = draw(st.sampled_from([2, 3])) if size >= 3 else 1
        s = draw(st.sampled_from([1, 2]))
        p = draw(st.integers(0, k // 2))
        pool = nn.AvgPool2d(k, s, p, ceil_mode=draw(st.booleans()), count_include_pad=draw(st.booleans()))
        with torch.no_grad():
            out = pool(torch.zeros(1, 1, size, size)).shape[-1]
        return pool, cin, out
    if kind == "branches":
        return draw(branch_sum(cin, size))
    if kind == "siblings":
        first, cout, out = draw(conv_layer(cin, size, allow_reflect=False))
        groups = draw(st.sampled_from([1, 1, first.groups]))   # mostly fusable; grouped ones are refused
        convs = [nn.Conv2d(cin, cout, first.kernel_size, first.stride, first.padding, first.dilation, groups,
                           bias=draw(st.booleans())) for _ in range(draw(st.integers(2, 3)))]
        return Siblings(convs), cout * len(convs), out
    k = draw(st.sampled_from([1, 3]))
    layers = [nn.Conv2d(cin, cin, k, 1, k // 2, groups=draw(st.sampled_from([1, 2, 4])))]
    if draw(st.booleans()):
        layers.append(nn.BatchNorm2d(cin))
    if draw(st.booleans()):
        layers.insert(0, nn.BatchNorm2d(cin))
    return Residual(nn.Sequential(*layers), draw(st.booleans())), cin, size


@st.composite
def graphs(draw):
    """(model in eval mode, float64, random weights and randomised BN statistics; input)."""
    channels, size = 4, draw(st.integers(5, 10))
    first_size = size
    layers = []
    for _ in range(draw(st.integers(1, 5))):
        layer, channels, size = draw(block(channels, size))
        layers.append(layer)
    if draw(st.booleans()):
        layers.append(Head(channels, draw(st.sampled_from([2, 16])), draw(st.booleans())))
    seed = draw(st.integers(0, 2 ** 16))
    torch.manual_seed(seed)
    model = nn.Sequential(*layers)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.reset_parameters()
    model = randomize_bn(model, seed).double()
    return model, torch.randn(2, 4, first_size, first_size, dtype=torch.float64)


def _check_decisions(decisions, name: str) -> None:
    """Every decision of pass ``name`` is a known action with a reason (shown by --hypothesis-show-statistics)."""
    for d in decisions:
        if d.pass_name == name:
            assert d.action in ACTIONS and d.reason, d
            event(f"{name} {d.action}")


RANDOM = settings(max_examples=40, derandomize=True, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@RANDOM
@given(graphs())
def test_passes_alone_are_exact_or_refuse(case):
    model, x = case
    with torch.no_grad():
        expected = model(x)
    for pass_cls in (FoldLinear, FuseParallel):
        ctx = context()
        result = pass_cls(ctx)(hant.trace(model, x))       # must not raise
        result.graph_module.graph.lint()
        with torch.no_grad():
            assert output_error(expected, result.graph_module(x)) <= TOL
        _check_decisions(ctx.decisions, pass_cls.name)


@RANDOM
@given(graphs())
def test_exact_preset_is_exact_and_idempotent(case):
    model, x = case
    manager = PassManager("exact", cost=MacCost(), check=x, rtol=TOL, atol=0.0, fixed_point=True)
    first = manager(hant.trace(model, x))
    assert not first.report.rolled_back, first.report
    for name in ("fold_linear", "fuse_parallel"):
        _check_decisions(first.report.decisions, name)
    with torch.no_grad():
        assert output_error(model(x), first.graph_module(x)) <= TOL
    second = manager(first.graph_module)
    assert not second.modified, second.report
