"""fuse_bn: BN folded after and before convs (all dims, transposed, grouped, padded) and linears, exactly;
every refusal with its reason; traced and exported graphs; new weights in new modules."""

import pytest
import torch
import torch.nn as nn
from helpers import max_rel_error, randomize_bn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hant
from hant.passes import PassManager
from hant.passes.fuse_bn import FuseBatchNorm

BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
CONV = {(1, False): nn.Conv1d, (2, False): nn.Conv2d, (3, False): nn.Conv3d,
        (1, True): nn.ConvTranspose1d, (2, True): nn.ConvTranspose2d, (3, True): nn.ConvTranspose3d}
SPATIAL = {1: (11,), 2: (9, 8), 3: (5, 6, 4)}


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def fold(model, x, method="symbolic", rtol=1e-9, atol=0.0):
    gm = hant.trace(model, x, method=method)
    return PassManager(["fuse_bn"], cost=None, check=x, rtol=rtol, atol=atol)(gm)


def graph_has_bn(gm):
    from hant.graphs.ops import batchnorm_of
    return any(batchnorm_of(n) is not None for n in gm.graph.nodes)


class Seq(nn.Sequential):
    pass


def conv_bn(dims, transposed, groups=2, bias=True, **kw):
    return Seq(CONV[(dims, transposed)](4, 6, 3, groups=groups, bias=bias, **kw), BN[dims](6))


def bn_conv(dims, transposed, groups=2, **kw):
    return Seq(BN[dims](4), CONV[(dims, transposed)](4, 6, 3, groups=groups, **kw))


CASES = {
    **{f"conv{d}d_bn": (lambda d=d: conv_bn(d, False), d) for d in (1, 2, 3)},
    **{f"convT{d}d_bn": (lambda d=d: conv_bn(d, True, stride=2, padding=1, output_padding=1), d) for d in (1, 2, 3)},
    "conv_nobias_bn": (lambda: conv_bn(2, False, bias=False, stride=2, dilation=2), 2),
    **{f"bn_conv{d}d_unpadded": (lambda d=d: bn_conv(d, False, stride=2), d) for d in (1, 2, 3)},
    **{f"bn_conv{d}d_zero_padded": (lambda d=d: bn_conv(d, False, padding=1, stride=2), d) for d in (1, 2, 3)},
    "bn_conv_reflect_padded": (lambda: bn_conv(2, False, padding=1, padding_mode="reflect"), 2),
    "bn_conv_circular_padded": (lambda: bn_conv(2, False, padding=1, padding_mode="circular"), 2),
    **{f"bn_convT{d}d": (lambda d=d: bn_conv(d, True, stride=2, padding=1), d) for d in (1, 2, 3)},
    "bn_conv_same_dilated": (lambda: bn_conv(2, False, padding="same", dilation=2, groups=1), 2),
    "linear_bn": (lambda: Seq(nn.Linear(5, 7), nn.BatchNorm1d(7)), 0),
    "bn_linear": (lambda: Seq(nn.BatchNorm1d(5), nn.Linear(5, 7)), 0),
    "bn_conv_bn_chain": (lambda: Seq(nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6),
                                     nn.BatchNorm2d(6)), 2),
}


EXPORT_PADS_SEPARATELY = {"bn_conv_reflect_padded", "bn_conv_circular_padded"}


def case_input(dims, dtype, batch=2):
    gen = torch.Generator().manual_seed(1)
    shape = (batch, 5) if dims == 0 else (batch, 4, *SPATIAL[dims])
    return torch.randn(shape, generator=gen, dtype=dtype)


