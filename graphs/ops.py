"""Op views: the one place that knows how an operation is spelled in a graph.

Passes and cost models never match raw node targets. They ask a view, e.g.
``conv_of(node)``, which returns a small frozen dataclass describing the op, or None
when the node is not that op. Each view recognises the three spellings that reach hant:

* ``call_module`` layers (``torch.fx.symbolic_trace``, the canonical form);
* ``torch.nn.functional`` / ``torch`` / ``Tensor`` method calls (symbolic trace of
  functional code);
* ATen overloads (``torch.export`` unlifted with ``.module()``, pre-dispatch or core ATen),
  whose weights are ``get_attr`` nodes.

Every view carries ``node`` (the op) and ``output`` (the node whose value is the op's
result: the node itself, or the ``getitem(node, 0)`` user of an ATen op that returns a
tuple). Tensor fields hold the live parameter objects of the GraphModule, or None when
the value is computed at run time (its shape is then in the ``*_shape`` field).

Teach a new spelling here, not in a pass.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import operator
import types
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx import Node
from torch._jit_internal import boolean_dispatched
from torch.fx.operator_schemas import normalize_function

__all__ = [
    "ConvView", "LinearView", "BatchNormView", "ActivationView", "BinaryView", "PoolView",
    "NormView", "MatmulView", "AttentionView", "ReshapeView",
    "conv_of", "linear_of", "batchnorm_of", "activation_of", "add_of", "mul_of", "pool_of",
    "layernorm_of", "matmul_of", "einsum_of", "EinsumView", "attention_of", "is_identity_like", "is_shape_op",
    "reshape_of", "is_inplace", "is_input_guard", "op_kind",
    "module_of", "constant_of", "tensor_meta", "output_shape", "output_dtype", "ACTIVATION_KINDS",
    "graph_unchanged",
]

aten = torch.ops.aten


# ---------------------------------------------------------------- small helpers

def module_of(node: Node) -> nn.Module | None:
    """The submodule a ``call_module`` node calls, else None."""
    if node.op != "call_module":
        return None
    gm = node.graph.owning_module
    if gm is None:
        return None
    # Fast path: walk the ``_modules`` dicts (what ``get_submodule`` finds through
    # ``nn.Module.__getattr__``, about 20x cheaper); anything unusual goes the slow way.
    module = gm
    for part in node.target.split("."):
        module = module._modules.get(part)
        if module is None:
            return gm.get_submodule(node.target)
    return module


def constant_of(arg: Any) -> torch.Tensor | None:
    """The tensor a ``get_attr`` node (or a dotted attribute path) names, else None."""
    if not isinstance(arg, Node) or arg.op != "get_attr":
        return None
    gm = arg.graph.owning_module
    obj: Any = gm
    for part in str(arg.target).split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj if isinstance(obj, torch.Tensor) else None


def tensor_meta(node: Any):
    """``node.meta["tensor_meta"]`` (a TensorMetadata, or a tuple for tuple outputs), or None."""
    return node.meta.get("tensor_meta") if isinstance(node, Node) else None


def output_shape(node: Any) -> torch.Size | None:
    """Shape of the node's tensor output from shape propagation, or None."""
    meta = tensor_meta(node)
    return getattr(meta, "shape", None)


def output_dtype(node: Any) -> torch.dtype | None:
    """Dtype of the node's tensor output from shape propagation, or None."""
    meta = tensor_meta(node)
    return getattr(meta, "dtype", None)


def _shape_of(value: Any) -> torch.Size | None:
    if isinstance(value, torch.Tensor):
        return value.shape
    return output_shape(value)


