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
from hant.passes.substitute import (
    TEACHER, _observer, _probe, _tail, build_student, find_sites, replace_one_scores, substitute,
)

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


def test_activation_filter_keeps_unsuffixed_candidates():
    shape = SiteShape(16, 16, 1)
    relu = candidates_for(shape, ["identity", "conv", "ir"], activations=["relu"])
    assert "identity" in relu and "conv_k3_relu" in relu and "ir_k5_e4_se_relu" in relu
    assert not any(name.endswith(("_hswish", "_silu")) for name in relu)
    assert len(candidates_for(shape, ["conv"])) == 3 * len(candidates_for(shape, ["conv"], activations=["relu"]))
    with pytest.raises(PassError, match="unknown activations"):
        candidates_for(shape, ["conv"], activations=["gelu"])


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
    result = substitute(teacher, torch.randn(1, 1, 12, 12), _batches(), budget=1.0, cost="roofline:cpu",
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
    jobs = len(list((tmp_path / "one" / "jobs").rglob("*.pt")))
    assert jobs > 1 and len(list((tmp_path / "two" / "jobs").rglob("*.pt"))) == jobs


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


class _MacsPlusNodes(_MacsAsLatency):
    """MACs plus ``scale * rows ** power``. With ``power < 1`` parts priced alone add up to more
    than the whole, as sites timed alone do on a real runtime; with ``power > 1`` a student priced
    whole costs more than the rest of the teacher plus its sites (per-node work that grows with
    the graph)."""

    def __init__(self, name: str, scale: float, power: float):
        super().__init__()
        self.name, self.scale, self.power = name, scale, power

    def graph_cost(self, gm):
        report = self.flops.graph_cost(gm)
        return report.with_total_latency(float(report.total.macs) + self.scale * len(report.rows) ** self.power)


hant.cost_models.register("shared_work_test", lambda arg: _MacsPlusNodes("shared_work_test", 1e4, 0.5))
hant.cost_models.register("superlinear_test", lambda arg: _MacsPlusNodes("superlinear_test", 2000.0, 1.5))


def test_site_prices_are_scaled_to_the_whole_teacher_when_they_add_up_to_more(tmp_path):
    from hant.passes import PassManager
    teacher, x = _tiny(), torch.randn(1, 1, 12, 12)
    result = substitute(teacher, x, _batches(), budget=1.0, cost="shared_work_test", candidates=["identity"],
                        run_dir=tmp_path, steps=2, show_progress=False)
    deployed = PassManager("exact", cost=None, check=None)(hant.trace(teacher, x)).graph_module
    whole = hant.cost_models.get("shared_work_test").graph_cost(deployed)
    alone = sum(result.options[s.name]["teacher"].latency_s for s in result.sites)
    assert result.teacher_latency_s == pytest.approx(whole.latency_s, rel=1e-9)
    assert result.fixed_latency_s == pytest.approx(0.0, abs=1e-6) and alone == pytest.approx(whole.latency_s, rel=1e-9)
    assert result.solve(1.0).choice == {s.name: "teacher" for s in result.sites}


def test_checked_choice_meets_the_budget_when_site_prices_do_not_add_up(tmp_path):
    result = substitute(_tiny(), torch.randn(1, 1, 12, 12), _batches(), budget=1.0, cost="superlinear_test",
                        candidates=["identity", "conv", "dws", "svd"], run_dir=tmp_path, steps=2, show_progress=False)
    repaired = 0
    for budget in (0.5, 0.6, 0.7, 0.8, 0.9, 1.0):
        limit = budget * result.teacher_latency_s
        plain, checked = result.solve(budget, check=False), result.solve(budget)
        assert plain.predicted_latency_s == plain.sites_latency_s <= limit * (1 + 1e-9)
        # the prediction is the cost model's price of the very student that for_budget builds
        assert checked.within_budget and checked.predicted_latency_s <= limit * (1 + 1e-9)
        assert checked.predicted_latency_s == pytest.approx(
            hant.cost_models.get("superlinear_test").graph_cost(result.for_budget(budget)).latency_s, rel=1e-9)
        if result.whole_price(plain.choice) <= limit:
            assert checked.total_score <= plain.total_score    # never worse than the program alone when it holds
        else:
            repaired += 1
            assert checked.rounds > 1 and checked.total_score >= plain.total_score
    assert repaired, "the additive program never missed the budget here: the check was not exercised"
    assert "sum of sites ms" in result.pareto_table()


def test_students_priced_for_other_budgets_compete_and_keep_the_extra_constraints(tmp_path):
    from hant.passes.selection import ExtraConstraint

    result = substitute(_tiny(), torch.randn(1, 1, 12, 12), _batches(), budget=1.0, cost="superlinear_test",
                        candidates=["identity", "conv", "dws", "svd"], run_dir=tmp_path, steps=2, show_progress=False)
    # over a sweep of budgets the score never gets worse as the budget loosens
    scores = [result.solve(b).total_score for b in (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)]
    assert all(later <= sooner + 1e-12 for sooner, later in zip(scores, scores[1:]))

    # the last site swapped for its best-scoring candidate, as if an earlier budget had priced that
    # student whole, cheaply: no other student within budget scores better, so it is the answer
    names = [s.name for s in result.sites]
    site = names[-1]
    score = {c: option.score_of(result.score_kind) for c, option in result.options[site].items()}
    swap = min((c for c in score if c != TEACHER), key=score.get)
    earlier = {n: (swap if n == site else TEACHER) for n in names}
    assert result.solve(0.55).choice != earlier
    result._whole_prices[tuple(sorted(earlier.items()))] = 0.3 * result.teacher_latency_s
    found = result.solve(0.55)
    assert found.choice == earlier and found.within_budget and found.total_score == pytest.approx(score[swap])
    # ... unless an extra constraint rules it out
    values = [[1.0 if (n == site and c == swap) else 0.0 for c in result.options[n]] for n in names]
    other = result.solve(0.55, extra=[ExtraConstraint(values, upper=0.0, name="not that one")])
    assert other.choice[site] != swap and other.within_budget


class _Drifting(_MacsAsLatency):
    """MACs, 5 % dearer on every call: a machine that slows down while it is measured."""
    name = "drifting_test"

    def __init__(self):
        super().__init__()
        self.calls = 0

    def graph_cost(self, gm):
        self.calls += 1
        report = self.flops.graph_cost(gm)
        return report.with_total_latency(float(report.total.macs) * 1.05 ** self.calls)


def test_budget_one_keeps_the_teacher_even_when_the_cost_model_drifts(tmp_path):
    result = substitute(_tiny(), torch.randn(1, 1, 12, 12), _batches(), budget=1.0, cost=_Drifting(),
                        candidates=["identity", "conv"], run_dir=tmp_path, steps=2, show_progress=False)
    solution = result.solve(1.0)
    assert set(solution.choice.values()) == {TEACHER} and solution.within_budget
    assert solution.predicted_latency_s == result.teacher_latency_s


class _Comparing(_MacsAsLatency):
    """MACs, and a comparison of two graphs that says twice their MAC ratio (so its use shows)."""
    name = "comparing_test"

    def relative_latency(self, gm, reference):
        return 2.0 * self.graph_cost(gm).latency_s / self.graph_cost(reference).latency_s


def test_students_are_priced_against_the_teacher_by_a_comparing_cost_model(tmp_path):
    from hant.passes import PassManager

    teacher, x = _tiny(), torch.randn(1, 1, 12, 12)
    result = substitute(teacher, x, _batches(), budget=1.0, cost=_Comparing(), candidates=["conv"], run_dir=tmp_path,
                        steps=2, show_progress=False)
    choice = {s.name: TEACHER for s in result.sites}
    choice["block"] = "conv_k1_relu"
    deployed = PassManager("exact", cost=None, check=None)(hant.trace(teacher, x)).graph_module
    ratio = _MacsAsLatency().graph_cost(build_student(result, choice)).latency_s / \
        _MacsAsLatency().graph_cost(deployed).latency_s
    assert result.whole_price(choice) == pytest.approx(result.teacher_latency_s * 2.0 * ratio, rel=1e-9)


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
    choice = {site: min((c for c in opts if c.startswith("conv_")), key=lambda c: opts[c].latency_s)
              for site, opts in tiny_result.options.items()}
    student = build_student(tiny_result, choice)
    modules = [n.target for n in student.graph.nodes if n.op == "call_module"]
    assert len([m for m in modules if "conv" in m]) >= 2
    x = _batches(1, seed=3)[0]
    assert student(x).shape == (8, 10)
    assert _MacsAsLatency().graph_cost(student).latency_s == pytest.approx(
        tiny_result.fixed_latency_s + sum(tiny_result.options[s][c].latency_s for s, c in choice.items()), rel=0.02)


def test_dominated_candidates_are_never_trained(tiny_result, tmp_path):
    # a candidate priced no faster than the teacher's block could never be chosen: it is not distilled
    for site, opts in tiny_result.options.items():
        teacher = opts[TEACHER].latency_s
        assert all(o.latency_s < teacher for c, o in opts.items() if c != TEACHER)
        trained = {p.stem for p in (Path(opts[TEACHER].path or next(o.path for o in opts.values() if o.path))
                                    .parent).glob("*.pt")}
        assert trained == set(opts) - {TEACHER}
    # the tiny stem's 3x3 conv is the teacher's own shape: dominated, so pruned
    assert "conv_k3_relu" not in tiny_result.options["stem"]
    kept = substitute(_tiny(), torch.randn(1, 1, 12, 12), _batches(), budget=1.0, cost="flops_latency_test",
                      candidates=["conv"], run_dir=tmp_path, steps=2, prune_dominated=False, show_progress=False)
    assert "conv_k3_relu" in kept.options["stem"]


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
                        cost="roofline:cpu", candidates=["identity", "conv", "dws"], activations=["relu"],
                        run_dir=tmp_path,
                        steps=20, calibration_batches=3, finetune_epochs=1, finetune_steps=5, show_progress=False,
                        evaluate=lambda m: digits.evaluate(m, test))
    best = next(s for s in result.solutions if s.budget == 1.0)
    assert best.accuracy == pytest.approx(digits.evaluate(teacher, test), abs=1e-6)
    main = next(s for s in result.solutions if s.budget == 0.6)
    assert main.predicted_latency_s <= 0.6 * result.teacher_latency_s * (1 + 1e-9)
    assert 0.0 <= main.accuracy <= 1.0


