"""Trained predictors: the saved file, batched prediction, and the ``learned:PATH`` cost model.

A predictor file (``torch.save`` of plain tensors and lists, loaded with
``weights_only=True``) holds:

* ``kind``: ``"gnn"`` (:class:`~hant.cost_models.learned.gnn.GraphNet`) or ``"perop"``
  (:class:`~hant.cost_models.learned.perop.PerOpNet`), and ``config``, the architecture
  (sizes, fusion profile); a ``"kernel"`` file holds a
  :class:`~hant.cost_models.learned.kernel_model.KernelPredictor` instead (its own fields) and
  loads as :class:`~hant.cost_models.learned.kernel_model.KernelCostModel`;
* ``x_mean`` / ``x_std``: the normalisation of the input rows, and ``scale``: seconds per
  unit of the network's output;
* ``state_dict``: the weights; ``device``: the device vector of a transferred predictor;
* ``metadata``: what it was trained on, how, and its held-out metrics.
"""

from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
import torch

from hant.cost_models.base import Cost, CostReport, CostRow, GraphPricedModel, collector_paused, register, target_name
from hant.cost_models.learned.features import (
    FEATURE_NAMES, FEATURE_VERSION, GraphFeatures, batch_graphs, featurize_with_counts,
)
from hant.cost_models.learned.gnn import GraphNet, compress
from hant.cost_models.learned.perop import FUSION_PROFILES, PerOpNet, group_features
from hant.errors import CostModelError
from hant.graphs.ops import graph_unchanged, op_kind

__all__ = ["Predictor", "LearnedCostModel", "load_predictor", "MODEL_KINDS"]

MODEL_KINDS = ("gnn", "perop")
_FORMAT = "hant-learned-predictor"


