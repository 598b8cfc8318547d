"""Robust timing of modules on a runtime: ``torch`` (eager), ``onnxruntime`` (CPU) and ``cuda``.

:func:`measure` is the statistics loop every runtime shares: warm up, then take
samples (each the mean time of a block of calls) until the median is stable, that is
until the distribution-free 95% confidence interval of the median, relative to the
median, is below ``TimingConfig.rel_ci``, or the time cap is reached. It returns the
median and the spread (IQR, minimum, 90th percentile, sample count).

A :class:`Runtime` turns ``(module, example inputs)`` into a timed callable:

* :class:`TorchRuntime`: eager PyTorch on the CPU, timed with ``torch.utils.benchmark.Timer``
  at a stated thread count;
* :class:`OnnxRuntime`: the module exported with ``torch.onnx.export(dynamo=False)`` and run by
  onnxruntime's CPU execution provider with ``intra_op_num_threads`` set (and stated);
* :class:`CudaRuntime`: eager PyTorch on the GPU, timed with CUDA events; only where
  ``torch.cuda.is_available()``, otherwise asking for it raises :class:`CostModelError`.

Every runtime knows its :class:`~hant.cost_models.store.RuntimeKey` (name, version, threads,
device fingerprint), the part of a store key that says where a number was measured.
"""

from __future__ import annotations

import copy
import functools
import io
import math
import os
import platform
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn

from hant.cost_models.store import RuntimeKey, Spread
from hant.errors import CostModelError

__all__ = ["TimingConfig", "Timing", "measure", "median_rel_ci", "Runtime", "TorchRuntime", "OnnxRuntime",
           "CudaRuntime", "RUNTIMES", "get_runtime", "runtime_for", "cpu_model", "device_fingerprint"]


@dataclass(frozen=True)
class TimingConfig:
    """How hard to try for a stable median.

    ``warmup_s``/``warmup_runs``: untimed calls first (both minimums). ``block_s``: calls are
    grouped into blocks of about this duration, one sample per block. Sampling stops when
    at least ``min_samples`` samples give a relative 95% CI of the median at most ``rel_ci``,
    or at ``max_samples``, or once ``time_cap_s`` has passed (with at least 3 samples, so a
    spread always exists).
    """
    warmup_s: float = 0.05
    warmup_runs: int = 2
    block_s: float = 0.0005
    min_samples: int = 5
    max_samples: int = 200
    rel_ci: float = 0.05
    time_cap_s: float = 1.0

    def __post_init__(self):
        if self.time_cap_s <= 0 or self.rel_ci <= 0 or self.min_samples < 1 or self.max_samples < self.min_samples:
            raise CostModelError(f"bad timing configuration {self}: caps and thresholds must be positive "
                                 "and max_samples >= min_samples")


@dataclass(frozen=True)
class Timing:
    """The result of :func:`measure`: seconds per call."""
    median_s: float
    iqr_s: float
    min_s: float
    p90_s: float
    n: int                  # samples (each the mean of ``number`` calls)
    rel_ci: float           # relative width of the 95% CI of the median at the end
    number: int = 1         # calls per sample

    @property
    def spread(self) -> Spread:
        return Spread(self.iqr_s, self.min_s, self.p90_s, self.n, self.rel_ci)


def _quantile(sorted_x: Sequence[float], q: float) -> float:
    pos = q * (len(sorted_x) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_x) - 1)
    return sorted_x[lo] + (sorted_x[hi] - sorted_x[lo]) * (pos - lo)


def median_rel_ci(samples: Sequence[float]) -> float:
    """Width of the distribution-free 95% confidence interval of the median, over the median.

    Uses the order statistics at (1-based) ranks ``floor(n/2 - 1.96 sqrt(n)/2)`` and
    ``ceil(1 + n/2 + 1.96 sqrt(n)/2)`` (binomial approximation), clipped to the sample;
    returns ``inf`` for fewer than 2 samples.
    """
    n = len(samples)
    if n < 2:
        return math.inf
    x = sorted(samples)
    half = 1.96 * math.sqrt(n) / 2
    lo = max(0, math.floor(n / 2 - half) - 1)
    hi = min(n - 1, math.ceil(1 + n / 2 + half) - 1)
    median = _quantile(x, 0.5)
    return (x[hi] - x[lo]) / median if median > 0 else math.inf


