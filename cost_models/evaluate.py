"""How well cost models predict measured latencies: the metrics and the comparison routine.

* :func:`metrics`: the measures the latency-predictor literature uses, RMSE (ms), MAPE (%),
  the share of networks within ±10 % (%), Kendall tau and Spearman rho. Proxies that are
  not latencies (``flops``, ``params``) only rank, so for them only tau and rho are given
  (the absolute measures are None).
* :func:`measure_networks`: each graph timed whole on a runtime with
  :class:`~hant.cost_models.measured.MeasuredModel` (stored in its latency store, so a rerun
  measures nothing).
* :func:`compare`: every cost model's prediction for every graph against the measurements,
  with the metrics per model and the time one prediction takes; :meth:`Comparison.table`
  prints it.

A model is named by a spec string (anything :func:`hant.cost_models.get` accepts) or one of
the proxies in :data:`PROXIES`, or given as an object with ``graph_cost`` under a label of
the caller's choosing (e.g. a roofline calibrated in code).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
from scipy.stats import kendalltau, spearmanr
from torch.fx import GraphModule

from hant.cost_models.base import CostModel, get
from hant.cost_models.flops import FlopsModel
from hant.errors import CostModelError

__all__ = ["PROXIES", "metrics", "split_specs", "resolve", "measure_networks", "ModelResult", "Comparison", "compare"]

# Scores that rank networks but are not latencies: name -> score of a flops-model report.
PROXIES: dict[str, Callable[[Any], float]] = {
    "flops": lambda report: float(report.total.macs),
    "params": lambda report: float(report.total.params),
}


def metrics(predicted: Any, measured_s: Any, absolute: bool = True) -> dict:
    """Metrics of ``predicted`` against ``measured_s`` (seconds), one entry per network.

    Returns ``n``, ``rmse_ms``, ``mape_pct``, ``within10_pct`` (relative error |p - m| / m at most
    0.10), ``kendall_tau`` (tau-b) and ``spearman_rho``. With ``absolute=False`` (``predicted`` is a
    score, not seconds) the first three are None. Raises :class:`CostModelError` for fewer than
    two networks, different lengths, or measurements that are not positive and finite.
    """
    p, m = np.asarray(predicted, dtype=float), np.asarray(measured_s, dtype=float)
    if p.shape != m.shape or p.ndim != 1:
        raise CostModelError(f"need one prediction per measurement, got {p.shape} and {m.shape}")
    if len(m) < 2:
        raise CostModelError("metrics need at least two networks")
    if not np.all(np.isfinite(m)) or np.any(m <= 0):
        raise CostModelError("measured latencies must be positive and finite")
    constant = np.all(p == p[0])   # a constant prediction does not rank: tau and rho are undefined
    result = {
        "n": int(len(m)),
        "rmse_ms": None, "mape_pct": None, "within10_pct": None,
        "kendall_tau": math.nan if constant else float(kendalltau(p, m)[0]),
        "spearman_rho": math.nan if constant else float(spearmanr(p, m)[0]),
    }
    if absolute:
        rel = np.abs(p - m) / m
        result.update(rmse_ms=float(np.sqrt(np.mean((p - m) ** 2)) * 1e3), mape_pct=float(np.mean(rel) * 100),
                      within10_pct=float(np.mean(rel <= 0.10 + 1e-12) * 100))
    return result


def split_specs(text: str) -> list[str]:
    """Split ``"SPEC[,SPEC...]"``; a part ``name=value`` is an option of the spec before it.

    ``"roofline:cpu,lut:cpu-onnxruntime,db=x.db,flops"`` gives
    ``["roofline:cpu", "lut:cpu-onnxruntime,db=x.db", "flops"]``.
    """
    specs: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, eq, _ = part.partition("=")
        if eq and ":" not in name:
            if not specs:
                raise CostModelError(f"option {part!r} comes before any cost-model spec in {text!r}")
            specs[-1] += "," + part
        else:
            specs.append(part)
    if not specs:
        raise CostModelError(f"no cost-model spec in {text!r}; give e.g. roofline:cpu,flops")
    return specs


def resolve(spec: str | CostModel) -> tuple[CostModel, Callable[[Any], float] | None]:
    """The model for a spec or object, and the proxy score it gives (None: its latency)."""
    if isinstance(spec, str) and spec in PROXIES:
        return FlopsModel(), PROXIES[spec]
    model = get(spec)
    if isinstance(model, FlopsModel):       # the flops model prices no latency: it ranks by MACs
        return model, PROXIES["flops"]
    return model, None


def measure_networks(graphs: Mapping[str, GraphModule], runtime: str = "onnxruntime", threads: int | None = None,
                     db: Any = None, device: str = "cpu", progress: bool = True) -> dict[str, float]:
    """Seconds per run of each graph timed whole on ``device``/``runtime`` (stored in ``db``, reused).

    ``db`` is a store path or :class:`~hant.cost_models.store.LatencyStore` (None: the default
    store). Shows a tqdm bar unless ``progress`` is False.
    """
    from tqdm.auto import tqdm

    from hant.cost_models.measured import MeasuredModel

    model = MeasuredModel(device, runtime, threads=threads, store=db)
    measured = {}
    bar = tqdm(graphs.items(), desc=f"measure {runtime}", unit="net", disable=not progress)
    for name, gm in bar:
        bar.set_postfix(network=name)
        measured[name] = model.graph_latency(gm)
    bar.close()
    return measured


@dataclass
class ModelResult:
    """One cost model's predictions (seconds, or a score for proxies), metrics and prediction time."""
    label: str
    predicted: dict[str, float]
    metrics: dict
    seconds_per_prediction: float
    proxy: bool
    failed: dict[str, str] = field(default_factory=dict)   # network -> why the model could not predict it