def _tuple(value: Any, n: int) -> tuple:
    if isinstance(value, (list, tuple)):
        return tuple(value) if len(value) == n else tuple(value) * (n // max(len(value), 1))
    return (value,) * n


_BINDABLE = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


@functools.lru_cache(maxsize=1024)
def _python_signature(function: types.FunctionType) -> inspect.Signature | None:
    """The signature of a plain Python function when all its parameters can be named, else None
    (what ``normalize_function`` reads for such a function, computed once per function)."""
    signature = inspect.signature(inspect.unwrap(function))
    return signature if all(p.kind in _BINDABLE for p in signature.parameters.values()) else None


def _normalized(node: Node) -> dict[str, Any] | None:
    """Arguments of a ``call_function`` node as keyword arguments of its signature (defaults filled in).

    Plain Python functions (torchvision's ``stochastic_depth``, most of ``torch.nn.functional``)
    bind against their signature, cached per function; torch operators and builtins go through
    ``torch.fx``'s ``normalize_function``, which reads their schemas.
    """
    target = node.target
    if isinstance(target, types.FunctionType) and target not in boolean_dispatched:
        signature = _python_signature(target)
        if signature is None:
            return None
        try:
            bound = signature.bind(*node.args, **node.kwargs)
        except TypeError:
            return None
        bound.apply_defaults()
        return dict(bound.arguments)
    try:
        pair = normalize_function(node.target, tuple(node.args), dict(node.kwargs), normalize_to_only_use_kwargs=True)
    except Exception:  # overloaded builtins (torch.conv2d: int or str padding) need argument types
        try:
            pair = normalize_function(node.target, tuple(node.args), dict(node.kwargs),
                                      arg_types=tuple(_schema_type(a) for a in node.args),
                                      kwarg_types={k: _schema_type(v) for k, v in node.kwargs.items()},
                                      normalize_to_only_use_kwargs=True)
        except Exception:
            return None
    return dict(pair.kwargs) if pair is not None else None


def _schema_type(value: Any) -> Any:
    """The schema type a call argument matches, for telling overloads apart."""
    if isinstance(value, (Node, torch.Tensor)):
        return torch.Tensor
    if isinstance(value, (list, tuple)):
        return list[int] if all(isinstance(v, int) for v in value) else type(value)
    return type(value)


def _tuple_output(node: Node) -> Node | None:
    """The ``getitem(node, 0)`` user of a tuple-returning op, if any."""
    for user in node.users:
        if user.op == "call_function" and user.target is operator.getitem and user.args[1] == 0:
            return user
    return None


# ---------------------------------------------------------------- convolution

@dataclass(frozen=True)
class ConvView:
    node: Node
    output: Node
    input: Node
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    weight_shape: torch.Size
    has_bias: bool
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    dilation: tuple[int, ...]
    groups: int
    padding_mode: str = "zeros"
    transposed: bool = False
    output_padding: tuple[int, ...] = ()
    module: nn.Module | None = None

    @property
    def spatial_dims(self) -> int:
        return len(self.weight_shape) - 2

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return tuple(self.weight_shape[2:])

    @property
    def in_channels(self) -> int:
        w = self.weight_shape
        return w[0] if self.transposed else w[1] * self.groups

    @property
    def out_channels(self) -> int:
        w = self.weight_shape
        return w[1] * self.groups if self.transposed else w[0]

    @property
    def is_depthwise(self) -> bool:
        return self.groups > 1 and self.groups == self.in_channels


_CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_CONV_FUNCTIONS = {
    F.conv1d: False, F.conv2d: False, F.conv3d: False,
    F.conv_transpose1d: True, F.conv_transpose2d: True, F.conv_transpose3d: True,
    aten.conv1d.default: False, aten.conv2d.default: False, aten.conv3d.default: False,
    aten.conv1d.padding: False, aten.conv2d.padding: False, aten.conv3d.padding: False,
    aten.conv_transpose1d.default: True, aten.conv_transpose2d.input: True, aten.conv_transpose3d.input: True,
}


def conv_of(node: Node) -> ConvView | None:
    """Describe a convolution (any dims, transposed or not), or None."""
    if not isinstance(node, Node):
        return None
    m = module_of(node)
    if m is not None:
        if not isinstance(m, _CONV_MODULES):
            return None
        weight, bias = m.weight, m.bias
        n = weight.dim() - 2
        transposed = isinstance(m, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d))
        padding = m.padding if isinstance(m.padding, str) else _tuple(m.padding, n)
        return ConvView(
            node=node, output=node, input=node.args[0], weight=weight, bias=bias,
            weight_shape=weight.shape, has_bias=bias is not None, stride=_tuple(m.stride, n),
            padding=padding, dilation=_tuple(m.dilation, n), groups=m.groups, padding_mode=m.padding_mode,
            transposed=transposed, output_padding=_tuple(m.output_padding, n) if transposed else (), module=m,
        )
    if node.op != "call_function":
        return None
    if node.target in _CONV_FUNCTIONS or node.target is aten.convolution.default:
        kw = _normalized(node)
        if kw is None:
            return None
        weight_node = kw["weight"]
        weight = constant_of(weight_node) if isinstance(weight_node, Node) else weight_node
        weight_shape = _shape_of(weight if weight is not None else weight_node)
        if weight_shape is None:
            return None
        n = len(weight_shape) - 2
        bias_arg = kw.get("bias")
        bias = constant_of(bias_arg) if isinstance(bias_arg, Node) else bias_arg
        transposed = bool(kw.get("transposed", _CONV_FUNCTIONS.get(node.target, False)))
        padding = kw.get("padding", 0)
        padding = padding if isinstance(padding, str) else _tuple(padding, n)
        return ConvView(
            node=node, output=node, input=kw["input"], weight=weight, bias=bias, weight_shape=weight_shape,
            has_bias=bias_arg is not None, stride=_tuple(kw.get("stride", 1), n), padding=padding,
            dilation=_tuple(kw.get("dilation", 1), n), groups=int(kw.get("groups", 1)), transposed=transposed,
            output_padding=_tuple(kw.get("output_padding", 0), n) if transposed else (),
        )
    return None


# ---------------------------------------------------------------- linear

@dataclass(frozen=True)
class LinearView:
    node: Node
    output: Node
    input: Node
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    weight_shape: torch.Size
    has_bias: bool
    module: nn.Module | None = None

    @property
    def in_features(self) -> int:
        return self.weight_shape[1]

    @property
    def out_features(self) -> int:
        return self.weight_shape[0]


def linear_of(node: Node) -> LinearView | None:
    """Describe a fully connected layer ``x @ W.T + b``, or None."""
    if not isinstance(node, Node):
        return None
    m = module_of(node)
    if m is not None:
        if not isinstance(m, nn.Linear):
            return None
        return LinearView(node, node, node.args[0], m.weight, m.bias, m.weight.shape, m.bias is not None, m)
    if node.op == "call_function" and node.target in (F.linear, aten.linear.default):
        kw = _normalized(node)
        if kw is None:
            return None
        weight_node = kw["weight"]
        weight = constant_of(weight_node) if isinstance(weight_node, Node) else weight_node
        weight_shape = _shape_of(weight if weight is not None else weight_node)
        if weight_shape is None:
            return None
        bias_arg = kw.get("bias")
        bias = constant_of(bias_arg) if isinstance(bias_arg, Node) else bias_arg
        return LinearView(node, node, kw["input"], weight, bias, weight_shape, bias_arg is not None)
    if node.op == "call_function" and node.target in (aten.addmm.default, aten.mm.default):
        return _decomposed_linear(node)
    return None


def _transposed_constant(arg: Any) -> Node | None:
    """``W`` when ``arg`` is ``permute(W, [1, 0])`` or ``t(W)`` of a constant 2-D ``W``, else None."""
    if not isinstance(arg, Node) or arg.op != "call_function":
        return None
    if arg.target is aten.t.default or (arg.target is aten.permute.default and list(arg.args[1]) == [1, 0]):
        weight = arg.args[0]
        tensor = constant_of(weight)
        return weight if tensor is not None and tensor.dim() == 2 else None
    return None


