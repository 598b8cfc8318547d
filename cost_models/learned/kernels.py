"""Kernels: the fused groups of ops a runtime executes as one, found in FX graphs, sampled and measured alone.

nn-Meter's observation is that a CPU runtime does not run a network op by op: it runs
*kernels*, fused groups such as conv+BN+activation, and a network's latency is close to the
sum of its kernels' latencies. A predictor that learns kernels (thousands of cheap,
isolated measurements) learns the hardware far better than one that sees a few hundred
whole networks. This module gives the three pieces such a predictor needs:

* :func:`extract_kernels`: one pass over a traced graph grouping nodes into kernels,
  onnxruntime's way: a convolution or linear layer absorbs the batch norm and the
  activation that follow it when each is the sole consumer of the one before, a lone batch
  norm absorbs its activation, a residual add absorbs its activation; pools, broadcast
  multiplies, concatenations, standalone activations and data-moving shape ops (transposes,
  slices, splits into tuples) are kernels of their own; views, identities and bookkeeping are free. Per-node
  facts are cached on the node (keyed by what the node is and the shapes it sees), so
  pricing a graph again after a pass changed part of it only re-reads the changed nodes.
* :func:`layout_reorders`: the NCHWc layout conversions onnxruntime inserts between those
  kernels (``ReorderInput`` / ``ReorderOutput``), found on the FX graph with the rules of
  onnxruntime's NCHWc transformer (:func:`conv_runs_blocked`), and :func:`isolation_nodes`: the
  nodes a kernel runs only when it is timed alone (its own reorders, an unfused HardSwish);
  :func:`walk_kernels` finds kernels and reorders in the same single pass over the nodes (what a
  cost model pricing a graph calls), :func:`kernel_network` packs them for the predictor;
* :func:`kernel_row`: a kernel's feature vector (:data:`KERNEL_FEATURES`): its type, fused
  activation, channels, spatial sizes, kernel, stride, groups, MACs and bytes moved;
* :func:`sample_kernel` / :func:`build_kernel` / :func:`profile_kernels`: random kernel
  configurations covering real CNNs (channels 3..2048, spatial 1..224, kernels 1/3/5/7,
  strides 1/2, dense, depthwise and grouped convolutions, SE-style 1x1 convolutions on 1x1
  maps), each built as a one-kernel module and timed alone on a runtime into a
  :class:`~hant.cost_models.store.LatencyStore` (resumable: stored kernels are skipped).

A kernel configuration is a JSON-able dict whose ``"type"`` is one of :data:`KERNEL_TYPES`;
its store signature is ``{"kind": "kernel", "config": config}``.
"""

from __future__ import annotations

import math
import operator
import random
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn as nn
from torch.fx import GraphModule, Node

from hant.errors import CostModelError
from hant.graphs.ops import (
    activation_of, add_of, batchnorm_of, conv_of, linear_of, module_of, mul_of, op_kind, output_shape, pool_of,
    tensor_meta,
)

__all__ = ["KERNEL_TYPES", "KERNEL_ACTIVATIONS", "KERNEL_FEATURES", "KERNEL_TIMING", "Kernel", "extract_kernels",
           "walk_kernels", "KernelWalk", "kernel_extras", "Reorder", "layout_reorders", "conv_runs_blocked",
           "isolation_nodes", "NCHWC_BLOCK", "KernelNetwork", "kernel_network", "kernel_row", "kernel_rows",
           "node_facts", "sample_kernel", "sampled_kernels", "build_kernel", "kernel_signature", "kernel_macs",
           "kernel_bytes", "profile_kernels", "forget_kernels"]

KERNEL_TYPES = ("conv", "linear", "pool_max", "pool_avg", "pool_global", "add", "mul", "act", "bn", "cat", "copy",
                "split")
KERNEL_ACTIVATIONS = ("none", "relu", "relu6", "hardswish", "silu", "sigmoid", "hardsigmoid", "other")
_NUMERIC = ("bn", "depthwise", "log_cin", "log_cout", "log_in_spatial", "log_out_spatial", "log_groups",
            "log_cin_per_group", "log_macs", "log_in_bytes", "log_out_bytes", "log_weight_bytes", "kernel", "stride",
            "log_inputs", "broadcast", "group_in_div8", "group_in_div16", "group_out_div16")
KERNEL_FEATURES = tuple(f"type_{t}" for t in KERNEL_TYPES) + tuple(f"act_{a}" for a in KERNEL_ACTIVATIONS) + _NUMERIC
_COL = {name: i for i, name in enumerate(KERNEL_FEATURES)}
_ELEMENT_BYTES = 4                         # float32: the runtime every kernel is measured on

# ---------------------------------------------------------------- what one node is

_FREE = ("free", None, ())
# A node's facts are kept on the node itself, under this attribute: they name other nodes of its graph, so
# a cache outside the graph would keep every graph it ever saw alive; on the node they go with the graph.
_FACTS_ATTRIBUTE = "_hant_kernel_facts"


def _numel(shape) -> int:
    return int(math.prod(shape)) if shape is not None else 0


def _act_name(kind: str) -> str:
    return kind if kind in KERNEL_ACTIVATIONS else "other"


def _unchanged(stamp: tuple, node: Node, meta) -> bool:
    """Whether ``node`` is still what ``stamp`` (from :func:`_stamp_of`) saw: the same target, the same
    argument tuples and the same shape metadata, compared by identity.

    torch.fx replaces a node's argument tuples whenever they change (``node.args = ...``,
    ``replace_input_with``, ``replace_all_uses_with``) and shape propagation replaces every node's
    ``tensor_meta``, so identity is enough and costs no walk over the arguments. A module swapped
    in place under the same name with the same shapes is not noticed; hant's passes name the
    modules they build anew."""
    return stamp[0] is node.target and stamp[1] is node.args and stamp[2] is node.kwargs and stamp[3] is meta


def _stamp_of(node: Node, meta) -> tuple:
    return (node.target, node.args, node.kwargs, meta)


def _contiguous(meta) -> bool:
    stride = getattr(meta, "stride", None)
    if stride is None:
        return True
    expected, running = [], 1
    for size in reversed(meta.shape):
        expected.append(running)
        running *= max(int(size), 1)
    return all(int(s) == e or int(d) == 1 for s, e, d in zip(stride, reversed(expected), meta.shape))


