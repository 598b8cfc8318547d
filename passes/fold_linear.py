"""fold_linear: collapse chains and sums of linear ops with no nonlinearity between them.

Linear ops are convolutions (zero padding, not transposed), ``nn.Linear``, eval-mode
BatchNorm, average pooling that counts padded zeros (or has none), ``mul``/``add`` by a
scalar or a per-channel constant, identity-like ops, and ``a + alpha * b`` of two linear
branches of the same tensor (RepVGG / ACNet / DBB / MobileOne training-time blocks, and
residual ``x + f(x)``). Each maximal expression over one source tensor becomes ONE conv
(or linear), plus, where zero padding makes the constant term position dependent, one
``add`` of a constant bias-map buffer for the traced spatial size.

Exactness rules (the algebra lives in :mod:`hant.passes.linear_algebra`):

* a chain folds when the second op does not pad, or when it pads and the first is a
  stride-1 unpadded pointwise op (then a bias map corrects the zero ring when the first
  has a constant term); a padded op after a spatial op is refused: not exact at borders;
* branches fold when they have the same stride and output shape and their kernels share
  a centre (paddings aligned); otherwise refused;
* an op whose output has other users is not folded into its successor (refused);
* a bias map is refused when ``context.options["static_shapes"]`` is False.

Every fold is priced with the context's cost model (``roofline:cpu``, else ``flops``,
when the context has none) on the ops it removes against the ops it adds, and kept only
when strictly cheaper (latency, then MACs, then bytes, then op count). This rejects folds
that widen a bottleneck or turn a grouped chain dense when that does not pay. Every
choice is recorded with :meth:`Pass.decide`. Needs ``tensor_meta`` on the nodes
(``hant.trace`` and the PassManager provide it); new weights go into new modules.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch.fx import GraphModule, Node
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from hant.errors import CostModelError, PassError
from hant.graphs.ops import (
    add_of, batchnorm_of, constant_of, conv_of, is_identity_like, linear_of, mul_of, output_dtype,
    output_shape, pool_of,
)
from hant.passes.base import Pass, PassContext, PassResult, register
from hant.passes.linear_algebra import (
    AffineMap, ConvMap, LinearMap, add, avg_pool_conv_map, compose, conv_map, diagonal_conv_map,
    diagonal_linear_map, identity_conv_map, identity_linear_map, linear_map,
)
from hant.passes.surgery import add_module, copy_meta, prune_unused, readable, unique_module_name

__all__ = ["FoldLinear", "Price", "price", "cost_model_for"]

_CONV_MODULES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


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
    """``nodes`` (ending at the root) compute ``map(source)``; ``ops`` counts non-identity ops."""
    source: Node
    map: AffineMap
    nodes: tuple[Node, ...]
    ops: int


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
        users = len(inner.users)
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
                return _Expr(expr.source, expr.map, expr.nodes + (node,), expr.ops)
            return None
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
        expr = exprs.get(inner)
        if expr is not None and self._absorbable(inner, covered[0]):
            composed = compose(expr.map, m)
            if not isinstance(composed, str):
                return _Expr(expr.source, composed, expr.nodes + covered, expr.ops + 1)
            if type(expr.map) is type(m):
                self._refuse(f"{inner.name} -> {node.name}", composed)
        return _Expr(inner, m, covered, 1)

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
                family = (expr_a or expr_b).map
                map_a = expr_a.map if expr_a else _identity_like(family, source_a)
                map_b = expr_b.map if expr_b else _identity_like(family, source_b)
                if map_a is None or map_b is None:
                    return None
                total = add(map_a, map_b, alpha)
                if isinstance(total, str):
                    self._refuse(f"{lhs.name} + {rhs.name}", total)
                    return None
                nodes = (expr_a.nodes if expr_a else ()) + (expr_b.nodes if expr_b else ()) + (node,)
                ops = (expr_a.ops if expr_a else 0) + (expr_b.ops if expr_b else 0) + 1
                return _Expr(source_a, total, nodes, ops)
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
        """Build the folded op where the expression's first op was (so it reads the source at the same
        point of the program), price it, and keep it only when cheaper."""
        site = " + ".join(n.name for n in expr.nodes)
        m = expr.map
        if isinstance(m, ConvMap) and m.has_bias_map and not self.context.options.get("static_shapes", True):
            self.decide(site, "refused", "the fold needs a constant bias map for the traced spatial size and "
                                         "options['static_shapes'] is False (input shapes may vary)")
            return False
        dtype = output_dtype(root) or torch.float32
        device = _device_of(expr.nodes)
        module, what = _module_for(m, dtype, device)
        base = f"{readable(root.name)}_folded"
        target = add_module(gm, base, module)
        added: list[Node] = []
        buffer_name = None
        with gm.graph.inserting_before(first):
            new = gm.graph.call_module(target, (expr.source,))
            copy_meta(root, new)
            new.meta["tensor_meta"] = root.meta["tensor_meta"]
            added.append(new)
            out = new
            if isinstance(m, ConvMap) and m.has_bias_map:
                buffer_name = unique_module_name(gm, f"{base}_bias_map")
                gm.register_buffer(buffer_name, m.const.unsqueeze(0).to(dtype=dtype, device=device))
                getter = gm.graph.get_attr(buffer_name)
                getter.meta["tensor_meta"] = _extract_tensor_metadata(getattr(gm, buffer_name))
                out = gm.graph.call_function(torch.add, (new, getter))
                copy_meta(root, out)
                out.meta["tensor_meta"] = root.meta["tensor_meta"]
                added += [getter, out]
        before = price(self._model, expr.nodes)
        after = price(self._model, added)
        reason = f"{expr.ops} linear ops -> {what}" + _densify_note(expr.nodes, m)
        if isinstance(m, ConvMap) and m.has_bias_map:
            reason += f", plus a constant bias map for spatial size {tuple(m.out_size)}"
        if not after < before:
            for node in reversed(added):
                gm.graph.erase_node(node)
            delattr(gm, target)
            if buffer_name is not None:
                delattr(gm, buffer_name)
            self.decide(site, "not_cheaper", reason, before.figure(after), after.figure(before))
            return False
        root.replace_all_uses_with(out)
        self.decide(site, "applied", reason, before.figure(after), after.figure(before))
        return True


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


def _module_for(m: AffineMap, dtype: torch.dtype, device: torch.device) -> tuple[nn.Module, str]:
    """A fresh Conv/Linear module holding the map's weights, and a short description."""
    if isinstance(m, LinearMap):
        has_bias = bool(m.bias.any())
        module = nn.Linear(m.in_channels, m.out_channels, bias=has_bias, device="meta")
        module.weight = nn.Parameter(m.weight.to(dtype=dtype, device=device).clone())
        if has_bias:
            module.bias = nn.Parameter(m.bias.to(dtype=dtype, device=device).clone())
        return module, f"one linear {m.in_channels}->{m.out_channels}"
    n = m.spatial_dims
    has_bias = not m.has_bias_map and bool(m.const.any())
    module = _CONV_MODULES[n](m.in_channels, m.out_channels, m.kernel_size, stride=m.stride, padding=m.padding,
                              dilation=m.dilation, groups=m.groups, bias=has_bias, device="meta")
    module.weight = nn.Parameter(m.weight.to(dtype=dtype, device=device).clone())
    if has_bias:
        module.bias = nn.Parameter(m.const.to(dtype=dtype, device=device).clone())
    kernel = "x".join(str(k) for k in m.kernel_size)
    return module, f"one {kernel} conv {m.in_channels}->{m.out_channels} (groups {m.groups})"


def _densify_note(nodes, m: AffineMap) -> str:
    if not isinstance(m, ConvMap):
        return ""
    grouped = [conv_of(n).groups for n in nodes if conv_of(n) is not None and conv_of(n).groups > 1]
    if grouped and m.groups < min(grouped):
        return f"; the grouped chain (groups {min(grouped)}) becomes groups {m.groups}"
    return ""
