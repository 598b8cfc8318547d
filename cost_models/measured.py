"""``measured:DEVICE-RUNTIME``: time ops and whole graphs on this machine, cached in a latency store.

Specs: ``measured:cpu-onnxruntime`` (the default for plain ``measured``), ``measured:cpu-torch``,
``measured:cuda-torch`` (CUDA events; only with a GPU). Options follow commas:
``threads=N`` (runtime threads; default ``torch.get_num_threads()``), ``total=graph|nodes``
(what a report's total is, see below), ``db=PATH`` (the store file) and ``samples=N`` (whole
graphs: independent timings per graph, default 1, see below).

* ``node_cost(node)``: the op alone, rebuilt as a tiny module with its real input shapes.
  Ops with an op view (conv, linear, batchnorm, layer/group norm, activation, add, mul,
  pool, matmul) are rebuilt from the view, so every spelling of an op (``nn.Conv2d``,
  ``F.conv2d``, ATen) shares one signature and one measurement. Cat, softmax, reduce and
  other ops (shape ops included) are copied into a one-node graph. Identities, bookkeeping and
  views of run-time sizes cost 0 (see :func:`is_free`).
  MACs, bytes and parameters come from the ``flops`` model.
* ``graph_cost(gm)``: one row per node as above; the total is the whole graph measured
  at once (``total="graph"``, the default) or the sum of the rows (``total="nodes"``). The
  notes give both, so the gap between them (what the runtime fuses) is visible.
* ``relative_latency(gm, reference)``: ``gm``'s fastest steady-state call over ``reference``'s, the
  two timed in alternating rounds (a ratio that holds while the machine's speed drifts; not stored).
  Operator substitution prices its students this way, against the teacher.

Every measurement goes to the store, keyed by signature and the runtime's key (name, version,
threads, device fingerprint); a stored measurement is reused. A whole graph is priced at the
median of ``samples`` independent timings: a graph stored with fewer is timed again until it has
that many (so one figure taken while the machine was busy is outvoted, and raising ``samples``
re-times a store). Ops are timed once.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import time
from collections import OrderedDict
from typing import Any, Callable

import torch
import torch.fx
import torch.nn as nn
from torch.fx import GraphModule, Node

from hant.cost_models.base import COMPUTE_SKIP_KINDS, Cost, CostReport, CostRow, NodeSumCostModel, register
from hant.cost_models.base import target_name
from hant.cost_models.flops import FlopsModel
from hant.cost_models.roofline import roofline_kind
from hant.cost_models.store import LatencyStore, canonical_json
from hant.cost_models.timing import Runtime, Timing, TimingConfig, runtime_for
from hant.errors import CostModelError
from hant.graphs.ops import (
    activation_of, add_of, batchnorm_of, constant_of, conv_of, layernorm_of, linear_of, matmul_of, mul_of, op_kind,
    output_dtype, output_shape, pool_of, tensor_meta,
)

__all__ = ["MeasuredModel", "op_signature", "is_free", "build_op", "graph_key", "parse_spec", "FREE_KINDS",
           "OP_TIMING", "GRAPH_TIMING"]

# Kinds priced 0 without measuring: bookkeeping and ops that return their input unchanged.
FREE_KINDS = frozenset({"identity"}) | COMPUTE_SKIP_KINDS
# Kinds rebuilt from their op view; anything else measurable is copied as a one-node graph.
VIEW_KINDS = ("conv", "linear", "batchnorm", "layernorm", "activation", "add", "mul", "pool", "matmul")

KEPT_RUNNERS = 4          # graphs whose runners relative_latency keeps (an ONNX session each)
OP_TIMING = TimingConfig(time_cap_s=0.3)
GRAPH_TIMING = TimingConfig(time_cap_s=2.0)


# ---------------------------------------------------------------- signatures

def _shape(node: Any) -> list[int] | None:
    shape = output_shape(node)
    return [int(s) for s in shape] if shape is not None else None


def _dtype_name(dtype: torch.dtype | None) -> str:
    return str(dtype or torch.float32).replace("torch.", "")


def _as_list(value: Any) -> Any:
    return list(value) if isinstance(value, (tuple, list)) else value


def _view_attrs(kind: str, node: Node) -> tuple[list[Any], dict]:
    """The operand nodes and attributes of a node whose ``op_kind`` is one of :data:`VIEW_KINDS`."""
    if kind == "conv":
        v = conv_of(node)
        return [v.input], dict(weight_shape=list(v.weight_shape), stride=list(v.stride), padding=_as_list(v.padding),
                               dilation=list(v.dilation), groups=v.groups, bias=v.has_bias,
                               transposed=v.transposed, output_padding=list(v.output_padding),
                               padding_mode=v.padding_mode)
    if kind == "linear":
        v = linear_of(node)
        return [v.input], dict(in_features=int(v.in_features), out_features=int(v.out_features), bias=v.has_bias)
    if kind == "batchnorm":
        v = batchnorm_of(node)
        return [v.input], dict(num_features=v.num_features)
    if kind == "layernorm":
        v = layernorm_of(node)
        return [v.input], dict(norm=v.kind, normalized_shape=list(v.normalized_shape), num_groups=v.num_groups)
    if kind == "activation":
        v = activation_of(node)
        params = {k: p for k, p in v.params.items() if isinstance(p, (int, float, str, bool))}
        return [v.input], dict(activation=v.kind, params=params)
    if kind in ("add", "mul"):
        v = (add_of if kind == "add" else mul_of)(node)
        operands = v.tensor_operands
        return operands, dict(op=kind, scalar=len(operands) == 1)
    if kind == "pool":
        v = pool_of(node)
        return [v.input], dict(pool=v.kind, dims=v.spatial_dims, kernel_size=list(v.kernel_size),
                               stride=list(v.stride), padding=list(v.padding), dilation=list(v.dilation),
                               ceil_mode=v.ceil_mode, count_include_pad=v.count_include_pad,
                               divisor_override=v.divisor_override, output_size=_as_list(v.output_size))
    v = matmul_of(node)
    return [a for a in (v.lhs, v.rhs) if isinstance(a, Node)], {}


def _generic_attrs(node: Node) -> dict:
    """What defines a one-node copy besides its input shapes: the target and non-tensor arguments."""
    inputs = node.all_input_nodes
    swap = lambda a: f"${inputs.index(a)}" if isinstance(a, Node) else a  # noqa: E731
    args = torch.fx.node.map_aggregate(node.args, swap)
    kwargs = torch.fx.node.map_aggregate(dict(node.kwargs), swap)
    attrs = dict(op=node.op, target=target_name(node), args=args, kwargs=kwargs)
    if node.op == "call_module":
        attrs["module"] = node.graph.owning_module.get_submodule(node.target).extra_repr()
    return attrs


def is_free(node: Node) -> bool:
    """True for nodes priced 0 without measuring: :data:`FREE_KINDS` (identities, bookkeeping), nodes
    that produce no tensor (sizes, ``torch.export`` guards, asserts), and shape ops that pick from a
    tuple or read sizes known only at run time (``getitem`` of a ``chunk``, ``x.view(n, -1)``).

    Other shape ops (permute, flatten, transpose, ...) are measured: onnxruntime runs them as
    real kernels (a Transpose copies), eager torch pays their dispatch."""
    kind = op_kind(node)
    if kind in FREE_KINDS or tensor_meta(node) is None:
        return True
    return kind == "shape" and any(output_shape(a) is None for a in node.all_input_nodes)


def op_signature(node: Node) -> dict | None:
    """The store key of a node's op: ``{"kind", "input_shapes", "dtype", "attrs"}`` (JSON-able).

    None for nodes that cost nothing (:func:`is_free`) or whose input shapes are unknown
    (no ``tensor_meta``: run shape propagation first).
    """
    if is_free(node):
        return None
    kind = op_kind(node)
    if kind in VIEW_KINDS:
        operands, attrs = _view_attrs(kind, node)
    else:
        operands, attrs = list(node.all_input_nodes), _generic_attrs(node)
    shapes = [_shape(a) for a in operands]
    if not operands or any(s is None for s in shapes):
        return None
    dtype = output_dtype(operands[0])
    return {"kind": kind, "input_shapes": shapes, "dtype": _dtype_name(dtype), "attrs": attrs}


def graph_key(gm: GraphModule) -> str:
    """A structural hash of a graph: op signatures (or targets and shapes) and edges; weight values
    do not enter, so two graphs that differ only in weights share one whole-graph measurement."""
    index: dict[Node, int] = {}
    entries = []
    for i, node in enumerate(gm.graph.nodes):
        index[node] = i
        what = op_signature(node) or dict(op=node.op, target=target_name(node), shape=_shape(node))
        entries.append([what, [index[a] for a in node.all_input_nodes]])
    return hashlib.sha256(canonical_json(entries).encode()).hexdigest()


# ---------------------------------------------------------------- rebuilding an op

class _Binary(nn.Module):
    def __init__(self, op: str, scalar: bool):
        super().__init__()
        self.op, self.scalar = op, scalar

    def forward(self, x, y=None):
        other = 1.5 if self.scalar else y
        return x + other if self.op == "add" else x * other


class _Matmul(nn.Module):
    def forward(self, a, b):
        return torch.matmul(a, b)


_ACTIVATIONS = {
    "relu": nn.ReLU, "relu6": nn.ReLU6, "hardtanh": nn.Hardtanh, "leaky_relu": nn.LeakyReLU, "prelu": nn.PReLU,
    "elu": nn.ELU, "selu": nn.SELU, "celu": nn.CELU, "gelu": nn.GELU, "silu": nn.SiLU, "mish": nn.Mish,
    "hardswish": nn.Hardswish, "hardsigmoid": nn.Hardsigmoid, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh,
    "softplus": nn.Softplus,
}


def _activation(name: str, params: dict) -> nn.Module:
    cls = _ACTIVATIONS[name]
    accepted = inspect.signature(cls).parameters
    return cls(**{k: v for k, v in params.items() if k in accepted and k != "inplace"})


def _module_from_signature(sig: dict) -> nn.Module:
    kind, a, shapes = sig["kind"], sig["attrs"], sig["input_shapes"]
    if kind == "conv":
        w, n = a["weight_shape"], len(a["weight_shape"]) - 2
        if a["transposed"]:
            cls = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)[n - 1]
            return cls(w[0], w[1] * a["groups"], w[2:], a["stride"], a["padding"], a["output_padding"], a["groups"],
                       a["bias"], a["dilation"])
        cls = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[n - 1]
        return cls(w[1] * a["groups"], w[0], w[2:], a["stride"], a["padding"], a["dilation"], a["groups"], a["bias"],
                   a["padding_mode"])
    if kind == "linear":
        return nn.Linear(a["in_features"], a["out_features"], a["bias"])
    if kind == "batchnorm":
        rank = len(shapes[0])
        cls = nn.BatchNorm1d if rank <= 3 else nn.BatchNorm2d if rank == 4 else nn.BatchNorm3d
        return cls(a["num_features"])
    if kind == "layernorm":
        if a["norm"] == "group_norm":
            return nn.GroupNorm(a["num_groups"], shapes[0][1])
        return nn.LayerNorm(a["normalized_shape"])
    if kind == "activation":
        return _activation(a["activation"], a["params"])
    if kind in ("add", "mul"):
        return _Binary(a["op"], a["scalar"])
    if kind == "pool":
        n, pool = a["dims"], a["pool"]
        if pool == "adaptive_avg":
            return (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)[n - 1](a["output_size"])
        if pool == "adaptive_max":
            return (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)[n - 1](a["output_size"])
        if pool == "avg":
            cls = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)[n - 1]
            extra = {"divisor_override": a["divisor_override"]} if n > 1 else {}
            return cls(a["kernel_size"], a["stride"], a["padding"], a["ceil_mode"], a["count_include_pad"], **extra)
        cls = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)[n - 1]
        return cls(a["kernel_size"], a["stride"], a["padding"], a["dilation"], ceil_mode=a["ceil_mode"])
    if kind == "matmul":
        return _Matmul()
    raise CostModelError(f"no op view rebuilds ops of kind {kind!r}")


def _one_node_graph(node: Node) -> nn.Module:
    """The node alone: its tensor inputs become placeholders, its module and constants are copied."""
    owner = node.graph.owning_module
    graph = torch.fx.Graph()
    attrs: dict[str, Any] = {}
    env: dict[Node, Node] = {}
    for i, a in enumerate(node.all_input_nodes):
        if a.op == "get_attr":
            value = constant_of(a)
            if value is None:
                raise CostModelError(f"{node.name} reads {a.target}, which is not a tensor; it cannot be copied alone")
            attrs[a.target] = copy.deepcopy(value)
            env[a] = graph.get_attr(a.target)
        else:
            env[a] = graph.placeholder(f"input_{i}")
    if node.op == "call_module":
        attrs[node.target] = copy.deepcopy(owner.get_submodule(node.target))
    copied = graph.node_copy(node, lambda a: env[a])
    graph.output(copied)
    return GraphModule(attrs, graph, "one_op")


def _example(shape: list[int], dtype_name: str) -> torch.Tensor:
    dtype = getattr(torch, dtype_name, torch.float32)
    if dtype.is_floating_point:
        return torch.randn(shape, dtype=dtype)
    return torch.zeros(shape, dtype=dtype)


def _runnable(gm: GraphModule) -> tuple[nn.Module, tuple]:
    """``gm`` in eval mode (a copy when any part of it is in training mode: the caller's graph stays
    untouched, and train-mode BN would update its statistics) and example inputs of its placeholders' shapes."""
    inputs = []
    for node in gm.graph.find_nodes(op="placeholder"):
        shape = _shape(node)
        if shape is None:
            raise CostModelError(f"placeholder {node.name} has no shape; run hant.trace or propagate_shapes "
                                 "on the graph before measuring it")
        inputs.append(_example(shape, _dtype_name(output_dtype(node))))
    module = copy.deepcopy(gm).eval() if any(m.training for m in gm.modules()) else gm
    return module, tuple(inputs)


