"""Operator substitution, HANT / LANA style: distil candidates per site, choose by integer program.

1. **Sites** are natural single-entry single-exit regions of the traced teacher (ResNet
   blocks, inverted residuals, conv-BN-act stems), or regions of modules the user names.
2. **Distillation** (:mod:`hant.passes.site_distill`): every candidate of every site
   learns to map the teacher's site input to the teacher's site output; the final
   normalised MSE is its score (the teacher itself scores 0). Resumable and shardable.
3. **Choice**: each candidate is priced at its site by the target's cost model (after
   exact folding, as it would be deployed); a multiple-choice knapsack (HiGHS) picks one
   candidate per site, minimising total score under a latency budget. One distillation
   serves every budget.
4. **Student**: FX surgery puts the chosen candidates in place of their regions, then the
   exact passes run. Optional fine-tuning with knowledge distillation from the teacher.
"""

from __future__ import annotations

import copy
import os
import pydoc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
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
    DistillConfig, capture_sites, collect_results, distill_jobs, distributed_context, write_manifest,
)
from hant.passes.surgery import add_module, copy_meta, readable

__all__ = ["Site", "find_sites", "SiteOption", "SubstituteResult", "substitute", "build_student", "TEACHER",
           "SVD_RANKS"]

TEACHER = "teacher"
SVD_RANKS = (25, 50)      # percent of full rank of each of the teacher's convs


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

def _observer(gm: GraphModule, sites: Sequence[Site]) -> GraphModule:
    """A module sharing ``gm``'s weights whose output is ``{site: (input, output)}``."""
    graph = copy.deepcopy(gm.graph)
    by_name = {n.name: n for n in graph.nodes}
    output = next(n for n in graph.nodes if n.op == "output")
    with graph.inserting_before(output):
        graph.output({s.name: (by_name[s.region.entry], by_name[s.region.exit]) for s in sites})
    graph.erase_node(output)
    return GraphModule(gm, graph, "SiteObserver")


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
    """One candidate at one site: its score (distillation loss; 0 for the teacher) and priced latency."""
    site: str
    candidate: str
    score: float
    latency_s: float
    params: int
    macs: int
    path: str = ""             # the distilled weights ("" for the teacher)


@dataclass
class BudgetSolution:
    budget: float                  # fraction of the teacher's predicted latency
    choice: dict[str, str]         # site -> candidate
    predicted_latency_s: float
    total_score: float
    measured_latency_s: float | None = None
    accuracy: float | None = None


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

    def solve(self, budget: float, extra: Sequence = ()) -> BudgetSolution:
        """Choose one candidate per site under ``budget`` (a fraction of the teacher's latency)."""
        names = [s.name for s in self.sites]
        cands = [list(self.options[n]) for n in names]
        scores = [[self.options[n][c].score for c in cs] for n, cs in zip(names, cands)]
        latencies = [[self.options[n][c].latency_s for c in cs] for n, cs in zip(names, cands)]
        target = budget * self.teacher_latency_s - self.fixed_latency_s
        picked = multiple_choice(scores, latencies, target, extra=extra)
        choice = {n: cs[k] for n, cs, k in zip(names, cands, picked.options)}
        return BudgetSolution(budget, choice, self.fixed_latency_s + picked.total_latency, picked.total_score)

    def for_budget(self, budget: float) -> GraphModule:
        """The student for ``budget``, built from the distilled weights, with exact passes applied."""
        return build_student(self, self.solve(budget).choice)

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
            rows.append([site.name, site.region.module, f"{site.shape.in_channels}->{site.shape.out_channels}"
                         f"/s{site.shape.stride}", chosen, f"{teacher.latency_s * 1e6:.1f}",
                         f"{option.latency_s * 1e6:.1f}", f"{option.score:.4f}"])
        return tabulate(rows, headers=["site", "teacher module", "shape", "chosen", "teacher us", "chosen us",
                                       "score"], tablefmt="github")

    def pareto_table(self) -> str:
        rows = [[f"{s.budget:.2f}", f"{s.predicted_latency_s * 1e3:.3f}",
                 "" if s.measured_latency_s is None else f"{s.measured_latency_s * 1e3:.3f}",
                 "" if s.accuracy is None else f"{s.accuracy:.4f}", f"{s.total_score:.4f}",
                 sum(c != TEACHER for c in s.choice.values())] for s in self.solutions]
        return tabulate(rows, headers=["budget", "predicted ms", "measured ms", "accuracy", "total score",
                                       "sites replaced"], tablefmt="github")


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


# ---------------------------------------------------------------- the whole flow