def _describe(node: Node, kind: str) -> tuple:
    """``(role, main input node or None, data)``: what kernel grouping needs to know about one node of
    ``op_kind`` ``kind``. ``data`` is hashable and names no node, so equal ops in different graphs share it.
    """
    if node.op in ("placeholder", "output", "get_attr"):
        return _FREE
    meta = tensor_meta(node)
    shape = output_shape(node)
    if kind == "shape" and isinstance(meta, (tuple, list)) and not hasattr(meta, "shape") and node.all_input_nodes:
        in_shape = output_shape(node.all_input_nodes[0])      # chunk/split into a tuple: onnxruntime's Split copies
        if in_shape is not None and len(in_shape) > 1:
            return ("split", None, (tuple(int(s) for s in in_shape), len(meta)))
    if meta is None or shape is None:
        return _FREE                        # sizes, guards: nothing is computed
    out = tuple(int(s) for s in shape)
    if kind == "conv":
        v = conv_of(node)
        in_shape = output_shape(v.input)
        if v.transposed or v.spatial_dims != 2 or in_shape is None or len(out) != 4:
            return ("other", None, (out,))
        k = int(round(math.sqrt(math.prod(v.kernel_size))))
        return ("conv", v.input, (int(v.in_channels), int(v.out_channels), tuple(int(s) for s in in_shape), out, k,
                                  int(max(v.stride)), int(v.groups)))
    if kind == "linear":
        v = linear_of(node)
        return ("linear", v.input, (int(v.in_features), int(v.out_features), out))
    if kind == "batchnorm":
        return ("bn", batchnorm_of(node).input, (out,))
    if kind == "activation":
        v = activation_of(node)
        return ("act", v.input, (out, _act_name(v.kind)))
    if kind == "pool":
        v = pool_of(node)
        in_shape = output_shape(v.input)
        if in_shape is None:
            return _FREE
        in_shape = tuple(int(s) for s in in_shape)
        if all(int(s) == 1 for s in out[2:]) and (v.kind.startswith("adaptive") or not v.kernel_size):
            return ("pool", None, ("pool_global", in_shape, out, 1, 1))
        k = int(max(v.kernel_size)) if v.kernel_size else 1
        s = int(max(v.stride)) if v.stride else k
        return ("pool", None, ("pool_max" if "max" in v.kind else "pool_avg", in_shape, out, k, s))
    if kind in ("add", "mul"):
        v = (add_of if kind == "add" else mul_of)(node)
        operands = [output_shape(a) for a in v.tensor_operands]
        if len(operands) == 2 and all(o is not None for o in operands):
            return (kind, None, (out, min(_numel(o) for o in operands) < _numel(out)))
        return ("act", v.tensor_operands[0] if v.tensor_operands else None, (out, "other"))
    if kind == "cat":
        shapes = tuple(tuple(int(s) for s in output_shape(a)) for a in node.all_input_nodes
                       if output_shape(a) is not None)
        return ("cat", None, (shapes,))
    if kind in ("identity", "placeholder"):
        return _FREE
    if kind == "shape":
        first = node.all_input_nodes[0] if node.all_input_nodes else None
        in_shape = output_shape(first) if first is not None else None
        if in_shape is not None and _numel(out) < _numel(in_shape):
            return ("copy", None, (out,))   # a slice: the runtime copies it out
        if not _contiguous(meta):
            return ("copy", None, (out,))   # a transpose: onnxruntime's Transpose copies
        return _FREE                        # a view: no data moves
    # softmax, reduce, norms, matmuls, anything else: priced as an elementwise pass over its data
    return ("other", None, (out,))


def node_facts(node: Node) -> tuple[tuple, str, str]:
    """(:func:`_describe` of the node, its ``op_kind``, its readable target), cached on the node until
    its target, arguments or shape metadata change (see :func:`_unchanged`). The cache is an attribute
    of the node (copies of a graph start without it) and is freed with it."""
    meta = node.meta.get("tensor_meta")
    hit = node.__dict__.get(_FACTS_ATTRIBUTE)
    if hit is not None and _unchanged(hit[0], node, meta):
        return hit[1]
    facts = None
    if node.op == "call_module":
        module = module_of(node)
        fast = _MODULE_FACTS.get(type(module)) if module is not None else None
        facts = fast(node, module, meta) if fast is not None else None
    elif node.op == "call_function":
        fast = _FUNCTION_FACTS.get(node.target)
        facts = fast(node, meta) if fast is not None else None
    if facts is None:
        from hant.cost_models.base import target_name

        kind = op_kind(node)
        facts = (_describe(node, kind), kind, target_name(node))
    # object.__setattr__: torch.fx's Node.__setattr__ re-files the node in its graph's lookup table on
    # every assignment to an existing attribute, which this private cache does not concern
    object.__setattr__(node, _FACTS_ATTRIBUTE, (_stamp_of(node, meta), facts))
    return facts


def _conv2d_facts(node: Node, module: nn.Conv2d, meta) -> tuple | None:
    shape = getattr(meta, "shape", None)
    in_shape = output_shape(node.args[0]) if node.args else None
    if shape is None or in_shape is None or len(shape) != 4:
        return None
    k = int(round(math.sqrt(math.prod(module.kernel_size))))
    data = (module.in_channels, module.out_channels, tuple(map(int, in_shape)), tuple(map(int, shape)), k,
            max(module.stride), module.groups)
    return ("conv", node.args[0], data), "conv", "Conv2d"


def _batchnorm2d_facts(node: Node, module: nn.BatchNorm2d, meta) -> tuple | None:
    shape = getattr(meta, "shape", None)
    if shape is None or not node.args:
        return None
    return ("bn", node.args[0], (tuple(map(int, shape)),)), "batchnorm", "BatchNorm2d"


def _activation_facts(kernel_act: str, class_name: str) -> Callable:
    def facts(node: Node, module: nn.Module, meta) -> tuple | None:
        shape = getattr(meta, "shape", None)
        if shape is None or not node.args:
            return None
        return ("act", node.args[0], (tuple(map(int, shape)), kernel_act)), "activation", class_name
    return facts


