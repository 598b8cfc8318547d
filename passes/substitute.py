"""Operator substitution, HANT / LANA style: distil candidates per site, choose by integer program.

1. **Sites** are natural single-entry single-exit regions of the traced teacher (ResNet
   blocks, inverted residuals, conv-BN-act stems), or regions of modules the user names.
2. **Pricing**: each candidate is priced at its site by the target's cost model (after
   exact folding, as it would be deployed). A candidate no faster than the teacher's own
   block is dominated (the teacher scores 0 and is faster) and, by default, never trained.
   The whole teacher is priced too: the rest of the network is a fixed cost, and when the
   sites priced alone add up to more than the whole, every site price is scaled down to
   agree with it (a student is predicted as the rest plus its sites).
3. **Distillation** (:mod:`hant.passes.site_distill`): every remaining candidate of every
   site learns to map the teacher's site input to the teacher's site output; the final
   normalised MSE is its ``distill`` score (the teacher itself scores 0). Resumable and
   shardable. Optionally the LANA ``replace_one`` score: how far the teacher's output moves
   (KL divergence of its softmax for classifiers, normalised MSE otherwise) with only
   that site swapped for the distilled candidate, on held-out batches.
4. **Choice**: a multiple-choice knapsack (HiGHS) picks one candidate per site, minimising
   the total score under a latency budget. One distillation serves every budget and score.
   Site prices add up only approximately (folds, fusions and layout changes across site
   boundaries), so the chosen student is assembled and priced whole; when that misses the
   budget, the program is solved again with the budget moved by the gap (a few rounds).
5. **Student**: FX surgery puts the chosen candidates in place of their regions, then the
   exact passes run. Optional fine-tuning with knowledge distillation from the teacher.
"""

from __future__ import annotations

import copy
import fnmatch
import hashlib
import json
import os
import pydoc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tabulate import tabulate
from torch.fx import GraphModule, Node

from hant.cost_models import get as get_cost_model
from hant.errors import PassError
from hant.graphs import conv_of, trace
from hant.graphs.regions import Region, natural_regions
from hant.graphs.trace import as_input_tuple
from hant.passes.distill import finetune
from hant.passes.candidates import SiteShape, candidates_for, low_rank_conv
from hant.passes.manager import PassManager
from hant.passes.selection import multiple_choice
from hant.passes.site_distill import (
    DistillConfig, capture_sites, collect_results, distill_jobs, distributed_context, normalized_mse, write_manifest,
)
from hant.passes.surgery import add_module, copy_meta, readable

__all__ = ["Site", "find_sites", "SiteOption", "SubstituteResult", "substitute", "build_student", "TEACHER",
           "SVD_RANKS", "SCORES", "replace_one_scores"]

TEACHER = "teacher"
SVD_RANKS = (25, 50)      # percent of full rank of each of the teacher's convs
SCORES = ("distill", "replace_one")
CHECK_ROUNDS = 4          # integer programs per budget when the assembled student is checked whole


# ---------------------------------------------------------------- sites

@dataclass(frozen=True)
class Site:
    """A substitution site: a region of the teacher and the shape contract candidates must meet."""
    name: str                  # readable, unique: the module path with dots as underscores
    region: Region
    shape: SiteShape
    input_shape: tuple[int, ...]   # (N, C, H, W) of the traced example input


def _module_types(gm: GraphModule) -> dict[str, Any]:
    """Qualified module name -> its class (or class path string), from ``nn_module_stack`` meta."""
    types: dict[str, Any] = {}
    for node in gm.graph.nodes:
        for key, value in (node.meta.get("nn_module_stack") or {}).items():
            path, cls = value if isinstance(value, tuple) else (key, value)
            types.setdefault(path, pydoc.locate(cls) if isinstance(cls, str) else cls)
    return types


def _is_container(cls: Any) -> bool:
    return isinstance(cls, type) and issubclass(cls, (nn.Sequential, nn.ModuleList, nn.ModuleDict))


