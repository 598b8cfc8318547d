"""The ``roofline:DEVICE`` cost model: an analytical latency per op, and its calibration.

For a node of roofline kind ``k`` (see :func:`roofline_kind`) with ``macs`` and ``bytes``
from :class:`~hant.cost_models.flops.FlopsModel`::

    latency = max(macs / (peak * compute_efficiency[k]),
                  bytes / (bandwidth * bandwidth_efficiency[k])) + overhead[k]

``peak`` is the device's multiply-accumulate rate for the node's dtype (float16/bfloat16
use the half-precision peak, everything else the float32 one) and ``bandwidth`` its
memory bandwidth. Nodes that do no work (views, no-op copies, guards: 0 MACs and 0
bytes) cost nothing, overhead included.

Device presets are datasheet figures (sources beside each number). ``cpu`` is the local
CPU, read when the model is built; its peak and bandwidth rest on stated assumptions.
The per-kind factors start from rules of thumb (dense convs and GEMMs reach a good part
of peak, grouped and depthwise convs a small fraction, elementwise ops are bound by
bandwidth) and are meant to be replaced by :meth:`RooflineModel.calibrate`.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import torch
from scipy.optimize import least_squares, nnls
from torch.fx import GraphModule, Node

from hant.cost_models.base import Cost, CostReport, NodeSumCostModel
from hant.cost_models.flops import FlopsModel
from hant.errors import CostModelError
from hant.graphs.ops import conv_of, einsum_of, op_kind, output_dtype

__all__ = ["Device", "KindConstants", "CalibrationSummary", "RooflineModel", "roofline_kind", "DEVICE_PRESETS",
           "local_cpu"]

_G = 1e9
_T = 1e12


@dataclass(frozen=True)
class Device:
    """What the roofline needs to know about a device. Rates are per second; MAC = 2 FLOPs."""
    name: str
    peak_macs_per_s: float          # float32 (and any non-half dtype)
    peak_macs_per_s_half: float     # float16 / bfloat16
    bandwidth_bytes_per_s: float    # main memory
    overhead_s: float               # per-op launch / dispatch cost
    source: str                     # where the numbers come from, in one line

    def describe(self) -> str:
        return (f"{self.peak_macs_per_s * 2 / _G:,.0f} GFLOP/s fp32, {self.peak_macs_per_s_half * 2 / _G:,.0f} "
                f"GFLOP/s fp16, {self.bandwidth_bytes_per_s / _G:,.1f} GB/s, {self.overhead_s * 1e6:g} us/op "
                f"({self.source})")


# Datasheet presets. FLOP figures are divided by 2 to give MACs (one FMA = 2 FLOPs).
DEVICE_PRESETS: dict[str, Device] = {
    # NVIDIA A100 Tensor Core GPU datasheet (SXM4 80GB): FP32 19.5 TFLOPS; FP16/BF16 Tensor Core
    # 312 TFLOPS dense (624 with sparsity); HBM2e 2,039 GB/s. Overhead: a CUDA kernel launch
    # through PyTorch's dispatcher, ~5 us.
    "a100": Device("a100", 19.5 * _T / 2, 312 * _T / 2, 2039 * _G, 5e-6,
                   "NVIDIA A100 datasheet, SXM4 80GB"),
    # NVIDIA H100 Tensor Core GPU datasheet (SXM5): FP32 67 TFLOPS; FP16/BF16 Tensor Core
    # 1,979 TFLOPS with sparsity, 989.5 dense; HBM3 3.35 TB/s. Overhead as for the A100.
    "h100": Device("h100", 67 * _T / 2, 989.5 * _T / 2, 3350 * _G, 5e-6,
                   "NVIDIA H100 datasheet, SXM5"),
    # NVIDIA Jetson AGX Orin 64GB data sheet / Orin technical brief: 2048 CUDA cores at 1.3 GHz
    # -> 2048 * 2 * 1.3e9 = 5.3 FP32 TFLOPS; GPU 170 sparse INT8 TOPS -> 85 dense INT8 -> 42.5
    # dense FP16 Tensor TFLOPS (derived); 256-bit LPDDR5 at 204.8 GB/s. Overhead: kernel launch
    # from the slower Cortex-A78AE host, ~10 us (assumption).
    "jetson-orin": Device("jetson-orin", 5.32 * _T / 2, 42.5 * _T / 2, 204.8 * _G, 10e-6,
                          "NVIDIA Jetson AGX Orin 64GB data sheet"),
    # Raspberry Pi 4 Model B product brief: Broadcom BCM2711, 4x Cortex-A72 at 1.5 GHz, LPDDR4-3200
    # on a 32-bit bus -> 3200e6 * 4 B = 12.8 GB/s. Cortex-A72 Software Optimization Guide: one
    # 128-bit NEON FMA per cycle (only FP0 multiplies) -> 4 fp32 MACs/cycle/core ->
    # 4 * 1.5e9 * 4 = 24 GMAC/s. No fp16 arithmetic (ARMv8.0), so half = fp32. Overhead: eager
    # op dispatch on a slow core, ~20 us (assumption).
    "raspi4": Device("raspi4", 4 * 1.5 * _G * 4, 4 * 1.5 * _G * 4, 12.8 * _G, 20e-6,
                     "Raspberry Pi 4 product brief, Cortex-A72 optimization guide"),
}

# Local CPU assumptions (each is stated in the preset's ``source`` line):
_FALLBACK_GHZ = 3.0                    # when /proc/cpuinfo gives no clock
_BANDWIDTH_PER_CORE = 10 * _G          # single-core STREAM triad on current server cores is ~10-20 GB/s
_BANDWIDTH_CAP = 204.8 * _G            # eight channels of DDR4-3200 (8 * 25.6 GB/s), one socket
_CPU_OVERHEAD_S = 5e-6                 # PyTorch eager dispatch of one op, a few microseconds


def _cpu_fma_lanes(flags: set[str], vendor: str = "", family: int | None = None) -> tuple[int, str]:
    """float32 MACs per cycle per core, assuming two FMA pipes, from the ISA flags.

    AMD cores before Zen 5 (``cpu family`` below 26: Zen 4 is the first with AVX-512) run
    AVX-512 on 256-bit datapaths, so two pipes give 16 MACs per cycle, not 32 (AMD
    "Zen 4" software optimization guide).
    """
    if "avx512f" in flags:
        if vendor == "AuthenticAMD" and family is not None and family < 26:
            return 16, "AVX-512 on 2x 256-bit FMA (AMD Zen 4)"
        return 32, "2x AVX-512 FMA"
    if "avx2" in flags and "fma" in flags:
        return 16, "2x AVX2 FMA"
    if "asimd" in flags or "neon" in flags:
        return 8, "2x NEON FMA"
    return 4, "SSE"


def local_cpu() -> Device:
    """The ``cpu`` preset for the CPU this process runs on, read now.

    cores = CPUs this process may run on (``os.sched_getaffinity``) capped by
    ``torch.get_num_threads()``; peak = cores x clock (``/proc/cpuinfo``, else 3 GHz) x float32
    FMA lanes per cycle from the ISA flags; bandwidth = 10 GB/s per core, capped at 204.8 GB/s.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cores = max(1, min(cores, torch.get_num_threads()))
    ghz, flags, vendor, family = _FALLBACK_GHZ, set(), "", None
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        mhz = re.findall(r"^cpu MHz\s*:\s*([\d.]+)", text, re.M)
        if mhz:
            ghz = max(float(v) for v in mhz) / 1000
        found = re.search(r"^(?:flags|Features)\s*:\s*(.*)$", text, re.M)
        flags = set(found.group(1).split()) if found else set()
        found = re.search(r"^vendor_id\s*:\s*(\S+)", text, re.M)
        vendor = found.group(1) if found else ""
        found = re.search(r"^cpu family\s*:\s*(\d+)", text, re.M)
        family = int(found.group(1)) if found else None
    except OSError:
        pass
    lanes, isa = _cpu_fma_lanes(flags, vendor, family)
    peak = cores * ghz * _G * lanes
    bandwidth = min(cores * _BANDWIDTH_PER_CORE, _BANDWIDTH_CAP)
    source = (f"local: {cores} cores x {ghz:.2f} GHz x {lanes} fp32 MACs/cycle ({isa}); "
              f"bandwidth assumed {_BANDWIDTH_PER_CORE / _G:g} GB/s per core")
    return Device("cpu", peak, peak, bandwidth, _CPU_OVERHEAD_S, source)


