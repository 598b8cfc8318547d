"""``hant.inspect``: where the time goes in a traced graph, one row per compute node.

The numbers come from a cost model (:func:`hant.cost_models.get`); this module only
selects, orders and formats them. Formats: ``table`` and ``markdown`` (tabulate, with
human units), ``csv`` and ``json`` (raw numbers: counts, bytes, seconds).
"""

from __future__ import annotations

import csv
import io
import json

from tabulate import tabulate
from torch.fx import GraphModule

from hant.cost_models import CostModel, CostReport, CostRow, get
from hant.errors import InputError
from hant.graphs import tensor_meta

__all__ = ["inspect", "inspect_rows", "FORMATS"]

FORMATS = ("table", "markdown", "csv", "json")

# Rows of these kinds that cost nothing at all are bookkeeping (views, eval dropout), not compute.
_FREE_KINDS = frozenset({"shape", "identity"})

_FIELDS = ("node", "kind", "op", "input_shapes", "output_shape", "params", "macs", "bytes", "intensity",
           "latency_s", "share")


def _compute_rows(gm: GraphModule, report: CostReport) -> list[CostRow]:
    """The report's rows of nodes that compute tensors, in report order.

    Left out: nodes with no tensor output (size arithmetic, shape asserts of exported graphs)
    and views or identities that cost nothing (``flatten``, dropout in eval).
    """
    makes_tensor = {n.name for n in gm.graph.nodes if tensor_meta(n) is not None}
    return [r for r in report.rows if r.node in makes_tensor
            and not (r.kind in _FREE_KINDS and r.cost.latency_s == 0 and r.cost.macs == 0 and r.cost.bytes == 0)]


def _check_traced(gm: GraphModule) -> None:
    if not isinstance(gm, GraphModule):
        raise InputError(f"hant.inspect takes a traced GraphModule, got {type(gm).__name__}; "
                         "trace the model first: gm = hant.trace(model, example_inputs)")
    if not any(tensor_meta(node) is not None for node in gm.graph.nodes):
        raise InputError("the graph has no shape information; trace with gm = hant.trace(model, example_inputs) "
                         "or run hant.graphs.propagate_shapes(gm, example_inputs) first")


def inspect_rows(gm: GraphModule, cost: str | CostModel = "roofline:cpu",
                 top: int | None = None) -> tuple[list[CostRow], CostReport]:
    """The compute rows that :func:`inspect` shows, and the cost model's whole report.

    Rows are in graph order, or with ``top=N`` the N with the highest latency, highest
    first; equal latencies (a counting model such as ``flops`` gives none) are ranked by MACs. Nodes that make no tensor, and views and identities that
    cost nothing, get no row.
    """
    if top is not None and (isinstance(top, bool) or not isinstance(top, int) or top < 1):
        raise InputError(f"top must be a positive integer or None, got {top!r}")
    _check_traced(gm)
    report = get(cost).graph_cost(gm)
    rows = _compute_rows(gm, report)
    if top is not None:
        # sorted() is stable: full ties keep graph order
        rows = sorted(rows, key=lambda r: (-r.cost.latency_s, -r.cost.macs))[:top]
    return rows, report


def _shape(shape) -> str:
    return "x".join(str(s) for s in shape) if shape is not None else "?"


def _shapes(row: CostRow) -> str:
    return f"{', '.join(_shape(s) for s in row.input_shapes) or '-'} -> {_shape(row.output_shape)}"


def _si(value: float) -> str:
    """1234567 -> '1.23M'; plain integers below 1000."""
    for factor, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= factor:
            return f"{value / factor:.3g}{suffix}"
    return f"{value:g}"


def _seconds(value: float) -> str:
    for factor, unit in ((1.0, "s"), (1e-3, "ms"), (1e-6, "us")):
        if value >= factor:
            return f"{value / factor:.3g} {unit}"
    return f"{value / 1e-9:.3g} ns" if value else "0"


