"""remove_nonlinearity and relocate_padding: units, exact folding, relocation, selection, the pass."""

import pytest
import torch
import torch.nn as nn
from torchvision.models import mobilenet_v2, resnet18

import hant
from hant.cost_models import Cost, CostReport
from hant.errors import PassError
from hant.graphs.ops import activation_of, conv_of, op_kind
from hant.passes import PassContext
from hant.passes.relocate_padding import RelocatePadding, merge, plan_chains, relocate
from hant.passes.remove_nonlinearity import (
    RemoveNonlinearity, find_units, fold_chains, linearise, linearize, prepare_for_tuning,
)

from hant.tools.digits import DigitsMobileNetV2
from helpers import randomize_bn




class OpCount:
    """A cost model whose numbers the test controls: 1 us per op, plus ``penalty`` seconds for
    every graph that lacks any of the ``protected`` activation nodes (its folded form is "slower")."""
    name = "opcount"

    def __init__(self, protected=(), penalty=1.0):
        self.protected, self.penalty = set(protected), penalty

    def node_cost(self, node):
        return Cost(latency_s=1e-6, macs=1)

    def graph_cost(self, gm):
        nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output", "get_attr")]
        names = {n.name for n in gm.graph.nodes}
        total = 1e-6 * len(nodes) + (self.penalty if self.protected - names else 0.0)
        return CostReport("opcount", [], Cost(latency_s=total))


class Chain(nn.Module):
    """conv3x3 -> BN -> ReLU -> conv3x3 -> BN -> ReLU, + x, then a classifier: a padded -> padded chain."""

    def __init__(self, c=4):
        super().__init__()
        self.conv1, self.bn1, self.act1 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU()
        self.conv2, self.bn2, self.act2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU()
        self.head = nn.Linear(c, 3)

    def forward(self, x):
        y = self.act2(self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x))))) + x)
        return self.head(y.mean((2, 3)))


def _run(module, x):
    with torch.no_grad():
        return module(x)


def _mnv2(dtype):
    model = randomize_bn(mobilenet_v2(num_classes=10, width_mult=0.5), seed=0).to(dtype)
    x = torch.randn(2, 3, 32, 32, dtype=dtype, generator=torch.Generator().manual_seed(0))
    return model, x


def _small():
    """The digits MobileNetV2-like network, untrained, random BN statistics, on 16x16 inputs (fast)."""
    torch.manual_seed(0)
    model = randomize_bn(DigitsMobileNetV2(), seed=0)
    return model, torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))


def test_units_of_mobilenet_v2_group_both_activations_of_an_inverted_residual():
    model, x = _mnv2(torch.float32)
    gm = hant.trace(model, x)
    units = find_units(gm, max_unit_size=2)
    pairs = [u for u in units if len(u) == 2]
    assert ("features_2_conv_0_2", "features_2_conv_1_2") in pairs
    acts = {n.name for n in gm.graph.nodes if activation_of(n) is not None}
    assert {a for u in units for a in u} == acts          # every activation is some unit
    assert all((a,) in units for a in acts)               # and a unit on its own


def test_removing_nothing_changes_nothing():
    model, x = _small()
    gm = hant.trace(model, x)
    same = linearise(gm, ())
    assert same.code == gm.code
    assert torch.equal(_run(same, x), _run(gm, x))
    result = linearize(model, x, [x], latency_target=1.0, cost=OpCount(), progress=False, exact_passes=None,
                       max_unit_size=1)
    assert not result.report.chosen
    assert result.module.code == gm.code
    assert torch.equal(_run(result.module, x), _run(model, x))


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 2e-4)])
@pytest.mark.parametrize("arch", ["mobilenet_v2", "resnet18"])
def test_fold_after_removal_equals_removal_without_fold(arch, dtype, tol):
    if arch == "mobilenet_v2":
        model, x = _mnv2(dtype)
    else:
        model = randomize_bn(resnet18(num_classes=10), seed=1).to(dtype)
        x = torch.randn(2, 3, 32, 32, dtype=dtype, generator=torch.Generator().manual_seed(1))
    gm = hant.trace(model, x)
    units = find_units(gm, max_unit_size=2)
    chosen = [u for u in units if len(u) == 2][:3] or [u for u in units if len(u) == 1][:3]
    removed = sorted({a for u in chosen for a in u})
    lin = linearise(gm, removed)
    folded = fold_chains(lin, OpCount(), relocate_padding=False, exact_passes=None, check_inputs=(x,))
    n_ops = lambda g: sum(op_kind(n) in ("conv", "batchnorm") for n in g.graph.nodes)  # noqa: E731
    assert n_ops(folded) < n_ops(lin)                     # something was really merged
    assert any(t.endswith("_merged") for t in (n.target for n in folded.graph.nodes if n.op == "call_module"))
    expected, actual = _run(lin, x), _run(folded, x)
    assert float((expected - actual).abs().max() / expected.abs().max()) <= tol


