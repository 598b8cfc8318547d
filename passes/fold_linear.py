"""fold_linear: collapse chains and sums of linear ops with no nonlinearity between them.

Linear ops are convolutions (zero padding, not transposed), ``nn.Linear``, eval-mode
BatchNorm, average pooling that counts padded zeros (or has none), adaptive average
pooling whose input size is a multiple of its output size, ``mul``/``add`` by a scalar or
a per-channel constant, identity-like ops, and ``a + alpha * b`` of two linear branches
of the same tensor (RepVGG / ACNet / DBB / MobileOne training-time blocks, and residual
``x + f(x)``). A reshape of an ``(N, C, 1, ..., 1)`` result to ``(N, C)`` (``flatten``,
``view``, ``squeeze``) keeps the expression going, so a classifier head (global pool ->
flatten -> Linear) folds with the convolutions before it. Each maximal expression over
one source tensor becomes ONE conv (or linear), plus, where zero padding makes the
constant term position dependent, one ``add`` of a constant bias-map buffer for the
traced spatial size.

Exactness rules (the algebra lives in :mod:`hant.passes.linear_algebra`):

* a chain folds when the second op does not pad, or when it pads and the first is a
  stride-1 unpadded pointwise op (then a bias map corrects the zero ring when the first
  has a constant term); a padded op after a spatial op is refused: not exact at borders;
* branches fold when they have the same stride and output shape and their kernels share
  a centre (paddings aligned); otherwise refused;
* an adaptive average pool is an average pool with kernel = stride = input size / output
  size, for the traced input size; an input size that is not a multiple of the output
  size gives windows of different sizes and is refused;
* a Linear after a reshape of a conv-family result with a single output position is a
  1x..x1 convolution of it;
* an op whose output has other users is not folded into its successor (refused);
* a bias map, or a fixed kernel read from an adaptive pool, is refused when
  ``context.options["static_shapes"]`` is False, unless the pool-first form below applies.

An expression can be emitted in several exact forms; each is priced and the cheapest kept:

* the folded op itself (a conv, or a linear; a conv with a single output position is
  followed by a flatten when the expression ended in ``(N, C)``);
* for an expression with a single output position ending in ``(N, C)``: flatten the
  source and one Linear over all of it (``C*H*W`` inputs; kernel taps on the zero padding
  are dropped, they multiply zeros);
* for an expression that is pointwise (1x1, stride 1, unpadded) up to a global adaptive
  average pool: the pool commutes to the front, so the source is pooled first, then one
  1x1 conv, or flatten and one Linear (``C_source -> C_out``). This form is exact for any
  input size, and is proposed only when it has fewer linear ops than the expression.

Every fold is priced with the context's cost model (``roofline:cpu``, else ``flops``,
when the context has none) on the ops it removes against the ops it adds, and kept only
when strictly cheaper (latency, then MACs, then bytes, then op count). This rejects folds
that widen a bottleneck or turn a grouped chain dense when that does not pay. Forms are
priced on shell modules (parameters on the meta device); only the kept form gets real
weights. Every choice is recorded with :meth:`Pass.decide`. Needs ``tensor_meta`` on the
nodes (``hant.trace`` and the PassManager provide it); new weights go into new modules.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
import torch.nn as nn
from torch.fx import Graph, GraphModule, Node
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from hant.errors import CostModelError, PassError
from hant.graphs.ops import (
    add_of, batchnorm_of, constant_of, conv_of, is_identity_like, is_shape_op, linear_of, mul_of, output_dtype,
    output_shape, pool_of, reshape_of,
)
from hant.passes.base import Pass, PassContext, PassResult, register
from hant.passes.linear_algebra import (
    AffineMap, ConvMap, LinearMap, add, after_global_mean, avg_pool_conv_map, commute_with_global_mean, compose,
    conv_map, diagonal_conv_map, diagonal_linear_map, identity_conv_map, identity_linear_map, linear_as_conv_map,
    linear_map, single_position_linear,
)
from hant.passes.surgery import add_module, copy_meta, prune_unused, readable, unique_module_name

__all__ = ["FoldLinear", "Price", "price", "cost_model_for"]

_CONV_MODULES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_GLOBAL_POOLS = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}


# ---------------------------------------------------------------- pricing (shared with fuse_parallel)

@dataclass(frozen=True, order=True)
class Price:
    """The summed cost of some nodes, compared lexicographically: latency, MACs, bytes, op count."""
    latency_s: float
    macs: int
    bytes: int
    ops: int

    def __add__(self, other: "Price") -> "Price":
        return Price(self.latency_s + other.latency_s, self.macs + other.macs, self.bytes + other.bytes,
                     self.ops + other.ops)

    def figure(self, other: "Price") -> float:
        """The number to report next to ``other``: latency when the model gives one, else MACs."""
        return self.latency_s if (self.latency_s or other.latency_s) else float(self.macs)


def cost_model_for(context: PassContext) -> Any:
    """The context's cost model; a spec string is resolved; None means ``roofline:cpu``, else ``flops``."""
    from hant import cost_models

    if context.cost is not None:
        return cost_models.get(context.cost)
    errors = []
    for spec in ("roofline:cpu", "flops"):
        try:
            return cost_models.get(spec)
        except CostModelError as exc:
            errors.append(str(exc))
    raise PassError("this pass prices its rewrites but no cost model is available; pass cost=<model> to the "
                    "PassManager or set PassContext.cost (" + "; ".join(errors) + ")")


