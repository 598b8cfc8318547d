"""lut:DEVICE-RUNTIME: table hits give the stored numbers; misses fall back to the roofline and say so."""

import pytest
import torch
import torch.nn as nn

import hant
from hant.cost_models import get
from hant.cost_models.lut import LutModel
from hant.cost_models.measured import MeasuredModel
from hant.cost_models.store import LatencyStore
from hant.cost_models.timing import TimingConfig
from hant.errors import CostModelError



FAST = TimingConfig(warmup_s=0.0, warmup_runs=3, block_s=0.0005, min_samples=7, max_samples=60, time_cap_s=0.05)


def _net():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6(),
                         nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 4)).eval()


@pytest.fixture(scope="module")
def filled(tmp_path_factory):
    path = tmp_path_factory.mktemp("lut") / "lat.db"
    gm = hant.trace(_net(), torch.randn(1, 3, 16, 16))
    MeasuredModel("cpu", "onnxruntime", threads=1, store=path, op_timing=FAST).graph_cost(gm, total="nodes")
    return path, gm


def test_seen_ops_come_from_the_table(filled):
    path, gm = filled
    measured = MeasuredModel("cpu", "onnxruntime", threads=1, store=path).graph_cost(gm, total="nodes")
    lut = get(f"lut:cpu-onnxruntime,threads=1,db={path}")
    report = lut.graph_cost(gm)
    assert isinstance(lut, LutModel) and report.model == "lut:cpu-onnxruntime"
    assert [r.cost.latency_s for r in report.rows] == [r.cost.latency_s for r in measured.rows]
    assert report.latency_s == pytest.approx(measured.latency_s)
    assert any("all 7 ops found" in n for n in report.notes)
    assert lut.node_cost(next(n for n in gm.graph.nodes if n.op == "call_module")).latency_s > 0


def test_unseen_ops_fall_back_to_the_calibrated_roofline_with_a_note(filled):
    path, _ = filled
    other = hant.trace(_net(), torch.randn(1, 3, 24, 24))      # new shapes up to the pool; the linear is seen
    lut = LutModel("cpu", "onnxruntime", threads=1, store=path)
    report = lut.graph_cost(other)
    roofline = {r.node: r.cost.latency_s for r in lut.roofline.graph_cost(other).rows}
    stored = {r.node: r.cost.latency_s for r in LutModel("cpu", "onnxruntime", threads=1, store=path)
              .graph_cost(hant.trace(_net(), torch.randn(1, 3, 16, 16))).rows}
    for row in report.rows:
        expected = stored[row.node] if row.kind in ("linear", "shape") else roofline[row.node]
        assert row.cost.latency_s == expected and (row.kind == "shape" or expected > 0)
    note = next(n for n in report.notes if "not in the table" in n)
    stored = sum(1 for r in LatencyStore(path).ops() if r.macs or r.bytes)   # the flatten moves nothing
    assert stored == 6 and "5 of 7 ops" in note and f"calibrated on {stored} stored op measurements" in note
    assert lut.roofline.calibration is not None and lut.roofline.calibration.samples == stored


def test_an_empty_store_uses_the_uncalibrated_preset(tmp_path):
    gm = hant.trace(_net(), torch.randn(1, 3, 16, 16))
    report = LutModel("cpu", "torch", threads=1, store=tmp_path / "empty.db").graph_cost(gm)
    assert report.latency_s > 0
    assert any("uncalibrated roofline:cpu" in n and "7 of 7 ops" in n for n in report.notes)


def test_other_thread_counts_do_not_match(filled):
    path, gm = filled
    report = LutModel("cpu", "onnxruntime", threads=2, store=path).graph_cost(gm)
    assert any("7 of 7 ops not in the table" in n for n in report.notes)


@pytest.mark.parametrize("spec", ["lut:cpu-tvm", "lut:gpu-torch", "lut:cpu-torch,total=graph", "lut:cpu-torch,x"])
def test_bad_lut_specs_raise_cost_model_error(spec):
    with pytest.raises(CostModelError, match="lut"):
        get(spec)
