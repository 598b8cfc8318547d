"""torch.compile(model, backend="hant"): exact passes on dynamo's graph, outputs unchanged."""

import pytest
import torch
import torch.nn as nn

from hant.graphs import batchnorm_of
from hant.errors import PassError
from hant.passes.compile_backend import freeze_parameters, hant_backend
from tests.helpers import randomize_bn


class ConvBnNet(nn.Module):
    """conv-BN-ReLU twice with a residual add and a linear head: BN folding has work to do."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = y + self.bn2(self.conv2(y))
        return self.fc(y.mean((2, 3)))


def _model(dtype):
    torch.manual_seed(0)
    return randomize_bn(ConvBnNet(), seed=1).eval().to(dtype)


def _capturing_backend(seen):
    def backend(gm, example_inputs):
        compiled = hant_backend(gm, example_inputs, options={"downstream": "eager"})
        seen.append(compiled.hant_graph_module)
        return compiled
    return backend


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, 1e-10)])
def test_compiled_outputs_match_and_batchnorm_is_folded(dtype, tol):
    torch._dynamo.reset()
    model = _model(dtype)
    x = torch.randn(2, 3, 12, 12, dtype=dtype)
    seen = []
    with torch.no_grad():
        expected = model(x)
        got = torch.compile(model, backend=_capturing_backend(seen))(x)
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
    assert seen, "the backend was never called"
    assert not any(batchnorm_of(n) for n in seen[0].graph.nodes), "BatchNorm should be folded into the convs"
    assert all(p.data_ptr() != q.data_ptr() for p in model.parameters() for q in seen[0].buffers())


def test_registered_name_runs_through_inductor():
    from hant.passes.compile_backend import register

    register()      # by hand, as a checkout whose package metadata is stale would; a no-op when done before
    torch._dynamo.reset()
    model = _model(torch.float32)
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend="hant")(x), model(x), rtol=1e-4, atol=1e-5)


def test_freeze_parameters_keeps_only_data_inputs():
    torch._dynamo.reset()
    model = _model(torch.float32)
    x = torch.randn(1, 3, 8, 8)
    captured = []

    def grab(gm, example_inputs):
        captured.append((gm, list(example_inputs)))
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=grab)(x)
    gm, inputs = captured[0]
    frozen, keep = freeze_parameters(gm, inputs)
    assert [inputs[i].shape for i in keep] == [x.shape]
    torch.testing.assert_close(frozen(*[inputs[i] for i in keep]), gm(*inputs))


def test_training_graph_is_left_alone_and_bad_option_is_refused():
    torch._dynamo.reset()
    model = _model(torch.float32)
    x = torch.randn(1, 3, 8, 8)
    out = torch.compile(model, backend=lambda g, e: hant_backend(g, e, options={"downstream": "eager"}))(x)
    out.sum().backward()                      # gradients still reach the (unfrozen) weights
    assert model.conv1.weight.grad is not None
    with pytest.raises(PassError, match="unknown option"):
        hant_backend(torch.fx.symbolic_trace(model), [x], options={"bogus": 1})


def test_entry_point_names_the_backend():
    from importlib.metadata import entry_points

    (point,) = [p for p in entry_points(group="torch_dynamo_backends") if p.name == "hant"]
    assert point.load() is hant_backend
