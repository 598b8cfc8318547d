"""Single-entry single-exit (SESE) regions of an fx graph: the sites later passes substitute.

Definitions (data flow, not control flow):

* The **flow graph** holds the *live* nodes: those reachable from a placeholder that also
  reach the output. Constants (``get_attr`` nodes and nodes computed from constants only)
  are not data flow: they may feed any node and never break a region. *Side* nodes are
  reachable from a placeholder but do not reach the output (asserts, ``_guards_fn``,
  unused ``getitem`` of a tuple).
* ``e`` **dominates** ``x`` when every path from the placeholders to ``x`` passes ``e``;
  ``x`` **post-dominates** ``e`` when every path from ``e`` to the output passes ``x``
  (networkx ``immediate_dominators`` on the flow graph and on its reverse).
* A **region** ``(entry, exit)`` is a pair of live nodes with ``entry`` dominating ``exit``,
  ``exit`` post-dominating ``entry``, and ``exit`` not the output node. Its **interior** is
  every live node strictly dominated by ``entry`` and post-dominated by ``exit`` (``exit``
  included, ``entry`` excluded), plus the side nodes that read interior values. Then the
  only value entering the interior is ``entry``'s (constants aside), and the only value
  leaving it is ``exit``'s; ``entry`` has no user outside the interior.

So replacing a region means computing ``exit``'s value from ``entry``'s: insert the new
node, ``exit.replace_all_uses_with(new)``, erase ``Region.nodes`` in reverse order, then
drop constants left unused. :meth:`Region.extract` gives the interior as a module.

Every region entered at ``e`` ends on ``e``'s post-dominator chain, and the exits that
work form a prefix of that chain; so every region is a run ``(e, ipdom e)``,
``(ipdom e, ipdom² e)``, ... of *canonical* regions ``(n, ipdom n)``, one per node at most.
:func:`sese_regions` returns the canonical ones or, asked, every run. (A pair whose
interior would be read by a side node that also reads an outside value is not a region;
this only happens with asserts that compare values from two places.)
:func:`natural_regions` returns the regions that are exactly the ops of one call of a
module of the hierarchy (a ResNet basic block, an inverted residual, a conv-BN-act stem).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import networkx as nx
import torch.fx
from torch.fx import GraphModule, Node

from hant.graphs.ops import is_input_guard, output_shape

__all__ = ["Region", "sese_regions", "natural_regions", "region_between"]


@dataclass(frozen=True)
class Region:
    """A single-entry single-exit piece of a graph, by node names (see the module docstring).

    ``entry``: the node whose value is the region's only input; it lies outside the region
    (the previous block's output, or a placeholder). ``exit``: the node whose value is the
    region's only output; it lies inside. ``nodes``: the interior, ``exit`` included, in
    graph (topological) order; ``get_attr`` weights and other constants are not listed.
    ``input_shape`` / ``output_shape``: the shapes of ``entry``'s and ``exit``'s values, or
    None when unknown. ``module``: the qualified name of the module whose one call is exactly
    this interior, or None.
    """

    entry: str
    exit: str
    nodes: tuple[str, ...]
    input_shape: tuple[int, ...] | None
    output_shape: tuple[int, ...] | None
    module: str | None = None

    def entry_node(self, gm: GraphModule) -> Node:
        """The fx node of ``entry`` in ``gm``."""
        return _node_named(gm, self.entry)

    def exit_node(self, gm: GraphModule) -> Node:
        """The fx node of ``exit`` in ``gm``."""
        return _node_named(gm, self.exit)

    def interior(self, gm: GraphModule) -> list[Node]:
        """The fx nodes of ``nodes`` in ``gm``, in graph order."""
        by_name = {n.name: n for n in gm.graph.nodes}
        return [by_name[name] for name in self.nodes]

    def extract(self, gm: GraphModule) -> GraphModule:
        """The interior as a GraphModule that maps ``entry``'s value to ``exit``'s value.

        Constants the interior reads (``get_attr`` nodes and what is computed from them) are
        copied into the new graph. Submodules, parameters and buffers are shared with
        ``gm``, not copied: deep-copy the result before changing its weights. Node meta
        (``tensor_meta``, ``nn_module_stack``, ...) is kept.
        """
        entry = self.entry_node(gm)
        graph = torch.fx.Graph()
        env: dict[Node, Node] = {}
        placeholder = graph.placeholder(entry.name)
        placeholder.meta = dict(entry.meta)
        env[entry] = placeholder

        def lookup(node: Node) -> Node:
            if node not in env:  # a constant: copy it and what it is computed from
                if node.op == "placeholder":
                    raise ValueError(f"{self} reads input {node.name} besides its entry: not a region of this graph")
                env[node] = graph.node_copy(node, lookup)
            return env[node]

        for node in self.interior(gm):
            env[node] = graph.node_copy(node, lookup)
        graph.output(env[self.exit_node(gm)])
        name = f"Region_{self.module or self.exit}".replace(".", "_")
        return GraphModule(gm, graph, name)


def _node_named(gm: GraphModule, name: str) -> Node:
    for node in gm.graph.nodes:
        if node.name == name:
            return node
    raise KeyError(f"no node named {name!r} in the graph; was the region computed on another graph?")


def _plain_shape(node: Node) -> tuple[int, ...] | None:
    shape = output_shape(node)
    return tuple(int(s) for s in shape) if shape is not None else None


_ROOT = "<hant-flow-root>"  # the virtual node that feeds every placeholder; never an fx node


class _Flow:
    """Live flow graph of ``gm`` with its dominator and post-dominator trees."""

    def __init__(self, gm: GraphModule):
        nodes = list(gm.graph.nodes)
        self.order = {n: i for i, n in enumerate(nodes)}
        self.by_name = {n.name: n for n in nodes}
        self.output = next(n for n in reversed(nodes) if n.op == "output")
        from_input: set[Node] = set()
        for n in nodes:
            if n.op == "placeholder" or any(a in from_input for a in n.all_input_nodes):
                from_input.add(n)
        to_output: set[Node] = set()
        for n in reversed(nodes):
            if n is self.output or any(u in to_output for u in n.users):
                to_output.add(n)
        self.varying = from_input
        self.live = from_input & to_output
        self.side = from_input - to_output

        graph = nx.DiGraph()
        graph.add_node(_ROOT)
        for n in nodes:
            if n not in self.live:
                continue
            graph.add_node(n)
            if n.op == "placeholder":
                graph.add_edge(_ROOT, n)
            for a in n.all_input_nodes:
                if a in self.live:
                    graph.add_edge(a, n)
        self.graph = graph
        self.idom = nx.immediate_dominators(graph, _ROOT)
        self.ipdom = nx.immediate_dominators(graph.reverse(copy=False), self.output)
        self._dom = _Ancestry(self.idom, _ROOT)
        self._pdom = _Ancestry(self.ipdom, self.output)

    def dominates(self, a: Node, b: Node) -> bool:
        return self._dom.is_ancestor(a, b)

    def post_dominates(self, a: Node, b: Node) -> bool:
        return self._pdom.is_ancestor(a, b)

    def is_region(self, entry: Node, exit: Node) -> bool:
        return (entry in self.live and exit in self.live and entry is not exit and exit is not self.output
                and self.dominates(entry, exit) and self.post_dominates(exit, entry))

    def interior(self, entry: Node, exit: Node, own_side: Iterable[Node] = ()) -> list[Node] | None:
        """Interior of the region ``(entry, exit)`` in graph order, or None when a side node leaks.

        ``own_side`` are side nodes to take in as well although they read only ``entry``.
        Side nodes that read an interior value are always taken in; if one also reads a
        value from outside, the interior would have a second entry and None is returned.
        """
        inside = {exit}
        stack = [exit]
        while stack:  # every live node between entry and exit reaches exit backwards without passing entry
            for a in stack.pop().all_input_nodes:
                if a is not entry and a in self.live and a not in inside:
                    inside.add(a)
                    stack.append(a)
        seeds = set(inside) | set(own_side)
        side = set(own_side)
        stack = list(seeds)
        while stack:
            for user in stack.pop().users:
                if user in self.side and user not in side:
                    side.add(user)
                    stack.append(user)
        allowed = inside | side | {entry}
        for s in side:
            if any(a in self.varying and a not in allowed for a in s.all_input_nodes):
                return None
        return sorted(inside | side, key=self.order.__getitem__)

    def region(self, entry: Node, exit: Node, module: str | None = None,
               own_side: Iterable[Node] = ()) -> Region | None:
        interior = self.interior(entry, exit, own_side)
        if interior is None:
            return None
        return Region(entry.name, exit.name, tuple(n.name for n in interior), _plain_shape(entry),
                      _plain_shape(exit), module)


class _Ancestry:
    """Constant-time ancestor queries on a tree given as a child -> parent map."""

    def __init__(self, parent: dict, root):
        children: dict = {}
        for child, p in parent.items():
            if child != root:
                children.setdefault(p, []).append(child)
        self.enter: dict = {}
        self.leave: dict = {}
        clock = 0
        stack = [(root, False)]
        while stack:
            node, done = stack.pop()
            if done:
                self.leave[node] = clock
                clock += 1
                continue
            self.enter[node] = clock
            clock += 1
            stack.append((node, True))
            stack.extend((c, False) for c in children.get(node, ()))

    def is_ancestor(self, a, b) -> bool:
        """True when ``a`` is ``b`` or an ancestor of ``b``."""
        if a not in self.enter or b not in self.enter:
            return False
        return self.enter[a] <= self.enter[b] and self.leave[b] <= self.leave[a]


def _module_calls(gm: GraphModule) -> dict[str, tuple[str, list[Node], bool]]:
    """Module calls recorded in ``nn_module_stack``: call key -> (module path, nodes, has sub-calls).

    A call key names one call of a module (``layer1.0.relu`` and ``layer1.0.relu@1`` are
    the two calls of a shared ReLU). ``call_module`` nodes without a record count as one
    call of their target. Export's input guard belongs to no call.
    """
    calls: dict[str, tuple[str, list[Node], bool]] = {}
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr") or is_input_guard(node):
            continue
        stack = node.meta.get("nn_module_stack")
        entries = [(str(key), str(value[0])) for key, value in stack.items()] if stack else []
        if not entries and node.op == "call_module":
            entries = [(str(node.target), str(node.target))]
        for depth, (key, path) in enumerate(entries):
            _path, members, nested = calls.get(key, (path, [], False))
            members.append(node)
            calls[key] = (path, members, nested or depth < len(entries) - 1)
    return calls


def _natural(gm: GraphModule, flow: _Flow, leaves: bool) -> list[Region]:
    regions = []
    for path, members, nested in _module_calls(gm).values():
        if not path or not (nested or leaves):
            continue
        member_set = set(members)
        live = [n for n in members if n in flow.live]
        entries = {a for n in live for a in n.all_input_nodes if a in flow.live and a not in member_set}
        exits = {n for n in live if any(u in flow.live and u not in member_set for u in n.users)}
        if len(entries) != 1 or len(exits) != 1:
            continue
        entry, exit = entries.pop(), exits.pop()
        if not flow.is_region(entry, exit):
            continue
        region = flow.region(entry, exit, path, own_side=[n for n in members if n in flow.side])
        if region is not None and set(region.nodes) == {n.name for n in members if n in flow.varying}:
            regions.append(region)
    return sorted(regions, key=lambda r: (flow.order[flow.by_name[r.exit]], -len(r.nodes), r.module))


def natural_regions(gm: GraphModule, *, leaves: bool = False) -> list[Region]:
    """The regions that are exactly the ops of one call of a module of the hierarchy.

    For each module call recorded in ``node.meta["nn_module_stack"]`` (symbolic tracing and
    ``torch.export`` both record it; ``call_module`` targets serve where it is missing), the
    region is kept when its ops have one outside input (the entry: the node feeding the
    block), one value used outside (the exit: the block's output), that pair is a region,
    and its interior is exactly the call's ops. ``Region.module`` is the module's qualified
    name (``layer1.0``, ``features.3``, ``features.0`` for a conv-BN-act stem).

    Modules whose call contains no sub-module call (a lone Conv2d or ReLU) are left out
    unless ``leaves`` is True; the root module is never a natural region. Nested modules
    give nested regions, and a module that adds no op of its own (an inverted residual
    without skip connection and its ``conv`` Sequential) gives the same nodes twice, under
    both names. Sorted by position of the exit, outer modules first.
    """
    return _natural(gm, _Flow(gm), leaves)


def sese_regions(gm: GraphModule, *, runs: bool = False) -> list[Region]:
    """Single-entry single-exit regions of ``gm`` from dominators and post-dominators.

    By default the canonical regions ``(e, ipdom e)``: for each node ``e`` whose immediate
    post-dominator it dominates, the smallest region entered at ``e``; at most one per node.
    Every region is a run of consecutive canonical pairs. With ``runs=True`` every region
    is returned, runs included; in long chains their number grows with the square of the
    chain length, so ask for them on blocks, not on whole transformers.

    ``Region.module`` names the outermost module whose call is exactly the interior, when
    there is one (see :func:`natural_regions`). Sorted by position of the entry, then exit.
    """
    flow = _Flow(gm)
    modules: dict[tuple[str, str], str] = {}
    for region in _natural(gm, flow, leaves=True):
        key = (region.entry, region.exit)
        if key not in modules or len(region.module) < len(modules[key]):
            modules[key] = region.module
    regions = []
    for entry in flow.order:
        if entry not in flow.live or entry is flow.output:
            continue
        exit = flow.ipdom.get(entry)
        while isinstance(exit, Node) and flow.is_region(entry, exit):
            region = flow.region(entry, exit, modules.get((entry.name, exit.name)))
            if region is not None:
                regions.append(region)
            if not runs:
                break
            exit = flow.ipdom.get(exit)
    return regions


def region_between(gm: GraphModule, entry: str, exit: str) -> Region | None:
    """The region from node ``entry`` to node ``exit`` (names), or None when that pair is not one."""
    flow = _Flow(gm)
    for name in (entry, exit):
        if name not in flow.by_name:
            raise KeyError(f"no node named {name!r} in the graph")
    first, last = flow.by_name[entry], flow.by_name[exit]
    return flow.region(first, last) if flow.is_region(first, last) else None
