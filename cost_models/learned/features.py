"""Node features of an FX graph for the learned cost models.

A graph becomes a :class:`GraphFeatures`: one row of :data:`FEATURE_NAMES` per compute node
(placeholders included, ``get_attr`` and ``output`` left out) and the data edges between
them. Rows are built only through the op views of :mod:`hant.graphs.ops` and the counts of
the ``flops`` cost model, so traced and exported graphs look alike.

Featurising is two steps, so that graphs can also be assembled from featurised pieces
(see :mod:`hant.cost_models.learned.nb201`):

* :func:`local_features`: what each node is on its own (kind, shapes, MACs, bytes, kernel,
  stride, groups, and whether it multiplies by a constant zero);
* :func:`finish`: what follows from the wiring: whether a node's value is provably zero
  and whether it can reach the output at all (runtimes that prune dead graphs skip such
  nodes, others run them).

Row order carries no meaning: the models aggregate by sums over edges and nodes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from torch.fx import GraphModule, Node

from hant.errors import CostModelError
from hant.graphs.ops import (
    activation_of, conv_of, linear_of, module_of, mul_of, op_kind, output_shape, pool_of, tensor_meta,
)

__all__ = ["KINDS", "FEATURE_NAMES", "FEATURE_VERSION", "GraphFeatures", "local_features", "local_features_and_counts",
           "finish", "featurize", "featurize_with_counts", "batch_graphs"]

FEATURE_VERSION = 1

KINDS = ("placeholder", "conv", "linear", "batchnorm", "layernorm", "activation", "add", "mul", "pool", "matmul",
         "attention", "softmax", "reduce", "cat", "identity", "shape", "other")
_NUMERIC = ("log_batch", "log_channels", "log_spatial", "log_in_channels", "log_macs", "log_bytes", "log_params",
            "kernel_area", "stride", "log_groups", "depthwise", "pool_avg", "pool_max", "pool_global",
            "n_inputs", "zero_op")
_DERIVED = ("known_zero", "dead")
FEATURE_NAMES = tuple(f"kind_{k}" for k in KINDS) + _NUMERIC + _DERIVED

_COL = {name: i for i, name in enumerate(FEATURE_NAMES)}
_SKIPPED = ("output", "get_attr")
# Ops whose output is zero when their (first) tensor input is zero.
_ZERO_PRESERVING = {"conv", "linear", "pool", "identity", "shape", "activation", "mul"}
_ZERO_AT_ZERO_ACTIVATIONS = {"relu", "relu6", "leaky_relu", "prelu", "hardtanh", "tanh", "silu", "gelu", "mish",
                             "hardswish", "elu", "selu", "celu"}


@dataclass
class GraphFeatures:
    """Rows of node features and the data edges of one graph.

    ``x``: float32 (n_nodes, len(FEATURE_NAMES)); ``edges``: int64 (2, n_edges), row 0 the
    producer, row 1 the consumer; ``names``: the node names, row for row (empty for graphs
    assembled from pieces). ``zero_op`` is 1 for a multiplication by a constant zero and -1
    for an op that maps zero to non-zero (a bias, sigmoid), 0 otherwise.
    """
    x: np.ndarray
    edges: np.ndarray
    names: tuple[str, ...] = ()

    @property
    def num_nodes(self) -> int:
        return int(self.x.shape[0])

    def permuted(self, order: np.ndarray) -> "GraphFeatures":
        """The same graph with its rows listed in ``order`` (row k is old row order[k])."""
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        names = tuple(self.names[i] for i in order) if self.names else ()
        return GraphFeatures(self.x[order], inverse[self.edges], names)


_LOGS: dict = {}


def _log(v: float) -> float:
    """``log(1 + max(v, 0))``, remembered per value: a graph's shapes and counts repeat."""
    out = _LOGS.get(v)
    if out is None:
        if len(_LOGS) > 100_000:
            _LOGS.clear()
        out = _LOGS[v] = math.log1p(max(float(v), 0.0))
    return out


_PLAIN_CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _conv_columns(node: Node) -> tuple[float, float, int, bool, bool]:
    """(kernel area, largest stride, groups, depthwise, has a bias) of a convolution node: read off an
    ``nn.Conv1d/2d/3d`` module directly (what its op view says, without building the view), else
    from :func:`~hant.graphs.ops.conv_of`."""
    module = module_of(node)
    weight = module._parameters.get("weight") if type(module) in _PLAIN_CONVOLUTIONS else None
    if weight is not None:
        shape, groups = weight.shape, module.groups
        return (float(math.prod(shape[2:])), float(max(module.stride)), groups,
                groups > 1 and groups == shape[1] * groups, module._parameters.get("bias") is not None)
    view = conv_of(node)
    return float(math.prod(view.kernel_size)), float(max(view.stride)), view.groups, view.is_depthwise, view.has_bias