@pytest.mark.parametrize("method", ["symbolic", "export"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_fold_is_exact_float64_and_removes_every_bn(case, method):
    build, dims = CASES[case]
    model = randomize_bn(build(), seed=3).double()
    x = case_input(dims, torch.float64)
    result = fold(model, x, method)
    assert not result.report.rolled_back
    assert max_rel_error(model(x), result.graph_module(x)) <= 1e-12
    if method == "export" and case in EXPORT_PADS_SEPARATELY:
        # torch.export spells reflect/circular padding as a separate pad op: BN -> pad -> conv is not adjacent
        (decision,) = result.report.decisions
        assert decision.action == "refused" and "not a conv or linear" in decision.reason
        return
    assert result.modified and not graph_has_bn(result.graph_module), str(result.report)
    assert all(d.action == "applied" for d in result.report.decisions)


@pytest.mark.parametrize("case", ["conv2d_bn", "convT2d_bn", "bn_conv2d_zero_padded", "bn_convT2d", "linear_bn"])
def test_fold_is_exact_float32(case):
    build, dims = CASES[case]
    model = randomize_bn(build(), seed=4)
    x = case_input(dims, torch.float32)
    result = fold(model, x, rtol=1e-5, atol=0.0)
    assert not graph_has_bn(result.graph_module)
    assert max_rel_error(model(x), result.graph_module(x)) <= 1e-5


def test_zero_padded_bn_conv_gets_a_bias_map_for_the_traced_size():
    model = randomize_bn(bn_conv(2, False, padding=1), seed=5).double()
    x = case_input(2, torch.float64)
    result = fold(model, x)
    maps = [name for name, _ in result.graph_module.named_buffers() if name.endswith("bias_map")]
    assert len(maps) == 1
    assert tuple(result.graph_module.get_buffer(maps[0]).shape) == (1, 6, 9, 8)
    assert "bias map" in result.report.decisions[0].reason
    # without the map the borders would be wrong: the folded conv alone is not exact
    conv = next(m for m in result.graph_module.modules() if isinstance(m, nn.Conv2d))
    interior_only = conv(x) + result.graph_module.get_buffer(maps[0])[:, :, 1:2, 1:2]
    assert max_rel_error(model(x), interior_only) > 1e-3


def test_unpadded_bn_conv_folds_into_the_bias_without_a_map():
    model = randomize_bn(bn_conv(2, False, stride=2), seed=5).double()
    result = fold(model, case_input(2, torch.float64))
    assert not [n for n, _ in result.graph_module.named_buffers() if "bias_map" in n]
    assert sum(1 for _ in result.graph_module.modules()) == 2  # the GraphModule and one conv


def test_bn_feeding_two_convs_is_folded_into_each():
    class Fork(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn, self.a, self.b = nn.BatchNorm2d(4), nn.Conv2d(4, 3, 1), nn.Conv2d(4, 5, 3, padding=1)

        def forward(self, x):
            y = self.bn(x)
            return self.a(y), self.b(y)

    model = randomize_bn(Fork(), 6).double()
    x = case_input(2, torch.float64)
    result = fold(model, x)
    assert not graph_has_bn(result.graph_module)
    for want, got in zip(model(x), result.graph_module(x)):
        assert max_rel_error(want, got) <= 1e-12
    assert len(result.report.decisions_of("fuse_bn", "applied")) == 2


# ------------------------------------------------------------ refusals


def test_refuses_train_mode_bn():
    model = randomize_bn(conv_bn(2, False), 0)
    model[1].train()
    gm = hant.trace(model, case_input(2, torch.float32))
    result = PassManager(["fuse_bn"], cost=None)(gm)
    assert not result.modified and graph_has_bn(result.graph_module)
    (decision,) = result.report.decisions
    assert decision.action == "refused" and "training mode" in decision.reason


def test_refuses_bn_without_running_stats():
    model = Seq(nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6, track_running_stats=False)).eval()
    x = case_input(2, torch.float32)
    result = fold(model, x, rtol=1e-5)
    assert not result.modified
    (decision,) = result.report.decisions
    assert decision.action == "refused" and "track_running_stats=False" in decision.reason


def test_refuses_conv_whose_output_has_other_users_and_no_layer_after():
    class TwoUsers(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return torch.relu(self.bn(y)) + y

    model = randomize_bn(TwoUsers(), 1)
    x = case_input(2, torch.float32)
    result = fold(model, x, rtol=1e-5)
    assert not result.modified
    (decision,) = result.report.decisions
    assert decision.action == "refused"
    assert "output has 2 users" in decision.reason and "not a conv or linear" in decision.reason


def test_refuses_linear_bn_on_a_3d_tensor():
    model = randomize_bn(Seq(nn.Linear(6, 4), nn.BatchNorm1d(4)), 2)  # BN1d channels = dim 1 = 4 here
    x = torch.randn(2, 4, 6)
    result = fold(model, x, rtol=1e-5)
    assert not result.modified
    assert "not 2-D" in result.report.decisions[0].reason


def test_shared_weights_are_cloned_for_the_folded_site_only():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.conv(x)) * self.conv(x)

    model = randomize_bn(Shared(), 3).double()
    x = case_input(2, torch.float64)
    result = fold(model, x)
    gm = result.graph_module
    assert not graph_has_bn(gm)
    assert max_rel_error(model(x), gm(x)) <= 1e-12
    (decision,) = result.report.decisions
    assert decision.action == "applied" and "shared with 1 other call site" in decision.reason
    assert torch.equal(gm.conv.weight, model.conv.weight)  # the other call site keeps the original weights


def test_new_weights_never_alias_the_callers_tensors():
    model = randomize_bn(conv_bn(2, False), 0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gm = hant.trace(model, case_input(2, torch.float32))
    result = PassManager(["fuse_bn"], cost=None)(gm)
    caller = {t.data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    caller |= {t.data_ptr() for t in list(gm.parameters()) + list(gm.buffers())}
    assert not any(p.data_ptr() in caller for p in result.graph_module.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert graph_has_bn(gm)  # the manager's input is untouched too


def test_fuse_bn_is_idempotent():
    model = randomize_bn(Seq(nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                             nn.BatchNorm2d(6)), 2)
    x = case_input(2, torch.float32)
    once = fold(model, x, rtol=1e-5).graph_module
    twice = PassManager(["fuse_bn"], cost=None, check=x)(once)
    assert not twice.modified
    assert twice.graph_module.code == once.code


def test_pass_runs_alone_as_a_torch_fx_pass():
    model = randomize_bn(conv_bn(2, False), 0)
    gm = hant.trace(model, case_input(2, torch.float32))
    result = FuseBatchNorm()(gm)  # torch.fx PassBase protocol, default context
    assert result.modified and not graph_has_bn(result.graph_module)


# ------------------------------------------------------------ generated conv geometries


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dims=st.sampled_from([1, 2]), transposed=st.booleans(), before=st.booleans(),
       kernel=st.integers(1, 3), stride=st.integers(1, 2), padding=st.integers(0, 2), dilation=st.integers(1, 2),
       groups=st.sampled_from([1, 2]), bias=st.booleans(), size=st.integers(5, 8),
       mode=st.sampled_from(["zeros", "zeros", "reflect", "replicate"]))
def test_generated_conv_bn_pairs_fold_exactly_or_are_refused(dims, transposed, before, kernel, stride, padding,
                                                             dilation, groups, bias, size, mode):
    kw = dict(stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias)
    if transposed:
        kw["output_padding"] = min(stride, dilation) - 1
    elif padding > 0:
        kw["padding_mode"] = mode
        kw["padding"] = min(padding, size - 1)
    conv = CONV[(dims, transposed)](4, 6, kernel, **kw)
    model = Seq(BN[dims](4), conv) if before else Seq(conv, BN[dims](6))
    model = randomize_bn(model, seed=size).double()
    x = torch.randn(1, 4, *([size] * dims), dtype=torch.float64)
    result = fold(model, x)
    assert not result.report.rolled_back, str(result.report)
    assert max_rel_error(model(x), result.graph_module(x)) <= 1e-9
    assert not graph_has_bn(result.graph_module) or result.report.decisions_of("fuse_bn", "refused")


def test_exported_resnet18_folds_every_bn_exactly():
    import torchvision

    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.resnet18(num_classes=10), 5)
    x = torch.randn(1, 3, 32, 32)
    gm = hant.trace(model, x, method="export")  # ATen graph, get_attr weights
    result = PassManager(["fuse_bn"], cost=None, check=x, rtol=1e-4, atol=1e-5)(gm)
    assert not graph_has_bn(result.graph_module)
    assert len(result.report.decisions_of("fuse_bn", "applied")) == 20
    assert max_rel_error(model(x), result.graph_module(x)) <= 1e-5
