"""Learned predictors: fit/evaluate round trips, learned:PATH, node-order invariance, errors."""

import gzip
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
from torchvision.models import resnet18

import hant
from hant.cost_models import get
from hant.cost_models.learned import data_path, featurize, fit_table, train
from hant.cost_models.learned.nb201 import family
from hant.cost_models.learned.perop import group_nodes
from hant.cost_models.learned.predictor import Predictor
from tests.helpers import TwoBranches

FAST = {"steps": 30}
SLICE_ROWS = 60
COLUMNS = ("gold_6240", "pixel3", "titanx_1")


@pytest.fixture(scope="module")
def slice_table(tmp_path_factory):
    """The first rows of the shipped NAS-Bench-201 table, read from the package."""
    path = tmp_path_factory.mktemp("nb201") / "slice.csv.gz"
    with gzip.open(data_path(), "rt") as src, gzip.open(path, "wt") as dst:
        for k, line in enumerate(src):
            if k > SLICE_ROWS:
                break
            dst.write(line)
    return str(path)


def _columns(path):
    with gzip.open(path, "rt") as f:
        return f.readline().strip().split(",")


def test_shipped_table_has_every_network_and_21_devices():
    header = _columns(data_path())
    assert header[:2] == ["nb201_index", "arch_str"] and len(header) == 23
    with gzip.open(data_path(), "rt") as f:
        assert sum(1 for _ in f) == 15626
    folder = os.path.dirname(data_path())
    assert {"README.md", "LICENSE-HELP"} <= set(os.listdir(folder))


@pytest.mark.parametrize("model", ["gnn", "perop"])
def test_fit_table_round_trip_as_cost_model(slice_table, tmp_path, model):
    out = tmp_path / f"{model}.pt"
    result = fit_table(slice_table, "gold_6240", builder="nb201", train_size=40, seed=0, out=out, model=model,
                       config=FAST)
    assert result.metrics["n"] == SLICE_ROWS - 40
    assert set(result.train_rows).isdisjoint(result.test_rows)
    for key in ("rmse_ms", "mape_pct", "within10_pct", "kendall_tau", "spearman_rho"):
        assert np.isfinite(result.metrics[key])
    # the held-out metrics are the file's own predictions on the held-out rows
    cost_model = get(f"learned:{out}")
    fam = family()
    from hant.cost_models.learned.fit import read_table
    table = read_table(slice_table, "gold_6240", "arch_str")
    arch = table.architectures[result.test_rows[0]]
    gm = hant.trace(hant.cost_models.learned.nb201(arch), torch.randn(1, 3, 32, 32))
    report = cost_model.graph_cost(gm)
    loaded = Predictor.load(out)
    assert report.latency_s == pytest.approx(loaded.predict([fam.featurize(arch)])[0], rel=1e-4)
    assert report.latency_s > 0 and all(r.cost.latency_s >= 0 for r in report.rows)
    assert loaded.metadata["target_column"] == "gold_6240" and loaded.metadata["held_out"] == result.metrics
    conv = next(n for n in gm.graph.nodes if n.name == "stem_0")
    assert cost_model.node_cost(conv).latency_s == next(r.cost.latency_s for r in report.rows if r.node == "stem_0")
    assert cost_model.node_cost(conv).macs == 3 * 16 * 9 * 32 * 32


@pytest.mark.slow
def test_fitting_is_reproducible_and_learns(slice_table):
    a = fit_table(slice_table, "pixel3", train_size=40, seed=3, model="perop", config={"steps": 150})
    b = fit_table(slice_table, "pixel3", train_size=40, seed=3, model="perop", config={"steps": 150})
    assert a.test_rows == b.test_rows
    for key, value in a.metrics.items():
        assert b.metrics[key] == pytest.approx(value, rel=1e-2, abs=1e-3)
    assert a.metrics["spearman_rho"] > 0.5       # pixel3 latency is learnable from 40 rows


def _graph(seed):
    model = hant.cost_models.learned.nb201(
        "|nor_conv_3x3~0|+|avg_pool_3x3~0|skip_connect~1|+|none~0|nor_conv_1x1~1|nor_conv_3x3~2|", C=8, N=2)
    return featurize(hant.trace(model, torch.randn(1, 3, 32, 32)))


@pytest.mark.parametrize("kind", ["gnn", "perop"])
def test_prediction_is_invariant_to_node_order(kind):
    graphs = [_graph(0), family().featurize("|nor_conv_1x1~0|+|none~0|skip_connect~1|+|none~0|nor_conv_1x1~1|"
                                            "avg_pool_3x3~2|")]
    predictor = train(kind, graphs, [1e-3, 2e-3], config={"steps": 5})
    rng = np.random.default_rng(0)
    for g in graphs:
        shuffled = g.permuted(rng.permutation(g.num_nodes))
        assert predictor.predict([shuffled])[0] == pytest.approx(predictor.predict([g])[0], rel=1e-5)
        shares, _ = predictor.node_latencies(g)
        order = rng.permutation(g.num_nodes)
        shuffled_shares, _ = predictor.node_latencies(g.permuted(order))
        np.testing.assert_allclose(shuffled_shares, shares[order], rtol=1e-5, atol=1e-12)