@dataclass(frozen=True)
class KindConstants:
    """Per-kind factors: the share of peak compute and of bandwidth an op of this kind reaches,
    and its fixed per-op overhead in seconds."""
    compute_efficiency: float
    bandwidth_efficiency: float
    overhead_s: float


# Starting factors (rules of thumb, replaced by calibrate()). Dense convolutions and GEMMs run
# near their library's efficiency; grouped and, worse, depthwise convolutions have too little
# reuse per weight to fill the FMA units; ops with no MACs are bandwidth-bound (their compute
# factor is never used). STREAM-like kernels reach about 80% of the nominal bandwidth.
_COMPUTE_EFFICIENCY = {"conv": 0.6, "conv_grouped": 0.2, "conv_depthwise": 0.05, "linear": 0.7,
                       "matmul": 0.6, "attention": 0.5}
_BANDWIDTH_EFFICIENCY = 0.8
# Kinds whose nodes never cost anything.
FREE_KINDS = frozenset({"placeholder", "output", "get_attr", "shape", "identity"})


def roofline_kind(node: Node) -> str:
    """The kind a roofline constant is kept for: :func:`op_kind`, with convolutions split into
    ``conv``, ``conv_grouped`` (1 < groups < channels) and ``conv_depthwise``, and einsum
    contractions counted as ``matmul``.

    A latency store that feeds :meth:`RooflineModel.calibrate` should label its samples with
    this function so that they land on the constants the model uses.
    """
    kind = op_kind(node)
    if kind == "conv":
        view = conv_of(node)
        if view.is_depthwise:
            return "conv_depthwise"
        if view.groups > 1:
            return "conv_grouped"
    elif kind == "other" and einsum_of(node) is not None:
        return "matmul"
    return kind