def _counter():
    from hant.cost_models.flops import FlopsModel
    return FlopsModel()


def _is_zero_constant(value) -> bool:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value == 0
    if isinstance(value, torch.Tensor) and value.numel() > 0:
        return bool((value == 0).all())
    return False


_N = len(FEATURE_NAMES)
_KIND_COL = {kind: _COL[f"kind_{kind}"] for kind in KINDS}
_C_BATCH, _C_CHANNELS, _C_SPATIAL, _C_IN_CHANNELS = (_COL[c] for c in ("log_batch", "log_channels", "log_spatial",
                                                                        "log_in_channels"))
_C_MACS, _C_BYTES, _C_PARAMS, _C_INPUTS = (_COL[c] for c in ("log_macs", "log_bytes", "log_params", "n_inputs"))
_C_KERNEL, _C_STRIDE, _C_GROUPS, _C_DEPTHWISE, _C_ZERO = (_COL[c] for c in ("kernel_area", "stride", "log_groups",
                                                                            "depthwise", "zero_op"))
_C_AVG, _C_MAX, _C_GLOBAL = (_COL[c] for c in ("pool_avg", "pool_max", "pool_global"))


def local_features(gm: GraphModule) -> tuple[np.ndarray, list[list[int]], list[Node]]:
    """Per-node rows without the derived columns, the producer indices of each row, and the nodes.

    Needs ``tensor_meta`` on the nodes (``hant.trace`` fills it); raises :class:`CostModelError`
    for a graph that was not traced. In a traced graph, nodes that produce no tensor (sizes, tuples
    of chunks, guards) have no ``tensor_meta`` and become free ``shape`` rows (no MACs, bytes or params).
    """
    x, producers, nodes, _ = local_features_and_counts(gm)
    return x, producers, nodes


def local_features_and_counts(gm: GraphModule) -> tuple[np.ndarray, list[list[int]], list[Node], list]:
    """:func:`local_features`, and each row's ``flops`` :class:`~hant.cost_models.base.Cost` (None for
    placeholders and nodes without shapes), which its MAC, byte and parameter columns were read from."""
    counter = _counter()
    nodes = [n for n in gm.graph.nodes if n.op not in _SKIPPED]
    index = {n: i for i, n in enumerate(nodes)}
    rows: list[list[float]] = []
    counts: list = []
    producers: list[list[int]] = []
    traced = any(tensor_meta(n) is not None for n in nodes)
    for node in nodes:
        symbolic = node.op != "placeholder" and tensor_meta(node) is None
        if symbolic and not traced:
            raise CostModelError(f"node {node.name!r} has no shape; trace the model with hant.trace first")
        # A node without tensor_meta in a traced graph computes no tensor (x.size(), a tuple of chunks,
        # an input guard): a free shape op.
        kind = "shape" if symbolic else op_kind(node)
        kind = kind if kind in KINDS else "other"
        row = [0.0] * _N
        row[_KIND_COL[kind]] = 1.0
        shape = output_shape(node)
        if shape is not None and len(shape) >= 1:
            row[_C_BATCH] = _log(shape[0])
            if len(shape) >= 2:
                row[_C_CHANNELS] = _log(shape[1])
                row[_C_SPATIAL] = _log(math.prod(shape[2:]))
        inputs = [index[a] for a in node.all_input_nodes if a in index]
        producers.append(inputs)
        row[_C_INPUTS] = len(inputs)
        if inputs:
            in_shape = output_shape(nodes[inputs[0]])
            if in_shape is not None and len(in_shape) >= 2:
                row[_C_IN_CHANNELS] = _log(in_shape[1])
        cost = None
        if node.op != "placeholder" and not symbolic:
            cost = _work(node, kind, counter)
            row[_C_MACS] = _log(cost.macs)
            row[_C_BYTES] = _log(cost.bytes)
            row[_C_PARAMS] = _log(cost.params)
        counts.append(cost)
        row[_C_STRIDE] = 1.0
        row[_C_KERNEL] = 1.0
        if kind == "conv":
            row[_C_KERNEL], row[_C_STRIDE], groups, depthwise, has_bias = _conv_columns(node)
            row[_C_GROUPS] = _log(groups)
            row[_C_DEPTHWISE] = float(depthwise)
            if has_bias:
                row[_C_ZERO] = -1.0  # a bias maps zero to non-zero
        elif kind == "linear":
            if linear_of(node).has_bias:
                row[_C_ZERO] = -1.0
        elif kind == "pool":
            view = pool_of(node)
            row[_C_AVG] = float("avg" in view.kind)
            row[_C_MAX] = float("max" in view.kind)
            row[_C_GLOBAL] = float(view.kind.startswith("adaptive"))
            if view.kernel_size:
                row[_C_KERNEL] = float(math.prod(view.kernel_size))
                row[_C_STRIDE] = float(max(view.stride))
        elif kind == "mul":
            view = mul_of(node)
            row[_C_ZERO] = float(_is_zero_constant(view.lhs) or _is_zero_constant(view.rhs))
        elif kind == "activation":
            row[_C_ZERO] = 0.0 if activation_of(node).kind in _ZERO_AT_ZERO_ACTIVATIONS else -1.0
        rows.append(row)
    x = np.array(rows, dtype=np.float32).reshape(len(rows), _N)
    return x, producers, nodes, counts


