"""Kernel-level predictor: kernel grouping, kernel modules, timing into a store, fit/calibrate/predict."""

import copy
import gc
import pickle
import random
import weakref

import numpy as np
import pytest
import torch
import torch.nn as nn
from torchvision.models import efficientnet_b0, mobilenet_v3_small, resnet18, shufflenet_v2_x0_5

import hant
from hant.cost_models import get
from hant.cost_models.base import CostReport
from hant.cost_models.learned import FEATURE_NAMES, featurize
from hant.cost_models.learned.kernel_model import (
    CALIBRATION_TERMS, KernelCostModel, KernelPredictor, select_terms, train_kernels,
)
from hant.cost_models.learned.kernels import (
    KERNEL_FEATURES, KERNEL_TYPES, KernelNetwork, build_kernel, conv_runs_blocked, extract_kernels, isolation_nodes,
    kernel_macs, kernel_network, kernel_rows, kernel_signature, layout_reorders, profile_kernels,
    sample_kernel, sampled_kernels,
)
from hant.cost_models.netspace import ShuffleUnit, SqueezeExcite
from hant.cost_models.store import LatencyStore, RuntimeKey, Spread
from hant.graphs.trace import propagate_shapes

from tests.helpers import TwoBranches, randomize_bn


def _trace(model, size=64):
    return hant.trace(randomize_bn(model.eval(), 0), torch.randn(1, 3, size, size))


def _synthetic_seconds(config):
    """A made-up but smooth kernel latency: 3 us plus MACs and bytes at fixed rates."""
    rows = kernel_rows([config])[0]
    macs = kernel_macs(config)
    moved = 2 ** rows[KERNEL_FEATURES.index("log_in_bytes")] + 2 ** rows[KERNEL_FEATURES.index("log_out_bytes")]
    return float(3e-6 + macs / 2e10 + moved / 1e10)


# ------------------------------------------------------------------ grouping

def test_resnet_kernels_fuse_conv_bn_relu_and_add_relu():
    gm = _trace(resnet18())
    kernels = extract_kernels(gm)
    by_anchor = {k.anchor: k for k in kernels}
    stem = by_anchor["conv1"]
    assert stem.nodes == ("conv1", "bn1", "relu") and stem.config["bn"] and stem.config["act"] == "relu"
    assert stem.config["type"] == "conv" and stem.config["ho"] == 32 and stem.config["k"] == 7
    adds = [k for k in kernels if k.config["type"] == "add"]
    assert len(adds) == 8 and all(k.config["act"] == "relu" and len(k.nodes) == 2 for k in adds)
    assert sum(k.config["type"] == "conv" for k in kernels) == 20
    in_kernels = [n for k in kernels for n in k.nodes]
    assert len(in_kernels) == len(set(in_kernels))           # every node in at most one kernel


def test_squeeze_excite_kernels_and_depthwise_features():
    kernels = extract_kernels(_trace(mobilenet_v3_small()))
    types = {k.config["type"] for k in kernels}
    assert {"conv", "pool_global", "mul", "linear"} <= types
    gate = next(k for k in kernels if k.config["type"] == "conv" and k.config["act"] == "hardsigmoid")
    assert gate.config["h"] == 1 and not gate.config["bn"]
    dw = next(k for k in kernels if k.config["type"] == "conv" and k.config["groups"] > 1)
    row = kernel_rows([dw.config])[0]
    assert row[KERNEL_FEATURES.index("depthwise")] == 1.0 and row[KERNEL_FEATURES.index("type_conv")] == 1.0
    mul = next(k for k in kernels if k.config["type"] == "mul")
    assert mul.config["broadcast"]


