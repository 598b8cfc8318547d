"""Op views give the same answers on every form a graph reaches hant in.

Forms: symbolic trace (``call_module`` layers), ``torch.export`` unlifted (ATen ops with
``get_attr`` weights) and core ATen after ``ep.run_decompositions()``.
"""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from hant.graphs import (
    activation_of, add_of, batchnorm_of, conv_of, linear_of, module_path, op_kind, pool_of, propagate_shapes,
    trace,
)
from hant.graphs.ops import is_input_guard
from helpers import max_rel_error

FORMS = ("symbolic", "export", "core_aten")
_COMPARED_KINDS = ("conv", "batchnorm", "activation", "add", "pool", "linear")


def _capture(model: nn.Module, x: torch.Tensor, form: str) -> torch.fx.GraphModule:
    if form == "core_aten":
        program = torch.export.export(model, (x,), strict=False).run_decompositions()
        return propagate_shapes(program.module(), x)
    gm = trace(model, x, method=form)
    assert gm.meta["hant_trace_method"] == form
    return gm


def _summary(node: torch.fx.Node, form: str) -> tuple:
    """What a pass or cost model reads about a compute node, in a form-independent tuple."""
    kind = op_kind(node)
    if kind == "conv":
        v = conv_of(node)
        return (kind, v.stride, v.padding, v.dilation, v.groups, v.transposed, v.padding_mode,
                tuple(v.weight_shape), v.has_bias, v.weight, v.bias)
    if kind == "batchnorm":
        v = batchnorm_of(node)
        return (kind, v.eps, v.training, v.track_running_stats, v.num_features, v.running_mean, v.running_var,
                v.weight, v.bias)
    if kind == "activation":
        v = activation_of(node)
        return (kind, v.kind, v.params) + ((v.inplace,) if form != "core_aten" else ())
    if kind == "add":
        v = add_of(node)
        return (kind, v.alpha, len(v.tensor_operands))
    if kind == "pool":
        v = pool_of(node)
        return (kind, v.kind, v.spatial_dims, v.kernel_size, v.stride, v.padding, v.dilation, v.ceil_mode,
                v.count_include_pad, v.output_size)
    v = linear_of(node)
    return (kind, tuple(v.weight_shape), v.has_bias, v.weight, v.bias)


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    return a == b


@pytest.fixture(scope="module", params=["resnet18", "mobilenet_v2"])
def model_and_forms(request, capture):
    forms = {form: capture(request.param, form)[2] for form in FORMS}
    model, x, _ = capture(request.param, "symbolic")
    return request.param, model, x, forms


def test_views_agree_across_forms(model_and_forms):
    name, model, x, forms = model_and_forms
    rows = {}
    for form, gm in forms.items():
        rows[form] = [(module_path(n), _summary(n, form)) for n in gm.graph.nodes if op_kind(n) in _COMPARED_KINDS]
    reference = rows["symbolic"]
    assert len(reference) > 40
    for form in ("export", "core_aten"):
        assert [r[1][0] for r in rows[form]] == [r[1][0] for r in reference], f"{name}: kinds differ in {form}"
        for (path, ours), (ref_path, theirs) in zip(rows[form], reference):
            assert path == ref_path, f"{name} {form}: module {path} != {ref_path}"
            assert len(ours) == len(theirs) or form == "core_aten"
            for a, b in zip(ours, theirs):
                assert _same(a, b), f"{name} {form} {path}: {ours[:3]} vs {theirs[:3]}"


