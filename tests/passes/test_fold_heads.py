"""fold_linear through classifier heads: adaptive average pooling, flatten and Linear fold exactly with the
linear ops before them, in the cheapest of their exact forms; what cannot fold is refused with a reason."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torchvision
from helpers import randomize_bn
from hypothesis import given, settings
from hypothesis import strategies as st
from linear_fixtures import MacCost, compute_nodes, context, output_error, run_pass

import hant
from hant.cost_models import Cost
from hant.graphs.ops import conv_of, linear_of, pool_of
from hant.passes import PassContext, PassManager
from hant.passes.fold_linear import FoldLinear
from hant.passes.linear_algebra import (
    after_global_mean, commute_with_global_mean, compose, conv_map, single_position_linear,
)
from hant.tools.digits import build_teacher

F64_TOL, F32_TOL = 1e-9, 2e-5


class OpCount(MacCost):
    """Every compute op costs the same (ties broken by MACs): folding a head always pays."""
    name = "test-op-count"

    def node_cost(self, node):
        cost = super().node_cost(node)
        return Cost(latency_s=1e-6 if cost.latency_s else 0.0, macs=cost.macs)


class Head(nn.Module):
    """``body`` -> ``pool`` -> ``flatten`` -> Linear(``channels`` -> ``classes``), flatten spelled as asked."""

    def __init__(self, body: nn.Module, pool: nn.Module, channels: int, classes: int = 5, flatten: str = "torch"):
        super().__init__()
        self.body, self.pool, self.fc = body, pool, nn.Linear(channels, classes)
        self.flatten = flatten
        self.flatten_layer = nn.Flatten() if flatten == "module" else None

    def forward(self, x):
        y = self.pool(self.body(x))
        if self.flatten == "torch":
            y = torch.flatten(y, 1)
        elif self.flatten == "view":
            y = y.view(y.size(0), -1)
        elif self.flatten == "squeeze":
            y = torch.squeeze(y, (2, 3))
        else:
            y = self.flatten_layer(y)
        return self.fc(y)


def fold(model, x, ctx=None, method="symbolic"):
    return run_pass(FoldLinear, model, x, ctx, method)


def actions(ctx: PassContext, action: str) -> list:
    return [d for d in ctx.decisions if d.pass_name == "fold_linear" and d.action == action]


def linears(gm) -> list:
    return [linear_of(n) for n in gm.graph.nodes if linear_of(n) is not None]


def exact_preset(model, x):
    """The "exact" preset priced with MacCost; no pass may have been rolled back."""
    result = PassManager("exact", cost=MacCost(), check=x, rtol=1e-4, atol=0.0)(hant.trace(model, x))
    assert not result.report.rolled_back, result.report
    return result


# ---------------------------------------------------------------- real networks

def digits_mobilenet(dtype):
    """The digits MobileNetV2 teacher with the last block's (features[6]) and the head's activations removed."""
    torch.manual_seed(0)
    model = randomize_bn(build_teacher("mobilenet"), 3).eval()
    model.features[6].conv[2] = nn.Identity()
    model.features[6].conv[5] = nn.Identity()
    model.features[7][2] = nn.Identity()
    return model.to(dtype)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, F64_TOL), (torch.float32, F32_TOL)])
def test_digits_mobilenet_head_becomes_flatten_and_one_linear_over_the_last_block_input(dtype, tol):
    model = digits_mobilenet(dtype)
    state = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 1, 32, 32, dtype=dtype)
    gm = exact_preset(model, x).graph_module
    with torch.no_grad():
        expected, got = model(x), gm(x)
    assert got.shape == expected.shape == (2, 10) and output_error(expected, got) <= tol
    # features[6] (expand 1x1, dw 3x3 stride 2, project 1x1), the head 1x1, pool, flatten and classifier
    # are one Linear over features[5]'s 32x8x8 output: the last ops are flatten -> linear.
    assert compute_nodes(gm)[-3:] == ["add", "shape", "linear"]
    assert [v.weight_shape for v in linears(gm)] == [(10, 32 * 8 * 8)]
    assert not any(pool_of(n) for n in gm.graph.nodes)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not FoldLinear(context())(copy.deepcopy(gm)).modified


def mobilenet_v2_without_head_relu6(dtype):
    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.mobilenet_v2(), 5).eval()
    model.features[18][2] = nn.Identity()
    return model.to(dtype)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, F64_TOL), (torch.float32, F32_TOL)])
def test_mobilenet_v2_head_commutes_with_the_pool(dtype, tol):
    """features[17]'s projection (960->320), features[18] (320->1280) and the classifier are pointwise up
    to the global pool: the source is pooled first, then ONE Linear 960->1000 (cheaper than 320->1000
    after the projection conv, which folds too)."""
    model = mobilenet_v2_without_head_relu6(dtype)
    x = torch.randn(1, 3, 64, 64, dtype=dtype)
    result = exact_preset(model, x)
    gm = result.graph_module
    with torch.no_grad():
        expected, got = model(x), gm(x)
    assert got.shape == expected.shape == (1, 1000) and output_error(expected, got) <= tol
    convs = [(v.in_channels, v.out_channels) for v in (conv_of(n) for n in gm.graph.nodes) if v is not None]
    assert (320, 1280) not in convs and (960, 320) not in convs
    assert [v.weight_shape for v in linears(gm)] == [(1000, 960)]
    assert compute_nodes(gm)[-4:] == ["activation", "pool", "shape", "linear"]
    (applied,) = [d for d in result.report.decisions_of("fold_linear", "applied") if "classifier" in d.site]
    assert "global average pool -> flatten -> one linear 960->1000" in applied.reason
    assert applied.cost_after < applied.cost_before


def test_mobilenet_v2_with_its_relu6_keeps_its_graph():
    """A nonlinearity before the pool: the pool is a fold of its own (pool -> flatten -> Linear), which no
    other exact form beats, so the result is what the features fold to plus the untouched head."""
    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.mobilenet_v2(), 5).eval()
    x = torch.randn(1, 3, 64, 64)
    result = exact_preset(model, x)
    features = exact_preset(model.features, x).graph_module
    head = ["pool", "shape", "linear"]
    assert compute_nodes(result.graph_module) == compute_nodes(features) + head
    assert [v.weight_shape for v in linears(result.graph_module)] == [(1000, 1280)]
    (head_fold,) = [d for d in result.report.decisions_of("fold_linear") if "classifier" in d.site]
    assert head_fold.action == "not_cheaper"


class ResidualWithoutLastReLU(nn.Module):
    """resnet18's last BasicBlock with the ReLU after the residual sum removed."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        b = self.block
        return b.bn2(b.conv2(b.relu(b.bn1(b.conv1(x))))) + x