def build_op(node: Node, signature: dict | None = None) -> tuple[nn.Module, tuple]:
    """A tiny eval-mode module computing the node's op, and example inputs of its real shapes.

    Raises :class:`CostModelError` for nodes that cannot be isolated (no shapes, free kinds).
    """
    signature = signature or op_signature(node)
    if signature is None:
        raise CostModelError(f"node {node.name} ({op_kind(node)}) has no measurable op; run shape propagation "
                             "(hant.trace) first, or price it 0")
    if signature["kind"] in VIEW_KINDS:
        module = _module_from_signature(signature)
        inputs = tuple(_example(s, signature["dtype"]) for s in signature["input_shapes"])
        dtype = getattr(torch, signature["dtype"], torch.float32)
        module = module.to(dtype) if dtype.is_floating_point else module
    else:
        module = _one_node_graph(node)
        operands = [a for a in node.all_input_nodes if a.op != "get_attr"]
        inputs = tuple(_example(_shape(a), _dtype_name(output_dtype(a))) for a in operands)
    return module.eval(), inputs


# ---------------------------------------------------------------- the model

def parse_spec(argument: str | None, prefix: str = "measured",
               options: tuple[str, ...] = ("threads", "total", "db", "samples")) -> dict:
    """``"DEVICE-RUNTIME[,threads=N][,total=graph|nodes][,db=PATH][,samples=N]"`` as keyword arguments of the model.

    ``prefix`` names the spec in messages; ``options`` are the options it accepts.
    """
    text = argument or "cpu-onnxruntime"
    head, *given = text.split(",")
    device, _, runtime = head.partition("-")
    usage = (f"use {prefix}:cpu-onnxruntime, {prefix}:cpu-torch or {prefix}:cuda-torch, optionally with "
             + " ".join(f",{o}={_OPTION_VALUES[o]}" for o in options))
    if device not in ("cpu", "cuda") or runtime not in ("torch", "onnxruntime"):
        raise CostModelError(f"bad {prefix} spec {text!r}; {usage}")
    if device == "cuda" and runtime != "torch":
        raise CostModelError(f"{prefix}:{head} is not supported: on a GPU hant times eager torch with CUDA "
                             f"events; use {prefix}:cuda-torch")
    kwargs: dict[str, Any] = {"device": device, "runtime": runtime}
    for option in given:
        name, _, value = option.partition("=")
        if name in ("threads", "samples") and name in options and value.isdigit() and int(value) > 0:
            kwargs[name] = int(value)
        elif name == "total" and name in options and value in ("graph", "nodes"):
            kwargs["total"] = value
        elif name == "db" and name in options and value:
            kwargs["store"] = value
        else:
            raise CostModelError(f"bad option {option!r} in {prefix} spec {text!r}; {usage}")
    return kwargs


