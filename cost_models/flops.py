"""The ``flops`` cost model: MACs, parameters and bytes moved, per node.

Counting rules (one multiply-accumulate = one MAC = two FLOPs, as
``torch.utils.flop_counter`` counts them; bias additions are not MACs, as there):

* convolution (1d/2d/3d, grouped, depthwise, transposed):
  ``numel(output) * prod(weight.shape[1:])``, or ``numel(input) * prod(weight.shape[1:])``
  when transposed (each input element is scattered through the kernel);
* linear: ``numel(output) * in_features``;
* matmul / bmm / mm: ``numel(output) * K`` with K the contracted size;
* einsum: for each pairwise contraction, left to right, the product of the sizes of every
  index the pair involves;
* scaled dot-product attention: ``QK^T`` plus ``AV``, ``batch * L * S * (E + Ev)``;
* ``nn.MultiheadAttention`` as one node (the symbolic-trace form): the q, k and v input
  projections, ``QK^T``, ``AV`` and the output projection; torchvision's Swin
  ``shifted_window_attention`` likewise, over the padded windows;
* everything else (norms, activations, elementwise, pooling, softmax, cat, ...): 0 MACs.

``params`` are the parameters the op owns: a ``call_module`` node owns its module's
parameters; a functional or ATen node owns the ``nn.Parameter`` constants (``get_attr``
inputs) it is the first user of, so a shared constant is counted once. A module called
twice counts its parameters at each call.

``bytes_read`` are the activation inputs plus the weights and floating-point buffers
(BatchNorm running statistics) the op reads, each at its dtype's size; ``bytes_written``
are the op's tensor outputs. Views and no-op copies (``op_kind`` ``shape`` and ``identity``)
move no data and cost nothing, nor do nodes that produce no tensor (guards, asserts,
Python arithmetic on sizes), except that they still own the parameters they read (a
class token that is only ``expand``-ed). ``latency_s`` is always 0: this model counts,
it does not time.

Graphs are read only through the op views of :mod:`hant.graphs.ops`, so the traced
(``call_module``) and exported (ATen) forms of a network get the same counts.
"""

from __future__ import annotations

import math
from typing import Callable

import torch.nn as nn
from torch.fx import Node

from hant.cost_models.base import Cost, NodeSumCostModel
from hant.graphs.ops import (
    attention_of, constant_of, conv_of, einsum_of, linear_of, matmul_of, module_of, op_kind, output_shape,
    tensor_meta,
)

__all__ = ["FlopsModel", "node_macs", "tensor_bytes"]


def _numel(shape) -> int:
    return int(math.prod(shape)) if shape is not None else 0


def _metas(value) -> list:
    """The TensorMetadata entries of a node's ``tensor_meta`` (one, or several for tuple outputs)."""
    if value is None:
        return []
    if hasattr(value, "shape"):
        return [value] if hasattr(value, "dtype") else []
    if isinstance(value, (list, tuple)):
        return [m for item in value for m in _metas(item)]
    return []


def tensor_bytes(node: Node) -> int:
    """Bytes of every tensor the node produces, from shape propagation (0 when unknown)."""
    return sum(_numel(m.shape) * m.dtype.itemsize for m in _metas(tensor_meta(node)))


def _conv_macs(node: Node) -> int | None:
    view = conv_of(node)
    if view is None:
        return None
    per_element = _numel(view.weight_shape[1:])
    spread = output_shape(view.input) if view.transposed else output_shape(view.output)
    return _numel(spread) * per_element


def _linear_macs(node: Node) -> int | None:
    view = linear_of(node)
    if view is None:
        return None
    return _numel(output_shape(view.output)) * int(view.in_features)


def _matmul_macs(node: Node) -> int | None:
    view = matmul_of(node)
    if view is None:
        return None
    lhs = output_shape(view.lhs)
    if lhs is None or len(lhs) == 0:
        return 0
    return _numel(output_shape(view.output)) * int(lhs[-1])