def test_resnet18_without_its_last_relu_has_no_foldable_head():
    """The residual sum adds two different tensors (block input and the conv branch), so the expression
    that reaches the pool starts at the sum: pool -> flatten -> fc alone, already its cheapest form."""
    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.resnet18(), 6).eval()
    model.layer4[1] = ResidualWithoutLastReLU(model.layer4[1])
    x = torch.randn(1, 3, 64, 64)
    result = exact_preset(model, x)
    gm = result.graph_module
    with torch.no_grad():
        assert output_error(model(x), gm(x)) <= F32_TOL
    assert compute_nodes(gm)[-4:] == ["add", "pool", "shape", "linear"]
    assert [v.weight_shape for v in linears(gm)] == [(1000, 512)]
    (head_fold,) = [d for d in result.report.decisions_of("fold_linear") if "fc" in d.site]
    assert head_fold.action == "not_cheaper" and "flatten -> one linear 2048->1000" in head_fold.reason


# ---------------------------------------------------------------- forms and spellings

@pytest.mark.parametrize("dtype,tol", [(torch.float64, F64_TOL), (torch.float32, F32_TOL)])
def test_padded_strided_conv_then_global_pool_is_one_linear_with_padded_taps_cropped(dtype, tol):
    """The biased 1x1 before the padded depthwise 3x3 makes a position-dependent constant (the zero ring
    carries no bias); the pool averages it into a per-channel constant, exactly."""
    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(4, 16, 1), nn.BatchNorm2d(16), nn.Conv2d(16, 16, 3, 2, 1, groups=16),
                         nn.Conv2d(16, 24, 1))
    model = randomize_bn(Head(body, nn.AdaptiveAvgPool2d(1), 24), 1).eval().to(dtype)
    x = torch.randn(3, 4, 8, 8, dtype=dtype)
    gm, ctx, modified, error = fold(model, x)
    assert modified and error <= tol and compute_nodes(gm) == ["shape", "linear"]
    assert [v.weight_shape for v in linears(gm)] == [(5, 4 * 8 * 8)]
    (applied,) = actions(ctx, "applied")
    assert "flatten -> one linear 256->5 over the whole 4x8x8 source" in applied.reason
    assert "one 9x9 conv 4->5 (groups 1), flattened" in applied.reason      # the conv form, priced too