def _decomposed_linear(node: Node) -> LinearView | None:
    """Core ATen's linear: ``addmm(b, x, permute(W, [1, 0]))`` or ``mm(x, t(W))`` with constant ``W``."""
    has_bias = node.target is aten.addmm.default
    args = list(node.args) + [None] * 3
    bias_arg, x, rhs = (args[0], args[1], args[2]) if has_bias else (None, args[0], args[1])
    if has_bias and (node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1):
        return None
    weight_node = _transposed_constant(rhs)
    if weight_node is None:
        return None
    weight = constant_of(weight_node)
    bias = constant_of(bias_arg) if isinstance(bias_arg, Node) else bias_arg
    if has_bias and (not isinstance(bias, torch.Tensor) or bias.dim() != 1):
        return None
    return LinearView(node, node, x, weight, bias, weight.shape, has_bias)


# ---------------------------------------------------------------- batch norm

@dataclass(frozen=True)
class BatchNormView:
    node: Node
    output: Node
    input: Node
    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float
    momentum: float | None
    training: bool
    track_running_stats: bool
    num_features: int
    module: nn.Module | None = None

    def scale_shift(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The eval-mode affine form ``y = scale * x + shift`` per channel.

        Only valid when ``training`` is False and running statistics are tracked.
        """
        if self.running_mean is None or self.running_var is None:
            raise ValueError("batch norm without running statistics has no fixed affine form")
        dtype = dtype or self.running_var.dtype
        var = self.running_var.detach().to(dtype)
        mean = self.running_mean.detach().to(dtype)
        gamma = self.weight.detach().to(dtype) if self.weight is not None else torch.ones_like(var)
        beta = self.bias.detach().to(dtype) if self.bias is not None else torch.zeros_like(var)
        scale = gamma / torch.sqrt(var + self.eps)
        return scale, beta - mean * scale


_BN_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def batchnorm_of(node: Node) -> BatchNormView | None:
    """Describe a batch normalisation, or None."""
    if not isinstance(node, Node):
        return None
    m = module_of(node)
    if m is not None:
        if not isinstance(m, _BN_MODULES):
            return None
        tracked = m.track_running_stats and m.running_mean is not None
        training = m.training or not tracked
        return BatchNormView(
            node, node, node.args[0], m.running_mean, m.running_var, m.weight, m.bias, m.eps, m.momentum,
            training, tracked, m.num_features, m,
        )
    if node.op != "call_function":
        return None
    target = node.target
    if target in (F.batch_norm, aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default,
                  aten._native_batch_norm_legit.default, aten.native_batch_norm.default):
        kw = _normalized(node)
        if kw is None:
            return None
        tuple_out = target is not F.batch_norm and target is not aten.batch_norm.default
        output = _tuple_output(node) if tuple_out else node
        if output is None:
            return None
        training = bool(kw.get("training", False))
        mean, var = constant_of(kw.get("running_mean")), constant_of(kw.get("running_var"))
        weight, bias = constant_of(kw.get("weight")), constant_of(kw.get("bias"))
        tracked = kw.get("running_mean") is not None
        input_shape = output_shape(kw["input"])
        num_features = int(input_shape[1]) if input_shape is not None else (mean.numel() if mean is not None else 0)
        return BatchNormView(
            node, output, kw["input"], mean, var, weight, bias, float(kw.get("eps", 1e-5)), kw.get("momentum"),
            training or not tracked, tracked, num_features,
        )
    return None


# ---------------------------------------------------------------- activations

ACTIVATION_KINDS = (
    "relu", "relu6", "hardtanh", "leaky_relu", "prelu", "elu", "selu", "celu", "gelu", "silu", "mish",
    "hardswish", "hardsigmoid", "sigmoid", "tanh", "softplus",
)


@dataclass(frozen=True)
class ActivationView:
    node: Node
    output: Node
    input: Node
    kind: str
    params: dict = field(default_factory=dict)
    inplace: bool = False
    module: nn.Module | None = None

    @property
    def is_piecewise_linear(self) -> bool:
        return self.kind in ("relu", "relu6", "hardtanh", "leaky_relu", "prelu")


_ACT_MODULES: dict[type, Callable[[nn.Module], tuple[str, dict]]] = {
    nn.ReLU: lambda m: ("relu", {}),
    nn.ReLU6: lambda m: ("relu6", {}),
    nn.Hardtanh: lambda m: (("relu6", {}) if (m.min_val, m.max_val) == (0.0, 6.0)
                            else ("hardtanh", {"min_val": m.min_val, "max_val": m.max_val})),
    nn.LeakyReLU: lambda m: ("leaky_relu", {"negative_slope": m.negative_slope}),
    nn.PReLU: lambda m: ("prelu", {}),
    nn.ELU: lambda m: ("elu", {"alpha": m.alpha}),
    nn.SELU: lambda m: ("selu", {}),
    nn.CELU: lambda m: ("celu", {"alpha": m.alpha}),
    nn.GELU: lambda m: ("gelu", {"approximate": m.approximate}),
    nn.SiLU: lambda m: ("silu", {}),
    nn.Mish: lambda m: ("mish", {}),
    nn.Hardswish: lambda m: ("hardswish", {}),
    nn.Hardsigmoid: lambda m: ("hardsigmoid", {}),
    nn.Sigmoid: lambda m: ("sigmoid", {}),
    nn.Tanh: lambda m: ("tanh", {}),
    nn.Softplus: lambda m: ("softplus", {"beta": m.beta, "threshold": m.threshold}),
}

_ACT_FUNCTIONS: dict[Any, str] = {
    F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", F.relu_: "relu",
    F.relu6: "relu6", F.hardtanh: "hardtanh", F.hardtanh_: "hardtanh", F.leaky_relu: "leaky_relu",
    F.prelu: "prelu", F.elu: "elu", F.selu: "selu", F.celu: "celu", F.gelu: "gelu", F.silu: "silu",
    F.mish: "mish", F.hardswish: "hardswish", F.hardsigmoid: "hardsigmoid", torch.sigmoid: "sigmoid",
    F.sigmoid: "sigmoid", torch.tanh: "tanh", F.tanh: "tanh", F.softplus: "softplus",
}
for _name in ACTIVATION_KINDS:
    for _suffix in ("", "_"):
        _packet = getattr(aten, _name + _suffix, None)
        if _packet is not None and hasattr(_packet, "default"):
            _ACT_FUNCTIONS[_packet.default] = _name
_ACT_METHODS = {"relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "sigmoid_": "sigmoid",
                "tanh": "tanh", "tanh_": "tanh"}


def activation_of(node: Node) -> ActivationView | None:
    """Describe an elementwise nonlinearity (ReLU, ReLU6, Hardswish, SiLU, GELU, ...), or None."""
    if not isinstance(node, Node):
        return None
    m = module_of(node)
    if m is not None:
        describe = _ACT_MODULES.get(type(m))
        if describe is None:
            return None
        kind, params = describe(m)
        return ActivationView(node, node, node.args[0], kind, params, bool(getattr(m, "inplace", False)), m)
    if node.op == "call_method" and node.target in _ACT_METHODS:
        return ActivationView(node, node, node.args[0], _ACT_METHODS[node.target], {}, node.target.endswith("_"))
    if node.op != "call_function" or node.target not in _ACT_FUNCTIONS:
        return None
    kind = _ACT_FUNCTIONS[node.target]
    kw = _normalized(node) or {}
    params = {k: v for k, v in kw.items() if k not in ("input", "self", "inplace")}
    packet = getattr(node.target, "_overloadpacket", node.target)
    inplace = bool(kw.get("inplace", False)) or getattr(packet, "__name__", "").endswith("_")
    if kind == "hardtanh":
        lo, hi = float(params.get("min_val", -1.0)), float(params.get("max_val", 1.0))
        kind, params = ("relu6", {}) if (lo, hi) == (0.0, 6.0) else ("hardtanh", {"min_val": lo, "max_val": hi})
    first = node.args[0] if node.args else kw.get("input", kw.get("self"))
    return ActivationView(node, node, first, kind, params, inplace)


# ---------------------------------------------------------------- elementwise binary

@dataclass(frozen=True)
class BinaryView:
    """``lhs (op) rhs`` where either side is a Node, a constant tensor or a Python number."""
    node: Node
    output: Node
    lhs: Any
    rhs: Any
    alpha: float = 1.0
    inplace: bool = False

    @property
    def tensor_operands(self) -> list[Node]:
        return [a for a in (self.lhs, self.rhs) if isinstance(a, Node)]


_ADD_FUNCTIONS = {operator.add: False, operator.iadd: True, torch.add: False,
                  aten.add.Tensor: False, aten.add_.Tensor: True, aten.add.Scalar: False, aten.add_.Scalar: True}
_MUL_FUNCTIONS = {operator.mul: False, operator.imul: True, torch.mul: False,
                  aten.mul.Tensor: False, aten.mul_.Tensor: True, aten.mul.Scalar: False, aten.mul_.Scalar: True}


def _binary(node: Node, functions: dict, methods: tuple[str, str]) -> BinaryView | None:
    if not isinstance(node, Node):
        return None
    if node.op == "call_method" and node.target in methods:
        alpha = node.kwargs.get("alpha", node.args[2] if len(node.args) > 2 else 1)
        other = node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
        return BinaryView(node, node, node.args[0], other, float(alpha), node.target.endswith("_"))
    if node.op != "call_function" or node.target not in functions:
        return None
    lhs = node.args[0] if node.args else node.kwargs.get("input", node.kwargs.get("self"))
    rhs = node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
    alpha = node.kwargs.get("alpha", node.args[2] if len(node.args) > 2 else 1)
    return BinaryView(node, node, lhs, rhs, float(alpha), functions[node.target])


def add_of(node: Node) -> BinaryView | None:
    """Describe ``lhs + alpha * rhs`` (tensor + tensor, or tensor + constant), or None."""
    return _binary(node, _ADD_FUNCTIONS, ("add", "add_"))


def mul_of(node: Node) -> BinaryView | None:
    """Describe an elementwise ``lhs * rhs``, or None."""
    return _binary(node, _MUL_FUNCTIONS, ("mul", "mul_"))


# ---------------------------------------------------------------- pooling

@dataclass(frozen=True)
class PoolView:
    node: Node
    output: Node
    input: Node
    kind: str                      # "avg" | "max" | "adaptive_avg" | "adaptive_max"
    spatial_dims: int
    kernel_size: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    ceil_mode: bool = False
    count_include_pad: bool = True
    divisor_override: int | None = None
    output_size: tuple | None = None
    module: nn.Module | None = None


_POOL_MODULES = {
    nn.AvgPool1d: ("avg", 1), nn.AvgPool2d: ("avg", 2), nn.AvgPool3d: ("avg", 3),
    nn.MaxPool1d: ("max", 1), nn.MaxPool2d: ("max", 2), nn.MaxPool3d: ("max", 3),
    nn.AdaptiveAvgPool1d: ("adaptive_avg", 1), nn.AdaptiveAvgPool2d: ("adaptive_avg", 2),
    nn.AdaptiveAvgPool3d: ("adaptive_avg", 3), nn.AdaptiveMaxPool1d: ("adaptive_max", 1),
    nn.AdaptiveMaxPool2d: ("adaptive_max", 2), nn.AdaptiveMaxPool3d: ("adaptive_max", 3),
}
_POOL_FUNCTIONS = {
    F.avg_pool1d: ("avg", 1), F.avg_pool2d: ("avg", 2), F.avg_pool3d: ("avg", 3),
    F.max_pool1d: ("max", 1), F.max_pool2d: ("max", 2), F.max_pool3d: ("max", 3),
    F.adaptive_avg_pool1d: ("adaptive_avg", 1), F.adaptive_avg_pool2d: ("adaptive_avg", 2),
    F.adaptive_avg_pool3d: ("adaptive_avg", 3), F.adaptive_max_pool1d: ("adaptive_max", 1),
    F.adaptive_max_pool2d: ("adaptive_max", 2), F.adaptive_max_pool3d: ("adaptive_max", 3),
    aten.avg_pool1d.default: ("avg", 1), aten.avg_pool2d.default: ("avg", 2), aten.avg_pool3d.default: ("avg", 3),
    aten.max_pool1d.default: ("max", 1), aten.max_pool2d.default: ("max", 2), aten.max_pool3d.default: ("max", 3),
    aten.max_pool2d_with_indices.default: ("max", 2), aten.max_pool3d_with_indices.default: ("max", 3),
    aten.adaptive_avg_pool1d.default: ("adaptive_avg", 1), aten.adaptive_avg_pool2d.default: ("adaptive_avg", 2),
    aten.adaptive_avg_pool3d.default: ("adaptive_avg", 3), aten._adaptive_avg_pool2d.default: ("adaptive_avg", 2),
    aten._adaptive_avg_pool3d.default: ("adaptive_avg", 3),
    aten.adaptive_max_pool2d.default: ("adaptive_max", 2), aten.adaptive_max_pool3d.default: ("adaptive_max", 3),
}
_TUPLE_POOLS = {aten.max_pool2d_with_indices.default, aten.max_pool3d_with_indices.default,
                aten.adaptive_max_pool2d.default, aten.adaptive_max_pool3d.default}


def pool_of(node: Node) -> PoolView | None:
    """Describe an average, max or adaptive pooling, or None."""
    if not isinstance(node, Node):
        return None
    m = module_of(node)
    if m is not None:
        spec = _POOL_MODULES.get(type(m))
        if spec is None:
            return None
        kind, n = spec
        if kind.startswith("adaptive"):
            return PoolView(node, node, node.args[0], kind, n, output_size=_tuple(m.output_size, n), module=m)
        stride = m.stride if m.stride is not None else m.kernel_size
        return PoolView(
            node, node, node.args[0], kind, n, _tuple(m.kernel_size, n), _tuple(stride, n), _tuple(m.padding, n),
            _tuple(getattr(m, "dilation", 1), n), bool(m.ceil_mode), bool(getattr(m, "count_include_pad", True)),
            getattr(m, "divisor_override", None), module=m,
        )
    if node.op == "call_function" and node.target is aten.mean.dim:
        return _global_mean_pool(node)
    if node.op != "call_function" or node.target not in _POOL_FUNCTIONS:
        return None
    kind, n = _POOL_FUNCTIONS[node.target]
    kw = _normalized(node)
    if kw is None:
        return None
    output = _tuple_output(node) if node.target in _TUPLE_POOLS else node
    if output is None:
        return None
    first = kw.get("input", kw.get("self"))
    if kind.startswith("adaptive"):
        return PoolView(node, output, first, kind, n, output_size=_tuple(kw.get("output_size"), n))
    kernel = _tuple(kw["kernel_size"], n)
    stride = kw.get("stride")
    stride = kernel if stride in (None, [], ()) else _tuple(stride, n)
    return PoolView(
        node, output, first, kind, n, kernel, stride, _tuple(kw.get("padding", 0), n),
        _tuple(kw.get("dilation", 1), n), bool(kw.get("ceil_mode", False)),
        bool(kw.get("count_include_pad", True)), kw.get("divisor_override"),
    )


def _global_mean_pool(node: Node) -> PoolView | None:
    """Core ATen's global average pool: ``mean.dim(x, [-1, -2], keepdim=True)`` over all spatial dims."""
    kw = _normalized(node)
    shape = output_shape(kw.get("input", kw.get("self"))) if kw else None
    if shape is None or not kw.get("keepdim", False) or kw.get("dtype") is not None:
        return None
    rank, dims = len(shape), kw.get("dim") or ()
    n = rank - 2
    if not 1 <= n <= 3 or sorted(d % rank for d in dims) != list(range(2, rank)):
        return None
    return PoolView(node, node, kw.get("input", kw.get("self")), "adaptive_avg", n, output_size=(1,) * n)


# ---------------------------------------------------------------- normalisation other than batch norm

@dataclass(frozen=True)
class NormView:
    node: Node
    output: Node
    input: Node
    kind: str                     # "layer_norm" | "group_norm"
    normalized_shape: tuple[int, ...]
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float
    num_groups: int | None = None
    module: nn.Module | None = None


def layernorm_of(node: Node) -> NormView | None:
    """Describe a layer norm or group norm, or None."""
    if not isinstance(node, Node):
        return None
    m = module_of(node)
    if m is not None:
        if isinstance(m, nn.LayerNorm):
            return NormView(node, node, node.args[0], "layer_norm", tuple(m.normalized_shape), m.weight, m.bias, m.eps,
                            module=m)
        if isinstance(m, nn.GroupNorm):
            return NormView(node, node, node.args[0], "group_norm", (m.num_channels,), m.weight, m.bias, m.eps,
                            m.num_groups, m)
        return None
    if node.op != "call_function":
        return None
    if node.target in (F.layer_norm, aten.layer_norm.default, aten.native_layer_norm.default):
        kw = _normalized(node)
        if kw is None:
            return None
        output = _tuple_output(node) if node.target is aten.native_layer_norm.default else node
        return NormView(node, output or node, kw["input"], "layer_norm", tuple(kw["normalized_shape"]),
                        constant_of(kw.get("weight")), constant_of(kw.get("bias")), float(kw.get("eps", 1e-5)))
    if node.target in (F.group_norm, aten.group_norm.default):
        kw = _normalized(node)
        if kw is None:
            return None
        shape = output_shape(kw["input"])
        return NormView(node, node, kw["input"], "group_norm", (int(shape[1]),) if shape else (),
                        constant_of(kw.get("weight")), constant_of(kw.get("bias")), float(kw.get("eps", 1e-5)),
                        int(kw["num_groups"]))
    return None


# ---------------------------------------------------------------- matmul and attention

@dataclass(frozen=True)
class MatmulView:
    node: Node
    output: Node
    lhs: Node
    rhs: Any


_MATMUL_FUNCTIONS = {operator.matmul, torch.matmul, torch.bmm, torch.mm, aten.matmul.default, aten.bmm.default,
                     aten.mm.default}


def matmul_of(node: Node) -> MatmulView | None:
    """Describe a (batched) matrix product of two run-time tensors, or None."""
    if not isinstance(node, Node):
        return None
    if node.op == "call_method" and node.target in ("matmul", "bmm", "mm"):
        return MatmulView(node, node, node.args[0], node.args[1])
    if node.op == "call_function" and node.target in _MATMUL_FUNCTIONS:
        return MatmulView(node, node, node.args[0], node.args[1])
    return None


@dataclass(frozen=True)
class EinsumView:
    """``torch.einsum(equation, *operands)``: ``equation`` as written (spaces kept), operands in order
    (Nodes, or constant tensors)."""
    node: Node
    output: Node
    equation: str
    operands: tuple


_EINSUM_FUNCTIONS = {torch.einsum, torch.functional.einsum, aten.einsum.default}


def einsum_of(node: Node) -> EinsumView | None:
    """Describe an Einstein-summation contraction (equation form, not sublist form), or None."""
    if not isinstance(node, Node) or node.op != "call_function" or node.target not in _EINSUM_FUNCTIONS:
        return None
    args = list(node.args)
    equation = args[0] if args else node.kwargs.get("equation")
    if not isinstance(equation, str):
        return None
    operands = args[1:] if len(args) > 1 else list(node.kwargs.get("tensors", node.kwargs.get("operands", ())))
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):  # einsum(eq, [a, b]) and the ATen form
        operands = list(operands[0])
    return EinsumView(node, node, equation, tuple(operands))