@pytest.mark.parametrize("arch", ["resnet18", "tiny"])
def test_tail_after_a_site_reproduces_the_teacher(arch):
    # the rest of the network after a site, fed the site's output and the live values
    # around it (skip connections), gives the teacher's output
    if arch == "tiny":
        model, x = _tiny(), _batches(1)[0]
    else:
        torchvision = pytest.importorskip("torchvision")
        from tests.helpers import randomize_bn
        model, x = randomize_bn(torchvision.models.resnet18(), 0).eval(), torch.randn(2, 3, 32, 32)
    gm = hant.trace(model, x[:1])
    with torch.no_grad():
        expected = gm(x)
        for site in find_sites(gm):
            tail, live = _tail(gm, site)
            (values, out) = _probe(gm, [site.region.exit, *live])(x)
            torch.testing.assert_close(out, expected)
            torch.testing.assert_close(tail(*values), expected, rtol=1e-5, atol=1e-5)


def test_replace_one_scores_the_teacher_block_zero_and_a_bad_one_high():
    gm = hant.trace(_tiny(), torch.randn(1, 1, 12, 12))
    sites = find_sites(gm)
    block = sites[1].region.extract(gm)
    zero = nn.Conv2d(8, 16, 3, 2, 1)
    nn.init.zeros_(zero.weight)
    scores = replace_one_scores(gm, sites, {sites[1].name: {"teacher_copy": block, "zero": zero}}, _batches(),
                                show_progress=False)
    assert scores[sites[1].name]["teacher_copy"] == pytest.approx(0.0, abs=1e-6)
    # the same as swapping the block in the network itself and comparing softmaxes
    swapped = _tiny()
    swapped.block = zero
    with torch.no_grad():
        expected = [nn.functional.kl_div(swapped(x).log_softmax(-1), _tiny()(x).log_softmax(-1), log_target=True,
                                         reduction="batchmean").item() for x in _batches()]
    assert scores[sites[1].name]["zero"] == pytest.approx(sum(expected) / len(expected), rel=1e-4)
    assert scores[sites[1].name]["zero"] > 1e-4
    assert sites[0].name not in scores