def test_pointwise_head_commutes_with_the_pool_and_folds_for_any_input_size():
    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(6, 32, 1), nn.BatchNorm2d(32), nn.Conv2d(32, 48, 1))
    model = randomize_bn(Head(body, nn.AdaptiveAvgPool2d(1), 48), 2).eval().double()
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64)
    gm, ctx, modified, error = fold(model, x, context(static_shapes=False))
    assert modified and error <= F64_TOL and compute_nodes(gm) == ["pool", "shape", "linear"]
    assert [v.weight_shape for v in linears(gm)] == [(5, 6)]
    other_size = torch.randn(2, 6, 11, 5, dtype=torch.float64)
    with torch.no_grad():
        assert output_error(model(other_size), gm(other_size)) <= F64_TOL


def test_spatial_head_is_refused_when_input_shapes_may_vary():
    model = Head(nn.Conv2d(3, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1), 8).double()
    gm, ctx, modified, _ = fold(model, torch.randn(1, 3, 6, 6, dtype=torch.float64), context(static_shapes=False))
    assert not modified and compute_nodes(gm) == ["conv", "pool", "shape", "linear"]
    refusals = {d.site: d.reason for d in actions(ctx, "refused")}
    assert set(refusals) == {"body + pool + flatten + fc", "body + pool + flatten", "body + pool"}
    assert all("adaptive average pool as a fixed-kernel pool" in r and "static_shapes" in r for r in refusals.values())


@pytest.mark.parametrize("flatten", ["torch", "view", "squeeze", "module"])
def test_every_flatten_spelling_continues_the_expression(flatten):
    torch.manual_seed(0)
    model = Head(nn.Conv2d(3, 8, 3, stride=2), nn.AdaptiveAvgPool2d(1), 8, flatten=flatten).double()
    gm, _, modified, error = fold(model, torch.randn(2, 3, 9, 9, dtype=torch.float64))
    # the 9x9 conv over the whole 9x9 input and the Linear over it cost the same: the first priced is kept
    assert modified and error <= F64_TOL and compute_nodes(gm) == ["conv", "shape"]


def test_adaptive_pool_to_a_divisor_is_a_strided_pool():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 1), nn.AdaptiveAvgPool2d((2, 3)), nn.Conv2d(8, 4, 1)).double()
    gm, _, modified, error = fold(model, torch.randn(2, 4, 8, 9, dtype=torch.float64), PassContext(cost=OpCount()))
    assert modified and error <= F64_TOL
    (conv,) = [conv_of(n) for n in gm.graph.nodes if conv_of(n) is not None]
    assert conv.kernel_size == (4, 3) and conv.stride == (4, 3)


