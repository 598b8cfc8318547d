"""The latency store: round trip, keys, concurrent writers from several processes, errors."""

import multiprocessing
import sqlite3

import pytest

from hant.cost_models.store import LatencyStore, RuntimeKey, Spread, canonical_json, default_path
from hant.errors import CostModelError

KEY = RuntimeKey("onnxruntime", "1.0", 2, "Test CPU | 2 cores")
OTHER = RuntimeKey("onnxruntime", "1.0", 1, "Test CPU | 2 cores")
SPREAD = Spread(1e-6, 9e-6, 1.2e-5, 11, 0.03)


def _signature(channels: int) -> dict:
    return {"kind": "conv", "input_shapes": [[1, channels, 8, 8]], "dtype": "float32",
            "attrs": {"weight_shape": [channels, channels, 3, 3], "groups": 1}}


def test_op_round_trip_and_keys(tmp_path):
    path = tmp_path / "lat.db"
    with LatencyStore(path) as store:
        store.put_op(_signature(4), KEY, 1e-5, SPREAD, macs=1000, bytes=2000, cost_kind="conv_grouped")
        store.put_op(_signature(4), OTHER, 3e-5, SPREAD)
        store.put_op(_signature(8), KEY, 2e-5, SPREAD, macs=4000, bytes=5000)
    store = LatencyStore(path)  # reopened: everything was committed
    found = store.get_op(_signature(4), KEY)
    assert found.latency_s == 1e-5 and found.spread == SPREAD and found.macs == 1000 and found.bytes == 2000
    assert found.runtime == "onnxruntime" and found.device == KEY.device and found.threads == 2
    assert found.signature == _signature(4) and found.input_shapes == [[1, 4, 8, 8]]
    assert store.get_op(_signature(4), OTHER).latency_s == 3e-5          # thread count is part of the key
    assert store.get_op(_signature(16), KEY) is None
    assert len(list(store.ops(threads=2))) == 2 and len(list(store.ops())) == 3
    assert list(store.ops(device="elsewhere")) == []
    # only rows with MACs and bytes calibrate; the calibration kind is the finer cost kind when given
    assert sorted(store.calibration_samples()) == [("conv", 4000, 5000, 2e-5), ("conv_grouped", 1000, 2000, 1e-5)]
    store.put_op(_signature(4), KEY, 5e-5, SPREAD)                        # a re-measurement replaces
    assert store.get_op(_signature(4), KEY).latency_s == 5e-5 and store.count("ops") == 3


def test_network_and_graph_round_trip(tmp_path):
    store = LatencyStore(tmp_path / "lat.db")
    spec = {"family": "resnet", "stages": [{"depth": 2}], "resolution": 96}
    store.put_network(spec, (1, 3, 96, 96), KEY, 4e-3, SPREAD, {"stem_0_0": 1e-4, "fc": 2e-5})
    store.put_network(dict(spec, resolution=128), (1, 3, 128, 128), KEY, 6e-3, SPREAD)
    assert store.has_network(spec, KEY) and not store.has_network(spec, OTHER)
    first, second = store.networks(runtime="onnxruntime", device=KEY.device)
    assert first.spec == spec and first.input_shape == (1, 3, 96, 96) and first.latency_s == 4e-3
    assert first.node_latencies == {"stem_0_0": 1e-4, "fc": 2e-5} and first.spread == SPREAD
    assert second.node_latencies is None and second.spec["resolution"] == 128
    assert list(store.networks(runtime="torch")) == []
    store.put_graph("abc", KEY, 7e-4, SPREAD)
    assert store.get_graph("abc", KEY).latency_s == 7e-4 and store.get_graph("abc", OTHER) is None