def price(model: Any, nodes) -> Price:
    """Sum ``model.node_cost`` over the compute nodes in ``nodes`` (they need ``tensor_meta``)."""
    latency, macs, nbytes, ops = 0.0, 0, 0, 0
    for node in nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        cost = model.node_cost(node)
        latency += float(cost.latency_s)
        macs += int(cost.macs)
        nbytes += int(cost.bytes)
        ops += 1
    return Price(latency, macs, nbytes, ops)


# ---------------------------------------------------------------- expressions

@dataclass(frozen=True)
class _Expr:
    """``nodes`` (ending at the root) compute ``full_map(source)``; ``ops`` counts non-identity ops.

    ``flat``: the value is the map's ``(N, C, 1, ..., 1)`` result reshaped to ``(N, C)``.
    ``averaged_size``: when set, the value is ``map(mean of source over all positions)`` for a source of
    that spatial size, and ``map`` is a pointwise ConvMap on one position (the expression is pointwise
    up to a global average pool, which commutes to the front). ``traced_size_only``: ``map`` reads an
    adaptive pool as a fixed-kernel pool, so it holds at the traced input size only (the global average
    that ``averaged_size`` stands for is no such read; in ``full_map`` it is one).
    """
    source: Node
    map: AffineMap
    nodes: tuple[Node, ...]
    ops: int
    flat: bool = False
    averaged_size: tuple[int, ...] | None = None
    traced_size_only: bool = False

    @property
    def full_map_any_size(self) -> bool:
        """True when ``full_map`` is exact for any input size."""
        return not self.traced_size_only and self.averaged_size is None

    @property
    def full_map(self) -> AffineMap:
        """The map from the source to the value, the global average (if any) included."""
        if self.averaged_size is None:
            return self.map
        return after_global_mean(self.map, self.averaged_size)


def _static_shape(node: Any) -> tuple[int, ...] | None:
    shape = output_shape(node)
    if shape is None or not all(isinstance(s, int) for s in shape):
        return None
    return tuple(shape)


def _runtime(arg: Any) -> bool:
    return isinstance(arg, Node) and arg.op != "get_attr"


def _constant_value(arg: Any) -> torch.Tensor | None:
    if isinstance(arg, numbers.Number) and not isinstance(arg, bool):
        return torch.tensor(float(arg), dtype=torch.float64)
    if isinstance(arg, torch.Tensor):
        return arg.detach()
    return constant_of(arg)