@pytest.mark.parametrize("method", ["export", "core_aten"])
def test_exported_heads_fold_too(method):
    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
    model = randomize_bn(Head(body, nn.AdaptiveAvgPool2d(1), 8), 4).eval().double()
    x = torch.randn(1, 3, 6, 6, dtype=torch.float64)
    if method == "export":
        gm = hant.trace(model, x, method="export")
    else:   # mean.dim, view and addmm(permute(W)) spellings
        gm = torch.export.export(model, (x,)).run_decompositions().module()
        hant.graphs.propagate_shapes(gm, x)
    result = FoldLinear(context())(gm)
    with torch.no_grad():
        assert output_error(model(x), result.graph_module(x)) <= F64_TOL
    assert result.modified and compute_nodes(result.graph_module) == ["shape", "linear"]


# ---------------------------------------------------------------- refusals

def test_adaptive_pool_with_unequal_windows_is_refused():
    torch.manual_seed(0)
    model = Head(nn.Conv2d(4, 6, 1), nn.AdaptiveAvgPool2d(3), 6 * 9).double()
    gm, ctx, modified, error = fold(model, torch.randn(1, 4, 7, 7, dtype=torch.float64))
    assert not modified and error == 0.0
    assert compute_nodes(gm) == ["conv", "pool", "shape", "linear"]
    (refusal,) = actions(ctx, "refused")
    assert refusal.site == "body -> pool"
    assert "(7, 7) to (3, 3)" in refusal.reason and "not a multiple of the output size" in refusal.reason


def test_relu_between_pool_and_linear_blocks_the_head_fold():
    class ReluHead(Head):
        def forward(self, x):
            return self.fc(torch.flatten(torch.relu(self.pool(self.body(x))), 1))

    torch.manual_seed(0)
    model = ReluHead(nn.Conv2d(4, 6, 3, padding=1), nn.AdaptiveAvgPool2d(1), 6).double()
    gm, ctx, _, error = fold(model, torch.randn(2, 4, 6, 6, dtype=torch.float64), PassContext(cost=OpCount()))
    assert error <= F64_TOL
    kinds = compute_nodes(gm)
    assert kinds[-3:] == ["activation", "shape", "linear"] and "fc" in [n.target for n in gm.graph.nodes]
    assert all("fc" not in d.site for d in ctx.decisions)


def test_flatten_with_other_users_is_not_folded_into_the_linear():
    class TwoUsers(Head):
        def forward(self, x):
            y = torch.flatten(self.pool(self.body(x)), 1)
            return self.fc(y), y

    torch.manual_seed(0)
    model = TwoUsers(nn.Conv2d(4, 6, 3), nn.AdaptiveAvgPool2d(1), 6).double()
    gm, ctx, _, error = fold(model, torch.randn(1, 4, 5, 5, dtype=torch.float64), PassContext(cost=OpCount()))
    assert error <= F64_TOL and "fc" in [n.target for n in gm.graph.nodes]
    assert any(d.site == "flatten -> fc" and "2 users" in d.reason for d in actions(ctx, "refused"))


# ---------------------------------------------------------------- generated heads

@st.composite
def heads(draw):
    """conv(k, stride, padding, groups) -> [BN] -> [1x1 conv] -> global pool -> flatten -> Linear."""
    channels, size = draw(st.sampled_from([2, 4])), draw(st.integers(3, 9))
    k, stride, padding = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(0, 2))
    conv_size = (size + 2 * padding - k) // stride + 1
    if conv_size < 1:
        k, stride, padding, conv_size = 1, 1, 0, size
    width = draw(st.sampled_from([4, 8]))
    groups = draw(st.sampled_from([1, 2, channels]))
    layers = [nn.Conv2d(channels, width, k, stride, padding, groups=groups, bias=draw(st.booleans()))]
    if draw(st.booleans()):
        layers.append(nn.BatchNorm2d(width))
    if draw(st.booleans()):
        layers.append(nn.Conv2d(width, width, 1))
    pool = draw(st.sampled_from(["adaptive", "avg"]))
    pool_layer = nn.AdaptiveAvgPool2d(1) if pool == "adaptive" else nn.AvgPool2d(conv_size)
    flatten = draw(st.sampled_from(["torch", "view", "module"]))
    torch.manual_seed(draw(st.integers(0, 1000)))
    model = randomize_bn(Head(nn.Sequential(*layers), pool_layer, width, flatten=flatten), 0).eval().double()
    return model, torch.randn(2, channels, size, size, dtype=torch.float64)