def measure(block: Callable[[int], float], config: TimingConfig = TimingConfig()) -> Timing:
    """Time ``block(number)``, which runs the work ``number`` times and returns seconds per call.

    See :class:`TimingConfig` for the warm-up and stopping rules.
    """
    start = time.perf_counter()
    first = block(1)
    runs, warm_start = 1, time.perf_counter()
    while runs < config.warmup_runs or time.perf_counter() - warm_start < config.warmup_s:
        first = min(first, block(1))
        runs += 1
        if time.perf_counter() - start > config.time_cap_s:
            break
    number = max(1, int(config.block_s / max(first, 1e-9)))
    samples: list[float] = []
    rel = math.inf
    while True:
        samples.append(block(number))
        n = len(samples)
        elapsed = time.perf_counter() - start
        if n >= config.min_samples:
            rel = median_rel_ci(samples)
            if rel <= config.rel_ci:
                break
        if n >= config.max_samples or (elapsed >= config.time_cap_s and n >= 3):
            rel = median_rel_ci(samples)
            break
    x = sorted(samples)
    return Timing(_quantile(x, 0.5), _quantile(x, 0.75) - _quantile(x, 0.25), x[0], _quantile(x, 0.9), len(x), rel,
                  number)


# ---------------------------------------------------------------- device fingerprint

@functools.lru_cache(maxsize=None)
def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (``model name``, or ``Hardware``/``Model`` on ARM)."""
    try:
        with open("/proc/cpuinfo") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        for key in ("model name", "Hardware", "Model", "cpu model"):
            if fields.get(key):
                return fields[key]
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


def device_fingerprint(gpu: str | None = None) -> str:
    """``"CPU model | N cores"`` plus ``" | GPU name"`` for runtimes that run on a GPU."""
    text = f"{cpu_model()} | {os.cpu_count()} cores"
    return f"{text} | {gpu}" if gpu else text


# ---------------------------------------------------------------- runtimes

class Runtime:
    """Where a module runs. Subclasses set ``name``, ``device`` and implement :meth:`block`."""
    name = "abstract"
    device = "cpu"

    def __init__(self, threads: int | None = None):
        threads = torch.get_num_threads() if threads is None else int(threads)
        if threads < 1:
            raise CostModelError(f"thread count must be at least 1, got {threads}")
        self.threads = threads

    @property
    def version(self) -> str:
        return torch.__version__

    def fingerprint(self) -> str:
        return device_fingerprint()

    @property
    def key(self) -> RuntimeKey:
        return RuntimeKey(self.name, self.version, self.threads, self.fingerprint())

    def block(self, module: nn.Module, inputs: tuple) -> Callable[[int], float]:  # pragma: no cover - abstract
        """A function ``f(number) -> seconds per call`` running ``module(*inputs)``."""
        raise NotImplementedError

    def time(self, module: nn.Module, inputs: tuple, config: TimingConfig = TimingConfig()) -> Timing:
        """Measure ``module(*inputs)``; the module is run (or exported) as it is, never changed."""
        return measure(self.block(module, tuple(inputs)), config)

    def describe(self) -> str:
        return f"{self.name} {self.version}, {self.threads} thread(s), on {self.fingerprint()}"


class TorchRuntime(Runtime):
    """Eager PyTorch on the CPU under ``torch.no_grad``, timed by ``torch.utils.benchmark.Timer`` with
    ``num_threads=threads``; one sample is one ``Timer.timeit(number)`` (which warms up on its own first)."""
    name = "torch"

    def block(self, module, inputs):
        from torch.utils.benchmark import Timer

        @torch.no_grad()
        def call():
            module(*inputs)

        timer = Timer(stmt="call()", globals={"call": call}, num_threads=self.threads)
        return lambda number: timer.timeit(number).mean


def export_onnx_bytes(module: nn.Module, inputs: tuple, opset: int = 17) -> bytes:
    """The module as an ONNX model (TorchScript exporter, ``dynamo=False``), in memory."""
    buffer = io.BytesIO()
    names = [f"input_{i}" for i in range(len(inputs))]
    try:
        # Not under no_grad: that would select fused inference fast paths (e.g. nn.MultiheadAttention's
        # _native_multi_head_attention) that have no ONNX export.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer chatter about constants: the shapes are fixed on purpose
            torch.onnx.export(module, tuple(inputs), buffer, dynamo=False, opset_version=opset,
                              input_names=names, do_constant_folding=True)
    except Exception as exc:
        raise CostModelError(f"could not export {type(module).__name__} to ONNX for onnxruntime timing: "
                             f"{type(exc).__name__}: {exc}; use the 'torch' runtime for this model") from exc
    return buffer.getvalue()


class OnnxRuntime(Runtime):
    """onnxruntime's CPU execution provider with ``intra_op_num_threads=threads``, one inter-op thread,
    all graph optimisations on (so the whole-graph figure includes onnxruntime's fusions)."""
    name = "onnxruntime"

    @property
    def version(self) -> str:
        import onnxruntime
        return onnxruntime.__version__

    def session(self, model_bytes: bytes):
        import onnxruntime as ort
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])

    def block(self, module, inputs):
        session = self.session(export_onnx_bytes(module, inputs))
        names = [i.name for i in session.get_inputs()]
        feeds = {name: t.detach().cpu().numpy() for name, t in zip(names, inputs)}
        run = session.run

        def timed(number: int) -> float:
            start = time.perf_counter()
            for _ in range(number):
                run(None, feeds)
            return (time.perf_counter() - start) / number
        return timed