def _site_shape(region: Region) -> SiteShape | None:
    a, b = region.input_shape, region.output_shape
    if a is None or b is None or len(a) != 4 or len(b) != 4 or a[0] != b[0]:
        return None
    if b[2] == 0 or a[2] % b[2] or a[3] % b[3] or a[2] // b[2] != a[3] // b[3] or a[2] // b[2] not in (1, 2):
        return None
    return SiteShape(int(a[1]), int(b[1]), a[2] // b[2])


def find_sites(gm: GraphModule, names: Sequence[str] | None = None) -> list[Site]:
    """The substitution sites of ``gm``, in graph order.

    With ``names`` (module paths such as ``layer1.0``), exactly those modules' regions; a
    name that is not a single-entry single-exit NCHW region raises :class:`PassError`.
    Without, the block-level natural regions: the largest non-overlapping regions that
    hold a conv and are not mere containers (Sequential) of other such blocks. That picks
    ResNet basic blocks and inverted residuals, and stems (conv-BN-act) between them.
    """
    by_module: dict[str, Region] = {}
    for region in natural_regions(gm):
        if region.module is not None and region.module not in by_module:
            by_module[region.module] = region
    if names is not None:
        chosen = []
        for name in names:
            region = by_module.get(name)
            if region is None or _site_shape(region) is None:
                raise PassError(f"module {name!r} is not a single-entry single-exit NCHW region of the teacher; "
                                f"natural sites are: {', '.join(sorted(by_module)) or 'none'}")
            chosen.append(region)
    else:
        types = _module_types(gm)
        usable = [r for r in by_module.values()
                  if _site_shape(r) is not None and any(conv_of(n) is not None for n in r.interior(gm))]
        blocks = [r for r in usable if not _is_container(types.get(r.module))]
        fillers = [r for r in usable if _is_container(types.get(r.module))
                   and not any(set(b.nodes) <= set(r.nodes) for b in blocks)]
        chosen, taken = [], set()
        for group in (blocks, fillers):   # outermost blocks first, then stems between them
            for region in sorted(group, key=lambda r: -len(r.nodes)):
                if taken.isdisjoint(region.nodes):
                    chosen.append(region)
                    taken.update(region.nodes)
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    chosen.sort(key=lambda r: order[r.exit])
    return [Site(readable(r.module), r, _site_shape(r), tuple(r.input_shape)) for r in chosen]


# ---------------------------------------------------------------- graph surgery

def _reading(gm: GraphModule, pick: Callable[[dict[str, Node], Node], Any], name: str) -> GraphModule:
    """A module sharing ``gm``'s weights whose output is ``pick(nodes by name, gm's output value)``."""
    graph = copy.deepcopy(gm.graph)
    by_name = {n.name: n for n in graph.nodes}
    output = next(n for n in graph.nodes if n.op == "output")
    with graph.inserting_before(output):
        graph.output(pick(by_name, output.args[0]))
    graph.erase_node(output)
    return GraphModule(gm, graph, name)


def _observer(gm: GraphModule, sites: Sequence[Site]) -> GraphModule:
    """A module sharing ``gm``'s weights whose output is ``{site: (input, output)}``."""
    return _reading(gm, lambda by_name, _: {s.name: (by_name[s.region.entry], by_name[s.region.exit]) for s in sites},
                    "SiteObserver")


def _replace_region(gm: GraphModule, site: Site, module: nn.Module, label: str,
                    replaced: dict[str, Node] | None = None) -> Node:
    """Put ``module`` in place of the site's region in ``gm`` (in place) and erase the region's nodes.

    ``replaced`` maps exit names of regions replaced earlier to their new nodes: the entry
    of a block is often the exit of the block before it. It is updated with this site.
    """
    replaced = {} if replaced is None else replaced
    entry = replaced.get(site.region.entry) or site.region.entry_node(gm)
    exit_ = site.region.exit_node(gm)
    target = add_module(gm, f"{site.name}_{label}", module)
    with gm.graph.inserting_before(exit_):
        new = gm.graph.call_module(target, (entry,))
    new.name = gm.graph._graph_namespace.create_name(target, new)
    copy_meta(exit_, new)
    exit_.replace_all_uses_with(new)
    for node in reversed(site.region.interior(gm)):
        if not node.users:
            gm.graph.erase_node(node)
    replaced[site.region.exit] = new
    return new


def _low_rank_teacher(block: GraphModule, percent: int) -> nn.Module | None:
    """The teacher block with each ungrouped k x k conv replaced by its rank-reduced SVD, or None."""
    block = copy.deepcopy(block)
    replaced = False
    for node in block.graph.nodes:
        view = conv_of(node)
        if view is None or view.module is None or view.groups != 1 or view.transposed or view.spatial_dims != 2:
            continue
        conv = view.module
        full = min(conv.out_channels, conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1])
        rank = max(1, full * percent // 100)
        parent, _, attr = node.target.rpartition(".")
        setattr(block.get_submodule(parent) if parent else block, attr, low_rank_conv(conv, rank))
        replaced = True
    return block if replaced else None


# ---------------------------------------------------------------- options and results

@dataclass
class SiteOption:
    """One candidate at one site: its score (0 for the teacher) and priced latency.

    ``score`` is the one the result selects by (``SubstituteResult.score_kind``);
    ``distill_loss`` and ``replace_one`` (None where not computed) are both kept.
    """
    site: str
    candidate: str
    score: float
    latency_s: float
    params: int
    macs: int
    path: str = ""             # the distilled weights ("" for the teacher)
    distill_loss: float = 0.0
    replace_one: float | None = None

    def score_of(self, kind: str) -> float:
        """This option's score of ``kind`` (one of :data:`SCORES`)."""
        if kind == "distill":
            return self.distill_loss
        if kind == "replace_one":
            if self.replace_one is None:
                raise PassError("replace-one scores were not computed; run substitute(..., score='replace_one') "
                                "or with replace_one=True")
            return self.replace_one
        raise PassError(f"unknown score {kind!r}; choose one of {', '.join(SCORES)}")


@dataclass
class BudgetSolution:
    """The candidate chosen per site at one budget, and what it is predicted to cost.

    ``predicted_latency_s`` is the cost model's price of the assembled student, whole (the
    graph that would be deployed, with folds and fusions across site boundaries); the integer
    program's additive figure, the rest of the teacher plus the chosen site prices, is
    ``sites_latency_s``. ``within_budget`` says whether the whole price met the budget (see
    :meth:`SubstituteResult.solve`); ``rounds`` is how many integer programs were solved.
    """
    budget: float                  # fraction of the teacher's latency under the cost model
    choice: dict[str, str]         # site -> candidate
    predicted_latency_s: float
    total_score: float
    measured_latency_s: float | None = None
    accuracy: float | None = None
    score_kind: str = "distill"
    accuracy_before_finetune: float | None = None
    sites_latency_s: float | None = None
    within_budget: bool = True
    rounds: int = 1


def _better(best: BudgetSolution | None, found: BudgetSolution) -> BudgetSolution:
    """The better of two checked solutions: within budget first, then lower score, then cheaper."""
    if best is None or (found.within_budget, -found.total_score, -found.predicted_latency_s) > \
            (best.within_budget, -best.total_score, -best.predicted_latency_s):
        return found
    return best


def _meets(extra: Sequence, indices: Sequence[int]) -> bool:
    """Whether choosing option ``indices[s]`` at every site ``s`` meets every extra constraint."""
    for constraint in extra:
        total = sum(float(v[k]) for v, k in zip(constraint.values, indices))
        slack = 1e-9 * max(1.0, abs(total))
        if not constraint.lower - slack <= total <= constraint.upper + slack:
            return False
    return True


@dataclass
class SubstituteResult:
    """What ``substitute`` found: per-site options, the Pareto table, and students on demand.

    ``student`` is the student for ``budget``; ``for_budget(b)`` builds another from the
    same distillation (no retraining). ``str(result.report())`` and ``pareto_table()``
    print as tables.
    """
    teacher: GraphModule
    sites: list[Site]
    options: dict[str, dict[str, SiteOption]]
    modules: dict[str, dict[str, Callable[[], nn.Module]]]
    fixed_latency_s: float
    teacher_latency_s: float
    example_inputs: tuple
    cost_model: Any
    solutions: list[BudgetSolution] = field(default_factory=list)
    student: GraphModule | None = None
    budget: float | None = None
    score_kind: str = "distill"
    _whole_prices: dict = field(default_factory=dict, repr=False)
    deployed_teacher: GraphModule | None = field(default=None, repr=False)   # the teacher after exact passes

    def solve(self, budget: float, extra: Sequence = (), score: str | None = None,
              check: bool = True) -> BudgetSolution:
        """Choose one candidate per site under ``budget`` (a fraction of the teacher's latency).

        ``score`` (one of :data:`SCORES`) overrides the result's ``score_kind``. The integer
        program adds site prices, but a deployed student is not quite the sum of its parts:
        the exact passes fold across site boundaries and runtimes fuse and re-layout across
        them. With ``check`` (the default) the chosen student is assembled and priced whole by
        the cost model; when that price misses the budget, the program is solved again with
        the site budget moved by the gap just seen (whole price minus additive figure), for up
        to :data:`CHECK_ROUNDS` rounds or until a choice repeats. Students already priced whole
        for other budgets (and meeting ``extra``) compete too, so a student found for a tighter
        budget is never lost to a looser one. The answer is the best-scoring choice whose whole
        price meets the budget (``within_budget``), or, when none does, the one priced lowest, with
        ``within_budget=False``. ``check=False`` returns the first program's choice priced
        additively.
        """
        kind = score or self.score_kind
        names = [s.name for s in self.sites]
        cands = [list(self.options[n]) for n in names]
        scores = [[self.options[n][c].score_of(kind) for c in cs] for n, cs in zip(names, cands)]
        latencies = [[self.options[n][c].latency_s for c in cs] for n, cs in zip(names, cands)]
        limit = budget * self.teacher_latency_s
        gap, seen, best, failure = 0.0, set(), None, None
        for rounds in range(1, CHECK_ROUNDS + 1):
            try:
                picked = multiple_choice(scores, latencies, limit - gap - self.fixed_latency_s, extra=extra)
            except PassError as error:
                if not check:
                    raise
                failure = error
                break
            choice = {n: cs[k] for n, cs, k in zip(names, cands, picked.options)}
            additive = self.fixed_latency_s + picked.total_latency
            if not check:
                return BudgetSolution(budget, choice, additive, picked.total_score, score_kind=kind,
                                      sites_latency_s=additive)
            key = tuple(sorted(choice.items()))
            if key in seen:
                break
            seen.add(key)
            whole = self.whole_price(choice)
            found = BudgetSolution(budget, choice, whole, picked.total_score, score_kind=kind, sites_latency_s=additive,
                                   within_budget=whole <= limit * (1 + 1e-9), rounds=rounds)
            best = _better(best, found)
            if found.within_budget and gap >= 0.0 and whole >= additive:
                break            # met under a gap that only tightened: loosening could not keep the budget
            gap = whole - additive
        for key, whole in self._whole_prices.items():
            if whole > limit * (1 + 1e-9) or key in seen:
                continue
            choice = dict(key)
            indices = [cs.index(choice[n]) for n, cs in zip(names, cands)]
            if _meets(extra, indices):
                earlier = BudgetSolution(budget, choice, whole, sum(v[k] for v, k in zip(scores, indices)),
                                         score_kind=kind, rounds=rounds, sites_latency_s=self.fixed_latency_s + sum(
                                             t[k] for t, k in zip(latencies, indices)))
                best = _better(best, earlier)
        if best is None:
            raise failure
        best.rounds = rounds
        return best

    def whole_price(self, choice: dict[str, str]) -> float:
        """The cost model's latency of the student for ``choice``, assembled and priced whole (memoised).

        A cost model that times graphs against each other (``relative_latency(gm, reference)``, as
        the measured models do) prices the student as the teacher's latency times the student's
        time over the deployed teacher's in alternating rounds: budgets are fractions of the
        teacher's latency, and that ratio does not move with the machine's speed between pricing
        the teacher and pricing the student. The teacher everywhere is the teacher: its price is
        the teacher's (timing the rebuilt teacher again could put it over a budget of 1.0 by noise)."""
        if all(c == TEACHER for c in choice.values()):
            return self.teacher_latency_s
        key = tuple(sorted(choice.items()))
        if key not in self._whole_prices:
            student = build_student(self, choice)
            relative = getattr(self.cost_model, "relative_latency", None)
            if relative is not None:
                if self.deployed_teacher is None:
                    self.deployed_teacher = build_student(self, {s.name: TEACHER for s in self.sites})
                price = self.teacher_latency_s * float(relative(student, self.deployed_teacher))
            else:
                price = float(self.cost_model.graph_cost(student).latency_s)
            self._whole_prices[key] = price
        return self._whole_prices[key]

    def for_budget(self, budget: float, score: str | None = None) -> GraphModule:
        """The student for ``budget``, built from the distilled weights, with exact passes applied."""
        return build_student(self, self.solve(budget, score=score).choice)

    def report(self, solution: BudgetSolution | None = None) -> str:
        """Per site: the teacher op, the chosen op, its predicted latency and score."""
        if solution is None:
            solution = next((s for s in self.solutions if s.budget == self.budget), None)
        if solution is None:
            raise PassError("no budget was solved yet; call solve(budget) first")
        rows = []
        for site in self.sites:
            chosen = solution.choice[site.name]
            teacher, option = self.options[site.name][TEACHER], self.options[site.name][chosen]
            replace_one = "" if option.replace_one is None else f"{option.replace_one:.4f}"
            rows.append([site.name, site.region.module, f"{site.shape.in_channels}->{site.shape.out_channels}"
                         f"/s{site.shape.stride}", chosen, f"{teacher.latency_s * 1e6:.1f}",
                         f"{option.latency_s * 1e6:.1f}", f"{option.distill_loss:.4f}", replace_one])
        return tabulate(rows, headers=["site", "teacher module", "shape", "chosen", "teacher us", "chosen us",
                                       "distill nMSE", "replace-one"], tablefmt="github")

    def pareto_table(self) -> str:
        """One row per solved budget: predicted (whole student) and additive latency, measured latency and
        accuracy where known, total score and sites replaced."""
        rows = [[f"{s.budget:.2f}", s.score_kind, f"{s.predicted_latency_s * 1e3:.3f}" + ("" if s.within_budget
                                                                                         else " (over)"),
                 "" if s.sites_latency_s is None else f"{s.sites_latency_s * 1e3:.3f}",
                 "" if s.measured_latency_s is None else f"{s.measured_latency_s * 1e3:.3f}",
                 "" if s.accuracy_before_finetune is None else f"{s.accuracy_before_finetune:.4f}",
                 "" if s.accuracy is None else f"{s.accuracy:.4f}", f"{s.total_score:.4f}",
                 sum(c != TEACHER for c in s.choice.values())] for s in self.solutions]
        return tabulate(rows, headers=["budget", "score", "predicted ms", "sum of sites ms", "measured ms",
                                       "accuracy before fine-tune", "accuracy", "total score", "sites replaced"],
                        tablefmt="github")


def build_student(result: SubstituteResult, choice: dict[str, str]) -> GraphModule:
    """The teacher with each site's region replaced by its chosen, distilled candidate."""
    student = copy.deepcopy(result.teacher)
    replaced: dict[str, Node] = {}
    for site in result.sites:
        name = choice[site.name]
        if name == TEACHER:
            continue
        module = result.modules[site.name][name]()
        state = torch.load(result.options[site.name][name].path, map_location="cpu", weights_only=True)
        module.load_state_dict(state["state_dict"])
        _replace_region(student, site, module.eval(), readable(name), replaced)
    student.graph.lint()
    student.recompile()
    student = trace(student, result.example_inputs)
    return PassManager("exact", cost=result.cost_model, check=result.example_inputs)(student).graph_module


# ---------------------------------------------------------------- pricing

def _price(module: nn.Module, input_shape: tuple[int, ...], cost_model: Any) -> tuple[float, int, int]:
    """Latency, params and MACs of a candidate at batch 1, as deployed (after exact folding)."""
    x = torch.randn(1, *input_shape[1:])
    gm = trace(module.eval(), x)
    gm = PassManager("exact", cost=None, check=None)(gm).graph_module
    report = cost_model.graph_cost(gm)
    params = sum(p.numel() for p in gm.parameters())
    return float(report.latency_s), params, int(report.total.macs)


def _weights_digest(module: nn.Module) -> str:
    """A hash of the module's parameters and buffers: a run directory serves one teacher only."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _cost_name(cost: Any, cost_model: Any) -> str:
    return cost if isinstance(cost, str) else str(getattr(cost_model, "name", type(cost_model).__name__))


def _price_all(sites: Sequence[Site], modules: dict[str, dict[str, Callable[[], nn.Module]]], cost_model: Any,
               cost_name: str, run_dir: Path, show_progress: bool) -> dict[str, dict[str, list]]:
    """``{site: {candidate: [latency_s, params, macs]}}`` of every candidate, persisted in the run directory.

    A site priced alone carries the runtime's fixed per-call cost (session launch, input
    copy), which the assembled network pays once, not once per site: an identity is
    priced at each input shape and taken off (zero for analytical models). Prices are
    written to ``prices.json`` (per cost model) so that a resumed or sharded run uses the
    same numbers, and so the same candidates are pruned, on every rank.
    """
    from tqdm.auto import tqdm

    path = run_dir / "prices.json"
    saved = json.loads(path.read_text()) if path.exists() else {}
    prices: dict[str, dict[str, list]] = saved.get(cost_name, {})
    todo = [(s, c) for s in sites for c in modules[s.name] if c not in prices.get(s.name, {})]
    if todo:
        overhead = {site.input_shape: _price(nn.Identity(), site.input_shape, cost_model)[0] for site in sites}
        for site, name in tqdm(todo, desc="price candidates", disable=not show_progress, unit="op"):
            latency, params, macs = _price(modules[site.name][name](), site.input_shape, cost_model)
            prices.setdefault(site.name, {})[name] = [max(latency - overhead[site.input_shape], 0.0), params, macs]
        saved[cost_name] = prices
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(saved, indent=1, sort_keys=True))
        os.replace(tmp, path)
    return prices


# ---------------------------------------------------------------- replace-one scores

def _probe(gm: GraphModule, names: Sequence[str]) -> GraphModule:
    """A module sharing ``gm``'s weights whose output is ``(tuple of the named nodes' values, gm's output)``."""
    return _reading(gm, lambda by_name, output: (tuple(by_name[n] for n in names), output), "Probe")