@dataclass(frozen=True)
class CalibrationSummary:
    """What :meth:`RooflineModel.calibrate` fitted.

    ``constants`` maps each fitted kind to its sample count, effective compute rate
    (GMAC/s), effective bandwidth (GB/s) and overhead (us). Errors are over all samples:
    root mean square of ``log(predicted / measured)`` and mean absolute percentage error,
    before and after the fit.
    """
    samples: int
    constants: dict[str, dict[str, float]]
    rms_log_error_before: float
    rms_log_error_after: float
    mape_before: float
    mape_after: float
    ignored: int = 0    # samples of kinds the roofline prices at 0 (views, copies, ops moving nothing)

    def __str__(self) -> str:
        lines = [f"calibrated on {self.samples} samples: rms log error {self.rms_log_error_before:.3f} -> "
                 f"{self.rms_log_error_after:.3f}, MAPE {self.mape_before:.1%} -> {self.mape_after:.1%}"]
        for kind, c in self.constants.items():
            lines.append(f"  {kind}: n={c['samples']:.0f} {c['gmacs_per_s']:.3g} GMAC/s "
                         f"{c['gbytes_per_s']:.3g} GB/s {c['overhead_us']:.3g} us")
        return "\n".join(lines)


Sample = tuple[str, int, int, float]


def _read_samples(samples: Any) -> list[Sample]:
    if hasattr(samples, "calibration_samples"):
        samples = samples.calibration_samples()
    try:
        items = list(samples)
    except TypeError as exc:
        raise CostModelError("calibrate() takes an iterable of (kind, macs, bytes, latency_s) tuples or an object "
                             f"with calibration_samples(); got {type(samples).__name__}") from exc
    out = []
    for i, item in enumerate(items):
        try:
            kind, macs, nbytes, latency = item
            kind, macs, nbytes, latency = str(kind), int(macs), int(nbytes), float(latency)
        except (TypeError, ValueError) as exc:
            raise CostModelError(f"calibration sample {i} is {item!r}; expected (kind, macs, bytes, latency_s)") \
                from exc
        if macs < 0 or nbytes < 0 or not (math.isfinite(latency) and latency > 0):
            raise CostModelError(f"calibration sample {i} is {item!r}: MACs and bytes must be >= 0 and the "
                                 "latency a positive number of seconds")
        out.append((kind, macs, nbytes, latency))
    if not out:
        raise CostModelError("calibrate() got no samples; measure some ops first (e.g. with a measured cost model)")
    return out


