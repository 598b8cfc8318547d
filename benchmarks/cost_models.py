"""How well each cost model predicts this CPU: real torchvision classifiers, measured, against the predictions.

    python benchmarks/cost_models.py [--quick] [--stage measure|profile|features|fit|report|all] [--threads 1]
                                     [--n 300] [--node-nets 16] [--profile-minutes M] [--work runs/cost_models]

1. ``measure``: the evaluation set, ~15 torchvision classifiers (random weights, batch 1, 224x224),
   each timed whole with onnxruntime at ``--threads`` into ``WORK/eval.db`` (stored: reruns are free).
2. ``profile``: the training set, random networks of :mod:`hant.cost_models.netspace`
   (``hant profile``), into ``WORK/train.db``: the first ``--node-nets`` also op by op (the
   ops the roofline calibration and the lookup table learn from), the rest up to ``--n``
   whole only, in chunks, stopping after ``--profile-minutes``. Resumable: a rerun skips
   what is stored. No torchvision network is in it: the space builds its own blocks.
3. ``fit``: featurise the stored networks once (cached in ``WORK/features.pkl``, resumable;
   ``--stage features`` does only that) and train the ``gnn`` and ``perop`` predictors on them
   as ``fit_db`` does (same split, 20 % held out) into ``WORK/gnn.pt``, ``WORK/perop.pt``.
4. ``report``: calibrate the roofline on the training store's ops, fit the predictors unless
   saved, then compare FLOPs,
   params, the roofline (preset and calibrated), the lookup table and both learned models
   with the measurements (:func:`hant.cost_models.evaluate.compare`), time one
   ``graph_cost`` on a graph of about 1,000 nodes, and write
   ``benchmarks/results/cost_models.md`` (``cost_models_quick.md`` with ``--quick``).

Nothing is tuned on the evaluation networks: every model is fitted on the training store only.
``--quick`` is a smoke run (4 small networks, a tiny space, few training steps).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from common import environment_line  # noqa: E402

from hant.cost_models.evaluate import compare, measure_networks  # noqa: E402
from hant.cost_models.lut import LutModel  # noqa: E402
from hant.cost_models.profile import profile  # noqa: E402
from hant.cost_models.roofline import RooflineModel  # noqa: E402
from hant.cost_models.store import LatencyStore  # noqa: E402
from hant.graphs import trace  # noqa: E402

EVAL_NETWORKS = ["resnet18", "resnet34", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large",
                 "efficientnet_b0", "efficientnet_b1", "regnet_x_400mf", "regnet_y_400mf", "shufflenet_v2_x1_0",
                 "mnasnet1_0", "squeezenet1_1", "densenet121", "googlenet"]
QUICK_NETWORKS = ["resnet18", "mobilenet_v3_small", "squeezenet1_1", "shufflenet_v2_x0_5"]
BIG_GRAPH = "efficientnet_b7"      # about 1,000 nodes: the speed target's graph
INPUT = (1, 3, 224, 224)


def load_graphs(names: list[str]) -> dict:
    """Traced torchvision classifiers (random weights, eval mode) at batch 1, 224x224."""
    import torchvision

    from tqdm.auto import tqdm

    graphs = {}
    for name in tqdm(names, desc="trace", unit="net"):
        torch.manual_seed(0)
        graphs[name] = trace(torchvision.models.get_model(name, weights=None).eval(), torch.randn(*INPUT))
    return graphs


def stage_measure(args) -> dict:
    graphs = load_graphs(args.networks)
    return graphs, measure_networks(graphs, "onnxruntime", threads=args.threads, db=args.eval_db)


def stage_profile(args) -> None:
    space = "tiny" if args.quick else "default"
    profile(min(args.node_nets, args.n), args.train_db, threads=args.threads, seed=args.seed, measure_nodes=True,
            space=space)
    deadline = time.monotonic() + args.profile_minutes * 60
    done = min(args.node_nets, args.n)
    while done < args.n and time.monotonic() < deadline:
        done = min(done + args.chunk, args.n)
        profile(done, args.train_db, threads=args.threads, seed=args.seed, measure_nodes=False, space=space)


def stage_report(args) -> None:
    from hant.cost_models.learned import LearnedCostModel, load_predictor

    graphs, measured = stage_measure(args)
    with LatencyStore(args.train_db) as store:
        records = list(store.networks(runtime="onnxruntime", threads=args.threads))
        n_nets, n_ops = len(records), store.count("ops")
        args.node_nets = sum(r.node_latencies is not None for r in records)
    key = next(iter(records)).device if records else None

    calibrated = RooflineModel("cpu")
    with LatencyStore(args.train_db) as store:
        summary = calibrated.calibrate(store.calibration_samples(runtime="onnxruntime", device=key,
                                                                 threads=args.threads))
    paths = {kind: os.path.join(args.work, f"{kind}.pt") for kind in ("gnn", "perop")}
    if not all(os.path.isfile(p) for p in paths.values()):
        stage_fit(args)
    predictors = {kind: load_predictor(path) for kind, path in paths.items()}
    models = {
        "FLOPs (MACs)": "flops",
        "params": "params",
        "roofline:cpu (preset)": RooflineModel("cpu"),
        "roofline:cpu (calibrated)": calibrated,
        "lut:cpu-onnxruntime": LutModel("cpu", "onnxruntime", threads=args.threads, store=args.train_db),
        "learned gnn": LearnedCostModel(predictors["gnn"], "learned:gnn.pt"),
        "learned perop": LearnedCostModel(predictors["perop"], "learned:perop.pt"),
    }
    comparison = compare(graphs, measured, models)

    big = load_graphs([BIG_GRAPH])[BIG_GRAPH]
    big_nodes = len(big.graph.nodes)
    speed = {}
    for label, model in models.items():
        if isinstance(model, str):
            continue
        model.graph_cost(big)                      # warm caches (featurisation code paths, lookups)
        wall, cpu = [], []
        for _ in range(5):
            start, start_cpu = time.perf_counter(), time.process_time()
            model.graph_cost(big)
            wall.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
        speed[label] = (sorted(wall)[2] * 1e3, sorted(cpu)[2] * 1e3)

    write_results(args, comparison, summary, predictors, speed, big_nodes, n_nets, n_ops)


def stage_features(args) -> dict:
    """Featurise every stored training network once (``WORK/features.pkl``, keyed by spec; resumable).

    The cache is dropped when the featurisation code changes (it is keyed by that code's hash too).
    """
    import hashlib
    import inspect
    import pickle

    from hant.cost_models.learned import features as features_module

    from tqdm.auto import tqdm

    from hant.cost_models.learned import featurize
    from hant.cost_models.netspace import build
    from hant.cost_models.store import spec_key

    path = os.path.join(args.work, "features.pkl")
    code = hashlib.sha256(inspect.getsource(features_module).encode()).hexdigest()
    cache = {"code": code}
    if os.path.isfile(path):
        with open(path, "rb") as f:
            stored = pickle.load(f)
        cache = stored if stored.get("code") == code else cache
    with LatencyStore(args.train_db) as store:
        todo = [r for r in store.networks(runtime="onnxruntime", threads=args.threads) if spec_key(r.spec) not in cache]
    for i, record in enumerate(tqdm(todo, desc="featurise", unit="net")):
        cache[spec_key(record.spec)] = featurize(trace(build(record.spec), torch.randn(*record.input_shape)))
        if i % 10 == 9 or i == len(todo) - 1:
            with open(path + ".tmp", "wb") as f:
                pickle.dump(cache, f)
            os.replace(path + ".tmp", path)
    return cache


def stage_fit(args) -> None:
    """Fit the gnn and perop predictors on the training store into ``WORK/KIND.pt``.

    What :func:`hant.cost_models.learned.fit_db` does (same split: a seeded permutation, 20 % held
    out; same :func:`~hant.cost_models.learned.train` and :func:`~hant.cost_models.learned.metrics`),
    with each network featurised once for both models and cached, which the shared machine needs.
    """
    import numpy as np

    from hant.cost_models.learned import metrics, train
    from hant.cost_models.learned.fit import format_metrics
    from hant.cost_models.store import spec_key

    cache = stage_features(args)
    with LatencyStore(args.train_db) as store:
        records = list(store.networks(runtime="onnxruntime", threads=args.threads))
    graphs = [cache[spec_key(r.spec)] for r in records]
    y = np.array([r.latency_s for r in records])
    order = np.random.default_rng(args.seed).permutation(len(records))
    n_test = max(2, int(round(0.2 * len(records))))
    test_rows, train_rows = sorted(order[:n_test].tolist()), sorted(order[n_test:].tolist())
    for kind in ("gnn", "perop"):
        started = time.perf_counter()
        metadata = {"source": os.path.basename(args.train_db), "runtime": "onnxruntime",
                    "device": records[0].device, "networks": len(records), "seed": args.seed}
        predictor = train(kind, [graphs[i] for i in train_rows], y[train_rows], seed=args.seed, metadata=metadata,
                          config={"steps": 60} if args.quick else None)
        held_out = metrics(predictor.predict([graphs[i] for i in test_rows]), y[test_rows])
        predictor.metadata.update(held_out=held_out, fit_seconds=time.perf_counter() - started)
        predictor.save(os.path.join(args.work, f"{kind}.pt"))
        print(f"{kind} on {len(train_rows)} networks: {format_metrics(held_out)}")


def write_results(args, comparison, summary, predictors, speed, big_nodes, n_nets, n_ops) -> None:
    from tabulate import tabulate

    name = "cost_models_quick" if args.quick else "cost_models"
    path = os.path.join(HERE, "results", f"{name}.md")
    held = {k: p.metadata["held_out"] for k, p in predictors.items()}
    trained_on = {k: p.metadata["networks"] for k, p in predictors.items()}
    failures = [f"{r.label} could not predict {name}: {why}" for r in comparison.results
                for name, why in r.failed.items()]
    lines = [
        f"# Cost models against measured latency ({'quick smoke run' if args.quick else 'full run'})",
        "",
        f"Evaluation: {len(comparison.measured_s)} torchvision classifiers (random weights), batch 1, 224x224, "
        f"each measured whole. {environment_line(args.threads, 1)}. Written "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        f"Training data (never any torchvision network): {n_nets} random networks from hant's network space "
        f"(`hant profile`, seed {args.seed}, 96..320 px), measured whole with the same runtime and threads; "
        f"{args.node_nets} of them also op by op ({n_ops} distinct ops), which the calibrated "
        f"roofline ({summary.samples} op samples, op-level MAPE {summary.mape_before:.0%} -> "
        f"{summary.mape_after:.0%}) and the lookup table use. The learned models are fitted as `fit_db` "
        f"fits them (20 % of the networks held out), each network featurised once for both.",
        "",
        "FLOPs and params are scores, not latencies: only their ranking (τ, ρ) is defined.",
        "",
        comparison.table("github"),
        "",
        *(f"- {line}" for line in failures),
        *([""] if failures else []),
        f"Learned models fitted on 80 % of {max(trained_on.values())} stored networks; on the held-out 20 % "
        f"(random networks, same distribution as training): "
        + "; ".join(f"{k}: τ {m['kendall_tau']:.3f}, ±10 % {m['within10_pct']:.0f}%, MAPE {m['mape_pct']:.1f}%"
                    f" (n={m['n']})" for k, m in held.items()),
        "",
        f"One `graph_cost` on {BIG_GRAPH} ({big_nodes} nodes), median of 5 (target ≤ 20 ms); wall-clock and "
        f"this process's CPU time (on a shared machine the wall clock includes waiting for a core):",
        "",
        tabulate([[k, f"{w:.1f}", f"{c:.1f}"] for k, (w, c) in speed.items()], ["model", "wall ms", "CPU ms"],
                 tablefmt="github", disable_numparse=True),
        "",
        "Per network (ms; FLOPs and params as counted):",
        "",
        comparison.networks_table("github"),
        "",
    ]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines))
    with open(os.path.join(args.work, f"{name}.json"), "w") as f:
        json.dump({"measured_s": comparison.measured_s,
                   "results": [{"label": r.label, "metrics": r.metrics, "predicted": r.predicted}
                               for r in comparison.results],
                   "held_out": held, "speed_ms": speed, "train_networks": n_nets}, f, indent=1)
    print("\n".join(lines))
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: few small networks, tiny space")
    parser.add_argument("--stage", choices=("measure", "profile", "features", "fit", "report", "all"),
                        default="all", help="fit: (re)fit both predictors; report fits them only when not saved")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default 1)")
    parser.add_argument("--n", type=int, default=300, help="training networks to profile (default 300)")
    parser.add_argument("--node-nets", type=int, default=16, help="of those, profiled op by op too (default 16)")
    parser.add_argument("--chunk", type=int, default=10, help="networks per profiling chunk (default 10)")
    parser.add_argument("--profile-minutes", type=float, default=float("inf"),
                        help="stop starting new whole-network chunks after this many minutes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default=None, help="folder of the stores and predictors (default runs/cost_models)")
    args = parser.parse_args()
    root = os.path.dirname(HERE)
    args.work = args.work or os.path.join(root, "runs", "cost_models_quick" if args.quick else "cost_models")
    os.makedirs(args.work, exist_ok=True)
    args.networks = QUICK_NETWORKS if args.quick else EVAL_NETWORKS
    if args.quick:
        args.n, args.node_nets = min(args.n, 8), min(args.node_nets, 3)
    args.train_db = os.path.join(args.work, "train.db")
    args.eval_db = os.path.join(args.work, "eval.db")
    if args.stage in ("measure", "all"):
        stage_measure(args)
    if args.stage in ("profile", "all"):
        stage_profile(args)
    if args.stage == "features":
        stage_features(args)
    if args.stage == "fit":
        stage_fit(args)
    if args.stage in ("report", "all"):
        stage_report(args)


if __name__ == "__main__":
    main()
