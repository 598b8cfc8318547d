"""The kernel-level predictor: an MLP over kernels timed alone, summed over a network's kernels.

nn-Meter's recipe on hant's graphs:

1. kernels (:mod:`hant.cost_models.learned.kernels`) are timed alone, thousands of them;
2. :class:`KernelNet`, a plain PyTorch MLP, learns log latency from a kernel's features
   (:data:`~hant.cost_models.learned.kernels.KERNEL_FEATURES`);
3. a network is the sum of its kernels, corrected for what isolation gets wrong. A kernel
   timed alone pays a whole ``session.run`` (input copy, output allocation, layout reorders);
   inside a network it pays a fraction of that. The correction is linear and fitted on
   whole-network measurements: ``network = a * sum(kernel) + b * kernels + c``
   (:meth:`KernelPredictor.calibrate`), three numbers, so a few dozen networks fix it.

Kernels and networks are both taken at their fastest timing block (``Spread.min_s``): on a
shared machine the median of a short run includes waiting for a core, the minimum does not.

:class:`KernelPredictor` is saved in the same predictor-file format as the other learned
models (``kind: "kernel"``) and loads as ``learned:PATH``; :class:`KernelCostModel` is the cost
model. Its ``graph_cost`` is one pass over the graph (per-node facts cached on the nodes), one
batched MLP call for all kernels, and rows that carry each kernel's latency, MACs and bytes on
its first node (the kernel's other nodes get 0).
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch
import torch.nn as nn
from torch.fx import GraphModule

from hant.cost_models.base import Cost, CostReport, CostRow, GraphPricedModel
from hant.cost_models.learned.kernels import (
    KERNEL_FEATURES, extract_kernels, kernel_bytes, kernel_macs, kernel_rows, kernels_and_facts,
)
from hant.errors import CostModelError
from hant.graphs.ops import graph_unchanged

__all__ = ["KernelNet", "KernelPredictor", "KernelCostModel", "train_kernels", "KERNEL_CONFIG"]

KERNEL_CONFIG = {"hidden": 128, "layers": 3, "steps": 3000, "lr": 3e-3, "weight_decay": 1e-5, "batch": 512}
_FORMAT = "hant-learned-predictor"
_SKIP = ("placeholder", "output", "get_attr")


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

    ``calibration`` is ``(a, b, c)``: seconds = a * sum of kernel seconds + b * number of kernels + c.
    """
    kind = "kernel"

    def __init__(self, net: KernelNet, config: dict, x_mean: torch.Tensor, x_std: torch.Tensor, y_mean: float,
                 y_std: float, calibration: tuple[float, float, float] = (1.0, 0.0, 0.0), metadata: dict | None = None):
        self.net, self.config = net.eval(), dict(config)
        self.x_mean, self.x_std = x_mean.float(), x_std.float()
        self.y_mean, self.y_std = float(y_mean), float(y_std)
        self.calibration = tuple(float(v) for v in calibration)
        self.metadata = dict(metadata or {})

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

    def kernels_total(self, kernel_seconds: np.ndarray) -> float:
        """A network's seconds from its kernels' seconds alone (the calibration)."""
        a, b, c = self.calibration
        return a * float(kernel_seconds.sum()) + b * len(kernel_seconds) + c

    def predict_graph(self, gm: GraphModule) -> float:
        """Seconds of one traced graph."""
        kernels = extract_kernels(gm)
        return self.kernels_total(self.kernel_seconds(kernel_rows(k.config for k in kernels)))

    def predict_configs(self, networks: list[list[dict]]) -> np.ndarray:
        """Seconds of networks given as lists of kernel configurations."""
        return np.array([self.kernels_total(self.kernel_seconds(kernel_rows(n))) for n in networks])

    # ------------------------------------------------------------ calibration

    def calibrate(self, networks: list[list[dict]], latency_s) -> dict:
        """Fit ``(a, b, c)`` to whole-network latencies: robust least squares (soft L1, scale 10 %) on the
        relative error, so a few networks timed while the machine was busy do not pull the fit.

        ``networks`` are the kernel configurations of each network. Returns the fit's summary
        (the median ratio of the kernels' sum to the whole network before, the MAPE after)."""
        from scipy.optimize import least_squares

        y = np.asarray(latency_s, dtype=np.float64)
        if len(networks) != len(y) or len(y) < 3:
            raise CostModelError(f"calibration needs at least 3 networks with one latency each, got "
                                 f"{len(networks)} networks and {len(y)} latencies")
        sums = np.array([self.kernel_seconds(kernel_rows(n)).sum() for n in networks])
        counts = np.array([len(n) for n in networks], dtype=np.float64)
        design = np.stack([sums, counts, np.ones_like(sums)], axis=1)
        scale = float(np.median(y))
        fit = least_squares(lambda c: design @ c / y - 1.0, [float(np.median(y / sums)), 0.0, 0.0], loss="soft_l1",
                            f_scale=0.1, x_scale=[1.0, scale / max(counts.mean(), 1.0), scale])
        self.calibration = tuple(float(v) for v in fit.x)
        predicted = design @ fit.x
        summary = {"networks": int(len(y)), "sum_over_whole_median": float(np.median(sums / y)),
                   "a": self.calibration[0], "b_us": self.calibration[1] * 1e6, "c_us": self.calibration[2] * 1e6,
                   "mape_pct_after": float(np.mean(np.abs(predicted - y) / y) * 100)}
        self.metadata["calibration"] = summary
        return summary

    # ------------------------------------------------------------ files

    def state(self) -> dict:
        return {"format": _FORMAT, "version": 1, "kind": self.kind, "feature_names": list(KERNEL_FEATURES),
                "config": self.config, "x_mean": self.x_mean, "x_std": self.x_std, "y_mean": self.y_mean,
                "y_std": self.y_std, "calibration": list(self.calibration), "state_dict": self.net.state_dict(),
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
            return cls(net, config, state["x_mean"], state["x_std"], state["y_mean"], state["y_std"],
                       tuple(state["calibration"]), state["metadata"])
        except Exception as exc:
            raise CostModelError(f"{path!r} is a damaged kernel predictor file ({type(exc).__name__}: {exc}); "
                                 "train it again") from exc


def train_kernels(configs: list[dict], latency_s, *, config: dict | None = None, seed: int = 0,
                  metadata: dict | None = None) -> KernelPredictor:
    """Fit :class:`KernelNet` to kernels timed alone (seconds), on log latency.

    Adam on the squared error of normalised log seconds over mini-batches, cosine-decayed;
    reproducible for a seed up to float rounding. The result is uncalibrated
    (``a, b, c = 1, 0, 0``): call :meth:`KernelPredictor.calibrate` with whole networks.
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
        with graph_unchanged():   # a read-only walk: each node is classified once
            kernels, facts = kernels_and_facts(gm)
        seconds = self.predictor.kernel_seconds(kernel_rows(k.config for k in kernels))
        a, b, _ = self.predictor.calibration
        by_anchor = {k.anchor: (k, a * s + b) for k, s in zip(kernels, seconds)}
        rows = []
        empty = Cost()
        for node in gm.graph.nodes:
            if node.op in _SKIP:
                continue
            hit = by_anchor.get(node.name)
            if hit is None:
                cost = empty
            else:
                kernel, latency = hit
                in_b, out_b, w_b = kernel_bytes(kernel.config)
                cost = Cost(latency, kernel_macs(kernel.config), 4 * (in_b + w_b), 4 * out_b, w_b)
            _, kind, target = facts[node]
            shape = getattr(node.meta.get("tensor_meta"), "shape", None)
            rows.append(CostRow(node.name, kind, target, (), tuple(shape) if shape is not None else None, cost))
        total = self.predictor.kernels_total(seconds)
        macs = sum(r.cost.macs for r in rows)
        read = sum(r.cost.bytes_read for r in rows)
        written = sum(r.cost.bytes_written for r in rows)
        params = sum(r.cost.params for r in rows)
        rows_s = float(a * seconds.sum() + b * len(seconds))
        notes = [f"predicted by a kernel predictor: {len(kernels)} kernels, the total includes "
                 f"{(total - rows_s) * 1e3:.4g} ms of per-network overhead"]
        return CostReport(self.name, rows, Cost(total, macs, read, written, params), notes)


