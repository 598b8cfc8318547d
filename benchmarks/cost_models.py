"""How well each cost model predicts this CPU: real torchvision classifiers, measured, against the predictions.

    python benchmarks/cost_models.py [--quick] [--stage measure|profile|kernels|kernel-lists|features|fit|diagnose|
                                     report|all] [--threads 1] [--n 300] [--node-nets 16] [--profile-minutes M]
                                     [--fit gnn,perop,kernel] [--work runs/cost_models]

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
``kernels`` times kernels alone (random ones and those of ``--kernel-nets`` training networks),
``kernel-lists`` caches each training network's kernels and layout reorders, ``diagnose``
profiles a few evaluation networks per node in onnxruntime, whole and kernel by kernel alone,
for the report's Diagnosis section (the kernel predictor never sees these numbers).
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

from hant.cost_models.evaluate import compare  # noqa: E402
from hant.cost_models.lut import LutModel  # noqa: E402
from hant.cost_models.profile import profile  # noqa: E402
from hant.cost_models.roofline import RooflineModel  # noqa: E402
from hant.cost_models.store import LatencyStore  # noqa: E402
from hant.cost_models.timing import TimingConfig  # noqa: E402
from hant.graphs import trace  # noqa: E402

EVAL_NETWORKS = ["resnet18", "resnet34", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large",
                 "efficientnet_b0", "efficientnet_b1", "regnet_x_400mf", "regnet_y_400mf", "shufflenet_v2_x1_0",
                 "mnasnet1_0", "squeezenet1_1", "densenet121", "googlenet"]
QUICK_NETWORKS = ["resnet18", "mobilenet_v3_small", "squeezenet1_1", "shufflenet_v2_x0_5"]
BIG_GRAPH = "efficientnet_b7"      # about 1,000 nodes: the speed target's graph
INPUT = (1, 3, 224, 224)
# Whole networks (evaluation and training alike): at least 40 timing blocks (or 2 s), so that the fastest
# block escapes the other jobs on a shared machine; the library default stops after 5 blocks once the
# median is stable, and on this machine such fastest blocks were up to 10-30 % slow.
NETWORK_TIMING = TimingConfig(warmup_s=0.05, min_samples=40, rel_ci=0.02, time_cap_s=2.0)


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
    """The evaluation networks, each timed whole (:data:`NETWORK_TIMING`) into ``WORK/eval.db`` (reused)."""
    from tqdm.auto import tqdm

    from hant.cost_models.measured import MeasuredModel

    graphs = load_graphs(args.networks)
    model = MeasuredModel("cpu", "onnxruntime", threads=args.threads, store=args.eval_db, graph_timing=NETWORK_TIMING)
    return graphs, {name: model.graph_latency(gm) for name, gm in tqdm(graphs.items(), desc="measure", unit="net")}


def stage_profile(args) -> None:
    space = "tiny" if args.quick else "default"
    profile(min(args.node_nets, args.n), args.train_db, threads=args.threads, seed=args.seed, measure_nodes=True,
            space=space, graph_timing=NETWORK_TIMING)
    deadline = time.monotonic() + args.profile_minutes * 60
    done = min(args.node_nets, args.n)
    while done < args.n and time.monotonic() < deadline:
        done = min(done + args.chunk, args.n)
        profile(done, args.train_db, threads=args.threads, seed=args.seed, measure_nodes=False, space=space,
                graph_timing=NETWORK_TIMING)


def kernel_configs(args) -> list[dict]:
    """The kernels ``stage_kernels`` measures, in order: random configurations
    (:func:`~hant.cost_models.learned.kernels.sample_kernel`) interleaved with kernels of the
    network space's own training networks (never a torchvision network), deduplicated."""
    import random

    from hant.cost_models.learned.kernels import extract_kernels, sampled_kernels
    from hant.cost_models.netspace import build, input_shape
    from hant.cost_models.profile import profile_specs
    from hant.cost_models.store import canonical_json

    from tqdm.auto import tqdm

    space = "tiny" if args.quick else "default"
    seen, from_nets = set(), []
    for spec in tqdm(profile_specs(args.kernel_nets, args.seed, space), desc="extract", unit="net"):
        gm = trace(build(spec), torch.randn(*input_shape(spec)))
        for kernel in extract_kernels(gm):
            key = canonical_json(kernel.config)
            if key not in seen:
                seen.add(key)
                from_nets.append(kernel.config)
    random.Random(args.seed).shuffle(from_nets)
    sampled = sampled_kernels(args.kernels, args.seed)
    mixed = [c for pair in zip(sampled, from_nets) for c in pair]
    mixed += sampled[len(from_nets):] + from_nets[len(sampled):args.kernels]
    configs, done = [], set()
    for config in mixed:
        key = canonical_json(config)
        if key not in done:
            done.add(key)
            configs.append(config)
    return configs