def _global_pool_facts(node: Node, module: nn.AdaptiveAvgPool2d, meta) -> tuple | None:
    shape = getattr(meta, "shape", None)
    in_shape = output_shape(node.args[0]) if node.args else None
    if shape is None or in_shape is None or any(int(s) != 1 for s in shape[2:]):
        return None
    data = ("pool_global", tuple(map(int, in_shape)), tuple(map(int, shape)), 1, 1)
    return ("pool", None, data), "pool", "AdaptiveAvgPool2d"


def _binary_function_facts(kind: str, name: str) -> Callable:
    """Node facts of ``a + b`` / ``a * b`` (``kind``) of two tensors with shapes, else None."""
    def facts(node: Node, meta) -> tuple | None:
        shape = getattr(meta, "shape", None)
        if shape is None or len(node.args) != 2 or node.kwargs:
            return None
        lhs, rhs = output_shape(node.args[0]), output_shape(node.args[1])
        if lhs is None or rhs is None:
            return None                     # a constant or a size operand: the general way
        out = tuple(map(int, shape))
        return (kind, None, (out, min(_numel(lhs), _numel(rhs)) < _numel(out))), kind, name
    return facts


# The commonest modules, read straight off the module (op_kind and the op views build more than
# grouping needs, and a network's first pricing asks about every node); anything these decline
# (no shapes, other arities, a non-global pool) goes the general way. The answers must equal the
# general way's: tests check them against the op views.
_MODULE_FACTS: dict[type, Callable[[Node, nn.Module, object], tuple | None]] = {
    nn.Conv2d: _conv2d_facts,
    nn.BatchNorm2d: _batchnorm2d_facts,
    nn.AdaptiveAvgPool2d: _global_pool_facts,
    **{cls: _activation_facts(act, cls.__name__) for cls, act in (
        (nn.ReLU, "relu"), (nn.ReLU6, "relu6"), (nn.SiLU, "silu"), (nn.Sigmoid, "sigmoid"),
        (nn.Hardswish, "hardswish"), (nn.Hardsigmoid, "hardsigmoid"))},
}
# Likewise the sum and product of two tensors as symbolic tracing writes them (``a + b``, ``a * b``).
_FUNCTION_FACTS: dict[Callable, Callable[[Node, object], tuple | None]] = {
    operator.add: _binary_function_facts("add", "add"),
    operator.mul: _binary_function_facts("mul", "mul"),
}


# ---------------------------------------------------------------- grouping

@dataclass(frozen=True)
class Kernel:
    """One kernel: its configuration (see the module docstring), its first node and all its nodes."""
    config: dict
    anchor: str
    nodes: tuple[str, ...]


def _sole_user(node: Node, role: str, facts: dict) -> Node | None:
    """The only user of ``node`` when it has the role ``role`` and reads ``node`` as its main input."""
    if len(node.users) != 1:
        return None
    user = next(iter(node.users))
    full = facts.get(user)
    if full is None:
        full = facts[user] = node_facts(user)
    return user if full[0][0] == role and full[0][1] is node else None


def _spatial(shape) -> int:
    return _numel(shape[2:]) if len(shape) > 2 else 1


_CONFIGS: dict[tuple, dict] = {}


def extract_kernels(gm: GraphModule) -> list[Kernel]:
    """Group the compute nodes of ``gm`` (traced with ``hant.trace``: shapes in ``tensor_meta``) into kernels.

    Rules (onnxruntime's CPU fusions): conv/linear + sole-consumer batch norm + sole-consumer
    activation; batch norm + activation; add of two tensors + activation; everything else
    that computes is a kernel alone; free nodes (views, identities, sizes) belong to none.
    Kernels come in graph order; equal kernels share one configuration dict (do not mutate it).
    """
    return walk_kernels(gm).kernels


@dataclass(frozen=True)
class KernelWalk:
    """What :func:`walk_kernels` finds in one pass over a graph.

    ``kernels``: :func:`extract_kernels`; ``reorders``: :func:`layout_reorders`; ``nodes``: for
    every node that computes (not placeholders, the output, attribute reads), in graph order,
    ``(name, op_kind, readable target, tensor_meta)``: what a cost report's rows need, naming no
    node, so keeping a walk does not keep its graph alive."""
    kernels: list[Kernel]
    reorders: list[Reorder]
    nodes: list[tuple[str, str, str, object]]


def walk_kernels(gm: GraphModule) -> KernelWalk:
    """Kernels, layout reorders and per-node facts of ``gm`` in one pass over its nodes (see :class:`KernelWalk`).

    A kernel is formed at its first node, reading ahead to the batch norm and activation it absorbs;
    the layout of each tensor is decided when its node is reached, as onnxruntime's NCHWc
    transformer decides it (:func:`layout_reorders`)."""
    read_ahead: dict[Node, tuple] = {}      # facts of the nodes _sole_user looked at before the walk got there
    absorbed: set[Node] = set()             # nodes fused into a kernel formed at an earlier node
    layouts = _Layouts()
    kernels: list[Kernel] = []
    rows: list[tuple[str, str, str, object]] = []
    for node in gm.graph.nodes:
        op = node.op
        if op == "placeholder":
            layouts.blocked[node] = False
            continue
        if op == "output":
            layouts.graph_output(node)
            continue
        full = read_ahead.pop(node, None) or node_facts(node)
        if op != "get_attr":
            rows.append((node.name, full[1], full[2], node.meta.get("tensor_meta")))
        f = full[0]
        if node in absorbed:
            layouts.absorbed(node, f[1])
            continue
        role = f[0]
        if role == "free":
            layouts.free(node, full[1])
            continue
        members = [node]
        act, bn, last = "none", False, node
        if role in ("conv", "linear"):
            norm = _sole_user(last, "bn", read_ahead)
            if norm is not None:
                members.append(norm)
                bn, last = True, norm
        if role in ("conv", "linear", "bn", "add"):
            follower = _sole_user(last, "act", read_ahead)
            if follower is not None:
                members.append(follower)
                act = read_ahead[follower][0][2][1]
        absorbed.update(members[1:])
        key = (role, f[2], act, bn)
        config = _CONFIGS.get(key)
        if config is None:
            if len(_CONFIGS) > 200_000:
                _CONFIGS.clear()
            config = _CONFIGS[key] = _config(role, f[2], act, bn)
        kernels.append(Kernel(config, node.name, tuple(m.name for m in members)))
        layouts.kernel(node, f[0], config)
    return KernelWalk(kernels, layouts.reorders, rows)


