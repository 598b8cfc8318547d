"""Profiling: measure random networks from the network space and store them (``hant profile``).

:func:`profile` draws spec ``i`` from ``random.Random(f"{seed}:{i}")`` for ``i < n``, so the same
seed always gives the same networks, in any order and after any interruption. For each
spec not yet in the store (for this runtime key) it

1. builds the network (:func:`hant.cost_models.netspace.build`) and traces it (``hant.trace``);
2. if ``measure_nodes``, times every node's op alone (a stored op is reused, a new one is stored at
   once), giving ``node_latencies`` keyed by the traced node names;
3. times the network whole and stores it, with the node latencies, in one commit.

A killed run loses at most the network it was on; running again skips what is stored.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import torch

from hant.cost_models.base import COMPUTE_SKIP_KINDS
from hant.cost_models.measured import GRAPH_TIMING, OP_TIMING, MeasuredModel
from hant.cost_models.netspace import NetSpace, build, input_shape, sample_spec
from hant.cost_models.store import LatencyStore
from hant.cost_models.timing import TimingConfig
from hant.graphs.trace import trace

__all__ = ["profile", "ProfileSummary", "profile_specs"]


@dataclass(frozen=True)
class ProfileSummary:
    """What a :func:`profile` call did."""
    total: int          # specs asked for
    measured: int       # networks measured by this call
    skipped: int        # networks found already stored
    store: str          # the store's path
    runtime: str        # the runtime, its threads and the device, in words


def profile_specs(n: int, seed: int = 0, space: NetSpace | str = "default") -> list[dict]:
    """The ``n`` specs :func:`profile` measures for ``seed`` and ``space``."""
    return [sample_spec(random.Random(f"{seed}:{i}"), space) for i in range(n)]


def profile(n: int, out: str | os.PathLike | LatencyStore | None = None, runtime: str = "onnxruntime",
            threads: int | None = None, seed: int = 0, measure_nodes: bool = True, *,
            space: NetSpace | str = "default", device: str = "cpu", op_timing: TimingConfig = OP_TIMING,
            graph_timing: TimingConfig = GRAPH_TIMING, progress: bool = True) -> ProfileSummary:
    """Measure ``n`` networks sampled from ``space`` with ``seed`` on ``device``/``runtime`` into ``out``.

    ``out`` is a store path (None: the default store) or a :class:`LatencyStore`; ``threads`` the
    runtime's thread count (default ``torch.get_num_threads()``). Shows a tqdm bar unless
    ``progress`` is False. Raises :class:`hant.CostModelError` for an unknown runtime or space.
    """
    from tqdm.auto import tqdm

    model = MeasuredModel(device, runtime, threads=threads, store=out, op_timing=op_timing, graph_timing=graph_timing)
    store, key = model.store, model.key
    specs = profile_specs(n, seed, space)
    measured = skipped = 0
    bar = tqdm(specs, desc=f"profile {runtime}", unit="net", disable=not progress)
    for spec in bar:
        if store.has_network(spec, key):
            skipped += 1
            continue
        network = build(spec)
        example = torch.randn(input_shape(spec))
        node_latencies = None
        if measure_nodes:
            gm = trace(network, example)
            node_latencies = {node.name: model.op_latency(node)[0] for node in gm.graph.nodes
                              if node.op not in COMPUTE_SKIP_KINDS}
        timing = model.measure_module(network, (example,))
        store.put_network(spec, input_shape(spec), key, timing.median_s, timing.spread, node_latencies)
        measured += 1
        bar.set_postfix(stored=measured + skipped, last_ms=f"{timing.median_s * 1e3:.2f}")
    bar.close()
    return ProfileSummary(n, measured, skipped, str(store.path), model.runtime.describe())