@dataclass
class Comparison:
    """Every model against the measurements; :meth:`table` renders it."""
    measured_s: dict[str, float]
    results: list[ModelResult] = field(default_factory=list)

    def rows(self) -> list[list[Any]]:
        """One row per model: label, networks scored, tau, rho, ±10 %, MAPE, RMSE, ms per prediction
        (None: not defined)."""
        return [[r.label, r.metrics["n"], r.metrics["kendall_tau"], r.metrics["spearman_rho"],
                 r.metrics["within10_pct"], r.metrics["mape_pct"], r.metrics["rmse_ms"],
                 r.seconds_per_prediction * 1e3] for r in self.results]

    def table(self, fmt: str = "simple") -> str:
        """The metrics table (``tabulate`` format ``fmt``); '—' where a metric is not defined."""
        from tabulate import tabulate

        def cell(value, digits):
            return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"

        body = [[label, str(n), cell(tau, 3), cell(rho, 3), cell(w, 0), cell(mape, 1), cell(rmse, 2), cell(ms, 2)]
                for label, n, tau, rho, w, mape, rmse, ms in self.rows()]
        headers = ["model", "networks", "Kendall τ", "Spearman ρ", "±10 % (%)", "MAPE (%)", "RMSE (ms)", "ms/prediction"]
        return tabulate(body, headers, tablefmt=fmt, disable_numparse=True)

    def networks_table(self, fmt: str = "simple") -> str:
        """Measured milliseconds per network beside each model's prediction (ms; proxies as given)."""
        from tabulate import tabulate

        headers = ["network", "measured (ms)"] + [r.label for r in self.results]
        body = []
        for name, m in sorted(self.measured_s.items(), key=lambda kv: kv[1]):
            row = [name, f"{m * 1e3:.2f}"]
            for r in self.results:
                v = r.predicted.get(name)
                row.append("failed" if v is None else f"{v:.3g}" if r.proxy else f"{v * 1e3:.2f}")
            body.append(row)
        return tabulate(body, headers, tablefmt=fmt, disable_numparse=True)


def compare(graphs: Mapping[str, GraphModule], measured_s: Mapping[str, float],
            models: Mapping[str, str | CostModel] | list[str]) -> Comparison:
    """Predict every graph with every model and score the predictions against ``measured_s``.

    ``models``: spec strings (labelled by themselves) or ``{label: spec or model object}``.
    Each prediction is ``graph_cost(gm).total.latency_s`` (a proxy's score for ``flops`` and
    ``params``), timed with ``time.perf_counter``; the figure is the median over the graphs.
    A model that raises :class:`CostModelError` for a graph is scored on the other graphs, and
    the result's ``failed`` says why (its metrics' ``n`` counts the graphs scored; with fewer than
    two, every metric is None). Raises :class:`CostModelError` for a graph without a
    measurement, a bad spec, or fewer than two graphs.
    """
    if len(graphs) < 2:
        raise CostModelError(f"comparing cost models needs at least two networks, got {len(graphs)}")
    missing = [name for name in graphs if name not in measured_s]
    if missing:
        raise CostModelError(f"no measurement for {', '.join(missing)}; measure every graph first")
    named = {m: m for m in models} if not isinstance(models, Mapping) else dict(models)
    measured = {name: float(measured_s[name]) for name in graphs}
    comparison = Comparison(measured)
    for label, spec in named.items():
        model, proxy = resolve(spec)
        predicted, seconds, failed = {}, [], {}
        for name, gm in graphs.items():
            start = time.perf_counter()
            try:
                report = model.graph_cost(gm)
            except CostModelError as exc:
                failed[name] = str(exc)
                continue
            seconds.append(time.perf_counter() - start)
            predicted[name] = proxy(report) if proxy else float(report.total.latency_s)
        names = list(predicted)
        if len(names) >= 2:
            scores = metrics([predicted[n] for n in names], [measured[n] for n in names], absolute=proxy is None)
        else:
            scores = dict.fromkeys(("rmse_ms", "mape_pct", "within10_pct", "kendall_tau", "spearman_rho"), None)
            scores["n"] = len(names)
        comparison.results.append(ModelResult(label, predicted, scores,
                                              float(np.median(seconds)) if seconds else math.nan,
                                              proxy is not None, failed))
    return comparison
