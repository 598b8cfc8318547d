"""The kernel-level predictor: an MLP over kernels timed alone, summed over a network's kernels.

nn-Meter's recipe on hant's graphs:

1. kernels (:mod:`hant.cost_models.learned.kernels`) are timed alone, thousands of them;
2. :class:`KernelNet`, a plain PyTorch MLP, learns log latency from a kernel's features
   (:data:`~hant.cost_models.learned.kernels.KERNEL_FEATURES`);
3. a network is the sum of its kernels, corrected for what isolation gets wrong, with terms
   measured on onnxruntime's own per-node profiles (``benchmarks/cost_models.py --stage
   diagnose``):

   * a kernel timed alone pays a whole ``session.run`` and, when onnxruntime runs it in its
     blocked NCHWc layout, a conversion of its input and output (``ReorderInput`` /
     ``ReorderOutput``); inside a network those conversions happen only where the layout
     changes (squeeze-excite multiplies, shuffles, splits, unaligned channels), which
     :func:`~hant.cost_models.learned.kernels.layout_reorders` finds as onnxruntime does;
   * a convolution + HardSwish timed alone runs the HardSwish as two more nodes (onnxruntime
     fuses it only when it is not the graph's output);
   * a kernel timed alone runs with its weights in cache; inside a network the other kernels
     have evicted them, so every weight byte is read from memory again.

   The correction is linear in named network terms (:data:`CALIBRATION_TERMS`: the kernels'
   sum, their count, a constant, reorder elements and count inside the network, the nodes the
   kernels run only alone and the elements they pass over, weight elements), fitted on whole-network measurements
   (:meth:`KernelPredictor.calibrate`); :func:`select_terms` picks the set of terms by
   cross-validation on the calibration networks.

Kernels and networks are both taken at their fastest timing block (``Spread.min_s``): on a
shared machine the median of a short run includes waiting for a core, the minimum does not.

:class:`KernelPredictor` is saved in the same predictor-file format as the other learned
models (``kind: "kernel"``) and loads as ``learned:PATH``; :class:`KernelCostModel` is the cost
model. Its ``graph_cost`` is one pass over the graph (:func:`~hant.cost_models.learned.kernels.walk_kernels`;
per-node facts cached on the nodes) and one batched MLP call for the distinct kernel
configurations (equal kernels share one); the report's rows, built when first read, carry each
kernel's latency, MACs and bytes on its first node (the kernel's other nodes get 0).
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch
import torch.nn as nn
from torch.fx import GraphModule

from hant.cost_models.base import Cost, CostReport, CostRow, GraphPricedModel, collector_paused
from hant.cost_models.learned.kernels import (
    KERNEL_FEATURES, KernelNetwork, kernel_extras, kernel_network, kernel_rows, kernel_work, walk_kernels,
)
from hant.errors import CostModelError
from hant.graphs.ops import graph_unchanged

__all__ = ["KernelNet", "KernelPredictor", "KernelCostModel", "train_kernels", "KERNEL_CONFIG", "CALIBRATION_TERMS",
           "TERM_SETS", "network_design", "select_terms"]

KERNEL_CONFIG = {"hidden": 128, "layers": 3, "steps": 3000, "lr": 3e-3, "weight_decay": 1e-5, "batch": 512}
_FORMAT = "hant-learned-predictor"

# Network terms of the calibration: seconds = sum over terms of coefficient * term.
CALIBRATION_TERMS = (
    "kernel_sum",            # sum of the kernels' predicted seconds alone
    "kernels",               # number of kernels
    "constant",              # 1
    "reorder_elements",      # elements converted by the reorders inside the network
    "reorders",              # number of reorders inside the network
    "isolation_nodes",       # nodes the kernels run only when each is timed alone (reorders, an unfused HardSwish)
    "isolation_elements",    # elements those nodes pass over
    "layout_elements",       # reorder_elements - isolation_elements (one price per element passed over)
    "weight_elements",       # weights read by the kernels (cached alone, from memory in a network)
)
_BASE_TERMS = ("kernel_sum", "kernels", "constant")
# The candidate term sets select_terms compares (the first is the plain nn-Meter sum).
TERM_SETS = (
    _BASE_TERMS,
    _BASE_TERMS + ("weight_elements",),
    _BASE_TERMS + ("layout_elements", "reorders"),
    _BASE_TERMS + ("reorder_elements", "isolation_elements", "reorders"),
    _BASE_TERMS + ("layout_elements", "reorders", "weight_elements"),
    _BASE_TERMS + ("reorder_elements", "isolation_elements", "reorders", "weight_elements"),
    _BASE_TERMS + ("layout_elements", "reorders", "isolation_nodes", "weight_elements"),
    _BASE_TERMS + ("reorder_elements", "isolation_elements", "reorders", "isolation_nodes", "weight_elements"),
)


def _as_network(network) -> KernelNetwork:
    """A :class:`KernelNetwork` (a bare list of kernel configurations has no reorders)."""
    return network if isinstance(network, KernelNetwork) else KernelNetwork(tuple(network), ())


def network_design(kernel_seconds: np.ndarray, network: KernelNetwork) -> np.ndarray:
    """The values of :data:`CALIBRATION_TERMS` for one network whose kernels take ``kernel_seconds`` alone."""
    extras = kernel_extras(network.configs)
    reorder_elements = float(sum(e for _, e in network.reorders))
    isolation = float(extras[:, 1].sum())
    return np.array([float(kernel_seconds.sum()), float(len(kernel_seconds)), 1.0, reorder_elements,
                     float(len(network.reorders)), float(extras[:, 0].sum()), isolation, reorder_elements - isolation,
                     float(extras[:, 2].sum())])


class KernelNet(nn.Module):
    """MLP: normalised kernel features -> normalised log seconds."""

    def __init__(self, in_dim: int = len(KERNEL_FEATURES), hidden: int = 128, layers: int = 3):
        super().__init__()
        dims = [in_dim] + [hidden] * layers
        body: list[nn.Module] = []
        for a, b in zip(dims, dims[1:]):
            body += [nn.Linear(a, b), nn.SiLU()]
        self.mlp = nn.Sequential(*body, nn.Linear(dims[-1], 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x).squeeze(-1)


class KernelPredictor:
    """Kernel latencies from :class:`KernelNet`, and networks as their calibrated sum (module docstring).

    ``calibration`` maps each of :data:`CALIBRATION_TERMS` to its coefficient (missing terms are 0;
    a 3-tuple ``(a, b, c)`` is the kernel sum, count and constant): seconds = sum of coefficient * term.
    """
    kind = "kernel"

    def __init__(self, net: KernelNet, config: dict, x_mean: torch.Tensor, x_std: torch.Tensor, y_mean: float,
                 y_std: float, calibration: dict | tuple = (1.0, 0.0, 0.0), metadata: dict | None = None):
        self.net, self.config = net.eval(), dict(config)
        self.x_mean, self.x_std = x_mean.float(), x_std.float()
        self.y_mean, self.y_std = float(y_mean), float(y_std)
        self.calibration = calibration
        self.metadata = dict(metadata or {})

    @property
    def calibration(self) -> dict[str, float]:
        return dict(zip(CALIBRATION_TERMS, self._coefficients.tolist()))

    @calibration.setter
    def calibration(self, value: dict | tuple) -> None:
        if not isinstance(value, dict):
            value = dict(zip(_BASE_TERMS, value))
        unknown = set(value) - set(CALIBRATION_TERMS)
        if unknown:
            raise CostModelError(f"unknown calibration terms {sorted(unknown)}; use {', '.join(CALIBRATION_TERMS)}")
        self._coefficients = np.array([float(value.get(t, 0.0)) for t in CALIBRATION_TERMS])
        c = dict(zip(CALIBRATION_TERMS, self._coefficients))
        # per kernel: [seconds alone, 1, isolation nodes, isolation elements, weight elements];
        # per reorder: [elements, 1]
        self._kernel_coef = np.array([c["kernel_sum"], c["kernels"], c["isolation_nodes"],
                                      c["isolation_elements"] - c["layout_elements"], c["weight_elements"]])
        self._reorder_coef = np.array([c["reorder_elements"] + c["layout_elements"], c["reorders"]])

    # ------------------------------------------------------------ kernels

    @torch.no_grad()
    def kernel_seconds(self, rows: np.ndarray) -> np.ndarray:
        """Seconds of each kernel timed alone, from rows of :func:`kernel_rows` (one batched MLP call)."""
        if len(rows) == 0:
            return np.zeros(0)
        x = (torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32)) - self.x_mean) / self.x_std
        # One thread: for a few hundred rows a thread pool only adds spinning (tens of ms on a busy machine).
        threads = torch.get_num_threads()
        if threads != 1:
            torch.set_num_threads(1)
        try:
            out = self.net(x).double().numpy()
        finally:
            if threads != 1:
                torch.set_num_threads(threads)
        return np.exp(out * self.y_std + self.y_mean)

    def network_seconds(self, kernel_seconds: np.ndarray, network: KernelNetwork) -> float:
        """A network's seconds from its kernels' seconds alone and its reorders (the calibration)."""
        return float(network_design(kernel_seconds, network) @ self._coefficients)

    def kernel_shares(self, kernel_seconds: np.ndarray, extras: np.ndarray) -> np.ndarray:
        """Each kernel's calibrated seconds in a network (the calibration's per-kernel part), from its seconds
        alone and its :func:`~hant.cost_models.learned.kernels.kernel_extras` row. A network is the sum of its
        kernels' shares, its reorders' (:meth:`reorder_seconds`) and :attr:`overhead_s`."""
        parts = np.column_stack([kernel_seconds, np.ones_like(kernel_seconds), extras])
        return parts @ self._kernel_coef

    @property
    def overhead_s(self) -> float:
        """Seconds every network pays once (the calibration's constant)."""
        return float(self._coefficients[CALIBRATION_TERMS.index("constant")])

    def reorder_seconds(self, elements: np.ndarray) -> np.ndarray:
        """Calibrated seconds of reorders inside a network converting ``elements`` values each."""
        elements = np.asarray(elements, dtype=np.float64)
        return elements * self._reorder_coef[0] + self._reorder_coef[1]

    def predict_graph(self, gm: GraphModule) -> float:
        """Seconds of one traced graph."""
        return self.predict_networks([kernel_network(gm)])[0]

    def predict_networks(self, networks: list) -> np.ndarray:
        """Seconds of networks given as :class:`KernelNetwork` (or bare lists of kernel configurations)."""
        networks = [_as_network(n) for n in networks]
        return np.array([self.network_seconds(self.kernel_seconds(kernel_rows(n.configs)), n) for n in networks])

    # ------------------------------------------------------------ calibration

    def design(self, networks: list) -> np.ndarray:
        """The :data:`CALIBRATION_TERMS` values of each network, (n, len(CALIBRATION_TERMS))."""
        networks = [_as_network(n) for n in networks]
        return np.array([network_design(self.kernel_seconds(kernel_rows(n.configs)), n) for n in networks]
                        ).reshape(-1, len(CALIBRATION_TERMS))

    def calibrate(self, networks: list, latency_s, terms: tuple[str, ...] = _BASE_TERMS,
                  design: np.ndarray | None = None) -> dict:
        """Fit the coefficients of ``terms`` (the others are 0) to whole-network latencies: robust least
        squares (soft L1, scale 10 %) on the relative error, so a few networks timed while the machine
        was busy do not pull the fit.

        ``networks`` are :class:`KernelNetwork` (or bare lists of kernel configurations); ``design``
        may give their :meth:`design` rows. Returns the fit's summary (the median ratio of the kernels'
        sum to the whole network before, the coefficients, the MAPE after)."""
        y = np.asarray(latency_s, dtype=np.float64)
        if len(networks) != len(y) or len(y) < max(3, len(terms)):
            raise CostModelError(f"calibration of {len(terms)} terms needs at least {max(3, len(terms))} networks "
                                 f"with one latency each, got {len(networks)} networks and {len(y)} latencies")
        design = self.design(networks) if design is None else design
        self.calibration = _fit_terms(design, y, terms)
        predicted = design @ self._coefficients
        sums = design[:, CALIBRATION_TERMS.index("kernel_sum")]
        summary = {"networks": int(len(y)), "terms": list(terms), "sum_over_whole_median": float(np.median(sums / y)),
                   "coefficients": {t: self.calibration[t] for t in terms},
                   "mape_pct_after": float(np.mean(np.abs(predicted - y) / y) * 100)}
        self.metadata["calibration"] = summary
        return summary

    # ------------------------------------------------------------ files

    def state(self) -> dict:
        return {"format": _FORMAT, "version": 1, "kind": self.kind, "feature_names": list(KERNEL_FEATURES),
                "config": self.config, "x_mean": self.x_mean, "x_std": self.x_std, "y_mean": self.y_mean,
                "y_std": self.y_std, "calibration": self.calibration, "state_dict": self.net.state_dict(),
                "metadata": self.metadata}

    def save(self, path: str | os.PathLike) -> None:
        """Write the predictor file (``torch.save`` of plain values; the folder must exist)."""
        torch.save(self.state(), os.fspath(path))

    @classmethod
    def from_state(cls, state: dict, path: str = "") -> "KernelPredictor":
        """The predictor of a loaded file's dict; :class:`CostModelError` when it does not fit this hant."""
        if state.get("feature_names") != list(KERNEL_FEATURES):
            raise CostModelError(f"{path!r} was trained on other kernel features; train it again with `hant fit "
                                 "--model kernel`")
        try:
            config = state["config"]
            net = KernelNet(len(KERNEL_FEATURES), config["hidden"], config["layers"])
            net.load_state_dict(state["state_dict"])
            calibration = state["calibration"]
            return cls(net, config, state["x_mean"], state["x_std"], state["y_mean"], state["y_std"],
                       calibration if isinstance(calibration, dict) else tuple(calibration), state["metadata"])
        except Exception as exc:
            raise CostModelError(f"{path!r} is a damaged kernel predictor file ({type(exc).__name__}: {exc}); "
                                 "train it again") from exc


def _fit_terms(design: np.ndarray, y: np.ndarray, terms: tuple[str, ...]) -> dict[str, float]:
    """Robust least squares (soft L1 at 10 %) of ``y`` on the ``terms`` columns of ``design``, relative error."""
    from scipy.optimize import least_squares

    unknown = [t for t in terms if t not in CALIBRATION_TERMS]
    if unknown:
        raise CostModelError(f"unknown calibration terms {unknown}; use {', '.join(CALIBRATION_TERMS)}")
    columns = design[:, [CALIBRATION_TERMS.index(t) for t in terms]]
    # each coefficient scaled so that its term's typical contribution is a median network's latency
    typical = np.median(np.abs(columns), axis=0)
    scale = np.where(typical > 0, np.median(y) / np.where(typical > 0, typical, 1.0), 1.0)
    start = np.zeros(len(terms))
    if "kernel_sum" in terms:
        start[terms.index("kernel_sum")] = float(np.median(y / np.maximum(columns[:, terms.index("kernel_sum")],
                                                                           1e-12)))
    fit = least_squares(lambda c: columns @ c / y - 1.0, start, loss="soft_l1", f_scale=0.1, x_scale=scale)
    return dict(zip(terms, (float(v) for v in fit.x)))


def select_terms(design: np.ndarray, y, candidates: tuple[tuple[str, ...], ...] = TERM_SETS, folds: int = 5,
                 seed: int = 0) -> tuple[tuple[str, ...], dict[tuple[str, ...], float]]:
    """The candidate term set with the lowest ``folds``-fold cross-validated MAPE on these networks, and each
    candidate's MAPE (%). ``design`` holds the networks' :meth:`KernelPredictor.design` rows."""
    y = np.asarray(y, dtype=np.float64)
    if len(y) < 2 * folds:
        raise CostModelError(f"term selection needs at least {2 * folds} networks, got {len(y)}")
    fold_of = np.random.default_rng(seed).permutation(len(y)) % folds
    scores = {}
    for terms in candidates:
        predicted = np.empty_like(y)
        for f in range(folds):
            train, test = fold_of != f, fold_of == f
            c = _fit_terms(design[train], y[train], terms)
            predicted[test] = design[test][:, [CALIBRATION_TERMS.index(t) for t in terms]] @ np.array(list(c.values()))
        scores[terms] = float(np.mean(np.abs(predicted - y) / y) * 100)
    return min(scores, key=scores.get), scores


def train_kernels(configs: list[dict], latency_s, *, config: dict | None = None, seed: int = 0,
                  metadata: dict | None = None) -> KernelPredictor:
    """Fit :class:`KernelNet` to kernels timed alone (seconds), on log latency.

    Adam on the squared error of normalised log seconds over mini-batches, cosine-decayed;
    reproducible for a seed up to float rounding. The result is uncalibrated (the kernels' sum
    alone): call :meth:`KernelPredictor.calibrate` with whole networks.
    """
    cfg = dict(KERNEL_CONFIG, **(config or {}))
    y = np.asarray(latency_s, dtype=np.float64)
    if len(configs) != len(y) or len(y) < 2:
        raise CostModelError(f"need one latency per kernel and at least 2 kernels, got {len(configs)} and {len(y)}")
    if not np.all(np.isfinite(y)) or np.any(y <= 0):
        raise CostModelError("kernel latencies must be positive and finite")
    torch.manual_seed(seed)
    rows = kernel_rows(configs).astype(np.float32)
    mean, std = rows.mean(axis=0), rows.std(axis=0)
    std[std < 1e-6] = 1.0
    logs = np.log(y)
    y_mean, y_std = float(logs.mean()), float(max(logs.std(), 1e-6))
    x = torch.from_numpy((rows - mean) / std)
    t = torch.from_numpy(((logs - y_mean) / y_std).astype(np.float32))
    net = KernelNet(len(KERNEL_FEATURES), cfg["hidden"], cfg["layers"])
    opt = torch.optim.Adam(net.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=int(cfg["steps"]))
    gen = torch.Generator().manual_seed(seed)
    batch = min(int(cfg["batch"]), len(y))
    started = time.perf_counter()
    net.train()
    for _ in range(int(cfg["steps"])):
        idx = torch.randint(0, len(y), (batch,), generator=gen)
        loss = torch.mean((net(x[idx]) - t[idx]) ** 2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    net.eval()
    meta = dict(metadata or {}, kernels=len(y), train_seconds=time.perf_counter() - started,
                train_loss=float(loss.detach()))
    return KernelPredictor(net, cfg, torch.from_numpy(mean), torch.from_numpy(std), y_mean, y_std, metadata=meta)


class KernelCostModel(GraphPricedModel):
    """``learned:PATH`` for a kernel predictor file: see the module docstring.

    ``node_cost`` is a node's share within its own graph (its kernel's latency on the kernel's
    first node, 0 on the others), computed once per graph state and reused.
    """

    def __init__(self, predictor: KernelPredictor, name: str = "learned"):
        self.predictor, self.name = predictor, name

    def graph_cost(self, gm: GraphModule) -> CostReport:
        """One pass over the graph: kernels and the reorders between them, one MLP call; each kernel's
        calibrated latency on its first node, each reorder's on the node that needs it."""
        with collector_paused():
            return self._graph_cost(gm)

    def _graph_cost(self, gm: GraphModule) -> CostReport:
        with graph_unchanged():   # a read-only walk: each node is classified once
            walk = walk_kernels(gm)
        kernels, reorders = walk.kernels, walk.reorders
        # equal kernels share one configuration object: each distinct one is featurised and predicted once
        distinct, index = _distinct_configs([k.config for k in kernels])
        seconds = self.predictor.kernel_seconds(kernel_rows(distinct))[index]
        shares = self.predictor.kernel_shares(seconds, kernel_extras(distinct)[index])
        reorder_s = self.predictor.reorder_seconds([r.elements for r in reorders])
        overhead = self.predictor.overhead_s
        total = float(shares.sum() + reorder_s.sum()) + overhead
        work = np.array([kernel_work(c) for c in distinct], dtype=np.int64).reshape(-1, 4)
        macs, read, written, params = (np.bincount(index, minlength=len(distinct)) @ work).tolist()
        read += params
        by_anchor = {k.anchor: (k, share) for k, share in zip(kernels, shares.tolist())}
        at: dict[str, float] = {}
        for r, t in zip(reorders, reorder_s.tolist()):
            at[r.at] = at.get(r.at, 0.0) + t
        nodes = walk.nodes

        def make_rows() -> list[CostRow]:
            rows = []
            empty = Cost()
            for name, kind, target, meta in nodes:
                hit = by_anchor.get(name)
                extra = at.get(name, 0.0)
                if hit is None:
                    cost = Cost(extra) if extra else empty
                else:
                    kernel, latency = hit
                    counted_macs, in_b, out_b, w_b = kernel_work(kernel.config)
                    cost = Cost(latency + extra, counted_macs, 4 * (in_b + w_b), 4 * out_b, w_b)
                shape = getattr(meta, "shape", None)
                rows.append(CostRow(name, kind, target, (), tuple(shape) if shape is not None else None, cost))
            return rows
        notes = [f"predicted by a kernel predictor: {len(kernels)} kernels and {len(reorders)} layout reorders "
                 f"({reorder_s.sum() * 1e3:.4g} ms); the total includes {overhead * 1e3:.4g} ms of "
                 "per-network overhead"]
        return CostReport.deferred(self.name, make_rows, Cost(total, macs, 4 * read, 4 * written, params), notes)


def _distinct_configs(configs: list[dict]) -> tuple[list[dict], np.ndarray]:
    """The distinct configuration objects among ``configs`` (by identity) and each one's position among them."""
    position: dict[int, int] = {}
    distinct: list[dict] = []
    index = []
    for config in configs:
        i = position.get(id(config))
        if i is None:
            i = position[id(config)] = len(distinct)
            distinct.append(config)
        index.append(i)
    return distinct, np.array(index, dtype=np.intp)
