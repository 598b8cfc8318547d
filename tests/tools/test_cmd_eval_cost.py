"""``hant eval-cost``: measures two tiny networks into a store, scores cheap cost models, reruns for free,
and turns every user error into exit code 2 with a message."""

import textwrap

import pytest

from hant.cost_models.measured import MeasuredModel
from hant.cost_models.roofline import RooflineModel
from hant.cost_models.store import LatencyStore, Spread
from hant.cost_models.timing import runtime_for
from hant.tools.cli import main

TINY = textwrap.dedent("""
    import torch.nn as nn

    def narrow():
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(4, 5))

    def wide():
        return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1),
                             nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 5))
""")


@pytest.fixture
def tiny_models(tmp_path):
    path = tmp_path / "tiny.py"
    path.write_text(TINY)
    return f"{path}:narrow,{path}:wide"


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def test_measures_scores_and_reruns_for_free(capsys, tmp_path, tiny_models, monkeypatch):
    db = tmp_path / "eval.db"
    argv = ["eval-cost", "flops,params,roofline:cpu", "--models", tiny_models, "--threads", "1",
            "--db", str(db), "--input", "1,3,16,16", "--per-network"]
    code, out, err = _run(capsys, *argv)
    assert code == 0, err
    assert "Kendall" in out and "roofline:cpu" in out and "params" in out
    assert "tiny.py:wide" in out                       # the per-network table
    assert "1 thread" in out
    with LatencyStore(db) as store:
        assert store.count("graphs") == 2

    def never(*args, **kwargs):
        raise AssertionError("a stored network was timed again")

    monkeypatch.setattr(MeasuredModel, "measure_module", never)
    code, rerun, err = _run(capsys, *argv)
    assert code == 0, err
    per_network = out.split("\n\n")[-1]                # measured and predicted milliseconds, not timings
    assert rerun.split("\n\n")[-1] == per_network


def test_calibrate_rooflines_on_a_store(capsys, tmp_path, tiny_models, monkeypatch):
    db, ops = tmp_path / "eval.db", tmp_path / "ops.db"
    key = runtime_for("cpu", "onnxruntime", 1).key
    with LatencyStore(ops) as store:     # a conv kind running at 1 GMAC/s plus 10 us
        for i in range(1, 6):
            store.put_op({"kind": "conv", "input_shapes": [[1, i]], "dtype": "float32", "attrs": {}}, key,
                         i * 1e6 / 1e9 + 1e-5, Spread(0.0, 1e-5, 1e-5, 5, 0.01), macs=i * 10 ** 6,
                         bytes=i * 1000, cost_kind="conv")
    monkeypatch.setattr(MeasuredModel, "measure_module", lambda *a, **k: pytest.fail("nothing to measure"))
    with LatencyStore(db) as store:      # the networks are "measured" already
        from hant.cost_models.measured import graph_key
        from hant.graphs import trace
        from hant.tools.models import load_model
        import torch
        for i, spec in enumerate(tiny_models.split(",")):
            gm = trace(load_model(spec).module, torch.randn(1, 3, 16, 16))
            store.put_graph(graph_key(gm), key, (i + 1) * 1e-4, Spread(0.0, 1e-4, 1e-4, 5, 0.01))
    seen = []
    monkeypatch.setattr(RooflineModel, "calibrate",
                        lambda self, samples, original=RooflineModel.calibrate: seen.append(1) or
                        original(self, samples))
    code, out, err = _run(capsys, "eval-cost", "roofline:cpu", "--models", tiny_models, "--threads", "1",
                          "--db", str(db), "--input", "1,3,16,16", "--calibrate", str(ops))
    assert code == 0, err
    assert seen == [1]
    assert "calibrated on 5 ops" in out and "roofline:cpu (calibrated)" in out


@pytest.mark.parametrize("argv, message", [
    (["nonsense:x"], "nonsense"),                                        # unknown cost model
    (["db=x.db"], "before any cost-model spec"),                         # an option without a spec
    (["flops", "--models", "torchvision:resnet18"], "at least two"),    # one network
    (["flops", "--models", "torchvision:no_such_net,torchvision:resnet18"], "no_such_net"),
    (["roofline:cpu", "--calibrate", "/no/such/store.db"], "no latency store"),
    (["flops", "--input", "1,x"], ""),                                   # a bad shape
])
def test_user_errors_exit_2(capsys, tmp_path, tiny_models, argv, message):
    if "--models" not in argv:
        argv = argv + ["--models", tiny_models]
    code, out, err = _run(capsys, "eval-cost", *argv, "--db", str(tmp_path / "e.db"))
    assert code == 2
    assert "error" in err and message in err
    assert not (tmp_path / "e.db").exists() or LatencyStore(tmp_path / "e.db").count("graphs") == 0


def test_threads_must_be_positive(capsys, tiny_models):
    code, _, err = _run(capsys, "eval-cost", "flops", "--models", tiny_models, "--threads", "0")
    assert code == 2 and "positive integer" in err
