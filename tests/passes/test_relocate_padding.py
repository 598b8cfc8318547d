"""relocate_padding across residual blocks: element chains, exact and relocated merges, the padding ring."""

import torch
import torch.nn as nn

import hant
from hant.cost_models import Cost, CostReport
from hant.graphs.ops import add_of, conv_of, op_kind
from hant.passes.relocate_padding import Residual, element_chains, affine_view, merge, plan_chains
from hant.passes.remove_nonlinearity import find_units, fold_chains, linearise

from hant.tools.digits import DigitsMobileNetV2
from helpers import randomize_bn


class OpCount:
    """1 us per op: every merge that removes ops is cheaper."""
    name = "opcount"

    def node_cost(self, node):
        return Cost(latency_s=1e-6, macs=1)

    def graph_cost(self, gm):
        nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output", "get_attr")]
        return CostReport("opcount", [], Cost(latency_s=1e-6 * len(nodes)))


class StemBlock(nn.Module):
    """stem conv -> BN -> [residual: k x k grouped conv -> BN -> 1x1 conv -> BN, + x] -> 1x1 conv."""

    def __init__(self, k: int, c: int = 6):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(2, c, k, padding=k // 2), nn.BatchNorm2d(c)
        self.dw, self.bn1 = nn.Conv2d(c, c, k, padding=k // 2, groups=c), nn.BatchNorm2d(c)
        self.pw, self.bn2 = nn.Conv2d(c, c, 1), nn.BatchNorm2d(c)
        self.out = nn.Conv2d(c, 3, 1)

    def forward(self, x):
        y = self.bn0(self.stem(x))
        return self.out(y + self.bn2(self.pw(self.bn1(self.dw(y)))))


def _model(k, dtype=torch.float64):
    torch.manual_seed(0)
    model = randomize_bn(StemBlock(k), seed=1).to(dtype)
    x = torch.randn(2, 2, 12, 12, dtype=dtype, generator=torch.Generator().manual_seed(2))
    return model, x


def _kinds(gm):
    return [op_kind(n) for n in gm.graph.nodes]


def test_element_chains_take_a_residual_block_as_one_element():
    model, x = _model(1)
    gm = hant.trace(model, x)
    chains = element_chains(gm, lambda n: affine_view(n) is not None)
    assert len(chains) == 1
    chain = chains[0]
    blocks = [e for e in chain if isinstance(e, Residual)]
    assert len(blocks) == 1 and add_of(blocks[0].add) is not None
    assert [n.name for n in blocks[0].nodes] == ["dw", "bn1", "pw", "bn2"]
    assert chain[0].name == "stem" and chain[-1].name == "out"


def test_merge_across_a_residual_block_is_exact_when_no_padding_moves():
    for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 1e-4)):
        model, x = _model(1, dtype)
        gm = hant.trace(model, x)
        plan = plan_chains(gm, OpCount(), relocate=False)
        assert len(plan.segments) == 1 and plan.segments[0].elements and not plan.segments[0].relocated
        merge(gm, plan)
        assert _kinds(gm).count("conv") == 1 and "add" not in _kinds(gm)
        with torch.no_grad():
            expected, actual = model(x), gm(x)
        assert float((expected - actual).abs().max() / expected.abs().max()) <= tol


def test_relocated_merge_across_a_residual_block_changes_only_the_border_ring():
    model, x = _model(3)
    gm = hant.trace(model, x)
    exact = plan_chains(gm, OpCount(), relocate=False).segments
    assert not any({"stem", "dw"} <= {n.name for n in s.nodes} for s in exact)   # that merge moves padding
    plan = plan_chains(gm, OpCount())
    assert len(plan.segments) == 1 and plan.segments[0].relocated
    merge(gm, plan)
    convs = [conv_of(n) for n in gm.graph.nodes if conv_of(n) is not None]
    assert len(convs) == 1 and convs[0].kernel_size == (5, 5) and convs[0].padding == (2, 2)
    expected, actual = model(x).detach(), gm(x).detach()
    ring = 1                     # the block's own padding moved to the stem: a one-pixel ring changes
    inner = (slice(None), slice(None), slice(ring, -ring), slice(ring, -ring))
    assert torch.allclose(expected[inner], actual[inner], rtol=0, atol=1e-9 * float(expected.abs().max()))
    assert float((expected - actual).abs().max()) > 1e-3


def test_max_padding_fraction_refuses_a_wide_relocated_ring():
    model, x = _model(3)                       # 12x12 input: 1/16 allows a 1-pixel ring, the merge needs 2
    gm = hant.trace(model, x)
    narrow = plan_chains(gm, OpCount(), max_padding_fraction=1 / 16)
    spans = lambda plan: any({"stem", "dw"} <= {n.name for n in s.nodes} for s in plan.segments)  # noqa: E731
    assert not spans(narrow) and narrow.segments             # the block still merges, on its own
    assert spans(plan_chains(gm, OpCount(), max_padding_fraction=1 / 6))


def test_units_span_the_stem_activation_and_the_first_block_and_their_removal_folds_them():
    torch.manual_seed(0)
    model = randomize_bn(DigitsMobileNetV2(), seed=0).eval()
    x = torch.randn(1, 1, 32, 32)
    gm = hant.trace(model, x)
    units = find_units(gm)
    assert ("features_0_2", "features_1_conv_2") in units
    lin = linearise(gm, ["features_0_2", "features_1_conv_2"])
    folded = fold_chains(lin, OpCount(), exact_passes=None, check_inputs=(x,))
    names = [n.name for n in folded.graph.nodes]
    assert "add" not in names                          # the first block's residual went into the merged conv
    stem = conv_of(next(n for n in folded.graph.nodes if conv_of(n) is not None))
    assert stem.kernel_size == (5, 5) and stem.in_channels == 1


def test_linearised_student_folds_exactly_after_finetuning_when_units_span_residual_blocks():
    from hant.passes.remove_nonlinearity import linearize

    torch.manual_seed(0)
    model = randomize_bn(DigitsMobileNetV2(), seed=0).double().eval()
    x = torch.randn(2, 1, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    result = linearize(model, x, [x], budget=1e9, cost=OpCount(), exact_passes=None, max_unit_size=2,
                       progress=False)
    assert any(u.chosen and "features_0_2" in u.activations and "features_1_conv_2" in u.activations
               for u in result.report.units)
    lin = result.linearised
    assert "add" not in {n.name for n in lin.graph.nodes}       # the spanning merge is done already
    with torch.no_grad():
        for p in lin.parameters():                              # stands in for fine-tuning
            p.mul_(1.05)
        folded = fold_chains(lin, OpCount(), exact_passes=None, check_inputs=(x,))
        expected, actual = lin(x), folded(x)
    assert float((expected - actual).abs().max() / expected.abs().max()) <= 1e-9