def test_relocated_padding_changes_only_the_border_ring():
    torch.manual_seed(0)
    chain = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5), nn.Conv2d(5, 4, 3, padding=1),
                          nn.Conv2d(4, 4, 1))
    randomize_bn(chain, seed=2)
    chain = chain.double()
    x = torch.randn(2, 3, 10, 10, dtype=torch.float64)
    gm = hant.trace(chain, x)
    assert not plan_chains(gm, OpCount(), relocate=False).segments[0].relocated
    plan = plan_chains(gm, OpCount(), relocate=True)
    assert len(plan.segments) == 1 and plan.segments[0].relocated
    gm2 = hant.trace(chain, x)
    assert len(merge(gm2, plan_chains(gm2, OpCount()))) == 1
    conv = [conv_of(n) for n in gm2.graph.nodes if conv_of(n) is not None]
    assert len(conv) == 1 and conv[0].kernel_size == (5, 5) and conv[0].padding == (2, 2)
    expected, actual = _run(chain, x), _run(gm2, x)
    ring = 1        # the second conv's padding: only its one-pixel ring may differ
    inner = (slice(None), slice(None), slice(ring, -ring), slice(ring, -ring))
    assert torch.allclose(expected[inner], actual[inner], rtol=0, atol=1e-12)
    assert float((expected - actual).abs().max()) > 1e-3


def test_residual_is_absorbed_into_the_merged_conv():
    model = randomize_bn(Chain(), seed=3).double()
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    gm = hant.trace(model, x)
    lin = linearise(gm, ["act1"])
    # 8x8 input, 2-pixel ring: wider than fold_chains' default limit (1/16 of 8, at least 1 pixel)
    assert [op_kind(n) for n in fold_chains(lin, OpCount(), exact_passes=None, check_inputs=(x,)).graph.nodes
            ].count("conv") == 2
    folded = fold_chains(lin, OpCount(), relocate_padding=True, exact_passes=None, check_inputs=(x,),
                         max_padding_fraction=None)
    kinds = [op_kind(n) for n in folded.graph.nodes]
    assert kinds.count("conv") == 1 and "add" not in kinds
    # the merged conv with the residual in its centre tap is exactly the relocated (unmerged) chain plus x
    relocated = linearise(gm, ["act1"])
    moved = relocate(relocated, plan_chains(relocated, OpCount()))
    assert moved
    expected, actual = _run(relocated, x), _run(folded, x)
    assert float((expected - actual).abs().max() / expected.abs().max()) <= 1e-9


def test_units_the_cost_model_prices_slower_are_never_chosen():
    model, x = _small()
    protected = "features_2_conv_5"
    cost = OpCount(protected=[protected])
    result = linearize(model, x, [x], budget=1e9, cost=cost, progress=False, exact_passes=None, max_unit_size=2)
    slower = [u for u in result.report.units if protected in u.activations]
    assert slower and all(u.gain_s < 0 and not u.chosen for u in slower)
    assert result.report.chosen                                  # others were free to go
    names = {n.name for n in result.module.graph.nodes}
    assert protected in names


