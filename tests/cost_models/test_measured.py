"""measured:DEVICE-RUNTIME: positive, stable per-op numbers for every op kind; store hits; specs."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import hant
from hant.cost_models import get
from hant.cost_models.measured import MeasuredModel, build_op, graph_key, is_free, op_signature
from hant.cost_models.store import LatencyStore
from hant.cost_models.timing import Timing, TimingConfig, measure, median_rel_ci
from hant.errors import CostModelError
from hant.graphs.ops import op_kind



FAST = TimingConfig(warmup_s=0.0, warmup_runs=3, block_s=0.0005, min_samples=7, max_samples=60, time_cap_s=0.05)


class EveryKind(nn.Module):
    """One of each op kind the measured model isolates, in both module and functional spellings."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.Hardswish()
        self.dw = nn.Conv2d(8, 8, 5, stride=2, padding=2, groups=8, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.gn = nn.GroupNorm(2, 8)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 16)
        self.ln = nn.LayerNorm(16)

    def forward(self, x):
        y = self.act(self.bn(self.conv(x)))
        z = F.silu(self.dw(y))
        z = self.gn(self.pool(z)) * 0.5
        z = z + torch.sigmoid(z)
        c = torch.cat([z, z], dim=1)
        v = self.fc(torch.flatten(self.gap(y), 1))
        w = self.ln(F.relu(v))
        m = torch.matmul(w.unsqueeze(2), w.unsqueeze(1)).softmax(-1)
        return c.mean(dim=(2, 3)), m


@pytest.fixture(scope="module")
def graph():
    return hant.trace(EveryKind().eval(), torch.randn(1, 3, 16, 16))


KINDS = {"conv", "batchnorm", "activation", "pool", "layernorm", "mul", "add", "cat", "linear", "matmul", "softmax",
         "reduce"}


@pytest.mark.parametrize("runtime", ["onnxruntime", "torch"])
def test_every_op_kind_gets_positive_stable_numbers(graph, tmp_path, runtime):
    first = MeasuredModel("cpu", runtime, threads=1, store=tmp_path / "a.db", op_timing=FAST)
    second = MeasuredModel("cpu", runtime, threads=1, store=tmp_path / "b.db", op_timing=FAST)
    measured = [n for n in graph.graph.nodes if not is_free(n)]
    assert {op_kind(n) for n in measured} == KINDS | {"shape"}                 # flatten, unsqueeze: measured too
    for node in measured:
        a, b = first.node_cost(node), second.node_cost(node)
        assert a.latency_s > 0 and b.latency_s > 0, node.name
        assert 0.1 < a.latency_s / b.latency_s < 10, (node.name, a.latency_s, b.latency_s)  # same order
    assert LatencyStore(tmp_path / "a.db").count("ops") == len({str(op_signature(n)) for n in measured})


def test_free_and_unisolatable_nodes_cost_zero_with_a_note(graph, tmp_path):
    gm = hant.trace(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Dropout(), nn.Flatten()).eval(),
                    torch.randn(1, 3, 8, 8))
    relu = next(n for n in gm.graph.nodes if op_kind(n) == "activation")
    relu.args[0].meta.pop("tensor_meta")            # its input shape is no longer known
    model = MeasuredModel("cpu", "torch", threads=1, store=tmp_path / "s.db", op_timing=FAST)
    report = model.graph_cost(gm, total="nodes")
    by_kind = {r.kind: r.cost.latency_s for r in report.rows}
    assert by_kind["activation"] == 0 and by_kind["identity"] == 0 and by_kind["shape"] > 0
    assert [note for note in report.notes if "priced 0" in note] == [f"{relu.name} (activation): no input shapes, "
                                                                     "priced 0"]


