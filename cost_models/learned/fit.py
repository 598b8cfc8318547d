"""Training and evaluating the learned predictors.

* :func:`train` fits a ``"gnn"`` or ``"perop"`` predictor to featurised graphs and latencies
  (seconds) on log latency;
* :func:`fit_db` trains from the networks of a latency store (``hant profile``): each stored
  spec is built with :func:`hant.cost_models.netspace.build`, traced and featurised;
* :func:`fit_table` trains from any table of (architecture, latency) rows, one device
  column, with a network-family builder (``"nb201"``) turning architecture strings into
  graphs;
* :func:`metrics` gives the measures the literature uses: RMSE, MAPE, the share within
  ±10 %, Kendall tau and Spearman rho.

Both fitters hold out rows they never train on and report the metrics on them. ``fit_table``
also carves a validation split from its training rows (:func:`validation_size`): those rows
only stop training early, so the scored rows never steer a fit. :class:`PreparedGraphs`
batches many graphs once for scoring several predictors on them.
"""

from __future__ import annotations

import csv
import gzip
import math
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.stats import kendalltau, spearmanr

from hant.cost_models.learned.features import GraphFeatures, featurize
from hant.cost_models.learned.perop import FUSION_PROFILES
from hant.cost_models.learned.predictor import MODEL_KINDS, Predictor
from hant.errors import CostModelError

__all__ = ["DEFAULT_CONFIG", "TABLE_CONFIG", "validation_size", "FitResult", "PreparedGraphs", "Table", "read_table", "metrics", "format_metrics", "train", "fit_db",
           "fit_table", "get_builder", "BUILDERS"]

DEFAULT_CONFIG = {
    "gnn": {"hidden": 32, "layers": 3, "steps": 300, "lr": 1e-2, "weight_decay": 1e-4, "batch_graphs": 1024,
            "eval_every": 25},
    "perop": {"hidden": 64, "fusion": "fused", "steps": 400, "lr": 1e-2, "weight_decay": 1e-4,
              "batch_graphs": 1024, "eval_every": 25},
}
"""Defaults of :func:`train` (and so of :func:`fit_db`); ``eval_every`` matters only with validation rows."""

TABLE_CONFIG = {"gnn": {"layers": 2, "hidden": 32}, "perop": {"fusion": "fused"}}
"""What :func:`fit_table` changes in :data:`DEFAULT_CONFIG`: chosen on validation rows of three NAS-Bench-201
development columns by ``benchmarks/nb201_devices.py --tune`` (never on scored rows)."""


def validation_size(train_size: int) -> int:
    """Rows :func:`fit_table` carves from ``train_size`` training rows for early stopping.

    A tenth of them from 50 rows on; below that a validation loss on a handful of rows is
    noise, so training runs its fixed number of steps.
    """
    return int(round(0.1 * train_size)) if train_size >= 50 else 0


@dataclass
class FitResult:
    """A trained predictor, its held-out metrics and how long fitting took."""
    predictor: Predictor
    metrics: dict
    fit_seconds: float
    train_rows: list[int] = field(default_factory=list)
    test_rows: list[int] = field(default_factory=list)
    validation_rows: list[int] = field(default_factory=list)


def metrics(predicted_s: np.ndarray, measured_s: np.ndarray) -> dict:
    """RMSE (ms), MAPE (%), share within ±10 % (%), Kendall tau and Spearman rho."""
    p, m = np.asarray(predicted_s, dtype=float), np.asarray(measured_s, dtype=float)
    if len(p) < 2:
        raise CostModelError("metrics need at least two held-out rows; lower train_size or holdout")
    rel = np.abs(p - m) / m
    return {
        "n": int(len(m)),
        "rmse_ms": float(np.sqrt(np.mean((p - m) ** 2)) * 1e3),
        "mape_pct": float(np.mean(rel) * 100),
        "within10_pct": float(np.mean(rel <= 0.10) * 100),
        "kendall_tau": float(kendalltau(p, m)[0]),
        "spearman_rho": float(spearmanr(p, m)[0]),
    }


def format_metrics(m: dict) -> str:
    """One line for a terminal."""
    return (f"held-out n={m['n']}: RMSE {m['rmse_ms']:.4g} ms, MAPE {m['mape_pct']:.2f}%, "
            f"±10% {m['within10_pct']:.1f}%, Kendall tau {m['kendall_tau']:.4f}, Spearman rho {m['spearman_rho']:.4f}")


# ------------------------------------------------------------------ training