@dataclass(frozen=True)
class AttentionView:
    """Scaled dot-product attention, or a whole ``nn.MultiheadAttention`` layer.

    For a multi-head layer (``module`` set), ``embed_dim``/``num_heads``/``kdim``/``vdim``
    describe its projections and ``query``/``key``/``value`` are its three inputs.
    For a bare SDPA call, ``query``/``key``/``value`` are (..., L, E) tensors.
    With ``window_size`` set, it is torchvision's ``shifted_window_attention`` (Swin, a function
    that symbolic tracing keeps whole): self-attention of a (B, H, W, C) input (``query`` =
    ``key`` = ``value``) within windows of that size after padding, with a C -> 3C input and a
    C -> C output projection (``embed_dim`` = C).
    """
    node: Node
    output: Node
    query: Node
    key: Node
    value: Node
    embed_dim: int | None = None
    num_heads: int | None = None
    kdim: int | None = None
    vdim: int | None = None
    batch_first: bool = False
    module: nn.Module | None = None
    window_size: tuple[int, ...] | None = None


_SDPA = {F.scaled_dot_product_attention, aten.scaled_dot_product_attention.default}
_WINDOW_ATTENTION_ARGS = ("input", "qkv_weight", "proj_weight", "relative_position_bias", "window_size", "num_heads")