def test_views_of_run_time_sizes_and_tuple_picks_are_free():
    class Shuffle(nn.Module):
        def forward(self, x):
            n, c, h, w = x.size()
            a, b = x.chunk(2, dim=1)
            return torch.cat([b, a], 1).view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, -1)
    gm = hant.trace(Shuffle(), torch.randn(1, 4, 3, 3))
    free = {n.name for n in gm.graph.nodes if is_free(n)}
    timed = {n.name for n in gm.graph.nodes if not is_free(n)}
    assert {"x", "size", "getitem", "getitem_4", "floordiv", "view", "reshape", "output"} <= free
    assert {"chunk", "cat", "transpose"} == timed


def test_store_hits_are_not_measured_again(tmp_path):
    gm = hant.trace(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval(), torch.randn(1, 3, 8, 8))
    model = MeasuredModel("cpu", "onnxruntime", threads=1, store=tmp_path / "s.db", op_timing=FAST, graph_timing=FAST)
    before = model.graph_cost(gm)
    again = MeasuredModel("cpu", "onnxruntime", threads=1, store=tmp_path / "s.db")

    def refuse(*args, **kwargs):
        raise AssertionError("a stored measurement was timed again")
    again.runtime.time = refuse
    after = again.graph_cost(gm)
    assert [r.cost.latency_s for r in after.rows] == [r.cost.latency_s for r in before.rows]
    assert after.latency_s == before.latency_s


def test_samples_time_a_graph_until_enough_independent_timings_are_stored(tmp_path):
    gm = hant.trace(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval(), torch.randn(1, 3, 8, 8))
    timed = []
    once = MeasuredModel("cpu", "onnxruntime", threads=1, store=tmp_path / "s.db", graph_timing=FAST)
    thrice = get(f"measured:cpu-onnxruntime,threads=1,samples=3,db={tmp_path / 's.db'}")
    thrice.graph_timing = FAST
    for model in (once, thrice):
        real = model.runtime.time
        model.runtime.time = lambda *a, real=real, **k: timed.append(1) or real(*a, **k)
    first = once.graph_latency(gm)
    assert len(timed) == 1 and once.graph_latency(gm) == first and len(timed) == 1
    median = thrice.graph_latency(gm)                      # two more timings, then the median of three
    record = LatencyStore(tmp_path / "s.db").get_graph(graph_key(gm), thrice.key)
    assert len(timed) == 3 and record.samples == 3 and median == record.latency_s
    assert thrice.graph_latency(gm) == median and once.graph_latency(gm) == median and len(timed) == 3
    with pytest.raises(CostModelError, match="samples"):
        get("measured:cpu-onnxruntime,samples=0")


def test_graph_total_is_whole_graph_or_sum_of_nodes(tmp_path):
    gm = hant.trace(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 1)).eval(),
                    torch.randn(1, 3, 12, 12))
    model = MeasuredModel("cpu", "onnxruntime", threads=1, store=tmp_path / "s.db", op_timing=FAST, graph_timing=FAST)
    whole = model.graph_cost(gm)
    summed = model.graph_cost(gm, total="nodes")
    assert whole.latency_s == LatencyStore(tmp_path / "s.db").get_graph(graph_key(gm), model.key).latency_s
    assert summed.latency_s == pytest.approx(summed.rows_latency_s)
    assert whole.rows_latency_s == pytest.approx(summed.rows_latency_s)
    assert any("fusion gap" in n for n in whole.notes) and any("sum of" in n for n in summed.notes)
    assert whole.total.macs == summed.total.macs > 0        # counts from the flops model
    assert get("measured:cpu-onnxruntime,total=nodes,threads=1,db=" + str(tmp_path / "s.db")).graph_cost(gm) \
        .latency_s == pytest.approx(summed.latency_s)


def test_traced_and_exported_spellings_share_signatures():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1)).eval()
    x = torch.randn(1, 3, 16, 16)
    signatures = []
    for method in ("symbolic", "export"):
        gm = hant.trace(model, x, method=method)
        signatures.append(sorted(str(op_signature(n)) for n in gm.graph.nodes if op_signature(n) is not None))
    assert signatures[0] == signatures[1] and len(signatures[0]) == 4


