"""cleanup: no-op nodes bypassed exactly, copies kept where layout or aliasing matters, dead code and unused
submodules/tensors removed."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from helpers import max_rel_error

import hant
from hant.graphs.ops import is_identity_like
from hant.passes import PassManager
from hant.passes.cleanup import Cleanup


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


class NoOps(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.identity, self.drop, self.drop2d = nn.Identity(), nn.Dropout(0.5), nn.Dropout2d(0.2)

    def forward(self, x):
        y = self.drop2d(self.identity(self.conv(x)))
        y = F.dropout(y, 0.3, training=False) + torchvision.ops.stochastic_depth(y, 0.2, "row", training=False)
        return self.drop(y.detach())


def cleanup(model, x):
    return PassManager(["cleanup"], cost=None, check=x, rtol=0.0, atol=0.0)(hant.trace(model, x))


def test_no_ops_are_removed_exactly():
    model, x = NoOps().eval(), torch.randn(2, 3, 8, 8)
    result = cleanup(model, x)
    gm = result.graph_module
    assert not any(is_identity_like(n) for n in gm.graph.nodes), gm.graph
    assert torch.equal(model(x), gm(x))
    assert [type(m) for m in gm.modules()] == [type(gm), nn.Conv2d]
    assert len(result.report.decisions_of("cleanup", "applied")) == 5  # stochastic_depth(training=False) is not traced


def test_train_mode_dropout_stays():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)).eval()
    model[1].train()
    gm = hant.trace(model, torch.randn(2, 4))
    result = PassManager(["cleanup"], cost=None)(gm)  # no check: train dropout is random
    assert not result.modified and isinstance(result.graph_module.get_submodule("1"), nn.Dropout)


class ChannelShuffle(nn.Module):
    def forward(self, x):
        n, c, h, w = x.shape
        y = x.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous()
        return y.view(n, c, h, w)


class CloneThenInPlace(nn.Module):
    def forward(self, x):
        y = x.clone()
        y.add_(1.0)
        return x * y


class ReturnsClone(nn.Module):
    def forward(self, x):
        return x.clone()


@pytest.mark.parametrize("module", [ChannelShuffle(), CloneThenInPlace(), ReturnsClone()])
def test_copies_that_matter_are_kept(module):
    x = torch.randn(1, 4, 3, 3)
    result = cleanup(module, x)
    assert not result.modified
    assert torch.equal(module(x.clone()), result.graph_module(x.clone()))


def test_shufflenet_survives_cleanup_exactly():
    model = torchvision.models.shufflenet_v2_x0_5(num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    result = cleanup(model, x)
    assert not result.report.rolled_back
    assert torch.equal(model(x), result.graph_module(x))


def test_dead_code_and_unused_submodules_and_tensors_are_removed():
    model, x = NoOps().eval(), torch.randn(2, 3, 8, 8)
    gm = hant.trace(model, x)
    gm.add_module("spare", nn.Linear(3, 3))
    gm.register_buffer("spare_buffer", torch.ones(3))
    gm.register_parameter("spare_weight", nn.Parameter(torch.ones(2)))
    with gm.graph.inserting_after(next(iter(gm.graph.nodes))):
        gm.graph.call_function(torch.relu, (next(iter(gm.graph.nodes)),))  # dead
    gm.recompile()
    result = PassManager(["cleanup"], cost=None, check=x)(gm)
    out = result.graph_module
    assert not hasattr(out, "spare") and not hasattr(out, "spare_buffer") and not hasattr(out, "spare_weight")
    assert not any(n.op == "call_function" and n.target is torch.relu for n in out.graph.nodes)
    assert hasattr(gm, "spare")  # the manager's input is untouched


def test_exported_graphs_lose_unused_get_attrs():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    x = torch.randn(1, 3, 6, 6)
    result = PassManager(["cleanup"], cost=None, check=x)(hant.trace(model, x, method="export"))
    names = {name for name, _ in result.graph_module.named_buffers()}
    assert not any(name.endswith("num_batches_tracked") for name in names)
    assert max_rel_error(model(x), result.graph_module(x)) == 0.0


def test_cleanup_is_idempotent():
    model, x = NoOps().eval(), torch.randn(2, 3, 8, 8)
    once = cleanup(model, x).graph_module
    result = Cleanup()(once)
    assert not result.modified and result.graph_module.code == once.code


def test_cleanup_that_finds_nothing_does_not_recompile():
    torch.manual_seed(0)
    gm = hant.trace(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), torch.randn(1, 3, 8, 8))
    forward = type(gm).forward
    result = Cleanup()(gm)
    assert not result.modified and type(result.graph_module).forward is forward
    gm.add_module("unused", nn.Linear(2, 2))
    result = Cleanup()(gm)
    assert result.modified and not hasattr(gm, "unused") and type(gm).forward is not forward