def test_graph_timings_accumulate_to_their_median(tmp_path):
    """Independent timings of one graph are kept; its figure is their median, so one outlier is outvoted."""
    store = LatencyStore(tmp_path / "lat.db")
    store.put_graph("g", KEY, 5e-4, SPREAD)                   # stored before timings were kept: counts as one
    record = store.add_graph_timing("g", KEY, 1e-4, Spread(1e-6, 9e-5, 1.2e-4, 11, 0.03))
    assert record.samples == 2 and record.latency_s == pytest.approx(3e-4)
    record = store.add_graph_timing("g", KEY, 1.1e-4, Spread(2e-6, 1e-4, 1.3e-4, 7, 0.05))
    assert record.samples == 3 and record.latency_s == 1.1e-4
    assert record.spread == Spread(2e-6, SPREAD.min_s, 1.3e-4, 7, 0.05)   # the median's, with the fastest block
    reopened = LatencyStore(tmp_path / "lat.db").get_graph("g", KEY)
    assert (reopened.latency_s, reopened.samples) == (1.1e-4, 3)
    assert store.get_graph("g", OTHER) is None and store.add_graph_timing("g", OTHER, 2e-4, SPREAD).samples == 1
    store.put_graph("g", KEY, 7e-4, SPREAD)                   # a put replaces every timing of the graph
    assert (store.get_graph("g", KEY).latency_s, store.get_graph("g", KEY).samples) == (7e-4, 1)
    with pytest.raises(CostModelError, match="positive"):
        store.add_graph_timing("g", KEY, 0.0, SPREAD)


def test_canonical_json_ignores_key_order_and_tuples():
    assert canonical_json({"b": (1, 2), "a": 1}) == canonical_json({"a": 1, "b": [1, 2]})


def test_default_path_follows_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("HANT_LATENCY_DB", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_path() == tmp_path / "hant" / "latency.db"
    monkeypatch.setenv("HANT_LATENCY_DB", str(tmp_path / "x.db"))
    assert default_path() == tmp_path / "x.db"
    assert LatencyStore().path == tmp_path / "x.db"


def test_bad_values_and_files_raise_cost_model_error(tmp_path):
    store = LatencyStore(tmp_path / "lat.db")
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(CostModelError, match="positive"):
            store.put_op(_signature(4), KEY, bad, SPREAD)
    with pytest.raises(CostModelError, match="table"):
        store.count("nope")
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database" * 100)
    with pytest.raises(CostModelError, match="delete the file"):
        LatencyStore(junk)


def _writer(path: str, worker: int, rows: int) -> None:
    store = LatencyStore(path)
    for i in range(rows):
        store.put_op(_signature(1000 * worker + i + 1), KEY, 1e-6 * (i + 1), SPREAD, macs=i, bytes=i)
        store.put_network({"worker": worker, "i": i}, (1, 3, 8, 8), KEY, 1e-3, SPREAD, {"n": 1e-4})


def test_concurrent_writers_keep_every_row(tmp_path):
    path = str(tmp_path / "shared.db")
    LatencyStore(path).close()
    workers, rows = 4, 40
    context = multiprocessing.get_context("fork")
    processes = [context.Process(target=_writer, args=(path, w, rows)) for w in range(workers)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(120)
    assert [p.exitcode for p in processes] == [0] * workers
    store = LatencyStore(path)
    assert store.count("ops") == workers * rows and store.count("networks") == workers * rows
    assert {(r.spec["worker"], r.spec["i"]) for r in store.networks()} == {(w, i) for w in range(workers)
                                                                           for i in range(rows)}
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def _write_with_inherited(store: LatencyStore) -> None:
    store.put_op(_signature(77), KEY, 1e-6, SPREAD)


def test_store_object_survives_fork(tmp_path):
    store = LatencyStore(tmp_path / "lat.db")
    store.put_op(_signature(1), KEY, 1e-6, SPREAD)
    child = multiprocessing.get_context("fork").Process(target=_write_with_inherited, args=(store,))
    child.start()
    child.join(60)
    assert child.exitcode == 0
    store.put_op(_signature(2), KEY, 1e-6, SPREAD)
    assert store.count("ops") == 3
