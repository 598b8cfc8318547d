"""hant.inspect: rows, ordering, top-N, totals and the four formats."""

import csv
import io
import json

import pytest
import torch
from torch.fx import symbolic_trace

import hant
from hant.errors import CostModelError, InputError
from hant.graphs import op_kind
from hant.tools.examples import EXAMPLE_INPUT_SHAPE, example_network
from hant.tools.report import inspect_rows


@pytest.fixture(scope="module")
def gm():
    return hant.trace(example_network(), torch.randn(EXAMPLE_INPUT_SHAPE))


def _expected(gm, model):
    """Compute nodes (graph order) and their costs, straight from the cost model."""
    nodes = [n for n in gm.graph.nodes
             if n.op not in ("placeholder", "output", "get_attr") and op_kind(n) not in model.free_kinds]
    return [(n.name, model.node_cost(n)) for n in nodes]


def test_csv_has_one_row_per_compute_node_in_graph_order_and_a_total(gm, shapecost):
    expected = _expected(gm, shapecost)
    records = list(csv.DictReader(io.StringIO(hant.inspect(gm, shapecost, format="csv"))))
    body, total = records[:-1], records[-1]
    assert [r["node"] for r in body] == [name for name, _ in expected]
    for r, (_, cost) in zip(body, expected):
        assert (int(r["macs"]), int(r["bytes"]), int(r["params"])) == (cost.macs, cost.bytes, cost.params)
        assert float(r["latency_s"]) == pytest.approx(cost.latency_s)
    assert total["node"] == "total"
    assert int(total["macs"]) == sum(c.macs for _, c in expected)
    assert float(total["share"]) == 1.0
    assert sum(float(r["share"]) for r in body) == pytest.approx(1.0)


def test_views_and_eval_dropout_that_cost_nothing_get_no_row(gm, shapecost):
    names = {r["node"] for r in json.loads(hant.inspect(gm, shapecost, format="json"))["rows"]}
    assert "flatten" in {n.name for n in gm.graph.nodes}
    assert "flatten" not in names and "classifier_0" not in names  # torch.flatten, Dropout in eval
    assert "classifier_1" in names


def test_json_carries_raw_numbers_shapes_and_totals(gm, shapecost):
    doc = json.loads(hant.inspect(gm, shapecost, format="json"))
    expected = _expected(gm, shapecost)
    assert doc["cost_model"] == "shapecost"
    assert doc["compute_nodes"] == len(expected) == len(doc["rows"])
    first = doc["rows"][0]
    assert first["input_shapes"] == [list(EXAMPLE_INPUT_SHAPE)]
    assert first["output_shape"] == [1, 16, 32, 32]
    assert first["kind"] == "conv" and first["op"] == "Conv2d"
    assert first["intensity"] == pytest.approx(first["macs"] / first["bytes"])
    assert doc["total"]["macs"] == sum(c.macs for _, c in expected)
    assert doc["total"]["latency_s"] == pytest.approx(sum(c.latency_s for _, c in expected))


def test_top_n_gives_the_n_slowest_slowest_first(gm, shapecost):
    everything = json.loads(hant.inspect(gm, shapecost, format="json"))
    top = json.loads(hant.inspect(gm, shapecost, top=4, format="json"))
    latencies = [r["latency_s"] for r in top["rows"]]
    assert len(latencies) == 4 and latencies == sorted(latencies, reverse=True)
    assert latencies[-1] >= sorted((r["latency_s"] for r in everything["rows"]), reverse=True)[3]
    assert top["total"] == everything["total"]  # the total is always the whole graph


def test_top_n_ranks_by_macs_when_the_cost_model_gives_no_latency(gm):
    everything = json.loads(hant.inspect(gm, "flops", format="json"))
    assert all(r["latency_s"] == 0 for r in everything["rows"])
    top = json.loads(hant.inspect(gm, "flops", top=3, format="json"))
    assert [r["macs"] for r in top["rows"]] == sorted((r["macs"] for r in everything["rows"]), reverse=True)[:3]


def test_table_and_markdown_show_every_column_and_the_total(gm, shapecost):
    n_rows = len(_expected(gm, shapecost))
    table = hant.inspect(gm, shapecost)
    assert table.splitlines()[0] == "cost model: shapecost"
    for column in ("node", "op", "input -> output", "params", "MACs", "bytes", "MACs/B", "latency", "%"):
        assert column in table
    assert "1x1x32x32 -> 1x16x32x32" in table
    assert f"total ({n_rows} nodes)" in table
    markdown = hant.inspect(gm, shapecost, top=3, format="markdown")
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    assert len(lines) == 2 + 3 + 1  # header, rule, 3 rows, total
    assert "top 3 of" in markdown.splitlines()[0]


def test_human_units_in_the_table(gm, shapecost):
    name, cost = max(_expected(gm, shapecost), key=lambda item: item[1].latency_s)
    assert 1e3 <= cost.macs < 1e6 and 1e-6 <= cost.latency_s < 1e-3  # so the units below are K and us
    row = hant.inspect(gm, shapecost, top=1).splitlines()[4]  # heading, blank, header, rule, first row
    assert row.split()[0] == name
    assert f"{cost.macs / 1e3:.3g}K" in row and f"{cost.latency_s / 1e-6:.3g} us" in row


def test_inspect_does_not_change_the_graph(gm, shapecost):
    code = gm.code
    hant.inspect(gm, shapecost)
    assert gm.code == code


def test_default_cost_model_is_the_cpu_roofline(gm):
    rows, report = inspect_rows(gm)
    assert report.model.startswith("roofline")
    assert report.total.latency_s > 0 and report.total.macs > 0


@pytest.mark.parametrize("bad", [0, -1, True, 2.5, "3"])
def test_bad_top_is_an_input_error(gm, shapecost, bad):
    with pytest.raises(InputError, match="top"):
        hant.inspect(gm, shapecost, top=bad)


def test_bad_format_is_an_input_error(gm, shapecost):
    with pytest.raises(InputError, match="table, markdown, csv, json"):
        hant.inspect(gm, shapecost, format="xml")


def test_unknown_cost_model_is_a_cost_model_error(gm):
    with pytest.raises(CostModelError, match="unknown cost model"):
        hant.inspect(gm, "no-such-model")


def test_untraced_models_are_refused_with_the_fix(shapecost):
    model = example_network()
    with pytest.raises(InputError, match="hant.trace"):
        hant.inspect(model, shapecost)
    with pytest.raises(InputError, match="shape information"):
        hant.inspect(symbolic_trace(model), shapecost)
