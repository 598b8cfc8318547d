"""remove_nonlinearity: drop the activations that cost more latency than they give accuracy, then fold (lossy).

Domino (Luo et al.), DepthShrinker (Fu et al., ICML 2022) and latency-aware depth
compression (Kim et al., ICML 2023), as a general pass on any traced graph:

1. **Units.** Activation nodes (found by :func:`hant.graphs.ops.activation_of`) are grouped
   into removal units along chains of conv / BN / activation ops. An activation with a conv
   before and after it on its chain is *interior*; every contiguous run of up to
   ``max_unit_size`` interior activations is a unit (both activations of a MobileNetV2
   inverted residual: pw -> dw -> pw then becomes one conv), and every activation alone is a
   unit. Chains also run across residual blocks (:func:`hant.passes.relocate_padding.element_chains`):
   there a whole block's activations count as one item, so a unit may span a block and the
   activations around it (stem activation + first block: stem conv and block fold into one
   conv, the residual add included). Units sharing an activation are mutually exclusive.
2. **Importance** of a unit: the output distortion when only that unit is removed and its
   chain folded, on the user's calibration batches: ``KL(softmax(teacher) || softmax(student))``
   for classifier logits (2-D outputs), relative MSE otherwise; or, when ``evaluate`` is given,
   the drop ``evaluate(teacher) - evaluate(student)``.
3. **Gain** of a unit: the cost model's graph latency after removing it and folding, against
   the graph folded with nothing removed. A unit with gain <= 0 is never chosen.
4. **Selection**: integer programs (:mod:`hant.passes.selection`): maximise total gain
   subject to total importance <= ``budget``, or minimise total importance subject to
   predicted latency <= ``latency_target`` x baseline; or greedy, re-scoring the remaining
   units on the current graph after every pick.
5. **Apply**: chosen activations -> identity, then every conv chain is merged into one conv
   whose weights are composed from the originals (:mod:`hant.passes.relocate_padding`), with
   the padding of k x k -> k x k chains moved to their first conv (lossy at the border; the
   drift is measured and reported), then the ``"exact"`` preset runs.

The student before fine-tuning therefore *is* the linearised network (up to relocated
padding): no weight is re-initialised. :func:`linearize` is the whole flow on a model;
:class:`RemoveNonlinearity` is the same as a registered pass.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from tabulate import tabulate
from torch.fx import GraphModule
from tqdm import tqdm

from hant.errors import InputError, PassError
from hant.graphs.ops import ConvView, activation_of
from hant.graphs.trace import as_input_tuple, propagate_shapes, trace
from hant.passes.base import Pass, PassResult, register
from hant.passes.relocate_padding import (
    ChainPlan, Residual, affine_view, chain_paths, element_chains, merge, plan_chains, relocate,
)
from hant.passes.selection import max_gain_under_budget, min_importance_for_saving
from hant.passes.surgery import prune_unused

__all__ = ["MAX_PADDING_FRACTION", "Unit", "LinearizeReport", "LinearizeResult", "find_units", "linearise",
           "prepare_for_tuning", "fold_chains", "distortion", "linearize", "RemoveNonlinearity", "MODES"]

MODES = ("ilp", "greedy")


# ---------------------------------------------------------------- units

def find_units(gm: GraphModule, *, max_unit_size: int = 3) -> list[tuple[str, ...]]:
    """Removal units of ``gm`` as tuples of activation node names, in graph order (see module doc)."""
    if max_unit_size < 1:
        raise PassError(f"max_unit_size must be >= 1, got {max_unit_size}")
    units: list[tuple[str, ...]] = []
    member = lambda n: affine_view(n) is not None or activation_of(n) is not None  # noqa: E731
    for path in chain_paths(gm, member):
        is_conv = [isinstance(affine_view(n), ConvView) for n in path]
        interior = [i for i, n in enumerate(path)
                    if activation_of(n) is not None and any(is_conv[:i]) and any(is_conv[i + 1:])]
        acts = [i for i, n in enumerate(path) if activation_of(n) is not None]
        for i in acts:
            units.append((path[i].name,))
        units.extend(_runs([(path[i].name,) for i in interior], max_unit_size, min_size=2))
    # Runs across residual blocks: a block x + chain(x) is one item (all its chain's activations),
    # so that e.g. the stem's activation and the first block's go together, and their convs merge.
    for chain in element_chains(gm, member):
        if not any(isinstance(e, Residual) for e in chain):
            continue
        items: list[tuple[str, ...]] = []
        conv_like = [isinstance(e, Residual) and any(isinstance(affine_view(n), ConvView) for n in e.nodes)
                     or (not isinstance(e, Residual) and isinstance(affine_view(e), ConvView)) for e in chain]
        for i, e in enumerate(chain):
            if isinstance(e, Residual):
                acts_in = tuple(n.name for n in e.nodes if activation_of(n) is not None)
                if acts_in and conv_like[i]:
                    items.append(acts_in)
            elif activation_of(e) is not None and any(conv_like[:i]) and any(conv_like[i + 1:]):
                items.append((e.name,))
        units.extend(_runs(items, max_unit_size, min_size=1))
    order = {n.name: k for k, n in enumerate(gm.graph.nodes)}
    units = {tuple(sorted(u, key=order.__getitem__)) for u in units}
    return sorted(units, key=lambda u: (order[u[0]], len(u), [order[a] for a in u]))


def _runs(items: list[tuple[str, ...]], max_size: int, *, min_size: int) -> list[tuple[str, ...]]:
    """Every contiguous run of ``min_size`` to ``max_size`` items, flattened into one unit."""
    return [tuple(a for item in items[start:start + size] for a in item)
            for start in range(len(items)) for size in range(min_size, max_size + 1)
            if start + size <= len(items)]


def linearise(gm: GraphModule, activations: Iterable[str]) -> GraphModule:
    """A copy of ``gm`` in which the named activation nodes are identity (removed from the graph)."""
    out = copy.deepcopy(gm)
    names = set(activations)
    nodes = {n.name: n for n in out.graph.nodes}
    for name in names:
        node = nodes.get(name)
        view = activation_of(node) if node is not None else None
        if view is None:
            raise PassError(f"{name!r} is not an activation node of the graph")
        view.output.replace_all_uses_with(view.input)
        out.graph.erase_node(node)
    prune_unused(out)
    return out


def _exact_passes(gm: GraphModule, passes: str | None, cost: Any, inputs: tuple | None) -> GraphModule:
    if not passes:
        return gm
    from hant.passes.manager import PassManager

    return PassManager(passes, cost=cost, check=inputs).__call__(gm).graph_module


MAX_PADDING_FRACTION = 1 / 16


def fold_chains(gm: GraphModule, cost: Any, *, relocate_padding: bool = True, exact_passes: str | None = "exact",
                check_inputs: tuple | None = None, plan_cache: dict | None = None,
                max_padding_fraction: float | None = MAX_PADDING_FRACTION) -> GraphModule:
    """A copy of ``gm`` with every conv chain merged where the cost model says it pays, then ``exact_passes``.

    ``gm`` needs ``tensor_meta``. With ``relocate_padding=False`` only exact merges happen.
    ``plan_cache`` and ``max_padding_fraction`` (default 1/16: a 32x32 input may take a
    relocated ring of 2 pixels; None: no limit): see :func:`hant.passes.relocate_padding.plan_chains`.
    """
    out = copy.deepcopy(gm)
    plan = plan_chains(out, cost, relocate=relocate_padding, cache=plan_cache,
                       max_padding_fraction=max_padding_fraction)
    merge(out, plan)
    if check_inputs is not None:
        propagate_shapes(out, check_inputs)
    return _exact_passes(out, exact_passes, cost, check_inputs)


# ---------------------------------------------------------------- distortion

def _first_tensor(value: Any) -> torch.Tensor:
    while isinstance(value, (list, tuple)):
        value = value[0]
    if isinstance(value, dict):
        value = next(iter(value.values()))
    if not isinstance(value, torch.Tensor):
        raise InputError("the model's output holds no tensor to compare")
    return value


def distortion(reference: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor]) -> float:
    """Mean over batches of KL(softmax(ref) || softmax(out)) for 2-D logits, else relative MSE."""
    total = 0.0
    for ref, out in zip(reference, outputs):
        if ref.dim() == 2 and ref.shape[1] > 1:
            total += float(F.kl_div(F.log_softmax(out.double(), 1), F.log_softmax(ref.double(), 1),
                                    log_target=True, reduction="batchmean"))
        else:
            total += float(((out.double() - ref.double()) ** 2).sum() / (ref.double() ** 2).sum().clamp_min(1e-30))
    return total / max(len(reference), 1)


def _max_rel_error(reference: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor]) -> float:
    worst = 0.0
    for ref, out in zip(reference, outputs):
        scale = float(ref.abs().max()) or 1.0
        worst = max(worst, float((ref - out).abs().max()) / scale)
    return worst


@torch.no_grad()
def _run(module: nn.Module, batches: Sequence[tuple]) -> list[torch.Tensor]:
    module.eval()
    return [_first_tensor(module(*b)) for b in batches]


# ---------------------------------------------------------------- report

@dataclass
class Unit:
    """One removal unit and its scores. ``gain_s`` is seconds saved by the cost model (<= 0: never chosen)."""
    activations: tuple[str, ...]
    importance: float = math.nan
    distortion: float = math.nan
    metric_drop: float | None = None
    gain_s: float = math.nan
    relocation_drift: float = 0.0
    chosen: bool = False
    note: str = ""


@dataclass
class LinearizeReport:
    """Every unit with importance, gain and whether it was chosen; latencies from the cost model.

    ``baseline_latency_s`` is the graph folded with nothing removed (the reference for gains);
    ``predicted_latency_s`` is baseline minus the chosen gains (the ILP's additive model);
    ``final_latency_s`` prices the applied graph. ``relocation_drift`` is the max relative
    error of the final graph against the same activations removed without folding (0 when no
    padding moved).
    """
    mode: str
    cost_model: str
    importance_kind: str
    budget: float | None
    latency_target: float | None
    units: list[Unit] = field(default_factory=list)
    original_latency_s: float = math.nan
    baseline_latency_s: float = math.nan
    predicted_latency_s: float = math.nan
    final_latency_s: float = math.nan
    final_distortion: float = math.nan
    relocation_drift: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def chosen(self) -> list[Unit]:
        return [u for u in self.units if u.chosen]

    def _table(self, fmt: str) -> str:
        rows = [(", ".join(u.activations), f"{u.importance:.4g}", f"{u.gain_s * 1e6:.2f}",
                 "" if u.metric_drop is None else f"{u.metric_drop:.4g}", f"{u.relocation_drift:.2e}",
                 "yes" if u.chosen else "", u.note) for u in self.units]
        head = (f"remove_nonlinearity ({self.mode}, importance={self.importance_kind}, cost={self.cost_model}, "
                f"budget={self.budget}, latency_target={self.latency_target})\n"
                f"latency (cost model): original {self.original_latency_s * 1e6:.1f} us, folded baseline "
                f"{self.baseline_latency_s * 1e6:.1f} us, predicted {self.predicted_latency_s * 1e6:.1f} us, "
                f"final {self.final_latency_s * 1e6:.1f} us; final distortion {self.final_distortion:.4g}; "
                f"relocation drift {self.relocation_drift:.2e}\n")
        table = tabulate(rows, headers=("unit", "importance", "gain us", "metric drop", "reloc. drift", "chosen",
                                        "note"), tablefmt=fmt)
        return head + ("\n" if fmt == "github" else "") + table + "".join(f"\n{n}" for n in self.notes)

    def __str__(self) -> str:
        return self._table("simple")

    def to_markdown(self) -> str:
        return self._table("github")


@dataclass
class LinearizeResult:
    """``module``: the folded student. ``linearised``: the same activations removed and padding
    relocated but no chain merged, except chains that span a residual block (merged: they have
    no other relocated form); fine-tune it, then :func:`fold_chains` it (exactly), to fine-tune
    before folding. ``teacher``: the traced original."""
    module: GraphModule
    linearised: GraphModule
    teacher: GraphModule
    report: LinearizeReport

    @property
    def removed(self) -> list[str]:
        return [a for u in self.report.chosen for a in u.activations]


# ---------------------------------------------------------------- the flow

class _Scorer:
    """Scores sets of removed activations on one traced graph: folded latency and importance."""

    def __init__(self, gm: GraphModule, example: tuple, batches: list[tuple], cost: Any, evaluate, importance: str,
                 relocate_padding: bool, exact_passes: str | None, max_padding_fraction: float | None):
        self.gm, self.example, self.batches, self.cost = gm, example, batches, cost
        self.evaluate, self.importance = evaluate, importance
        self.relocate_padding, self.exact_passes = relocate_padding, exact_passes
        self.max_padding_fraction = max_padding_fraction
        self.reference = _run(gm, batches)
        self.reference_metric = evaluate(gm) if evaluate is not None else None
        self.plan_cache: dict = {}

    def latency(self, gm: GraphModule) -> float:
        return float(self.cost.graph_cost(gm).latency_s)

    def fold(self, lin: GraphModule) -> GraphModule:
        return fold_chains(lin, self.cost, relocate_padding=self.relocate_padding, exact_passes=self.exact_passes,
                           check_inputs=self.example, plan_cache=self.plan_cache,
                           max_padding_fraction=self.max_padding_fraction)

    def score(self, activations: Iterable[str]) -> dict:
        lin = linearise(self.gm, activations)
        folded = self.fold(lin)
        lin_out, folded_out = _run(lin, self.batches), _run(folded, self.batches)
        dist = distortion(self.reference, folded_out)
        drop = self.reference_metric - self.evaluate(folded) if self.evaluate is not None else None
        return {"linearised": lin, "folded": folded, "latency": self.latency(folded), "distortion": dist,
                "metric_drop": drop, "importance": drop if self.importance == "metric" else dist,
                "drift": _max_rel_error(lin_out, folded_out)}


def _exclusive(units: list[tuple[str, ...]]) -> list[list[int]]:
    by_act: dict[str, list[int]] = {}
    for i, u in enumerate(units):
        for a in u:
            by_act.setdefault(a, []).append(i)
    return [idx for idx in by_act.values() if len(idx) > 1]


def _check_goal(budget: float | None, latency_target: float | None) -> None:
    if (budget is None) == (latency_target is None):
        raise PassError("give exactly one of budget= (max total importance) or latency_target= "
                        "(fraction of the folded baseline latency, e.g. 0.6)")
    if latency_target is not None and not 0 < latency_target:
        raise PassError(f"latency_target is a fraction of the baseline latency (> 0), got {latency_target}")


def _linearize_gm(gm: GraphModule, example: tuple, batches: list[tuple], *, budget, latency_target, mode, cost, evaluate,
                  relocate_padding, max_unit_size, exact_passes, progress,
                  max_padding_fraction=MAX_PADDING_FRACTION) -> LinearizeResult:
    from hant.cost_models import get as get_cost_model

    _check_goal(budget, latency_target)
    if mode not in MODES:
        raise PassError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
    cost = get_cost_model(cost)
    importance = "metric" if evaluate is not None else "distortion"
    scorer = _Scorer(gm, example, batches, cost, evaluate, importance, relocate_padding, exact_passes,
                     max_padding_fraction)
    report = LinearizeReport(mode, getattr(cost, "name", type(cost).__name__), importance, budget, latency_target)
    report.original_latency_s = scorer.latency(gm)
    base = scorer.score(())
    report.baseline_latency_s = base["latency"]
    names = find_units(gm, max_unit_size=max_unit_size)
    units = [Unit(u) for u in names]
    report.units = units
    for unit in tqdm(units, desc="remove_nonlinearity: scoring units", disable=not progress, leave=False):
        s = scorer.score(unit.activations)
        unit.importance, unit.distortion, unit.metric_drop = s["importance"], s["distortion"], s["metric_drop"]
        unit.gain_s, unit.relocation_drift = base["latency"] - s["latency"], s["drift"]
        if unit.gain_s <= 0:
            unit.note = "no gain after folding (cost model): never chosen"
    exclusive = _exclusive(names)
    if mode == "ilp":
        gains = [u.gain_s for u in units]
        imps = [u.importance for u in units]
        if budget is not None:
            sel = max_gain_under_budget(gains, imps, budget, exclusive=exclusive)
        else:
            saving = report.baseline_latency_s * (1.0 - latency_target)
            sel = min_importance_for_saving(gains, imps, saving, exclusive=exclusive)
        chosen = set(sel.chosen)
    else:
        chosen = _greedy(scorer, units, base, budget, latency_target, progress)
    for i in chosen:
        units[i].chosen = True
    removed = sorted({a for i in chosen for a in units[i].activations})
    final = scorer.score(removed) if removed else base
    report.predicted_latency_s = report.baseline_latency_s - sum(units[i].gain_s for i in chosen)
    report.final_latency_s = final["latency"]
    report.final_distortion = final["distortion"]
    report.relocation_drift = final["drift"]
    if not removed:
        report.notes.append("nothing chosen: the module is the original graph, unchanged")
        return LinearizeResult(copy.deepcopy(gm), copy.deepcopy(gm), gm, report)
    lin = prepare_for_tuning(final["linearised"], cost, example, relocate_padding=relocate_padding,
                             max_padding_fraction=max_padding_fraction)
    return LinearizeResult(final["folded"], lin, gm, report)


def prepare_for_tuning(linearised: GraphModule, cost: Any, example: tuple, *, relocate_padding: bool = True,
                       max_padding_fraction: float | None = MAX_PADDING_FRACTION) -> GraphModule:
    """``linearised`` (activations removed, see :func:`linearise`; changed in place and returned) made
    ready to fine-tune before folding: padding relocated as :func:`fold_chains` will relocate it, and
    the chains that span a residual block merged (they have no relocated unmerged form: the skip
    connection fixes the size of the tensor it adds to). Fine-tune the result, then :func:`fold_chains`
    it: the folding is exact, and the fine-tuning has already seen the relocation's border drift."""
    plan = plan_chains(linearised, cost, relocate=relocate_padding, max_padding_fraction=max_padding_fraction)
    relocate(linearised, plan)
    merge(linearised, ChainPlan([seg for seg in plan.segments if seg.elements]))
    propagate_shapes(linearised, example)
    return linearised


def _greedy(scorer: _Scorer, units: list[Unit], base: dict, budget, latency_target, progress) -> set[int]:
    """Pick the unit with the best marginal gain per marginal importance, re-scoring after every pick."""
    chosen: set[int] = set()
    current = {"latency": base["latency"], "importance": 0.0}
    target = None if latency_target is None else base["latency"] * latency_target
    bar = tqdm(desc="remove_nonlinearity: greedy", disable=not progress, leave=False)
    while target is None or current["latency"] > target:
        taken = {a for i in chosen for a in units[i].activations}
        best = None
        for i, unit in enumerate(units):
            if i in chosen or taken & set(unit.activations) or unit.gain_s <= 0:
                continue
            s = scorer.score(sorted(taken | set(unit.activations)))
            gain = current["latency"] - s["latency"]
            if gain <= 0 or (budget is not None and s["importance"] > budget):
                continue
            ratio = gain / max(s["importance"] - current["importance"], 1e-12)
            if best is None or ratio > best[0]:
                best = (ratio, i, s)
            bar.update(1)
        if best is None:
            break
        _, i, s = best
        chosen.add(i)
        current = {"latency": s["latency"], "importance": s["importance"]}
    bar.close()
    return chosen


def _batches(calib_batches: Iterable) -> list[tuple]:
    batches = []
    for b in calib_batches:
        if isinstance(b, torch.Tensor):
            batches.append((b,))
        elif isinstance(b, (list, tuple)) and b and isinstance(b[0], torch.Tensor):
            batches.append((b[0],))
        else:
            raise InputError("calibration batches must be input tensors or (inputs, labels) tuples")
    if not batches:
        raise InputError("give at least one calibration batch (e.g. a few batches of training inputs)")
    return batches


def linearize(model: nn.Module, example_inputs: Any, calib_batches: Iterable, *, budget: float | None = None,
              latency_target: float | None = None, mode: str = "ilp", cost: Any = "roofline:cpu",
              evaluate: Callable[[nn.Module], float] | None = None, relocate_padding: bool = True,
              max_unit_size: int = 3, exact_passes: str | None = "exact", progress: bool = True,
              max_padding_fraction: float | None = MAX_PADDING_FRACTION) -> LinearizeResult:
    """Remove the activations that pay least for their latency, and fold; see the module doc.

    ``model`` is traced with :func:`hant.trace` (never modified). ``calib_batches`` yields
    input tensors or ``(inputs, labels)``. Give ``budget`` (max total importance: KL, or metric
    drop when ``evaluate(module) -> float`` is given, e.g. 0.01 = one accuracy point) or
    ``latency_target`` (fraction of the folded baseline latency). ``mode``: ``"ilp"`` or
    ``"greedy"``. ``cost``: a cost-model spec or object. ``max_padding_fraction``: the
    widest relocated padding ring, as a fraction of a merged chain's input size (see
    :func:`fold_chains`).
    """
    example = as_input_tuple(example_inputs)
    gm = trace(model, example)
    return _linearize_gm(gm, example, _batches(calib_batches), budget=budget, latency_target=latency_target, mode=mode,
                         cost=cost, evaluate=evaluate, relocate_padding=relocate_padding,
                         max_unit_size=max_unit_size, exact_passes=exact_passes, progress=progress,
                         max_padding_fraction=max_padding_fraction)


@register
class RemoveNonlinearity(Pass):
    """The nonlinearity-removal flow as a pass (lossy). Options in ``context.options``:

    ``budget`` or ``latency_target`` (one is required), ``mode`` ("ilp"), ``calibration``
    (batches; default: ``context.check_inputs`` as one batch), ``evaluate``,
    ``relocate_padding`` (True), ``max_unit_size`` (3), ``max_padding_fraction`` (1/16). The cost
    model is ``context.cost`` (default ``roofline:cpu``). Every unit becomes a decision in the report.
    """

    name = "remove_nonlinearity"
    exact = False
    idempotent = False

    def call(self, gm: GraphModule) -> PassResult:
        opts = self.context.options
        calibration = opts.get("calibration") or ([self.context.check_inputs] if self.context.check_inputs else None)
        if calibration is None:
            raise PassError("remove_nonlinearity needs calibration inputs: set options['calibration'] or check inputs")
        batches = _batches(calibration)
        example = as_input_tuple(self.context.check_inputs) if self.context.check_inputs else batches[0]
        propagate_shapes(gm, example)
        result = _linearize_gm(
            gm, example, batches, budget=opts.get("budget"), latency_target=opts.get("latency_target"),
            mode=opts.get("mode", "ilp"), cost=self.context.cost if self.context.cost is not None else "roofline:cpu",
            evaluate=opts.get("evaluate"), relocate_padding=opts.get("relocate_padding", True),
            max_unit_size=opts.get("max_unit_size", 3), exact_passes=opts.get("exact_passes", "exact"),
            progress=opts.get("progress", False),
            max_padding_fraction=opts.get("max_padding_fraction", MAX_PADDING_FRACTION))
        for u in result.report.units:
            reason = (f"importance {u.importance:.4g}, gain {u.gain_s * 1e6:.2f} us"
                      + (f", relocation drift {u.relocation_drift:.2e}" if u.relocation_drift else "")
                      + (f"; {u.note}" if u.note else ""))
            self.decide(" + ".join(u.activations), "applied" if u.chosen else "not_chosen", reason)
        self.context.options["linearize_report"] = result.report
        return PassResult(result.module, bool(result.report.chosen))
