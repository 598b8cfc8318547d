"""Training-time re-parameterisable blocks (RepVGG, ACNet, DBB, MobileOne) collapse to ONE conv.

Each block has BatchNorm in its branches with randomised statistics, so every fold does
real arithmetic. The blocks go through fuse_bn then fold_linear under the PassManager
(which proves each pass on the inputs and would roll a broken one back), and through
fold_linear alone (which treats eval BatchNorm as a linear op itself).
"""

from __future__ import annotations

import pytest
import torch
from helpers import max_rel_error, randomize_bn
from linear_fixtures import (
    ACNetBlock, DBBBlock, MacCost, MobileOneDepthwise, MobileOnePointwise, RepVGGBlock, compute_nodes,
)

import hant
from hant.graphs.ops import conv_of
from hant.passes import PassManager

BLOCKS = {
    "repvgg": lambda: RepVGGBlock(8, 8),
    "repvgg_stride2_widen": lambda: RepVGGBlock(6, 12, stride=2),
    "repvgg_grouped": lambda: RepVGGBlock(8, 8, groups=2),
    "acnet": lambda: ACNetBlock(6, 10),
    "acnet_stride2": lambda: ACNetBlock(6, 6, stride=2),
    "dbb": lambda: DBBBlock(6, 8, k=3),
    "dbb_5x5_stride2": lambda: DBBBlock(6, 6, k=5, stride=2, internal=4),
    "mobileone_depthwise": lambda: MobileOneDepthwise(8, branches=3),
    "mobileone_depthwise_stride2": lambda: MobileOneDepthwise(8, branches=2, stride=2),
    "mobileone_pointwise": lambda: MobileOnePointwise(8, 8, branches=3),
}
PIPELINES = {"fuse_bn+fold_linear": ["fuse_bn", "fold_linear"], "fold_linear": ["fold_linear"]}


def _collapse(name: str, pipeline: list[str], dtype: torch.dtype, seed: int = 0):
    torch.manual_seed(seed)
    model = randomize_bn(BLOCKS[name](), seed + 1).to(dtype)
    x = torch.randn(2, model_in_channels(model), 11, 11, dtype=dtype)
    gm = hant.trace(model, x)
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    result = PassManager(pipeline, cost=MacCost(), check=x, rtol=tol, atol=0.0)(gm)
    assert not result.report.rolled_back, result.report
    with torch.no_grad():
        error = max_rel_error(model(x), result.graph_module(x))
    return model, result, error


def model_in_channels(model) -> int:
    return next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d)).in_channels


@pytest.mark.parametrize("pipeline", list(PIPELINES))
@pytest.mark.parametrize("name", list(BLOCKS))
def test_block_collapses_to_one_conv_float64(name, pipeline):
    model, result, error = _collapse(name, PIPELINES[pipeline], torch.float64)
    assert compute_nodes(result.graph_module) == ["conv"]
    assert error <= 1e-9
    applied = result.report.decisions_of("fold_linear", "applied")
    assert applied and "linear ops ->" in applied[-1].reason


@pytest.mark.parametrize("name", ["repvgg", "acnet", "dbb", "mobileone_depthwise"])
def test_block_collapses_float32(name):
    _, result, error = _collapse(name, ["fuse_bn", "fold_linear"], torch.float32, seed=3)
    assert compute_nodes(result.graph_module) == ["conv"]
    assert error <= 1e-5


def test_mobileone_depthwise_stays_depthwise_and_kernel_is_centred():
    _, result, _ = _collapse("mobileone_depthwise", ["fold_linear"], torch.float64)
    conv = next(conv_of(n) for n in result.graph_module.graph.nodes if conv_of(n) is not None)
    assert conv.groups == 8 and conv.kernel_size == (3, 3) and conv.padding == (1, 1)


def test_acnet_folds_into_a_3x3_and_user_model_is_untouched():
    torch.manual_seed(0)
    model = randomize_bn(ACNetBlock(4, 4), 5).double()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(1, 4, 7, 7, dtype=torch.float64)
    result = PassManager(["fuse_bn", "fold_linear"], cost=MacCost(), check=x, rtol=1e-9, atol=0)(hant.trace(model, x))
    conv = next(conv_of(n) for n in result.graph_module.graph.nodes if conv_of(n) is not None)
    assert conv.kernel_size == (3, 3) and conv.padding == (1, 1)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_collapsed_block_has_no_leftover_parameters():
    torch.manual_seed(0)
    model = randomize_bn(RepVGGBlock(4, 4), 2).double()
    x = torch.randn(1, 4, 6, 6, dtype=torch.float64)
    result = PassManager(["fuse_bn", "fold_linear"], cost=MacCost(), check=x, rtol=1e-9, atol=0)(hant.trace(model, x))
    names = [name for name, _ in result.graph_module.named_parameters()]
    assert len(names) == 2 and all(name.endswith(("weight", "bias")) for name in names)
    assert not list(result.graph_module.named_buffers())