def _normalisation(rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    mean = rows.mean(axis=0)
    std = rows.std(axis=0)
    std[std < 1e-6] = 1.0
    return torch.from_numpy(mean.astype(np.float32)), torch.from_numpy(std.astype(np.float32))


def _log_error(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.mean((torch.log(predicted.clamp_min(1e-9)) - target) ** 2)


def optimise(net: torch.nn.Module, forward, batches: list, cfg: dict, validation: tuple | None = None) -> dict:
    """Adam with cosine decay on the squared log error; early stopping on ``validation``.

    ``forward(batch)`` gives the network output for a batch of :data:`batches`, a list of
    (batch, log target) pairs cycled through for ``cfg["steps"]`` steps. With
    ``validation`` = (batch, log target), the validation error is computed every
    ``cfg["eval_every"]`` steps and at the end, and the weights of the best evaluation are
    kept. The validation error is the mean absolute log error: a few networks whose runtime
    pruned them to almost nothing (NAS-Bench-201 phones) would dominate a squared error and
    stop training at step 0. Returns what happened: final training loss, and with
    validation the best step and its mean absolute log error.
    """
    steps = int(cfg["steps"])
    opt = torch.optim.Adam(net.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    best = (math.inf, 0, None)

    def evaluate(step: int):
        nonlocal best
        net.eval()
        with torch.no_grad():
            loss = float(torch.mean(torch.abs(torch.log(forward(validation[0]).clamp_min(1e-9)) - validation[1])))
        net.train()
        if loss < best[0]:
            best = (loss, step, {k: v.detach().clone() for k, v in net.state_dict().items()})

    net.train()
    loss = torch.zeros(())
    for step in range(steps):
        if validation is not None and step % int(cfg.get("eval_every", 25)) == 0:
            evaluate(step)
        batch, target = batches[step % len(batches)]
        loss = _log_error(forward(batch), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    report = {"train_loss": float(loss.detach())}
    if validation is not None:
        evaluate(steps)
        net.load_state_dict(best[2])
        report.update(best_step=best[1], validation_mae_log=best[0])
    net.eval()
    return report


def train(kind: str, graphs: list[GraphFeatures], latency_s, *, config: dict | None = None, seed: int = 0,
          metadata: dict | None = None, validation: tuple[list[GraphFeatures], np.ndarray] | None = None
          ) -> Predictor:
    """Fit a predictor of ``kind`` to graphs and their latencies in seconds.

    ``config`` overrides :data:`DEFAULT_CONFIG` (sizes, fusion profile, steps, lr, ...).
    Adam on the squared error of log latency, over fixed mini-batches of ``batch_graphs``
    graphs, with a cosine learning-rate decay; reproducible for a given seed up to float
    rounding. ``validation`` = (graphs, latencies) never trained on: the weights of the step
    with the lowest validation loss are kept (early stopping) and ``metadata["validation"]``
    records that step and loss.
    """
    if kind not in MODEL_KINDS:
        raise CostModelError(f"unknown learned model {kind!r}; use one of {', '.join(MODEL_KINDS)}")
    y = _check_latencies(graphs, latency_s)
    cfg = dict(DEFAULT_CONFIG[kind], **(config or {}))
    if kind == "perop" and cfg["fusion"] not in FUSION_PROFILES:
        raise CostModelError(f"unknown fusion profile {cfg['fusion']!r}; use one of {', '.join(FUSION_PROFILES)}")
    torch.manual_seed(seed)
    net = Predictor.build_net(kind, cfg)
    probe = Predictor(kind, cfg, net, torch.zeros(1), torch.ones(1), 1.0)
    rows = [probe.rows(g)[0] for g in graphs]
    mean, std = _normalisation(np.concatenate(rows))
    units = float(np.mean([len(r) for r in rows]))
    scale = math.exp(float(np.mean(np.log(y)))) / units
    predictor = Predictor(kind, cfg, net, mean, std, scale, metadata)
    target = torch.from_numpy(np.log(y / scale)).float()
    order = np.random.default_rng(seed).permutation(len(graphs))
    size = int(cfg["batch_graphs"])
    batches = [(predictor.inputs([graphs[i] for i in order[k:k + size]]), target[order[k:k + size]])
               for k in range(0, len(graphs), size)]
    held = None
    if validation is not None and len(validation[0]):
        y_val = _check_latencies(validation[0], validation[1])
        held = (predictor.inputs(list(validation[0])), torch.from_numpy(np.log(y_val / scale)).float())
    report = optimise(net, predictor.forward, batches, cfg, held)
    predictor.metadata.setdefault("train_loss", report.pop("train_loss"))
    if held is not None:
        predictor.metadata["validation"] = dict(report, rows=len(held[1]))
    return predictor


def _check_latencies(graphs, latency_s) -> np.ndarray:
    y = np.asarray(latency_s, dtype=np.float64)
    if len(graphs) != len(y) or len(y) == 0:
        raise CostModelError(f"need one latency per graph and at least one graph, got {len(graphs)} graphs "
                             f"and {len(y)} latencies")
    if not np.all(np.isfinite(y)) or np.any(y <= 0):
        raise CostModelError("latencies must be positive and finite")
    return y


class PreparedGraphs:
    """Graphs batched once, then predicted by many predictors of one kind and layout.

    Scoring several predictors on thousands of held-out graphs would otherwise batch and
    compress the same graphs for each of them. The batches are built with identity
    normalisation; each predictor's own normalisation is applied to the (few) distinct rows.
    ``kind`` and ``config`` fix what the batches hold (the GNN's message-passing depth, the
    per-op fusion profile); predicting with a predictor of another layout raises.
    """

    def __init__(self, graphs: list[GraphFeatures], kind: str, config: dict, chunk: int = 2000):
        cfg = dict(DEFAULT_CONFIG[kind], **config)
        probe = Predictor(kind, cfg, Predictor.build_net(kind, cfg), torch.zeros(1), torch.ones(1), 1.0)
        self.kind, self.layout = kind, self._layout(kind, cfg)
        self.chunks = [probe.inputs(graphs[k:k + chunk]) for k in range(0, len(graphs), chunk)]

    @staticmethod
    def _layout(kind: str, cfg: dict):
        return cfg["layers"] if kind == "gnn" else cfg["fusion"]

    @torch.no_grad()
    def predict(self, predictor: Predictor) -> np.ndarray:
        """Latency in seconds of every graph, by ``predictor``."""
        if predictor.kind != self.kind or self._layout(predictor.kind, predictor.config) != self.layout:
            raise CostModelError("these graphs were prepared for another predictor layout; prepare them again")
        out = []
        for batch in self.chunks:
            if self.kind == "gnn":
                plan = dict(batch["plan"], rows=(batch["plan"]["rows"] - predictor.x_mean) / predictor.x_std)
                batch = dict(batch, plan=plan)
            else:
                batch = dict(batch, rows=(batch["rows"] - predictor.x_mean) / predictor.x_std)
            out.append(predictor.forward(batch).double().numpy())
        return np.concatenate(out) * predictor.scale


# ------------------------------------------------------------------ tables

@dataclass
class Table:
    """Rows of a latency table: architecture strings and one column of latencies (seconds)."""
    architectures: list[str]
    latency_s: np.ndarray
    column: str
    path: str


def _open_text(path: str):
    return gzip.open(path, "rt", newline="") if path.endswith(".gz") else open(path, newline="")


def read_table(path: str | os.PathLike, target_column: str, arch_column: str, unit_s: float = 1e-3) -> Table:
    """Read (architecture, latency) rows of ``target_column`` from a CSV (optionally gzipped).

    Latencies are in ``unit_s`` seconds per unit (milliseconds by default). Raises
    :class:`CostModelError` for a missing file or column, or a row that is short or whose
    latency is not a positive number.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CostModelError(f"no table at {path!r}")
    with _open_text(path) as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise CostModelError(f"{path!r} is empty; expected a header row")
        for name in (arch_column, target_column):
            if name not in header:
                raise CostModelError(f"{path!r} has no column {name!r}; its columns are {', '.join(header)}")
        a, t = header.index(arch_column), header.index(target_column)
        archs, values = [], []
        for line, row in enumerate(reader, start=2):
            if len(row) != len(header):
                raise CostModelError(f"{path!r} line {line}: {len(row)} fields, the header has {len(header)}")
            try:
                value = float(row[t])
            except ValueError:
                value = float("nan")
            if not math.isfinite(value) or value <= 0:
                raise CostModelError(f"{path!r} line {line}: latency {row[t]!r} in {target_column!r} is not a "
                                     "positive number")
            archs.append(row[a])
            values.append(value * unit_s)
    if not archs:
        raise CostModelError(f"{path!r} has no data rows")
    return Table(archs, np.asarray(values), target_column, path)


def get_builder(name: str):
    """The network family ``name`` names: an object with ``arch_column`` and ``featurize(arch)``."""
    if name not in BUILDERS:
        raise CostModelError(f"unknown builder {name!r}; known: {', '.join(sorted(BUILDERS))}")
    return BUILDERS[name]()


def _nb201_family():
    from hant.cost_models.learned.nb201 import family
    return family()


BUILDERS = {"nb201": _nb201_family}


def fit_table(table_path: str | os.PathLike, target_column: str, builder: str = "nb201", train_size: int = 900,
              seed: int = 0, out: str | os.PathLike | None = None, model: str = "gnn", config: dict | None = None,
              unit_s: float = 1e-3, test_size: int | None = None, verbose: bool = False,
              val_size: int | None = None) -> FitResult:
    """Train a predictor for one device column of a latency table and score it on the rest.

    ``train_size`` rows (drawn with ``seed``) train; the other rows (or ``test_size`` of them,
    drawn with the same seed) are held out and scored with :func:`metrics`. ``val_size`` of
    the training rows (default :func:`validation_size`) are kept out of the gradient steps
    and used only for early stopping; the held-out rows are scored once, at the end, and
    never steer training. The builder turns the table's architecture column into graphs.
    ``config`` overrides :data:`TABLE_CONFIG` over :data:`DEFAULT_CONFIG`. ``out`` saves the
    predictor file (usable as ``learned:OUT``). Raises :class:`CostModelError` for a missing
    column, a malformed row, an unknown builder or a train size that leaves fewer than two
    rows to score.
    """
    family = get_builder(builder)
    if model not in MODEL_KINDS:
        raise CostModelError(f"unknown learned model {model!r}; use one of {', '.join(MODEL_KINDS)}")
    table = read_table(table_path, target_column, family.arch_column, unit_s)
    n = len(table.architectures)
    if not 1 <= train_size <= n - 2:
        raise CostModelError(f"train_size must be between 1 and {n - 2} for a table of {n} rows, got {train_size}")
    n_val = validation_size(train_size) if val_size is None else val_size
    if not 0 <= n_val < train_size:
        raise CostModelError(f"val_size must be between 0 and train_size - 1 ({train_size - 1}), got {n_val}")
    order = np.random.default_rng(seed).permutation(n)
    fit_rows = sorted(order[:train_size - n_val].tolist())
    val_rows = sorted(order[train_size - n_val:train_size].tolist())
    test_rows = order[train_size:]
    test_rows = sorted((test_rows[:test_size] if test_size else test_rows).tolist())
    started = time.perf_counter()
    graphs = [family.featurize(table.architectures[i]) for i in fit_rows]
    validation = ([family.featurize(table.architectures[i]) for i in val_rows], table.latency_s[val_rows]) \
        if val_rows else None
    metadata = {"source": os.path.basename(os.fspath(table_path)), "target_column": target_column,
                "builder": builder, "train_size": train_size, "validation_rows": len(val_rows), "seed": seed,
                "unit_s": unit_s}
    cfg = dict(TABLE_CONFIG.get(model, {}), **(config or {}))
    predictor = train(model, graphs, table.latency_s[fit_rows], config=cfg, seed=seed, metadata=metadata,
                      validation=validation)
    fit_seconds = time.perf_counter() - started
    predicted = predictor.predict([family.featurize(table.architectures[i]) for i in test_rows])
    result = _held_out(predictor, predicted, table.latency_s[test_rows], fit_seconds, sorted(fit_rows + val_rows),
                       test_rows, out, f"{target_column}: {model} on {train_size} rows" if verbose else None)
    result.validation_rows = val_rows
    return result


def _held_out(predictor, predicted, measured, fit_seconds: float, train_rows, test_rows, out, label: str | None
              ) -> FitResult:
    """Score the held-out rows, record them in the predictor, print (when ``label``) and save."""
    result = metrics(predicted, measured)
    predictor.metadata.update(held_out=result, fit_seconds=fit_seconds)
    if label is not None:
        print(f"{label} in {fit_seconds:.1f} s; {format_metrics(result)}")
    if out is not None:
        predictor.save(out)
    return FitResult(predictor, result, fit_seconds, train_rows, test_rows)


# ------------------------------------------------------------------ the latency store

def fit_db(db_path: str | os.PathLike, model: str = "gnn", out: str | os.PathLike | None = None,
           holdout: float = 0.2, seed: int = 0, runtime: str | None = None, device: str | None = None,
           config: dict | None = None, verbose: bool = True, kernel_networks: list | None = None
           ) -> FitResult:
    """Train on the networks of a latency store and score the held-out ``holdout`` share.

    Each stored spec is built with :func:`hant.cost_models.netspace.build`, traced at its
    stored input shape and featurised once. ``model="kernel"`` trains the kernel predictor
    (:mod:`~hant.cost_models.learned.kernel_model`) on the store's kernels timed alone
    (``hant profile --kernels N``) and calibrates its network sum on the training networks (both
    at their fastest timing block, ``Spread.min_s``; it is still scored against the medians), with
    the calibration terms :func:`~hant.cost_models.learned.kernel_model.select_terms` picks by
    5-fold cross-validation on the calibration networks (never on the held-out ones);
    ``kernel_networks`` may give each stored network's
    :class:`~hant.cost_models.learned.kernels.KernelNetwork` (in store order) to skip building
    and tracing them. Prints the held-out RMSE, MAPE, ±10 % share and Kendall
    tau when ``verbose``. Raises :class:`CostModelError` for a missing store or one with fewer
    than 4 networks (or, for ``kernel``, fewer than 2 kernels) for the runtime/device asked.
    """
    from hant.cost_models.netspace import build
    from hant.cost_models.store import LatencyStore
    from hant.graphs import trace

    if model not in MODEL_KINDS + ("kernel",):
        raise CostModelError(f"unknown learned model {model!r}; use one of {', '.join(MODEL_KINDS + ('kernel',))}")
    if not os.path.isfile(os.fspath(db_path)):
        raise CostModelError(f"no latency store at {os.fspath(db_path)!r}; make one with `hant profile --out PATH`")
    if not 0 < holdout < 1:
        raise CostModelError(f"holdout must be between 0 and 1, got {holdout}")
    with LatencyStore(db_path) as store:
        records = list(store.networks(runtime=runtime, device=device))
        kernels = list(store.ops(kind="kernel", runtime=runtime, device=device)) if model == "kernel" else []
    if len(records) < 4:
        raise CostModelError(f"{os.fspath(db_path)!r} holds {len(records)} networks for runtime={runtime}, "
                             f"device={device}; profile at least 4 (`hant profile --n ...`)")
    started = time.perf_counter()
    y = np.array([r.latency_s for r in records])
    order = np.random.default_rng(seed).permutation(len(records))
    n_test = max(2, int(round(holdout * len(records))))
    test_rows, train_rows = sorted(order[:n_test].tolist()), sorted(order[n_test:].tolist())
    metadata = {"source": os.path.basename(os.fspath(db_path)), "runtime": runtime or records[0].runtime,
                "device": device or records[0].device, "networks": len(records), "seed": seed}
    if model == "kernel":
        from hant.cost_models.learned.kernel_model import select_terms, train_kernels
        from hant.cost_models.learned.kernels import kernel_network

        if len(kernels) < 2:
            raise CostModelError(f"{os.fspath(db_path)!r} holds {len(kernels)} kernels timed alone; time some "
                                 "with `hant profile --kernels N`")
        if kernel_networks is None:
            kernel_networks = [kernel_network(trace(build(r.spec), torch.randn(*r.input_shape))) for r in records]
        predictor = train_kernels([k.signature["config"] for k in kernels], [k.spread.min_s for k in kernels],
                                  config=config, seed=seed, metadata=metadata)
        fastest = np.array([r.spread.min_s for r in records])
        calibration_nets = [kernel_networks[i] for i in train_rows]
        design = predictor.design(calibration_nets)
        terms, scores = select_terms(design, fastest[train_rows]) if len(train_rows) >= 10 else (
            ("kernel_sum", "kernels", "constant"), {})
        predictor.calibrate(calibration_nets, fastest[train_rows], terms, design=design)
        predictor.metadata["calibration"]["cv_mape_pct"] = {"+".join(t): v for t, v in scores.items()}
        fit_seconds = time.perf_counter() - started
        predicted = predictor.predict_networks([kernel_networks[i] for i in test_rows])
        return _held_out(predictor, predicted, y[test_rows], fit_seconds, train_rows, test_rows, out,
                         f"kernel on {len(kernels)} kernels, calibrated on {len(train_rows)} networks"
                         if verbose else None)
    graphs = [featurize(trace(build(r.spec), torch.randn(*r.input_shape))) for r in records]
    predictor = train(model, [graphs[i] for i in train_rows], y[train_rows], config=config, seed=seed,
                      metadata=metadata)
    fit_seconds = time.perf_counter() - started
    return _held_out(predictor, predictor.predict([graphs[i] for i in test_rows]), y[test_rows], fit_seconds,
                     train_rows, test_rows, out, f"{model} on {len(train_rows)} networks" if verbose else None)