@pytest.mark.parametrize("mode", ["ilp", "greedy"])
def test_selection_respects_the_importance_budget(mode):
    model = randomize_bn(Chain(), seed=4)
    x = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    full = linearize(model, x, [x], budget=1e9, mode="ilp", cost=OpCount(), progress=False, exact_passes=None)
    imps = sorted(u.importance for u in full.report.units)
    budget = imps[0] * 1.01
    result = linearize(model, x, [x], budget=budget, mode=mode, cost=OpCount(), progress=False, exact_passes=None)
    assert sum(u.importance for u in result.report.chosen) <= budget
    assert result.report.chosen


def test_latency_target_mode_meets_the_predicted_target():
    model, x = _small()
    result = linearize(model, x, [x], latency_target=0.9, cost=OpCount(), progress=False, exact_passes=None,
                       max_unit_size=2)
    rep = result.report
    assert rep.predicted_latency_s <= 0.9 * rep.baseline_latency_s + 1e-12
    assert rep.final_latency_s <= rep.predicted_latency_s + 1e-12
    with pytest.raises(PassError, match="Relax the latency target"):
        linearize(model, x, [x], latency_target=0.01, cost=OpCount(), progress=False, exact_passes=None,
                  max_unit_size=1)


def test_student_before_finetuning_is_the_linearised_network():
    model = randomize_bn(Chain(), seed=5).double()
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    result = linearize(model, x, [x], budget=1e9, cost=OpCount(), progress=False, exact_passes=None,
                       relocate_padding=False)
    removed = result.removed
    assert removed
    reference = _run(linearise(hant.trace(model, x), removed), x)
    assert torch.allclose(_run(result.module, x), reference, rtol=1e-9, atol=1e-12)
    assert torch.allclose(_run(result.linearised, x), reference, rtol=1e-9, atol=1e-12)


def test_a_network_prepared_for_tuning_folds_exactly_with_the_head():
    """Every activation of the digits network removed (the head's too): the prepared network carries the
    relocated padding already, so folding it after (here: without) fine-tuning is exact, down to one
    Linear for the head, and it matches linearize's own prepared network for the same activations."""
    model, x = _small()
    model, x = model.double(), x.double()
    gm = hant.trace(model, x)
    every = [n.name for n in gm.graph.nodes if activation_of(n) is not None]
    prepared = prepare_for_tuning(linearise(gm, every), OpCount(), (x,))
    folded = fold_chains(prepared, OpCount(), check_inputs=(x,))
    assert torch.allclose(_run(folded, x), _run(prepared, x), rtol=1e-9, atol=1e-12)
    assert not any(activation_of(n) for n in folded.graph.nodes)
    assert sum(op_kind(n) in ("conv", "linear") for n in folded.graph.nodes) < \
        sum(op_kind(n) in ("conv", "linear") for n in prepared.graph.nodes)
    result = linearize(model, x, [x], budget=1e9, cost=OpCount(), progress=False)   # a budget that removes all
    assert sorted(result.removed) == sorted(every)
    assert torch.allclose(_run(result.linearised, x), _run(prepared, x), rtol=1e-9, atol=1e-12)


def test_the_registered_passes_run_under_a_context():
    model = randomize_bn(Chain(), seed=6)
    x = torch.randn(2, 4, 8, 8)
    gm = hant.trace(model, x)
    ctx = PassContext(cost=OpCount(), check_inputs=(x,), options={"budget": 1e9, "exact_passes": None})
    result = RemoveNonlinearity(ctx)(gm)
    assert result.modified
    assert {d.action for d in ctx.decisions} <= {"applied", "not_chosen"} and ctx.decisions
    relocate_ctx = PassContext(cost=OpCount())
    relocated = RelocatePadding(relocate_ctx)(hant.trace(model, x))
    assert relocated.modified and any(d.action == "applied" for d in relocate_ctx.decisions)
    with pytest.raises(PassError, match="exactly one of"):
        RemoveNonlinearity(PassContext(cost=OpCount(), check_inputs=(x,)))(hant.trace(model, x))
