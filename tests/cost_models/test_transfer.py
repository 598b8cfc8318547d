"""Few-shot transfer: multi-head pre-training, reference choice, non-negative head weights, learned:PATH."""

import gzip

import numpy as np
import pytest
import torch

import hant
from hant.cost_models import get
from hant.cost_models.learned import data_path
from hant.cost_models.learned.features import FEATURE_NAMES
from hant.cost_models.learned.gnn import GraphNet
from hant.cost_models.learned.nb201 import family, nb201
from hant.cost_models.learned.predictor import Predictor
from hant.cost_models.learned.transfer import Pretrained, adapt, head_weights, pick_references, pretrain

ROWS = 70
TARGET = "samsung_a50"
SOURCES = ("gold_6240", "pixel3", "titanx_1", "1080ti_32")


@pytest.fixture(scope="module")
def slice_rows():
    with gzip.open(data_path(), "rt") as f:
        header = f.readline().strip().split(",")
        rows = [f.readline().strip().split(",") for _ in range(ROWS)]
    archs = [r[1] for r in rows]
    y = {c: np.array([float(r[header.index(c)]) for r in rows]) * 1e-3 for c in SOURCES + (TARGET,)}
    return archs, y


@pytest.fixture(scope="module")
def pretrained(slice_rows):
    archs, y = slice_rows
    return pretrain(archs[:50], np.stack([y[c][:50] for c in SOURCES], axis=1), list(SOURCES), family(),
                    config={"steps": 20, "eval_every": 5}, references=6)


def test_pretrain_picks_references_from_its_own_rows_and_a_validated_ridge(pretrained, slice_rows):
    archs, _ = slice_rows
    assert len(pretrained.references) == len(set(pretrained.references)) == 6
    assert set(pretrained.references) <= set(archs[:50])
    assert pretrained.ridge in pretrained.metadata["ridge_validation_rho"]
    assert pretrained.metadata["validation_rows"] == 5 and pretrained.net.config["outputs"] == len(SOURCES)


def test_adapted_predictor_is_a_cost_model_whose_shares_sum_to_the_prediction(pretrained, slice_rows, tmp_path):
    archs, y = slice_rows
    fam = family()
    refs = [archs.index(a) for a in pretrained.references]
    predictor = adapt(pretrained, fam, y[TARGET][refs])
    assert predictor.metadata["pretrained_on"] == list(SOURCES) and TARGET not in SOURCES
    assert min(predictor.metadata["head_weights"]) >= 0 and max(predictor.metadata["head_weights"]) > 0
    scored = [fam.featurize(a) for a in archs[50:]]
    predicted = predictor.predict(scored)
    assert np.all(predicted > 0) and np.all(np.isfinite(predicted))
    shares, constant = predictor.node_latencies(scored[0])
    assert np.all(shares >= 0) and shares.sum() + constant == pytest.approx(predicted[0], rel=1e-5)
    path = tmp_path / "fewshot.pt"
    predictor.save(path)
    np.testing.assert_allclose(Predictor.load(path).predict(scored), predicted, rtol=1e-5)
    x = torch.randn(1, 3, 32, 32)
    report = get(f"learned:{path}").graph_cost(hant.trace(nb201(archs[60]), x))
    assert report.latency_s == pytest.approx(predictor.predict([fam.featurize(archs[60])])[0], rel=1e-4)


def test_extra_rows_change_the_fit(pretrained, slice_rows):
    archs, y = slice_rows
    fam = family()
    refs = [archs.index(a) for a in pretrained.references]
    plain = adapt(pretrained, fam, y[TARGET][refs], ridge=1e-6)
    more = adapt(pretrained, fam, y[TARGET][refs], archs[50:60], 10 * y[TARGET][50:60], ridge=1e-6)
    assert more.metadata["adapted_rows"] == 16
    assert more.predict([fam.featurize(archs[65])])[0] > plain.predict([fam.featurize(archs[65])])[0]


def test_pretrained_file_round_trip(pretrained, tmp_path):
    path = tmp_path / "pre.pt"
    pretrained.save(path)
    again = Pretrained.load(path)
    graphs = [family().featurize(a) for a in pretrained.references]
    np.testing.assert_allclose(again.head_latencies(graphs), pretrained.head_latencies(graphs), rtol=1e-6)
    assert again.references == pretrained.references and again.ridge == pretrained.ridge
    torch.save({"format": "other"}, tmp_path / "junk.pt")
    with pytest.raises(hant.CostModelError, match="not a pre-trained transfer model"):
        Pretrained.load(tmp_path / "junk.pt")


def test_head_weights_recover_a_non_negative_mixture():
    rng = np.random.default_rng(0)
    heads = np.exp(rng.normal(size=(12, 6)))
    truth = np.array([0.0, 0.7, 0.0, 0.3, 0.0, 0.0])
    w = head_weights(heads, heads @ truth, ridge=1e-10)
    assert np.all(w >= 0)
    np.testing.assert_allclose(heads @ w, heads @ truth, rtol=1e-6)
    shrunk = head_weights(heads, heads @ truth, ridge=10.0)
    assert np.linalg.norm(shrunk) < np.linalg.norm(w)


def test_pick_references_spreads_over_the_profiles():
    rng = np.random.default_rng(1)
    logs = rng.normal(size=(200, 5)) @ rng.normal(size=(5, 8))
    picks = pick_references(logs, k=10)
    assert len(set(picks)) == 10
    centred = logs - logs.mean(axis=0)
    first = np.linalg.svd(centred, full_matrices=False)[2][0]
    scores = centred @ first
    assert {int(np.argmax(scores)), int(np.argmin(scores))} & set(picks)
    with pytest.raises(hant.CostModelError):
        pick_references(logs[:5], k=10)


def test_a_single_head_net_loads_multi_head_weights():
    multi = GraphNet(len(FEATURE_NAMES), 8, 2, 0, 5)
    single = GraphNet(len(FEATURE_NAMES), 8, 2)
    single.load_state_dict(multi.state_dict())
    assert single.config["outputs"] == 5
    h = torch.randn(3, 8)
    assert torch.equal(single.node_shares(h), multi.node_shares(h))
    weights = torch.tensor([0.0, 1.0, 0.0, 2.0, 0.0])
    torch.testing.assert_close(single.node_shares(h, weights), multi.node_shares(h) @ weights)


def test_bad_inputs_raise(pretrained, slice_rows):
    archs, y = slice_rows
    with pytest.raises(hant.CostModelError, match="reference networks"):
        adapt(pretrained, family(), y[TARGET][:3])
    with pytest.raises(hant.CostModelError, match="archs x devices"):
        pretrain(archs[:20], np.ones((20, 1)), ["a", "b"], family())
