"""hant.trace: capture forms, the export fallback, errors that say what to do, the user's model untouched."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torchvision

import hant
from hant.errors import InputError, TraceError
from hant.graphs import conv_of, trace
from helpers import max_rel_error, randomize_bn


class DataDependent(nn.Module):
    """Branches on a tensor's value: neither symbolic tracing nor torch.export can capture it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        if y.sum() > 0:  # the data-dependent branch
            return y.relu()
        return -y


class WithDataDependentPart(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 3, 1)
        self.gate = DataDependent()
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.gate(self.stem(x)))


class ShapeDependent(nn.Module):
    """Branches on a shape: symbolic tracing fails, torch.export specialises and succeeds."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        if x.shape[-1] > 8:
            x = x[..., ::2]
        return self.bn(self.conv(x))


class Flagged(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x, flag: bool = True):
        if flag:  # branching on an argument: fixed with concrete_args
            return self.conv(x).relu()
        return self.conv(x)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}


X = torch.randn(2, 3, 16, 16)


def test_symbolic_is_the_canonical_form(capture):
    model, x, gm = capture("resnet18", "symbolic")
    assert trace(model, x).meta["hant_trace_method"] == "symbolic"  # what "auto" picks
    assert gm.meta["hant_trace_method"] == "symbolic"
    assert any(n.op == "call_module" and n.target == "layer1.0.conv1" for n in gm.graph.nodes)
    assert all("tensor_meta" in n.meta for n in gm.graph.nodes if n.op in ("placeholder", "call_module"))
    with torch.no_grad():
        assert max_rel_error(model(x), gm(x)) == 0.0


def test_shape_dependent_model_falls_back_to_export():
    model = randomize_bn(ShapeDependent())
    gm = trace(model, X)
    assert gm.meta["hant_trace_method"] == "export"
    assert not any(n.op == "call_module" and n.target == "conv" for n in gm.graph.nodes)
    assert sum(conv_of(n) is not None for n in gm.graph.nodes) == 1
    with torch.no_grad():
        assert max_rel_error(model(X), gm(X)) <= 1e-6


def test_method_export_forces_the_export_form(capture):
    model, x, gm = capture("resnet18", "export")
    assert gm.meta["hant_trace_method"] == "export"
    assert not any(n.op == "call_module" and n.target == "layer1.0.conv1" for n in gm.graph.nodes)
    with torch.no_grad():
        assert max_rel_error(model(x), gm(x)) <= 1e-6


def test_untraceable_model_names_the_line_and_the_fixes():
    with pytest.raises(TraceError) as info:
        trace(DataDependent(), X)
    message = str(info.value)
    assert "if y.sum() > 0:" in message and "test_trace.py:" in message
    assert "symbolic_trace failed" in message and "torch.export failed" in message
    assert "leaf_modules=" in message and "concrete_args=" in message


def test_leaf_modules_by_type_and_by_name_capture_the_untraceable_part():
    model = WithDataDependentPart().eval()
    with torch.no_grad():
        expected = model(X)
    for leaves in ([DataDependent], ["gate"]):
        gm = trace(model, X, leaf_modules=leaves)
        assert gm.meta["hant_trace_method"] == "symbolic"
        calls = [n.target for n in gm.graph.nodes if n.op == "call_module"]
        assert calls == ["stem", "gate", "head"]
        with torch.no_grad():
            assert torch.equal(gm(X), expected)
    with pytest.raises(TraceError):
        trace(model, X)


def test_concrete_args_fix_a_branching_argument():
    model = Flagged().eval()
    with pytest.raises(TraceError) as info:
        trace(model, X, method="symbolic")
    assert "if flag:" in str(info.value)
    gm = trace(model, X, concrete_args={"flag": False}, method="symbolic")
    with torch.no_grad():
        assert torch.equal(gm(X), model(X, flag=False))
    assert not torch.equal(gm(X), model(X, flag=True))


def test_bad_inputs_raise_input_error_with_the_models_message():
    model = torchvision.models.resnet18().eval()
    for method in ("auto", "symbolic", "export"):
        with pytest.raises(InputError) as info:
            trace(model, torch.randn(1, 1, 32, 32), method=method)
        message = str(info.value)
        assert "expected input[1, 1, 32, 32] to have 3 channels" in message, message
        assert "(1, 1, 32, 32)" in message
    with pytest.raises(InputError, match="tensor or a tuple"):
        trace(model, "not a tensor")


def test_unknown_method_and_non_module_are_trace_errors():
    with pytest.raises(TraceError, match="unknown trace method"):
        trace(nn.ReLU(), X, method="jit")
    with pytest.raises(TraceError, match="nn.Module"):
        trace(lambda x: x, X)


def test_hant_errors_are_hant_errors():
    assert issubclass(TraceError, hant.HantError) and issubclass(InputError, hant.HantError)


@pytest.mark.parametrize("method", ["symbolic", "export"])
def test_user_model_is_untouched(method):
    model = randomize_bn(torchvision.models.resnet18()).train()  # train mode: BN would update its stats
    before = _state(model)
    parameters = {name: p for name, p in model.named_parameters()}
    gm = trace(model, torch.randn(2, 3, 32, 32), method=method)
    after = _state(model)
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), f"{name} changed"
    assert model.training and all(m.training for m in model.modules())
    assert all(p is parameters[name] for name, p in model.named_parameters())
    user_storage = {p.data_ptr() for p in model.parameters()} | {b.data_ptr() for b in model.buffers()}
    assert not user_storage & {t.data_ptr() for t in list(gm.parameters()) + list(gm.buffers())}
    # the capture has the model's state too: shape propagation in train mode did not move the BN statistics
    traced = {**dict(gm.named_parameters()), **dict(gm.named_buffers())}
    assert traced.keys() == before.keys()
    for name, value in before.items():
        assert torch.equal(traced[name], value), f"traced {name} differs from the model's"


@pytest.mark.parametrize("method", ["symbolic", "export"])
def test_trace_with_outputs_returns_the_tracing_runs_outputs(method):
    from hant.graphs.trace import trace_with_outputs

    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.resnet18(), 3).eval()
    x = torch.randn(1, 3, 32, 32)
    gm, outputs = trace_with_outputs(model, x, method=method)
    with torch.no_grad():
        assert torch.equal(outputs, gm(x)) and max_rel_error(model(x), outputs) <= 1e-6
    assert all("tensor_meta" in n.meta for n in gm.graph.nodes if conv_of(n) is not None)
