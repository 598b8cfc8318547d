"""Latency prediction for 15,625 NAS-Bench-201 networks on 21 real devices.

For every device column of the shipped table (hant/cost_models/learned/data), rank
correlation (Spearman rho, Kendall tau) and the share of networks within ±10 % of the
measured latency, on held-out rows, for:

* baselines without training: FLOPs (MACs), parameter count, the roofline model of the
  closest preset (ranks only: it is not fitted to the device, so ±10 % is reported as is);
* the graph network (``gnn``) and the per-kernel regressor (``perop``) trained on N = 10,
  100 and 900 rows of that device;
* few-shot transfer: one graph network pre-trained (on 300 of the first 900 networks) on the
  devices of the other folds (devices are split into 3 folds; a device is never in its own
  pre-training), adapted from its latencies on 10 fixed reference networks.

Split (seed 0): a permutation of the 15,625 rows; training rows are its first N; every
method is scored on the same held-out rows, those after the first 900 (``--test-size`` caps
them in quick runs). The reference networks are drawn from the first 900, so they are never
scored. Writes benchmarks/results/nb201_devices.md.

    python benchmarks/nb201_devices.py               # all 21 devices (not yet run: ~1.5 h on 2 busy cores)
    python benchmarks/nb201_devices.py --quick       # 7 devices, 3,000 held-out rows
"""

from __future__ import annotations

import argparse
import csv
import gzip
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
from hant.cost_models.learned.nb201 import family
from hant.cost_models.learned.transfer import adapt, pick_references, pretrain

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "nb201_devices.md")
TRAIN_SIZES = (10, 100, 900)
QUICK_COLUMNS = ("1080ti_1", "2080ti_32", "titanxp_256", "gold_6240", "silver_4114", "pixel3", "samsung_a50")


def device_class(column: str) -> str:
    if column.startswith(("1080ti", "2080ti", "titan")):
        return "gpu"
    if column.startswith(("gold", "silver")):
        return "cpu"
    return "phone"


ROOFLINE_PRESET = {"gpu": "roofline:a100", "cpu": "roofline:cpu", "phone": "roofline:raspi4"}
# PyTorch eager on GPUs and CPUs runs node by node; phone runtimes fuse conv+BN+activation.
FUSION = {"gpu": "eager", "cpu": "eager", "phone": "fused"}


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="7 representative devices, 3,000 held-out rows")
    parser.add_argument("--columns", help="comma-separated device columns (default: all 21, or the quick 7)")
    parser.add_argument("--test-size", type=int, help="held-out rows scored (default all 14,725; quick 3,000)")
    parser.add_argument("--folds", type=int, default=3, help="device folds for few-shot transfer (default 3)")
    parser.add_argument("--pretrain-rows", type=int, default=300,
                        help="networks (of the first 900) the few-shot model is pre-trained on (default 300)")
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)

    columns, archs, y_all = read_all(data_path())
    chosen = args.columns.split(",") if args.columns else (list(QUICK_COLUMNS) if args.quick else columns)
    test_size = args.test_size or (3000 if args.quick else None)
    order = np.random.default_rng(0).permutation(len(archs))
    held_out = order[900:900 + test_size] if test_size else order[900:]
    fam = family()
    started = time.perf_counter()
    needed = sorted(set(order[:900].tolist()) | set(held_out.tolist()))
    for i in tqdm(needed, desc="featurise", file=sys.stderr):
        fam.featurize(archs[i])
    featurise_s = time.perf_counter() - started
    test_graphs = [fam.featurize(archs[i]) for i in held_out]

    # baselines: sums of the flops and roofline models over the traced nodes
    flops = get("flops")
    counts = np.array([fam.node_sum(flops, archs[i]) for i in held_out])
    roofline = {spec: np.array([fam.node_sum(get(spec), archs[i])[0] for i in held_out])
                for spec in sorted(set(ROOFLINE_PRESET.values()))}

    # few-shot: pre-train per device fold, never on the fold's own devices
    ref_pool = [archs[i] for i in order[:900]]
    references = pick_references(ref_pool, [fam.featurize(a) for a in ref_pool], k=10)
    ref_rows = [archs.index(a) for a in references]
    pretrain_rows = order[:args.pretrain_rows]
    folds = [columns[k::args.folds] for k in range(args.folds)]
    pretrained, pretrain_s = {}, []
    for fold in folds:
        if not any(c in chosen for c in fold):
            continue
        sources = [c for c in columns if c not in fold]
        idx = [columns.index(c) for c in sources]
        t0 = time.perf_counter()
        model = pretrain([archs[i] for i in pretrain_rows], y_all[np.ix_(pretrain_rows, idx)], sources, fam,
                         references, y_all[np.ix_(ref_rows, idx)], layers=2, steps=200, seed=0)
        pretrain_s.append(time.perf_counter() - t0)
        for c in fold:
            pretrained[c] = model

    results, fit_times = {}, {}
    for column in tqdm(chosen, desc="devices", file=sys.stderr):
        j = columns.index(column)
        y_test = y_all[held_out, j]
        cls = device_class(column)
        res = {"FLOPs": ranks_only(counts[:, 1], y_test), "params": ranks_only(counts[:, 2], y_test),
               "roofline": metrics(roofline[ROOFLINE_PRESET[cls]], y_test)}
        for kind in ("gnn", "perop"):
            config = {"fusion": FUSION[cls]} if kind == "perop" else None
            for n in TRAIN_SIZES:
                rows = order[:n]
                t0 = time.perf_counter()
                predictor = train(kind, [fam.featurize(archs[i]) for i in rows], y_all[rows, j], config=config, seed=0)
                fit_times.setdefault((kind, n), []).append(time.perf_counter() - t0)
                res[f"{kind} N={n}"] = metrics(predictor.predict(test_graphs), y_test)
        t0 = time.perf_counter()
        adapted = adapt(pretrained[column], fam, y_all[ref_rows, j])
        fit_times.setdefault(("few-shot", 10), []).append(time.perf_counter() - t0)
        res["few-shot N=10"] = metrics(adapted.predict(test_graphs), y_test)
        results[column] = res
        print(column, {k: round(v["spearman_rho"], 4) for k, v in res.items()}, file=sys.stderr, flush=True)

        write(args, results, fit_times, pretrain_s, featurise_s, len(held_out), folds, references)
    return 0


