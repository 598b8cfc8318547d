"""The flops model against torch.utils.flop_counter, on real networks and on single ops, in both graph forms."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from torchvision import models
from torchvision.models.swin_transformer import ShiftedWindowAttention

import hant
from hant.cost_models import Cost, FlopsModel
from hant.graphs.ops import op_kind
from helpers import randomize_bn

FORMS = ("symbolic", "export")
# The four networks of the acceptance criterion; the CNNs run at 64x64 to stay fast, ViT needs 224.
NETWORKS = {"resnet50": 64, "mobilenet_v2": 64, "efficientnet_b0": 64, "vit_b_16": 224}


def reference_flops(module: nn.Module, *inputs) -> int:
    """FLOPs that ``FlopCounterMode`` counts for one forward pass.

    Two blind spots of the counter are stepped around, not papered over: it has no formula for
    the fused CPU attention kernel, so SDPA is forced onto the math backend (plain bmm); and in
    eval mode under no_grad ``nn.MultiheadAttention`` takes a fused fast path it cannot see, so
    grad mode stays on (nothing is backpropagated).
    """
    with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        module(*inputs)
    return counter.get_total_flops()


class Zoo:
    """Each network built, counted by the reference and traced once per test module."""

    def __init__(self):
        self._networks, self._graphs, self._reference = {}, {}, {}

    def network(self, name: str) -> tuple[nn.Module, torch.Tensor]:
        if name not in self._networks:
            torch.manual_seed(0)
            size = NETWORKS[name]
            self._networks[name] = (randomize_bn(models.get_model(name), seed=0), torch.randn(1, 3, size, size))
        return self._networks[name]

    def reference(self, name: str) -> int:
        if name not in self._reference:
            self._reference[name] = reference_flops(*self.network(name))
        return self._reference[name]

    def graph(self, name: str, form: str) -> torch.fx.GraphModule:
        if (name, form) not in self._graphs:
            model, x = self.network(name)
            self._graphs[name, form] = hant.trace(model, x, method=form)
        return self._graphs[name, form]


@pytest.fixture(scope="module")
def zoo() -> Zoo:
    return Zoo()


@pytest.fixture(scope="module")
def flops() -> FlopsModel:
    return FlopsModel()


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", list(NETWORKS))
def test_network_totals_match_flop_counter(zoo, flops, name, form):
    gm = zoo.graph(name, form)
    assert gm.meta["hant_trace_method"] == form
    report = flops.graph_cost(gm)
    expected = zoo.reference(name)
    assert abs(2 * report.total.macs - expected) <= 0.01 * expected, (2 * report.total.macs, expected)
    model, _ = zoo.network(name)
    assert report.total.params == sum(p.numel() for p in model.parameters())
    assert report.total.latency_s == 0.0
    assert report.total.bytes_read > 4 * report.total.params  # float32 weights are read at least once


@pytest.mark.parametrize("name", ["resnet50", "mobilenet_v2", "efficientnet_b0"])
def test_traced_and_exported_forms_count_the_same(zoo, flops, name):
    """Same network, two spellings: MACs, params and bytes agree exactly, and so do the per-kind MACs."""
    traced, exported = (flops.graph_cost(zoo.graph(name, form)) for form in FORMS)
    assert traced.total == exported.total

    def by_kind(report):
        totals = {}
        for row in report.rows:
            totals[row.kind] = totals.get(row.kind, 0) + row.cost.macs
        return {kind: macs for kind, macs in totals.items() if macs}

    assert by_kind(traced) == by_kind(exported) and set(by_kind(traced)) == {"conv", "linear"}


class _LeafLayers(nn.Module):
    """Every layer type the flops model reads directly, in the shapes the general way must agree on:
    1d/2d/3d, grouped and bias-free convolutions, a transposed one (not read directly), norms, pools."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(4, 6, 3, padding=1)
        self.c2 = nn.Conv2d(4, 8, 3, stride=2, groups=2, bias=False)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.c3 = nn.Conv3d(1, 2, 3, padding=1)
        self.bn1, self.bn3, self.ln = nn.BatchNorm1d(6), nn.BatchNorm3d(2), nn.LayerNorm(8)
        self.acts = nn.ModuleList([nn.ReLU(), nn.ReLU6(), nn.SiLU(), nn.Sigmoid(), nn.Hardswish(), nn.Hardsigmoid(),
                                   nn.GELU(), nn.Tanh()])
        self.pools = nn.ModuleList([nn.MaxPool2d(2), nn.AvgPool2d(3, stride=1, padding=1), nn.AdaptiveAvgPool2d(1)])
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        a = self.bn1(self.c1(x.flatten(2)[:, :, :16]))
        y = self.dw(self.c2(x))
        for act in self.acts:
            y = act(y)
        for pool in self.pools:
            y = pool(y)
        z = self.bn3(self.c3(x[:, :1].unsqueeze(1)))
        return self.fc(self.ln(y.flatten(1))), a, z, self.up(self.dw(self.c2(x)))