def test_views_read_the_models_own_weights(model_and_forms):
    name, model, x, forms = model_and_forms
    for form, gm in forms.items():
        checked = 0
        for node in gm.graph.nodes:
            kind = op_kind(node)
            if kind == "conv":
                layer, view = model.get_submodule(module_path(node)), conv_of(node)
                assert torch.equal(view.weight, layer.weight)
                assert (view.stride, view.groups) == (layer.stride, layer.groups)
                checked += 1
            elif kind == "batchnorm":
                layer, view = model.get_submodule(module_path(node)), batchnorm_of(node)
                assert torch.equal(view.running_mean, layer.running_mean)
                assert torch.equal(view.running_var, layer.running_var) and view.eps == layer.eps
                scale, shift = view.scale_shift(torch.float64)
                expected = (layer.weight.double() / torch.sqrt(layer.running_var.double() + layer.eps))
                assert torch.allclose(scale, expected, rtol=1e-12, atol=0)
                checked += 1
        assert checked == sum(isinstance(m, (nn.Conv2d, nn.BatchNorm2d)) for m in model.modules())
        with torch.no_grad():
            assert max_rel_error(model(x), gm(x)) <= 1e-5


def test_export_input_guard_is_recognised(model_and_forms):
    _, _, _, forms = model_and_forms
    assert sum(is_input_guard(n) for n in forms["export"].graph.nodes) <= 1
    assert not any(is_input_guard(n) for n in forms["symbolic"].graph.nodes)


