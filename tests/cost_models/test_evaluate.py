"""Evaluation metrics on hand-computed inputs, spec splitting, and the comparison routine."""

import math

import pytest
import torch
import torch.nn as nn

from hant.cost_models import FlopsModel, RooflineModel
from hant.cost_models.evaluate import compare, measure_networks, metrics, resolve, split_specs
from hant.cost_models.measured import MeasuredModel, graph_key
from hant.cost_models.store import LatencyStore, Spread
from hant.errors import CostModelError
from hant.graphs import trace


# ------------------------------------------------------------------ metrics

def test_perfect_predictions():
    m = metrics([1e-3, 2e-3, 5e-3], [1e-3, 2e-3, 5e-3])
    assert m == {"n": 3, "rmse_ms": 0.0, "mape_pct": 0.0, "within10_pct": 100.0, "kendall_tau": 1.0,
                 "spearman_rho": 1.0}


def test_known_errors():
    # relative errors 0.1, 0, 0.1, 0.25: exactly 10 % counts as within
    m = metrics([1.1, 2.0, 3.3, 5.0], [1.0, 2.0, 3.0, 4.0])
    assert m["within10_pct"] == pytest.approx(75.0)
    assert m["mape_pct"] == pytest.approx(11.25, abs=1e-9)
    assert m["rmse_ms"] == pytest.approx(math.sqrt((0.01 + 0 + 0.09 + 1.0) / 4) * 1e3, rel=1e-12)
    assert m["kendall_tau"] == pytest.approx(1.0)


def test_rank_metrics_by_hand():
    # pairs (0,1) and (0,2) concordant, (1,2) discordant: tau = (2 - 1) / 3; rank differences 0,1,1: rho = 0.5
    m = metrics([1.0, 2.0, 3.0], [1.0, 3.0, 2.0])
    assert m["kendall_tau"] == pytest.approx(1 / 3, abs=1e-12)
    assert m["spearman_rho"] == pytest.approx(0.5, abs=1e-12)
    reversed_ = metrics([3.0, 2.0, 1.0], [1.0, 2.0, 3.0])
    assert reversed_["kendall_tau"] == pytest.approx(-1.0) and reversed_["spearman_rho"] == pytest.approx(-1.0)


def test_scores_only_rank():
    m = metrics([10, 20, 40], [1e-3, 2e-3, 3e-3], absolute=False)
    assert m["rmse_ms"] is None and m["mape_pct"] is None and m["within10_pct"] is None
    assert m["kendall_tau"] == pytest.approx(1.0)


def test_constant_prediction_does_not_rank():
    m = metrics([1.0, 1.0, 1.0], [1.0, 2.0, 3.0])
    assert math.isnan(m["kendall_tau"]) and math.isnan(m["spearman_rho"])
    assert m["within10_pct"] == pytest.approx(100 / 3)


@pytest.mark.parametrize("predicted, measured", [
    ([1.0], [1.0]),                      # too few
    ([1.0, 2.0], [1.0, 2.0, 3.0]),       # lengths differ
    ([1.0, 2.0], [1.0, 0.0]),            # a measurement that is not positive
    ([1.0, 2.0], [1.0, float("nan")]),
])
def test_metrics_refuse_bad_input(predicted, measured):
    with pytest.raises(CostModelError):
        metrics(predicted, measured)


# ------------------------------------------------------------------ specs

def test_split_specs_attaches_options_to_the_spec_before():
    assert split_specs("roofline:cpu, lut:cpu-onnxruntime,db=x.db,threads=1,flops,learned:p.pt") == [
        "roofline:cpu", "lut:cpu-onnxruntime,db=x.db,threads=1", "flops", "learned:p.pt"]


@pytest.mark.parametrize("text", ["", " , ", "db=x.db,roofline:cpu"])
def test_split_specs_errors(text):
    with pytest.raises(CostModelError):
        split_specs(text)


def test_resolve_proxies_and_models():
    assert isinstance(resolve("params")[0], FlopsModel) and resolve("params")[1] is not None
    assert resolve("flops")[1] is not None
    model, proxy = resolve("roofline:cpu")
    assert isinstance(model, RooflineModel) and proxy is None
    with pytest.raises(CostModelError):
        resolve("nonsense:spec")


# ------------------------------------------------------------------ comparison

