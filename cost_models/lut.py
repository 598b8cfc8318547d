"""``lut:DEVICE-RUNTIME``: a lookup table over the latency store (FBNet / ProxylessNAS style).

A node's latency is the stored latency of its op signature (see
:func:`hant.cost_models.measured.op_signature`) measured on this runtime, thread count and
device fingerprint (any runtime version, the newest row winning); the graph's latency is the
sum over its nodes. Nothing is timed.

Signatures the store has not seen are priced by the ``roofline`` model, calibrated on the
same store's ``calibration_samples`` for this runtime and device (or, when it holds too few,
the uncalibrated preset); the report's notes say how many ops were priced that way and how.

Spec: ``lut:cpu-onnxruntime`` (default), ``lut:cpu-torch``, ``lut:cuda-torch``, with options
``,threads=N`` and ``,db=PATH``. Fill the table with ``measured:...`` or ``hant profile``.
"""

from __future__ import annotations

from torch.fx import GraphModule, Node

from hant.cost_models.base import COMPUTE_SKIP_KINDS, Cost, CostReport, CostRow, NodeSumCostModel, register
from hant.cost_models.flops import FlopsModel
from hant.cost_models.measured import is_free, op_signature, parse_spec
from hant.cost_models.roofline import DEVICE_PRESETS, RooflineModel
from hant.cost_models.store import LatencyStore, canonical_json
from hant.cost_models.timing import runtime_for
from hant.errors import CostModelError
from hant.graphs.ops import graph_unchanged

__all__ = ["LutModel"]


class LutModel(NodeSumCostModel):
    """Latency by table lookup, roofline for misses; see the module docstring.

    The table is read once, when the model is made: build a new model to see newer rows.
    """

    def __init__(self, device: str = "cpu", runtime: str = "onnxruntime", *, threads: int | None = None,
                 store: LatencyStore | str | None = None):
        self.name = f"lut:{device}-{runtime}"
        self.key = runtime_for(device, runtime, threads).key
        self.store = store if isinstance(store, LatencyStore) else LatencyStore(store)
        self.table: dict[str, float] = {
            canonical_json(r.signature): r.latency_s
            for r in self.store.ops(runtime=self.key.runtime, device=self.key.device, threads=self.key.threads)}
        self.roofline, self.fallback = self._fallback(device)
        self._counts = FlopsModel()

    def _fallback(self, device: str) -> tuple[RooflineModel, str]:
        """The roofline for misses and a phrase saying how it was set."""
        gpu = self.key.device.rsplit(" | ", 1)[-1].lower() if device == "cuda" else ""
        preset = "cpu" if device == "cpu" else next((p for p in DEVICE_PRESETS if p in gpu), "a100")
        model = RooflineModel(preset)
        try:
            summary = model.calibrate(self.store.calibration_samples(
                runtime=self.key.runtime, device=self.key.device, threads=self.key.threads))
        except CostModelError as exc:
            return model, f"the uncalibrated roofline:{preset} preset ({exc})"
        return model, (f"roofline:{preset} calibrated on {summary.samples} stored op measurements "
                       f"(MAPE {summary.mape_after:.0%})")

    def lookup(self, node: Node) -> float | None:
        """The stored latency of the node's op, 0 for free nodes, None when the table lacks it."""
        if is_free(node):
            return 0.0
        signature = op_signature(node)
        return self.table.get(canonical_json(signature)) if signature is not None else None

    def node_cost(self, node: Node) -> Cost:
        """Flops-model counts with the table's latency, or the roofline's on a miss."""
        counted = self._counts.node_cost(node)
        latency = self.lookup(node)
        if latency is None:
            latency = self.roofline.node_cost(node).latency_s
        return Cost(latency, counted.macs, counted.bytes_read, counted.bytes_written, counted.params)

    def graph_cost(self, gm: GraphModule) -> CostReport:
        """Sum of node costs; notes count table hits and name the ops the roofline priced."""
        rows, missed = [], []
        with graph_unchanged():  # each node is classified once, however many views ask
            for node in gm.graph.nodes:
                if node.op in COMPUTE_SKIP_KINDS:
                    continue
                row = self._counts.row(node)
                latency = self.lookup(node)
                if latency is None:
                    missed.append(f"{node.name} ({row.kind})")
                    latency = self.roofline.node_cost(node).latency_s
                rows.append(CostRow(row.node, row.kind, row.target, row.input_shapes, row.output_shape,
                                    Cost(latency, row.cost.macs, row.cost.bytes_read, row.cost.bytes_written,
                                         row.cost.params)))
        notes = [f"table: {len(self.table)} ops in {self.store.path} for {self.key.runtime}, "
                 f"{self.key.threads} thread(s), on {self.key.device}"]
        if missed:
            shown = ", ".join(missed[:8]) + (f", ... ({len(missed) - 8} more)" if len(missed) > 8 else "")
            notes.append(f"{len(missed)} of {len(rows)} ops not in the table, priced by {self.fallback}: {shown}")
        else:
            notes.append(f"all {len(rows)} ops found in the table")
        return CostReport.from_rows(self.name, rows, notes)


register("lut", lambda argument: LutModel(**parse_spec(argument, "lut", ("threads", "db"))),
         "lookup table over the latency store, roofline for unseen ops: lut:cpu-onnxruntime | cpu-torch | cuda-torch")
