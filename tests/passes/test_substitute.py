"""Operator substitution: candidates, distillation persistence and sharding, choice, student."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import hant
from hant.errors import PassError
from hant.passes.candidates import SiteShape, candidates_for
from hant.passes.site_distill import DistillConfig, capture_sites, collect_results, distill_jobs
from hant.passes.substitute import TEACHER, _observer, build_student, find_sites, substitute

REPO = Path(__file__).resolve().parents[2]


class TinyNet(nn.Module):
    """Two conv-BN-ReLU blocks and a head: two natural sites, cheap to distil."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.block(self.stem(x)).mean((2, 3)))


def _tiny():
    torch.manual_seed(0)
    return TinyNet().eval()


def _batches(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 1, 12, 12, generator=g) for _ in range(n)]


@pytest.mark.parametrize("shape", [SiteShape(16, 16, 1), SiteShape(16, 32, 2), SiteShape(24, 16, 1),
                                   SiteShape(3, 32, 2)])
def test_every_candidate_builds_and_matches_the_site_shape(shape):
    table = candidates_for(shape)
    assert len(table) >= 100
    x = torch.randn(2, shape.in_channels, 16, 16)
    for name, factory in table.items():
        y = factory().eval()(x)
        assert y.shape == (2, shape.out_channels, 16 // shape.stride, 16 // shape.stride), name


def test_identity_only_where_shapes_allow():
    assert "identity" in candidates_for(SiteShape(8, 8, 1))
    assert "identity" not in candidates_for(SiteShape(8, 16, 1))
    assert "identity" not in candidates_for(SiteShape(8, 8, 2))


def test_sites_of_real_networks_are_their_blocks():
    torchvision = pytest.importorskip("torchvision")
    gm = hant.trace(torchvision.models.resnet18().eval(), torch.randn(1, 3, 64, 64))
    assert [s.region.module for s in find_sites(gm)] == [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    gm = hant.trace(torchvision.models.mobilenet_v2().eval(), torch.randn(1, 3, 64, 64))
    assert [s.region.module for s in find_sites(gm)] == [f"features.{i}" for i in range(19)]


def test_named_sites_and_bad_names():
    gm = hant.trace(_tiny(), torch.randn(1, 1, 12, 12))
    assert [s.name for s in find_sites(gm, ["block"])] == ["block"]
    with pytest.raises(PassError, match="natural sites are"):
        find_sites(gm, ["no.such.module"])


def _jobs_and_captures():
    gm = hant.trace(_tiny(), torch.randn(1, 1, 12, 12))
    sites = find_sites(gm)
    captures = capture_sites(_observer(gm, sites), _batches(), [s.name for s in sites])
    jobs = {s.name: candidates_for(s.shape, ["identity", "conv"]) for s in sites}
    return captures, jobs


def test_distillation_resumes_and_redoes_nothing(tmp_path):
    captures, jobs = _jobs_and_captures()
    config = DistillConfig(steps=5)
    total = sum(len(j) for j in jobs.values())
    assert distill_jobs(captures, jobs, config, tmp_path, show_progress=False) == total
    files = sorted((tmp_path / "jobs").rglob("*.pt"))
    stamps = {p: p.stat().st_mtime_ns for p in files}
    # a kill mid-run leaves some jobs unwritten: remove two, resume, only those are trained
    files[0].unlink()
    files[3].unlink()
    assert distill_jobs(captures, jobs, config, tmp_path, show_progress=False) == 2
    for p in files[1:3] + files[4:]:
        assert p.stat().st_mtime_ns == stamps[p]
    assert distill_jobs(captures, jobs, config, tmp_path, show_progress=False) == 0
    scores = collect_results(tmp_path, jobs)
    assert all(r.loss >= 0 for site in scores.values() for r in site.values())


def test_missing_jobs_are_named(tmp_path):
    _, jobs = _jobs_and_captures()
    with pytest.raises(PassError, match="unfinished"):
        collect_results(tmp_path, jobs)


def test_sharding_gives_the_same_scores_in_process(tmp_path):
    captures, jobs = _jobs_and_captures()
    config = DistillConfig(steps=5)
    distill_jobs(captures, jobs, config, tmp_path / "one", show_progress=False)
    for rank in range(2):
        distill_jobs(captures, jobs, config, tmp_path / "two", rank=rank, world=2, show_progress=False)
    one, two = collect_results(tmp_path / "one", jobs), collect_results(tmp_path / "two", jobs)
    for site in one:
        for cand in one[site]:
            assert one[site][cand].loss == pytest.approx(two[site][cand].loss, rel=1e-6, abs=1e-9)


_WORKER = textwrap.dedent("""
    import json, sys, torch
    torch.set_num_threads(1)
    sys.path.insert(0, sys.argv[2])
    from test_substitute import TinyNet, _batches
    from hant.passes.substitute import substitute
    torch.manual_seed(0)
    teacher = TinyNet().eval()
    result = substitute(teacher, torch.randn(1, 1, 12, 12), _batches(), budget=1.0, cost="flops",
                        candidates=["identity", "conv"], run_dir=sys.argv[1], steps=5, show_progress=False)
    if result is not None:
        scores = {s: {c: o.score for c, o in opts.items()} for s, opts in result.options.items()}
        json.dump(scores, open(sys.argv[1] + "/scores.json", "w"))
""")


@pytest.mark.slow
def test_torchrun_two_processes_match_one(tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(_WORKER)
    here = str(Path(__file__).parent)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(worker), str(tmp_path / "one"), here], check=True, env=env, timeout=600)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
                    str(worker), str(tmp_path / "two"), here], check=True, env=env, timeout=600)
    import json
    one = json.loads((tmp_path / "one" / "scores.json").read_text())
    two = json.loads((tmp_path / "two" / "scores.json").read_text())
    assert one.keys() == two.keys()
    for site in one:
        for cand in one[site]:
            assert one[site][cand] == pytest.approx(two[site][cand], rel=1e-5, abs=1e-9)
    # both ranks wrote jobs: the split really happened
    assert len(list((tmp_path / "two" / "jobs").rglob("*.pt"))) == len(list((tmp_path / "one" / "jobs").rglob("*.pt")))