def _is_torchvision_window_attention(node: Node) -> bool:
    target = node.target
    return (getattr(target, "__name__", "") == "shifted_window_attention"
            and "torchvision" in getattr(target, "__module__", ""))


def attention_of(node: Node) -> AttentionView | None:
    """Describe an attention op, or None."""
    if not isinstance(node, Node):
        return None
    m = module_of(node)
    if m is not None:
        if not isinstance(m, nn.MultiheadAttention):
            return None
        args = list(node.args) + [node.kwargs.get(k) for k in ("query", "key", "value")[len(node.args):]]
        query, key, value = args[:3]
        output = _tuple_output(node) or node
        return AttentionView(node, output, query, key, value, m.embed_dim, m.num_heads, m.kdim, m.vdim,
                             m.batch_first, m)
    if node.op == "call_function" and node.target in _SDPA:
        kw = _normalized(node) or {}
        query = kw.get("query", node.args[0] if node.args else None)
        key = kw.get("key", node.args[1] if len(node.args) > 1 else None)
        value = kw.get("value", node.args[2] if len(node.args) > 2 else None)
        return AttentionView(node, node, query, key, value)
    if node.op == "call_function" and _is_torchvision_window_attention(node):
        kw = {**dict(zip(_WINDOW_ATTENTION_ARGS, node.args)), **node.kwargs}
        shape = output_shape(kw.get("input"))
        if shape is None or "window_size" not in kw or "num_heads" not in kw:
            return None
        x, channels = kw["input"], int(shape[-1])
        return AttentionView(node, node, x, x, x, channels, int(kw["num_heads"]), channels, channels, True,
                             window_size=tuple(int(w) for w in kw["window_size"]))
    return None