def _human(rec: dict) -> list[str]:
    """The numeric columns of a table row, in human units."""
    return [_si(rec["params"]), _si(rec["macs"]), _si(rec["bytes"]), f"{rec['intensity']:.3g}",
            _seconds(rec["latency_s"]), f"{100 * rec['share']:.1f}"]


def _record(name: str, kind: str, op: str, input_shapes, output_shape, cost, share: float) -> dict:
    return {"node": name, "kind": kind, "op": op,
            "input_shapes": [list(s) for s in input_shapes],
            "output_shape": list(output_shape) if output_shape is not None else None,
            "params": cost.params, "macs": cost.macs, "bytes": cost.bytes,
            "intensity": cost.arithmetic_intensity, "latency_s": cost.latency_s, "share": share}


def inspect(gm: GraphModule, cost: str | CostModel = "roofline:cpu", top: int | None = None,
            format: str = "table") -> str:
    """A report of ``gm``'s cost, node by node, as text in ``format``.

    ``gm`` is a GraphModule with shapes in ``node.meta`` (what :func:`hant.trace` returns);
    ``cost`` is a cost-model spec (``"flops"``, ``"roofline:cpu"``, ...) or a cost-model object.
    One row per compute node: name, op, input -> output shapes, params, MACs, bytes moved,
    arithmetic intensity (MACs per byte), latency and its share of the total latency.
    Rows follow graph order, or with ``top=N`` are the N slowest, slowest first (by MACs
    where latencies tie). The last row
    is the cost model's total over the whole graph (every node, not only the rows shown); when
    the cost model timed the graph whole, that total latency is the measured figure.

    ``format``: ``"table"`` or ``"markdown"`` (human units, a heading line and the cost
    model's notes), ``"csv"`` (a header then one line per row, the total last, raw numbers)
    or ``"json"`` (``{"cost_model", "compute_nodes", "rows", "total", "notes"}``, raw numbers).

    Raises :class:`InputError` for an untraced graph, a bad ``top`` or ``format``, and
    :class:`CostModelError` for an unknown cost model.
    """
    if format not in FORMATS:
        raise InputError(f"unknown format {format!r}; use one of {', '.join(FORMATS)}")
    rows, report = inspect_rows(gm, cost, top)
    total_s = report.total.latency_s
    records = [_record(r.node, r.kind, r.target, r.input_shapes, r.output_shape, r.cost,
                       r.cost.latency_s / total_s if total_s else 0.0) for r in rows]
    n_compute = len(_compute_rows(gm, report))
    total = _record("total", "", "", (), None, report.total, 1.0 if total_s else 0.0)

    if format == "json":
        totals = {k: total[k] for k in ("params", "macs", "bytes", "intensity", "latency_s")}
        return json.dumps({"cost_model": report.model, "compute_nodes": n_compute, "rows": records,
                           "total": totals, "notes": list(report.notes)}, indent=1)
    if format == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=_FIELDS, lineterminator="\n")
        writer.writeheader()
        for rec in records + [total]:
            writer.writerow({**rec,
                             "input_shapes": ";".join(_shape(s) for s in rec["input_shapes"]),
                             "output_shape": _shape(rec["output_shape"]) if rec["output_shape"] else ""})
        return out.getvalue().rstrip("\n")

    headers = ["node", "op", "input -> output", "params", "MACs", "bytes", "MACs/B", "latency", "%"]
    table = [[rec["node"], rec["op"], _shapes(row)] + _human(rec) for rec, row in zip(records, rows)]
    table.append([f"total ({n_compute} nodes)", "", ""] + _human(total))
    fmt = "github" if format == "markdown" else "simple"
    heading = f"cost model: {report.model}" + (f", top {len(rows)} of {n_compute} nodes by latency" if top else "")
    lines = [heading, "", tabulate(table, headers, tablefmt=fmt, disable_numparse=True,
                                   colalign=("left",) * 3 + ("right",) * 6)]
    if report.notes:
        lines += [""] + [f"note: {n}" for n in report.notes]
    return "\n".join(lines)
