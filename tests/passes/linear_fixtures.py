"""Shared by the fold_linear / fuse_parallel tests: a cost model whose numbers the tests control,
training-time re-parameterisable blocks (RepVGG, ACNet, DBB, MobileOne), and small helpers."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.fx import GraphModule

from helpers import max_rel_error

from hant.cost_models import Cost, NodeSumCostModel
from hant.graphs.ops import conv_of, is_input_guard, linear_of, op_kind, output_shape
from hant.passes import PassContext


class MacCost(NodeSumCostModel):
    """latency = overhead per op + MACs x 1 ns + output elements x 0.1 ns (shape/view ops are free).

    Deterministic and simple enough that a test can say which rewrite must win.
    """
    name = "test-macs"
    overhead_s = 1e-6

    def node_cost(self, node) -> Cost:
        if op_kind(node) in ("shape", "identity", "placeholder", "output", "get_attr"):
            return Cost()
        shape = output_shape(node)
        numel = math.prod(shape) if shape is not None else 0
        conv, lin = conv_of(node), linear_of(node)
        if conv is not None:
            macs = numel * conv.weight_shape[1] * math.prod(conv.kernel_size)
        elif lin is not None:
            macs = numel * lin.in_features
        else:
            macs = 0
        return Cost(latency_s=self.overhead_s + macs * 1e-9 + numel * 1e-10, macs=macs, bytes_written=numel * 4)


def context(**options) -> PassContext:
    return PassContext(cost=MacCost(), options=options)


def output_error(expected, actual) -> float:
    """max_rel_error over a tensor or over each tensor of a tuple of outputs."""
    if isinstance(expected, torch.Tensor):
        expected, actual = (expected,), (actual,)
    return max(max_rel_error(e, a) for e, a in zip(expected, actual))


def run_pass(pass_cls, model: nn.Module, x: torch.Tensor, ctx: PassContext | None = None, method: str = "symbolic"):
    """Trace, run ``pass_cls`` once; return (result graph module, context, modified, relative error)."""
    import hant

    ctx = ctx or context()
    result = pass_cls(ctx)(hant.trace(model, x, method=method))
    with torch.no_grad():
        error = output_error(model(x), result.graph_module(x))
    return result.graph_module, ctx, result.modified, error


def compute_nodes(gm: GraphModule) -> list[str]:
    """op_kind of every node that does work (not placeholders, outputs, get_attr, export's input guard)."""
    return [op_kind(n) for n in gm.graph.nodes
            if n.op in ("call_module", "call_function", "call_method") and not is_input_guard(n)]


def conv_bn(cin: int, cout: int, k, stride: int = 1, padding=0, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, padding, groups=groups, bias=False), nn.BatchNorm2d(cout))


class RepVGGBlock(nn.Module):
    """RepVGG training-time block (no activation): 3x3-BN + 1x1-BN + BN identity (when shapes allow)."""

    def __init__(self, cin: int, cout: int, stride: int = 1, groups: int = 1):
        super().__init__()
        self.dense = conv_bn(cin, cout, 3, stride, 1, groups)
        self.pointwise = conv_bn(cin, cout, 1, stride, 0, groups)
        self.identity = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None

    def forward(self, x):
        y = self.dense(x) + self.pointwise(x)
        return y + self.identity(x) if self.identity is not None else y


class ACNetBlock(nn.Module):
    """ACNet asymmetric convolution block: 3x3-BN + 1x3-BN + 3x1-BN."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.square = conv_bn(cin, cout, 3, stride, 1)
        self.hor = conv_bn(cin, cout, (1, 3), stride, (0, 1))
        self.ver = conv_bn(cin, cout, (3, 1), stride, (1, 0))

    def forward(self, x):
        return self.square(x) + self.hor(x) + self.ver(x)


class DBBBlock(nn.Module):
    """Diverse Branch Block: kxk-BN, 1x1-BN, 1x1 -> kxk-BN, 1x1 -> avgpool -> BN.

    The 1x1 convs that feed a padded op carry no bias (DBB pads with the BN bias through a
    BNAndPad layer instead; here the border stays zero, so the block folds to ONE conv).
    """

    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, internal: int | None = None):
        super().__init__()
        internal = internal or cin
        self.origin = conv_bn(cin, cout, k, stride, k // 2)
        self.one = conv_bn(cin, cout, 1, stride, 0)
        self.reduce = nn.Conv2d(cin, internal, 1, bias=False)
        self.kxk = conv_bn(internal, cout, k, stride, k // 2)
        self.avg_in = nn.Conv2d(cin, cout, 1, bias=False)
        self.avg = nn.AvgPool2d(k, stride, k // 2)
        self.avg_bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return (self.origin(x) + self.one(x) + self.kxk(self.reduce(x))
                + self.avg_bn(self.avg(self.avg_in(x))))


class MobileOneDepthwise(nn.Module):
    """MobileOne depthwise stage: ``branches`` x (3x3 dw-BN) + 1x1 dw-BN + BN identity -> ONE dw conv."""

    def __init__(self, channels: int, branches: int = 3, stride: int = 1):
        super().__init__()
        self.convs = nn.ModuleList(conv_bn(channels, channels, 3, stride, 1, channels) for _ in range(branches))
        self.scale = conv_bn(channels, channels, 1, stride, 0, channels)
        self.skip = nn.BatchNorm2d(channels) if stride == 1 else None

    def forward(self, x):
        y = self.scale(x)
        for conv in self.convs:
            y = y + conv(x)
        return y + self.skip(x) if self.skip is not None else y


class MobileOnePointwise(nn.Module):
    """MobileOne pointwise stage: ``branches`` x (1x1-BN) + BN identity -> ONE 1x1 conv."""

    def __init__(self, cin: int, cout: int, branches: int = 3):
        super().__init__()
        self.convs = nn.ModuleList(conv_bn(cin, cout, 1) for _ in range(branches))
        self.skip = nn.BatchNorm2d(cin) if cin == cout else None

    def forward(self, x):
        y = self.convs[0](x)
        for conv in self.convs[1:]:
            y = y + conv(x)
        return y + self.skip(x) if self.skip is not None else y