@pytest.fixture(scope="module")
def tiny_result(tmp_path_factory):
    return substitute(_tiny(), torch.randn(1, 1, 12, 12), _batches(), budget=1.0, budgets=[0.3, 0.5, 0.8],
                      cost="flops_latency_test", candidates=["identity", "conv", "dws", "svd"],
                      run_dir=tmp_path_factory.mktemp("run"), steps=10, show_progress=False)


class _MacsAsLatency:
    """A cost model whose latency is the MAC count, so budgets are exact and machine-independent."""
    name = "flops_latency_test"

    def __init__(self):
        self.flops = hant.cost_models.get("flops")

    def node_cost(self, node):
        import dataclasses
        cost = self.flops.node_cost(node)
        return dataclasses.replace(cost, latency_s=float(cost.macs))

    def graph_cost(self, gm):
        report = self.flops.graph_cost(gm)
        return report.with_total_latency(float(report.total.macs))


hant.cost_models.register("flops_latency_test", lambda arg: _MacsAsLatency())


def test_budget_one_keeps_the_teacher(tiny_result):
    solution = next(s for s in tiny_result.solutions if s.budget == 1.0)
    assert set(solution.choice.values()) == {TEACHER}
    assert solution.total_score == 0.0
    x = torch.randn(4, 1, 12, 12)
    torch.testing.assert_close(tiny_result.student(x), _tiny()(x), rtol=1e-4, atol=1e-5)