def _tail(gm: GraphModule, site: Site) -> tuple[GraphModule, list[str]]:
    """The teacher after the site: ``tail(site_output, *live) == teacher output``.

    ``live`` names the nodes before the site's exit whose values the rest of the graph
    still reads (a skip connection around the site, the network input); they are passed
    in, computed once by the teacher.
    """
    nodes = list(gm.graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    exit_ = site.region.exit_node(gm)
    after = nodes[position[exit_] + 1:]
    live: list[Node] = []
    for node in after:
        for arg in node.all_input_nodes:
            if position[arg] < position[exit_] and arg.op != "get_attr" and arg not in live:
                live.append(arg)
    graph = torch.fx.Graph()
    env: dict[Node, Node] = {exit_: graph.placeholder("site_output")}
    for i, node in enumerate(live):
        env[node] = graph.placeholder(f"live_{i}")
    for node in after:
        for arg in node.all_input_nodes:
            if arg not in env and arg.op == "get_attr":
                env[arg] = graph.node_copy(arg)
        env[node] = graph.node_copy(node, lambda n: env[n])
    return GraphModule(gm, graph, f"Tail_{site.name}"), [n.name for n in live]


def _output_distance(student: Any, teacher: Any) -> float:
    """KL(teacher || student) of the softmax for (N, classes) logits, normalised MSE for anything else."""
    if isinstance(teacher, torch.Tensor) and teacher.dim() == 2:
        kl = F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), log_target=True, reduction="batchmean")
        return max(float(kl), 0.0)      # KL >= 0; rounding must not make a candidate beat the teacher
    pairs = [(a, b) for a, b in zip(torch.utils._pytree.tree_leaves(student), torch.utils._pytree.tree_leaves(teacher))
             if isinstance(b, torch.Tensor)]
    return float(sum(normalized_mse(a, b) for a, b in pairs) / max(len(pairs), 1))


