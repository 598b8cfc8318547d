"""fit_table's validation split and early stopping; held-out rows never steer training; PreparedGraphs."""

import gzip

import numpy as np
import pytest

import hant
from hant.cost_models.learned import data_path, fit_table, train
from hant.cost_models.learned.fit import PreparedGraphs, validation_size
from hant.cost_models.learned.nb201 import family

ROWS = 80
FAST = {"steps": 30, "eval_every": 5}


def _slice(path, rows=ROWS, change=None):
    """The first ``rows`` networks of the shipped table; ``change(k, line)`` may rewrite data line k."""
    with gzip.open(data_path(), "rt") as src, gzip.open(path, "wt") as dst:
        for k, line in enumerate(src):
            if k > rows:
                break
            dst.write(change(k - 1, line) if change and k else line)
    return str(path)


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    return _slice(tmp_path_factory.mktemp("fit") / "slice.csv.gz")


def test_validation_rows_come_from_the_training_rows(table):
    result = fit_table(table, "gold_6240", train_size=60, config=FAST, seed=1)
    assert len(result.validation_rows) == validation_size(60) == 6
    assert set(result.validation_rows) <= set(result.train_rows)
    assert set(result.train_rows).isdisjoint(result.test_rows) and len(result.test_rows) == ROWS - 60
    validation = result.predictor.metadata["validation"]
    assert validation["rows"] == 6 and 0 <= validation["best_step"] <= FAST["steps"]
    assert fit_table(table, "gold_6240", train_size=10, config=FAST).validation_rows == []


def test_held_out_latencies_never_change_the_fit(tmp_path, table):
    """Scrambling the latencies of every held-out row leaves the trained weights untouched."""
    first = fit_table(table, "pixel3", train_size=60, config=FAST, seed=3)
    held_out = set(first.test_rows)
    column = 2 + 8   # pixel3 is the 9th device column

    def scramble(k, line):
        if k not in held_out:
            return line
        fields = line.rstrip("\n").split(",")
        fields[column] = str(float(fields[column]) * 7.3 + 1.0)
        return ",".join(fields) + "\n"

    changed = _slice(tmp_path / "scrambled.csv.gz", change=scramble)
    second = fit_table(changed, "pixel3", train_size=60, config=FAST, seed=3)
    assert second.train_rows == first.train_rows and second.test_rows == first.test_rows
    for a, b in zip(first.predictor.net.state_dict().values(), second.predictor.net.state_dict().values()):
        assert np.array_equal(a.numpy(), b.numpy())
    assert second.metrics["rmse_ms"] != first.metrics["rmse_ms"]   # the scored values did change


@pytest.mark.parametrize("kind", ["gnn", "perop"])
def test_early_stopping_keeps_the_best_validation_weights(kind):
    """Validation latencies that run against the training ones: the kept weights are the best ones seen."""
    fam = family()
    from hant.cost_models.learned.nb201 import all_arch_strings
    archs = all_arch_strings()[::997][:16]
    graphs = [fam.featurize(a) for a in archs]
    work = np.array([g.x[:, 0].size for g in graphs], dtype=float)
    y = 1e-3 * work / work.mean()
    predictor = train(kind, graphs[:10], y[:10], config={"steps": 40, "eval_every": 4},
                      validation=(graphs[10:], 1e-6 / y[10:]))
    meta = predictor.metadata["validation"]
    assert meta["best_step"] < 40
    predicted = predictor.predict(graphs[10:])
    mae = float(np.mean(np.abs(np.log(predicted) - np.log(1e-6 / y[10:]))))
    assert mae == pytest.approx(meta["validation_mae_log"], rel=1e-4)


@pytest.mark.parametrize("kind,config", [("gnn", {"layers": 2}), ("perop", {"fusion": "eager"})])
def test_prepared_graphs_predict_like_the_predictor(kind, config):
    fam = family()
    from hant.cost_models.learned.nb201 import all_arch_strings
    archs = all_arch_strings()[::611]
    graphs = [fam.featurize(a) for a in archs]
    y = np.linspace(1e-3, 3e-3, len(graphs))
    predictor = train(kind, graphs[:12], y[:12], config=dict(config, steps=5))
    prepared = PreparedGraphs(graphs, kind, config, chunk=7)
    np.testing.assert_allclose(prepared.predict(predictor), predictor.predict(graphs), rtol=1e-5)
    other = train(kind, graphs[:12], y[:12], config={"steps": 1, **({"layers": 3} if kind == "gnn" else
                                                                      {"fusion": "fused"})})
    with pytest.raises(hant.CostModelError, match="another predictor layout"):
        prepared.predict(other)


def test_bad_validation_size_raises(table):
    with pytest.raises(hant.CostModelError, match="val_size"):
        fit_table(table, "gold_6240", train_size=20, val_size=20)
