"""PassManager: numeric proof of exact passes, rollback, drift of lossy passes, fixed point, report, no mutation."""

import math

import pytest
import torch
import torch.nn as nn
from helpers import max_rel_error, randomize_bn

import hant
from hant.cost_models import Cost, CostReport
from hant.graphs.ops import conv_of
from hant.passes import Pass, PassManager, PassResult
from hant.passes.manager import compare_outputs
from hant.passes.surgery import prune_unused, replace_with_module


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.3)
        self.conv2 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.conv2(self.drop(torch.relu(self.bn1(self.conv1(x)))))


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture
def net_and_input():
    torch.manual_seed(0)
    return randomize_bn(Net(), 0), torch.randn(1, 3, 12, 12)


class ScaleFirstConv(Pass):
    """Test-only: puts a conv with DOUBLED weights in place of the first conv (wrong on purpose)."""
    name = "test_scale_first_conv"
    exact = True

    def call(self, gm):
        for node in gm.graph.nodes:
            view = conv_of(node)
            if view is not None:
                conv = nn.Conv2d(view.in_channels, view.out_channels, view.kernel_size, padding=view.padding)
                conv.weight = nn.Parameter(view.weight.detach() * 2)
                conv.bias = nn.Parameter(view.bias.detach().clone())
                replace_with_module(gm, node, conv, (view.input,), "doubled")
                self.decide(node.name, "applied", "doubled the weights")
                prune_unused(gm)
                return PassResult(gm, True)
        return PassResult(gm, False)


class LossyScaleFirstConv(ScaleFirstConv):
    name = "test_lossy_scale"
    exact = False


class Raises(Pass):
    name = "test_raises"

    def call(self, gm):
        next(n for n in gm.graph.nodes if n.op == "call_module").target = "drop"  # half-done damage first
        raise RuntimeError("boom")


class MutatesInPlace(Pass):
    name = "test_mutates"

    def call(self, gm):
        with torch.no_grad():
            next(gm.parameters()).mul_(2)
        return PassResult(gm, True)


class AlwaysModified(Pass):
    name = "test_always_modified"
    idempotent = False

    def call(self, gm):
        return PassResult(gm, True)


class NodeCount:
    """Test cost model: one microsecond per node."""
    name = "node_count"

    def node_cost(self, node):
        return Cost(latency_s=1e-6)

    def graph_cost(self, gm):
        n = sum(1 for node in gm.graph.nodes if node.op not in ("placeholder", "output", "get_attr"))
        return CostReport("node_count", [], Cost(latency_s=n * 1e-6))


def test_broken_exact_pass_is_rolled_back_and_reported(net_and_input):
    model, x = net_and_input
    gm = hant.trace(model, x)
    result = PassManager([ScaleFirstConv, "fuse_bn"], cost=None, check=x)(gm)
    first, second = result.report.rows
    assert first.rolled_back and "broke numerics" in first.reason and first.name == "test_scale_first_conv"
    assert not second.rolled_back and second.modified
    out = result.graph_module(x)
    assert max_rel_error(model(x), out) <= 1e-5  # the doubled conv was not kept
    assert not any(name.startswith("doubled") for name, _ in result.graph_module.named_modules())
    rolled = result.report.decisions_of("test_scale_first_conv")
    assert [d.action for d in rolled] == ["rolled_back"] and "doubled the weights" in rolled[0].reason
    assert "rolled back" in str(result.report)


def test_without_check_inputs_a_wrong_pass_is_not_caught(net_and_input):
    model, x = net_and_input
    result = PassManager([ScaleFirstConv], cost=None)(hant.trace(model, x))
    assert result.modified and not result.report.rows[0].rolled_back
    assert max_rel_error(model(x), result.graph_module(x)) > 1e-2  # the check is what protects


def test_lossy_pass_is_kept_and_its_drift_reported(net_and_input):
    model, x = net_and_input
    result = PassManager([LossyScaleFirstConv], cost=None, check=x)(hant.trace(model, x))
    (row,) = result.report.rows
    assert not row.rolled_back and row.modified and not row.exact
    assert row.max_error > 1e-2 and "drift" in row.reason


