"""How long one ``graph_cost`` takes on a ~1,000-node graph (issue target: <= 20 ms), per cost model.

Writes ``benchmarks/results/graph_cost_speed.md``. For each graph (torchvision
efficientnet_b7, 866 nodes, and efficientnet_v2_l, 1,094 nodes; batch 1, 224x224) and each
cost model (the kernel predictor, the graph network and the per-op predictor, the calibrated
roofline's uncalibrated form and the flops counter), in interleaved rounds (model A, B, C, A, B, C, ...):

* first call: ``graph_cost`` on a fresh deep copy of the traced graph (new Node objects, so
  no per-node cache has seen them; the code paths are warm), as a user pricing a network
  once would see it; each copy is made just before its call (untimed) and dropped after;
* never-seen network (kernel predictor only): the same after :func:`forget_kernels`, so no
  kernel configuration or feature row is shared with an earlier graph either (a copy of a
  network priced before shares them: passes that price many variants of one network do);
* repeated: ``graph_cost`` on the same graph again (what ranking passes do);
* rows read (learned models): a first call on a fresh copy and then reading its report's
  per-node rows, which the learned models build only when they are read (``hant inspect``
  reads them; passes that rank rewrites read only the total).

Both are reported as medians and minima of the rounds, wall clock and this thread's CPU
time (on a shared machine the wall clock includes waiting for a core).

The kernel predictor is ``--predictor PATH`` (a ``hant fit --model kernel`` file); without
one, a predictor of the same architecture is fitted to synthetic kernel latencies: how
fast it prices does not depend on its weights, only on the graph walk and one MLP call.
The graph network and the per-op predictor (default architectures) are likewise fitted for a
few steps to synthetic latencies of random network-space graphs.

    python benchmarks/graph_cost_speed.py
    python benchmarks/graph_cost_speed.py --predictor runs/cost_models/kernel.pt --rounds 20
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import platform
import statistics
import time

import numpy as np
import torch
from tabulate import tabulate

import hant
from hant.cost_models import get
from hant.cost_models.learned import featurize, train
from hant.cost_models.learned.kernel_model import KernelCostModel, train_kernels
from hant.cost_models.learned.kernels import forget_kernels, kernel_macs, sampled_kernels
from hant.cost_models.learned.predictor import LearnedCostModel
from hant.cost_models.netspace import build, input_shape, sample_spec

GRAPHS = ("efficientnet_b7", "efficientnet_v2_l")


def kernel_model(path: str | None) -> tuple[object, str]:
    """The kernel predictor to time, and how it was obtained."""
    if path:
        return get(f"learned:{path}"), path
    configs = sampled_kernels(400, seed=0)
    latency = np.array([3e-6 + kernel_macs(c) / 2e10 for c in configs])
    return KernelCostModel(train_kernels(configs, latency)), "fitted to synthetic latencies (same architecture)"


def node_models() -> dict[str, LearnedCostModel]:
    """The graph network and the per-op predictor, fitted briefly to synthetic latencies."""
    graphs = []
    for seed in range(8):
        spec = sample_spec(seed)
        graphs.append(featurize(hant.trace(build(spec).eval(), torch.randn(*input_shape(spec)))))
    latency = [1e-3 * (1 + g.num_nodes / 100) for g in graphs]
    return {f"learned {kind}": LearnedCostModel(train(kind, graphs, latency, config={"steps": 20}))
            for kind in ("gnn", "perop")}


def time_call(fn, *args) -> tuple[float, float]:
    """(wall, CPU) milliseconds of one call ``fn(*args)``."""
    start, start_cpu = time.perf_counter(), time.thread_time()
    fn(*args)
    return (time.perf_counter() - start) * 1e3, (time.thread_time() - start_cpu) * 1e3


def fresh_copy(gm):
    """A deep copy of ``gm`` made untimed just before its call, after a collection: copies are made one at a
    time (15 copies of a 118M-parameter network held at once slow every call down by paging)."""
    copied = copy.deepcopy(gm)
    gc.collect()
    return copied


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--predictor", default=None, help="a kernel predictor file (default: see above)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                      "graph_cost_speed.md"))
    args = parser.parse_args(argv)
    import torchvision

    kernel, origin = kernel_model(args.predictor)
    models = {"learned kernel": kernel, **node_models(), "roofline:cpu": get("roofline:cpu"), "flops": get("flops")}
    deferred = [label for label in models if label.startswith("learned")]
    rows = []
    load_before = os.getloadavg()[0]
    for name in GRAPHS:
        torch.manual_seed(0)
        base = hant.trace(torchvision.models.get_model(name, weights=None).eval(), torch.randn(1, 3, 224, 224))
        for model in models.values():          # warm the code paths (and the repeated graph's caches)
            model.graph_cost(base)
        first = {label: [] for label in models}
        repeated = {label: [] for label in models}
        with_rows = {label: [] for label in deferred}
        cold = []
        for _ in range(args.rounds):
            for label, model in models.items():
                first[label].append(time_call(model.graph_cost, fresh_copy(base)))
                repeated[label].append(time_call(model.graph_cost, base))
                if model is kernel:            # a network never seen: no shared kernel configuration either
                    unseen = fresh_copy(base)
                    forget_kernels()
                    cold.append(time_call(model.graph_cost, unseen))
                if label in with_rows:
                    with_rows[label].append(time_call(lambda gm: model.graph_cost(gm).rows, fresh_copy(base)))
        for label in models:
            f_wall, f_cpu = zip(*first[label])
            r_wall, r_cpu = zip(*repeated[label])
            c_cpu = [c for _, c in cold] if label == "learned kernel" else None
            w_cpu = [c for _, c in with_rows[label]] if label in with_rows else None
            rows.append([name, len(base.graph.nodes), label,
                         f"{statistics.median(f_cpu):.1f} / {min(f_cpu):.1f}",
                         f"{statistics.median(f_wall):.1f}",
                         f"{statistics.median(c_cpu):.1f} / {min(c_cpu):.1f}" if c_cpu else "-",
                         f"{statistics.median(w_cpu):.1f} / {min(w_cpu):.1f}" if w_cpu else "-",
                         f"{statistics.median(r_cpu):.1f} / {min(r_cpu):.1f}",
                         f"{statistics.median(r_wall):.1f}"])
    headers = ["graph", "nodes", "model", "first call CPU ms (median / min)", "first call wall ms (median)",
               "never-seen network CPU ms (median / min)", "first call, rows read CPU ms (median / min)",
               "repeated CPU ms (median / min)",
               "repeated wall ms (median)"]
    table = tabulate(rows, headers, tablefmt="github")
    text = "\n".join([
        "# graph_cost speed on ~1,000-node graphs", "",
        f"torch {torch.__version__}, Python {platform.python_version()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} logical CPUs; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load average "
        f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after (2 cores, shared).", "",
        f"{args.rounds} interleaved rounds per graph; each round prices, with every model, a fresh deep copy "
        f"(first call; made untimed just before) and the same graph again (repeated); for the kernel predictor, "
        f"also a fresh copy after forgetting every shared kernel configuration and feature row (never-seen "
        f"network); for the learned models, a fresh copy whose report's per-node rows are read after the call "
        f"(rows read). Kernel predictor: {origin}; graph network and per-op predictor: default architectures "
        f"fitted for 20 steps to synthetic latencies of 8 random network-space graphs.",
        "",
        table, ""])
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as handle:
        handle.write(text)
    print(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