def stage_kernels(args) -> None:
    """Time kernels alone into the training store (resumable), for at most ``--kernel-minutes``."""
    from hant.cost_models.learned.kernels import profile_kernels

    configs = kernel_configs(args)
    deadline = time.monotonic() + args.kernel_minutes * 60
    measured, skipped = profile_kernels(configs, args.train_db, threads=args.threads, deadline=deadline)
    print(f"kernels: {measured} measured, {skipped} already stored, of {len(configs)}")


def stage_kernel_lists(args) -> dict:
    """The :class:`~hant.cost_models.learned.kernels.KernelNetwork` (kernel configurations and layout
    reorders) of every stored training network (``WORK/kernel_networks.pkl``, keyed by spec;
    resumable): what the kernel predictor's network calibration reads."""
    import pickle

    from tqdm.auto import tqdm

    from hant.cost_models.learned.kernels import kernel_network
    from hant.cost_models.netspace import build
    from hant.cost_models.store import spec_key

    path = os.path.join(args.work, "kernel_networks.pkl")
    cache = {}
    if os.path.isfile(path):
        with open(path, "rb") as f:
            cache = pickle.load(f)
    with LatencyStore(args.train_db) as store:
        todo = [r for r in store.networks(runtime="onnxruntime", threads=args.threads) if spec_key(r.spec) not in cache]
    for i, record in enumerate(tqdm(todo, desc="kernel lists", unit="net")):
        gm = trace(build(record.spec), torch.randn(*record.input_shape))
        cache[spec_key(record.spec)] = kernel_network(gm)
        if i % 10 == 9 or i == len(todo) - 1:
            with open(path + ".tmp", "wb") as f:
                pickle.dump(cache, f)
            os.replace(path + ".tmp", path)
    return cache


DIAGNOSE_NETWORKS = ["mobilenet_v3_small", "shufflenet_v2_x1_0", "squeezenet1_1", "regnet_x_400mf", "regnet_y_400mf",
                     "resnet18", "efficientnet_b0", "mobilenet_v2"]
_REORDER_OPS = ("ReorderInput", "ReorderOutput")


def _op_category(op: str) -> str:
    if op in _REORDER_OPS:
        return "reorder"
    if op in ("Conv", "FusedConv", "Gemm", "MatMul"):
        return "conv_gemm"
    if op in ("Transpose", "Reshape", "Concat", "Split", "Flatten", "Slice", "Identity"):
        return "move"
    if "Pool" in op or op.startswith("Reduce"):
        return "pool"
    return "elementwise"