# ---------------------------------------------------------------- identity and shape ops

_DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
_DROPOUT_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
                      aten.dropout.default, aten.dropout_.default, aten.feature_dropout.default,
                      aten.alpha_dropout.default}
_ALIAS_FUNCTIONS = {aten.clone.default, aten.alias.default, aten.contiguous.default, aten.detach.default,
                    aten.lift_fresh_copy.default, torch.clone}
_ALIAS_METHODS = {"contiguous", "clone", "detach"}


def _stochastic_depth_in_eval(node: Node) -> bool:
    target = node.target
    if getattr(target, "__name__", "") != "stochastic_depth" or "torchvision" not in getattr(target, "__module__", ""):
        return False
    kw = (_normalized(node) or {}) if node.kwargs else {}     # all positional: no signature to bind
    training = kw.get("training", node.args[3] if len(node.args) > 3 else True)
    p = kw.get("p", node.args[1] if len(node.args) > 1 else 1.0)
    return training is False or p == 0.0


def is_identity_like(node: Node) -> bool:
    """True when the node returns its first input unchanged in value (identity, eval dropout, copies).

    Dropout counts only when it is a no-op: in eval mode, ``training=False``, or ``p == 0``.
    """
    if not isinstance(node, Node):
        return False
    m = module_of(node)
    if m is not None:
        if isinstance(m, nn.Identity):
            return True
        return isinstance(m, _DROPOUT_MODULES) and (not m.training or m.p == 0)
    if node.op == "call_method":
        return node.target in _ALIAS_METHODS and len(node.args) == 1 and not node.kwargs.get("memory_format")
    if node.op != "call_function":
        return False
    if node.target in _ALIAS_FUNCTIONS:
        return True
    if node.target in _DROPOUT_FUNCTIONS:
        kw = _normalized(node) or {}
        training = kw.get("training", kw.get("train", True))
        return training is False or kw.get("p", 0.5) == 0
    return _stochastic_depth_in_eval(node)