def substitute(teacher: nn.Module, example_inputs: Any, loader: Iterable, *, budget: float = 0.5,
               budgets: Sequence[float] = (), cost: Any = "roofline:cpu", candidates: Sequence[str] | None = None,
               sites: Sequence[str] | None = None, run_dir: str | os.PathLike = "hant-substitute",
               steps: int = 200, lr: float = 3e-3, calibration_batches: int = 8,
               finetune_epochs: int = 0, finetune_lr: float = 1e-3, finetune_steps: int | None = None,
               evaluate: Callable[[nn.Module], float] | None = None, measure: Any = None,
               show_progress: bool = True) -> SubstituteResult | None:
    """Replace the teacher's slow blocks with distilled, faster candidates under a latency budget.

    ``budget`` and every entry of ``budgets`` are fractions of the teacher's latency under
    ``cost``; all are solved from one distillation (``result.solutions``, ``pareto_table()``)
    and ``result.student`` is the student for ``budget``. ``candidates`` names candidate
    families (:data:`hant.passes.candidates.FAMILIES`, plus ``"svd"``); None means all.
    ``loader`` yields calibration batches (tensors or ``(input, label)``); the first
    ``calibration_batches`` are captured. ``run_dir`` persists every finished job; a rerun
    resumes. Under ``torchrun`` the jobs are split across ranks; ranks other than 0 return
    None after the distillation. ``evaluate(module) -> accuracy`` and ``measure`` (a cost
    model spec that times real runs, e.g. ``"measured:cpu-onnxruntime"``) put the students'
    accuracy and measured latency next to the prediction. The teacher is never modified.
    """
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

    modules: dict[str, dict[str, Callable[[], nn.Module]]] = {}
    for site in chosen_sites:
        block = site.region.extract(gm)
        table = dict(candidates_for(site.shape, families)) if families != [] else {}
        if use_svd:
            for percent in SVD_RANKS:
                low_rank = _low_rank_teacher(block, percent)
                if low_rank is not None:
                    table[f"svd_r{percent}"] = (lambda m=low_rank: copy.deepcopy(m))
        modules[site.name] = table
        modules[site.name][TEACHER] = (lambda b=block: copy.deepcopy(b))

    run_dir = Path(run_dir)
    config = DistillConfig(steps=steps, lr=lr)
    ctx = distributed_context()
    if ctx.rank == 0:
        write_manifest(run_dir, {"sites": [s.name for s in chosen_sites], "steps": steps, "lr": lr,
                                 "calibration_batches": calibration_batches,
                                 "candidates": {s: sorted(m) for s, m in modules.items()}})
    batches = [b for _, b in zip(range(calibration_batches), loader)]
    captures = capture_sites(_observer(gm, chosen_sites), batches, [s.name for s in chosen_sites])
    trainable = {s: {c: f for c, f in m.items() if c != TEACHER} for s, m in modules.items()}
    distill_jobs(captures, trainable, config, run_dir, rank=ctx.rank, world=ctx.world, show_progress=show_progress)
    if ctx.world > 1:
        dist.barrier()
        if ctx.rank != 0:
            return None
    scores = collect_results(run_dir, {s: list(m) for s, m in trainable.items()})

    options: dict[str, dict[str, SiteOption]] = {}
    teacher_sites = 0.0
    # A site priced alone carries the runtime's fixed per-call cost (session launch, input
    # copy), which the assembled network pays once, not once per site: price an identity
    # at each input shape and take it off (zero for analytical models).
    call_overhead = {site.input_shape: _price(nn.Identity(), site.input_shape, cost_model)[0]
                     for site in chosen_sites}
    for site in chosen_sites:
        options[site.name] = {}
        for name, factory in modules[site.name].items():
            module = factory()
            if name != TEACHER:
                module.load_state_dict(torch.load(scores[site.name][name].path, map_location="cpu",
                                                  weights_only=True)["state_dict"])
            latency, params, macs = _price(module, site.input_shape, cost_model)
            latency = max(latency - call_overhead[site.input_shape], 0.0)
            score = 0.0 if name == TEACHER else scores[site.name][name].loss
            path = "" if name == TEACHER else scores[site.name][name].path
            options[site.name][name] = SiteOption(site.name, name, score, latency, params, macs, path)
        teacher_sites += options[site.name][TEACHER].latency_s
    deployed_teacher = PassManager("exact", cost=None, check=None)(gm).graph_module
    whole_teacher = float(cost_model.graph_cost(deployed_teacher).latency_s)
    fixed = max(whole_teacher - teacher_sites, 0.0)
    # budgets are fractions of the teacher as this model predicts it (sites + the rest), so
    # that a budget of 1.0 always admits the teacher itself
    teacher_latency = fixed + teacher_sites

    result = SubstituteResult(gm, chosen_sites, options, modules, fixed, teacher_latency, inputs, cost_model)
    timer = get_cost_model(measure) if measure is not None else None
    students = {}
    for b in sorted(set(budgets) | {budget}):
        solution = result.solve(b)
        students[b] = build_student(result, solution.choice)
        if b == budget and finetune_epochs > 0:
            finetune(students[b], gm, loader, epochs=finetune_epochs, lr=finetune_lr, max_steps=finetune_steps,
                     checkpoint_dir=run_dir / f"finetune_b{budget:.2f}", progress=show_progress)
        if evaluate is not None:
            solution.accuracy = float(evaluate(students[b]))
        if timer is not None:
            solution.measured_latency_s = float(timer.graph_cost(students[b]).latency_s)
        result.solutions.append(solution)
    student = students[budget]
    result.student, result.budget = student, budget
    result.solutions.sort(key=lambda s: s.budget)
    return result