def profiled_run(model_bytes: bytes, inputs: list, threads: int, runs: int, folder: str) -> dict:
    """Run an onnxruntime session (all graph optimisations, ``threads`` intra-op threads) ``runs`` times
    with per-node profiling; drop the first third as warm-up. Returns the fastest ``model_run`` (µs),
    and per node its op type and median µs."""
    import json as json_
    import statistics

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.enable_profiling = True
    options.profile_file_prefix = os.path.join(folder, "profile")
    options.log_severity_level = 3
    session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    feed = {i.name: t for i, t in zip(session.get_inputs(), inputs)}
    for _ in range(runs):
        session.run(None, feed)
    path = session.end_profiling()
    with open(path) as f:
        events = json_.load(f)
    os.remove(path)
    keep = runs // 3
    run_us = [e["dur"] for e in events if e.get("cat") == "Session" and e["name"] == "model_run"][keep:]
    per_node, op_of = {}, {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            name = e["name"][:-len("_kernel_time")]
            per_node.setdefault(name, []).append(e["dur"])
            op_of[name] = e["args"]["op_name"]
    return {"run_min_us": min(run_us),
            "nodes": {n: (op_of[n], statistics.median(v[keep:])) for n, v in per_node.items()}}


def stage_diagnose(args) -> None:
    """Per-node onnxruntime profiles of ``DIAGNOSE_NETWORKS`` whole and of each of their kernels alone,
    next to what the kernel predictor (``WORK/kernel.pt``) says, into ``WORK/diagnosis.json``.

    Whole networks: 60 profiled runs; kernels alone (each distinct configuration once): 45. The
    per-node times are grouped into convolutions and GEMMs, layout reorders, data movement, pools
    and elementwise ops, so the isolation-to-network gap can be split into its causes. Profiling
    adds a few µs per node, so the fastest profiled run is above the unprofiled measurement."""
    import tempfile

    from tqdm.auto import tqdm

    from hant.cost_models.learned import load_predictor
    from hant.cost_models.learned.kernels import build_kernel, kernel_bytes, kernel_rows, walk_kernels
    from hant.cost_models.learned.kernel_model import KernelCostModel
    from hant.cost_models.store import canonical_json
    from hant.cost_models.timing import export_onnx_bytes

    predictor = load_predictor(os.path.join(args.work, "kernel.pt"))
    model = KernelCostModel(predictor)
    graphs = load_graphs(DIAGNOSE_NETWORKS)
    folder = tempfile.mkdtemp(prefix="hant-diagnose-")
    result = {}
    for name, gm in tqdm(graphs.items(), desc="diagnose", unit="net"):
        x = torch.randn(*INPUT)
        whole = profiled_run(export_onnx_bytes(gm, (x,)), [x.numpy()], args.threads, 60, folder)
        walk = walk_kernels(gm)
        kernels, reorders = walk.kernels, walk.reorders
        seconds = predictor.kernel_seconds(kernel_rows(k.config for k in kernels))
        alone_of: dict[str, dict] = {}
        alone = []
        for kernel in kernels:
            key = canonical_json(kernel.config)
            if key not in alone_of:
                module, inputs = build_kernel(kernel.config)
                alone_of[key] = profiled_run(export_onnx_bytes(module, inputs), [t.numpy() for t in inputs],
                                             args.threads, 45, folder)
            alone.append(alone_of[key])
        net_cat, alone_cat, ort_reorders = {}, {}, {op: 0 for op in _REORDER_OPS}
        for op, us in whole["nodes"].values():
            net_cat[_op_category(op)] = net_cat.get(_op_category(op), 0.0) + us
            if op in _REORDER_OPS:
                ort_reorders[op] += 1
        for run in alone:
            for op, us in run["nodes"].values():
                alone_cat[_op_category(op)] = alone_cat.get(_op_category(op), 0.0) + us
        report = model.graph_cost(gm)
        result[name] = {
            "profiled_run_min_us": whole["run_min_us"], "ort_nodes": len(whole["nodes"]),
            "net_us": net_cat, "alone_us": alone_cat,
            "alone_runs_us": sum(r["run_min_us"] for r in alone),
            "alone_nodes_us": sum(us for r in alone for _, us in r["nodes"].values()),
            "kernels": len(kernels), "weight_mb": sum(kernel_bytes(k.config)[2] for k in kernels) * 4 / 1e6,
            "ort_reorders": ort_reorders,
            "our_reorders": {"ReorderInput": sum(r.to_blocked for r in reorders),
                             "ReorderOutput": sum(not r.to_blocked for r in reorders)},
            "predicted_alone_us": float(seconds.sum() * 1e6), "predicted_us": report.latency_s * 1e6,
            "predicted_reorders_us": float(predictor.reorder_seconds([r.elements for r in reorders]).sum() * 1e6),
        }
    result["_reorder_check"] = reorder_check(load_graphs(EVAL_NETWORKS), folder)
    with open(os.path.join(args.work, "diagnosis.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(diagnosis_table(result))


def reorder_check(graphs: dict, folder: str) -> dict:
    """Per network, onnxruntime's reorder nodes in its optimised graph (``optimized_model_filepath``) and
    the ones :func:`~hant.cost_models.learned.kernels.layout_reorders` finds: ``[ort_in, ort_out, in, out]``."""
    import onnx
    import onnxruntime as ort

    from hant.cost_models.learned.kernels import layout_reorders
    from hant.cost_models.timing import export_onnx_bytes

    counts = {}
    for name, gm in graphs.items():
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = os.path.join(folder, "optimized.onnx")
        options.log_severity_level = 3
        ort.InferenceSession(export_onnx_bytes(gm, (torch.randn(*INPUT),)), options, providers=["CPUExecutionProvider"])
        ops = [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]
        ours = layout_reorders(gm)
        counts[name] = [ops.count("ReorderInput"), ops.count("ReorderOutput"), sum(r.to_blocked for r in ours),
                        sum(not r.to_blocked for r in ours)]
    return counts


def diagnosis_table(result: dict) -> str:
    """The markdown table of :func:`stage_diagnose`'s numbers (ms)."""
    from tabulate import tabulate

    rows = []
    for name, d in result.items():
        if name.startswith("_"):
            continue
        net, alone = d["net_us"], d["alone_us"]
        gap = net.get("conv_gemm", 0.0) - alone.get("conv_gemm", 0.0)
        rows.append([name, f"{d['profiled_run_min_us'] / 1e3:.2f}", f"{net.get('conv_gemm', 0) / 1e3:.2f}",
                     f"{alone.get('conv_gemm', 0) / 1e3:.2f}", f"{gap / 1e3:+.2f}", f"{d['weight_mb']:.1f}",
                     f"{gap / 1e3 / max(d['weight_mb'], 1e-9):.3f}",
                     f"{sum(d['ort_reorders'].values())} / {sum(d['our_reorders'].values())}",
                     f"{net.get('reorder', 0) / 1e3:.2f}", f"{d['predicted_reorders_us'] / 1e3:.2f}",
                     f"{alone.get('reorder', 0) / 1e3:.2f}",
                     f"{(d['alone_runs_us'] - d['alone_nodes_us']) / 1e3:.2f} ({d['kernels']})",
                     f"{net.get('move', 0) / 1e3:.2f} / {alone.get('move', 0) / 1e3:.2f}"])
    return tabulate(rows, ["network", "whole, profiled", "conv+gemm in net", "same alone", "in net − alone",
                           "weights MB", "ms per MB", "reorders ORT / ours", "reorders in net",
                           "predicted reorders", "reorders alone", "session overhead alone (kernels)",
                           "moves net / alone"], tablefmt="github", disable_numparse=True)


def stage_report(args) -> None:
    from hant.cost_models.learned import LearnedCostModel, load_predictor
    from hant.cost_models.learned.kernel_model import KernelCostModel

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
    paths = {kind: os.path.join(args.work, f"{kind}.pt") for kind in ("gnn", "perop", "kernel")}
    missing = [kind for kind, p in paths.items() if not os.path.isfile(p)]
    if missing:
        stage_fit(args, missing)
    predictors = {kind: load_predictor(path) for kind, path in paths.items()}
    models = {
        "FLOPs (MACs)": "flops",
        "params": "params",
        "roofline:cpu (preset)": RooflineModel("cpu"),
        "roofline:cpu (calibrated)": calibrated,
        "lut:cpu-onnxruntime": LutModel("cpu", "onnxruntime", threads=args.threads, store=args.train_db),
        "learned gnn": LearnedCostModel(predictors["gnn"], "learned:gnn.pt"),
        "learned perop": LearnedCostModel(predictors["perop"], "learned:perop.pt"),
        "learned kernel": KernelCostModel(predictors["kernel"], "learned:kernel.pt"),
    }
    comparison = compare(graphs, measured, models)
    fastest = fastest_times(graphs, args)
    by_fastest = rescore(comparison, fastest)

    big = load_graphs([BIG_GRAPH])[BIG_GRAPH]
    fresh = load_graphs([BIG_GRAPH])[BIG_GRAPH]      # new Node objects: no per-node cache has seen them
    big_nodes = len(big.graph.nodes)
    speed = {}
    for label, model in models.items():
        if isinstance(model, str):
            continue
        start, start_cpu = time.perf_counter(), time.process_time()
        model.graph_cost(fresh)                    # first sight of the graph (cold per-node caches)
        cold = ((time.perf_counter() - start) * 1e3, (time.process_time() - start_cpu) * 1e3)
        model.graph_cost(big)                      # warm caches (featurisation code paths, lookups)
        wall, cpu = [], []
        for _ in range(5):
            start, start_cpu = time.perf_counter(), time.process_time()
            model.graph_cost(big)
            wall.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
        speed[label] = (sorted(wall)[2] * 1e3, sorted(cpu)[2] * 1e3) + cold

    write_results(args, comparison, by_fastest, summary, predictors, speed, big_nodes, n_nets, n_ops)


def fastest_times(graphs: dict, args) -> dict:
    """Each evaluation network's fastest timing block (``Spread.min_s``) from the evaluation store."""
    from hant.cost_models.measured import graph_key
    from hant.cost_models.timing import runtime_for

    key = runtime_for("cpu", "onnxruntime", args.threads).key
    with LatencyStore(args.eval_db) as store:
        return {name: store.get_graph(graph_key(gm), key).spread.min_s for name, gm in graphs.items()}


def rescore(comparison, measured_s: dict):
    """The same predictions scored against other measurements (no model is run again)."""
    from dataclasses import replace

    from hant.cost_models.evaluate import Comparison, metrics

    results = []
    for r in comparison.results:
        names = list(r.predicted)
        results.append(replace(r, metrics=metrics([r.predicted[n] for n in names], [measured_s[n] for n in names],
                                                  absolute=not r.proxy)))
    return Comparison({n: measured_s[n] for n in comparison.measured_s}, results)


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


def stage_fit(args, kinds=("gnn", "perop", "kernel")) -> None:
    """Fit the gnn, perop and kernel predictors on the training store into ``WORK/KIND.pt``.

    What :func:`hant.cost_models.learned.fit_db` does (same split: a seeded permutation, 20 % held
    out; same :func:`~hant.cost_models.learned.train` and :func:`~hant.cost_models.learned.metrics`),
    with each network featurised once for both models and cached, which the shared machine needs.
    The kernel predictor is ``fit_db(model="kernel")`` itself, given the cached kernel lists.
    """
    import numpy as np

    from hant.cost_models.learned import fit_db, metrics, train
    from hant.cost_models.learned.fit import format_metrics
    from hant.cost_models.store import spec_key

    if "kernel" in kinds:
        lists = stage_kernel_lists(args)
        with LatencyStore(args.train_db) as store:
            records = list(store.networks(runtime="onnxruntime", threads=args.threads))
        result = fit_db(args.train_db, model="kernel", out=os.path.join(args.work, "kernel.pt"), seed=args.seed,
                        runtime="onnxruntime", kernel_networks=[lists[spec_key(r.spec)] for r in records],
                        config={"steps": 200} if args.quick else None, verbose=False)
        print(f"kernel on {result.predictor.metadata['kernels']} kernels, calibrated on "
              f"{len(result.train_rows)} networks: {format_metrics(result.metrics)}")
    kinds = [k for k in kinds if k != "kernel"]
    if not kinds:
        return
    cache = stage_features(args)
    with LatencyStore(args.train_db) as store:
        records = list(store.networks(runtime="onnxruntime", threads=args.threads))
    graphs = [cache[spec_key(r.spec)] for r in records]
    y = np.array([r.latency_s for r in records])
    order = np.random.default_rng(args.seed).permutation(len(records))
    n_test = max(2, int(round(0.2 * len(records))))
    test_rows, train_rows = sorted(order[:n_test].tolist()), sorted(order[n_test:].tolist())
    for kind in kinds:
        started = time.perf_counter()
        metadata = {"source": os.path.basename(args.train_db), "runtime": "onnxruntime",
                    "device": records[0].device, "networks": len(records), "seed": args.seed}
        predictor = train(kind, [graphs[i] for i in train_rows], y[train_rows], seed=args.seed, metadata=metadata,
                          config={"steps": 60} if args.quick else None)
        held_out = metrics(predictor.predict([graphs[i] for i in test_rows]), y[test_rows])
        predictor.metadata.update(held_out=held_out, fit_seconds=time.perf_counter() - started)
        predictor.save(os.path.join(args.work, f"{kind}.pt"))
        print(f"{kind} on {len(train_rows)} networks: {format_metrics(held_out)}")


def write_results(args, comparison, by_fastest, summary, predictors, speed, big_nodes, n_nets, n_ops) -> None:
    from tabulate import tabulate

    name = "cost_models_quick" if args.quick else "cost_models"
    path = os.path.join(HERE, "results", f"{name}.md")
    held = {k: p.metadata["held_out"] for k, p in predictors.items()}
    trained_on = {k: p.metadata["networks"] for k, p in predictors.items()}
    kernel = predictors["kernel"].metadata
    coefficients = kernel["calibration"]["coefficients"]
    units = {"kernel_sum": (1, "·Σkernels"), "kernels": (1e6, " µs·#kernels"), "constant": (1e6, " µs"),
             "reorder_elements": (1e9, " ns·reorder elements"), "isolation_elements": (1e9, " ns·isolation elements"),
             "isolation_nodes": (1e6, " µs·#isolation nodes"),
             "layout_elements": (1e9, " ns·(reorder − isolation elements)"), "reorders": (1e6, " µs·#reorders"),
             "weight_elements": (1e9, " ns·weight elements")}
    law = " + ".join(f"{v * units[t][0]:.4g}{units[t][1]}" for t, v in coefficients.items())
    with LatencyStore(args.train_db) as store:
        window = store._connection().execute("SELECT MIN(created), MAX(created) FROM ops WHERE kind='kernel'"
                                             ).fetchone()
        networks = store._connection().execute("SELECT MIN(created), MAX(created) FROM networks").fetchone()
    with LatencyStore(args.eval_db) as store:
        evaluated = store._connection().execute("SELECT MIN(created), MAX(created) FROM graphs").fetchone()

    def span(w) -> str:
        return " to ".join(time.strftime("%H:%M UTC", time.gmtime(t)) for t in w) if w[0] else "never"
    when = span(window)
    load = os.getloadavg()
    ratio = {n: comparison.measured_s[n] / by_fastest.measured_s[n] for n in comparison.measured_s}
    worst = max(ratio, key=ratio.get)
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
        f"(`hant profile`, seed {args.seed}, 96..320 px; families ResNet, MobileNetV2/V3, EfficientNet, RegNet, "
        f"ShuffleNetV2-like, SqueezeNet-like and mixed), measured whole with the same runtime and threads "
        f"(at least 40 timing blocks each); the op store holds {n_ops} distinct ops timed op by op, which the "
        f"calibrated roofline ({summary.samples} op samples, op-level MAPE {summary.mape_before:.0%} -> "
        f"{summary.mape_after:.0%}) and the lookup table use. The learned models are fitted as `fit_db` "
        f"fits them (20 % of the networks held out).",
        "",
        f"Kernel predictor (`learned kernel`): {kernel['kernels']} kernels (fused conv+BN+act, depthwise, "
        f"grouped, pointwise, linear, pools, add(+act), SE multiplies, concatenations, transposes, splits) timed "
        f"alone in onnxruntime: random configurations covering channels 3..2048, spatial 1..~300, k 1/3/5/7, "
        f"stride 1/2, dense/depthwise/grouped, plus the distinct kernels of {args.kernel_nets} training "
        f"networks; an MLP on log latency of each kernel's fastest timing block. A network is "
        f"{law} (seconds; robust least squares on {kernel['calibration']['networks']} training networks, terms "
        f"chosen by 5-fold cross-validation on them: see Diagnosis); the reorders are the NCHWc layout "
        f"conversions onnxruntime inserts, found on the FX graph (`layout_reorders`), the isolation elements "
        f"what the nodes each kernel runs only when timed alone (its reorders, an unfused HardSwish) pass over. The kernels alone sum to "
        f"{kernel['calibration']['sum_over_whole_median']:.2f}x the whole network (median).",
        "",
        f"Conditions: the machine (2 logical CPUs) was shared with other engineers' training and benchmarks "
        f"throughout; the kernels were timed {when}, the training networks {span(networks)}, the evaluation "
        f"networks {span(evaluated)} (all {time.strftime('%Y-%m-%d', time.gmtime(window[1] or 0))}); load average "
        f"when this report was written: "
        f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min). Latency measurements ran at normal "
        f"priority with 1 intra-op thread.",
        "",
        "FLOPs and params are scores, not latencies: only their ranking (τ, ρ) is defined.",
        "",
        "Against the median of each network's timing run (the measurement as the issue defines it):",
        "",
        comparison.table("github"),
        "",
        f"Against each network's fastest timing block (`min_s`, same runs): the machine was shared, and the "
        f"medians of some runs include waiting for a core (median/fastest: {worst} "
        f"{ratio[worst]:.2f}x; median of all {sorted(ratio.values())[len(ratio) // 2]:.2f}x). The kernel "
        f"predictor is trained and calibrated on fastest blocks.",
        "",
        by_fastest.table("github"),
        "",
        *(f"- {line}" for line in failures),
        *([""] if failures else []),
        f"Learned models fitted on 80 % of the stored networks (gnn and perop: the previous run's "
        f"{trained_on['gnn']} networks, not refitted; kernel: {trained_on['kernel']}); on their held-out 20 % "
        f"(random networks, same distribution as training, against medians): "
        + "; ".join(f"{k}: τ {m['kendall_tau']:.3f}, ±10 % {m['within10_pct']:.0f}%, MAPE {m['mape_pct']:.1f}%"
                    f" (n={m['n']})" for k, m in held.items()),
        "",
        f"One `graph_cost` on {BIG_GRAPH} ({big_nodes} nodes), median of 5 (target ≤ 20 ms); wall-clock and "
        f"this process's CPU time (on a shared machine the wall clock includes waiting for a core). Repeated: "
        f"the graph priced again (what ranking passes do; per-node caches warm). First: the first call on a "
        f"freshly traced copy (caches cold), one call:",
        "",
        tabulate([[k, f"{w:.1f}", f"{c:.1f}", f"{cw:.1f}", f"{cc:.1f}"] for k, (w, c, cw, cc) in speed.items()],
                 ["model", "repeated wall ms", "repeated CPU ms", "first wall ms", "first CPU ms"],
                 tablefmt="github", disable_numparse=True),
        "",
        "Per network (ms; FLOPs and params as counted; measured = median):",
        "",
        comparison.networks_table("github"),
        "",
        "Fastest timing block of each evaluation network (ms): "
        + ", ".join(f"{n} {v * 1e3:.2f}" for n, v in sorted(by_fastest.measured_s.items(), key=lambda kv: kv[1])),
        "",
        *diagnosis_section(args),
        *REPRODUCE,
    ]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines))
    with open(os.path.join(args.work, f"{name}.json"), "w") as f:
        json.dump({"measured_s": comparison.measured_s,
                   "results": [{"label": r.label, "metrics": r.metrics, "predicted": r.predicted}
                               for r in comparison.results],
                   "fastest_s": by_fastest.measured_s,
                   "results_fastest": [{"label": r.label, "metrics": r.metrics} for r in by_fastest.results],
                   "held_out": held, "speed_ms": speed, "train_networks": n_nets}, f, indent=1)
    print("\n".join(lines))
    print(f"wrote {path}")


