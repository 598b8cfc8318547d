"""The cost-model registry: built-in specs, errors, user models and objects passed through."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import hant
from hant.cost_models import (
    Cost, CostModel, CostModelError, CostReport, FlopsModel, NodeSumCostModel, RooflineModel, available, base, get,
    register,
)


@pytest.fixture
def isolated_registry(monkeypatch):
    """A copy of the registry for one test, so user registrations do not leak into others."""
    monkeypatch.setattr(base, "_FACTORIES", dict(base._FACTORIES))


def test_builtin_specs_are_registered_with_help():
    specs = available()
    assert {"flops", "roofline"} <= set(specs)
    assert "MACs" in specs["flops"]
    for device in ("cpu", "a100", "h100", "jetson-orin", "raspi4"):
        assert device in specs["roofline"]


def test_get_flops():
    model = get("flops")
    assert isinstance(model, FlopsModel) and model.name == "flops" and isinstance(model, CostModel)


def test_flops_takes_no_argument():
    with pytest.raises(CostModelError, match="'flops' takes no argument"):
        get("flops:fast")


@pytest.mark.parametrize("spec, device", [("roofline", "cpu"), ("roofline:cpu", "cpu"), ("roofline:h100", "h100"),
                                          ("roofline:jetson-orin", "jetson-orin")])
def test_get_roofline(spec, device):
    model = get(spec)
    assert isinstance(model, RooflineModel) and isinstance(model, CostModel)
    assert model.device.name == device and model.name == f"roofline:{device}"


def test_each_get_builds_a_fresh_model():
    """Calibrating one roofline must not change the next one the registry hands out."""
    first = get("roofline:a100")
    first.calibrate([("conv", 10**9, 10**6, 1e-3), ("conv", 10**6, 10**4, 1e-5)])
    assert get("roofline:a100").constants_for("conv") != first.constants_for("conv")


def test_unknown_spec_lists_known_specs():
    with pytest.raises(CostModelError) as err:
        get("magic:fast")
    message = str(err.value)
    assert "'magic:fast'" in message
    for prefix, help_line in available().items():
        assert prefix in message and help_line in message


def test_unknown_roofline_device_lists_presets():
    with pytest.raises(CostModelError, match="raspi4"):
        get("roofline:abacus")


class ParamCount(NodeSumCostModel):
    """A user's model: latency proportional to the parameters a node owns."""

    def __init__(self, seconds_per_param: float):
        self.seconds_per_param = seconds_per_param
        self.name = f"params:{seconds_per_param}"
        self._counter = FlopsModel()

    def node_cost(self, node):
        counted = self._counter.node_cost(node)
        return Cost(latency_s=counted.params * self.seconds_per_param, params=counted.params)


def test_user_registered_model(isolated_registry):
    register("params", lambda arg: ParamCount(float(arg or 1e-9)), "latency from parameter count")
    assert available()["params"] == "latency from parameter count"
    model = get("params:2e-9")
    assert isinstance(model, ParamCount) and model.seconds_per_param == 2e-9
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    report = model.graph_cost(hant.trace(net, torch.randn(1, 4)))
    assert report.total.params == 4 * 3 + 3 + 3 * 2 + 2
    assert report.latency_s == pytest.approx(23 * 2e-9)
    with pytest.raises(CostModelError) as err:
        get("nope")
    assert "params (latency from parameter count)" in str(err.value)


def test_user_registration_replaces_a_prefix(isolated_registry):
    register("flops", lambda arg: ParamCount(1.0), "replaced")
    assert isinstance(get("flops"), ParamCount)


def test_user_registration_does_not_leak():
    assert "params" not in available() and isinstance(get("flops"), FlopsModel)


def test_model_objects_pass_through():
    flops = FlopsModel()
    assert get(flops) is flops

    class DuckTyped:
        name = "duck"

        def node_cost(self, node):
            return Cost()

        def graph_cost(self, gm):
            return CostReport(self.name)

    duck = DuckTyped()
    assert get(duck) is duck


@pytest.mark.parametrize("not_a_model", [42, None, object()])
def test_objects_without_the_protocol_are_refused(not_a_model):
    with pytest.raises(CostModelError, match="node_cost/graph_cost"):
        get(not_a_model)


@pytest.mark.parametrize("enabled", [True, False])
def test_collector_paused_restores_the_collector_even_on_error(enabled):
    import gc

    from hant.cost_models.base import collector_paused

    was = gc.isenabled()
    (gc.enable if enabled else gc.disable)()
    try:
        with pytest.raises(RuntimeError):
            with collector_paused():
                assert not gc.isenabled()
                raise RuntimeError("inside")
        assert gc.isenabled() == enabled
    finally:
        (gc.enable if was else gc.disable)()