def test_shufflenet_shape_only_nodes_are_free_transposes_copy_and_chunks_split():
    """x.size() has no tensor_meta: free for kernels and for the GNN features (no crash); a chunk into a
    tuple is onnxruntime's Split, a copy of its input."""
    gm = _trace(shufflenet_v2_x0_5())
    kernels = extract_kernels(gm)
    assert sum(k.config["type"] == "copy" for k in kernels) == 16          # one channel shuffle per block
    assert sum(k.config["type"] == "cat" for k in kernels) == 16
    splits = [k.config for k in kernels if k.config["type"] == "split"]
    assert len(splits) == 13 and all(c["parts"] == 2 for c in splits)     # the 13 units that keep their width
    size_nodes = [n.name for n in gm.graph.nodes if n.op == "call_method" and n.target == "size"]
    assert size_nodes and not set(size_nodes) & {n for k in kernels for n in k.nodes}
    features = featurize(gm)
    rows = {name: features.x[i] for i, name in enumerate(features.names)}
    for name in size_nodes:
        assert rows[name][FEATURE_NAMES.index("kind_shape")] == 1.0
        assert rows[name][FEATURE_NAMES.index("log_macs")] == rows[name][FEATURE_NAMES.index("log_bytes")] == 0


# ------------------------------------------------------------------ layout (onnxruntime's NCHWc reorders)

def _conv(cin, cout, groups=1):
    return {"type": "conv", "cin": cin, "cout": cout, "h": 8, "w": 8, "k": 3, "s": 1, "groups": groups, "bn": True,
            "act": "relu", "batch": 1, "ho": 8, "wo": 8}


@pytest.mark.parametrize("cin, cout, groups, blocked, nodes", [
    (3, 32, 1, True, 1),          # few input channels: read as NCHW, only the output is converted alone
    (32, 24, 1, True, 2), (58, 58, 1, False, 0),                   # dense: input channels a multiple of 4
    (72, 72, 72, True, 2), (58, 58, 58, False, 0),                 # depthwise: channels a multiple of 4
    (64, 64, 4, True, 2), (64, 64, 8, False, 0), (96, 96, 4, False, 0),   # grouped: whole 16-channel blocks per group
])
def test_which_convolutions_run_blocked_and_what_they_run_only_alone(cin, cout, groups, blocked, nodes):
    config = _conv(cin, cout, groups)
    assert conv_runs_blocked(config) is blocked
    count, elements = isolation_nodes(config)
    assert count == nodes
    assert elements == {0: 0, 1: cout * 64, 2: (cin + cout) * 64}[nodes]
    # a HardSwish is fused in a network, but alone it runs as HardSigmoid and Mul over the output
    assert isolation_nodes(dict(config, act="hardswish")) == (count + 2, elements + 2 * cout * 64)