class CudaRuntime(Runtime):
    """Eager PyTorch on ``cuda:0`` under ``torch.no_grad``, timed with CUDA events."""
    name = "cuda"
    device = "cuda"

    def __init__(self, threads: int | None = None):
        if not torch.cuda.is_available():
            raise CostModelError("the 'cuda' runtime needs a CUDA GPU, and torch.cuda.is_available() is False "
                                 "here; use measured:cpu-onnxruntime or measured:cpu-torch")
        super().__init__(threads)

    @property
    def version(self) -> str:
        return f"{torch.__version__}+cuda{torch.version.cuda}"

    def fingerprint(self) -> str:
        return device_fingerprint(torch.cuda.get_device_name(0))

    def block(self, module, inputs):
        module = copy.deepcopy(module).to("cuda")
        inputs = tuple(t.to("cuda") for t in inputs)

        @torch.no_grad()
        def timed(number: int) -> float:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            for _ in range(number):
                module(*inputs)
            end.record()
            end.synchronize()
            return begin.elapsed_time(end) / 1000.0 / number
        return timed


RUNTIMES: dict[str, type[Runtime]] = {"torch": TorchRuntime, "onnxruntime": OnnxRuntime, "cuda": CudaRuntime}


def get_runtime(name: str, threads: int | None = None) -> Runtime:
    """The runtime called ``name`` (torch, onnxruntime, cuda); :class:`CostModelError` otherwise."""
    if name not in RUNTIMES:
        raise CostModelError(f"unknown runtime {name!r}; use one of {', '.join(RUNTIMES)}")
    return RUNTIMES[name](threads)


def runtime_for(device: str, runtime: str, threads: int | None = None) -> Runtime:
    """The runtime of a ``DEVICE-RUNTIME`` pair: cpu-torch, cpu-onnxruntime, or cuda-torch (CUDA events)."""
    if device == "cuda" and runtime == "torch":
        return CudaRuntime(threads)
    if device == "cpu" and runtime in ("torch", "onnxruntime"):
        return get_runtime(runtime, threads)
    raise CostModelError(f"no runtime for device {device!r} and runtime {runtime!r}; "
                         "use cpu-onnxruntime, cpu-torch or cuda-torch")