def _net(width: int, depth: int) -> nn.Module:
    layers = [nn.Conv2d(3, width, 3, padding=1), nn.ReLU()]
    for _ in range(depth):
        layers += [nn.Conv2d(width, width, 3, padding=1), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10)).eval()


@pytest.fixture(scope="module")
def graphs():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 16, 16)
    return {"small": trace(_net(4, 1), x), "medium": trace(_net(8, 2), x), "large": trace(_net(16, 3), x)}


def test_compare_scores_every_model(graphs):
    measured = {"small": 1e-4, "medium": 3e-4, "large": 9e-4}
    roofline = RooflineModel("cpu")
    result = compare(graphs, measured, {"flops": "flops", "params": "params", "roof": roofline})
    by_label = {r.label: r for r in result.results}
    assert list(by_label) == ["flops", "params", "roof"]
    counts = FlopsModel()
    for name, gm in graphs.items():
        total = counts.graph_cost(gm).total
        assert by_label["flops"].predicted[name] == total.macs
        assert by_label["params"].predicted[name] == total.params
        assert by_label["roof"].predicted[name] == pytest.approx(roofline.graph_cost(gm).total.latency_s)
    # bigger networks have more MACs and parameters: both proxies rank these perfectly
    assert by_label["flops"].metrics["kendall_tau"] == pytest.approx(1.0)
    assert by_label["params"].proxy and by_label["params"].metrics["mape_pct"] is None
    assert not by_label["roof"].proxy and by_label["roof"].metrics["mape_pct"] is not None
    assert all(r.seconds_per_prediction > 0 for r in result.results)
    table = result.table()
    assert "Kendall" in table and "—" in table and "roof" in table
    assert "medium" in result.networks_table()


def test_compare_takes_a_list_of_specs(graphs):
    result = compare(graphs, {"small": 1.0, "medium": 2.0, "large": 3.0}, ["flops", "roofline:cpu"])
    assert [r.label for r in result.results] == ["flops", "roofline:cpu"]


def test_compare_needs_every_measurement_and_two_graphs(graphs):
    with pytest.raises(CostModelError, match="large"):
        compare(graphs, {"small": 1.0, "medium": 2.0}, ["flops"])
    with pytest.raises(CostModelError, match="two networks"):
        compare({"small": graphs["small"]}, {"small": 1.0}, ["flops"])


class _RefusesLarge(RooflineModel):
    """A roofline that refuses graphs of more than ``limit`` nodes (the 3 test graphs have 9, 11, 13)."""

    def __init__(self, limit: int):
        super().__init__("cpu")
        self.limit = limit

    def graph_cost(self, gm):
        if len(gm.graph.nodes) > self.limit:
            raise CostModelError("too big for this model")
        return super().graph_cost(gm)


def test_a_model_that_cannot_predict_a_graph_is_scored_on_the_rest(graphs):
    measured = {"small": 1e-4, "medium": 3e-4, "large": 9e-4}
    result = compare(graphs, measured, {"partial": _RefusesLarge(11), "full": "roofline:cpu", "lone": _RefusesLarge(9)})
    partial, full, lone = result.results
    assert set(partial.failed) == {"large"} and "too big" in partial.failed["large"]
    assert partial.metrics["n"] == 2 and full.metrics["n"] == 3 and not full.failed
    assert partial.metrics["kendall_tau"] == pytest.approx(1.0)
    assert lone.metrics["n"] == 1 and lone.metrics["kendall_tau"] is None and lone.metrics["mape_pct"] is None
    assert "failed" in result.networks_table() and "—" in result.table()


def test_measure_networks_reuses_stored_graphs(graphs, tmp_path, monkeypatch):
    db = tmp_path / "eval.db"
    key = MeasuredModel("cpu", "onnxruntime", threads=1, store=str(db)).key
    with LatencyStore(db) as store:
        for i, gm in enumerate(graphs.values()):
            store.put_graph(graph_key(gm), key, (i + 1) * 1e-3, Spread(0.0, 1e-3, 1e-3, 5, 0.01))

    def never(*args, **kwargs):
        raise AssertionError("a stored graph was timed again")

    monkeypatch.setattr(MeasuredModel, "measure_module", never)
    measured = measure_networks(graphs, "onnxruntime", threads=1, db=str(db), progress=False)
    assert measured == pytest.approx({"small": 1e-3, "medium": 2e-3, "large": 3e-3})