class _ShuffleBetweenConvs(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.a, self.b = nn.Conv2d(channels, channels, 1), nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        y = self.a(x)
        y = y.unflatten(1, (2, y.shape[1] // 2)).transpose(1, 2).flatten(1, 2)
        return self.b(y)


def _reorders(model, channels, side=8):
    gm = hant.trace(model.eval(), torch.randn(1, channels, side, side))
    return gm, layout_reorders(gm)


def test_a_channel_shuffle_between_blocked_convs_costs_a_reorder_each_way():
    gm, reorders = _reorders(_ShuffleBetweenConvs(32), 32)
    summary = sorted((r.tensor, r.to_blocked, r.elements) for r in reorders)
    # the input is converted for conv a; a's output back for the transpose; the shuffled tensor for conv b
    # (b's output is blocked and goes back to NCHW for the graph output)
    assert [(t, e) for t, _, e in summary] == [("a", 2048), ("b", 2048), ("flatten", 2048), ("x", 2048)]
    assert {t: blocked for t, blocked, _ in summary} == {"x": True, "a": False, "flatten": True, "b": False}
    assert next(r for r in reorders if r.tensor == "a").at in {n.name for n in gm.graph.nodes}
    # unaligned channels: onnxruntime runs both convolutions NCHW and converts nothing
    assert _reorders(_ShuffleBetweenConvs(58), 58)[1] == []


def test_squeeze_excite_multiply_leaves_the_blocked_layout():
    class SE(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.se, self.out = nn.Conv2d(32, 32, 1), SqueezeExcite(32, 16, "relu", "sigmoid"), nn.Conv2d(32, 32, 1)

        def forward(self, x):
            return self.out(self.se(self.conv(x)))

    gm, reorders = _reorders(SE(), 32)
    into_multiply = sorted(r.tensor for r in reorders if not r.to_blocked and r.at.startswith("mul"))
    assert into_multiply == ["conv", "se_gate"]                      # both operands of the broadcast multiply
    assert [r.tensor for r in reorders if r.to_blocked] == ["x", "mul"]   # the product goes back for `out`
    network = kernel_network(gm)
    assert len(network.reorders) == len(reorders) and network.configs[0]["type"] == "conv"


def test_shuffle_units_of_the_network_space_split_and_reorder():
    gm, reorders = _reorders(nn.Sequential(nn.Conv2d(32, 64, 1), ShuffleUnit(64, 64, 1, 3, "relu")), 32, 16)
    types = [k.config["type"] for k in extract_kernels(gm)]
    assert types.count("split") == 1 and types.count("cat") == 1 and types.count("copy") == 1
    assert any(not r.to_blocked for r in reorders) and any(r.to_blocked for r in reorders)


def test_untraced_graph_still_raises_in_featurize():
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
    with pytest.raises(hant.CostModelError, match="trace the model with hant.trace"):
        featurize(gm)


def test_cached_node_facts_follow_new_shapes():
    gm = _trace(resnet18(), 64)
    first = extract_kernels(gm)[0].config
    propagate_shapes(gm, torch.randn(1, 3, 96, 96))
    again = extract_kernels(gm)[0].config
    assert (first["h"], again["h"]) == (64, 96) and again["ho"] == 48


class _SumsAndProducts(nn.Module):
    """Sums and products the function shortcuts must decline (constants, sizes) or take (tensors, broadcasts)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        gate = y.mean((2, 3), keepdim=True)
        y = y * gate + y                    # a broadcast product, a same-shape sum
        y = y * 0.5 + 1.0                   # tensor and constant
        return y.flatten(1)[:, : x.size(1) * 2 + 1]    # size arithmetic


@pytest.mark.parametrize("model", [resnet18, mobilenet_v3_small, efficientnet_b0, _SumsAndProducts])
def test_modules_read_directly_agree_with_the_general_way(model):
    """Kernel grouping reads the commonest modules (Conv2d, BatchNorm2d, activations, global pools) and
    tensor sums and products directly; what it reads must equal what op_kind and the op views say of
    the same nodes."""
    import operator

    from hant.cost_models.base import target_name
    from hant.cost_models.learned.kernels import _FUNCTION_FACTS, _MODULE_FACTS, _describe, node_facts
    from hant.graphs.ops import module_of, op_kind

    gm = _trace(model(), 64)
    read_directly = set()
    for node in gm.graph.nodes:
        module = module_of(node)
        if module is not None and type(module) in _MODULE_FACTS:
            read_directly.add(type(module))
        if node.op == "call_function" and node.target in _FUNCTION_FACTS:
            read_directly.add(node.target)
        kind = op_kind(node)
        assert node_facts(node) == (_describe(node, kind), kind, target_name(node)), node.name
    assert nn.Conv2d in read_directly
    if model is not _SumsAndProducts:
        assert {nn.BatchNorm2d, nn.AdaptiveAvgPool2d} <= read_directly
        assert read_directly & {nn.ReLU, nn.Hardswish, nn.SiLU, nn.Sigmoid, nn.Hardsigmoid}
    if model in (resnet18, _SumsAndProducts):
        assert operator.add in read_directly
    if model in (mobilenet_v3_small, efficientnet_b0, _SumsAndProducts):
        assert operator.mul in read_directly


def test_forgetting_kernels_gives_equal_configurations_and_rows_anew():
    from hant.cost_models.learned.kernels import forget_kernels

    first = extract_kernels(_trace(resnet18(), 64))
    rows = kernel_rows([k.config for k in first])
    forget_kernels()
    again = extract_kernels(_trace(resnet18(), 64))
    assert [k.config for k in again] == [k.config for k in first]
    assert all(a.config is not b.config for a, b in zip(again, first))      # not the interned objects
    assert np.array_equal(kernel_rows([k.config for k in again]), rows)


def test_node_facts_follow_rewired_arguments():
    gm = _trace(resnet18(), 64)
    conv = next(n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.Conv2d)
                and n.args[0].op != "placeholder")
    from hant.cost_models.learned.kernels import node_facts

    before = node_facts(conv)[0]
    placeholder = next(iter(gm.graph.find_nodes(op="placeholder")))
    conv.args = (placeholder,)          # a pass rewires the conv to read the network input
    after = node_facts(conv)[0]
    assert before[1] is not placeholder and after[1] is placeholder


# ------------------------------------------------------------------ kernels alone

@pytest.mark.parametrize("seed", range(40))
def test_sampled_kernels_build_to_their_stated_shapes(seed):
    config = sample_kernel(seed)
    assert config["type"] in KERNEL_TYPES
    assert config == sample_kernel(seed)
    module, inputs = build_kernel(config)
    with torch.no_grad():
        out = module(*inputs)
    if config["type"] == "conv":
        assert tuple(out.shape) == (1, config["cout"], config["ho"], config["wo"])
    elif "out" in config:
        assert list(out.shape) == config["out"]
    elif config["type"] == "cat":
        assert out.shape[1] == sum(s[1] for s in config["shapes"])
    elif config["type"] != "linear":
        assert list(out.shape) == config["shape"]
    assert np.isfinite(kernel_rows([config])).all()


def test_profile_kernels_stores_positive_times_and_resumes(tmp_path):
    configs = [{"type": "conv", "cin": 8, "cout": 16, "h": 8, "w": 8, "k": 3, "s": 1, "groups": 1, "bn": True,
                "act": "relu", "batch": 1, "ho": 8, "wo": 8},
               {"type": "add", "shape": [1, 8, 8, 8], "broadcast": False, "act": "none"},
               {"type": "pool_global", "shape": [1, 16, 4, 4], "out": [1, 16, 1, 1], "k": 1, "s": 1}]
    path = tmp_path / "k.db"
    assert profile_kernels(configs[:2], path, threads=1, progress=False) == (2, 0)
    assert profile_kernels(configs, path, threads=1, progress=False) == (1, 2)          # a rerun measures only the new one
    with LatencyStore(path) as store:
        stored = list(store.ops(kind="kernel"))
    assert len(stored) == 3 and all(r.latency_s > 0 and r.spread.min_s > 0 for r in stored)
    assert stored[0].signature == kernel_signature(configs[0])


# ------------------------------------------------------------------ fit, calibrate, predict

@pytest.fixture(scope="module")
def predictor():
    rng = random.Random(0)
    configs = [sample_kernel(rng) for _ in range(300)]
    return train_kernels(configs, [_synthetic_seconds(c) for c in configs], config={"steps": 300, "hidden": 32},
                         seed=0)


def test_kernel_mlp_learns_a_smooth_latency(predictor):
    held = [sample_kernel(random.Random(f"held:{i}")) for i in range(100)]
    predicted = predictor.kernel_seconds(kernel_rows(held))
    truth = np.array([_synthetic_seconds(c) for c in held])
    assert np.median(np.abs(predicted / truth - 1)) < 0.35
    assert np.corrcoef(np.log(predicted), np.log(truth))[0, 1] > 0.9


def _networks_with_reorders(seed, n=40):
    rng = random.Random(seed)
    return [KernelNetwork(tuple(sample_kernel(rng) for _ in range(rng.randint(5, 40))),
                          tuple((rng.random() < 0.5, rng.randint(100, 200_000)) for _ in range(rng.randint(0, 12))))
            for _ in range(n)]


LAW = {"kernel_sum": 0.9, "kernels": -2e-6, "constant": 5e-5, "layout_elements": 1e-9, "reorders": 1e-6,
       "weight_elements": 1e-9}


def test_calibration_recovers_a_network_law_with_layout_and_weight_terms(predictor):
    networks = _networks_with_reorders(1)
    design = predictor.design(networks)
    whole = design @ np.array([LAW.get(t, 0.0) for t in CALIBRATION_TERMS])
    terms = tuple(LAW)
    summary = predictor.calibrate(networks, whole, terms)
    assert summary["terms"] == list(terms) and summary["mape_pct_after"] < 1e-3
    for term in CALIBRATION_TERMS:
        assert predictor.calibration[term] == pytest.approx(LAW.get(term, 0.0), rel=1e-3, abs=1e-13)
    np.testing.assert_allclose(predictor.predict_networks(networks), whole, rtol=1e-6)
    # a bare kernel list is a network without reorders
    bare = [list(networks[0].configs)]
    assert predictor.predict_networks(bare)[0] == pytest.approx(
        predictor.predict_networks([KernelNetwork(networks[0].configs, ())])[0], rel=1e-12)


def test_term_selection_finds_the_terms_the_networks_follow(predictor):
    networks = _networks_with_reorders(2, 60)
    design = predictor.design(networks)
    law = np.array([LAW.get(t, 0.0) for t in CALIBRATION_TERMS])
    whole = design @ law * np.exp(np.random.default_rng(0).normal(0, 0.01, len(networks)))
    best, scores = select_terms(design, whole)
    assert set(best) == set(LAW) and scores[best] < 2.0
    assert scores[("kernel_sum", "kernels", "constant")] > scores[best]


def test_layout_calibration_round_trips_through_the_file_and_prices_rows(predictor, tmp_path):
    networks = _networks_with_reorders(3)
    predictor.calibrate(networks, predictor.design(networks) @ np.array([LAW.get(t, 0.0) for t in CALIBRATION_TERMS]),
                        tuple(LAW))
    path = tmp_path / "kernel.pt"
    predictor.save(path)
    loaded = KernelPredictor.from_state(torch.load(path, weights_only=True))
    assert loaded.calibration == predictor.calibration
    gm = hant.trace(_ShuffleBetweenConvs(32).eval(), torch.randn(1, 32, 8, 8))
    report = get(f"learned:{path}").graph_cost(gm)
    # graph_cost runs the float32 MLP on distinct kernels only, predict_graph on all: rounding differs a little
    assert report.latency_s == pytest.approx(loaded.predict_graph(gm), rel=1e-6)
    # rows carry the kernels and the four reorders; the constant is the rest
    assert report.rows_latency_s + LAW["constant"] == pytest.approx(report.latency_s, rel=1e-9)
    assert "4 layout reorders" in report.notes[0]


def test_learned_kernel_file_round_trip_and_node_order(predictor, tmp_path):
    path = tmp_path / "kernel.pt"
    predictor.save(path)
    model = get(f"learned:{path}")
    assert isinstance(model, KernelCostModel)
    gm = _trace(resnet18())
    report = model.graph_cost(gm)
    assert report.latency_s == pytest.approx(KernelPredictor.from_state(torch.load(path, weights_only=True))
                                             .predict_graph(gm), rel=1e-6)
    assert report.rows_latency_s > 0 and len(report.rows) == len(
        [n for n in gm.graph.nodes if n.op not in ("placeholder", "output", "get_attr")])
    assert model.node_cost(next(n for n in gm.graph.nodes if n.name == "conv1")).latency_s > 0

    x = torch.randn(1, 3, 16, 16)
    first, second = hant.trace(TwoBranches(False).eval(), x), hant.trace(TwoBranches(True).eval(), x)
    assert [n.name for n in first.graph.nodes] != [n.name for n in second.graph.nodes]
    assert model.graph_cost(first).latency_s == pytest.approx(model.graph_cost(second).latency_s, rel=1e-6)


def test_kernel_report_rows_are_those_of_the_graph_when_priced(predictor):
    """The rows are built on first read, from what the graph was when it was priced; the report compares,
    copies and pickles as a plain report of the same rows, and its total counts are the rows' sums."""
    model = KernelCostModel(predictor)
    gm = _trace(resnet18())
    report = model.graph_cost(gm)
    eager = [(n.name, n.meta["tensor_meta"].shape) for n in gm.graph.nodes
             if n.op not in ("placeholder", "output", "get_attr")]
    relu = next(n for n in gm.graph.nodes if n.name == "relu")
    relu.replace_all_uses_with(relu.args[0])            # edited after pricing, before the rows are read
    gm.graph.erase_node(relu)
    gm.recompile()
    rows = report.rows
    assert [(r.node, r.output_shape) for r in rows] == [(name, tuple(shape)) for name, shape in eager]
    assert report.rows is rows
    for field in ("macs", "bytes_read", "bytes_written", "params"):
        assert getattr(report.total, field) == sum(getattr(r.cost, field) for r in rows) > 0
    plain = CostReport(report.model, list(rows), report.total, list(report.notes))
    assert report == plain and plain == report
    assert type(pickle.loads(pickle.dumps(report))) is CostReport and pickle.loads(pickle.dumps(report)) == plain
    assert type(copy.copy(report)) is CostReport and copy.copy(report) == plain
    # priced again, the edited graph has no row for the erased node
    assert [r.node for r in model.graph_cost(gm).rows] == [r.node for r in rows if r.node != "relu"]


def test_a_priced_graph_is_freed_with_its_last_reference_even_while_its_report_is_kept(predictor):
    model = KernelCostModel(predictor)
    gm = _trace(resnet18())
    report = model.graph_cost(gm)
    alive = weakref.ref(gm)
    del gm
    gc.collect()
    assert alive() is None
    assert len(report.rows) > 0 and report.latency_s > 0


def test_kernel_file_with_other_features_raises(predictor, tmp_path):
    state = predictor.state()
    state["feature_names"] = state["feature_names"][:-1]
    path = tmp_path / "old.pt"
    torch.save(state, path)
    with pytest.raises(hant.CostModelError, match="other kernel features"):
        get(f"learned:{path}")


def test_fit_db_kernel_round_trip(tmp_path, capsys):
    """Kernels timed alone + whole networks in one store -> fit_db(model="kernel") -> learned:PATH."""
    from hant.cost_models.learned import fit_db
    from hant.cost_models.netspace import build, input_shape, sample_spec

    key = RuntimeKey("onnxruntime", "test", 1, "test-cpu")
    specs = [sample_spec(seed, "tiny") for seed in range(8)]
    lists = [[k.config for k in extract_kernels(hant.trace(build(s), torch.randn(*input_shape(s))))] for s in specs]
    rng = random.Random(0)
    kernels = [c for n in lists for c in n] + [sample_kernel(rng) for _ in range(100)]
    with LatencyStore(tmp_path / "data.db") as store:
        for config in kernels:
            t = _synthetic_seconds(config)
            store.put_op(kernel_signature(config), key, 2 * t, Spread(0.0, t, 3 * t, 5, 0.5), cost_kind="kernel")
        for spec, n in zip(specs, lists):
            whole = 0.7 * sum(_synthetic_seconds(c) for c in n) + 2e-5
            store.put_network(spec, input_shape(spec), key, 1.02 * whole, Spread(0.0, whole, 1.1 * whole, 5, 0.1))
        assert list(store.calibration_samples()) == []                # kernels never reach the roofline fit
    out = tmp_path / "kernel.pt"
    result = fit_db(tmp_path / "data.db", model="kernel", out=out, holdout=0.25, config={"steps": 200})
    assert "kernel on" in capsys.readouterr().out
    assert result.metrics["mape_pct"] < 25
    assert result.predictor.metadata["calibration"]["networks"] == 6
    spec = specs[result.test_rows[0]]
    report = get(f"learned:{out}").graph_cost(hant.trace(build(spec), torch.randn(*input_shape(spec))))
    assert report.latency_s > 0


def test_cli_profile_times_kernels_and_fit_refuses_a_table(tmp_path, capsys):
    from hant.tools.cli import main

    db = tmp_path / "cli.db"
    assert main(["profile", "--n", "1", "--space", "tiny", "--no-nodes", "--threads", "1", "--kernels", "2",
                 "--out", str(db)]) == 0
    assert "timed 2 kernels alone" in capsys.readouterr().out
    with LatencyStore(db) as store:
        assert [r.signature["config"] for r in store.ops(kind="kernel")] == sampled_kernels(2, 0)
    assert main(["fit", "--table", "nb201", "--target", "pixel3", "--model", "kernel", "--out",
                 str(tmp_path / "k.pt")]) == 2
    assert "--model kernel learns from kernels timed alone" in capsys.readouterr().err