def test_prediction_is_invariant_to_graph_node_order():
    """Two fx graphs of the same network whose nodes are listed in different orders."""
    torch.manual_seed(0)
    first = TwoBranches(False)
    second = TwoBranches(True)
    second.load_state_dict(first.state_dict())
    x = torch.randn(1, 3, 16, 16)
    g1, g2 = featurize(hant.trace(first, x)), featurize(hant.trace(second, x))
    assert [n for n in g1.names] != [n for n in g2.names] or not np.array_equal(g1.x, g2.x)
    for kind in ("gnn", "perop"):
        predictor = train(kind, [g1, _graph(0)], [1e-3, 5e-3], config={"steps": 5})
        assert predictor.predict([g2])[0] == pytest.approx(predictor.predict([g1])[0], rel=1e-5)


def test_fused_grouping_puts_conv_bn_relu_in_one_kernel():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.ReLU())
    g = featurize(hant.trace(model, torch.randn(1, 3, 8, 8)))
    groups = dict(zip(g.names, group_nodes(g, "fused")))
    assert groups["_0"] == groups["_1"] == groups["_2"] != groups["_3"] == groups["_4"]
    assert len(set(group_nodes(g, "eager"))) == g.num_nodes


def test_learned_model_prices_a_torchvision_network(tmp_path):
    """A predictor trained on NB201 graphs still answers (positively) on a real torchvision graph."""
    graphs = [family().featurize(a) for a in ("|nor_conv_3x3~0|+|none~0|none~1|+|none~0|none~1|none~2|",
                                              "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|nor_conv_3x3~0|"
                                              "nor_conv_3x3~1|nor_conv_3x3~2|")]
    path = tmp_path / "p.pt"
    train("gnn", graphs, [1e-3, 4e-3], config={"steps": 5}).save(path)
    gm = hant.trace(resnet18().eval(), torch.randn(1, 3, 64, 64))
    report = get(f"learned:{path}").graph_cost(gm)
    assert report.latency_s > 0 and len(report.rows) == len([n for n in gm.graph.nodes
                                                              if n.op not in ("placeholder", "output", "get_attr")])



@pytest.mark.parametrize("kind", ["gnn", "perop"])
def test_learned_report_rows_are_the_flops_rows_of_the_graph_when_priced(kind):
    """Rows are built on first read from what the graph was when priced: the flops model's rows (kind,
    target, shapes, counts) with each node's predicted share; the total is the network's prediction and
    the rows' counts; the report compares and pickles as a plain one."""
    import pickle

    from hant.cost_models.base import CostReport
    from hant.cost_models.learned.predictor import LearnedCostModel

    predictor = train(kind, [_graph(0), _graph(1)], [1e-3, 2e-3], config={"steps": 5})
    model = LearnedCostModel(predictor)
    gm = hant.trace(resnet18().eval(), torch.randn(1, 3, 64, 64))
    flops_rows = get("flops").graph_cost(gm).rows
    report = model.graph_cost(gm)
    relu = next(n for n in gm.graph.nodes if n.name == "relu")
    relu.replace_all_uses_with(relu.args[0])            # edited after pricing, before the rows are read
    gm.graph.erase_node(relu)
    gm.recompile()
    rows = report.rows
    assert [(r.node, r.kind, r.target, r.input_shapes, r.output_shape) for r in rows] == [
        (r.node, r.kind, r.target, r.input_shapes, r.output_shape) for r in flops_rows]
    assert [r.cost.macs for r in rows] == [r.cost.macs for r in flops_rows]
    assert report.latency_s == pytest.approx(predictor.predict([featurize(hant.trace(resnet18().eval(),
                                                                                       torch.randn(1, 3, 64, 64)))])[0],
                                             rel=1e-4)
    for field in ("macs", "bytes_read", "bytes_written", "params"):
        assert getattr(report.total, field) == sum(getattr(r.cost, field) for r in rows) > 0
    plain = CostReport(report.model, list(rows), report.total, list(report.notes))
    assert report == plain and pickle.loads(pickle.dumps(report)) == plain
    assert "relu" not in [r.node for r in model.graph_cost(gm).rows]