def test_rebuilt_op_matches_the_original(graph):
    for node in graph.graph.nodes:
        if op_kind(node) in ("conv", "linear", "pool", "activation"):
            module, inputs = build_op(node)
            ref = graph.get_submodule(node.target) if node.op == "call_module" else None
            if ref is not None:
                module.load_state_dict(ref.state_dict())
                assert torch.allclose(module(*inputs), ref(*inputs), atol=1e-6)
            assert module(*inputs).shape == node.meta["tensor_meta"].shape


def test_measure_stops_on_a_stable_median_or_the_cap():
    calls = []

    def steady(number):
        calls.append(number)
        return 1e-3
    result = measure(steady, TimingConfig(min_samples=5, time_cap_s=10))
    assert isinstance(result, Timing) and result.median_s == 1e-3 and result.iqr_s == 0 and result.n == 5
    assert median_rel_ci([1.0]) == float("inf") and median_rel_ci([1.0, 1.0, 1.0]) == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_cuda_runtime_is_refused_cleanly_without_a_gpu():
    with pytest.raises(CostModelError, match="cuda.is_available"):
        get("measured:cuda-torch")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_runtime_measures_on_a_gpu(tmp_path):
    gm = hant.trace(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()), torch.randn(1, 3, 32, 32))
    report = MeasuredModel("cuda", "torch", store=tmp_path / "g.db", op_timing=FAST, graph_timing=FAST).graph_cost(gm)
    assert report.latency_s > 0 and all(r.cost.latency_s > 0 for r in report.rows)


@pytest.mark.parametrize("spec", ["measured:tpu-torch", "measured:cpu-tensorrt", "measured:cuda-onnxruntime",
                                  "measured:cpu", "measured:cpu-torch,threads=0", "measured:cpu-torch,fast=1",
                                  "measured:cpu-torch,total=some"])
def test_bad_specs_raise_cost_model_error(spec):
    with pytest.raises(CostModelError, match="measured"):
        get(spec)


def test_measuring_a_train_mode_graph_leaves_it_untouched(tmp_path):
    gm = hant.trace(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train(), torch.randn(2, 3, 8, 8))
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    MeasuredModel("cpu", "torch", threads=1, store=tmp_path / "s.db", op_timing=FAST, graph_timing=FAST).graph_cost(gm)
    assert gm.training and all(torch.equal(before[k], v) for k, v in gm.state_dict().items())


