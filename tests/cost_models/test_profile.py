"""hant profile: deterministic specs, stored networks with node latencies, resume after a kill, the CLI."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import torch

import hant
from hant.cost_models.base import COMPUTE_SKIP_KINDS
from hant.cost_models.netspace import build, input_shape
from hant.cost_models.profile import profile, profile_specs
from hant.cost_models.store import LatencyStore, canonical_json
from hant.cost_models.timing import TimingConfig
from hant.graphs.ops import op_kind
from hant.tools.cli import main

FAST = TimingConfig(warmup_s=0.0, warmup_runs=2, block_s=0.0005, min_samples=5, max_samples=40, time_cap_s=0.03)




def _profile(n, path, **kwargs):
    return profile(n, path, runtime="onnxruntime", threads=1, space="tiny", op_timing=FAST, graph_timing=FAST,
                   progress=False, **kwargs)


def test_specs_depend_only_on_seed_and_index():
    assert profile_specs(3, seed=5, space="tiny") == profile_specs(5, seed=5, space="tiny")[:3]
    assert profile_specs(3, seed=5, space="tiny") != profile_specs(3, seed=6, space="tiny")


def test_profile_stores_networks_with_node_latencies(tmp_path):
    path = tmp_path / "p.db"
    summary = _profile(2, path, seed=1)
    assert (summary.total, summary.measured, summary.skipped) == (2, 2, 0) and summary.store == str(path)
    store = LatencyStore(path)
    records = list(store.networks(runtime="onnxruntime"))
    assert [r.spec for r in records] == profile_specs(2, seed=1, space="tiny")
    for record in records:
        assert record.latency_s > 0 and record.spread.n >= 3 and record.input_shape == input_shape(record.spec)
        gm = hant.trace(build(record.spec), torch.randn(record.input_shape))
        compute = [n for n in gm.graph.nodes if n.op not in COMPUTE_SKIP_KINDS]
        assert list(record.node_latencies) == [n.name for n in compute]
        assert all(record.node_latencies[n.name] > 0 for n in compute if op_kind(n) in ("conv", "linear"))
    # every measured op went to the op table too, with counts; those that do work calibrate the roofline
    ops = list(store.ops())
    assert ops and all(r.macs is not None and r.bytes is not None for r in ops)
    assert len(list(store.calibration_samples())) == sum(1 for r in ops if r.macs or r.bytes) > 0


def test_no_nodes_and_rerun_skips_everything(tmp_path):
    path = tmp_path / "p.db"
    _profile(2, path, seed=2, measure_nodes=False)
    before = [(r.spec, r.latency_s) for r in LatencyStore(path).networks()]
    assert all(r.node_latencies is None for r in LatencyStore(path).networks())
    again = _profile(2, path, seed=2, measure_nodes=False)
    assert (again.measured, again.skipped) == (0, 2)
    assert [(r.spec, r.latency_s) for r in LatencyStore(path).networks()] == before
    assert LatencyStore(path).count("ops") == 0


def test_resume_after_a_killed_process(tmp_path):
    path, n = tmp_path / "killed.db", 8
    script = textwrap.dedent(f"""
        import torch
        torch.set_num_threads(1)
        from hant.cost_models.profile import profile
        from hant.cost_models.timing import TimingConfig
        fast = TimingConfig(warmup_s=0.0, warmup_runs=2, block_s=0.0005, min_samples=5, max_samples=40,
                            time_cap_s=0.2)
        profile({n}, {str(path)!r}, runtime="onnxruntime", threads=1, seed=3, space="tiny", measure_nodes=False,
                op_timing=fast, graph_timing=fast, progress=False)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and child.poll() is None:
            if path.exists() and LatencyStore(path).count("networks") >= 2:
                break
            time.sleep(0.05)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    done = {canonical_json(r.spec): r.latency_s for r in LatencyStore(path).networks()}
    assert 2 <= len(done) < n, "the child should have been killed part-way"
    summary = _profile(n, path, seed=3, measure_nodes=False)
    assert (summary.skipped, summary.measured) == (len(done), n - len(done))
    after = {canonical_json(r.spec): r.latency_s for r in LatencyStore(path).networks()}
    assert len(after) == n and set(after) == {canonical_json(s) for s in profile_specs(n, seed=3, space="tiny")}
    assert all(after[spec] == latency for spec, latency in done.items())      # nothing measured twice


def test_cli_profile(tmp_path, capsys):
    path = tmp_path / "cli.db"
    code = main(["profile", "--runtime", "onnxruntime", "--n", "1", "--out", str(path), "--threads", "1",
                 "--seed", "4", "--space", "tiny", "--no-nodes"])
    assert code == 0 and "profiled 1 networks" in capsys.readouterr().out
    assert LatencyStore(path).count("networks") == 1
    assert main(["profile", "--n", "0", "--out", str(path)]) == 2