def test_convolution_columns_read_off_the_module_agree_with_the_conv_view(monkeypatch):
    """Features read a plain convolution's kernel, stride, groups and bias off its module; the rows must
    equal those built from the op view (dense, grouped, depthwise and bias-free convolutions)."""
    import hant.cost_models.learned.features as features
    from torchvision.models import mobilenet_v3_small, regnet_y_400mf

    for model in (resnet18(), mobilenet_v3_small(), regnet_y_400mf()):
        gm = hant.trace(model.eval(), torch.randn(1, 3, 64, 64))
        direct = featurize(gm)
        with monkeypatch.context() as patch:
            patch.setattr(features, "_PLAIN_CONVOLUTIONS", ())
            viewed = featurize(gm)
        assert np.array_equal(direct.x, viewed.x) and np.array_equal(direct.edges, viewed.edges)


# ------------------------------------------------------------------ errors

def test_missing_column_raises(slice_table):
    with pytest.raises(hant.CostModelError, match="no column 'no_such_device'"):
        fit_table(slice_table, "no_such_device", train_size=10)


def test_unknown_builder_raises(slice_table):
    with pytest.raises(hant.CostModelError, match="unknown builder"):
        fit_table(slice_table, "pixel3", builder="nb101", train_size=10)


@pytest.mark.parametrize("bad_line", ["7,|nor_conv_3x3~0|+|none~0|none~1|+|none~0|none~1|none~2|",
                                      "7,|nor_conv_3x3~0|+|none~0|none~1|+|none~0|none~1|none~2|,abc",
                                      "7,|nor_conv_3x3~0|+|none~0|none~1|+|none~0|none~1|none~2|,-1.0",
                                      "7,|conv9~0|+|none~0|none~1|+|none~0|none~1|none~2|,3.0"])
def test_malformed_row_raises(tmp_path, bad_line):
    path = tmp_path / "bad.csv"
    good = "|nor_conv_1x1~0|+|none~0|none~1|+|none~0|none~1|none~2|"
    rows = [f"{k},{good},{1.0 + k}" for k in range(5)]
    path.write_text("nb201_index,arch_str,dev\n" + "\n".join(rows[:2] + [bad_line] + rows[2:]) + "\n")
    with pytest.raises(hant.CostModelError):
        fit_table(path, "dev", train_size=3, config={"steps": 2})


def test_train_size_leaving_nothing_to_score_raises(slice_table):
    with pytest.raises(hant.CostModelError, match="train_size"):
        fit_table(slice_table, "pixel3", train_size=SLICE_ROWS)


def test_missing_and_bad_predictor_files_raise(tmp_path):
    with pytest.raises(hant.CostModelError, match="no predictor file"):
        get(f"learned:{tmp_path / 'nope.pt'}")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a predictor")
    with pytest.raises(hant.CostModelError, match="not a readable predictor"):
        get(f"learned:{junk}")
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(hant.CostModelError, match="not a hant predictor"):
        get(f"learned:{other}")
    with pytest.raises(hant.CostModelError, match="learned:PATH"):
        get("learned")


def test_unknown_model_kind_raises(slice_table):
    with pytest.raises(hant.CostModelError, match="unknown learned model"):
        fit_table(slice_table, "pixel3", train_size=10, model="xgboost")


@pytest.mark.slow
def test_cli_fit_from_a_table(slice_table, tmp_path, capsys):
    from hant.tools.cli import main
    out = tmp_path / "cli.pt"
    assert main(["fit", "--table", slice_table, "--target", "pixel3", "--train-size", "30", "--model", "perop",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Kendall tau" in printed and f"learned:{out}" in printed
    assert Predictor.load(out).metadata["target_column"] == "pixel3"
    assert main(["fit", "--table", slice_table, "--target", "nope", "--out", str(out)]) == 2
    assert "no column 'nope'" in capsys.readouterr().err


@pytest.mark.slow
def test_fit_db_round_trip_on_a_store(tmp_path, capsys):
    """Networks of a latency store (hant profile's table) -> fit -> learned:PATH on a stored network."""
    from hant.cost_models.learned import fit_db
    from hant.cost_models.netspace import build, input_shape, sample_spec
    from hant.cost_models.store import LatencyStore, RuntimeKey, Spread

    key = RuntimeKey("onnxruntime", "test", 1, "test-cpu")
    specs = [sample_spec(seed, "tiny") for seed in range(8)]
    with LatencyStore(tmp_path / "data.db") as store:
        for k, spec in enumerate(specs):
            store.put_network(spec, input_shape(spec), key, 1e-3 * (1 + k), Spread(0.0, 1e-3, 1e-3, 5, 0.01))
    out = tmp_path / "db.pt"
    result = fit_db(tmp_path / "data.db", model="perop", out=out, holdout=0.25, config={"steps": 20})
    assert "Kendall tau" in capsys.readouterr().out
    assert len(result.test_rows) == 2 and len(result.train_rows) == 6
    spec = specs[result.test_rows[0]]
    report = get(f"learned:{out}").graph_cost(hant.trace(build(spec), torch.randn(*input_shape(spec))))
    assert report.latency_s > 0
    with pytest.raises(hant.CostModelError, match="no latency store"):
        fit_db(tmp_path / "missing.db")