def write(args, results, fit_times, pretrain_s, featurise_s, n_test, folds, references) -> None:
    methods = list(next(iter(results.values())).keys())
    lines = ["# NAS-Bench-201 latency prediction on real devices", "",
             f"`python benchmarks/nb201_devices.py{' --quick' if args.quick else ''}` on "
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared), torch "
             f"{torch.__version__}, 1 thread. Held-out rows per device: {n_test} (seed-0 split; training rows are the "
             "first N of the permutation, scoring rows come after the first 900). Data: HELP / HW-NAS-Bench "
             "measurements shipped in hant/cost_models/learned/data (MIT).", ""]
    for metric, title in (("spearman_rho", "Spearman rho"), ("kendall_tau", "Kendall tau"),
                          ("within10_pct", "share within ±10 % (%)")):
        table = [[c] + [results[c][m][metric] for m in methods] for c in results]
        table.append(["**mean**"] + [float(np.nanmean([results[c][m][metric] for c in results])) for m in methods])
        lines += [f"## {title}", "", tabulate(table, headers=["device"] + methods, tablefmt="github",
                                              floatfmt=".3f" if metric != "within10_pct" else ".1f"), ""]
    mean = {m: float(np.mean([results[c][m]["spearman_rho"] for c in results])) for m in methods}
    tau = {m: float(np.mean([results[c][m]["kendall_tau"] for c in results])) for m in methods}
    best900 = max(("gnn N=900", "perop N=900"), key=lambda m: mean[m])
    lines += ["## Against the targets", "",
              f"- N = 900 ({best900}): mean rho {mean[best900]:.3f} (target ≥ 0.97), mean tau {tau[best900]:.3f} "
              f"(target ≥ 0.88); literature: FLOPs ~0.79, BRP-NAS ~0.79 (FLOPs here: {mean['FLOPs']:.3f}).",
              f"- few-shot N = 10: mean rho {mean['few-shot N=10']:.3f} (target ≥ 0.93; HELP ~0.93).", "",
              "## Fit time (seconds, this machine)", ""]
    timing = [[f"{k} N={n}", float(np.mean(v)), float(np.max(v))] for (k, n), v in fit_times.items()]
    timing.append(["few-shot pre-training (per fold)", float(np.mean(pretrain_s)) if pretrain_s else float("nan"),
                   float(np.max(pretrain_s)) if pretrain_s else float("nan")])
    timing.append(["featurise all scored networks (once)", featurise_s, featurise_s])
    lines += [tabulate(timing, headers=["step", "mean", "max"], tablefmt="github", floatfmt=".1f"), "",
              "Few-shot folds (a device is adapted from the model pre-trained without its fold): "
              + "; ".join(", ".join(f) for f in folds) + ".",
              "Reference networks: " + ", ".join(f"`{r}`" for r in references) + ".", ""]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