@pytest.mark.parametrize("name", ["resnet50", "efficientnet_b0", "vit_b_16", "leaf_layers"])
def test_layers_read_directly_agree_with_the_general_way(zoo, flops, monkeypatch, name):
    """The commonest leaf layers are priced straight off their modules; every node must cost what the
    op views and the general path say."""
    import hant.cost_models.flops as flops_module

    if name == "leaf_layers":
        gm = hant.trace(_LeafLayers().eval(), torch.randn(2, 4, 8, 8))
    else:
        gm = zoo.graph(name, "symbolic")
    direct = [flops.node_cost(n) for n in gm.graph.nodes]
    read_directly = {type(m) for n in gm.graph.nodes if n.op == "call_module"
                     for m in [gm.get_submodule(n.target)] if type(m) in flops_module._LEAF_MACS}
    monkeypatch.setattr(flops_module, "_LEAF_MACS", {})
    assert direct == [flops.node_cost(n) for n in gm.graph.nodes]
    assert read_directly & {nn.Conv2d, nn.Linear}
    if name == "leaf_layers":
        assert read_directly == {nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.BatchNorm1d, nn.BatchNorm3d, nn.LayerNorm,
                                 nn.Linear, nn.ReLU, nn.ReLU6, nn.SiLU, nn.Sigmoid, nn.Hardswish, nn.Hardsigmoid,
                                 nn.GELU, nn.Tanh, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d}


def test_resnet50_at_224_is_about_4_1_gmacs(flops):
    """The figure every paper quotes for ResNet-50 (4.1 GMACs, "4.1 GFLOPs" in MAC units)."""
    gm = hant.trace(models.resnet50().eval(), torch.randn(1, 3, 224, 224))
    macs = flops.graph_cost(gm).total.macs
    assert 4.05e9 < macs < 4.15e9, macs


# ------------------------------------------------------------------ single ops, both forms

class Binary(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, a, b):
        return self.fn(a, b)


