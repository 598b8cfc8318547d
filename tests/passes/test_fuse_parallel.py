"""fuse_parallel: sibling convs/linears become one op plus a split, exactly, when the cost model agrees."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torchvision
from helpers import randomize_bn
from linear_fixtures import MacCost, compute_nodes, context, output_error, run_pass

import hant
from hant.cost_models import Cost
from hant.graphs.ops import conv_of, linear_of, op_kind
from hant.passes import PassContext, PassManager, get
from hant.passes.fuse_parallel import FuseParallel


class Inception(nn.Module):
    """Three same-shaped 3x3 convs and one 1x1 on the same input; outputs used separately."""

    def __init__(self, bias: bool = True):
        super().__init__()
        self.a = nn.Conv2d(6, 4, 3, padding=1, bias=bias)
        self.b = nn.Conv2d(6, 8, 3, padding=1, bias=False)
        self.c = nn.Conv2d(6, 2, 3, padding=1, bias=bias)
        self.d = nn.Conv2d(6, 5, 1)

    def forward(self, x):
        return torch.cat([torch.relu(self.a(x)), self.b(x) * 2.0, torch.sigmoid(self.c(x)), self.d(x)], 1)


class QKV(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8, bias=False), nn.Linear(8, 4)

    def forward(self, x):
        return (self.q(x) @ self.k(x).transpose(-1, -2)).softmax(-1) @ self.v(x)


def fuse(model, x, ctx=None, method="symbolic"):
    return run_pass(FuseParallel, model, x, ctx, method)


def of(ctx, action):
    return [d for d in ctx.decisions if d.pass_name == "fuse_parallel" and d.action == action]


def test_registered():
    assert get("fuse_parallel") is FuseParallel and FuseParallel.exact


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_sibling_convs_become_one_conv_and_a_split(dtype, tol):
    torch.manual_seed(0)
    model = Inception().to(dtype)
    gm, ctx, modified, error = fuse(model, torch.randn(2, 6, 7, 7, dtype=dtype))
    assert modified and error <= tol
    convs = [conv_of(n) for n in gm.graph.nodes if conv_of(n) is not None]
    assert sorted(c.out_channels for c in convs) == [5, 14]          # 4 + 8 + 2 fused; the 1x1 alone
    (applied,) = of(ctx, "applied")
    assert applied.site == "a | b | c" and applied.cost_after < applied.cost_before


def test_sibling_linears_fuse_on_the_last_dim():
    torch.manual_seed(0)
    model = QKV().double()
    gm, ctx, modified, error = fuse(model, torch.randn(2, 5, 8, dtype=torch.float64))
    assert modified and error <= 1e-12
    (lin,) = [linear_of(n) for n in gm.graph.nodes if linear_of(n) is not None]
    assert lin.out_features == 20


def test_exported_graph_fuses_too():
    torch.manual_seed(0)
    model = Inception(bias=False).double()
    gm, _, modified, error = fuse(model, torch.randn(1, 6, 5, 5, dtype=torch.float64), method="export")
    assert modified and error <= 1e-12 and compute_nodes(gm).count("conv") == 2


def test_grouped_siblings_are_refused_with_reason():
    class Grouped(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 4, 3, groups=2)

        def forward(self, x):
            return self.a(x), self.b(x)

    _, ctx, modified, _ = fuse(Grouped(), torch.randn(1, 4, 5, 5))
    assert not modified and "interleave" in of(ctx, "refused")[0].reason


def test_different_configurations_are_not_fused():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1, dilation=1, stride=2)

        def forward(self, x):
            return self.a(x), self.b(x)

    _, ctx, modified, _ = fuse(Mixed(), torch.randn(1, 4, 6, 6))
    assert not modified and not ctx.decisions


class SplitIsExpensive(MacCost):
    """A device where a split costs as much as a big conv: fusing cannot pay."""
    name = "test-split-expensive"

    def node_cost(self, node):
        if op_kind(node) == "shape" and node.op == "call_function" and node.target is torch.split:
            return Cost(latency_s=1.0)
        return super().node_cost(node)


def test_fusion_is_priced_and_rejected_when_the_split_costs_more():
    model = Inception()
    gm, ctx, modified, _ = fuse(model, torch.randn(1, 6, 5, 5), PassContext(cost=SplitIsExpensive()))
    assert not modified and compute_nodes(gm).count("conv") == 4
    (rejected,) = of(ctx, "not_cheaper")
    assert rejected.cost_after > rejected.cost_before


def test_split_is_priced_as_a_copy_of_its_elements():
    """MacCost prices a split as free (a view) but a concatenation by its elements: on a large
    image, copying the fused output costs more than the two kernel launches the fusion saves."""
    _, ctx, modified, _ = fuse(Inception(), torch.randn(1, 6, 64, 64))
    (rejected,) = of(ctx, "not_cheaper")
    assert not modified and rejected.cost_after > rejected.cost_before
    _, ctx, modified, _ = fuse(Inception(), torch.randn(1, 6, 5, 5))
    assert modified and of(ctx, "applied")


def test_idempotent_and_leaves_no_unused_modules():
    torch.manual_seed(0)
    model = Inception().double()
    gm, _, _, _ = fuse(model, torch.randn(1, 6, 5, 5, dtype=torch.float64))
    assert not {"a", "b", "c"} & dict(gm.named_children()).keys()
    again = FuseParallel(context())(copy.deepcopy(gm))
    assert not again.modified and again.graph_module.code == gm.code


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, 1e-9)])
def test_googlenet_inception_branches_fuse_under_the_exact_preset(dtype, tol):
    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.googlenet(aux_logits=False, init_weights=True), 4).to(dtype)
    x = torch.randn(1, 3, 64, 64, dtype=dtype)
    result = PassManager("exact", cost=MacCost(), check=x, rtol=tol, atol=0.0)(hant.trace(model, x))
    assert not result.report.rolled_back, result.report
    applied = result.report.decisions_of("fuse_parallel", "applied")
    declined = result.report.decisions_of("fuse_parallel", "not_cheaper")
    assert len(applied) + len(declined) == 9                                      # one per inception block
    # the split copies the fused output: it pays on the small late stages, not on the 8x8 stage 3
    assert {d.site.split("_")[0] for d in applied} == {"inception4a", "inception4b", "inception4c", "inception4d",
                                                       "inception4e", "inception5a", "inception5b"}
    with torch.no_grad():
        assert output_error(model(x), result.graph_module(x)) <= tol
