"""The roofline model: presets, the per-op formula, and calibration on synthetic measurements."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
from scipy.stats import kendalltau
from torchvision import models

import hant
from hant.cost_models import CostModelError, FlopsModel, RooflineModel, roofline_kind
from hant.cost_models.roofline import DEVICE_PRESETS, _cpu_fma_lanes, local_cpu

PRESETS = ("cpu", "a100", "h100", "jetson-orin", "raspi4")


@pytest.fixture(scope="module")
def mobilenet_forms():
    torch.manual_seed(0)
    model, x = models.mobilenet_v2().eval(), torch.randn(1, 3, 64, 64)
    return {form: hant.trace(model, x, method=form) for form in ("symbolic", "export")}


# ------------------------------------------------------------------ presets

def test_presets_are_listed_with_their_sources():
    presets = RooflineModel.presets()
    assert set(PRESETS) <= set(presets)
    for name in PRESETS:
        assert "GB/s" in presets[name] and "GFLOP/s" in presets[name]
    for device in DEVICE_PRESETS.values():
        assert device.source and device.peak_macs_per_s_half >= device.peak_macs_per_s > 0


@pytest.mark.parametrize("name", PRESETS)
def test_each_preset_builds(name):
    model = RooflineModel(name)
    assert model.name == f"roofline:{name}" and model.device.name == name


def test_unknown_device_lists_the_presets():
    with pytest.raises(CostModelError) as err:
        RooflineModel("tpu-v9")
    for name in PRESETS:
        assert name in str(err.value)


def test_avx512_lanes_follow_the_datapath_width():
    """Zen 4 (AMD family 25) runs AVX-512 on 256-bit FMA pipes: half the MACs per cycle of Intel or Zen 5."""
    flags = {"avx512f", "avx2", "fma"}
    assert _cpu_fma_lanes(flags, "GenuineIntel", 6)[0] == 32
    assert _cpu_fma_lanes(flags, "AuthenticAMD", 25)[0] == 16
    assert _cpu_fma_lanes(flags, "AuthenticAMD", 26)[0] == 32
    assert _cpu_fma_lanes({"avx2", "fma"}, "AuthenticAMD", 25)[0] == 16


def test_local_cpu_counts_the_threads_torch_will_use():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = local_cpu()
        torch.set_num_threads(max(threads, 2))
        many = local_cpu()
    finally:
        torch.set_num_threads(threads)
    cores = min(len(__import__("os").sched_getaffinity(0)), max(threads, 2))
    assert many.peak_macs_per_s == pytest.approx(one.peak_macs_per_s * cores)
    assert f"{cores} cores" in many.source


# ------------------------------------------------------------------ the formula

class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.dense = nn.Conv2d(8, 16, 3, padding=1)
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(0.2)

    def forward(self, x):
        y = self.depthwise(self.grouped(self.dense(x)))
        return self.drop(self.act(y)).flatten(1)


@pytest.mark.parametrize("device", ["cpu", "h100"])
def test_node_latency_is_the_roofline_formula(device):
    model, counter = RooflineModel(device), FlopsModel()
    gm = hant.trace(Block().eval(), torch.randn(1, 8, 16, 16))
    kinds = {}
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        kind, cost, counted = roofline_kind(node), model.node_cost(node), counter.node_cost(node)
        kinds[node.name] = kind
        assert (cost.macs, cost.bytes_read, cost.bytes_written, cost.params) == \
            (counted.macs, counted.bytes_read, counted.bytes_written, counted.params)
        if kind in ("shape", "identity"):
            assert cost.latency_s == 0.0
            continue
        c, d = model.constants_for(kind), model.device
        expected = max(counted.macs / (d.peak_macs_per_s * c.compute_efficiency),
                       counted.bytes / (d.bandwidth_bytes_per_s * c.bandwidth_efficiency)) + c.overhead_s
        assert cost.latency_s == pytest.approx(expected, rel=1e-12)
    assert kinds == {"dense": "conv", "grouped": "conv_grouped", "depthwise": "conv_depthwise", "act": "activation",
                     "drop": "identity", "flatten": "shape"}


def test_depthwise_and_grouped_reach_less_of_peak_than_dense():
    model = RooflineModel("a100")
    macs, nbytes = 10**9, 10**5  # compute-bound for every kind
    dense, grouped, depthwise = (model.predict(k, macs, nbytes) for k in ("conv", "conv_grouped", "conv_depthwise"))
    assert dense < grouped < depthwise


def test_elementwise_ops_are_bandwidth_bound():
    model = RooflineModel("raspi4")
    for kind in ("activation", "add", "mul", "batchnorm", "pool"):
        c = model.constants_for(kind)
        nbytes = 4 * 10**6
        assert model.predict(kind, 0, nbytes) == pytest.approx(
            nbytes / (model.device.bandwidth_bytes_per_s * c.bandwidth_efficiency) + c.overhead_s)


def test_half_precision_uses_the_tensor_core_peak():
    model = RooflineModel("h100")
    c = model.constants_for("linear")
    macs = 10**12
    fp32, fp16 = (model.predict("linear", macs, 1000, dtype) - c.overhead_s for dtype in (torch.float32, torch.float16))
    assert fp32 / fp16 == pytest.approx(model.device.peak_macs_per_s_half / model.device.peak_macs_per_s)


def test_both_graph_forms_get_the_same_latency(mobilenet_forms):
    model = RooflineModel("jetson-orin")
    traced, exported = (model.graph_cost(gm) for gm in mobilenet_forms.values())
    assert traced.latency_s == pytest.approx(exported.latency_s, rel=1e-9)
    assert sum(row.kind == "conv" for row in traced.rows) == 52
    assert sum(roofline_kind(n) == "conv_depthwise" for n in mobilenet_forms["export"].graph.nodes) == 17


def test_faster_device_predicts_lower_latency(mobilenet_forms):
    gm = mobilenet_forms["symbolic"]
    latencies = [RooflineModel(name).graph_cost(gm).latency_s for name in ("raspi4", "jetson-orin", "a100", "h100")]
    assert latencies == sorted(latencies, reverse=True) and latencies[-1] > 0


# ------------------------------------------------------------------ calibration

# Ground truth: (seconds per MAC, seconds per byte, overhead) per kind. Very unlike the presets:
# depthwise convs 40x slower per MAC than dense ones, a large overhead on adds.
TRUTH = {
    "conv": (1 / 40e9, 1 / 9e9, 12e-6),
    "conv_depthwise": (1 / 1e9, 1 / 6e9, 9e-6),
    "linear": (1 / 60e9, 1 / 12e9, 6e-6),
    "add": (None, 1 / 4e9, 30e-6),
    "activation": (None, 1 / 7e9, 4e-6),
}


def synthetic_samples(seed: int, noise: float, per_kind: int = 80) -> list[tuple[str, int, int, float]]:
    """Samples drawn from the roofline with TRUTH constants, sizes spread over six decades so that
    overhead-, bandwidth- and compute-bound ops all occur, with multiplicative lognormal noise."""
    rng = np.random.default_rng(seed)
    samples = []
    for kind, (per_mac, per_byte, overhead) in TRUTH.items():
        for _ in range(per_kind):
            macs = 0 if per_mac is None else int(10 ** rng.uniform(3, 9))
            nbytes = int(10 ** rng.uniform(3, 8.5))
            latency = max(macs * (per_mac or 0.0), nbytes * per_byte) + overhead
            samples.append((kind, macs, nbytes, latency * float(np.exp(rng.normal(0.0, noise)))))
    return samples


def _rates(model: RooflineModel, kind: str) -> tuple[float, float, float]:
    c, d = model.constants_for(kind), model.device
    return (1 / (d.peak_macs_per_s * c.compute_efficiency), 1 / (d.bandwidth_bytes_per_s * c.bandwidth_efficiency),
            c.overhead_s)


def test_calibration_recovers_exact_constants():
    model = RooflineModel("cpu")
    summary = model.calibrate(synthetic_samples(seed=1, noise=0.0))
    for kind, truth in TRUTH.items():
        fitted = _rates(model, kind)
        for true_value, value in zip(truth, fitted):
            if true_value is not None:
                assert value == pytest.approx(true_value, rel=0.01), kind
    assert summary.rms_log_error_after < 1e-3 < summary.rms_log_error_before
    assert set(summary.constants) == set(TRUTH)


def test_calibration_with_noise_recovers_constants_and_ranks_better():
    samples = synthetic_samples(seed=2, noise=0.05)
    uncalibrated, calibrated = RooflineModel("cpu"), RooflineModel("cpu")
    summary = calibrated.calibrate(samples)
    for kind, truth in TRUTH.items():
        fitted = _rates(calibrated, kind)
        for true_value, value, tolerance in zip(truth, fitted, (0.05, 0.05, 0.10)):
            if true_value is not None:
                assert value == pytest.approx(true_value, rel=tolerance), kind
    assert summary.mape_after < 0.06 < summary.mape_before

    fresh = synthetic_samples(seed=3, noise=0.05)  # held-out measurements
    measured = [s[3] for s in fresh]
    tau_before = kendalltau(measured, [uncalibrated.predict(k, m, b) for k, m, b, _ in fresh]).statistic
    tau_after = kendalltau(measured, [calibrated.predict(k, m, b) for k, m, b, _ in fresh]).statistic
    assert tau_after > tau_before and tau_after > 0.9


def test_calibration_reads_a_store_and_leaves_unseen_kinds_alone(mobilenet_forms):
    class Store:
        def calibration_samples(self):
            yield from synthetic_samples(seed=4, noise=0.0, per_kind=30)

    model = RooflineModel("raspi4")
    untouched = model.constants_for("pool")
    gm = mobilenet_forms["symbolic"]
    before = model.graph_cost(gm).latency_s
    summary = model.calibrate(Store())
    assert summary.samples == 30 * len(TRUTH)
    assert model.constants_for("pool") == untouched
    report = model.graph_cost(gm)
    assert report.latency_s != before and any("calibrated on 150 samples" in note for note in report.notes)
    assert model.calibration is summary and "rms log error" in str(summary)


def test_calibration_ignores_ops_the_roofline_prices_at_zero():
    model = RooflineModel("cpu")
    free = [("shape", 0, 0, 1e-6), ("identity", 0, 4096, 2e-6), ("add", 0, 0, 3e-6)]
    summary = model.calibrate(synthetic_samples(seed=5, noise=0.0, per_kind=20) + free)
    assert (summary.samples, summary.ignored) == (20 * len(TRUTH), len(free))
    assert summary.rms_log_error_after < 1e-3
    with pytest.raises(CostModelError, match="none of the 3 calibration samples"):
        RooflineModel("cpu").calibrate(free)


def test_calibration_fits_a_kind_the_model_did_not_know():
    model = RooflineModel("cpu")
    samples = [("my_fused_op", 0, n, n / 3e9 + 2e-6) for n in np.geomspace(1e3, 1e8, 40).astype(int)]
    model.calibrate(samples)
    assert model.predict("my_fused_op", 0, 10**7) == pytest.approx(10**7 / 3e9 + 2e-6, rel=0.01)


@pytest.mark.parametrize("bad", [
    [],
    [("conv", 10, 10)],
    [("conv", 10, 10, 0.0)],
    [("conv", -1, 10, 1e-3)],
    [("conv", 10, 10, float("nan"))],
    42,
])
def test_bad_calibration_data_is_refused(bad):
    model = RooflineModel("cpu")
    constants = dict(model.constants)
    with pytest.raises(CostModelError):
        model.calibrate(bad)
    assert model.constants == constants and model.calibration is None