def test_raising_pass_is_rolled_back_with_its_message(net_and_input):
    model, x = net_and_input
    gm = hant.trace(model, x)
    result = PassManager([Raises], cost=None, check=x)(gm)
    (row,) = result.report.rows
    assert row.rolled_back and "RuntimeError: boom" in row.reason
    assert result.graph_module.code == gm.code and not result.modified


def test_pass_mutating_a_tensor_in_place_is_an_error(net_and_input):
    model, x = net_and_input
    gm = hant.trace(model, x)
    before = next(gm.parameters()).clone()
    with pytest.raises(hant.PassError, match="in place"):
        PassManager([MutatesInPlace], cost=None, check=x)(gm)
    assert torch.equal(next(gm.parameters()), before)  # the manager worked on a deep copy


def test_manager_never_mutates_its_input(net_and_input):
    model, x = net_and_input
    gm = hant.trace(model, x)
    code, state = gm.code, {k: v.clone() for k, v in gm.state_dict().items()}
    modules = dict(gm.named_modules())
    result = PassManager("cleanup,fuse_bn", cost="roofline:cpu", check=x)(gm)
    assert result.modified
    assert gm.code == code and dict(gm.named_modules()).keys() == modules.keys()
    assert all(torch.equal(v, state[k]) for k, v in gm.state_dict().items())


def test_fixed_point_stops_when_nothing_changes(net_and_input):
    model, x = net_and_input
    result = PassManager("cleanup,fuse_bn", cost=None, check=x, fixed_point=True)(hant.trace(model, x))
    runs = [(r.iteration, r.name) for r in result.report.rows]
    # round 2 changes nothing, so there is no round 3
    assert runs == [(1, "cleanup"), (1, "fuse_bn"), (2, "cleanup"), (2, "fuse_bn")]
    assert not any(r.modified for r in result.report.rows if r.iteration == 2)


def test_a_pass_that_saw_the_graph_unchanged_is_not_run_again(net_and_input):
    model, x = net_and_input
    result = PassManager("fuse_bn,cleanup,fuse_bn", cost=None, check=x, fixed_point=True)(hant.trace(model, x))
    runs = [(r.iteration, r.name, r.modified) for r in result.report.rows]
    # round 1: fuse_bn folds, cleanup drops the dropout, fuse_bn sees that graph and leaves it. Round 2: both
    # fuse_bn runs are skipped (fuse_bn already left this very graph unchanged); cleanup changed it last, so it
    # runs once more to confirm the fixed point
    assert runs == [(1, "fuse_bn", True), (1, "cleanup", True), (1, "fuse_bn", False), (2, "cleanup", False)]


def test_fixed_point_is_bounded(net_and_input):
    model, x = net_and_input
    result = PassManager([AlwaysModified], cost=None, fixed_point=True, max_iterations=3)(hant.trace(model, x))
    assert [r.iteration for r in result.report.rows] == [1, 2, 3]


def test_report_has_costs_errors_and_decisions(net_and_input):
    model, x = net_and_input
    result = PassManager("cleanup,fuse_bn", cost=NodeCount(), check=x)(hant.trace(model, x))
    cleanup, fuse = result.report.rows
    # conv1, bn1, relu, drop, conv2; cleanup drops the dropout; fuse_bn makes conv1 + bn1 one conv
    assert cleanup.cost_before == pytest.approx(5e-6) and cleanup.cost_after == pytest.approx(4e-6)
    assert fuse.cost_before == pytest.approx(4e-6) and fuse.cost_after == pytest.approx(3e-6)
    assert fuse.nodes_changed > 0
    assert 0 <= fuse.max_error <= 1e-5 and fuse.seconds > 0
    text = str(result.report)
    for word in ("cleanup", "fuse_bn", "kept", "node_count", "applied", "conv1 + bn1"):
        assert word in text
    assert result.report.to_markdown().startswith("|")


def test_roofline_cost_is_lower_after_folding(net_and_input):
    model, x = net_and_input
    result = PassManager("cleanup,fuse_bn", check=x)(hant.trace(model, x))
    rows = result.report.rows
    assert rows[-1].cost_after < rows[0].cost_before