def diagnosis_section(args) -> list[str]:
    """The "Diagnosis" section: ``WORK/diagnosis.json`` (``--stage diagnose``) and the calibration's term
    selection, as markdown lines (empty without a diagnosis)."""
    from tabulate import tabulate

    path = os.path.join(args.work, "diagnosis.json")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        result = json.load(f)
    import torch as torch_

    calibration = torch_.load(os.path.join(args.work, "kernel.pt"), weights_only=False)["metadata"]["calibration"]
    check = result.get("_reorder_check", {})
    exact = sum(v[:2] == v[2:] for v in check.values())
    return [
        "## Diagnosis",
        "",
        "Per-node onnxruntime profiles (`--stage diagnose`: `SessionOptions.enable_profiling`, all graph "
        "optimisations, 1 thread; 60 runs whole, 45 runs for each distinct kernel alone; medians per node, ms). "
        "`conv+gemm in net` is the time the network's Conv/FusedConv/Gemm nodes take inside it, `same alone` "
        "the same kernels' Conv/Gemm nodes timed alone; `reorders` are ReorderInput/ReorderOutput nodes (in the "
        "network; inside the kernels timed alone); `session overhead alone` is the kernels' `session.run` time "
        "beyond their nodes, summed; `moves` are Transpose/Reshape/Concat/Split/Flatten.",
        "",
        diagnosis_table(result),
        "",
        f"Reorders: onnxruntime's optimised graph (`optimized_model_filepath`) against `layout_reorders` on the FX "
        f"graph, ReorderInput + ReorderOutput nodes, all {len(check)} evaluation networks ({exact} exact): "
        + ", ".join(f"{n} {v[0] + v[1]}/{v[2] + v[3]}" for n, v in check.items()),
        "",
        "Calibration terms, 5-fold cross-validated MAPE (%) on the calibration networks (training networks "
        "only; the lowest is used):",
        "",
        tabulate([[t.replace("+", " + "), f"{v:.2f}"] for t, v in calibration["cv_mape_pct"].items()],
                 ["terms", "CV MAPE (%)"], tablefmt="github", disable_numparse=True),
        "",
    ]