def _work(node: Node, kind: str, counter):
    """The flops model's :class:`~hant.cost_models.base.Cost` of a node (MACs, bytes moved, params)."""
    try:
        return counter.node_cost(node)
    except Exception as exc:  # a node the counter cannot price: name it
        raise CostModelError(f"the flops model cannot count node {node.name!r} ({kind}): {exc}") from exc


def finish(x: np.ndarray, producers: list[list[int]], output_rows: list[int]) -> np.ndarray:
    """Fill the derived columns of ``x`` (in place) and return the edge array.

    ``producers[i]`` lists the rows feeding row i; rows must be in a topological order.
    ``output_rows`` are the rows the graph returns. ``known_zero``: the value is provably
    all zeros (a multiplication by zero, or zero-preserving ops and sums of zeros);
    ``dead``: no path to the output except through a provably zero value.
    """
    n = len(producers)
    kind_of = np.argmax(x[:, :len(KINDS)], axis=1)
    zero = np.zeros(n, dtype=bool)
    for i in range(n):
        kind = KINDS[kind_of[i]]
        ins = producers[i]
        if x[i, _COL["zero_op"]] > 0:
            zero[i] = True
        elif not ins or x[i, _COL["zero_op"]] < 0:
            zero[i] = False
        elif kind in ("add", "cat"):
            zero[i] = all(zero[j] for j in ins)
        elif kind == "mul":
            zero[i] = any(zero[j] for j in ins)
        elif kind in _ZERO_PRESERVING:
            zero[i] = zero[ins[0]]
    live = np.zeros(n, dtype=bool)
    for i in output_rows:
        live[i] = True
    for i in range(n - 1, -1, -1):
        if live[i] and not zero[i]:
            for j in producers[i]:
                live[j] = True
    x[:, _COL["known_zero"]] = zero
    x[:, _COL["dead"]] = ~live
    src = [j for i in range(n) for j in producers[i]]
    dst = [i for i in range(n) for _ in producers[i]]
    return np.array([src, dst], dtype=np.int64).reshape(2, -1)


def featurize(gm: GraphModule) -> GraphFeatures:
    """The :class:`GraphFeatures` of a traced graph (``hant.trace`` output)."""
    return featurize_with_counts(gm)[0]


def featurize_with_counts(gm: GraphModule) -> tuple[GraphFeatures, list[Node], list]:
    """:func:`featurize`, each row's node and each row's ``flops`` cost (see :func:`local_features_and_counts`)."""
    x, producers, nodes, counts = local_features_and_counts(gm)
    index = {n: i for i, n in enumerate(nodes)}
    outputs = [index[a] for n in gm.graph.nodes if n.op == "output" for a in n.all_input_nodes if a in index]
    edges = finish(x, producers, outputs)
    return GraphFeatures(x, edges, tuple(n.name for n in nodes)), nodes, counts


def batch_graphs(graphs: list[GraphFeatures]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack graphs into one disjoint union: (x, edges, graph index of each row)."""
    sizes = [g.num_nodes for g in graphs]
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    x = torch.from_numpy(np.concatenate([g.x for g in graphs]))
    edges = torch.from_numpy(np.concatenate([g.edges + o for g, o in zip(graphs, offsets)], axis=1))
    graph = torch.from_numpy(np.repeat(np.arange(len(graphs)), sizes))
    return x, edges, graph
