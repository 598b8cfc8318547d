"""Few-shot transfer to a device never trained on: a few measured networks give a cost model.

Latency profiles of different devices are strongly related: on NAS-Bench-201, four
directions explain 97 % of the variance of log latency across 21 devices. So the transfer
model learns the shared part once and leaves a new device very few free parameters:

* :func:`pretrain`: one :class:`~hant.cost_models.learned.gnn.GraphNet` with a shared
  message-passing trunk and **one latency head per pre-training device** is trained on all
  of them at once (squared log error, early stopping on a validation tenth of the rows). It
  then picks the **reference networks** a user should measure: a greedy D-optimal spread of
  the pre-training rows over the main directions of its predicted latency profiles, so the
  few measurements tell the device's profile apart well. It also chooses the ridge strength
  of the head weights by simulating adaptation on its own devices (each one fitted from the
  other heads on the references, scored on the validation rows);
* :func:`adapt`: from the new device's latencies on the references (and any extra rows),
  non-negative ridge least squares on relative error fits one weight per pre-trained head;
  nothing else changes. The prediction is a non-negative combination of the pre-trained
  devices' predicted latencies, so it is still a sum of per-node shares, and the result is an
  ordinary :class:`~hant.cost_models.learned.predictor.Predictor` (``learned:PATH`` once saved).

With 10 rows there are as many weights as pre-training devices, but non-negativity and the
ridge keep the fit stable (a handful of weights end up non-zero).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.optimize import nnls
from scipy.stats import spearmanr

from hant.cost_models.learned.features import FEATURE_NAMES, GraphFeatures
from hant.cost_models.learned.fit import DEFAULT_CONFIG, TABLE_CONFIG, _normalisation, optimise
from hant.cost_models.learned.gnn import GraphNet
from hant.cost_models.learned.predictor import Predictor
from hant.errors import CostModelError

__all__ = ["Pretrained", "RIDGE_GRID", "pick_references", "head_weights", "pretrain", "adapt"]

RIDGE_GRID = (1e-4, 1e-3, 1e-2, 1e-1)
"""Ridge strengths :func:`pretrain` chooses from (relative-error units, per head weight)."""
_FORMAT = "hant-transfer-pretrained"


@dataclass
class Pretrained:
    """A multi-head GraphNet, the reference networks to measure and the head-weight ridge.

    ``head_scale``: seconds per output unit of each head; ``head_norm``: each head's
    geometric-mean latency over the pre-training rows (heads are weighted in these units).
    """
    net: GraphNet
    config: dict
    x_mean: torch.Tensor
    x_std: torch.Tensor
    head_scale: np.ndarray
    head_norm: np.ndarray
    devices: list[str]
    references: list[str]
    ridge: float
    metadata: dict = field(default_factory=dict)

    def _template(self) -> Predictor:
        return Predictor("gnn", self.config, self.net, self.x_mean, self.x_std, 1.0)

    @torch.no_grad()
    def head_latencies(self, graphs: list[GraphFeatures], batch_size: int = 1000) -> np.ndarray:
        """(len(graphs), len(devices)) predicted seconds, one column per pre-training device."""
        template = self._template()
        out = [template.forward(template.inputs(graphs[k:k + batch_size])).double().numpy()
               for k in range(0, len(graphs), batch_size)]
        return np.concatenate(out) * self.head_scale

    def save(self, path: str | os.PathLike) -> None:
        torch.save({"format": _FORMAT, "config": self.config, "state_dict": self.net.state_dict(),
                    "x_mean": self.x_mean, "x_std": self.x_std, "head_scale": torch.from_numpy(self.head_scale),
                    "head_norm": torch.from_numpy(self.head_norm), "devices": self.devices,
                    "references": self.references, "ridge": self.ridge, "metadata": self.metadata}, os.fspath(path))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Pretrained":
        """Read a file of :meth:`save`. Raises :class:`CostModelError` when it is not one."""
        try:
            state = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CostModelError(f"{os.fspath(path)!r} is not a readable pre-trained transfer model ({exc})") from exc
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            raise CostModelError(f"{os.fspath(path)!r} is not a pre-trained transfer model; make one with pretrain()")
        cfg = state["config"]
        net = GraphNet(len(FEATURE_NAMES), cfg["hidden"], cfg["layers"], 0, cfg["outputs"])
        net.load_state_dict(state["state_dict"])
        return cls(net.eval(), cfg, state["x_mean"], state["x_std"], state["head_scale"].numpy(),
                   state["head_norm"].numpy(), list(state["devices"]), list(state["references"]),
                   float(state["ridge"]), dict(state["metadata"]))


def pick_references(log_profiles: np.ndarray, k: int = 10, directions: int = 4) -> list[int]:
    """Rows of a greedy D-optimal design: ``k`` rows that pin down a linear model well.

    ``log_profiles``: (rows, devices) log latencies. The rows are projected on the
    ``directions`` main directions of their centred profiles (plus a constant); each step
    adds the row with the largest leverage given the rows already chosen.
    """
    logs = np.asarray(log_profiles, dtype=np.float64)
    if logs.ndim != 2 or len(logs) < k:
        raise CostModelError(f"pick_references needs a (rows, devices) array with at least {k} rows")
    centred = logs - logs.mean(axis=0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    d = min(directions, len(s))
    design = np.hstack([np.ones((len(logs), 1)), centred @ vt[:d].T / np.maximum(s[:d], 1e-12) * math.sqrt(len(logs))])
    info = 1e-3 * np.eye(design.shape[1])
    chosen: list[int] = []
    for _ in range(k):
        leverage = np.einsum("ij,jk,ik->i", design, np.linalg.inv(info), design)
        leverage[chosen] = -np.inf
        i = int(np.argmax(leverage))
        chosen.append(i)
        info += np.outer(design[i], design[i])
    return chosen


def head_weights(normalised_heads: np.ndarray, latency_s: np.ndarray, ridge: float) -> np.ndarray:
    """Non-negative w minimising sum((heads @ w / y - 1)**2) + ridge * |w|**2 (relative error)."""
    a = np.asarray(normalised_heads, dtype=np.float64) / np.asarray(latency_s, dtype=np.float64)[:, None]
    n = a.shape[1]
    w, _ = nnls(np.vstack([a, math.sqrt(ridge) * np.eye(n)]), np.concatenate([np.ones(len(a)), np.zeros(n)]))
    return w


def _validated_ridge(normalised: np.ndarray, measured: np.ndarray, refs: list[int], val: np.ndarray) -> tuple:
    """The ridge of :data:`RIDGE_GRID` that best adapts each pre-training device from the others' heads.

    Scored by mean Spearman rho on the validation rows; ties (common: when one or two heads
    carry the fit, shrinking them keeps the ranking) go to the smallest ridge, the least
    biased latency scale.
    """
    scores = {}
    for ridge in RIDGE_GRID:
        rho = []
        for d in range(measured.shape[1]):
            others = [e for e in range(measured.shape[1]) if e != d]
            w = head_weights(normalised[np.ix_(refs, others)], measured[refs, d], ridge)
            rho.append(spearmanr(normalised[np.ix_(val, others)] @ w, measured[val, d])[0])
        scores[ridge] = float(np.mean(rho))
    return max(scores, key=scores.get), scores


def pretrain(archs: list[str], latency_s, devices: list[str], family, *, config: dict | None = None,
             references: int = 10, validation: float = 0.1, seed: int = 0) -> Pretrained:
    """Pre-train the multi-head GraphNet on several devices (see the module docstring).

    ``latency_s``: (len(archs), len(devices)) seconds; ``family`` featurises architecture
    strings (e.g. :func:`hant.cost_models.learned.nb201.family`). ``config`` overrides the
    ``gnn`` sizes and training settings of :data:`~hant.cost_models.learned.fit.TABLE_CONFIG`.
    A ``validation`` share of the rows (at least 2) is never trained on: it stops training
    early and chooses the head-weight ridge. References are drawn from the other rows.
    """
    y = np.asarray(latency_s, dtype=np.float64)
    if y.ndim != 2 or y.shape != (len(archs), len(devices)) or np.any(~np.isfinite(y)) or np.any(y <= 0):
        raise CostModelError("latency_s must be a positive, finite (archs x devices) array")
    if len(devices) < 2:
        raise CostModelError("pre-train on at least two devices")
    n_val = max(2, int(round(validation * len(archs))))
    if len(archs) - n_val < max(references, 2):
        raise CostModelError(f"pre-training needs more than {references + n_val} architectures, got {len(archs)}")
    cfg = dict(DEFAULT_CONFIG["gnn"])
    cfg.update(TABLE_CONFIG["gnn"])
    cfg.update(config or {})
    cfg["outputs"] = len(devices)
    torch.manual_seed(seed)
    graphs = [family.featurize(a) for a in archs]
    order = np.random.default_rng(seed).permutation(len(archs))
    fit_rows, val_rows = np.sort(order[n_val:]), np.sort(order[:n_val])
    mean, std = _normalisation(np.concatenate([graphs[i].x for i in fit_rows]))
    net = GraphNet(mean.numel(), cfg["hidden"], cfg["layers"], 0, len(devices))
    template = Predictor("gnn", cfg, net, mean, std, 1.0)
    units = float(np.mean([graphs[i].num_nodes for i in fit_rows]))
    log_scale = np.log(y[fit_rows]).mean(axis=0) - math.log(units)
    target = torch.from_numpy(np.log(y) - log_scale).float()
    size = int(cfg["batch_graphs"])
    batches = [(template.inputs([graphs[i] for i in fit_rows[k:k + size]]), target[fit_rows[k:k + size]])
               for k in range(0, len(fit_rows), size)]
    held = (template.inputs([graphs[i] for i in val_rows]), target[val_rows])
    report = optimise(net, template.forward, batches, cfg, held)
    model = Pretrained(net, cfg, mean, std, np.exp(log_scale), np.ones(len(devices)), list(devices), [], 0.0,
                       {"rows": len(archs), "validation_rows": n_val, **report})
    heads = model.head_latencies(graphs)
    model.head_norm = np.exp(np.log(heads[fit_rows]).mean(axis=0))
    normalised = heads / model.head_norm
    refs = [int(fit_rows[i]) for i in pick_references(np.log(normalised[fit_rows]), references)]
    model.references = [archs[i] for i in refs]
    model.ridge, model.metadata["ridge_validation_rho"] = _validated_ridge(normalised, y, refs, val_rows)
    return model


def adapt(pretrained: Pretrained, family, reference_latency_s, extra_archs: list[str] = (),
          extra_latency_s=(), *, ridge: float | None = None, metadata: dict | None = None) -> Predictor:
    """A predictor for a new device from its latencies on the reference networks (plus extra rows).

    Fits one non-negative weight per pre-trained head (:func:`head_weights`, ridge
    ``pretrained.ridge`` unless given) on the rows given here, so it never sees rows it will
    be scored on. The trunk and heads stay as pre-trained.
    """
    ref = np.asarray(reference_latency_s, dtype=np.float64)
    if ref.shape != (len(pretrained.references),) or np.any(~np.isfinite(ref)) or np.any(ref <= 0):
        raise CostModelError(f"give positive latencies of the {len(pretrained.references)} reference networks, "
                             f"in the order of Pretrained.references")
    extra = np.asarray(extra_latency_s, dtype=np.float64)
    if len(extra) != len(extra_archs) or np.any(~np.isfinite(extra)) or np.any(extra <= 0):
        raise CostModelError("give one positive latency per extra architecture")
    archs = list(pretrained.references) + list(extra_archs)
    y = np.concatenate([ref, extra])
    heads = pretrained.head_latencies([family.featurize(a) for a in archs]) / pretrained.head_norm
    w = head_weights(heads, y, pretrained.ridge if ridge is None else ridge)
    scale = float(np.exp(np.mean(np.log(y))))
    device = torch.from_numpy(w * pretrained.head_scale / pretrained.head_norm / scale).float()
    meta = dict(metadata or {}, adapted_rows=len(archs), pretrained_on=list(pretrained.devices),
                references=list(pretrained.references), head_weights=[float(v) for v in w])
    return Predictor("gnn", pretrained.config, pretrained.net, pretrained.x_mean, pretrained.x_std, scale, meta,
                     device)