@torch.no_grad()
def replace_one_scores(teacher: GraphModule, sites: Sequence[Site], candidates: dict[str, dict[str, nn.Module]],
                       batches: Sequence, *, show_progress: bool = True) -> dict[str, dict[str, float]]:
    """LANA's replace-one score of every distilled candidate: how far the teacher's output moves
    with only that site swapped for it (mean over ``batches``; see :func:`_output_distance`).

    ``candidates[site][name]`` are the distilled modules. The teacher runs once per batch;
    each candidate then runs only its site and the rest of the network after it.
    """
    from tqdm.auto import tqdm

    inputs = [b[0] if isinstance(b, (list, tuple)) else b for b in batches]
    scores: dict[str, dict[str, float]] = {}
    total = sum(len(c) for c in candidates.values())
    with tqdm(total=total, desc="replace-one scores", disable=not show_progress, unit="op") as progress:
        for site in sites:
            if not candidates.get(site.name):
                continue
            tail, live = _tail(teacher, site)
            probe = _probe(teacher, [site.region.entry, *live])
            seen = [probe(x) for x in inputs]
            scores[site.name] = {}
            for name, module in candidates[site.name].items():
                module.eval()
                distances = [_output_distance(tail(module(values[0]), *values[1:]), out) for values, out in seen]
                scores[site.name][name] = sum(distances) / len(distances)
                progress.update(1)
    return scores


