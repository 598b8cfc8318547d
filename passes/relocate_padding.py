"""relocate_padding: merge conv chains with no nonlinearity between them, moving their padding first (lossy).

A chain of convolutions (with eval BatchNorm and identity-like ops between them, each
feeding only the next) is one affine map, except at the border: every padded conv after
the first pads the *intermediate* tensor with zeros, which no single conv on the input can
reproduce (a bias before it makes the padded ring non-zero). Kim et al. (ICML 2023,
"Efficient latency-aware CNN depth compression") move all the chain's padding to its first
conv, ``P = p1 + s1*p2 + s1*s2*p3 + ...``, and leave the rest unpadded. The relocated chain
is then exactly one conv, with kernel ``K = k1 + s1*(k2-1) + s1*s2*(k3-1) + ...`` and stride
``s1*s2*...``; only a ring of border pixels differs from the original, and fine-tuning
repairs it.

What this module does:

* :func:`chain_paths` finds maximal single-path chains of ops a predicate accepts;
  :func:`element_chains` does the same with a whole residual block ``x + chain(x)``
  (:class:`Residual`) allowed as one element, so chains run across inverted residuals;
* :func:`plan_chains` splits every conv/BN chain into segments to merge, minimising the
  cost model's price (a merged kernel can be slower than the chain it replaces: a 5x5 dense
  conv for two 3x3 ones), with ``relocate=False`` allowing only segments whose merge is exact;
* :func:`relocate` applies only the padding move (convs keep their own weights; used to
  fine-tune before merging);
* :func:`merge` replaces each planned segment by one conv whose weights are COMPUTED from
  the segment's (composed in float64, never re-initialised), and absorbs a residual
  ``x + chain(x)`` into the conv's centre tap when the whole chain became one conv. A
  segment may span residual blocks: ``x + f(x)`` with ``f`` linear is one conv whose
  kernel is ``f``'s plus an identity at the centre tap, and it composes with its
  neighbours like any conv (stem conv -> block -> block becomes one conv).

The registered pass ``relocate_padding`` plans, relocates and merges every chain of a graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx import GraphModule, Node
from torch.fx.passes.shape_prop import ShapeProp

from hant.graphs.ops import (
    BatchNormView, ConvView, add_of, batchnorm_of, conv_of, is_identity_like, output_dtype, output_shape,
)
from hant.passes.base import Pass, PassResult, register
from hant.passes.linear_algebra import dilate_taps, regroup_blocks
from hant.passes.surgery import add_module, copy_meta, prune_unused, readable

__all__ = ["ChainPlan", "Segment", "Residual", "chain_paths", "element_chains", "affine_view", "plan_chains",
           "relocate", "merge", "RelocatePadding", "node_price"]

_F64 = torch.float64


# ---------------------------------------------------------------- chain ops

def affine_view(node: Node) -> ConvView | BatchNormView | str | None:
    """The view of a node a chain may hold: a mergeable conv, an eval BN, or ``"identity"``; else None."""
    conv = conv_of(node)
    if conv is not None:
        ok = (not conv.transposed and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
              and conv.weight is not None and (conv.bias is not None or not conv.has_bias)
              and conv.output is node)
        return conv if ok else None
    bn = batchnorm_of(node)
    if bn is not None:
        ok = not bn.training and bn.running_mean is not None and bn.output is node
        return bn if ok else None
    if is_identity_like(node) and node.args and isinstance(node.args[0], Node):
        return "identity"
    return None


def _data_input(node: Node) -> Node | None:
    inputs = [n for n in node.all_input_nodes if n.op != "get_attr"]
    return inputs[0] if len(inputs) == 1 else None


def chain_paths(gm: GraphModule, member: Callable[[Node], bool]) -> list[list[Node]]:
    """Maximal paths of ``member`` nodes where each node's only data input is the previous
    node and the previous node's only user is this one. Every member node is on exactly one path."""
    def linked(prev: Node, node: Node) -> bool:
        return member(prev) and _data_input(node) is prev and len(prev.users) == 1

    paths = []
    for node in gm.graph.nodes:
        if not member(node):
            continue
        prev = _data_input(node)
        if prev is not None and linked(prev, node):
            continue                      # not the start of its path
        path = [node]
        while len(path[-1].users) == 1:
            nxt = next(iter(path[-1].users))
            if not (member(nxt) and _data_input(nxt) is path[-1]):
                break
            path.append(nxt)
        paths.append(path)
    return paths