class Functional(nn.Module):
    """Every op in its functional spelling, arguments by keyword where the API allows."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(torch.randn(8, 2, 3, 3, generator=g))
        self.b = nn.Parameter(torch.randn(8, generator=g))
        self.register_buffer("mean", torch.randn(8, generator=g))
        self.register_buffer("var", torch.rand(8, generator=g) + 0.5)
        self.gamma = nn.Parameter(torch.rand(8, generator=g) + 0.5)
        self.beta = nn.Parameter(torch.randn(8, generator=g))
        self.fc_w = nn.Parameter(torch.randn(5, 8, generator=g))
        self.fc_b = nn.Parameter(torch.randn(5, generator=g))

    def forward(self, x):
        y = F.conv2d(x, self.w, bias=self.b, stride=2, padding=1, dilation=1, groups=2)
        y = F.batch_norm(y, self.mean, self.var, self.gamma, self.beta, training=False, eps=1e-3)
        y = F.relu(y)
        z = torch.add(y, y.relu(), alpha=2)
        z = F.hardtanh(z, 0.0, 6.0)
        z = F.leaky_relu(z, 0.2)
        z = F.avg_pool2d(z, 3, stride=2, padding=1, ceil_mode=True, count_include_pad=False)
        z = F.max_pool2d(z, 2, stride=1)
        z = F.adaptive_avg_pool2d(z, 1)
        z = torch.flatten(z, 1)
        return F.linear(z, self.fc_w, self.fc_b)


@pytest.mark.parametrize("form", FORMS)
def test_functional_spellings(form):
    model = Functional().eval()
    x = torch.randn(1, 4, 16, 16)
    gm = _capture(model, x, form)
    nodes = list(gm.graph.nodes)
    kinds = [op_kind(n) for n in nodes if op_kind(n) in _COMPARED_KINDS]
    assert kinds == ["conv", "batchnorm", "activation", "activation", "add", "activation", "activation",
                     "pool", "pool", "pool", "linear"]

    conv = next(conv_of(n) for n in nodes if conv_of(n))
    assert (conv.stride, conv.padding, conv.dilation, conv.groups) == ((2, 2), (1, 1), (1, 1), 2)
    assert (conv.in_channels, conv.out_channels, conv.kernel_size) == (4, 8, (3, 3))
    assert torch.equal(conv.weight, model.w) and torch.equal(conv.bias, model.b) and conv.input.op == "placeholder"
    assert not conv.transposed and not conv.is_depthwise

    bn = next(batchnorm_of(n) for n in nodes if batchnorm_of(n))
    assert bn.eps == 1e-3 and not bn.training and bn.num_features == 8 and bn.input is conv.output
    for got, want in ((bn.running_mean, model.mean), (bn.running_var, model.var), (bn.weight, model.gamma),
                      (bn.bias, model.beta)):
        assert torch.equal(got, want)
    assert bn.output.meta["tensor_meta"].shape == (1, 8, 8, 8)

    acts = [activation_of(n) for n in nodes if activation_of(n)]
    assert [(a.kind, a.params) for a in acts] == [("relu", {}), ("relu", {}), ("relu6", {}),
                                                  ("leaky_relu", {"negative_slope": 0.2})]
    assert acts[0].input is bn.output

    add = next(add_of(n) for n in nodes if add_of(n))
    assert add.alpha == 2.0 and add.lhs is acts[0].output and add.rhs is acts[1].output

    avg, mx, adaptive = [pool_of(n) for n in nodes if pool_of(n)]
    assert (avg.kind, avg.kernel_size, avg.stride, avg.padding, avg.ceil_mode, avg.count_include_pad) == \
        ("avg", (3, 3), (2, 2), (1, 1), True, False)
    assert (mx.kind, mx.kernel_size, mx.stride, mx.padding, mx.dilation) == ("max", (2, 2), (1, 1), (0, 0), (1, 1))
    assert (adaptive.kind, adaptive.output_size, adaptive.input) == ("adaptive_avg", (1, 1), mx.output)

    fc = next(linear_of(n) for n in nodes if linear_of(n))
    assert (fc.in_features, fc.out_features) == (8, 5)
    assert torch.equal(fc.weight, model.fc_w) and torch.equal(fc.bias, model.fc_b)
    with torch.no_grad():
        assert max_rel_error(model(x), gm(x)) <= 1e-6


class OtherSpellings(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4, 1, 1))
        self.act = nn.Hardtanh(0.0, 6.0)
        self.pool = nn.MaxPool2d(3, padding=1)

    def forward(self, x):
        y = F.conv2d(x, self.w)                 # positional only: default stride, padding, groups
        y = y + x                               # operator.add
        y = y.add(x, alpha=3)                   # method with alpha
        y = torch.relu(y) * 2                   # torch.relu; a mul by a number
        y = F.relu6(self.act(y))                # module Hardtanh(0, 6) is relu6
        return self.pool(F.conv2d(y, self.w, padding="same"))


def test_other_spellings_in_the_symbolic_form():
    model = OtherSpellings().eval()
    x = torch.randn(1, 4, 8, 8)
    gm = trace(model, x)
    nodes = list(gm.graph.nodes)
    convs = [conv_of(n) for n in nodes if conv_of(n)]
    assert [(c.stride, c.padding, c.groups, c.has_bias) for c in convs] == [((1, 1), (0, 0), 1, False),
                                                                            ((1, 1), "same", 1, False)]
    adds = [add_of(n) for n in nodes if add_of(n)]
    assert [(a.node.target, a.alpha) for a in adds] == [(operator.add, 1.0), ("add", 3.0)]
    assert [a.kind for a in (activation_of(n) for n in nodes) if a] == ["relu", "relu6", "relu6"]
    pool = next(pool_of(n) for n in nodes if pool_of(n))
    assert (pool.kernel_size, pool.stride, pool.padding) == ((3, 3), (3, 3), (1, 1))
    assert isinstance(pool.module, nn.MaxPool2d) and pool.module is gm.get_submodule("pool")
    assert [op_kind(n) for n in nodes if n.op == "call_function" and n.target is operator.mul] == ["mul"]


def test_module_of_finds_nested_layers_like_get_submodule():
    from hant.graphs.ops import module_of

    model = nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), nn.Flatten())
    gm = trace(model, torch.randn(1, 3, 6, 6))
    for node in gm.graph.nodes:
        expected = gm.get_submodule(node.target) if node.op == "call_module" else None
        assert module_of(node) is expected


def test_views_remember_answers_only_inside_graph_unchanged():
    """Inside the block a view answers from its memo (a swapped module is not seen); outside, afresh."""
    from hant.graphs.ops import graph_unchanged

    gm = trace(nn.Sequential(nn.Conv2d(3, 4, 3)), torch.randn(1, 3, 6, 6))
    node = next(n for n in gm.graph.nodes if n.op == "call_module")
    with graph_unchanged():
        assert op_kind(node) == "conv"
        gm.add_module(node.target, nn.ReLU())  # a change the block promised not to make
        assert op_kind(node) == "conv" and conv_of(node) is conv_of(node)
        with graph_unchanged():  # nested blocks share the outer memo
            assert op_kind(node) == "conv"
    assert op_kind(node) == "activation" and conv_of(node) is None


def _kind_by_asking_every_view(node: torch.fx.Node) -> str | None:
    """The compute kind the first accepting view gives (op_kind's documented order), or None."""
    from hant.graphs.ops import attention_of, layernorm_of, matmul_of, mul_of

    for kind, view in (("conv", conv_of), ("linear", linear_of), ("batchnorm", batchnorm_of),
                       ("layernorm", layernorm_of), ("activation", activation_of), ("add", add_of),
                       ("mul", mul_of), ("pool", pool_of), ("matmul", matmul_of), ("attention", attention_of)):
        if view(node) is not None:
            return kind
    return None


@pytest.mark.parametrize("name", ["efficientnet_b0", "mobilenet_v3_small", "convnext_tiny", "swin_t"])
def test_op_kind_by_module_type_agrees_with_the_views(name):
    """op_kind answers layer nodes from their module's type; every view must agree with that answer."""
    import torchvision

    gm = trace(getattr(torchvision.models, name)().eval(), torch.randn(1, 3, 64, 64))
    checked = 0
    for node in gm.graph.nodes:
        expected = _kind_by_asking_every_view(node)
        if expected is not None:
            assert op_kind(node) == expected, node.format_node()
            checked += node.op == "call_module"
    assert checked > 10



@pytest.mark.parametrize("name", ["efficientnet_b0", "mobilenet_v3_small", "swin_t"])
@pytest.mark.parametrize("form", FORMS)
def test_op_kind_shortcut_for_functions_agrees_with_the_whole_chain(name, form, monkeypatch):
    """op_kind sends a function node to the one view that accepts its target (or to is_identity_like);
    with that shortcut off, every node must get the same kind from the whole chain of views."""
    import torchvision

    from hant.graphs import ops

    torch.manual_seed(0)
    gm = _capture(getattr(torchvision.models, name)().eval(), torch.randn(1, 3, 64, 64), form)
    shortcut = {node: op_kind(node) for node in gm.graph.nodes}
    taken = sum(node.op == "call_function" and ops._function_kind(node) is not None for node in gm.graph.nodes)
    monkeypatch.setattr(ops, "_function_kind", lambda node: None)
    assert {node: op_kind(node) for node in gm.graph.nodes} == shortcut
    assert taken > 5


def _stochastic_depth():
    from torchvision.ops import stochastic_depth

    return stochastic_depth


@pytest.mark.parametrize("function, args, kwargs", [
    (F.dropout, (0.2,), {"training": False}),
    (F.dropout, (), {}),
    (_stochastic_depth(), (0.1, "row", False), {}),
    (_stochastic_depth(), (), {"p": 0.0, "mode": "batch", "training": True}),
    (F.interpolate, (), {"scale_factor": 2.0, "mode": "nearest"}),
    (F.max_pool2d, (3, 2), {}),            # boolean-dispatched: goes through torch.fx's normalisation
    (F.softmax, (), {"dim": 1}),
])
def test_normalized_arguments_match_torch_fx(function, args, kwargs):
    """Plain Python functions bind against their (cached) signature; the keyword arguments, defaults
    filled in, are exactly those of ``torch.fx``'s ``normalize_function``."""
    from torch.fx.operator_schemas import normalize_function

    from hant.graphs.ops import _normalized

    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    node = graph.call_function(function, (x, *args), kwargs)
    pair = normalize_function(function, (x, *args), kwargs, normalize_to_only_use_kwargs=True)
    assert _normalized(node) == (dict(pair.kwargs) if pair is not None else None)


def test_normalized_arguments_that_do_not_bind_give_none():
    from hant.graphs.ops import _normalized

    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    assert _normalized(graph.call_function(F.dropout, (x,), {"no_such_argument": 1})) is None