REPRODUCE = [
    "Reproduce (the stores are resumable; each stage skips what is stored):",
    "",
    "```",
    "python benchmarks/cost_models.py --stage measure --work runs/cost_models_k2      # 15 torchvision nets, whole",
    "python benchmarks/cost_models.py --stage profile --work runs/cost_models_k2 --n 400 --node-nets 0",
    "python benchmarks/cost_models.py --stage kernels --work runs/cost_models_k2 --kernels 3000 --kernel-nets 30",
    "python benchmarks/cost_models.py --stage kernels --work runs/cost_models_k2 --kernels 3000 --kernel-nets 60",
    "python benchmarks/cost_models.py --stage kernel-lists --work runs/cost_models_k2",
    "python benchmarks/cost_models.py --stage fit --fit kernel --work runs/cost_models_k2",
    "python benchmarks/cost_models.py --stage diagnose --work runs/cost_models_k2   # per-node profiles",
    "python benchmarks/cost_models.py --stage report --work runs/cost_models_k2 --kernel-nets 60",
    "```",
    "",
    "or with the command line: `hant profile --n 300 --kernels 3000 --out data.db`, "
    "`hant fit data.db --model kernel --out kernel.pt`, "
    "`hant eval-cost learned:kernel.pt,roofline:cpu,flops --models torchvision:resnet18,...`.",
]