def test_every_budget_is_respected(tiny_result):
    for solution in tiny_result.solutions:
        assert solution.predicted_latency_s <= solution.budget * tiny_result.teacher_latency_s * (1 + 1e-9)
        student = tiny_result.for_budget(solution.budget)
        measured = _MacsAsLatency().graph_cost(student).latency_s
        # the student's own price agrees with the prediction assembled from site prices
        assert measured == pytest.approx(solution.predicted_latency_s, rel=0.02)
    scores = [s.total_score for s in tiny_result.solutions]
    assert scores == sorted(scores, reverse=True)   # more budget never scores worse
    assert "budget" in tiny_result.pareto_table()
    assert "chosen" in tiny_result.report(tiny_result.solutions[0])


def test_student_uses_distilled_weights(tiny_result):
    import copy
    from hant.passes.substitute import _replace_region

    solution = tiny_result.solutions[0]
    replaced = [s for s in tiny_result.sites if solution.choice[s.name] != TEACHER]
    assert replaced
    student = build_student(tiny_result, solution.choice)

    def assemble(load_weights: bool):
        gm = copy.deepcopy(tiny_result.teacher)
        new_nodes = {}
        for site in replaced:
            name = solution.choice[site.name]
            module = tiny_result.modules[site.name][name]()
            if load_weights:
                state = torch.load(tiny_result.options[site.name][name].path, weights_only=True)
                module.load_state_dict(state["state_dict"])
            _replace_region(gm, site, module.eval(), name, new_nodes)
        gm.recompile()
        return gm

    x = _batches(1, seed=7)[0]
    with torch.no_grad():
        torch.testing.assert_close(student(x), assemble(True)(x), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(student(x), assemble(False)(x), rtol=1e-3, atol=1e-4)


def test_consecutive_sites_can_all_be_replaced(tiny_result):
    # the block's entry is the stem's exit: replacing both must chain the new modules
    choice = {s.name: "conv_k3_relu" for s in tiny_result.sites}
    student = build_student(tiny_result, choice)
    modules = [n.target for n in student.graph.nodes if n.op == "call_module"]
    assert len([m for m in modules if "conv_k3_relu" in m or "conv" in m]) >= 2
    x = _batches(1, seed=3)[0]
    assert student(x).shape == (8, 10)
    assert _MacsAsLatency().graph_cost(student).latency_s == pytest.approx(
        tiny_result.fixed_latency_s + sum(tiny_result.options[s][c].latency_s for s, c in choice.items()), rel=0.02)


def test_infeasible_budget_says_what_to_do(tiny_result):
    with pytest.raises(PassError, match="Raise the budget"):
        tiny_result.solve(0.0001)


def test_teacher_is_not_mutated(tmp_path):
    teacher = _tiny()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    substitute(teacher, torch.randn(1, 1, 12, 12), _batches(), budget=0.8, cost="flops_latency_test",
               candidates=["conv"], run_dir=tmp_path, steps=3, show_progress=False)
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k])


@pytest.mark.slow
def test_digits_end_to_end(tmp_path):
    digits = pytest.importorskip("hant.tools.digits")
    # a briefly trained teacher keeps CI fast on a cold cache; the flow is the same as for the full one
    teacher = digits.teacher(config=digits.TrainConfig(arch="mobilenet", epochs=2, batch_size=128), progress=False)
    train, test = digits.loaders(64)
    result = substitute(teacher, torch.randn(1, 1, 32, 32), train, budget=0.6, budgets=[1.0],
                        cost="roofline:cpu", candidates=["identity", "conv", "dws"], run_dir=tmp_path,
                        steps=20, calibration_batches=3, finetune_epochs=1, finetune_steps=5, show_progress=False,
                        evaluate=lambda m: digits.evaluate(m, test))
    best = next(s for s in result.solutions if s.budget == 1.0)
    assert best.accuracy == pytest.approx(digits.evaluate(teacher, test), abs=1e-6)
    main = next(s for s in result.solutions if s.budget == 0.6)
    assert main.predicted_latency_s <= 0.6 * result.teacher_latency_s * (1 + 1e-9)
    assert 0.0 <= main.accuracy <= 1.0
