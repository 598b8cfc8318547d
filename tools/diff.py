"""Before against after: per-node costs and the regions that changed between two graphs.

:func:`diff` prices both graphs with one cost model and matches nodes by name (passes keep
names, or build readable new ones from the nodes they replace). A node is *same* when it
exists in both with the same op and output shape, *changed* when its op or shape differ,
*removed* or *added* otherwise. Nodes are grouped into *regions* by the module that
produced them (``nn_module_stack``, cut to ``depth`` levels: ``features.3``), which pass
surgery keeps on the nodes it builds; a region changed when any of its nodes did.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tabulate import tabulate
from torch.fx import GraphModule

from hant.cost_models import get as get_cost_model
from hant.cost_models.base import CostReport, CostRow
from hant.graphs.networkx_view import module_path

__all__ = ["NodeDiff", "RegionDiff", "GraphDiff", "compare", "diff", "latency_shares"]

ROOT = "(root)"


@dataclass
class NodeDiff:
    """One node name's fate: ``status`` is same | changed | removed | added; latencies None where absent."""
    node: str
    status: str
    op_before: str = ""
    op_after: str = ""
    latency_before_s: float | None = None
    latency_after_s: float | None = None
    region: str = ROOT


@dataclass
class RegionDiff:
    """A module region's node counts and summed node latencies before and after."""
    region: str
    nodes_before: int = 0
    nodes_after: int = 0
    latency_before_s: float = 0.0
    latency_after_s: float = 0.0
    changed: bool = False


@dataclass
class GraphDiff:
    """What :func:`compare` found; ``str()`` gives the changed nodes, the changed regions and the totals."""
    cost_model: str
    nodes: list[NodeDiff] = field(default_factory=list)
    regions: list[RegionDiff] = field(default_factory=list)
    total_before_s: float = 0.0
    total_after_s: float = 0.0

    def table(self, *, all_nodes: bool = False, fmt: str = "simple") -> str:
        """The diff as text (``fmt`` is a tabulate format: ``simple``, ``github``)."""
        us = lambda s: "" if s is None else f"{s * 1e6:.1f}"  # noqa: E731
        rows = [[n.node, n.status, n.op_before, n.op_after, us(n.latency_before_s), us(n.latency_after_s),
                 us((n.latency_after_s or 0.0) - (n.latency_before_s or 0.0))]
                for n in self.nodes if all_nodes or n.status != "same"]
        regions = [[r.region, r.nodes_before, r.nodes_after, us(r.latency_before_s), us(r.latency_after_s),
                    us(r.latency_after_s - r.latency_before_s)] for r in self.regions if r.changed]
        speedup = self.total_before_s / self.total_after_s if self.total_after_s else float("inf")
        counts = {s: sum(n.status == s for n in self.nodes) for s in ("same", "changed", "removed", "added")}
        return "\n".join([
            f"cost model: {self.cost_model}; nodes: " + ", ".join(f"{v} {k}" for k, v in counts.items()),
            "",
            tabulate(rows, ["node", "status", "op before", "op after", "before us", "after us", "delta us"],
                     tablefmt=fmt, disable_numparse=True) if rows else "no node changed",
            "",
            tabulate(regions, ["region", "nodes before", "nodes after", "before us", "after us", "delta us"],
                     tablefmt=fmt, disable_numparse=True) if regions else "no region changed",
            "",
            f"total latency: {self.total_before_s * 1e6:.1f} us -> {self.total_after_s * 1e6:.1f} us "
            f"({speedup:.3f}x)",
        ])

    def __str__(self) -> str:
        return self.table()


def _region(node, depth: int) -> str:
    path = module_path(node)
    return ".".join(path.split(".")[:depth]) if path else ROOT


def _rows(report: CostReport) -> dict[str, CostRow]:
    return {row.node: row for row in report.rows}


def compare(gm_a: GraphModule, gm_b: GraphModule, cost: Any = "roofline:cpu", *, depth: int = 2) -> GraphDiff:
    """Price both graphs (traced, with shapes in meta) with ``cost`` and match their nodes by name."""
    model = get_cost_model(cost)
    report_a, report_b = model.graph_cost(gm_a), model.graph_cost(gm_b)
    rows_a, rows_b = _rows(report_a), _rows(report_b)
    nodes_a = {n.name: n for n in gm_a.graph.nodes if n.name in rows_a}
    nodes_b = {n.name: n for n in gm_b.graph.nodes if n.name in rows_b}
    result = GraphDiff(getattr(model, "name", type(model).__name__), total_before_s=report_a.latency_s,
                       total_after_s=report_b.latency_s)
    regions: dict[str, RegionDiff] = {}
    names = list(nodes_a) + [n for n in nodes_b if n not in nodes_a]
    for name in names:
        a, b = rows_a.get(name), rows_b.get(name)
        if a is not None and b is not None:
            status = "same" if (a.target, a.output_shape) == (b.target, b.output_shape) else "changed"
        else:
            status = "removed" if b is None else "added"
        region = _region(nodes_a[name] if a is not None else nodes_b[name], depth)
        entry = NodeDiff(name, status, a.target if a else "", b.target if b else "",
                         a.cost.latency_s if a else None, b.cost.latency_s if b else None, region)
        result.nodes.append(entry)
        r = regions.setdefault(region, RegionDiff(region))
        if a is not None:
            r.nodes_before += 1
            r.latency_before_s += a.cost.latency_s
        if b is not None:
            r.nodes_after += 1
            r.latency_after_s += b.cost.latency_s
        r.changed = r.changed or status != "same"
    result.regions = list(regions.values())
    return result


def diff(gm_a: GraphModule, gm_b: GraphModule, cost: Any = "roofline:cpu", *, all_nodes: bool = False,
         depth: int = 2) -> str:
    """:func:`compare` as a table string: changed nodes (every node with ``all_nodes``), changed regions, totals."""
    return compare(gm_a, gm_b, cost, depth=depth).table(all_nodes=all_nodes)


def latency_shares(report: CostReport) -> dict[str, float]:
    """Node name -> its fraction of the summed node latencies of ``report`` (for ``draw(..., shares=)``)."""
    total = sum(row.cost.latency_s for row in report.rows)
    return {row.node: row.cost.latency_s / total for row in report.rows} if total > 0 else {}