def _attention_macs(node: Node) -> int | None:
    view = attention_of(node)
    if view is None:
        return None
    q, k, v = (output_shape(a) for a in (view.query, view.key, view.value))
    if q is None or k is None or v is None:
        return 0
    if view.window_size is not None:  # Swin window attention on (B, H, W, C), padded to whole windows
        windows_h, windows_w = (math.ceil(int(size) / w) * w for size, w in zip(q[1:3], view.window_size))
        tokens = int(q[0]) * windows_h * windows_w
        per_window = math.prod(view.window_size)
        embed = int(view.embed_dim)
        return tokens * embed * 3 * embed + 2 * tokens * per_window * embed + tokens * embed * embed
    if view.module is None:  # scaled_dot_product_attention on (..., L, E), (..., S, E), (..., S, Ev)
        batch_l = _numel(q[:-1])
        source = int(k[-2])
        return batch_l * source * int(q[-1]) + batch_l * source * int(v[-1])
    m: nn.MultiheadAttention = view.module
    embed = int(view.embed_dim)
    if len(q) == 2:                               # unbatched (L, E)
        batch, target, source = 1, int(q[0]), int(k[0])
    elif view.batch_first:                        # (N, L, E)
        batch, target, source = int(q[0]), int(q[1]), int(k[1])
    else:                                         # (L, N, E)
        batch, target, source = int(q[1]), int(q[0]), int(k[0])
    in_proj = batch * (target * embed + source * int(view.kdim) + source * int(view.vdim)) * embed
    source += int(m.bias_k is not None) + int(m.add_zero_attn)
    scores_and_mix = 2 * batch * target * source * embed  # QK^T and AV over all heads
    out_proj = batch * target * embed * embed
    return in_proj + scores_and_mix + out_proj


def _einsum_terms(equation: str, shapes: list) -> tuple[list[str], str, dict[str, int]]:
    """Operand index strings, output index string and each index's size; ``...`` becomes one
    private index per broadcast dimension, aligned from the right as broadcasting aligns them."""
    equation = equation.replace(" ", "")
    inputs, arrow, output = equation.partition("->")
    terms = inputs.split(",")
    ellipsis_dims = max((len(shape) - (len(term) - 3) for term, shape in zip(terms, shapes) if "..." in term),
                        default=0)
    private = "".join(chr(0x100 + i) for i in range(ellipsis_dims))

    def expand(term: str, ndim: int | None) -> str:
        if "..." not in term:
            return term
        width = ellipsis_dims if ndim is None else ndim - (len(term) - 3)
        return term.replace("...", private[ellipsis_dims - width:])

    terms = [expand(term, len(shape)) for term, shape in zip(terms, shapes)]
    if arrow:
        output = expand(output, None)
    else:  # implicit output: broadcast dims, then the indices that occur once, alphabetically
        letters = "".join(terms)
        output = private + "".join(sorted(c for c in set(letters) if letters.count(c) == 1 and c not in private))
    sizes: dict[str, int] = {}
    for term, shape in zip(terms, shapes):
        for index, size in zip(term, shape):
            sizes[index] = max(sizes.get(index, 1), int(size))
    return terms, output, sizes


def _einsum_macs(node: Node) -> int | None:
    """MACs of the pairwise contractions, left to right (``torch.einsum``'s order without
    opt_einsum), each costing the product of the sizes of all indices it involves; 0 for one operand."""
    view = einsum_of(node)
    if view is None:
        return None
    shapes = [output_shape(op) if isinstance(op, Node) else getattr(op, "shape", None) for op in view.operands]
    if len(shapes) < 2 or any(shape is None for shape in shapes):
        return 0
    terms, output, sizes = _einsum_terms(view.equation, shapes)
    macs, current = 0, terms[0]
    for position, term in enumerate(terms[1:], start=2):
        involved = set(current) | set(term)
        macs += math.prod(sizes[i] for i in involved)
        needed = set(output).union(*terms[position:])
        current = "".join(i for i in involved if i in needed)
    return macs


def node_macs(node: Node) -> int:
    """Multiply-accumulates of one node (0 for ops that only move or combine data)."""
    return _macs(node, op_kind(node))


def _macs(node: Node, kind: str) -> int:
    """:func:`node_macs` of a node whose ``op_kind`` is ``kind``.

    ``op_kind`` asks the convolution and linear views before any other, so a node of another
    kind is neither; matrix products and einsums are functions or methods, never modules."""
    if kind == "conv":
        return int(_conv_macs(node))
    if kind == "linear":
        return int(_linear_macs(node))
    counters = (_attention_macs,) if node.op == "call_module" else (_matmul_macs, _einsum_macs, _attention_macs)
    for count in counters:
        macs = count(node)
        if macs is not None:
            return int(macs)
    return 0