_OPTION_VALUES = {"threads": "N", "total": "graph|nodes", "db": "PATH", "samples": "N"}


class MeasuredModel(NodeSumCostModel):
    """Times ops and graphs on this machine; see the module docstring.

    ``store``: a :class:`LatencyStore`, a path, or None for the default store.
    ``op_timing``/``graph_timing``: how long to try for a stable median per op / per graph.
    ``samples``: independent timings a whole graph's price is the median of.
    """

    def __init__(self, device: str = "cpu", runtime: str = "onnxruntime", *, threads: int | None = None,
                 store: LatencyStore | str | None = None, total: str = "graph", samples: int = 1,
                 op_timing: TimingConfig = OP_TIMING, graph_timing: TimingConfig = GRAPH_TIMING):
        if total not in ("graph", "nodes"):
            raise CostModelError(f"total must be 'graph' or 'nodes', got {total!r}")
        if not (isinstance(samples, int) and samples >= 1):
            raise CostModelError(f"samples must be a positive number of timings, got {samples!r}")
        self.runtime: Runtime = runtime_for(device, runtime, threads)
        self.name = f"measured:{device}-{runtime}"
        self.store = store if isinstance(store, LatencyStore) else LatencyStore(store)
        self.total, self.samples = total, samples
        self.op_timing, self.graph_timing = op_timing, graph_timing
        self.key = self.runtime.key
        self._counts = FlopsModel()
        # structural hash -> runner on this runtime, the last few graphs relative_latency timed: a reference
        # priced against many graphs (the teacher against every student) is exported and loaded once
        self._runners: OrderedDict[str, Callable[[int], float]] = OrderedDict()
        # structural hash -> the fastest call relative_latency has seen of that graph as a reference
        self._fastest: dict[str, float] = {}

    def op_latency(self, node: Node) -> tuple[float, str | None]:
        """Seconds for the node's op alone, and a note when it is priced 0 because it cannot be isolated.

        Stored measurements are reused; new ones are stored at once.
        """
        if is_free(node):
            return 0.0, None
        kind = op_kind(node)
        signature = op_signature(node)
        if signature is None:
            return 0.0, f"{node.name} ({kind}): no input shapes, priced 0"
        found = self.store.get_op(signature, self.key)
        if found is not None:
            return found.latency_s, None
        try:
            module, inputs = build_op(node, signature)
            timing = self.runtime.time(module, inputs, self.op_timing)
        except Exception as exc:  # any failure to rebuild, export or run the op alone: price it 0, say why
            return 0.0, f"{node.name} ({kind}): could not be measured alone, priced 0 ({str(exc).splitlines()[0]})"
        counted = self._counts.node_cost(node)
        self.store.put_op(signature, self.key, timing.median_s, timing.spread, counted.macs, counted.bytes,
                          roofline_kind(node))
        return timing.median_s, None

    def node_cost(self, node: Node) -> Cost:
        """The flops model's counts with the measured latency of the op alone (0 if it cannot be isolated)."""
        latency, _ = self.op_latency(node)
        counted = self._counts.node_cost(node)
        return Cost(latency, counted.macs, counted.bytes_read, counted.bytes_written, counted.params)

    def graph_latency(self, gm: GraphModule) -> float:
        """Seconds for the whole graph in one run, in eval mode: the median of ``samples`` independent
        timings, stored by structural hash (a graph stored with enough timings is not timed again)."""
        key = graph_key(gm)
        found = self.store.get_graph(key, self.key)
        stored = found.samples if found is not None else 0
        if stored >= self.samples:
            return found.latency_s
        module, inputs = _runnable(gm)
        for _ in range(self.samples - stored):
            timing = self.measure_module(module, inputs)
            found = self.store.add_graph_timing(key, self.key, timing.median_s, timing.spread)
        return found.latency_s

    def relative_latency(self, gm: GraphModule, reference: GraphModule, rounds: int = 200,
                         time_cap_s: float = 3.0, calls: int = 5, tries: int = 4, tolerance: float = 0.02) -> float:
        """``gm``'s time per call over ``reference``'s: the fastest of ``gm``'s single-call times over the
        fastest of ``reference``'s, the two timed in alternating rounds on this runtime (A B A B ...,
        after a warm-up of each). Not stored.

        In every round each graph gets one untimed call, which pays for switching from the other
        graph (caches, the allocator), then ``calls`` back-to-back calls timed one by one: the time of a
        graph run again and again, as the store's timings of ops and graphs measure it. The price is
        the ratio of the fastest calls because everything else a shared machine adds only ever slows
        a call, and not in proportion: while other jobs compete for the core and its caches, a 25 us
        graph slows by far more than a 250 us one (the ratio of medians of one student to its teacher
        moved over 0.10-0.13 between timing passes, the ratio of the fastest calls over 0.101-0.103).
        A window of ``rounds`` rounds (or ``time_cap_s`` seconds, at least 10 rounds) contended
        throughout shows as a reference slower than its fastest call in earlier windows: such a
        window is timed again, up to ``tries`` windows, until the reference's fastest call is within
        ``tolerance`` of the fastest seen before (so a new reference takes two windows at least), and
        the ratio comes from the window whose reference ran fastest. Both graphs need the same input
        shapes.
        """
        shapes = [_shape(n) for n in gm.graph.find_nodes(op="placeholder")]
        if shapes != [_shape(n) for n in reference.graph.find_nodes(op="placeholder")]:
            raise CostModelError("relative_latency needs two graphs with the same input shapes")
        _, timed = self._runner(gm)
        reference_key, reference_timed = self._runner(reference)
        for _ in range(5):
            timed(1)
            reference_timed(1)
        best: tuple[float, float] | None = None       # (ratio, the reference's fastest call) of the best window
        for _ in range(max(1, tries)):
            samples, reference_samples = [], []
            start, done = time.perf_counter(), 0
            while done < rounds and (done < 10 or time.perf_counter() - start < time_cap_s):
                for block, into in ((timed, samples), (reference_timed, reference_samples)):
                    block(1)
                    into.extend(block(1) for _ in range(calls))
                done += 1
            reference_fastest = min(reference_samples)
            if best is None or reference_fastest < best[1]:
                best = (min(samples) / reference_fastest, reference_fastest)
            known = self._fastest.get(reference_key)
            self._fastest[reference_key] = reference_fastest if known is None else min(known, reference_fastest)
            if known is not None and reference_fastest <= known * (1.0 + tolerance):
                break
        return float(best[0])

    def _runner(self, gm: GraphModule) -> tuple[str, Callable[[int], float]]:
        """``gm``'s structural key (:func:`graph_key`) and runner on this runtime (``f(number) -> seconds per
        call``), reused for a graph of the same structure (weights do not change a timing) among the last
        :data:`KEPT_RUNNERS` timed."""
        key = graph_key(gm)
        runner = self._runners.pop(key, None)
        if runner is None:
            module, inputs = _runnable(gm)
            runner = self.runtime.block(module, inputs)
        self._runners[key] = runner
        while len(self._runners) > KEPT_RUNNERS:
            self._runners.popitem(last=False)
        return key, runner

    def measure_module(self, module: nn.Module, inputs: tuple, config: TimingConfig | None = None) -> Timing:
        """Time ``module(*inputs)`` whole on this model's runtime (not stored)."""
        return self.runtime.time(module, inputs, config or self.graph_timing)

    def graph_cost(self, gm: GraphModule, total: str | None = None) -> CostReport:
        """Rows of isolated op costs; the total is the whole graph measured at once (``total="graph"``)
        or the sum of rows (``total="nodes"``); ``total`` defaults to the model's setting."""
        total = total or self.total
        rows, unmeasured = [], []
        for node in gm.graph.nodes:
            if node.op in COMPUTE_SKIP_KINDS:
                continue
            latency, note = self.op_latency(node)
            if note:
                unmeasured.append(note)
            row = self._counts.row(node)
            rows.append(CostRow(row.node, row.kind, row.target, row.input_shapes, row.output_shape,
                                Cost(latency, row.cost.macs, row.cost.bytes_read, row.cost.bytes_written,
                                     row.cost.params)))
        report = CostReport.from_rows(self.name, rows, [f"runtime: {self.runtime.describe()}"])
        report.notes.extend(unmeasured)
        nodes_s = report.rows_latency_s
        if total == "nodes":
            report.notes.append(f"total is the sum of {len(rows)} ops measured alone: {nodes_s * 1e3:.3f} ms")
            return report
        whole = self.graph_latency(gm)
        report = report.with_total_latency(whole)
        gap = (nodes_s - whole) / whole * 100 if whole > 0 else 0.0
        report.notes.append(f"total is the whole graph measured at once: {whole * 1e3:.3f} ms; the ops measured "
                            f"alone sum to {nodes_s * 1e3:.3f} ms ({gap:+.1f}% against the whole: the fusion gap)")
        return report


register("measured", lambda argument: MeasuredModel(**parse_spec(argument)),
         "time ops and whole graphs on this machine: measured:cpu-onnxruntime | cpu-torch | cuda-torch")
