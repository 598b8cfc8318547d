"""A networkx view of an fx graph: one graph node per fx node, edges from producer to user.

The view is a snapshot for analysis (paths, dominators, drawing); it does not follow
later edits of the GraphModule. Graph nodes are keyed by fx node name, which is unique
within a graph.
"""

from __future__ import annotations

import networkx as nx
import torch
import torch.fx
from torch.fx import GraphModule, Node

from hant.graphs.ops import module_of, op_kind, output_dtype, output_shape

__all__ = ["to_networkx", "readable_target", "module_path"]


def readable_target(node: Node) -> str:
    """The node's target as a person reads it.

    ``call_module``: the module path and class (``layer1.0.conv1 (Conv2d)``); ``call_function``:
    the qualified function or ATen overload name (``torch.flatten``, ``aten.conv2d.default``);
    ``call_method``: ``.name``; ``get_attr``: the attribute path; placeholder and output: the op.
    """
    if node.op == "call_module":
        module = module_of(node)
        return f"{node.target} ({type(module).__name__})" if module is not None else str(node.target)
    if node.op == "call_function":
        target = node.target
        if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
            return str(target)
        try:
            return torch.fx.node._get_qualified_name(target)
        except Exception:  # builtins and lambdas without a stable import path
            return getattr(target, "__name__", str(target))
    if node.op == "call_method":
        return f".{node.target}"
    if node.op == "get_attr":
        return str(node.target)
    return node.op


def module_path(node: Node) -> str | None:
    """The qualified name of the innermost module whose forward produced the node, or None.

    Read from ``node.meta["nn_module_stack"]``, which both symbolic tracing and
    ``torch.export`` record; a ``call_module`` node without that record falls back to its target.
    Ops of the root module's own ``forward`` give None in both forms.
    """
    stack = node.meta.get("nn_module_stack")
    if stack:
        path, _type = list(stack.values())[-1]
        return str(path) or None
    if node.op == "call_module":
        return str(node.target)
    return None


def _plain_shape(node: Node) -> tuple[int, ...] | None:
    shape = output_shape(node)
    return tuple(int(s) for s in shape) if shape is not None else None


def to_networkx(gm: GraphModule, *, include_get_attr: bool = False) -> nx.DiGraph:
    """A DiGraph with one node per fx node (keyed by name) and an edge from each input to its user.

    Node attributes: ``op`` (fx opcode), ``target`` (:func:`readable_target`), ``kind``
    (:func:`hant.graphs.ops.op_kind`), ``shape`` (tuple of ints, or None when the output is
    not a single tensor or shapes were not propagated), ``dtype`` (str or None), ``module``
    (:func:`module_path`) and ``index`` (position in the graph's topological order).
    ``get_attr`` nodes (weights and constants of exported graphs) and their edges are left
    out unless ``include_get_attr`` is True. The graph attribute ``name`` is the class name
    of ``gm``.
    """
    graph = nx.DiGraph(name=type(gm).__name__)
    for index, node in enumerate(gm.graph.nodes):
        if node.op == "get_attr" and not include_get_attr:
            continue
        dtype = output_dtype(node)
        graph.add_node(
            node.name, op=node.op, target=readable_target(node), kind=op_kind(node), shape=_plain_shape(node),
            dtype=str(dtype) if dtype is not None else None, module=module_path(node), index=index,
        )
        for source in node.all_input_nodes:
            if source.name in graph:
                graph.add_edge(source.name, node.name)
    return graph