class RooflineModel(NodeSumCostModel):
    """Roofline latency per node on a device preset; spec ``roofline:DEVICE`` (default ``cpu``).

    Counts (MACs, bytes, params) come from :class:`FlopsModel`; ``latency_s`` from the
    roofline formula in the module docstring. ``calibrate()`` refits the constants in place.
    """

    def __init__(self, device: str = "cpu"):
        presets = self.presets()
        if device not in presets:
            raise CostModelError(f"unknown roofline device {device!r}; presets: {', '.join(presets)} "
                                 f"(use e.g. 'roofline:{next(iter(presets))}')")
        self.device = local_cpu() if device == "cpu" else DEVICE_PRESETS[device]
        self.name = f"roofline:{device}"
        self.constants: dict[str, KindConstants] = {
            kind: KindConstants(eff, _BANDWIDTH_EFFICIENCY, self.device.overhead_s)
            for kind, eff in _COMPUTE_EFFICIENCY.items()
        }
        self.calibration: CalibrationSummary | None = None
        self._counter = FlopsModel()

    @staticmethod
    def presets() -> dict[str, str]:
        """Device names accepted after ``roofline:``, each with a one-line description."""
        devices = {"cpu": local_cpu(), **DEVICE_PRESETS}
        return {name: device.describe() for name, device in devices.items()}

    def constants_for(self, kind: str) -> KindConstants:
        """The factors used for ``kind``; kinds without their own entry are bandwidth-bound."""
        found = self.constants.get(kind)
        return found if found is not None else KindConstants(1.0, _BANDWIDTH_EFFICIENCY, self.device.overhead_s)

    def predict(self, kind: str, macs: int, nbytes: int, dtype: torch.dtype | None = None) -> float:
        """Roofline latency in seconds of one op of ``kind`` (0 when it does no work)."""
        if kind in FREE_KINDS or (macs == 0 and nbytes == 0):
            return 0.0
        c = self.constants_for(kind)
        half = dtype in (torch.float16, torch.bfloat16)
        peak = self.device.peak_macs_per_s_half if half else self.device.peak_macs_per_s
        compute = macs / (peak * c.compute_efficiency)
        memory = nbytes / (self.device.bandwidth_bytes_per_s * c.bandwidth_efficiency)
        return max(compute, memory) + c.overhead_s

    def node_cost(self, node: Node) -> Cost:
        counted = self._counter.node_cost(node)
        latency = self.predict(roofline_kind(node), counted.macs, counted.bytes, output_dtype(node))
        return Cost(latency, counted.macs, counted.bytes_read, counted.bytes_written, counted.params)

    def graph_cost(self, gm: GraphModule) -> CostReport:
        report = super().graph_cost(gm)
        report.notes.append(f"device: {self.device.describe()}")
        if self.calibration is not None:
            report.notes.append(f"calibrated on {self.calibration.samples} samples "
                                f"(MAPE {self.calibration.mape_after:.1%})")
        return report

    # ------------------------------------------------------------ calibration

    def calibrate(self, samples: Iterable[Sample] | Any) -> CalibrationSummary:
        """Fit the per-kind constants to measured latencies; update the model in place.

        ``samples``: ``(kind, macs, bytes, latency_s)`` tuples (kinds as :func:`roofline_kind`
        names them), or any object with a ``calibration_samples()`` method that yields them.
        Kinds absent from the samples keep their constants; kinds the model has no entry
        for get one. Samples are taken as float32 ops. Samples of ops the model prices at 0
        (``shape``/``identity`` kinds, no MACs and no bytes) are left out and counted in the
        summary's ``ignored``. Returns a :class:`CalibrationSummary`; raises
        :class:`CostModelError`, leaving the model unchanged, on malformed or empty data.

        Method. For each kind, three positive constants are fitted: seconds per MAC
        ``a = 1/(peak*compute_efficiency)``, seconds per byte ``b = 1/(bandwidth*
        bandwidth_efficiency)`` and the overhead ``c``, so that ``max(a*macs, b*bytes) + c``
        matches the latencies. The fit is nonlinear least squares (``scipy.optimize.
        least_squares``, robust ``soft_l1`` loss) on ``log(predicted) - log(measured)``, over
        ``log a, log b, log c``:

        * in log space, because op latencies span five or more orders of magnitude and a cost
          model is used for ratios and rankings: absolute squared error would fit the few
          largest ops and ignore the rest, while log error weighs every op's relative error
          alike (and keeps the constants positive without bounds);
        * the ``max`` form itself is fitted, not a linear relaxation, so the fitted constants
          are the ones the model predicts with; its starting point is the better of the current
          constants and a nonnegative least-squares fit (``scipy.optimize.nnls``) of the
          additive relaxation ``a*macs + b*bytes + c`` with rows weighted by ``1/latency``;
        * a weak prior (weight 1e-3) pulls each log-constant towards its current value, so a
          constant the data cannot see (``a`` for ops with no MACs, ``a`` when every sample
          is bandwidth-bound) stays where it was instead of drifting.
        """
        data = _read_samples(samples)
        usable = [s for s in data if s[0] not in FREE_KINDS and (s[1] or s[2])]
        if not usable:
            raise CostModelError(f"none of the {len(data)} calibration samples does work the roofline prices "
                                 f"(all are {', '.join(sorted(FREE_KINDS))} ops or move 0 bytes)")
        ignored, data = len(data) - len(usable), usable
        before = [self.predict(k, m, b) for k, m, b, _ in data]
        by_kind: dict[str, list[Sample]] = {}
        for sample in data:
            by_kind.setdefault(sample[0], []).append(sample)
        fitted: dict[str, dict[str, float]] = {}
        constants = dict(self.constants)
        for kind, rows in sorted(by_kind.items()):
            macs = np.array([r[1] for r in rows], dtype=float)
            nbytes = np.array([r[2] for r in rows], dtype=float)
            latency = np.array([r[3] for r in rows], dtype=float)
            a, b, c = _fit_kind(macs, nbytes, latency, self._rates(kind))
            constants[kind] = KindConstants(1.0 / (a * self.device.peak_macs_per_s),
                                            1.0 / (b * self.device.bandwidth_bytes_per_s), c)
            fitted[kind] = {"samples": float(len(rows)), "gmacs_per_s": 1.0 / a / _G, "gbytes_per_s": 1.0 / b / _G,
                            "overhead_us": c * 1e6}
        self.constants = constants  # all kinds at once: a failed fit leaves the model as it was
        after = [self.predict(k, m, b) for k, m, b, _ in data]
        measured = np.array([r[3] for r in data])
        rms_b, mape_b = _errors(before, measured)
        rms_a, mape_a = _errors(after, measured)
        self.calibration = CalibrationSummary(len(data), fitted, rms_b, rms_a, mape_b, mape_a, ignored)
        return self.calibration

    def _rates(self, kind: str) -> tuple[float, float, float]:
        """The current (seconds per MAC, seconds per byte, overhead) of a kind."""
        c = self.constants_for(kind)
        return (1.0 / (self.device.peak_macs_per_s * c.compute_efficiency),
                1.0 / (self.device.bandwidth_bytes_per_s * c.bandwidth_efficiency), c.overhead_s)