def test_selection_by_replace_one_score(tmp_path):
    result = substitute(_tiny(), torch.randn(1, 1, 12, 12), _batches(), budget=0.5, budgets=[1.0],
                        cost="flops_latency_test", candidates=["identity", "conv", "dws"], activations=["relu"],
                        select=["conv_*", "dws_k3_*"], run_dir=tmp_path, steps=5, score="replace_one",
                        show_progress=False)
    for opts in result.options.values():
        assert set(opts) - {TEACHER} <= {"conv_k1_relu", "conv_k3_relu", "conv_k5_relu", "dws_k3_relu"}
        assert opts[TEACHER].replace_one == 0.0
        assert all(o.score == o.replace_one and o.replace_one >= 0 for o in opts.values())
    solution = next(s for s in result.solutions if s.budget == 0.5)
    assert solution.score_kind == "replace_one"
    assert solution.total_score == pytest.approx(sum(result.options[s][c].replace_one
                                                     for s, c in solution.choice.items()))
    # the same distillation, selected by the other score
    by_distill = result.solve(0.5, score="distill")
    assert by_distill.total_score == pytest.approx(sum(result.options[s][c].distill_loss
                                                       for s, c in by_distill.choice.items()))
    with pytest.raises(PassError, match="unknown score"):
        result.solve(0.5, score="accuracy")


def test_every_budget_is_fine_tuned_but_the_teacher(tmp_path):
    x = _batches(1, seed=9)[0]
    with torch.no_grad():
        reference = _tiny()(x)

    def closeness(module):
        with torch.no_grad():
            return -float((module(x) - reference).pow(2).mean())

    result = substitute(_tiny(), torch.randn(1, 1, 12, 12), _batches(), budget=0.5, budgets=[0.8, 1.0],
                        cost="flops_latency_test", candidates=["identity", "conv"], run_dir=tmp_path, steps=3,
                        finetune_epochs=1, finetune_steps=2, finetune_alpha=1.0, evaluate=closeness,
                        show_progress=False)
    for solution in result.solutions:
        replaced = any(c != TEACHER for c in solution.choice.values())
        assert (tmp_path / f"finetune_b{solution.budget:.2f}_distill" / "finetune.pt").exists() == replaced
        assert (solution.accuracy_before_finetune is not None) == replaced
    # prices are kept for every candidate, pruned or not, so a rerun prices nothing again
    import json
    prices = json.loads((tmp_path / "prices.json").read_text())["flops_latency_test"]
    assert set(prices["stem"]) == {TEACHER, "identity", *candidates_for(result.sites[0].shape, ["conv"])} - \
        ({"identity"} if not result.sites[0].shape.keeps_shape else set())