@dataclass(frozen=True)
class Residual:
    """A residual block ``add(x, chain(x))``: ``nodes`` is the chain (in order), ``add`` the sum."""
    nodes: tuple[Node, ...]
    add: Node

    @property
    def input(self) -> Node:
        return _data_input(self.nodes[0])

    @property
    def output(self) -> Node:
        return self.add


Element = Node | Residual


def _residual_at(add: Node, member: Callable[[Node], bool]) -> Residual | None:
    """``add`` as ``x + chain(x)`` where the chain is of ``member`` nodes, each used once, and
    ``x`` is used by the chain and the add only; else None."""
    view = add_of(add)
    if view is None or view.alpha != 1.0 or view.inplace or not all(isinstance(a, Node) for a in (view.lhs, view.rhs)):
        return None
    for x, y in ((view.lhs, view.rhs), (view.rhs, view.lhs)):
        nodes, node = [], y
        while isinstance(node, Node) and node is not x and member(node) and len(node.users) == 1:
            nodes.append(node)
            node = _data_input(node)
        if node is x and nodes and len(x.users) == 2:
            return Residual(tuple(reversed(nodes)), add)
    return None


def _element_input(e: Element) -> Node | None:
    return e.input if isinstance(e, Residual) else _data_input(e)


def _element_output(e: Element) -> Node:
    return e.output if isinstance(e, Residual) else e


def element_chains(gm: GraphModule, member: Callable[[Node], bool]) -> list[list[Element]]:
    """Like :func:`chain_paths`, with every residual block ``x + chain(x)`` whose chain is of
    ``member`` nodes taken as one :class:`Residual` element. Each element's input is the
    previous element's output, used by this element alone."""
    residuals = [r for r in (_residual_at(n, member) for n in gm.graph.nodes) if r is not None]
    owner: dict[Node, Residual] = {n: r for r in residuals for n in (*r.nodes, r.add)}
    elements: list[Element] = []
    for node in gm.graph.nodes:
        if node in owner:
            if node is owner[node].add:
                elements.append(owner[node])
        elif member(node):
            elements.append(node)

    def first_nodes(e: Element) -> set[Node]:
        return {e.nodes[0], e.add} if isinstance(e, Residual) else {e}

    by_input: dict[Node, Element] = {}
    for e in elements:
        src = _element_input(e)
        if src is not None and set(src.users) == first_nodes(e):
            by_input[src] = e
    is_element_output = {_element_output(e) for e in elements}
    chains = []
    for e in elements:
        src = _element_input(e)
        if src is not None and src in is_element_output and by_input.get(src) is e:
            continue                      # not the start of its chain
        chain = [e]
        while _element_output(chain[-1]) in by_input:
            chain.append(by_input[_element_output(chain[-1])])
        chains.append(chain)
    return chains


# ---------------------------------------------------------------- composition algebra (float64)

def _dilated(weight: torch.Tensor, dilation: tuple[int, ...]) -> torch.Tensor:
    """A kernel with dilation expanded into explicit zeros."""
    return dilate_taps(weight.unsqueeze(0), tuple(dilation))[0]


