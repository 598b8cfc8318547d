"""Latency prediction for 15,625 NAS-Bench-201 networks on 21 real devices.

For every device column of the shipped table (hant/cost_models/learned/data), rank
correlation (Spearman rho, Kendall tau) and the share of networks within ±10 % of the
measured latency, on held-out rows, for:

* baselines without training: FLOPs (MACs), parameter count, the roofline model of the
  closest preset (not fitted to the device, so its ±10 % is reported as is);
* the graph network (``gnn``) and the per-kernel regressor (``perop``) trained on N = 10,
  100 and 900 rows of that device (from N = 50 on, a tenth of the N rows is kept for early
  stopping and never trained on);
* few-shot transfer (:mod:`hant.cost_models.learned.transfer`): a multi-device graph network
  pre-trained on the other devices' columns (device folds stratified by class, below), then
  adapted to the device from its latencies on 10 reference networks only.

**Rows.** A seed-0 permutation of the 15,625 rows. Its first 900 rows are the training pool:
the N training rows of every method, the few-shot pre-training rows and the 10 reference
networks all come from it. Every method is scored on the same rows, those after the first 900
(``--test-size`` caps them for quick runs); scored rows are touched only for the final table.

**Hyperparameters** were chosen with ``--tune`` on validation rows of three development
columns only (1080ti_1, gold_6240, pixel3: one GPU, one server CPU, one phone): models trained
on the first N (10, 100, 800) pool rows, scored on pool rows 800-899. The few-shot head's ridge
strength is chosen inside pre-training, on pre-training rows (see transfer.py).

**Few-shot folds.** Fold k holds out the k-th device of every class (GPU batch 1, GPU batch 32,
GPU batch 256, server CPU, phone), so every class stays represented in each pre-training while
a device never is; classes list devices by GPU model, so a GPU's three batch sizes share a fold.

    nice -n 15 python benchmarks/nb201_devices.py --tune --columns 1080ti_1   # per dev column
    nice -n 15 python benchmarks/nb201_devices.py          # all 21 devices, resumable (runs/nb201/full)
    nice -n 15 python benchmarks/nb201_devices.py --quick  # 7 devices, 3,000 scored rows

Per-column results persist under ``--work`` (default runs/nb201/full, runs/nb201/quick), so a
killed run continues where it stopped. Writes benchmarks/results/nb201_devices.md.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import os
import platform
import sys
import time

import numpy as np
import torch
from scipy.stats import kendalltau, spearmanr
from tabulate import tabulate
from tqdm import tqdm

from hant.cost_models import get
from hant.cost_models.learned import data_path, metrics, train
from hant.cost_models.learned.fit import PreparedGraphs, validation_size
from hant.cost_models.learned.nb201 import family

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results", "nb201_devices.md")
RUNS = os.path.join(ROOT, "runs", "nb201")
TRAIN_SIZES = (10, 100, 900)
POOL = 900
QUICK_COLUMNS = ("1080ti_1", "2080ti_32", "titanxp_256", "gold_6240", "silver_4114", "pixel3", "samsung_a50")
DEV_COLUMNS = ("1080ti_1", "gold_6240", "pixel3")
TUNE_SIZES = (10, 100, 800)          # tuning: train on the first N pool rows ...
TUNE_VALIDATION = (800, 900)         # ... and score on these pool rows
GRID = {"gnn": ({"layers": 2, "hidden": 32}, {"layers": 2, "hidden": 64}),
        "perop": ({"fusion": "eager"}, {"fusion": "fused"})}
CLASSES = ("GPU b1", "GPU b32", "GPU b256", "server CPU", "phone")


def device_class(column: str) -> str:
    if column.startswith(("gold", "silver")):
        return "server CPU"
    if column.startswith(("1080ti", "2080ti", "titan")):
        return "GPU b" + column.rsplit("_", 1)[1]
    return "phone"


ROOFLINE_PRESET = {"GPU b1": "roofline:a100", "GPU b32": "roofline:a100", "GPU b256": "roofline:a100",
                   "server CPU": "roofline:cpu", "phone": "roofline:raspi4"}


def folds_of(columns: list[str]) -> list[list[str]]:
    """Fold k: the k-th device (table order) of every class."""
    by_class = {c: [col for col in columns if device_class(col) == c] for c in CLASSES}
    n = max(len(v) for v in by_class.values())
    return [[v[k] for v in by_class.values() if k < len(v)] for k in range(n)]


def read_all(path: str):
    with gzip.open(path, "rt", newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        rows = list(reader)
    archs = [r[1] for r in rows]
    y = np.array([[float(v) for v in r[2:]] for r in rows]) * 1e-3
    return header[2:], archs, y


def ranks_only(score: np.ndarray, measured: np.ndarray) -> dict:
    return {"spearman_rho": float(spearmanr(score, measured)[0]), "kendall_tau": float(kendalltau(score, measured)[0]),
            "within10_pct": float("nan")}


def _key(config: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(config.items()))


def _fit(kind: str, graphs, y, config: dict, n: int):
    """Train on n rows; from 50 rows on, the last tenth of them only steer early stopping."""
    n_val = validation_size(n)
    validation = (graphs[n - n_val:n], y[n - n_val:n]) if n_val else None
    return train(kind, graphs[:n - n_val], y[:n - n_val], config=config, seed=0, validation=validation)


# ------------------------------------------------------------------ tuning (validation rows only)

def tune(args, columns, archs, y_all, order) -> int:
    fam = family()
    pool = [fam.featurize(archs[i]) for i in order[:POOL]]
    val_rows = order[TUNE_VALIDATION[0]:TUNE_VALIDATION[1]]
    val = pool[TUNE_VALIDATION[0]:TUNE_VALIDATION[1]]
    os.makedirs(os.path.join(RUNS, "tuning"), exist_ok=True)
    for column in (args.columns.split(",") if args.columns else DEV_COLUMNS):
        if column not in DEV_COLUMNS:
            print(f"{column} is not a development column ({', '.join(DEV_COLUMNS)})", file=sys.stderr)
            return 2
        path = os.path.join(RUNS, "tuning", f"{column}.json")
        done = json.load(open(path)) if os.path.isfile(path) else {}
        j = columns.index(column)
        y = y_all[order[:POOL], j]
        jobs = [(k, c, n) for k in GRID for c in GRID[k] for n in TUNE_SIZES if f"{k}|{_key(c)}|{n}" not in done]
        for kind, config, n in tqdm(jobs, desc=f"tune {column}", file=sys.stderr):
            t0 = time.perf_counter()
            predictor = _fit(kind, pool, y, config, n)
            rho = float(spearmanr(predictor.predict(val), y_all[val_rows, j])[0])
            done[f"{kind}|{_key(config)}|{n}"] = {"rho": rho, "seconds": time.perf_counter() - t0}
            with open(path, "w") as f:
                json.dump(done, f, indent=1)
    return 0


def tuned_configs() -> tuple[dict, dict]:
    """(config per (kind, N), validation scores) from the tuning files of all development columns."""
    scores = {}
    for column in DEV_COLUMNS:
        path = os.path.join(RUNS, "tuning", f"{column}.json")
        if not os.path.isfile(path):
            raise SystemExit(f"no tuning result for {column}; run: python benchmarks/nb201_devices.py --tune")
        for key, v in json.load(open(path)).items():
            scores.setdefault(key, {})[column] = v["rho"]
    chosen = {}
    for kind, grid in GRID.items():
        for n, tuned_n in zip(TRAIN_SIZES, TUNE_SIZES):
            mean = {_key(c): float(np.mean(list(scores[f"{kind}|{_key(c)}|{tuned_n}"].values()))) for c in grid}
            chosen[(kind, n)] = grid[[_key(c) for c in grid].index(max(mean, key=mean.get))]
    return chosen, scores


# ------------------------------------------------------------------ the benchmark

def baselines(archs, fam, held_out) -> dict:
    """FLOPs, params and roofline latencies of the scored networks (cached on disk)."""
    path = os.path.join(RUNS, "baselines.npz")
    if os.path.isfile(path):
        cached = dict(np.load(path))
        if len(cached["index"]) == len(archs):
            return {k: v[held_out] for k, v in cached.items() if k != "index"}
    flops = get("flops")
    counts = np.array([fam.node_sum(flops, a) for a in tqdm(archs, desc="flops", file=sys.stderr)])
    out = {"macs": counts[:, 1], "params": counts[:, 2]}
    for spec in sorted(set(ROOFLINE_PRESET.values())):
        model = get(spec)
        out[spec] = np.array([fam.node_sum(model, a)[0] for a in tqdm(archs, desc=spec, file=sys.stderr)])
    os.makedirs(RUNS, exist_ok=True)
    np.savez(path, index=np.arange(len(archs)), **out)
    return {k: v[held_out] for k, v in out.items()}


def pretrained_for(fold_index: int, fold, columns, archs, y_all, order, fam, work: str, config: dict):
    """The few-shot model pre-trained without ``fold`` (trained once, then read from ``work``)."""
    from hant.cost_models.learned.transfer import Pretrained, pretrain
    path = os.path.join(work, f"pretrained_fold{fold_index}.pt")
    if os.path.isfile(path):
        return Pretrained.load(path)
    sources = [c for c in columns if c not in fold]
    idx = [columns.index(c) for c in sources]
    pool = order[:POOL]
    t0 = time.perf_counter()
    model = pretrain([archs[i] for i in pool], y_all[np.ix_(pool, idx)], sources, fam, config=config, seed=0)
    seconds = time.perf_counter() - t0
    model.metadata["pretrain_seconds"] = seconds
    model.save(path)
    return model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tune", action="store_true", help="choose hyperparameters on development columns' "
                        "validation rows (writes runs/nb201/tuning)")
    parser.add_argument("--quick", action="store_true", help="7 representative devices, 3,000 held-out rows")
    parser.add_argument("--columns", help="comma-separated device columns (default: all 21, or the quick 7)")
    parser.add_argument("--test-size", type=int, help="held-out rows scored (default all 14,725; quick 3,000)")
    parser.add_argument("--work", help="folder for per-column results and pre-trained models "
                        "(default runs/nb201/full or runs/nb201/quick)")
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--note", default="", help="a sentence on how this run was executed, for the table")
    args = parser.parse_args()
    torch.set_num_threads(1)

    columns, archs, y_all = read_all(data_path())
    order = np.random.default_rng(0).permutation(len(archs))
    if args.tune:
        return tune(args, columns, archs, y_all, order)
    chosen, tune_scores = tuned_configs()
    selected = args.columns.split(",") if args.columns else (list(QUICK_COLUMNS) if args.quick else columns)
    test_size = args.test_size or (3000 if args.quick else None)
    held_out = order[POOL:POOL + test_size] if test_size else order[POOL:]
    work = args.work or os.path.join(RUNS, "quick" if args.quick else "full")
    os.makedirs(work, exist_ok=True)

    fam = family()
    started = time.perf_counter()
    for a in tqdm(archs, desc="featurise", file=sys.stderr):
        fam.featurize(a)
    featurise_s = time.perf_counter() - started
    base = baselines(archs, fam, held_out)
    pool_graphs = [fam.featurize(archs[i]) for i in order[:POOL]]
    test_graphs = [fam.featurize(archs[i]) for i in held_out]
    prepared: dict = {}

    def scored(predictor):
        layout = (predictor.kind, predictor.config["layers"] if predictor.kind == "gnn" else predictor.config["fusion"])
        if layout not in prepared:
            cfg = {"layers": layout[1]} if layout[0] == "gnn" else {"fusion": layout[1]}
            prepared[layout] = PreparedGraphs(test_graphs, layout[0], cfg)
        return prepared[layout].predict(predictor)

    folds = folds_of(columns)
    methods = [f"{k} N={n}" for k in ("gnn", "perop") for n in TRAIN_SIZES] + ["few-shot N=10"]
    results = {}
    for column in selected:
        path = os.path.join(work, f"{column}.json")
        results[column] = json.load(open(path)) if os.path.isfile(path) else {}
    # few-shot first in each column: its pre-training per fold is the longest single step
    todo = [(c, m) for c in selected for m in methods[-1:] + methods[:-1] if m not in results[c]]
    bar = tqdm(total=len(selected) * len(methods), initial=len(selected) * len(methods) - len(todo),
               desc="fit+score", file=sys.stderr)
    for column, method in todo:
        res = results[column]
        j = columns.index(column)
        y_test, y_pool = y_all[held_out, j], y_all[order[:POOL], j]
        cls = device_class(column)
        if "FLOPs" not in res:
            res.update({"FLOPs": ranks_only(base["macs"], y_test), "params": ranks_only(base["params"], y_test),
                        "roofline": metrics(base[ROOFLINE_PRESET[cls]], y_test), "_fit_seconds": {}})
        bar.set_postfix_str(f"{column} {method}")
        if method.startswith("few-shot"):
            k = next(i for i, f in enumerate(folds) if column in f)
            pretrained = pretrained_for(k, folds[k], columns, archs, y_all, order, fam, work,
                                                    chosen[("gnn", 900)])
            from hant.cost_models.learned.transfer import adapt
            ref_rows = [archs.index(a) for a in pretrained.references]
            assert not set(ref_rows) & set(held_out.tolist()), "reference networks must not be scored"
            t0 = time.perf_counter()
            predictor = adapt(pretrained, fam, y_all[ref_rows, j])
            res["_fold"] = k
        else:
            kind, n = method.split(" N=")
            t0 = time.perf_counter()
            predictor = _fit(kind, pool_graphs, y_pool, chosen[(kind, int(n))], int(n))
        res["_fit_seconds"][method] = time.perf_counter() - t0
        res[method] = metrics(scored(predictor), y_test)
        with open(os.path.join(work, f"{column}.json"), "w") as f:
            json.dump(res, f, indent=1)
        bar.update()
        if all(m in res for m in methods):
            tqdm.write(f"{column}: " + ", ".join(f"{m} {res[m]['spearman_rho']:.3f}" for m in methods), file=sys.stderr)
    bar.close()
    pretrain_info = {}
    for k in range(len(folds)):
        path = os.path.join(work, f"pretrained_fold{k}.pt")
        if os.path.isfile(path):
            from hant.cost_models.learned.transfer import Pretrained
            pretrain_info[k] = Pretrained.load(path)
    write(args, results, featurise_s, len(held_out), folds, chosen, tune_scores,
          pretrain_info)
    return 0


def _mean(values) -> float:
    """Mean of the finite values (nan when there are none: ±10 % of rank-only baselines)."""
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def write(args, results, featurise_s, n_test, folds, chosen, tune_scores, pretrain_info) -> None:
    methods = ["FLOPs", "params", "roofline"] + [f"{k} N={n}" for k in ("gnn", "perop") for n in TRAIN_SIZES] \
        + ["few-shot N=10"]
    run = " --quick" if args.quick else (f" --columns {args.columns}" if args.columns else "")
    lines = ["# NAS-Bench-201 latency prediction on real devices", "",
             f"`nice -n 15 python benchmarks/nb201_devices.py{run}` ({len(results)} device columns) on {platform.machine()}, {os.cpu_count()} cores "
             f"shared with other jobs, torch {torch.__version__}, 1 thread. Data: HELP / HW-NAS-Bench measurements "
             "shipped in hant/cost_models/learned/data (MIT). " + args.note, "",
             f"**Rows.** Seed-0 permutation of the 15,625 networks; its first {POOL} rows are the training pool "
             f"(training rows of every method: the first N; few-shot pre-training rows; the 10 reference networks). "
             f"Scored: {n_test} held-out rows after the pool, the same for every method and device, used for this "
             "table only. From N = 50 on, the last tenth of the N training rows is a validation split, used only "
             "for early stopping (gnn/perop N=100 train on 90 rows, N=900 on 810).", "",
             "**Hyperparameters** were chosen on validation rows of three development columns only (1080ti_1, "
             "gold_6240, pixel3): models trained on the first N = 10 / 100 / 800 pool rows, scored on pool rows "
             "800-899 (`--tune`); the few-shot head's ridge strength is chosen inside pre-training on "
             "pre-training rows. No held-out row steered any choice.", ""]
    for metric, title in (("spearman_rho", "Spearman rho"), ("kendall_tau", "Kendall tau"),
                          ("within10_pct", "share within ±10 % (%)")):
        table = [[c] + [results[c][m][metric] for m in methods] for c in results]
        table.append(["**mean**"] + [_mean([results[c][m][metric] for c in results]) for m in methods])
        lines += [f"## {title}", "", tabulate(table, headers=["device"] + methods, tablefmt="github",
                                              floatfmt=".3f" if metric != "within10_pct" else ".1f"), ""]
    mean = {m: float(np.mean([results[c][m]["spearman_rho"] for c in results])) for m in methods}
    tau = {m: float(np.mean([results[c][m]["kendall_tau"] for c in results])) for m in methods}
    best900 = max(("gnn N=900", "perop N=900"), key=lambda m: mean[m])
    n_dev = len(results)
    lines += ["## Against the targets", "",
              f"- N = 900 ({best900}): mean rho {mean[best900]:.3f} (target ≥ 0.97: "
              f"{'met' if mean[best900] >= 0.97 else 'NOT met'}), mean tau {tau[best900]:.3f} (target ≥ 0.88: "
              f"{'met' if tau[best900] >= 0.88 else 'NOT met'}), over {n_dev} devices; literature: FLOPs ~0.79, "
              f"BRP-NAS ~0.79 (FLOPs here: {mean['FLOPs']:.3f}).",
              f"- few-shot N = 10: mean rho {mean['few-shot N=10']:.3f} (target ≥ 0.93: "
              f"{'met' if mean['few-shot N=10'] >= 0.93 else 'NOT met'}; HELP ~0.93).", "",
              "## Fit time (seconds, this machine, 1 thread, shared cores)", ""]
    timing = []
    for m in methods[3:]:
        v = [results[c]["_fit_seconds"][m] for c in results if m in results[c].get("_fit_seconds", {})]
        if v:
            timing.append([m + (" (adaptation only)" if m.startswith("few-shot") else ""), float(np.mean(v)),
                           float(np.max(v))])
    pre = [p.metadata.get("pretrain_seconds", float("nan")) for p in pretrain_info.values()]
    if pre:
        timing.append([f"few-shot pre-training (per fold, {len(pre)} folds)", float(np.mean(pre)), float(np.max(pre))])
    timing.append(["featurise all 15,625 networks (once)", featurise_s, featurise_s])
    lines += [tabulate(timing, headers=["step", "mean", "max"], tablefmt="github", floatfmt=".1f"), ""]
    lines += ["## Few-shot design", "",
              "One graph network with a shared message-passing trunk and one latency head per pre-training "
              "device is pre-trained on the pool rows of the other folds' devices (early stopping on a tenth of "
              "them). A new device is served by a non-negative combination of those heads: the 10 reference "
              "networks (chosen by the pre-trained model alone, a D-optimal spread of its predicted latency "
              "profiles) are measured on the device, and non-negative ridge least squares on relative error fits "
              "one weight per pre-training head; the trunk is frozen. The result is an ordinary predictor "
              "(`learned:PATH`): the latency is still a sum of per-node shares.", "",
              "Folds (a device is adapted from the model pre-trained without its fold; each fold keeps every "
              "class in pre-training):", ""]
    for k, fold in enumerate(folds):
        info = pretrain_info.get(k)
        extra = (f" — pre-trained in {info.metadata.get('pretrain_seconds', float('nan')):.0f} s, best validation "
                 f"step {info.metadata['best_step']}, ridge {info.ridge:g} (validation rho "
                 f"{max(info.metadata['ridge_validation_rho'].values()):.3f}), references: " + ", ".join(f"`{r}`" for r in info.references)) if info else ""
        lines.append(f"- fold {k}: {', '.join(fold)}{extra}")
    lines += ["", "## Validation scores behind the chosen hyperparameters (mean Spearman rho on pool rows 800-899 "
              "of the development columns)", ""]
    rows = []
    for kind, grid in GRID.items():
        for n, tuned_n in zip(TRAIN_SIZES, TUNE_SIZES):
            for c in grid:
                v = tune_scores[f"{kind}|{_key(c)}|{tuned_n}"]
                rows.append([kind, tuned_n, _key(c), float(np.mean(list(v.values()))),
                             "chosen for N=%d" % n if chosen[(kind, n)] == c else ""])
    lines += [tabulate(rows, headers=["model", "trained on", "config", "validation rho", ""], tablefmt="github",
                       floatfmt=".4f"), ""]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