def _config(role: str, data: tuple, act: str, bn: bool) -> dict:
    """The kernel configuration of a group whose first node has ``role`` and ``data`` (see :func:`_describe`)."""
    if role == "conv":
        cin, cout, in_shape, out, k, s, groups = data
        return {"type": "conv", "cin": cin, "cout": cout, "h": in_shape[2], "w": in_shape[3], "k": k, "s": s,
                "groups": groups, "bn": bn, "act": act, "batch": in_shape[0], "ho": out[2], "wo": out[3]}
    if role == "linear":
        cin, cout, out = data
        return {"type": "linear", "cin": cin, "cout": cout, "rows": max(1, _numel(out) // max(cout, 1)), "bn": bn,
                "act": act}
    if role == "bn":
        return {"type": "bn", "shape": list(data[0]), "act": act}
    if role == "act":
        return {"type": "act", "shape": list(data[0]), "act": data[1]}
    if role == "pool":
        pool, in_shape, out, k, s = data
        return {"type": pool, "shape": list(in_shape), "out": list(out), "k": k, "s": s}
    if role == "add":
        return {"type": "add", "shape": list(data[0]), "broadcast": bool(data[1]), "act": act}
    if role == "mul":
        return {"type": "mul", "shape": list(data[0]), "broadcast": bool(data[1])}
    if role == "cat":
        return {"type": "cat", "shapes": [list(s) for s in data[0]]}
    if role == "copy":
        return {"type": "copy", "shape": list(data[0])}
    if role == "split":
        return {"type": "split", "shape": list(data[0]), "parts": data[1]}
    return {"type": "act", "shape": list(data[0]), "act": "other"}          # "other": a pass over its data


# ---------------------------------------------------------------- layout: onnxruntime's NCHWc blocks

NCHWC_BLOCK = 16              # channels per NCHWc block (MlasNchwcGetBlockSize: 16 with AVX-512, 8 with AVX2)


def conv_runs_blocked(config: dict, block: int = NCHWC_BLOCK) -> bool:
    """Whether onnxruntime's NCHWc transformer runs this convolution kernel in the blocked layout.

    Read off onnxruntime's optimised graphs (``optimized_model_filepath``): a dense convolution
    with fewer than ``block`` input channels reads NCHW directly, otherwise its input channels
    must be a multiple of 4; a depthwise one needs channels a multiple of 4; a grouped one needs
    input and output channels per group multiples of ``block``. Any output width is padded.
    """
    cin, cout, groups = config["cin"], config["cout"], config["groups"]
    if groups == 1:
        return cin < block or cin % 4 == 0
    if groups == cin == cout:
        return cin % 4 == 0
    return (cin // groups) % block == 0 and (cout // groups) % block == 0


def _reads_nchw(config: dict) -> bool:
    """A blocked dense convolution with fewer than :data:`NCHWC_BLOCK` input channels reads its input
    in NCHW (only its output is blocked)."""
    return config["groups"] == 1 and config["cin"] < NCHWC_BLOCK


def _pool_blocked(channels: int, block: int = NCHWC_BLOCK) -> bool:
    return channels % block == 0


def isolation_nodes(config: dict) -> tuple[int, int]:
    """(count, elements) of the nodes a kernel runs when it is timed alone but not inside a network:

    * layout reorders: a blocked convolution or pool converts its NCHW input (``ReorderInput``;
      not a dense convolution with fewer than 16 input channels, which reads NCHW) and its output
      back (``ReorderOutput``); inside a network these conversions happen only where the layout
      changes (:func:`layout_reorders`);
    * an unfused activation: onnxruntime fuses a HardSwish into the convolution before it only
      when the HardSwish is not the graph's output, so a convolution + HardSwish timed alone runs
      HardSigmoid and Mul over its output as two more nodes (read off its optimised graphs).
    """
    t = config["type"]
    count = elements = 0
    if t == "conv":
        in_b, out_b, _ = kernel_bytes(config)
        if conv_runs_blocked(config):
            reads_nchw = _reads_nchw(config)
            count, elements = (1, out_b) if reads_nchw else (2, in_b + out_b)
        if config["act"] == "hardswish":
            count, elements = count + 2, elements + 2 * out_b
    elif t in ("pool_max", "pool_avg", "pool_global") and _pool_blocked(config["shape"][1]):
        in_b, out_b, _ = kernel_bytes(config)
        count, elements = 2, in_b + out_b
    return count, elements


@dataclass(frozen=True)
class Reorder:
    """A layout conversion onnxruntime inserts inside a network: ``to_blocked`` (``ReorderInput``,
    NCHW -> NCHWc) or back (``ReorderOutput``), of the tensor ``tensor`` (``elements`` values), paid
    at the node ``at`` that needs it (for the graph output: at the tensor's own node)."""
    tensor: str
    to_blocked: bool
    elements: int
    at: str


_NEUTRAL = ("bn", "act", "add", "mul")          # elementwise: run in the layout of their inputs


def layout_reorders(gm: GraphModule) -> list[Reorder]:
    """The reorders onnxruntime's NCHWc transformer inserts between the kernels of ``gm``.

    Each tensor is blocked (NCHWc) or plain (NCHW). Blocked convolutions
    (:func:`conv_runs_blocked`) make blocked tensors and need blocked inputs; pools and
    concatenations stay blocked when all inputs are blocked and their channels fill whole
    blocks; elementwise kernels (batch norm, activations, same-shape add and multiply) stay
    blocked when all inputs are (not a ReLU6, which onnxruntime runs NCHW unless a convolution
    absorbs it); everything else (broadcast multiplies such as squeeze-excite
    gates, transposes, splits, reshapes and flattens, linear layers, the graph output) needs
    plain tensors. A tensor is converted at most once each way, however many nodes need it.
    Reorders come in graph order of the node that needs them.
    """
    return walk_kernels(gm).reorders


class _Layouts:
    """The layout of each tensor and the reorders found so far, for :func:`walk_kernels` to fill in graph
    order with the rules of :func:`layout_reorders`."""

    def __init__(self):
        self.blocked: dict[Node, bool] = {}
        self.reorders: list[Reorder] = []
        self._converted: set[tuple[Node, bool]] = set()

    def _convert(self, tensor: Node, to_blocked: bool, at: Node) -> None:
        if (tensor, to_blocked) not in self._converted:
            self._converted.add((tensor, to_blocked))
            self.reorders.append(Reorder(tensor.name, to_blocked, _numel(output_shape(tensor)), at.name))

    def _inputs(self, node: Node) -> list[Node]:
        blocked = self.blocked
        return [a for a in node.all_input_nodes if a in blocked]

    def _plain_inputs(self, node: Node, inputs: list[Node]) -> bool:
        """Convert the blocked ``inputs`` back to NCHW for ``node``; False (``node``'s output is plain)."""
        for a in inputs:
            if self.blocked[a]:
                self._convert(a, False, node)
        return False

    def graph_output(self, node: Node) -> None:
        """The graph's outputs leave plain; paid by the producers (the output node has no cost row)."""
        for a in self._inputs(node):
            if self.blocked[a]:
                self._convert(a, False, a)

    def absorbed(self, node: Node, main_input: Node) -> None:
        """A node fused into its kernel (batch norm, activation) makes the layout its kernel makes."""
        self.blocked[node] = self.blocked.get(main_input, False)

    def free(self, node: Node, kind: str) -> None:
        """A node in no kernel: an identity keeps its input's layout, other views need plain inputs."""
        if output_shape(node) is None:
            return                                     # sizes and tuples carry no tensor
        inputs = self._inputs(node)
        if kind == "identity" and inputs:
            self.blocked[node] = self.blocked[inputs[0]]
        else:
            self.blocked[node] = self._plain_inputs(node, inputs)

    def kernel(self, node: Node, role: str, config: dict) -> None:
        """The first node of a kernel with configuration ``config``; ``role`` is its node's (see :func:`_describe`)."""
        blocked, inputs = self.blocked, self._inputs(node)
        t = config["type"]
        if t == "conv" and conv_runs_blocked(config):
            reads_nchw = _reads_nchw(config)
            for a in inputs:
                if blocked[a] == reads_nchw:
                    self._convert(a, not reads_nchw, node)
            blocked[node] = True
        elif t in ("pool_max", "pool_avg", "pool_global"):
            keep = bool(inputs) and all(blocked[a] for a in inputs) and _pool_blocked(config["shape"][1])
            blocked[node] = keep or self._plain_inputs(node, inputs)
        elif t == "cat":
            keep = all(blocked[a] and output_shape(a)[1] % NCHWC_BLOCK == 0 for a in inputs)
            blocked[node] = keep or self._plain_inputs(node, inputs)
        elif t in _NEUTRAL and role != "other" and not config.get("broadcast", False):
            keep = bool(inputs) and all(blocked[a] for a in inputs)
            if keep and config.get("act") == "relu6":     # a Clip not fused into a convolution runs NCHW;
                self._convert(inputs[0], False, node)     # the sum of blocked inputs is fused into one of them
                blocked[node] = False
            else:
                blocked[node] = keep or self._plain_inputs(node, inputs)
        else:
            blocked[node] = self._plain_inputs(node, inputs)


@dataclass(frozen=True)
class KernelNetwork:
    """What the kernel predictor reads of one network: its kernels' configurations (graph order) and
    the reorders between them, as ``(to_blocked, elements)`` pairs. Plain values: it pickles."""
    configs: tuple[dict, ...]
    reorders: tuple[tuple[bool, int], ...]


def kernel_network(gm: GraphModule) -> KernelNetwork:
    """The :class:`KernelNetwork` of a traced graph."""
    walk = walk_kernels(gm)
    return KernelNetwork(tuple(dict(k.config) for k in walk.kernels),
                         tuple((r.to_blocked, r.elements) for r in walk.reorders))


# ---------------------------------------------------------------- features

def kernel_macs(config: dict) -> int:
    """Multiply-accumulates of a kernel (elementwise ops count one per output element)."""
    t = config["type"]
    if t == "conv":
        return (config.get("batch", 1) * config["cout"] * config["ho"] * config["wo"] * (config["cin"] //
                config["groups"]) * config["k"] ** 2)
    if t == "linear":
        return config["rows"] * config["cin"] * config["cout"]
    if t in ("pool_max", "pool_avg"):
        return _numel(config["out"]) * config["k"] ** 2
    if t == "pool_global":
        return _numel(config["shape"])
    if t in ("cat", "copy", "split"):
        return 0
    return _numel(config["shape"])


def kernel_bytes(config: dict) -> tuple[int, int, int]:
    """(input, output, weight) bytes of a kernel."""
    t = config["type"]
    if t == "conv":
        b = config.get("batch", 1)
        return (b * config["cin"] * config["h"] * config["w"], b * config["cout"] * config["ho"] * config["wo"],
                config["cout"] * (config["cin"] // config["groups"]) * config["k"] ** 2 + config["cout"])
    if t == "linear":
        return config["rows"] * config["cin"], config["rows"] * config["cout"], config["cin"] * config["cout"]
    if t in ("pool_max", "pool_avg", "pool_global"):
        return _numel(config["shape"]), _numel(config.get("out", config["shape"][:2])), 0
    if t == "cat":
        total = sum(_numel(s) for s in config["shapes"])
        return total, total, 0
    n = _numel(config["shape"])
    if t in ("add", "mul"):
        return 2 * n, n, 0
    return n, n, (2 * config["shape"][1] if t == "bn" and len(config["shape"]) > 1 else 0)


def _log2(v: float) -> float:
    return math.log2(1.0 + max(float(v), 0.0))


def kernel_row(config: dict) -> np.ndarray:
    """The feature vector (:data:`KERNEL_FEATURES`, float32) of one kernel configuration."""
    row = np.zeros(len(KERNEL_FEATURES), dtype=np.float32)
    t = config["type"]
    row[_COL[f"type_{t}"]] = 1.0
    row[_COL[f"act_{config.get('act', 'none')}"]] = 1.0
    in_b, out_b, w_b = kernel_bytes(config)
    if t == "conv":
        cin, cout, groups, k, s = config["cin"], config["cout"], config["groups"], config["k"], config["s"]
        in_sp, out_sp = config["h"] * config["w"], config["ho"] * config["wo"]
        row[_COL["depthwise"]] = float(groups == cin and groups > 1)
    elif t == "linear":
        cin, cout, groups, k, s, in_sp, out_sp = config["cin"], config["cout"], 1, 1, 1, config["rows"], config["rows"]
    elif t == "cat":
        shapes = config["shapes"]
        cin = sum(sh[1] if len(sh) > 1 else 1 for sh in shapes)
        cout, groups, k, s = cin, 1, 1, 1
        in_sp = out_sp = _spatial(shapes[0])
        row[_COL["log_inputs"]] = len(shapes)
    else:
        shape = config["shape"]
        cin = cout = shape[1] if len(shape) > 1 else 1
        groups, k, s = 1, config.get("k", 1), config.get("s", 1)
        in_sp = _spatial(shape)
        out_sp = _spatial(config["out"]) if "out" in config else (1 if t == "pool_global" else in_sp)
        row[_COL["broadcast"]] = float(config.get("broadcast", False))
    row[_COL["bn"]] = float(config.get("bn", False))
    if t == "split":
        row[_COL["log_inputs"]] = config["parts"]        # outputs written
    elif t != "cat":
        row[_COL["log_inputs"]] = 2.0 if t in ("add", "mul") else 1.0
    row[_COL["log_inputs"]] = math.log2(row[_COL["log_inputs"]])
    for name, value in (("log_cin", cin), ("log_cout", cout), ("log_in_spatial", in_sp), ("log_out_spatial", out_sp),
                        ("log_groups", groups), ("log_cin_per_group", cin / max(groups, 1)),
                        ("log_macs", kernel_macs(config)), ("log_in_bytes", in_b * _ELEMENT_BYTES),
                        ("log_out_bytes", out_b * _ELEMENT_BYTES), ("log_weight_bytes", w_b * _ELEMENT_BYTES)):
        row[_COL[name]] = _log2(value)
    row[_COL["kernel"]] = float(k)
    row[_COL["stride"]] = float(s)
    # SIMD blocking (onnxruntime's NCHWc layout uses blocks of 8 or 16 channels): aligned groups run fast paths
    per_in, per_out = max(cin // max(groups, 1), 1), max(cout // max(groups, 1), 1)
    row[_COL["group_in_div8"]] = float(per_in % 8 == 0)
    row[_COL["group_in_div16"]] = float(per_in % 16 == 0)
    row[_COL["group_out_div16"]] = float(per_out % 16 == 0)
    return row


_ROW_CACHE: dict[int, tuple] = {}


def _cached(config: dict) -> tuple[dict, np.ndarray, tuple[float, float, float], tuple[int, int, int, int]]:
    """(config, :func:`kernel_row`, :func:`kernel_extras` row, :func:`kernel_work`) of one configuration
    object, computed once per object (equal kernels share one, see :func:`extract_kernels`)."""
    hit = _ROW_CACHE.get(id(config))
    if hit is None or hit[0] is not config:
        if len(_ROW_CACHE) > 200_000:
            _ROW_CACHE.clear()
        count, elements = isolation_nodes(config)
        in_b, out_b, w_b = kernel_bytes(config)
        hit = _ROW_CACHE[id(config)] = (config, kernel_row(config), (float(count), float(elements), float(w_b)),
                                        (kernel_macs(config), in_b, out_b, w_b))
    return hit


def forget_kernels() -> None:
    """Drop the shared kernel configurations and their cached feature rows (node facts live on with
    their nodes): the next pricing of any graph starts as on a network never seen, as a benchmark of
    a cold first call needs."""
    _CONFIGS.clear()
    _ROW_CACHE.clear()


def kernel_work(config: dict) -> tuple[int, int, int, int]:
    """(:func:`kernel_macs`, and the input, output and weight elements of :func:`kernel_bytes`) of a
    kernel, cached with its feature row."""
    return _cached(config)[3]


def kernel_rows(configs: Iterable[dict]) -> np.ndarray:
    """Feature rows of many kernels, (n, len(KERNEL_FEATURES)); the row of a configuration object seen
    before (kernels of :func:`extract_kernels` share them) is reused."""
    rows = [_cached(config)[1] for config in configs]
    return np.stack(rows) if rows else np.zeros((0, len(KERNEL_FEATURES)), dtype=np.float32)


def kernel_extras(configs: Iterable[dict]) -> np.ndarray:
    """Per kernel, (nodes it runs alone but not in a network, elements they pass over (both
    :func:`isolation_nodes`), weight elements it reads): what the network calibration needs besides
    the kernel's latency alone. Cached with the rows, (n, 3) float64."""
    extras = [_cached(config)[2] for config in configs]
    return np.array(extras, dtype=np.float64).reshape(-1, 3)


# ---------------------------------------------------------------- building one kernel alone

_ACT_MODULES = {"relu": nn.ReLU, "relu6": nn.ReLU6, "hardswish": nn.Hardswish, "silu": nn.SiLU,
                "sigmoid": nn.Sigmoid, "hardsigmoid": nn.Hardsigmoid, "other": nn.GELU}


def _act(name: str) -> list[nn.Module]:
    return [] if name == "none" else [_ACT_MODULES[name]()]


class _Binary(nn.Module):
    def __init__(self, op: str, act: str = "none"):
        super().__init__()
        self.op, self.act = op, nn.Sequential(*_act(act))

    def forward(self, x, y):
        return self.act(x + y if self.op == "add" else x * y)


class _Cat(nn.Module):
    def forward(self, *xs):
        return torch.cat(xs, 1)


class _Copy(nn.Module):
    """A channel-shuffle transpose of the tensor (onnxruntime: Reshape, Transpose, Reshape)."""

    def forward(self, x):
        n, c = x.shape[0], x.shape[1] if x.dim() > 1 else 1
        groups = 2 if c % 2 == 0 else 1
        rest = x.shape[2:]
        return x.reshape(n, groups, c // groups, *rest).transpose(1, 2).reshape(x.shape)


class _Split(nn.Module):
    """``x.chunk(parts, 1)`` (onnxruntime: one Split), every part returned."""

    def __init__(self, parts: int):
        super().__init__()
        self.parts = parts

    def forward(self, x):
        return x.chunk(self.parts, 1)


def _pool_padding(k: int, s: int) -> int:
    return k // 2 if s == 1 or k % 2 == 1 else 0


def build_kernel(config: dict) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """An eval-mode float32 module computing the kernel, and random inputs of its shapes."""
    t = config["type"]
    gen = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    if t == "conv":
        k, s = config["k"], config["s"]
        layers: list[nn.Module] = [nn.Conv2d(config["cin"], config["cout"], k, s, k // 2, groups=config["groups"],
                                             bias=not config["bn"])]
        if config["bn"]:
            layers.append(nn.BatchNorm2d(config["cout"]))
        module = nn.Sequential(*layers, *_act(config["act"]))
        inputs = (rand(config.get("batch", 1), config["cin"], config["h"], config["w"]),)
    elif t == "linear":
        layers = [nn.Linear(config["cin"], config["cout"])]
        if config.get("bn"):
            layers.append(nn.BatchNorm1d(config["cout"]))
        module = nn.Sequential(*layers, *_act(config["act"]))
        inputs = (rand(config["rows"], config["cin"]),)
    elif t == "bn":
        module = nn.Sequential(nn.BatchNorm2d(config["shape"][1]), *_act(config["act"]))
        inputs = (rand(*config["shape"]),)
    elif t == "act":
        module = nn.Sequential(*_act(config["act"]))
        inputs = (rand(*config["shape"]),)
    elif t in ("pool_max", "pool_avg"):
        k, s = config["k"], config["s"]
        cls = nn.MaxPool2d if t == "pool_max" else nn.AvgPool2d
        module = cls(k, s, _pool_padding(k, s))
        inputs = (rand(*config["shape"]),)
    elif t == "pool_global":
        module = nn.AdaptiveAvgPool2d(1)
        inputs = (rand(*config["shape"]),)
    elif t in ("add", "mul"):
        shape = config["shape"]
        other = shape[:2] + [1] * (len(shape) - 2) if config.get("broadcast") else shape
        module = _Binary(t, config.get("act", "none"))
        inputs = (rand(*shape), rand(*other))
    elif t == "cat":
        module = _Cat()
        inputs = tuple(rand(*s) for s in config["shapes"])
    elif t == "copy":
        module = _Copy()
        inputs = (rand(*config["shape"]),)
    elif t == "split":
        module = _Split(config["parts"])
        inputs = (rand(*config["shape"]),)
    else:
        raise CostModelError(f"unknown kernel type {t!r}; use one of {', '.join(KERNEL_TYPES)}")
    if isinstance(module, nn.Module):
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
                m.running_mean.uniform_(-0.5, 0.5, generator=gen)
                m.running_var.uniform_(0.5, 1.5, generator=gen)
    return module.eval(), inputs


def kernel_signature(config: dict) -> dict:
    """The store signature of a kernel configuration."""
    return {"kind": "kernel", "config": config}


# ---------------------------------------------------------------- sampling

_SPATIAL = ((1, 0.08), (7, 0.13), (14, 0.16), (28, 0.16), (56, 0.16), (112, 0.13), (224, 0.04), (160, 0.07),
            (80, 0.07))
_CONV_ACTS = (("relu", 0.3), ("relu6", 0.12), ("hardswish", 0.1), ("silu", 0.15), ("sigmoid", 0.05),
              ("hardsigmoid", 0.05), ("none", 0.23))
_TYPES = (("conv", 0.52), ("linear", 0.04), ("pool", 0.08), ("add", 0.1), ("mul", 0.08), ("act", 0.06),
          ("bn", 0.05), ("cat", 0.04), ("copy", 0.03))         # "copy": a transpose, or 40 % of the time a split
MAX_ELEMENTS = 2_500_000
MAX_MACS = 1.5e9


def _pick(rng: random.Random, table) -> object:
    return rng.choices([v for v, _ in table], [w for _, w in table])[0]


def _channels(rng: random.Random, lo: float = 8, hi: float = 2048, multiple: int = 8) -> int:
    c = math.exp(rng.uniform(math.log(lo), math.log(hi)))
    return max(multiple, int(round(c / multiple)) * multiple)


def _side(rng: random.Random) -> int:
    side = _pick(rng, _SPATIAL)
    if side > 1 and rng.random() < 0.5:
        side = max(2, int(round(side * rng.uniform(0.6, 1.4))))
    return side


def _out_side(h: int, k: int, s: int, p: int) -> int:
    return (h + 2 * p - k) // s + 1


def _sample_once(rng: random.Random) -> dict:
    kind = _pick(rng, _TYPES)
    h = _side(rng)
    if kind == "conv":
        style = rng.choices(("dense", "depthwise", "grouped"), (0.45, 0.3, 0.25))[0]
        s = 2 if h >= 4 and rng.random() < 0.2 else 1
        if style == "depthwise":
            k = rng.choice((3, 3, 5, 5, 7))
            cin = _channels(rng, 16, 2048)
            cout, groups = cin, cin
        elif style == "grouped":
            k = rng.choice((3, 3, 3, 5))
            width = rng.choice((8, 16, 24, 32, 48, 64))
            groups = rng.randint(2, 64)
            cin = width * groups
            cout = cin if rng.random() < 0.7 else width * groups * 2
        else:
            k = _pick(rng, ((1, 0.55), (3, 0.33), (5, 0.06), (7, 0.06))) if h > 1 else 1
            cin = 3 if rng.random() < 0.04 else _channels(rng)
            cout, groups = _channels(rng, max(8, cin / 6), min(2048, max(16, cin * 6))), 1
        if h == 1:
            k, s = 1, 1
        act = _pick(rng, _CONV_ACTS)
        bn = h > 1 and rng.random() < 0.9
        ho = _out_side(h, k, s, k // 2)
        return {"type": "conv", "cin": cin, "cout": cout, "h": h, "w": h, "k": k, "s": s, "groups": groups, "bn": bn,
                "act": act, "batch": 1, "ho": ho, "wo": ho}
    c = _channels(rng, 8, 2048)
    shape = [1, c, h, h]
    if kind == "linear":
        return {"type": "linear", "cin": _channels(rng, 32, 4096), "cout": rng.choice((10, 100, 1000)) if
                rng.random() < 0.4 else _channels(rng, 32, 4096), "rows": 1, "bn": False,
                "act": rng.choice(("none", "none", "relu", "hardswish", "silu"))}
    if kind == "pool":
        pool = rng.choices(("pool_global", "pool_max", "pool_avg"), (0.4, 0.3, 0.3))[0]
        if pool == "pool_global":
            return {"type": "pool_global", "shape": shape, "out": [1, c, 1, 1], "k": 1, "s": 1}
        k, s = rng.choice(((3, 2), (2, 2), (3, 1))) if h >= 4 else (1, 1)
        p = _pool_padding(k, s)
        o = _out_side(h, k, s, p)
        return {"type": pool, "shape": shape, "out": [1, c, o, o], "k": k, "s": s}
    if kind == "add":
        return {"type": "add", "shape": shape, "broadcast": False, "act": rng.choice(("none", "none", "relu"))}
    if kind == "mul":
        return {"type": "mul", "shape": shape, "broadcast": rng.random() < 0.7}
    if kind == "act":
        return {"type": "act", "shape": shape, "act": rng.choice(KERNEL_ACTIVATIONS[1:])}
    if kind == "bn":
        return {"type": "bn", "shape": shape, "act": rng.choice(("none", "relu", "relu"))}
    if kind == "cat":                       # inception-style (2-4 branches) or dense-block style (many)
        parts, hi = (rng.randint(2, 4), 512) if rng.random() < 0.6 else (rng.randint(5, 48), 128)
        return {"type": "cat", "shapes": [[1, _channels(rng, 8, hi), h, h] for _ in range(parts)]}
    if rng.random() < 0.4:                  # drawn here so that the other types' configurations stay as they were
        parts = rng.choice((2, 2, 2, 3, 4))
        return {"type": "split", "shape": [1, parts * max(1, c // parts), h, h], "parts": parts}
    return {"type": "copy", "shape": shape}


def _size_ok(config: dict) -> bool:
    in_b, out_b, _ = kernel_bytes(config)
    return max(in_b, out_b) <= MAX_ELEMENTS and kernel_macs(config) <= MAX_MACS


def sample_kernel(rng: random.Random | int) -> dict:
    """A random kernel configuration (see :data:`KERNEL_TYPES`) of a size real CNNs have at batch 1.

    Spatial sides 1..~300 (weighted to 7..112), channels 8..2048 log-uniform, convolutions
    dense (k 1/3/5/7), depthwise (k 3/5/7) or grouped, stride 1 or 2, with or without batch norm,
    any of the common activations; pools, adds, multiplies, activations, batch norms,
    concatenations, channel-shuffle transposes and splits; at most :data:`MAX_ELEMENTS` elements per tensor and
    :data:`MAX_MACS` MACs. The same seed gives the same configuration.
    """
    rng = rng if isinstance(rng, random.Random) else random.Random(rng)
    while True:
        config = _sample_once(rng)
        if _size_ok(config):
            return config


def sampled_kernels(n: int, seed: int = 0) -> list[dict]:
    """The ``n`` kernel configurations ``hant profile --kernels N`` times: configuration ``i`` is drawn
    from ``random.Random(f"{seed}:kernel:{i}")``, so a seed always gives the same kernels."""
    return [sample_kernel(random.Random(f"{seed}:kernel:{i}")) for i in range(n)]


# ---------------------------------------------------------------- measuring

def _timing():
    from hant.cost_models.timing import TimingConfig
    # A 0.25 s cap (at least 3 blocks) keeps millisecond kernels to 5-20 runs: their fastest block then
    # escapes a core shared with other jobs, which a 0.12 s cap (2-5 runs) did not (up to 7x, on 1 ms+ kernels).
    return TimingConfig(warmup_s=0.01, warmup_runs=2, block_s=0.0005, min_samples=10, rel_ci=0.02, time_cap_s=0.25)


KERNEL_TIMING = _timing()


def profile_kernels(configs: Iterable[dict], store, runtime: str = "onnxruntime", threads: int | None = None,
                    timing=KERNEL_TIMING, progress: bool = True, deadline: float | None = None,
                    device: str = "cpu") -> tuple[int, int]:
    """Time each kernel configuration alone on ``device``/``runtime`` into ``store`` (a path or LatencyStore),
    at ``threads`` runtime threads (default ``torch.get_num_threads()``).

    Kernels already stored for this runtime key are skipped; each new one is committed as soon
    as it is measured, so a killed run resumes where it stopped. ``deadline`` (``time.monotonic()``
    seconds) stops starting new measurements. Returns (measured, skipped).
    """
    import time

    from tqdm.auto import tqdm

    from hant.cost_models.store import LatencyStore
    from hant.cost_models.timing import runtime_for

    owned = not isinstance(store, LatencyStore)
    store = LatencyStore(store) if owned else store
    rt = runtime_for(device, runtime, threads)
    key = rt.key
    measured = skipped = 0
    configs = list(configs)
    try:
        bar = tqdm(configs, desc=f"kernels {runtime}", unit="kernel", disable=not progress)
        for config in bar:
            if deadline is not None and time.monotonic() > deadline:
                break
            signature = kernel_signature(config)
            if store.get_op(signature, key) is not None:
                skipped += 1
                continue
            module, inputs = build_kernel(config)
            result = rt.time(module, inputs, timing)
            store.put_op(signature, key, result.median_s, result.spread, None, None, "kernel")
            measured += 1
            bar.set_postfix(last_us=f"{result.median_s * 1e6:.0f}")
        bar.close()
    finally:
        if owned:
            store.close()
    return measured, skipped
