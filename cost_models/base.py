"""Cost, CostReport, the CostModel protocol and the spec registry.

A cost model is any object with ``name``, ``node_cost(node) -> Cost`` and
``graph_cost(gm) -> CostReport``. Built-in and user models are found by spec string
through :func:`get`: the part before the first ``:`` picks the factory, the rest is its
argument (``"flops"``, ``"roofline:cpu"``, ``"measured:cpu-onnxruntime"``, ``"learned:p.pt"``).
"""

from __future__ import annotations

import contextlib
import gc
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Protocol, runtime_checkable

from torch.fx import GraphModule, Node

from hant.errors import CostModelError
from hant.graphs.ops import graph_unchanged, module_of, op_kind, output_shape

__all__ = ["Cost", "CostRow", "CostReport", "CostModel", "NodeSumCostModel", "GraphPricedModel", "target_name",
           "register", "get", "available", "COMPUTE_SKIP_KINDS", "collector_paused"]


@dataclass(frozen=True)
class Cost:
    """The price of one op or graph. ``latency_s`` is seconds; counts are per inference."""
    latency_s: float = 0.0
    macs: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    params: int = 0

    @property
    def bytes(self) -> int:
        return self.bytes_read + self.bytes_written

    @property
    def arithmetic_intensity(self) -> float:
        """MACs per byte moved (0 when nothing moves)."""
        return self.macs / self.bytes if self.bytes else 0.0

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.latency_s + other.latency_s, self.macs + other.macs, self.bytes_read + other.bytes_read,
                    self.bytes_written + other.bytes_written, self.params + other.params)


@dataclass(frozen=True)
class CostRow:
    """One node's line in a report."""
    node: str
    kind: str                       # op_kind of the node
    target: str                     # readable op name, e.g. "Conv2d" or "aten.conv2d"
    input_shapes: tuple
    output_shape: tuple | None
    cost: Cost


@dataclass
class CostReport:
    """Per-node rows plus a total. ``total`` is the sum of rows unless the model measured
    the graph whole (then ``total.latency_s`` is the whole-graph figure and
    ``rows_latency_s`` keeps the per-node sum, so the fusion effect can be seen)."""
    model: str
    rows: list[CostRow] = field(default_factory=list)
    total: Cost = field(default_factory=Cost)
    notes: list[str] = field(default_factory=list)

    @property
    def latency_s(self) -> float:
        return self.total.latency_s

    @property
    def rows_latency_s(self) -> float:
        return sum(r.cost.latency_s for r in self.rows)

    @classmethod
    def from_rows(cls, model: str, rows: Iterable[CostRow], notes: Iterable[str] = ()) -> "CostReport":
        rows = list(rows)
        total = Cost()
        for r in rows:
            total = total + r.cost
        return cls(model, rows, total, list(notes))

    def with_total_latency(self, latency_s: float) -> "CostReport":
        """A copy whose total latency is a whole-graph measurement."""
        return CostReport(self.model, list(self.rows), replace(self.total, latency_s=latency_s), list(self.notes))

    @staticmethod
    def deferred(model: str, make_rows: Callable[[], list[CostRow]], total: Cost,
                 notes: Iterable[str] = ()) -> "CostReport":
        """A report whose rows ``make_rows()`` builds when they are first read: a model that prices a
        graph whole has its total before its per-node breakdown, and ranking passes read only totals.
        ``make_rows`` must read only what was fixed when the report was made (never the graph itself,
        which may be edited afterwards)."""
        return _DeferredRowsReport(model, None, total, list(notes), make_rows=make_rows)


class _DeferredRowsReport(CostReport):
    """A :class:`CostReport` whose rows are built on first read (:meth:`CostReport.deferred`); it compares,
    copies and pickles as the plain report of the same rows."""

    def __init__(self, model: str, rows: list[CostRow] | None = None, total: Cost | None = None,
                 notes: list[str] | None = None, *, make_rows: Callable[[], list[CostRow]] | None = None):
        super().__init__(model, rows if rows is not None else [], total if total is not None else Cost(),
                         notes if notes is not None else [])
        self._make_rows = make_rows if rows is None else None

    @property
    def rows(self) -> list[CostRow]:
        if self._make_rows is not None:
            self._rows, self._make_rows = self._make_rows(), None
        return self._rows

    @rows.setter
    def rows(self, value: list[CostRow]) -> None:
        self._rows, self._make_rows = value, None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CostReport):
            return NotImplemented
        return (self.model, self.rows, self.total, self.notes) == (other.model, other.rows, other.total, other.notes)

    def __reduce__(self):
        return CostReport, (self.model, self.rows, self.total, self.notes)


@runtime_checkable
class CostModel(Protocol):
    name: str

    def node_cost(self, node: Node) -> Cost: ...

    def graph_cost(self, gm: GraphModule) -> CostReport: ...