def _densify(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """A grouped kernel (out, in/groups, k...) as the equivalent dense one (out, in, k...)."""
    cout, cin_g = weight.shape[:2]
    return regroup_blocks(weight.reshape(groups, cout // groups, cin_g, *weight.shape[2:]), 1)[0]


@dataclass
class _Affine:
    """``y = conv(pad_P(x), weight, stride, groups) + bias``: float64, dilation expanded."""
    weight: torch.Tensor
    bias: torch.Tensor
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    groups: int


def _then_conv(acc: _Affine | None, view: ConvView) -> _Affine:
    w = _dilated(view.weight.detach().to(_F64), view.dilation)
    b = view.bias.detach().to(_F64) if view.bias is not None else torch.zeros(view.out_channels, dtype=_F64)
    if acc is None:
        return _Affine(w, b, tuple(view.stride), tuple(view.padding), view.groups)
    groups = view.groups
    if groups != acc.groups:       # group structures differ: the composite is dense
        acc = _Affine(_densify(acc.weight, acc.groups), acc.bias, acc.stride, acc.padding, 1)
    n = w.dim() - 2
    transpose = getattr(F, f"conv_transpose{n}d")
    # W[o, i] = sum_c sum_t w[o, c, t] * acc.W[c, i, u - S*t]: a transposed conv of acc.W by w.
    # conv_transpose wants its weight as (in, out/groups, k): regroup w, never densify it.
    og = w.shape[0] // groups
    t_weight = torch.cat([w[j * og:(j + 1) * og].transpose(0, 1) for j in range(groups)])
    weight = transpose(acc.weight.transpose(0, 1), t_weight, dilation=acc.stride, groups=groups).transpose(0, 1)
    summed = w.sum(dim=tuple(range(2, w.dim())))                  # (out, in/groups)
    ig = summed.shape[1]
    bias = (summed.reshape(groups, og, ig) @ acc.bias.reshape(groups, ig, 1)).reshape(-1) + b
    padding = tuple(p + q * s for p, q, s in zip(acc.padding, view.padding, acc.stride))
    stride = tuple(s * t for s, t in zip(acc.stride, view.stride))
    return _Affine(weight, bias, stride, padding, acc.groups)


def _then_bn(acc: _Affine, view: BatchNormView) -> _Affine:
    scale, shift = view.scale_shift(_F64)
    shape = (-1,) + (1,) * (acc.weight.dim() - 1)
    return _Affine(acc.weight * scale.reshape(shape), acc.bias * scale + shift, acc.stride, acc.padding, acc.groups)


def _compose(views: list, acc: _Affine | None = None) -> _Affine:
    for view in views:
        if view == "identity":
            continue
        if isinstance(view, ConvView):
            acc = _then_conv(acc, view)
        else:
            acc = _then_bn(acc, view)
    return acc


@dataclass(frozen=True)
class _AffineAsConv:
    """An :class:`_Affine` seen as a conv view (no dilation), so :func:`_then_conv` composes it."""
    affine: _Affine

    weight = property(lambda self: self.affine.weight)
    bias = property(lambda self: self.affine.bias)
    stride = property(lambda self: self.affine.stride)
    padding = property(lambda self: self.affine.padding)
    groups = property(lambda self: self.affine.groups)
    out_channels = property(lambda self: self.affine.weight.shape[0])
    dilation = property(lambda self: (1,) * (self.affine.weight.dim() - 2))


def _with_identity(acc: _Affine) -> _Affine:
    """``x + acc(x)`` as one affine map: the identity added at the centre tap (the caller checked
    stride 1, equal channels and a centred kernel, see :func:`_residual_geometry`)."""
    weight = acc.weight.clone()
    per = weight.shape[1]
    centre = tuple(p for p in acc.padding)
    for o in range(weight.shape[0]):
        weight[(o, o % per) + centre] += 1.0
    return _Affine(weight, acc.bias, acc.stride, acc.padding, acc.groups)


def _compose_elements(elements: Iterable[Element]) -> _Affine:
    """The affine map of a run of elements (nodes and :class:`Residual` blocks), in float64."""
    acc = None
    for e in elements:
        if isinstance(e, Residual):
            inner = _with_identity(_compose([affine_view(n) for n in e.nodes]))
            acc = inner if acc is None else _then_conv(acc, _AffineAsConv(inner))
        else:
            acc = _compose([affine_view(e)], acc)
    return acc


def _to_module(acc: _Affine, dtype: torch.dtype) -> nn.Module:
    n = acc.weight.dim() - 2
    cout, cin = acc.weight.shape[0], acc.weight.shape[1] * acc.groups
    conv_cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[n]
    conv = conv_cls(cin, cout, tuple(acc.weight.shape[2:]), stride=acc.stride, padding=acc.padding,
                    groups=acc.groups, bias=True, device="meta", dtype=dtype).to_empty(device="cpu")
    with torch.no_grad():
        conv.weight.copy_(acc.weight.to(dtype))
        conv.bias.copy_(acc.bias.to(dtype))
    return conv


# ---------------------------------------------------------------- planning

@dataclass(frozen=True)
class Segment:
    """Ops ``nodes`` of one chain to merge into one conv. ``relocated``: its padding had to move.

    ``elements`` is the run as chain elements when it spans residual blocks (``nodes`` then
    lists every node covered, adds included, in graph order); empty for a plain run.
    """
    nodes: tuple[Node, ...]
    relocated: bool
    price_before: tuple[float, float]
    price_after: tuple[float, float]
    elements: tuple = ()

    def parts(self) -> tuple:
        """The run as elements: ``elements``, or ``nodes`` for a plain run."""
        return self.elements or self.nodes


@dataclass
class ChainPlan:
    """The segments to merge in a graph, and the chains left alone (with why)."""
    segments: list[Segment] = field(default_factory=list)
    left: list[tuple[str, str]] = field(default_factory=list)


def _flat_nodes(elements: Iterable[Element]) -> list[Node]:
    out: list[Node] = []
    for e in elements:
        out.extend((*e.nodes, e.add) if isinstance(e, Residual) else (e,))
    return out


def _flat_views(elements: Iterable[Element]) -> list:
    """Views of every affine op of the run, residual chains included (adds left out)."""
    return [affine_view(n) for e in elements for n in (e.nodes if isinstance(e, Residual) else (e,))]


def _needs_relocation(views: list) -> bool:
    seen_op = False
    for view in views:
        if view == "identity":
            continue
        if seen_op and isinstance(view, ConvView) and any(p != 0 for p in view.padding):
            return True
        seen_op = True
    return False


def _one_op_graph(module: nn.Module, input_shape: torch.Size, dtype: torch.dtype) -> Node:
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    y = graph.call_module("op", (x,))
    graph.output(y)
    root = nn.Module()
    root.op = module
    gm = GraphModule(root, graph)
    ShapeProp(gm).propagate(torch.zeros(input_shape, dtype=dtype))
    return y


def node_price(cost: Any, nodes: Iterable[Node]) -> tuple[float, float]:
    """``(latency_s, macs)`` the cost model gives the nodes, summed."""
    lat = macs = 0.0
    for node in nodes:
        c = cost.node_cost(node)
        lat += float(c.latency_s)
        macs += float(c.macs)
    return lat, macs


@dataclass(frozen=True)
class _Geometry:
    """Kernel (dilation expanded), stride, padding, channels and groups of a (merged) conv."""
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    cin: int
    cout: int
    groups: int


def _then_geometry(acc: _Geometry | None, g: _Geometry) -> _Geometry:
    if acc is None:
        return g
    kernel = tuple(a + (k - 1) * s for a, k, s in zip(acc.kernel, g.kernel, acc.stride))
    padding = tuple(p + q * s for p, q, s in zip(acc.padding, g.padding, acc.stride))
    stride = tuple(s * t for s, t in zip(acc.stride, g.stride))
    return _Geometry(kernel, stride, padding, acc.cin, g.cout, acc.groups if acc.groups == g.groups else 1)


def _conv_geometry(v: ConvView) -> _Geometry:
    k_eff = tuple(d * (k - 1) + 1 for d, k in zip(v.dilation, v.kernel_size))
    return _Geometry(k_eff, tuple(v.stride), tuple(v.padding), v.in_channels, v.out_channels, v.groups)


def _residual_geometry(r: Residual) -> _Geometry | None:
    """The merged conv of ``x + chain(x)``, or None when the identity does not fit in it
    (stride, channels, or a kernel not centred on its padding)."""
    g = None
    for v in (affine_view(n) for n in r.nodes):
        if isinstance(v, ConvView):
            g = _then_geometry(g, _conv_geometry(v))
    if (g is None or g.cin != g.cout or any(s != 1 for s in g.stride)
            or any(k != 2 * p + 1 for k, p in zip(g.kernel, g.padding))):
        return None
    return g


def _run_geometry(elements: list) -> _Geometry | None:
    g = None
    for e in elements:
        if isinstance(e, Residual):
            r = _residual_geometry(e)
            if r is None:
                return None
            g = _then_geometry(g, r)
        elif isinstance(affine_view(e), ConvView):
            g = _then_geometry(g, _conv_geometry(affine_view(e)))
    return g


def _empty_conv(kernel, stride, padding, cin, cout, groups, dtype) -> nn.Module:
    conv_cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[len(kernel)]
    conv = conv_cls(cin, cout, kernel, stride=stride, padding=padding, groups=groups, bias=True, device="meta",
                    dtype=dtype)
    conv = conv.to_empty(device="cpu")
    with torch.no_grad():   # zeros, not uninitialised memory: denormal garbage makes the shape run crawl
        conv.weight.zero_()
        conv.bias.zero_()
    return conv


def _segment_price(cost: Any, elements: list) -> tuple[float, float] | None:
    """Price of the merged conv of a run of elements from its shape alone (no weights are
    composed); None when the merge is impossible or would change the output shape."""
    source = _element_input(elements[0])
    in_shape, out_shape = output_shape(source) if source is not None else None, output_shape(
        _element_output(elements[-1]))
    dtype = output_dtype(_element_output(elements[-1])) or torch.float32
    g = _run_geometry(elements)
    if in_shape is None or out_shape is None or g is None:
        return None
    spatial = len(g.stride)
    expected = [(h + 2 * p - k) // s + 1 for h, p, k, s in zip(in_shape[-spatial:], g.padding, g.kernel, g.stride)]
    if list(out_shape[-spatial:]) != expected or out_shape[1] != g.cout or in_shape[1] != g.cin:
        return None
    node = _one_op_graph(_empty_conv(g.kernel, g.stride, g.padding, g.cin, g.cout, g.groups, dtype), in_shape, dtype)
    return node_price(cost, [node])


def _ring_allowed(run: list, max_padding_fraction: float) -> bool:
    """Whether the relocated padding of ``run`` is at most ``max_padding_fraction`` of its input's
    smallest spatial size (at least 1 pixel): the ring of changed border pixels stays thin."""
    g, source = _run_geometry(run), _element_input(run[0])
    shape = output_shape(source) if source is not None else None
    if g is None or shape is None:
        return False
    return max(g.padding) <= max(1, int(min(shape[2:]) * max_padding_fraction))


def _plan_run(cost: Any, chain: list, relocate: bool,
              max_padding_fraction: float | None) -> tuple[tuple[float, float, int], list[Segment]]:
    """Cheapest split of one chain into segments: a dynamic program over split points.

    A residual element alone costs its own chain's best plan plus its add (merging all of
    its chain absorbs the add, see :func:`merge`); a run of several elements is priced as
    its merged conv."""
    m = len(chain)
    single: list[tuple[tuple[float, float, int], list[Segment]]] = []
    for e in chain:
        if isinstance(e, Residual):
            (lat, macs, n), segs = _plan_run(cost, list(e.nodes), relocate, max_padding_fraction)
            add_lat, add_macs = node_price(cost, [e.add])
            whole = len(segs) == 1 and len(segs[0].nodes) == len(e.nodes)
            if whole and _residual_geometry(e) is not None:
                add_lat = add_macs = 0.0        # absorbed into the merged conv's centre tap
            single.append(((lat + add_lat, macs + add_macs, n + 1), segs))
        else:
            lat, macs = node_price(cost, [e])
            single.append(((lat, macs, 1), []))
    best: list = [((0.0, 0.0, 0), [])] + [None] * m
    for j in range(1, m + 1):
        for i in range(j):
            prev = best[i]
            if prev is None:
                continue
            if j - i == 1:
                (lat, macs, n), segs = single[i]
                cand = ((prev[0][0] + lat, prev[0][1] + macs, prev[0][2] + n), prev[1] + segs)
            else:
                run = chain[i:j]
                first = next((v for v in (affine_view(e) if not isinstance(e, Residual) else e for e in run)
                              if v != "identity"), None)
                if not isinstance(first, (ConvView, Residual)):
                    continue
                reloc = _needs_relocation(_flat_views(run))
                if reloc and (not relocate or (max_padding_fraction is not None
                                               and not _ring_allowed(run, max_padding_fraction))):
                    continue
                priced = _segment_price(cost, run)
                if priced is None:
                    continue
                lat, macs = priced
                before = (sum(s[0][0] for s in single[i:j]), sum(s[0][1] for s in single[i:j]))
                has_residual = any(isinstance(e, Residual) for e in run)
                segment = Segment(tuple(_flat_nodes(run)), reloc, before, (lat, macs),
                                  tuple(run) if has_residual else ())
                cand = ((prev[0][0] + lat, prev[0][1] + macs, prev[0][2] + 1), prev[1] + [segment])
            if best[j] is None or cand[0] < best[j][0]:
                best[j] = cand
    return best[m]


def _names(part: Element) -> Any:
    return (tuple(n.name for n in part.nodes), part.add.name) if isinstance(part, Residual) else part.name


def _from_names(names: Any, by_name: dict[str, Node]) -> Element:
    if isinstance(names, str):
        return by_name[names]
    return Residual(tuple(by_name[x] for x in names[0]), by_name[names[1]])


def plan_chains(gm: GraphModule, cost: Any, *, relocate: bool = True, cache: dict | None = None,
                max_padding_fraction: float | None = None) -> ChainPlan:
    """Choose, for every conv/BN chain of ``gm``, the segments whose merged conv is cheapest.

    Chains are :func:`element_chains` of conv/BN/identity nodes: they run through residual
    blocks whose inner chain is linear. Per chain, a dynamic program over split points
    minimises the summed price ``(latency_s, MACs)`` (latency first, MACs break ties, so a
    latency-free model such as ``flops`` still decides). A segment must start with a conv
    (or a residual block); with ``relocate=False`` it may hold no padded conv after its
    first op (its merge is then exact). With ``max_padding_fraction``, a relocated segment may
    pad its input by at most that fraction of its smallest spatial size (at least 1 pixel): a
    merge whose kernel covers most of the image would change most of its pixels, not a ring.
    Nodes need ``tensor_meta``. ``cache`` (a dict the
    caller keeps) remembers the split of every chain by its node names: pass one only
    across graphs derived from the same traced graph, as the nonlinearity-removal scorer does.
    """
    plan = ChainPlan()
    for chain in element_chains(gm, lambda n: affine_view(n) is not None):
        nodes = _flat_nodes(chain)
        if not any(isinstance(affine_view(n), ConvView) for n in nodes) or len(nodes) < 2:
            continue
        key = (relocate, max_padding_fraction, tuple(n.name for n in nodes))
        if cache is not None and key in cache:
            by_name = {n.name: n for n in nodes}
            for names, reloc, before, after, parts in cache[key]:
                plan.segments.append(Segment(tuple(by_name[x] for x in names), reloc, before, after,
                                             tuple(_from_names(p, by_name) for p in parts)))
        else:
            chosen = _plan_run(cost, chain, relocate, max_padding_fraction)[1]
            plan.segments.extend(chosen)
            if cache is not None:
                cache[key] = [(tuple(n.name for n in seg.nodes), seg.relocated, seg.price_before, seg.price_after,
                               tuple(_names(p) for p in seg.elements)) for seg in chosen]
        if not any(seg.nodes[0] in nodes for seg in plan.segments):
            plan.left.append((" + ".join(n.name for n in nodes), "no merge is cheaper than the ops it replaces"))
    return plan


# ---------------------------------------------------------------- rewriting

def relocate(gm: GraphModule, plan: ChainPlan) -> list[Segment]:
    """Move each planned segment's padding to its first conv, in place, keeping every conv's weights.

    Only segments of ``call_module`` convs are relocated this way (new conv modules with the
    new padding; the old ones, which may be shared with the caller, are untouched). Segments
    that span residual blocks are left as they are: a skip connection fixes the size of the
    tensor it adds to, so their padding moves only when :func:`merge` merges them. Returns
    the segments relocated; :func:`merge` merges them afterwards exactly.
    """
    done = []
    for seg in plan.segments:
        views = [affine_view(n) for n in seg.nodes]
        convs = [v for v in views if isinstance(v, ConvView)]
        if not seg.relocated or seg.elements or any(v.module is None for v in convs):
            continue
        total, stride = None, None
        for v in convs:
            total = tuple(v.padding) if total is None else tuple(p + q * s for p, q, s in zip(total, v.padding, stride))
            stride = tuple(v.stride) if stride is None else tuple(s * t for s, t in zip(stride, v.stride))
        for k, v in enumerate(convs):
            new = _copy_conv(v.module, total if k == 0 else (0,) * len(total))
            name = add_module(gm, readable(v.node.target) + "_relocated", new)
            v.node.target = name
        done.append(seg)
    gm.graph.lint()
    gm.recompile()
    return done


def _copy_conv(module: nn.Module, padding: tuple[int, ...]) -> nn.Module:
    new = type(module)(module.in_channels, module.out_channels, module.kernel_size, stride=module.stride,
                       padding=padding, dilation=module.dilation, groups=module.groups,
                       bias=module.bias is not None, padding_mode=module.padding_mode)
    with torch.no_grad():
        new.weight.copy_(module.weight)
        if module.bias is not None:
            new.bias.copy_(module.bias)
    return new.to(module.weight.dtype)


def _absorb_residual(gm: GraphModule, merged: Node, source: Node, module: nn.Module) -> bool:
    """``source + merged`` (merged = conv(source), same shape, centred kernel) -> one conv."""
    if len(merged.users) != 1:
        return False
    user = next(iter(merged.users))
    add = add_of(user)
    if add is None or add.alpha != 1.0 or add.inplace or {id(a) for a in (add.lhs, add.rhs)} != {id(merged), id(source)}:
        return False
    w = module.weight
    if (module.in_channels != module.out_channels or any(s != 1 for s in module.stride)
            or any(k != 2 * p + 1 for k, p in zip(w.shape[2:], module.padding))):
        return False
    groups = module.groups
    per = module.out_channels // groups
    centre = tuple(p for p in module.padding)
    with torch.no_grad():
        for o in range(module.out_channels):
            w[(o, o % per) + centre] += 1.0
    copy_meta(user, merged)
    user.replace_all_uses_with(merged)
    gm.graph.erase_node(user)
    return True


def merge(gm: GraphModule, plan: ChainPlan, *, absorb_residual: bool = True) -> list[str]:
    """Replace every planned segment of ``gm`` by one computed conv, in place; return the new node names.

    Padding is relocated as part of the merge (a no-op for segments :func:`relocate` already
    moved, or that need none). Recompiles and prunes unused modules.
    """
    names = []
    for seg in plan.segments:
        parts = seg.parts()
        adds = {p.add for p in parts if isinstance(p, Residual)}
        if any(affine_view(n) is None for n in seg.nodes if n not in adds):
            continue
        source = _element_input(parts[0])
        last = _element_output(parts[-1])
        dtype = output_dtype(last) or torch.float32
        module = _to_module(_compose_elements(parts), dtype)
        first = next(n for n in seg.nodes if isinstance(affine_view(n), ConvView))
        target = add_module(gm, readable(first.name) + "_merged", module)
        with gm.graph.inserting_before(last):
            new = gm.graph.call_module(target, (source,))
        copy_meta(last, new)
        if "tensor_meta" in last.meta:
            new.meta["tensor_meta"] = last.meta["tensor_meta"]
        last.replace_all_uses_with(new)
        for node in reversed(seg.nodes):
            gm.graph.erase_node(node)
        whole_chain = source is not None and len(source.users) == 2
        if absorb_residual and whole_chain:
            _absorb_residual(gm, new, source, module)
        names.append(new.name)
    prune_unused(gm)
    return names


@register
class RelocatePadding(Pass):
    """Merge every conv/BN chain that the cost model says is cheaper merged, relocating padding (lossy).

    Options (``context.options``): ``relocate`` (default True; False merges only exactly),
    ``absorb_residual`` (default True). Each merged segment is a decision in the report,
    marked when its padding moved (border pixels then change).
    """

    name = "relocate_padding"
    exact = False
    idempotent = True

    def call(self, gm: GraphModule) -> PassResult:
        from hant.cost_models import get as get_cost_model

        cost = get_cost_model(self.context.cost if self.context.cost is not None else "roofline:cpu")
        plan = plan_chains(gm, cost, relocate=self.context.options.get("relocate", True))
        for site, reason in plan.left:
            self.decide(site, "not_cheaper", reason)
        for seg in plan.segments:
            what = "padding moved to the first conv, border pixels change" if seg.relocated else "exact merge"
            self.decide(" + ".join(n.name for n in seg.nodes), "applied", what, seg.price_before[0],
                        seg.price_after[0])
        if not plan.segments:
            return PassResult(gm, False)
        merge(gm, plan, absorb_residual=self.context.options.get("absorb_residual", True))
        return PassResult(gm, True)