def test_shapes_are_repropagated(net_and_input):
    model, x = net_and_input
    result = PassManager("fuse_bn", cost=None, check=x)(hant.trace(model, x))
    for node in result.graph_module.graph.nodes:
        if node.op not in ("output",):
            assert "tensor_meta" in node.meta, node.name


def test_nondeterministic_model_is_refused_with_advice(net_and_input):
    model, x = net_and_input
    gm = hant.trace(model, x)
    gm.drop.train()
    with pytest.raises(hant.PassError, match="model.eval"):
        PassManager("fuse_bn", cost=None, check=x)(gm)


def test_nondeterministic_model_is_refused_before_a_lossy_pass(net_and_input):
    """A lossy pass's drift is reported, never checked: determinism is asked before it runs."""
    model, x = net_and_input
    gm = hant.trace(model, x)
    gm.drop.train()
    with pytest.raises(hant.PassError, match="model.eval"):
        PassManager([LossyScaleFirstConv], cost=None, check=x)(gm)


class CountsRuns(nn.Module):
    """A leaf layer that logs its forward calls (in a list its structural copies share)."""

    def __init__(self):
        super().__init__()
        self.log = []

    def forward(self, x):
        self.log.append(1)
        return x * 1.0


def test_known_outputs_save_the_first_run_and_are_the_reference(net_and_input):
    model, x = net_and_input
    gm = hant.trace(nn.Sequential(model, CountsRuns()), x, leaf_modules=[CountsRuns])
    log = gm.get_submodule("1").log
    with torch.no_grad():
        outputs = gm(x)
    runs = len(log)
    result = PassManager("fuse_bn", cost=None, check=x).run(gm, copy_tensors=False, outputs=outputs)
    assert len(log) == runs + 1           # only the check after fuse_bn
    assert result.max_error is not None and result.max_error <= 1e-5
    PassManager("fuse_bn", cost=None, check=x).run(gm, copy_tensors=False)
    assert len(log) == runs + 3           # without them: a run for the reference first
    with pytest.raises(hant.PassError, match="differ between two runs"):  # outputs gm does not reproduce
        PassManager("fuse_bn", cost=None, check=x).run(gm, copy_tensors=False, outputs=outputs * 2)


def test_pass_copies_run_before_they_are_recompiled(net_and_input):
    from hant.passes.manager import _structural_copy

    model, x = net_and_input
    gm = hant.trace(model, x)
    copy = _structural_copy(gm, recompile=False)
    assert copy.graph is not gm.graph and copy.graph.owning_module is copy
    assert torch.equal(copy(x), gm(x))
    prune_unused(copy)  # an edit recompiles the copy only
    assert torch.equal(copy(x), gm(x)) and type(copy).forward is not type(gm).forward


def test_unknown_pass_and_bad_arguments_raise_pass_error():
    with pytest.raises(hant.PassError, match="fuse_bn"):
        PassManager("no_such_pass")
    with pytest.raises(hant.PassError):
        PassManager("fuse_bn", max_iterations=0)
    with pytest.raises(hant.PassError, match="GraphModule"):
        PassManager("fuse_bn", cost=None)(nn.Linear(2, 2))
    with pytest.raises(hant.CostModelError):
        PassManager("fuse_bn", cost="no_such_model")


def test_compare_outputs_checks_every_tensor_of_nested_outputs():
    a = {"x": torch.ones(3), "y": (torch.zeros(2), torch.full((2,), 10.0))}
    b = {"x": torch.ones(3), "y": (torch.zeros(2), torch.full((2,), 10.0 + 1e-3))}
    ok, err, _ = compare_outputs(a, b, rtol=1e-3, atol=0)
    assert ok and err == pytest.approx(1e-4, rel=1e-3)
    ok, _, why = compare_outputs(a, b, rtol=1e-5, atol=0)
    assert not ok and "output 2" in why
    ok, err, why = compare_outputs((torch.ones(2),), (torch.ones(3),), 1, 1)
    assert not ok and math.isinf(err) and "changed" in why
    ok, _, _ = compare_outputs(torch.tensor([float("nan"), 1.0]), torch.tensor([1.0, 1.0]), 1, 1)
    assert not ok