@settings(max_examples=40, deadline=None)
@given(heads())
def test_generated_heads_fold_into_one_exact_form(case):
    model, x = case
    gm, ctx, modified, error = fold(model, x, PassContext(cost=OpCount()))
    assert error <= F64_TOL
    assert modified and compute_nodes(gm) in (["conv", "shape"], ["shape", "linear"], ["pool", "shape", "linear"])
    assert all(d.reason for d in ctx.decisions)


# ---------------------------------------------------------------- the algebra

@st.composite
def single_position_maps(draw):
    """A random 2-D ConvMap with one output position (stride >= padded size): any kernel that fits, padding,
    dilation, groups and bias; taps may fall on the padding or leave input positions unread."""
    size, kernel, padding, dilation, stride = [], [], [], [], []
    for _ in range(2):
        s, p, d = draw(st.integers(1, 6)), draw(st.integers(0, 2)), draw(st.integers(1, 2))
        size.append(s), padding.append(p), dilation.append(d), stride.append(s + 2 * p)
        kernel.append(draw(st.integers(1, (s + 2 * p - 1) // d + 1)))
    groups = draw(st.sampled_from([1, 2]))
    weight = torch.randn(4, 4 // groups, *kernel, dtype=torch.float64)
    return conv_map(weight, torch.randn(4, dtype=torch.float64), stride, padding, dilation, groups, size, (1, 1))


@settings(max_examples=60, deadline=None)
@given(single_position_maps())
def test_single_position_conv_is_a_linear_over_the_flattened_input(m):
    x = torch.randn(3, 4, *m.in_size, dtype=torch.float64)
    expected = m.apply(x)
    assert expected.shape == (3, 4, 1, 1)
    lin = single_position_linear(m)
    got = x.flatten(1) @ lin.weight.T + lin.bias
    assert (expected.flatten(1) - got).abs().max() <= 1e-10 * max(1.0, float(expected.abs().max()))


def pointwise_map(kind: str, cin: int, cout: int, size) -> object:
    """A random 1x1 ConvMap: dense, two groups, or per-channel (groups = channels, cout = cin)."""
    groups = {"dense": 1, "grouped": 2, "per_channel": cin}[kind]
    cout = cin if kind == "per_channel" else cout
    return conv_map(torch.randn(cout, cin // groups, 1, 1, dtype=torch.float64), torch.randn(cout, dtype=torch.float64),
                    (1, 1), (0, 0), (1, 1), groups, size, size)


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(["dense", "grouped", "per_channel"]), st.sampled_from(["dense", "grouped", "per_channel"]),
       st.integers(1, 7), st.integers(1, 7))
def test_pointwise_maps_commute_with_the_global_mean(kind_a, kind_b, h, w):
    """mean(b(a(x))) = (b . a)(mean x) for pointwise a, b (per-channel ones take compose's fast path), and
    after_global_mean gives the same map as one conv."""
    torch.manual_seed(h * 10 + w)
    a = pointwise_map(kind_a, 6, 4, (h, w))
    b = pointwise_map(kind_b, a.out_channels, 6, (1, 1))
    x = torch.randn(2, 6, h, w, dtype=torch.float64)
    expected = b.apply(a.apply(x).mean(dim=(2, 3), keepdim=True))
    p = compose(commute_with_global_mean(a), b)
    scale = float(expected.abs().max())
    assert (expected - p.apply(x.mean(dim=(2, 3), keepdim=True))).abs().max() <= 1e-10 * scale
    assert (expected - after_global_mean(p, (h, w)).apply(x)).abs().max() <= 1e-10 * scale