def _weights(node: Node) -> tuple[int, int]:
    """(parameters the node owns, bytes of the weights and buffers it reads)."""
    m = module_of(node)
    if m is not None:
        if not m._modules:
            return _leaf_weights(m)
        params = list(m.parameters())  # a module with children: its tensors, each shared one once
        buffers = [b for b in m.buffers() if b.is_floating_point()]  # not BatchNorm's step counter
        return sum(p.numel() for p in params), sum(t.numel() * t.element_size() for t in params + buffers)
    owned = read = 0
    for arg in node.all_input_nodes:
        value = constant_of(arg)
        if value is None:
            continue
        read += value.numel() * value.element_size()
        if isinstance(value, nn.Parameter) and next(iter(arg.users)) is node:
            owned += value.numel()
    return owned, read


def _leaf_weights(m: nn.Module) -> tuple[int, int]:
    """:func:`_weights` of a module without children (the common case): read off its dicts, without
    ``parameters()``' generator machinery; BatchNorm's integer step counter is not a weight."""
    params = _distinct(m._parameters.values())
    buffers = [b for b in _distinct(m._buffers.values()) if b.is_floating_point()]
    return sum(p.numel() for p in params), sum(t.numel() * t.element_size() for t in params + buffers)


def _distinct(tensors) -> list:
    """The non-None tensors, each object once, in order."""
    seen, out = set(), []
    for t in tensors:
        if t is not None and id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def _activation_bytes(node: Node) -> int:
    return sum(tensor_bytes(arg) for arg in node.all_input_nodes if arg.op != "get_attr")


def _convolution_macs(module: nn.Module, shape) -> int | None:
    weight = module._parameters.get("weight")
    return None if weight is None else _numel(shape) * _numel(weight.shape[1:])


def _linear_module_macs(module: nn.Module, shape) -> int | None:
    weight = module._parameters.get("weight")
    return None if weight is None else _numel(shape) * int(weight.shape[1])


def _no_macs(module: nn.Module, shape) -> int:
    return 0


# The commonest leaf layers, priced straight off the module: what the op views give (a
# convolution's MACs are its output elements times the weight's per-output size, a linear
# layer's its output elements times its input features; norms, activations and pools have
# none) without building a view per node. Exact types only (a subclass may compute anything);
# anything these decline goes the general way. Tests check every entry against the general way.
_LEAF_MACS: dict[type, Callable[[nn.Module, tuple], int | None]] = {
    nn.Conv1d: _convolution_macs, nn.Conv2d: _convolution_macs, nn.Conv3d: _convolution_macs,
    nn.Linear: _linear_module_macs,
    **{cls: _no_macs for cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.ReLU, nn.ReLU6,
                                 nn.SiLU, nn.Sigmoid, nn.Hardswish, nn.Hardsigmoid, nn.GELU, nn.Tanh, nn.MaxPool2d,
                                 nn.AvgPool2d, nn.AdaptiveAvgPool2d)},
}


def _leaf_cost(node: Node, module: nn.Module, macs_of: Callable[[nn.Module, tuple], int | None]) -> Cost | None:
    """The cost of a ``call_module`` node of a :data:`_LEAF_MACS` layer, or None to go the general way."""
    meta = tensor_meta(node)
    shape, dtype = getattr(meta, "shape", None), getattr(meta, "dtype", None)
    if shape is None or dtype is None or module._modules:
        return None
    macs = macs_of(module, shape)
    if macs is None:
        return None
    params, weight_bytes = _leaf_weights(module)
    return Cost(0.0, macs, _activation_bytes(node) + weight_bytes, _numel(shape) * dtype.itemsize, params)


class FlopsModel(NodeSumCostModel):
    """MACs, params and bytes per node; latency 0. Spec ``"flops"``.

    ``graph_cost(gm)`` needs ``node.meta["tensor_meta"]`` on every node (``hant.trace``
    fills it). ``report.total.macs`` is the network's MAC count: multiply by 2 for the
    FLOPs that ``torch.utils.flop_counter.FlopCounterMode`` reports.
    """
    name = "flops"

    def node_cost(self, node: Node) -> Cost:
        if node.op in ("placeholder", "output", "get_attr"):
            return Cost()
        if node.op == "call_module":
            module = module_of(node)
            macs_of = _LEAF_MACS.get(type(module))
            cost = _leaf_cost(node, module, macs_of) if macs_of is not None else None
            if cost is not None:
                return cost
        params, weight_bytes = _weights(node)
        written = _metas(tensor_meta(node))
        kind = op_kind(node)
        if not written or kind in ("shape", "identity"):
            return Cost(params=params)
        return Cost(
            latency_s=0.0,
            macs=_macs(node, kind),
            bytes_read=_activation_bytes(node) + weight_bytes,
            bytes_written=sum(_numel(m.shape) * m.dtype.itemsize for m in written),
            params=params,
        )