class Attention(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


class MultiHead(nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        self.attn = nn.MultiheadAttention(**kwargs)

    def forward(self, q, k, v):
        return self.attn(q, k, v, need_weights=False)[0]


def _single_ops():
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g)

    return {
        "conv2d_depthwise": (nn.Conv2d(8, 8, 3, padding=1, groups=8), (rand(2, 8, 9, 9),)),
        "conv2d_grouped_strided": (nn.Conv2d(8, 12, 3, stride=2, groups=4, bias=False), (rand(1, 8, 11, 11),)),
        "conv1d_dilated": (nn.Conv1d(4, 6, 3, dilation=2), (rand(1, 4, 20),)),
        "conv3d": (nn.Conv3d(3, 4, (2, 3, 3), stride=(1, 2, 2)), (rand(1, 3, 4, 9, 9),)),
        "conv_transpose2d_grouped": (nn.ConvTranspose2d(6, 4, 3, stride=2, groups=2, output_padding=1),
                                     (rand(1, 6, 5, 5),)),
        "conv_transpose1d": (nn.ConvTranspose1d(4, 3, 5, stride=3), (rand(2, 4, 7),)),
        "conv_transpose3d": (nn.ConvTranspose3d(2, 3, 2, stride=2), (rand(1, 2, 3, 4, 4),)),
        "linear_3d_input": (nn.Linear(16, 24), (rand(2, 5, 16),)),
        "matmul_broadcast": (Binary(torch.matmul), (rand(3, 4, 5, 6), rand(6, 7))),
        "bmm": (Binary(torch.bmm), (rand(3, 4, 5), rand(3, 5, 2))),
        "einsum_windows": (Binary(lambda a, b: torch.einsum("b h i d, b h j d -> b h i j", a, b)),
                           (rand(2, 3, 5, 4), rand(2, 3, 6, 4))),
        "sdpa": (Attention(), (rand(2, 4, 10, 8), rand(2, 4, 12, 8), rand(2, 4, 12, 6))),
        "multihead_self": (MultiHead(embed_dim=32, num_heads=4), (rand(7, 2, 32),) * 3),
        "multihead_cross_batch_first": (
            MultiHead(embed_dim=32, num_heads=2, kdim=16, vdim=8, batch_first=True),
            (rand(2, 5, 32), rand(2, 9, 16), rand(2, 9, 8))),
        "swin_window_attention_padded": (ShiftedWindowAttention(16, [4, 4], [2, 2], num_heads=2),
                                         (rand(1, 9, 10, 16),)),
    }


SINGLE_OPS = _single_ops()


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("case", list(SINGLE_OPS))
def test_single_op_macs_match_flop_counter(flops, case, form):
    """A one-input layer is wrapped in a Sequential so that symbolic tracing keeps it as a
    call_module node; export gives its ATen form."""
    module, inputs = SINGLE_OPS[case]
    module = module.eval()
    root = nn.Sequential(module) if len(inputs) == 1 and not isinstance(module, ShiftedWindowAttention) else module
    counted = flops.graph_cost(hant.trace(root, inputs, method=form)).total
    assert 2 * counted.macs == reference_flops(module, *inputs)
    assert counted.params == sum(p.numel() for p in module.parameters())


class FunctionalNet(nn.Module):
    """Layers written as torch.nn.functional calls on parameters (get_attr nodes when traced)."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(6, 3, 3, 3))
        self.w2 = nn.Parameter(torch.randn(6, 2, 2, 2))     # transposed, groups=2: (in, out/groups, k, k)
        self.w3 = nn.Parameter(torch.randn(5, 4 * 13 * 13))
        self.b3 = nn.Parameter(torch.randn(5))

    def forward(self, x):
        x = F.relu(F.conv2d(x, self.w1, stride=1, padding=1))
        x = F.conv_transpose2d(x, self.w2, stride=2, groups=2)[:, :, :13, :13]
        x = F.linear(torch.flatten(x, 1), self.w3, self.b3)
        return torch.matmul(x.unsqueeze(-1), x.unsqueeze(1))


@pytest.mark.parametrize("form", FORMS)
def test_functional_spellings_match_flop_counter(flops, form):
    net, x = FunctionalNet().eval(), torch.randn(2, 3, 7, 7)
    gm = hant.trace(net, x, method=form)
    assert not any(n.op == "call_module" for n in gm.graph.nodes if op_kind(n) in ("conv", "linear"))
    counted = flops.graph_cost(gm).total
    assert 2 * counted.macs == reference_flops(net, x)
    assert counted.params == sum(p.numel() for p in net.parameters())


@settings(max_examples=20, deadline=None)
@given(
    dims=st.integers(1, 3), transposed=st.booleans(), group_count=st.sampled_from([1, 2, 3]),
    in_per_group=st.integers(1, 3), out_per_group=st.integers(1, 3), kernel=st.integers(1, 3),
    stride=st.integers(1, 2), dilation=st.integers(1, 2), size=st.integers(5, 8), batch=st.integers(1, 2),
)
def test_generated_convolutions_match_flop_counter(flops, dims, transposed, group_count, in_per_group,
                                                   out_per_group, kernel, stride, dilation, size, batch):
    layer = {(1, False): nn.Conv1d, (2, False): nn.Conv2d, (3, False): nn.Conv3d,
             (1, True): nn.ConvTranspose1d, (2, True): nn.ConvTranspose2d, (3, True): nn.ConvTranspose3d}
    conv = layer[dims, transposed](group_count * in_per_group, group_count * out_per_group, kernel, stride=stride,
                                   dilation=dilation, groups=group_count).eval()
    x = torch.randn(batch, group_count * in_per_group, *([size] * dims))
    counted = flops.graph_cost(hant.trace(nn.Sequential(conv), x, method="symbolic")).total
    assert 2 * counted.macs == reference_flops(conv, x)


# ------------------------------------------------------------------ bytes and params by hand

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_conv_bytes_and_params_by_hand(flops, dtype):
    conv = nn.Conv2d(3, 8, 3).to(dtype).eval()
    x = torch.randn(2, 3, 8, 8, dtype=dtype)
    size = dtype.itemsize
    (row,) = flops.graph_cost(hant.trace(conv, x)).rows
    weights = 8 * 3 * 3 * 3 + 8
    assert row.cost == Cost(macs=2 * 8 * 6 * 6 * 3 * 3 * 3, bytes_read=(2 * 3 * 8 * 8 + weights) * size,
                            bytes_written=2 * 8 * 6 * 6 * size, params=weights)


@pytest.mark.parametrize("form", FORMS)
def test_norm_and_activation_move_bytes_but_do_no_macs(flops, form):
    net = nn.Sequential(nn.BatchNorm2d(4), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.LayerNorm(16)).eval()
    x = torch.randn(1, 4, 4, 4)
    rows = {}
    for row in flops.graph_cost(hant.trace(net, x, method=form)).rows:
        rows.setdefault(row.kind, []).append(row.cost)
    activation = 4 * 4 * 4 * 4  # bytes of a 1x4x4x4 float32 tensor
    assert rows["batchnorm"] == [Cost(bytes_read=activation + 4 * 4 * 4, bytes_written=activation, params=8)]
    assert rows["activation"] == [Cost(bytes_read=activation, bytes_written=activation)]
    assert rows["pool"] == [Cost(bytes_read=activation, bytes_written=activation // 4)]
    assert rows["shape"] and all(cost == Cost() for cost in rows["shape"])
    assert rows["layernorm"] == [Cost(bytes_read=16 * 4 + 2 * 16 * 4, bytes_written=16 * 4, params=32)]


def test_views_copies_and_guards_cost_nothing(zoo, flops):
    """In both ViT forms every shape op, no-op copy and tensor-less node is free (bar parameters it owns)."""
    for form in FORMS:
        gm = zoo.graph("vit_b_16", form)
        free = [n for n in gm.graph.nodes if op_kind(n) in ("shape", "identity")
                or op_kind(n) == "other" and "tensor_meta" not in n.meta]
        assert free, form
        for node in free:
            cost = flops.node_cost(node)
            assert (cost.macs, cost.bytes) == (0, 0), node.format_node()