_SHAPE_METHODS = {"view", "reshape", "flatten", "permute", "transpose", "squeeze", "unsqueeze", "expand",
                  "size", "dim", "unflatten", "t", "view_as", "reshape_as", "expand_as", "chunk", "split",
                  "unbind", "narrow", "select", "movedim"}
_SHAPE_FUNCTIONS = {torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze,
                    torch.chunk, torch.split, torch.unbind, torch.narrow, torch.select, torch.movedim,
                    operator.getitem, getattr, torch.t}
_SHAPE_ATEN = {"view", "_unsafe_view", "reshape", "flatten", "permute", "transpose", "squeeze", "unsqueeze",
               "expand", "t", "unflatten", "split", "split_with_sizes", "chunk", "unbind", "select", "slice",
               "narrow", "alias", "movedim", "sym_size", "_assert_tensor_metadata"}


@dataclass(frozen=True)
class ReshapeView:
    """An op that gives its input's elements a new shape and keeps their row-major order (flatten,
    reshape, view, squeeze, unsqueeze, unflatten). The new shape is the output's traced shape."""
    node: Node
    output: Node
    input: Node


_RESHAPE_MODULES = (nn.Flatten, nn.Unflatten)
_RESHAPE_METHODS = {"view", "reshape", "flatten", "squeeze", "unsqueeze", "unflatten", "view_as", "reshape_as"}
_RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.unflatten,
                      aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.flatten.using_ints,
                      aten.squeeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.unsqueeze.default,
                      aten.unflatten.int}


def reshape_of(node: Node) -> ReshapeView | None:
    """Describe an op that only reshapes its input (elements kept in row-major order), or None.

    ``x.view(dtype)`` reinterprets bits rather than reshaping and is not one.
    """
    if not isinstance(node, Node) or not node.args or not isinstance(node.args[0], Node):
        return None
    m = module_of(node)
    if m is not None:
        return ReshapeView(node, node, node.args[0]) if isinstance(m, _RESHAPE_MODULES) else None
    if node.op == "call_method" and node.target in _RESHAPE_METHODS:
        if node.target == "view" and any(isinstance(a, torch.dtype) for a in node.args[1:]):
            return None
        return ReshapeView(node, node, node.args[0])
    if node.op == "call_function" and node.target in _RESHAPE_FUNCTIONS:
        return ReshapeView(node, node, node.args[0])
    return None


def is_shape_op(node: Node) -> bool:
    """True for view/reshape/permute/index-style ops that move no arithmetic (cost: data movement at most)."""
    if not isinstance(node, Node):
        return False
    if node.op == "call_method":
        return node.target in _SHAPE_METHODS
    if node.op != "call_function":
        return False
    if node.target in _SHAPE_FUNCTIONS:
        return True
    packet = getattr(node.target, "_overloadpacket", None)
    return packet is not None and getattr(packet, "__name__", "") in _SHAPE_ATEN


def is_input_guard(node: Node) -> bool:
    """True for the input-guard call (``_guards_fn``) that ``torch.export``'s ``.module()`` puts first:
    it checks the inputs against the exported shapes, returns nothing, and belongs to no layer."""
    m = module_of(node)
    return m is not None and type(m).__name__ == "GuardsFn" and type(m).__module__.startswith("torch.export")


def is_inplace(node: Node) -> bool:
    """True when the node writes into one of its inputs (``relu_``, ``x.add_(y)``, ``inplace=True`` layers,
    mutable ATen overloads). Rewrites that would make two values share storage must not cross such a node."""
    if not isinstance(node, Node):
        return False
    for view in (activation_of, add_of, mul_of):
        described = view(node)
        if described is not None and described.inplace:
            return True
    m = module_of(node)
    if m is not None:
        return bool(getattr(m, "inplace", False))
    if node.op == "call_method":
        return str(node.target).endswith("_") and not str(node.target).startswith("_")
    if node.op != "call_function":
        return False
    if node.target in (operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.setitem):
        return True
    schema = getattr(node.target, "_schema", None)
    if schema is not None:
        return bool(schema.is_mutable)
    return bool(node.kwargs.get("inplace", False))


# ---------------------------------------------------------------- classification