_PRIOR_WEIGHT = 1e-3
_MIN_CONSTANT = 1e-18   # floor under a constant before taking its log


def _errors(predicted, measured: np.ndarray) -> tuple[float, float]:
    predicted = np.maximum(np.asarray(predicted, dtype=float), 1e-15)
    log_ratio = np.log(predicted / measured)
    return float(np.sqrt(np.mean(log_ratio ** 2))), float(np.mean(np.abs(predicted - measured) / measured))


def _fit_kind(macs: np.ndarray, nbytes: np.ndarray, latency: np.ndarray,
              current: tuple[float, float, float]) -> tuple[float, float, float]:
    """Seconds per MAC, seconds per byte and overhead for one kind (see ``calibrate``)."""
    prior = np.log(np.maximum(np.array(current, dtype=float), _MIN_CONSTANT))
    log_t = np.log(latency)

    def residuals(theta):
        a, b, c = np.exp(theta)
        pred = np.maximum(a * macs, b * nbytes) + c
        return np.concatenate([np.log(pred) - log_t, _PRIOR_WEIGHT * (theta - prior)])

    def jacobian(theta):
        a, b, c = np.exp(theta)
        compute, memory = a * macs, b * nbytes
        pred = np.maximum(compute, memory) + c
        compute_bound = compute >= memory
        jac = np.zeros((len(macs) + 3, 3))
        jac[:len(macs), 0] = np.where(compute_bound, compute, 0.0) / pred
        jac[:len(macs), 1] = np.where(compute_bound, 0.0, memory) / pred
        jac[:len(macs), 2] = c / pred
        jac[len(macs):, :] = _PRIOR_WEIGHT * np.eye(3)
        return jac

    starts = [prior]
    weights = 1.0 / latency
    relaxed, _ = nnls(np.column_stack([macs, nbytes, np.ones_like(macs)]) * weights[:, None], latency * weights)
    if np.all(relaxed > 0):
        starts.append(np.log(relaxed))
    else:  # a constant the relaxation zeroed keeps its current value
        starts.append(np.where(relaxed > 0, np.log(np.maximum(relaxed, 1e-300)), prior))
    best = min((least_squares(residuals, start, jac=jacobian, loss="soft_l1", f_scale=0.2, method="trf")
                for start in starts), key=lambda r: r.cost)
    a, b, c = np.exp(best.x)
    return float(a), float(b), float(c)