# ---------------------------------------------------------------- the whole flow

def substitute(teacher: nn.Module, example_inputs: Any, loader: Iterable, *, budget: float = 0.5,
               budgets: Sequence[float] = (), cost: Any = "roofline:cpu", candidates: Sequence[str] | None = None,
               activations: Sequence[str] | None = None, select: Sequence[str] | None = None,
               sites: Sequence[str] | None = None,
               run_dir: str | os.PathLike = "hant-substitute", steps: int = 200, lr: float = 3e-3,
               calibration_batches: int | None = 8, prune_dominated: bool = True, prune_above: float = 1.0,
               score: str = "distill",
               replace_one: bool = False, score_batches: Sequence | None = None,
               finetune_epochs: int = 0, finetune_lr: float = 1e-3, finetune_steps: int | None = None,
               finetune_loader: Iterable | None = None, finetune_alpha: float = 0.9,
               evaluate: Callable[[nn.Module], float] | None = None, measure: Any = None,
               show_progress: bool = True) -> SubstituteResult | None:
    """Replace the teacher's slow blocks with distilled, faster candidates under a latency budget.

    ``budget`` and every entry of ``budgets`` are fractions of the teacher's latency under
    ``cost``; all are solved from one distillation (``result.solutions``, ``pareto_table()``)
    and ``result.student`` is the student for ``budget``. ``candidates`` names candidate
    families (:data:`hant.passes.candidates.FAMILIES`, plus ``"svd"``); None means all;
    ``activations`` restricts their activation choice (e.g. ``["relu"]``) and ``select``
    (shell-style patterns such as ``"ir_k[35]_e[12]_*"``) keeps only the candidates whose
    name matches one of them, to fit the distillation into the time at hand.
    ``prune_dominated`` skips training candidates priced no faster than the teacher's own
    block at their site (the ILP could never pick them under a latency budget);
    ``prune_above < 1`` also skips those priced at or above that fraction of the teacher's
    block (they can save little), to spend the distillation time on the rest.

    ``loader`` yields calibration batches (tensors or ``(input, label)``); the first
    ``calibration_batches`` (None: all) are captured. ``score`` is what the integer program
    minimises: ``"distill"`` (the final normalised MSE of each site) or ``"replace_one"``
    (LANA: how far the teacher's output moves with only that site swapped, measured on
    ``score_batches``, default the calibration batches); ``replace_one=True`` computes the
    latter even when selecting by the former, so both can be compared
    (``result.solve(b, score=...)``). ``run_dir`` persists prices and every finished job;
    a rerun resumes. Under ``torchrun`` the jobs are split across ranks; ranks other than 0
    return None after the distillation.

    ``finetune_epochs > 0`` fine-tunes every solved budget's student (all but the teacher
    itself) with knowledge distillation from the teacher on ``finetune_loader`` (default
    ``loader``), mixing in the labels' cross-entropy with weight ``1 - finetune_alpha``.
    ``evaluate(module) -> accuracy`` and ``measure`` (a cost model spec that times real
    runs, e.g. ``"measured:cpu-onnxruntime"``) put the students' accuracy and measured
    latency next to the prediction. The teacher is never modified.
    """
    if score not in SCORES:
        raise PassError(f"unknown score {score!r}; choose one of {', '.join(SCORES)}")
    inputs = as_input_tuple(example_inputs)
    cost_model = get_cost_model(cost)
    gm = trace(teacher.eval() if not teacher.training else copy.deepcopy(teacher).eval(), inputs)
    chosen_sites = find_sites(gm, sites)
    if not chosen_sites:
        raise PassError("the teacher has no substitution sites (single-entry single-exit NCHW blocks with a conv); "
                        "name some with sites=['module.path', ...]")
    families = list(candidates) if candidates is not None else None
    use_svd = families is None or "svd" in families
    if families is not None:
        families = [f for f in families if f != "svd"]
    acts = list(activations) if activations is not None else None

    modules: dict[str, dict[str, Callable[[], nn.Module]]] = {}
    for site in chosen_sites:
        block = site.region.extract(gm)
        table = dict(candidates_for(site.shape, families, activations=acts)) if families != [] else {}
        if use_svd:
            for percent in SVD_RANKS:
                low_rank = _low_rank_teacher(block, percent)
                if low_rank is not None:
                    table[f"svd_r{percent}"] = (lambda m=low_rank: copy.deepcopy(m))
        if select is not None:
            table = {c: f for c, f in table.items() if any(fnmatch.fnmatchcase(c, p) for p in select)}
        modules[site.name] = table
        modules[site.name][TEACHER] = (lambda b=block: copy.deepcopy(b))

    run_dir = Path(run_dir)
    config = DistillConfig(steps=steps, lr=lr)
    ctx = distributed_context()
    cost_name = _cost_name(cost, cost_model)
    if ctx.rank == 0:
        write_manifest(run_dir, {"teacher": _weights_digest(gm), "sites": [s.name for s in chosen_sites],
                                 "steps": steps, "lr": lr,
                                 "calibration_batches": calibration_batches,
                                 "candidates": {s: sorted(m) for s, m in modules.items()}})
        prices = _price_all(chosen_sites, modules, cost_model, cost_name, run_dir, show_progress)
    if ctx.world > 1:      # every rank prunes by rank 0's prices, so all agree on the job list
        dist.barrier()
        prices = json.loads((run_dir / "prices.json").read_text())[cost_name]

    trainable: dict[str, dict[str, Callable[[], nn.Module]]] = {}
    for site in chosen_sites:
        teacher_latency = prices[site.name][TEACHER][0]
        limit = teacher_latency * (min(prune_above, 1.0) if prune_dominated else prune_above)
        trainable[site.name] = {c: f for c, f in modules[site.name].items()
                                if c != TEACHER and not ((prune_dominated or prune_above < 1.0)
                                                         and prices[site.name][c][0] >= limit)}

    batches = [b for _, b in zip(range(calibration_batches), loader)] if calibration_batches is not None \
        else list(loader)
    captures = capture_sites(_observer(gm, chosen_sites), batches, [s.name for s in chosen_sites])
    distill_jobs(captures, trainable, config, run_dir, rank=ctx.rank, world=ctx.world, show_progress=show_progress)
    del captures
    if ctx.world > 1:
        dist.barrier()
        if ctx.rank != 0:
            return None
    results = collect_results(run_dir, {s: list(m) for s, m in trainable.items()})

    replace_one_by: dict[str, dict[str, float]] | None = None
    if score == "replace_one" or replace_one:
        distilled = {}
        for site in chosen_sites:
            distilled[site.name] = {}
            for name, factory in trainable[site.name].items():
                module = factory()
                module.load_state_dict(torch.load(results[site.name][name].path, map_location="cpu",
                                                  weights_only=True)["state_dict"])
                distilled[site.name][name] = module
        replace_one_by = replace_one_scores(gm, chosen_sites, distilled,
                                            list(score_batches) if score_batches is not None else batches,
                                            show_progress=show_progress)

    options: dict[str, dict[str, SiteOption]] = {}
    teacher_sites = 0.0
    for site in chosen_sites:
        options[site.name] = {}
        for name in [TEACHER, *trainable[site.name]]:
            latency, params, macs = prices[site.name][name]
            if name == TEACHER:
                option = SiteOption(site.name, name, 0.0, latency, params, macs, "", 0.0,
                                    None if replace_one_by is None else 0.0)
            else:
                job = results[site.name][name]
                option = SiteOption(site.name, name, 0.0, latency, params, macs, job.path, job.loss,
                                    None if replace_one_by is None else replace_one_by[site.name][name])
            option.score = option.score_of(score)
            options[site.name][name] = option
        teacher_sites += options[site.name][TEACHER].latency_s
    deployed_teacher = PassManager("exact", cost=None, check=None)(gm).graph_module
    whole_teacher = float(cost_model.graph_cost(deployed_teacher).latency_s)
    if teacher_sites > whole_teacher > 0:
        # Sites priced alone can add up to more than the whole teacher (a runtime shares per-kernel
        # work, such as layout reorders, across a graph that it repeats for each site alone): scale
        # every site price so that the teacher's sites and the whole teacher agree.
        for site_options in options.values():
            for option in site_options.values():
                option.latency_s *= whole_teacher / teacher_sites
        teacher_sites = whole_teacher
    fixed = whole_teacher - teacher_sites
    # budgets are fractions of the whole teacher under the cost model (sites + the rest); the
    # teacher is predicted at exactly that, so a budget of 1.0 always admits the teacher itself
    teacher_latency = fixed + teacher_sites

    result = SubstituteResult(gm, chosen_sites, options, modules, fixed, teacher_latency, inputs, cost_model,
                              score_kind=score, deployed_teacher=deployed_teacher)
    timer = get_cost_model(measure) if measure is not None else None
    students = {}
    for b in sorted(set(budgets) | {budget}):
        solution = result.solve(b)
        students[b] = build_student(result, solution.choice)
        if finetune_epochs > 0 and any(c != TEACHER for c in solution.choice.values()):
            if evaluate is not None:
                solution.accuracy_before_finetune = float(evaluate(students[b]))
            finetune(students[b], gm, finetune_loader if finetune_loader is not None else loader,
                     epochs=finetune_epochs, lr=finetune_lr, max_steps=finetune_steps, alpha=finetune_alpha,
                     checkpoint_dir=run_dir / f"finetune_b{b:.2f}_{score}", progress=show_progress)
        if evaluate is not None:
            solution.accuracy = float(evaluate(students[b]))
        if timer is not None:
            solution.measured_latency_s = float(timer.graph_cost(students[b]).latency_s)
        result.solutions.append(solution)
    student = students[budget]
    result.student, result.budget = student, budget
    result.solutions.sort(key=lambda s: s.budget)
    return result