@contextlib.contextmanager
def collector_paused():
    """Pause Python's cyclic garbage collector for a short walk that allocates many small objects.

    Pricing a graph for the first time builds tens of thousands of short-lived, acyclic objects
    (views, tuples, report rows) that reference counting frees. Each batch of allocations would
    otherwise trigger a collector pass, and the oldest-generation passes walk every live object
    of the process (a network's modules and tensors, its graphs): on a 1,000-node graph that
    was a third of the call. The collector is restored afterwards; what stays alive is
    collected by its next pass as usual.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


# Nodes that are bookkeeping, not work: they get no row in a report.
COMPUTE_SKIP_KINDS = frozenset({"placeholder", "output", "get_attr"})


def target_name(node: Node) -> str:
    """A readable name of what ``node`` calls: the module class, ``Tensor.method``, the
    function's name or ``aten.op``."""
    if node.op == "call_module":
        return type(module_of(node)).__name__
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    target = node.target
    name = getattr(target, "__name__", None) or str(target)
    if hasattr(target, "_overloadpacket"):
        return f"aten.{target._overloadpacket.__name__}"
    return name


def _input_shapes(node: Node) -> tuple:
    return tuple(tuple(output_shape(a)) for a in node.all_input_nodes
                 if a.op != "get_attr" and output_shape(a) is not None)


class NodeSumCostModel:
    """Base for models whose graph cost is the sum of per-node costs.

    Subclasses set ``name`` and implement ``node_cost``. Nodes must carry ``tensor_meta``
    (``hant.trace`` and the PassManager see to that).
    """
    name = "abstract"

    def node_cost(self, node: Node) -> Cost:  # pragma: no cover - abstract
        raise NotImplementedError

    def row(self, node: Node) -> CostRow:
        shape = output_shape(node)
        return CostRow(node.name, op_kind(node), target_name(node), _input_shapes(node),
                       tuple(shape) if shape is not None else None, self.node_cost(node))

    def graph_cost(self, gm: GraphModule) -> CostReport:
        with graph_unchanged():  # each node is classified once, however many views ask
            rows = [self.row(n) for n in gm.graph.nodes if n.op not in COMPUTE_SKIP_KINDS]
        return CostReport.from_rows(self.name, rows)


class GraphPricedModel:
    """Base for models that price a graph as a whole (a node's cost depends on its neighbours).

    Subclasses set ``name`` and implement ``graph_cost``; ``node_cost`` is the node's row in
    its own graph's report, computed once per graph state (module, graph and node names) and
    reused until the graph changes.
    """
    name = "abstract"

    def graph_cost(self, gm: GraphModule) -> CostReport:  # pragma: no cover - abstract
        raise NotImplementedError

    def node_cost(self, node: Node) -> Cost:
        gm = node.graph.owning_module
        key = (id(gm), id(node.graph), tuple(n.name for n in node.graph.nodes))
        cached = getattr(self, "_node_costs", None)
        if cached is None or cached[0] != key:
            cached = (key, {r.node: r.cost for r in self.graph_cost(gm).rows})
            self._node_costs = cached
        cost = cached[1].get(node.name)
        if cost is None:
            raise CostModelError(f"node {node.name!r} is not a compute node; it has no cost")
        return cost


_FACTORIES: dict[str, tuple[Callable[[str | None], CostModel], str]] = {}


def register(prefix: str, factory: Callable[[str | None], CostModel], help: str = "") -> None:
    """Make ``factory(argument)`` answer specs ``prefix`` and ``prefix:argument``.

    ``help`` is a one-line description shown in error messages and ``available()``.
    Registering a prefix again replaces the earlier factory.
    """
    _FACTORIES[prefix] = (factory, help)


def available() -> dict[str, str]:
    """Registered spec prefixes and their help lines."""
    return {k: v[1] for k, v in sorted(_FACTORIES.items())}


def get(spec: str | CostModel) -> CostModel:
    """The cost model a spec names (an object with the protocol's methods passes through).

    Raises :class:`CostModelError`, listing the known specs, when the prefix is unknown;
    factories raise it themselves for a bad argument.
    """
    if not isinstance(spec, str):
        if hasattr(spec, "node_cost") and hasattr(spec, "graph_cost"):
            return spec
        raise CostModelError(f"a cost model must be a spec string or have node_cost/graph_cost, got {spec!r}")
    prefix, _, argument = spec.partition(":")
    if prefix not in _FACTORIES:
        known = "; ".join(f"{k} ({h})" if h else k for k, h in available().items())
        raise CostModelError(f"unknown cost model {spec!r}; known: {known}")
    return _FACTORIES[prefix][0](argument or None)