def stage_recheck(args) -> None:
    """Time the evaluation networks again, afresh (nothing read from or written to the stores), and score the
    saved kernel predictor on this independent measurement; writes ``results/cost_models_recheck.md``."""
    from tabulate import tabulate

    from hant.cost_models import get
    from hant.cost_models.timing import runtime_for

    runtime = runtime_for("cpu", "onnxruntime", args.threads)
    predictor = get("learned:" + os.path.join(args.work, "kernel.pt"))
    rows, within = [], {"median": 0, "fastest": 0}
    for name, gm in load_graphs(args.networks).items():
        timing = runtime.time(gm.eval(), (torch.randn(*INPUT),), NETWORK_TIMING)
        predicted = predictor.graph_cost(gm).latency_s
        errors = {"median": predicted / timing.median_s - 1, "fastest": predicted / timing.spread.min_s - 1}
        for key, error in errors.items():
            within[key] += abs(error) <= 0.10
        rows.append([name, f"{timing.median_s * 1e3:.2f}", f"{timing.spread.min_s * 1e3:.2f}", f"{predicted * 1e3:.2f}",
                     f"{100 * errors['median']:+.1f}", f"{100 * errors['fastest']:+.1f}"])
    n = len(rows)
    text = "\n".join([
        "# Kernel predictor against an independent re-measurement of the evaluation networks", "",
        f"{environment_line(args.threads, 1)}; written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. "
        f"Every network timed afresh ({NETWORK_TIMING.min_samples}+ timing blocks), not read from the stores the "
        f"predictor was evaluated on; predictor `{os.path.join(args.work, 'kernel.pt')}`. The machine was shared.", "",
        tabulate(rows, headers=["network", "median ms", "fastest ms", "predicted ms", "error vs median %",
                                "error vs fastest %"], tablefmt="github"), "",
        f"Within ±10 %: {within['median']}/{n} against medians, {within['fastest']}/{n} against fastest blocks.", ""])
    path = os.path.join(HERE, "results", "cost_models_recheck.md")
    with open(path, "w") as f:
        f.write(text)
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: few small networks, tiny space")
    parser.add_argument("--stage", choices=("measure", "profile", "kernels", "kernel-lists", "features", "fit", "diagnose",
                                            "report", "recheck", "all"),
                        default="all", help="fit: (re)fit both predictors; report fits them only when not saved")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default 1)")
    parser.add_argument("--n", type=int, default=300, help="training networks to profile (default 300)")
    parser.add_argument("--node-nets", type=int, default=16, help="of those, profiled op by op too (default 16)")
    parser.add_argument("--chunk", type=int, default=10, help="networks per profiling chunk (default 10)")
    parser.add_argument("--profile-minutes", type=float, default=float("inf"),
                        help="stop starting new whole-network chunks after this many minutes")
    parser.add_argument("--kernels", type=int, default=4000,
                        help="random kernel configurations to time alone (and as many from training networks)")
    parser.add_argument("--kernel-nets", type=int, default=300, help="training networks whose kernels are timed")
    parser.add_argument("--kernel-minutes", type=float, default=float("inf"),
                        help="stop timing kernels after this many minutes")
    parser.add_argument("--fit", default="gnn,perop,kernel", help="predictors --stage fit fits (comma-separated)")
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
    if args.stage in ("kernels", "all"):
        stage_kernels(args)
    if args.stage == "kernel-lists":
        stage_kernel_lists(args)
    if args.stage == "features":
        stage_features(args)
    if args.stage == "fit":
        stage_fit(args, tuple(args.fit.split(",")))
    if args.stage == "diagnose":
        stage_diagnose(args)
    if args.stage in ("report", "all"):
        stage_report(args)
    if args.stage == "recheck":
        stage_recheck(args)


if __name__ == "__main__":
    main()