_CAT_FUNCTIONS = {torch.cat, torch.concat, torch.stack, aten.cat.default, aten.stack.default}
_SOFTMAX = {F.softmax, torch.softmax, aten.softmax.int, aten._softmax.default, F.log_softmax}
_REDUCE = {torch.mean, torch.sum, aten.mean.dim, aten.sum.dim_IntList, aten.mean.default, aten.sum.default}
_REDUCE_METHODS = {"mean", "sum"}


def _module_kinds() -> dict[type, str]:
    """The kind of a ``call_module`` node by the exact type of its module, for the types whose view
    describes every module of that type (subclasses are not listed: their nodes ask the views)."""
    families = ((_CONV_MODULES, "conv"), ((nn.Linear,), "linear"), (_BN_MODULES, "batchnorm"),
                ((nn.LayerNorm, nn.GroupNorm), "layernorm"), (tuple(_ACT_MODULES), "activation"),
                (tuple(_POOL_MODULES), "pool"))
    return {t: kind for types, kind in families for t in types}


_MODULE_KINDS = _module_kinds()


def op_kind(node: Node) -> str:
    """A coarse kind for cost models and reports.

    One of: placeholder, output, get_attr, conv, linear, batchnorm, layernorm, activation,
    add, mul, pool, matmul, attention, softmax, reduce, cat, identity, shape, other.
    """
    if node.op in ("placeholder", "output", "get_attr"):
        return node.op
    m = module_of(node)
    known = _MODULE_KINDS.get(type(m)) if m is not None else None
    if known is not None:
        return known
    if node.op == "call_function":
        known = _function_kind(node)
        if known is not None:
            return known
    for kind, view in (("conv", conv_of), ("linear", linear_of), ("batchnorm", batchnorm_of),
                       ("layernorm", layernorm_of), ("activation", activation_of), ("add", add_of),
                       ("mul", mul_of), ("pool", pool_of), ("matmul", matmul_of), ("attention", attention_of)):
        if view(node) is not None:
            return kind
    if is_identity_like(node):
        return "identity"
    if is_shape_op(node):
        return "shape"
    if node.op == "call_function":
        if node.target in _CAT_FUNCTIONS:
            return "cat"
        if node.target in _SOFTMAX:
            return "softmax"
        if node.target in _REDUCE:
            return "reduce"
    if node.op == "call_method":
        if node.target in ("softmax", "log_softmax"):
            return "softmax"
        if node.target in _REDUCE_METHODS:
            return "reduce"
    if isinstance(m, (nn.Softmax, nn.LogSoftmax)):
        return "softmax"
    if isinstance(m, nn.Flatten):
        return "shape"
    return "other"


# ---------------------------------------------------------------- memo for read-only walks

_MEMO: contextvars.ContextVar[dict | None] = contextvars.ContextVar("hant_ops_memo", default=None)
_UNSEEN = object()


@contextlib.contextmanager
def graph_unchanged():
    """Within this block, the op views and :func:`op_kind` remember their answer per node.

    For read-only walks that ask several views about every node (a cost model pricing a
    graph asks ``op_kind``, ``conv_of``, ... many times per node). The caller promises that
    no graph, node or module changes inside the block; outside it nothing is remembered.
    Blocks nest (an inner block shares the outer memo).
    """
    if _MEMO.get() is not None:
        yield
        return
    token = _MEMO.set({})
    try:
        yield
    finally:
        _MEMO.reset(token)


def _memoized(view: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``view`` answering from the :func:`graph_unchanged` memo when one is open."""
    @functools.wraps(view)
    def remembered(node):
        memo = _MEMO.get()
        if memo is None or not isinstance(node, Node):
            return view(node)
        answers = memo.get(view)
        if answers is None:
            answers = memo[view] = {}
        value = answers.get(node, _UNSEEN)
        if value is _UNSEEN:
            value = answers[node] = view(node)
        return value
    return remembered


conv_of = _memoized(conv_of)
linear_of = _memoized(linear_of)
batchnorm_of = _memoized(batchnorm_of)
layernorm_of = _memoized(layernorm_of)
activation_of = _memoized(activation_of)
add_of = _memoized(add_of)
mul_of = _memoized(mul_of)
pool_of = _memoized(pool_of)
matmul_of = _memoized(matmul_of)
einsum_of = _memoized(einsum_of)
attention_of = _memoized(attention_of)
is_identity_like = _memoized(is_identity_like)
is_shape_op = _memoized(is_shape_op)
reshape_of = _memoized(reshape_of)
op_kind = _memoized(op_kind)
module_of = _memoized(module_of)

# Function targets that exactly one view of op_kind's chain accepts (see _function_kind).
_SOLE_VIEW: dict[Any, tuple[str, Callable[[Node], Any]]] = {
    **{t: ("conv", conv_of) for t in _CONV_FUNCTIONS}, **{t: ("activation", activation_of) for t in _ACT_FUNCTIONS},
    **{t: ("add", add_of) for t in _ADD_FUNCTIONS}, **{t: ("mul", mul_of) for t in _MUL_FUNCTIONS},
    **{t: ("pool", pool_of) for t in _POOL_FUNCTIONS},
}
_IDENTITY_FUNCTIONS = _DROPOUT_FUNCTIONS | _ALIAS_FUNCTIONS


def _function_kind(node: Node) -> str | None:
    """op_kind's shortcut for a ``call_function`` node, or None to run its whole chain of views.

    A target that only one view of the chain accepts asks that view alone; dropout, copies and
    stochastic depth, which no view accepts, ask :func:`is_identity_like` alone. A no goes back to
    the whole chain, so the kind is always the chain's (a network's first pricing asks about every
    node, and most of a chain's views are noes)."""
    sole = _SOLE_VIEW.get(node.target)
    if sole is not None and sole[1](node) is not None:
        return sole[0]
    if (node.target in _IDENTITY_FUNCTIONS or getattr(node.target, "__name__", "") == "stochastic_depth") \
            and is_identity_like(node):
        return "identity"
    return None