@register
class FoldLinear(Pass):
    """Fold linear chains, branch sums and residuals into one conv or linear; see the module docstring."""

    name = "fold_linear"
    exact = True
    idempotent = True

    def call(self, gm: GraphModule) -> PassResult:
        self._model = cost_model_for(self.context)
        self._said: set[tuple[str, str]] = set()
        exprs: dict[Node, _Expr | None] = {}
        for node in gm.graph.nodes:
            exprs[node] = self._expr(node, exprs)
        order = {node: i for i, node in enumerate(gm.graph.nodes)}
        consumed: set[Node] = set()
        modified = False
        for node in reversed(list(gm.graph.nodes)):
            expr = exprs[node]
            if expr is None or expr.ops < 2 or node in consumed:
                continue
            if self._emit(gm, node, expr, min(expr.nodes, key=order.__getitem__)):
                consumed.update(expr.nodes)
                modified = True
        if modified:
            prune_unused(gm)
        return PassResult(gm, modified)

    # ------------------------------------------------------------ decisions

    def _refuse(self, site: str, reason: str) -> None:
        if (site, reason) not in self._said:
            self._said.add((site, reason))
            self.decide(site, "refused", reason)

    def _absorbable(self, inner: Node, outer: Node) -> bool:
        """True when ``outer`` is the only reader of ``inner``'s value (size queries that only feed a
        reshape ``outer``'s shape arguments do not read it); else refuse with the reason."""
        reshape = reshape_of(outer) is not None
        users = sum(1 for user in inner.users if not (reshape and _size_query_for(user, outer)))
        if users == 1:
            return True
        self._refuse(f"{inner.name} -> {outer.name}",
                     f"{inner.name}'s output has {users} users; folding it into {outer.name} would change what "
                     "the others read (it would have to be computed twice)")
        return False

    # ------------------------------------------------------------ building expressions

    def _expr(self, node: Node, exprs: dict[Node, _Expr | None]) -> _Expr | None:
        if node.op not in ("call_module", "call_function", "call_method") or _static_shape(node) is None:
            return None
        summed = add_of(node)
        if summed is not None and not summed.inplace and _runtime(summed.lhs) and _runtime(summed.rhs):
            return self._sum_expr(node, summed.lhs, summed.rhs, summed.alpha, exprs)
        if is_identity_like(node):
            inner = node.args[0] if node.args else None
            expr = exprs.get(inner) if isinstance(inner, Node) else None
            if expr is not None and self._absorbable(inner, node):
                return replace(expr, nodes=expr.nodes + (node,))
            return None
        reshape = reshape_of(node)
        if reshape is not None:
            return self._flattened_expr(node, reshape.input, exprs)
        op = self._op_map(node, exprs)
        if op is None:
            return None
        if isinstance(op, tuple) and isinstance(op[1], str):
            inner, reason = op
            if exprs.get(inner) is not None:
                self._refuse(f"{inner.name} -> {node.name}", reason)
            return None
        inner, m = op
        # An op that returns a tuple (core ATen batch norm) is described at its getitem: cover both nodes.
        covered = tuple(n for n in node.all_input_nodes if n is not inner and n.op != "get_attr") + (node,)
        pool = pool_of(node)
        adaptive = pool is not None and pool.kind == "adaptive_avg"
        global_mean = adaptive and all(s == 1 for s in m.out_size)
        expr = exprs.get(inner)
        if expr is not None and self._absorbable(inner, covered[0]):
            step = linear_as_conv_map(m, expr.map.spatial_dims) if expr.flat and isinstance(m, LinearMap) else m
            chained = _chain(expr, step, covered, global_mean, adaptive)
            if not isinstance(chained, str):
                return chained
            if type(expr.map) is type(step):
                self._refuse(f"{inner.name} -> {node.name}", chained)
        if global_mean:
            return _Expr(inner, identity_conv_map(m.in_channels, m.out_size), covered, 1, averaged_size=m.in_size)
        return _Expr(inner, m, covered, 1, traced_size_only=adaptive)

    def _flattened_expr(self, node: Node, inner: Node, exprs) -> _Expr | None:
        """A reshape of a conv-family expression's ``(N, C, 1, ..., 1)`` value to ``(N, C)``: the same
        expression, flattened (a Linear after it is a 1x..x1 conv of it). Other reshapes end expressions."""
        expr = exprs.get(inner)
        if expr is None or expr.flat or not isinstance(expr.map, ConvMap):
            return None
        shape = _static_shape(inner)
        if _static_shape(node) != shape[:2] or any(s != 1 for s in shape[2:]) or not self._absorbable(inner, node):
            return None
        return replace(expr, nodes=expr.nodes + (node,), flat=True)

    def _sum_expr(self, node: Node, lhs: Node, rhs: Node, alpha: float, exprs) -> _Expr | None:
        shape = _static_shape(node)
        if shape is None or _static_shape(lhs) != shape or _static_shape(rhs) != shape:
            return None
        if not (output_dtype(lhs) == output_dtype(rhs) == output_dtype(node)):
            return None

        def options(side: Node):
            expr = exprs.get(side)
            found = [(expr.source, expr)] if expr is not None and self._absorbable(side, node) else []
            return found + [(side, None)]

        for source_a, expr_a in options(lhs):
            for source_b, expr_b in options(rhs):
                if source_a is not source_b or (expr_a is None and expr_b is None):
                    continue
                some = expr_a or expr_b
                averaged = expr_a.averaged_size if expr_a and expr_b else None
                if averaged is not None and averaged == expr_b.averaged_size:   # both pooled first: add after
                    map_a, map_b = expr_a.map, expr_b.map
                else:
                    averaged = None
                    map_a = expr_a.full_map if expr_a else _identity_like(some.map, source_a)
                    map_b = expr_b.full_map if expr_b else _identity_like(some.map, source_b)
                if map_a is None or map_b is None:
                    return None
                total = add(map_a, map_b, alpha)
                if isinstance(total, str):
                    self._refuse(f"{lhs.name} + {rhs.name}", total)
                    return None
                nodes = (expr_a.nodes if expr_a else ()) + (expr_b.nodes if expr_b else ()) + (node,)
                ops = (expr_a.ops if expr_a else 0) + (expr_b.ops if expr_b else 0) + 1
                exprs_here = [e for e in (expr_a, expr_b) if e is not None]
                if averaged is not None:
                    traced = any(e.traced_size_only for e in exprs_here)
                else:
                    traced = not all(e.full_map_any_size for e in exprs_here)
                return _Expr(source_a, total, nodes, ops, some.flat, averaged, traced)
        return None

    def _op_map(self, node: Node, exprs) -> tuple[Node, AffineMap | str] | None:
        """(input, map) for a single linear op; (input, reason) when it looks linear but is not foldable."""
        conv = conv_of(node)
        if conv is not None:
            return self._conv_map(conv)
        lin = linear_of(node)
        if lin is not None:
            if lin.weight is None or (lin.has_bias and lin.bias is None):
                return lin.input, "its weights are computed at run time"
            return lin.input, linear_map(lin.weight, lin.bias)
        bn = batchnorm_of(node)
        if bn is None and node.args:
            owner = batchnorm_of(node.args[0])
            bn = owner if owner is not None and owner.output is node else None
        if bn is not None:
            if bn.training:
                return bn.input, "batch norm in training mode (or without running statistics) is not affine"
            shape = _static_shape(bn.input)
            if shape is None or bn.running_mean is None:
                return None
            scale, shift = bn.scale_shift(torch.float64)
            return bn.input, _diagonal(scale, shift, shape, channel_dim=1)
        pool = pool_of(node)
        if pool is not None and pool.kind == "avg":
            return self._pool_map(pool)
        if pool is not None and pool.kind == "adaptive_avg":
            return self._adaptive_pool_map(pool)
        return self._constant_map(node, exprs)

    def _conv_map(self, conv) -> tuple[Node, AffineMap | str] | None:
        if conv.transposed:
            return conv.input, "transposed convolutions are not folded"
        if conv.padding_mode != "zeros":
            return conv.input, f"padding_mode={conv.padding_mode!r} is not zero padding"
        if conv.weight is None or (conv.has_bias and conv.bias is None):
            return conv.input, "its weights are computed at run time"
        n = conv.spatial_dims
        in_shape, out_shape = _static_shape(conv.input), _static_shape(conv.output)
        if in_shape is None or out_shape is None or len(in_shape) != n + 2:
            return None
        padding = conv.padding
        if isinstance(padding, str):
            if padding == "valid":
                padding = (0,) * n
            else:
                reach = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
                if any(r % 2 for r in reach):
                    return conv.input, "padding='same' with an even kernel pads asymmetrically"
                padding = tuple(r // 2 for r in reach)
        return conv.input, conv_map(conv.weight, conv.bias, conv.stride, padding, conv.dilation, conv.groups,
                                    in_shape[2:], out_shape[2:])

    def _pool_map(self, pool) -> tuple[Node, AffineMap | str] | None:
        in_shape, out_shape = _static_shape(pool.input), _static_shape(pool.output)
        n = pool.spatial_dims
        if in_shape is None or out_shape is None or len(in_shape) != n + 2:
            return None
        if any(pool.padding) and not pool.count_include_pad and pool.divisor_override is None:
            return pool.input, ("avg pool with count_include_pad=False and padding divides border windows by "
                                "fewer elements: not a convolution")
        floor_size = tuple((i + 2 * p - k) // s + 1 for i, p, k, s in
                           zip(in_shape[2:], pool.padding, pool.kernel_size, pool.stride))
        if floor_size != out_shape[2:]:
            return pool.input, "avg pool with ceil_mode=True has partial windows here: not a convolution"
        return pool.input, avg_pool_conv_map(in_shape[1], pool.kernel_size, pool.stride, pool.padding,
                                             pool.divisor_override, in_shape[2:], out_shape[2:])

    def _adaptive_pool_map(self, pool) -> tuple[Node, AffineMap | str] | None:
        """An adaptive average pool as the fixed-kernel pool it is at the traced size (kernel = stride =
        input size / output size), or the reason it is not one."""
        in_shape, out_shape = _static_shape(pool.input), _static_shape(pool.output)
        n = pool.spatial_dims
        if in_shape is None or out_shape is None or len(in_shape) != n + 2 or min(out_shape[2:]) < 1:
            return None
        in_size, out_size = in_shape[2:], out_shape[2:]
        if any(i % o for i, o in zip(in_size, out_size)):
            return pool.input, (f"adaptive avg pool from {in_size} to {out_size}: the input size is not a multiple "
                                "of the output size, so its windows differ in size and overlap: not a convolution")
        kernel = tuple(i // o for i, o in zip(in_size, out_size))
        return pool.input, avg_pool_conv_map(in_shape[1], kernel, kernel, (0,) * n, None, in_size, out_size)

    def _constant_map(self, node: Node, exprs) -> tuple[Node, AffineMap | str] | None:
        """``x * c``, ``x + alpha * c`` or ``c + alpha * x`` with a scalar or per-channel constant ``c``."""
        is_mul = False
        view = add_of(node)
        if view is None:
            view, is_mul = mul_of(node), True
        if view is None or view.inplace:
            return None
        if _runtime(view.lhs) == _runtime(view.rhs):
            return None
        x, other = (view.lhs, view.rhs) if _runtime(view.lhs) else (view.rhs, view.lhs)
        c = _constant_value(other)
        shape = _static_shape(x)
        if c is None or shape is None or _static_shape(node) != shape or output_dtype(node) != output_dtype(x):
            return None
        c = c.to(torch.float64)
        if is_mul:
            scale, shift = c, torch.zeros((), dtype=torch.float64)
        elif x is view.lhs:
            scale, shift = torch.ones((), dtype=torch.float64), view.alpha * c
        else:
            scale, shift = torch.full((), view.alpha, dtype=torch.float64), c
        channel_dim = self._channel_dim(c, shape, x, node, exprs)
        if channel_dim is None:
            return None
        channels = shape[channel_dim]
        try:
            scale = _per_channel(scale, channels)
            shift = _per_channel(shift, channels)
        except ValueError:
            return None
        return x, _diagonal(scale, shift, shape, channel_dim)

    @staticmethod
    def _channel_dim(c: torch.Tensor, shape, x: Node, node: Node, exprs) -> int | None:
        """The dim a constant scales along: 1 (conv family) or last (linear family); None if neither."""
        rank = len(shape)
        if rank < 2:
            return None
        if c.numel() == 1:
            inner = exprs.get(x)
            if inner is not None:
                return 1 if isinstance(inner.map, ConvMap) else rank - 1
            users = list(node.users)
            if rank == 2 or (len(users) == 1 and linear_of(users[0]) is not None):
                return rank - 1
            return 1
        if c.dim() > rank:
            return None
        full = (1,) * (rank - c.dim()) + tuple(c.shape)
        varying = [d for d, s in enumerate(full) if s != 1]
        if len(varying) != 1:
            return None
        dim = varying[0]
        if dim == rank - 1 and (rank == 2 or dim != 1):
            return rank - 1
        return 1 if dim == 1 else None

    # ------------------------------------------------------------ rewriting

    def _emit(self, gm: GraphModule, root: Node, expr: _Expr, first: Node) -> bool:
        """Price every exact form of the expression (each built alone in a scratch graph) and build the
        cheapest where the expression's first op was (so it reads the source at the same point of the
        program) when it is cheaper than the expression."""
        site = " + ".join(n.name for n in expr.nodes)
        full = expr.full_map
        dtype = output_dtype(root) or torch.float32
        device = _device_of(expr.nodes)
        forms = _forms(expr, full, dtype)
        if not self.context.options.get("static_shapes", True):
            forms = [form for form in forms if form.any_size]
            if not forms:
                self.decide(site, "refused", _fixed_size_reason(full))
                return False
        before = price(self._model, expr.nodes)
        prices = [price(self._model, _build_alone(root, expr.source, form, dtype, device)) for form in forms]
        best = min(range(len(forms)), key=prices.__getitem__)
        after = prices[best]
        reason = f"{expr.ops} linear ops -> {forms[best].what}{forms[best].note}"
        others = [f"{form.what} ({_figure_text(cost, before)})" for form, cost in zip(forms, prices)
                  if form is not forms[best]]
        if others:
            reason += f"; also priced: {'; '.join(others)}"
        if not after < before:
            self.decide(site, "not_cheaper", reason, before.figure(after), after.figure(before))
            return False
        with gm.graph.inserting_before(first):
            output = _build(gm, root, expr.source, forms[best], dtype, device)[-1]
        for layer in forms[best].steps:
            if isinstance(layer, _Layer):
                layer.give_weights(device)
        root.replace_all_uses_with(output)
        self.decide(site, "applied", reason, before.figure(after), after.figure(before))
        return True


def _size_query_for(node: Node, reshape: Node) -> bool:
    """True when ``node`` is a shape query whose value reaches nothing but ``reshape``'s shape arguments, through
    shape queries alone (``x.size(0)`` in ``x.view(x.size(0), -1)``)."""
    return (node is not reshape and is_shape_op(node)
            and all(user is reshape or _size_query_for(user, reshape) for user in node.users))


def _chain(expr: _Expr, m: AffineMap, covered: tuple[Node, ...], global_mean: bool,
           adaptive: bool) -> _Expr | str:
    """``expr`` followed by the op ``m`` (covering the nodes ``covered``) as one expression, or the reason
    they do not compose. ``global_mean``: the op is a global adaptive average pool; ``adaptive``: an
    adaptive pool read as a fixed-kernel pool."""
    nodes, ops = expr.nodes + covered, expr.ops + 1
    if (global_mean and expr.averaged_size is None and isinstance(expr.map, ConvMap)
            and expr.map.is_pointwise):
        size = expr.map.out_size
        return _Expr(expr.source, commute_with_global_mean(expr.map), nodes, ops, expr.flat, size,
                     expr.traced_size_only)
    if expr.averaged_size is not None and isinstance(m, ConvMap) and m.is_pointwise:
        composed = compose(expr.map, m)
        if not isinstance(composed, str):
            return _Expr(expr.source, composed, nodes, ops, expr.flat, expr.averaged_size,
                         expr.traced_size_only or adaptive)
    composed = compose(expr.full_map, m)
    if isinstance(composed, str):
        return composed
    return _Expr(expr.source, composed, nodes, ops, expr.flat, None, adaptive or not expr.full_map_any_size)


# ---------------------------------------------------------------- forms

@dataclass(frozen=True)
class _Layer:
    """A conv or linear of a form: ``module`` is a shell (its parameters on the meta device, enough to
    price it); ``weights()`` gives the map whose weights it takes when the form is kept."""
    module: nn.Module
    weights: Callable[[], AffineMap]

    def give_weights(self, device: torch.device) -> None:
        """Replace the shell's meta parameters by the map's weights, in the shell's dtype, on ``device``."""
        m, module = self.weights(), self.module
        dtype = module.weight.dtype
        module.weight = nn.Parameter(m.weight.to(dtype=dtype, device=device).clone())
        if module.bias is not None:
            bias = m.bias if isinstance(m, LinearMap) else m.const
            module.bias = nn.Parameter(bias.to(dtype=dtype, device=device).clone())


@dataclass(frozen=True)
class _GlobalPool:
    """A global adaptive average pool over ``spatial_dims`` dims."""
    spatial_dims: int


@dataclass(frozen=True)
class _BiasMap:
    """``+ value`` (a constant ``(Cout, *out_size)`` map, broadcast over the batch)."""
    value: torch.Tensor


_FLATTEN = "flatten"     # a step: torch.flatten(x, 1)


@dataclass(frozen=True)
class _Form:
    """One exact way to compute an expression: ``steps`` applied in turn to its source.

    ``any_size``: exact for any input size (else for the traced size only); ``note`` completes the
    description in the report.
    """
    what: str
    steps: tuple
    any_size: bool
    note: str = ""


def _forms(expr: _Expr, full: AffineMap, dtype: torch.dtype) -> list[_Form]:
    """The exact forms of ``expr`` (whose map is ``full``) worth pricing; see the module docstring."""
    any_size = expr.full_map_any_size
    folded = _Layer(_shell(full, dtype), lambda: full)
    what = _describe(folded.module)
    if isinstance(full, LinearMap):
        return [_Form(what, (folded,), any_size)]
    note = _densify_note(expr.nodes, full)
    if full.has_bias_map:
        note += f", plus a constant bias map for spatial size {tuple(full.out_size)}"
        forms = [_Form(what, (folded, _BiasMap(full.const)), False, note)]
    elif not expr.flat:
        forms = [_Form(what, (folded,), any_size, note)]
    else:
        whole = _Layer(_linear_shell(full.in_channels * math.prod(full.in_size), full.out_channels, full.const, dtype),
                       lambda: single_position_linear(full))
        source = "x".join(str(s) for s in (full.in_channels, *full.in_size))
        forms = [_Form(f"{what}, flattened", (folded, _FLATTEN), any_size, note),
                 _Form(f"flatten -> {_describe(whole.module)} over the whole {source} source", (_FLATTEN, whole),
                       any_size)]
    if expr.averaged_size is not None and expr.ops > 2:
        forms.append(_pool_first_form(expr, dtype))
    return forms


def _pool_first_form(expr: _Expr, dtype: torch.dtype) -> _Form:
    """Global average pool of the source, then the expression's pointwise map: one 1x1 conv, or flatten and
    one Linear when the expression ends in ``(N, C)``."""
    p = expr.map
    if expr.flat:
        layer = _Layer(_linear_shell(p.in_channels, p.out_channels, p.const, dtype), lambda: single_position_linear(p))
        steps = (_GlobalPool(p.spatial_dims), _FLATTEN, layer)
        what = f"global average pool -> flatten -> {_describe(layer.module)}"
    else:
        layer = _Layer(_shell(p, dtype), lambda: p)
        steps = (_GlobalPool(p.spatial_dims), layer)
        what = f"global average pool -> {_describe(layer.module)}"
    return _Form(f"{what} (the pointwise ops before the pool commute with it)", steps, not expr.traced_size_only)


def _build(gm: GraphModule, root: Node, source: Node, form: _Form, dtype: torch.dtype,
           device: torch.device) -> list[Node]:
    """Insert ``form``'s nodes at the graph's insertion point, reading ``source``; return them (the last
    one computes the expression). Shapes come from running the steps on the meta device, provenance meta
    and names from ``root``."""
    base = f"{readable(root.name)}_folded"
    nodes: list[Node] = []
    x, value = source, torch.empty(_static_shape(source), dtype=dtype, device="meta")
    with torch.no_grad():
        for step in form.steps:
            if step is _FLATTEN:
                x, value = gm.graph.call_function(torch.flatten, (x, 1)), torch.flatten(value, 1)
            elif isinstance(step, _BiasMap):
                name = unique_module_name(gm, f"{base}_bias_map")
                gm.register_buffer(name, step.value.unsqueeze(0).to(dtype=dtype, device=device))
                getter = gm.graph.get_attr(name)
                getter.meta["tensor_meta"] = _extract_tensor_metadata(getattr(gm, name))
                nodes.append(getter)
                x, value = gm.graph.call_function(torch.add, (x, getter)), value + getattr(gm, name).to("meta")
            else:
                module = step.module if isinstance(step, _Layer) else _GLOBAL_POOLS[step.spatial_dims](1)
                target = add_module(gm, base if isinstance(step, _Layer) else f"{base}_pool", module)
                x, value = gm.graph.call_module(target, (x,)), module(value)
            copy_meta(root, x)
            x.meta["tensor_meta"] = _extract_tensor_metadata(value)
            nodes.append(x)
    return nodes


def _build_alone(root: Node, source: Node, form: _Form, dtype: torch.dtype, device: torch.device) -> list[Node]:
    """``form`` built in a scratch graph module of its own, reading a placeholder shaped like ``source``
    (for pricing: the graph being rewritten is left untouched)."""
    scratch = GraphModule(nn.Module(), Graph())
    placeholder = scratch.graph.placeholder(source.name)
    placeholder.meta["tensor_meta"] = source.meta["tensor_meta"]
    return _build(scratch, root, placeholder, form, dtype, device)


def _linear_shell(in_features: int, out_features: int, bias: torch.Tensor, dtype: torch.dtype) -> nn.Linear:
    """A Linear whose parameters live on the meta device; it has a bias when ``bias`` is not all zeros."""
    return nn.Linear(in_features, out_features, bias=bool(bias.any()), device="meta", dtype=dtype)


def _shell(m: AffineMap, dtype: torch.dtype) -> nn.Module:
    """A conv or linear with ``m``'s hyper-parameters whose parameters live on the meta device."""
    if isinstance(m, LinearMap):
        return _linear_shell(m.in_channels, m.out_channels, m.bias, dtype)
    has_bias = not m.has_bias_map and bool(m.const.any())
    return _CONV_MODULES[m.spatial_dims](m.in_channels, m.out_channels, m.kernel_size, stride=m.stride,
                                         padding=m.padding, dilation=m.dilation, groups=m.groups, bias=has_bias,
                                         device="meta", dtype=dtype)


def _describe(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return f"one linear {module.in_features}->{module.out_features}"
    kernel = "x".join(str(k) for k in module.kernel_size)
    return f"one {kernel} conv {module.in_channels}->{module.out_channels} (groups {module.groups})"


def _figure_text(cost: Price, other: Price) -> str:
    """``cost``'s figure next to ``other`` with its unit (latency in microseconds, else MACs)."""
    value = cost.figure(other)
    return f"{value * 1e6:.3g} us" if (cost.latency_s or other.latency_s) else f"{value:.3g} MACs"


def _fixed_size_reason(full: AffineMap) -> str:
    if isinstance(full, ConvMap) and full.has_bias_map:
        return ("the fold needs a constant bias map for the traced spatial size and options['static_shapes'] is "
                "False (input shapes may vary)")
    return ("the fold reads an adaptive average pool as a fixed-kernel pool for the traced input size and "
            "options['static_shapes'] is False (input shapes may vary); only ops that are pointwise up to a "
            "global pool fold for any size")


# ---------------------------------------------------------------- helpers

def _per_channel(value: torch.Tensor, channels: int) -> torch.Tensor:
    if value.numel() == 1:
        return value.reshape(()).expand(channels).clone()
    flat = value.reshape(-1)
    if flat.numel() != channels:
        raise ValueError("constant does not match the channel count")
    return flat.clone()


def _diagonal(scale: torch.Tensor, shift: torch.Tensor, shape, channel_dim: int) -> AffineMap:
    rank = len(shape)
    if channel_dim == rank - 1 and (rank == 2 or channel_dim != 1):
        return diagonal_linear_map(scale, shift)
    return diagonal_conv_map(scale, shift, shape[2:])


def _identity_like(family: AffineMap, source: Node) -> AffineMap | None:
    shape = _static_shape(source)
    if shape is None:
        return None
    if isinstance(family, LinearMap):
        return identity_linear_map(shape[-1])
    if len(shape) != family.spatial_dims + 2:
        return None
    return identity_conv_map(shape[1], shape[2:])


def _device_of(nodes) -> torch.device:
    for node in nodes:
        for view in (conv_of(node), linear_of(node), batchnorm_of(node)):
            tensor = getattr(view, "weight", None) if view is not None else None
            if tensor is None and view is not None:
                tensor = getattr(view, "running_mean", None)
            if isinstance(tensor, torch.Tensor):
                return tensor.device
    return torch.device("cpu")


def _densify_note(nodes, m: AffineMap) -> str:
    if not isinstance(m, ConvMap):
        return ""
    grouped = [conv_of(n).groups for n in nodes if conv_of(n) is not None and conv_of(n).groups > 1]
    if grouped and m.groups < min(grouped):
        return f"; the grouped chain (groups {min(grouped)}) becomes groups {m.groups}"
    return ""