class Predictor:
    """A trained latency predictor over :class:`GraphFeatures` (see the module docstring).

    Predictions are in seconds. ``device`` is the device vector the head sees (transfer
    predictors only).
    """

    def __init__(self, kind: str, config: dict, net: torch.nn.Module, x_mean: torch.Tensor, x_std: torch.Tensor,
                 scale: float, metadata: dict | None = None, device: torch.Tensor | None = None):
        if kind not in MODEL_KINDS:
            raise CostModelError(f"unknown learned model {kind!r}; use one of {', '.join(MODEL_KINDS)}")
        self.kind, self.config, self.net = kind, dict(config), net.eval()
        self.x_mean, self.x_std, self.scale = x_mean.float(), x_std.float(), float(scale)
        self.metadata = dict(metadata or {})
        self.device = device

    @staticmethod
    def build_net(kind: str, config: dict) -> torch.nn.Module:
        """A fresh, untrained network of ``kind`` with ``config``."""
        if kind == "gnn":
            return GraphNet(len(FEATURE_NAMES), config["hidden"], config["layers"], config.get("device_dim", 0))
        if config.get("fusion") not in FUSION_PROFILES:
            raise CostModelError(f"unknown fusion profile {config.get('fusion')!r}; use one of {FUSION_PROFILES}")
        return PerOpNet(hidden=config["hidden"])

    # ------------------------------------------------------------ inputs

    def rows(self, graph: GraphFeatures) -> tuple[np.ndarray, np.ndarray | None]:
        """The rows the network reads for one graph (node rows, or kernel rows and their first node)."""
        if self.kind == "gnn":
            return graph.x, None
        return group_features(graph, self.config["fusion"])

    def inputs(self, graphs: list[GraphFeatures]) -> dict:
        """Normalised batch tensors for the network, for a list of graphs."""
        if self.kind == "gnn":
            x, edges, graph = batch_graphs(graphs)
            plan = compress(x, edges, self.net.config["layers"])
            plan["rows"] = (plan["rows"] - self.x_mean) / self.x_std
            return {"plan": plan, "graph": graph, "num_graphs": len(graphs)}
        parts = [self.rows(g)[0] for g in graphs]
        rows, inverse = np.unique(np.concatenate(parts), axis=0, return_inverse=True)
        graph = torch.from_numpy(np.repeat(np.arange(len(parts)), [len(p) for p in parts]))
        return {"rows": (torch.from_numpy(rows) - self.x_mean) / self.x_std, "kernel": torch.from_numpy(inverse.reshape(-1)),
                "graph": graph, "num_graphs": len(graphs)}

    def forward(self, batch: dict, device: torch.Tensor | None = None) -> torch.Tensor:
        """Network output (units of ``scale``) for a batch from :meth:`inputs`."""
        if self.kind == "gnn":
            return self.net(None, None, batch["graph"], batch["num_graphs"],
                            device if device is not None else self.device, plan=batch["plan"])
        return self.net(batch["rows"], batch["kernel"], batch["graph"], batch["num_graphs"])

    # ------------------------------------------------------------ prediction

    @torch.no_grad()
    def predict(self, graphs: list[GraphFeatures], batch_size: int = 512) -> np.ndarray:
        """Latency in seconds of each graph."""
        out = [self.forward(self.inputs(graphs[i:i + batch_size])).double().numpy()
               for i in range(0, len(graphs), batch_size)]
        return np.concatenate(out) * self.scale if out else np.zeros(0)

    @torch.no_grad()
    def node_latencies(self, graph: GraphFeatures) -> tuple[np.ndarray, float]:
        """(seconds attributed to each row of ``graph``, seconds not tied to any node)."""
        if self.kind == "gnn":
            x, edges, _ = batch_graphs([graph])
            h = self.net.node_states((x - self.x_mean) / self.x_std, edges)
            shares = self.net.node_shares(h, self.device).double().numpy()
            return shares * self.scale, 0.0
        kernel_rows, anchors = self.rows(graph)
        shares = np.zeros(graph.num_nodes)
        normalised = (torch.from_numpy(kernel_rows) - self.x_mean) / self.x_std
        shares[anchors] = self.net.kernel_shares(normalised).double().numpy()
        return shares * self.scale, float(self.net.constant()) * self.scale

    # ------------------------------------------------------------ files

    def save(self, path: str | os.PathLike) -> None:
        """Write the predictor file (see the module docstring); the folder must exist."""
        state = {
            "format": _FORMAT, "version": 1, "feature_version": FEATURE_VERSION, "feature_names": list(FEATURE_NAMES),
            "kind": self.kind, "config": self.config, "x_mean": self.x_mean, "x_std": self.x_std,
            "scale": self.scale, "state_dict": self.net.state_dict(), "metadata": self.metadata,
            "device": self.device,
        }
        torch.save(state, os.fspath(path))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Predictor":
        """Read a predictor file (a :class:`~hant.cost_models.learned.kernel_model.KernelPredictor` for
        ``kind: "kernel"``). Raises :class:`CostModelError` when it is missing or not one."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise CostModelError(f"no predictor file at {path!r}; train one with `hant fit` or "
                                 "hant.cost_models.learned.fit_table / fit_db")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CostModelError(f"{path!r} is not a readable predictor file ({type(exc).__name__}: {exc}); "
                                 "train one with `hant fit`") from exc
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            raise CostModelError(f"{path!r} is not a hant predictor file; train one with `hant fit`")
        if state.get("kind") == "kernel":
            from hant.cost_models.learned.kernel_model import KernelPredictor
            return KernelPredictor.from_state(state, path)
        if state.get("feature_version") != FEATURE_VERSION or state.get("feature_names") != list(FEATURE_NAMES):
            raise CostModelError(f"{path!r} was trained on other node features (version "
                                 f"{state.get('feature_version')}, this hant uses {FEATURE_VERSION}); train it again")
        try:
            net = cls.build_net(state["kind"], state["config"])
            net.load_state_dict(state["state_dict"])
            return cls(state["kind"], state["config"], net, state["x_mean"], state["x_std"], state["scale"],
                       state["metadata"], state.get("device"))
        except CostModelError:
            raise
        except Exception as exc:
            raise CostModelError(f"{path!r} is a damaged predictor file ({type(exc).__name__}: {exc}); "
                                 "train it again") from exc


class LearnedCostModel(GraphPricedModel):
    """``learned:PATH``: a trained predictor as a cost model.

    ``graph_cost`` featurises the graph once and reports each node's share of the predicted
    latency beside the ``flops`` counts the features were made from; the total is the
    network's prediction (node shares plus any constant overhead). The rows are built when
    first read (ranking passes read only totals), from what the graph was when priced.
    ``node_cost`` is a node's share within its own graph (the prediction depends on the
    node's neighbourhood), computed once per graph and reused until the graph changes.
    """

    def __init__(self, predictor: Predictor, name: str = "learned"):
        from hant.cost_models.flops import FlopsModel
        self.predictor, self.name = predictor, name
        self._counts = FlopsModel()

    def graph_cost(self, gm) -> CostReport:
        with collector_paused(), graph_unchanged():   # a read-only walk: each node is classified once
            graph, nodes, counts = featurize_with_counts(gm)
            # what the rows need, fixed now (the graph may change before they are read), naming no node
            facts = []
            for node, cost in zip(nodes, counts):
                if node.op == "placeholder":
                    continue
                if cost is None:                       # a node without shapes: its parameters only
                    cost = self._counts.node_cost(node)
                inputs = tuple(a.meta.get("tensor_meta") for a in node.all_input_nodes if a.op != "get_attr")
                facts.append((node.name, op_kind(node), target_name(node), inputs, node.meta.get("tensor_meta"),
                              cost))
        shares, constant = self.predictor.node_latencies(graph)
        share_of = dict(zip(graph.names, shares.tolist()))
        macs = read = written = params = 0
        rows_s = 0.0
        for name, _, _, _, _, cost in facts:
            macs, read, written, params = (macs + cost.macs, read + cost.bytes_read, written + cost.bytes_written,
                                           params + cost.params)
            rows_s += share_of.get(name, 0.0)
        total = float(shares.sum()) + constant

        def make_rows() -> list[CostRow]:
            rows = []
            for name, kind, target, inputs, meta, cost in facts:
                shapes = tuple(tuple(m.shape) for m in inputs if getattr(m, "shape", None) is not None)
                shape = getattr(meta, "shape", None)
                rows.append(CostRow(name, kind, target, shapes, tuple(shape) if shape is not None else None,
                                    replace(cost, latency_s=share_of.get(name, 0.0))))
            return rows
        notes = [f"predicted by a {self.predictor.kind} predictor; the total includes "
                 f"{(total - rows_s) * 1e3:.4g} ms not tied to any node"]
        return CostReport.deferred(self.name, make_rows, Cost(total, macs, read, written, params), notes)


_LOADED: dict[tuple[str, float], Predictor] = {}


def load_predictor(path: str | os.PathLike) -> Predictor:
    """:meth:`Predictor.load`, cached by path and modification time."""
    path = os.path.abspath(os.fspath(path))
    key = (path, os.path.getmtime(path) if os.path.isfile(path) else -1.0)
    if key not in _LOADED:
        _LOADED[key] = Predictor.load(path)
    return _LOADED[key]


def _factory(argument: str | None):
    if not argument:
        raise CostModelError("the learned cost model needs a predictor file: learned:PATH (train one with `hant fit`)")
    predictor = load_predictor(argument)
    if getattr(predictor, "kind", None) == "kernel":
        from hant.cost_models.learned.kernel_model import KernelCostModel
        return KernelCostModel(predictor, f"learned:{argument}")
    return LearnedCostModel(predictor, f"learned:{argument}")


register("learned", _factory, "a trained predictor file, learned:PATH (train it with `hant fit`)")