def test_relative_latency_compares_two_graphs_timed_in_alternation(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(1, 256)
    small = hant.trace(nn.Sequential(nn.Linear(256, 256)).eval(), x)
    large = hant.trace(nn.Sequential(*[nn.Linear(256, 256) for _ in range(16)]).eval(), x)
    model = MeasuredModel("cpu", "torch", threads=1, store=tmp_path / "t.db")
    real = model.relative_latency(large, small, rounds=20)
    assert real > 0 and real == real and real != float("inf")

    # the arithmetic, on a runtime whose calls take a known time: layers x 1 ms, every 7th call of
    # either graph slowed 10x by an "interrupt" (an outlier: the medians must not see it)
    calls, built = [], []

    def block(module, inputs):
        layers = len([m for m in module.modules() if isinstance(m, nn.Linear)])
        built.append(layers)

        def timed(number):
            calls.append((layers, number))
            return layers * 1e-3 * (10 if len(calls) % 7 == 0 else 1)
        return timed
    model = MeasuredModel("cpu", "torch", threads=1, store=tmp_path / "t.db")
    model.runtime.block = block
    ratio = model.relative_latency(large, small, rounds=30, calls=5)
    assert ratio == pytest.approx(16.0, rel=1e-12)
    # every call timed alone; each round: one untimed and five timed calls of A, then of B
    assert calls[-360:] == ([(16, 1)] * 6 + [(1, 1)] * 6) * 30
    # a reference priced against another graph is not built again; a graph of another structure is
    medium = hant.trace(nn.Sequential(*[nn.Linear(256, 256) for _ in range(4)]).eval(), x)
    assert model.relative_latency(medium, small, rounds=10) == pytest.approx(4.0, rel=1e-12)
    assert built == [16, 1, 4]
    with pytest.raises(hant.CostModelError, match="same input shapes"):
        model.relative_latency(small, hant.trace(nn.Sequential(nn.Linear(128, 256)).eval(), torch.randn(1, 128)))


def test_relative_latency_is_the_uncontended_ratio_whatever_the_share_of_busy_rounds(tmp_path):
    """On a shared machine a busy phase slows a small graph far more than a large one. The price must be
    the ratio of the graphs themselves (fastest calls), not move with how many rounds fell in busy phases."""
    x = torch.randn(1, 64)
    small = hant.trace(nn.Sequential(nn.Linear(64, 64)).eval(), x)
    large = hant.trace(nn.Sequential(*[nn.Linear(64, 64) for _ in range(10)]).eval(), x)
    for busy_share in (0.0, 0.3, 0.7):
        round_of = []

        def block(module, inputs):
            layers = len([m for m in module.modules() if isinstance(m, nn.Linear)])

            def timed(number):
                round_of.append(None)
                rounds_done = len(round_of) // 12          # 6 calls of each graph per round
                busy = (rounds_done * 0.37) % 1.0 < busy_share
                return layers * 1e-4 * ((1.5 if layers == 1 else 1.1) if busy else 1.0)
            return timed
        model = MeasuredModel("cpu", "torch", threads=1, store=tmp_path / "t.db")
        model.runtime.block = block
        assert model.relative_latency(small, large, rounds=40, calls=5) == pytest.approx(0.1, rel=1e-12)


def test_relative_latency_times_a_window_again_when_the_reference_ran_slower_than_before(tmp_path):
    """A window contended throughout (no call ran alone on the core) shows as a reference slower than its
    fastest call in earlier windows; it is timed again, and the ratio comes from the reference's fastest window."""
    x = torch.randn(1, 64)
    small = hant.trace(nn.Sequential(nn.Linear(64, 64)).eval(), x)
    medium = hant.trace(nn.Sequential(*[nn.Linear(64, 64) for _ in range(2)]).eval(), x)
    large = hant.trace(nn.Sequential(*[nn.Linear(64, 64) for _ in range(10)]).eval(), x)
    busy_calls = [10 + 12 * 10]        # warm-up, then one window of 10 rounds of 12 calls: contended
    calls = []

    def block(module, inputs):
        layers = len([m for m in module.modules() if isinstance(m, nn.Linear)])

        def timed(number):
            calls.append(layers)
            busy = len(calls) <= busy_calls[0]
            return layers * 1e-4 * ((1.5 if layers < 10 else 1.1) if busy else 1.0)
        return timed
    model = MeasuredModel("cpu", "torch", threads=1, store=tmp_path / "t.db")
    model.runtime.block = block
    # a new reference: its first window is contended, the second is not and is kept
    assert model.relative_latency(small, large, rounds=10, time_cap_s=0.0) == pytest.approx(0.1, rel=1e-12)
    assert len(calls) == 10 + 2 * 120
    # a known reference in a quiet window: one window
    calls.clear()
    busy_calls[0] = 0
    assert model.relative_latency(medium, large, rounds=10, time_cap_s=0.0) == pytest.approx(0.2, rel=1e-12)
    assert len(calls) == 10 + 120
    # contended throughout: every try is timed, and the price is the contended ratio, no better
    calls.clear()
    busy_calls[0] = 10 ** 9
    assert model.relative_latency(small, large, rounds=10, time_cap_s=0.0, tries=3) == pytest.approx(
        1.5 / 11, rel=1e-12)
    assert len(calls) == 10 + 3 * 120
