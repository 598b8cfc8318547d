"""PassManager: run passes over a GraphModule, prove each exact one on real inputs, roll back failures.

``PassManager(passes, cost=..., check=...)(gm)`` works on a deep copy of ``gm`` (the
caller's module is never touched) and returns a :class:`ManagerResult` with the rewritten
module and a :class:`PassReport`.

For every pass it runs, in order (repeated to a fixed point when asked):

1. the pass rewrites a structural copy of the current module (graph and module tree
   copied, tensors shared: passes never mutate tensors, they put new weights in new
   modules; a pass that does mutate one in place is stopped with a :class:`PassError`);
2. shapes are re-propagated (``tensor_meta`` on every node);
3. an EXACT pass's outputs are compared with the outputs before it on the check inputs,
   every tensor of a tuple/list/dict output, with the test
   ``max|after - before| <= atol + rtol * max|before|`` per output tensor. A pass that fails
   the test, raises, or leaves a graph that does not run is **rolled back**: the module
   from before it is kept and the report says why. A lossy pass reports its drift;
4. the cost model prices the graph before and after (``graph_cost(gm).latency_s``).

The check needs a deterministic model. Before a failed check is blamed on the pass, the
graph from before it is run again: when that does not reproduce its own outputs exactly
(dropout in train mode, say), a :class:`PassError` says so. With a lossy pass in the
list, whose drift no check would flag, that is asked once before any pass runs.

With ``fixed_point`` the list is repeated until a whole round changes nothing (at most
``max_iterations`` rounds); a pass that already left the current graph unchanged is not
run on it again (passes are deterministic).

Without check inputs, shapes are propagated with random inputs built from the
placeholders' ``tensor_meta`` and no numeric check is made.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from tabulate import tabulate
from torch.fx import GraphModule
from torch.fx.passes.shape_prop import ShapeProp

from hant.errors import InputError, PassError
from hant.graphs.trace import as_input_tuple
from hant.passes.base import Decision, Pass, PassContext, resolve

__all__ = ["PassManager", "PassReport", "PassRow", "ManagerResult", "compare_outputs", "flatten_outputs"]


@dataclass(frozen=True)
class PassRow:
    """One run of one pass."""
    iteration: int
    name: str
    exact: bool
    modified: bool
    nodes_changed: int
    cost_before: float | None       # seconds, from the cost model
    cost_after: float | None
    max_error: float | None         # max over outputs of max|after - before| / max|before|
    seconds: float
    rolled_back: bool = False
    reason: str = ""

    @property
    def status(self) -> str:
        if self.rolled_back:
            return "rolled back"
        return "kept" if self.modified else "no change"


@dataclass
class PassReport:
    """Rows per pass run plus every :class:`Decision` the passes recorded.

    ``str(report)`` is two tabulate tables (pass runs, then decisions);
    :meth:`to_markdown` gives the same as GitHub markdown.
    """
    rows: list[PassRow] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)
    cost_model: str = ""

    @property
    def rolled_back(self) -> list[PassRow]:
        return [r for r in self.rows if r.rolled_back]

    def decisions_of(self, pass_name: str | None = None, action: str | None = None) -> list[Decision]:
        """Decisions filtered by pass name and/or action ("applied", "refused", "not_cheaper", "rolled_back")."""
        return [d for d in self.decisions
                if (pass_name is None or d.pass_name == pass_name) and (action is None or d.action == action)]

    def _tables(self, fmt: str) -> str:
        def us(value):
            return "" if value is None else f"{value * 1e6:.1f}"

        def err(value):
            return "" if value is None else f"{value:.2e}"

        runs = [[r.iteration, r.name, "exact" if r.exact else "lossy", r.status, r.nodes_changed,
                 us(r.cost_before), us(r.cost_after), err(r.max_error), f"{r.seconds * 1e3:.0f}", r.reason]
                for r in self.rows]
        unit = f" [{self.cost_model}, us]" if self.cost_model else " [us]"
        text = tabulate(runs, headers=["iter", "pass", "kind", "status", "nodes changed", "cost before" + unit,
                                       "cost after" + unit, "max rel error", "ms", "reason"], tablefmt=fmt)
        if self.decisions:
            rows = [[d.pass_name, d.site, d.action, d.reason, us(d.cost_before), us(d.cost_after)]
                    for d in self.decisions]
            text += "\n\n" + tabulate(rows, headers=["pass", "site", "decision", "reason", "cost before [us]",
                                                     "cost after [us]"], tablefmt=fmt)
        return text

    def __str__(self) -> str:
        return self._tables("simple")

    def to_markdown(self) -> str:
        return self._tables("github")


@dataclass
class ManagerResult:
    """``graph_module``: the rewritten module; ``report``: what happened; ``modified``: whether anything changed.

    ``cost_before``/``cost_after``: the cost model's reports of the input and the result
    (None without a cost model). ``max_error``: max over outputs of
    ``max|result - input| / max|input|`` on the check inputs (None without them).
    """
    graph_module: GraphModule
    report: PassReport
    modified: bool
    cost_before: Any = None
    cost_after: Any = None
    max_error: float | None = None


# ---------------------------------------------------------------- output comparison

def flatten_outputs(value: Any) -> list[torch.Tensor]:
    """Every tensor of a (nested) tuple/list/dict output, in a fixed order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for key in sorted(value, key=str) for t in flatten_outputs(value[key])]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in flatten_outputs(item)]
    return []


def compare_outputs(before: Any, after: Any, rtol: float, atol: float) -> tuple[bool, float, str]:
    """Compare two model outputs tensor by tensor.

    A tensor pair passes when shapes and dtypes agree and
    ``max|after - before| <= atol + rtol * max|before|`` (non-finite values must sit at the
    same places). Returns (all passed, max relative error, reason for the first failure).
    The relative error is ``max|after - before| / max|before|``.
    """
    xs, ys = flatten_outputs(before), flatten_outputs(after)
    if len(xs) != len(ys):
        return False, math.inf, f"output structure changed ({len(xs)} tensors before, {len(ys)} after)"
    worst, reason = 0.0, ""
    for i, (x, y) in enumerate(zip(xs, ys)):
        if x.shape != y.shape or x.dtype != y.dtype:
            return False, math.inf, (f"output {i} changed from {tuple(x.shape)} {x.dtype} "
                                     f"to {tuple(y.shape)} {y.dtype}")
        if not x.is_floating_point() and not x.is_complex():
            if not torch.equal(x, y):
                return False, math.inf, f"integer output {i} changed"
            continue
        x64, y64 = x.detach().double(), y.detach().double()
        finite = torch.isfinite(x64)
        if not torch.equal(finite, torch.isfinite(y64)) or not torch.equal(x64[~finite], y64[~finite]):
            return False, math.inf, f"output {i}: non-finite values changed"
        if not finite.any():
            continue
        diff = float((x64[finite] - y64[finite]).abs().max())
        scale = float(x64[finite].abs().max())
        rel = diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)
        worst = max(worst, rel)
        if diff > atol + rtol * scale and not reason:
            reason = (f"output {i}: max abs error {diff:.3g} > atol {atol:g} + rtol {rtol:g} * max|out| {scale:.3g}")
    return not reason, worst, reason


# ---------------------------------------------------------------- copying and bookkeeping

def _tensors(gm: GraphModule) -> list[torch.Tensor]:
    return [t for _, t in gm.named_parameters(remove_duplicate=False)] + \
           [t for _, t in gm.named_buffers(remove_duplicate=False)]


def _structural_copy(module: torch.nn.Module, recompile: bool = True) -> torch.nn.Module:
    """Copy the module tree and graph, sharing parameter and buffer tensors with ``module``.

    Every module object is new (its ``_modules``/``_parameters``/``_buffers`` dicts too), so a
    pass may add, replace or delete submodules and tensors of the copy freely; the graph is
    deep-copied. Much cheaper than ``copy.deepcopy`` of the whole GraphModule.

    ``recompile=False`` skips generating and compiling Python code for the copied graphs:
    each copy runs the forward compiled for ``module``'s identical graph instead (it is
    called like any nn.Module). A caller that edits the copy's graph recompiles it, as
    every pass must.
    """
    if isinstance(module, GraphModule):
        new = GraphModule.__new__(type(module))  # its own singleton class, as GraphModule wants
        new.__dict__.update(module.__dict__)
    else:
        new = copy.copy(module)
    state = new.__dict__  # written directly: nn.Module.__setattr__ is slow and these are plain containers
    state["_modules"] = {k: (_structural_copy(v, recompile) if v is not None else None)
                         for k, v in module._modules.items()}
    state["_parameters"] = dict(module._parameters)
    state["_buffers"] = dict(module._buffers)
    state["_non_persistent_buffers_set"] = set(module._non_persistent_buffers_set)
    if isinstance(module, GraphModule):
        state["meta"] = dict(module.meta)
        graph = copy.deepcopy(module.graph)
        if recompile:
            new.graph = graph  # sets owning_module and recompiles
        else:
            state["_graph"] = graph
            graph.owning_module = new
            type(new).forward = type(module).forward  # the code compiled for the same graph
    return new


def _signature(gm: GraphModule) -> set[tuple]:
    return {(n.name, n.op, str(n.target), str(n.args), str(n.kwargs)) for n in gm.graph.nodes}


def _inputs_from_meta(gm: GraphModule) -> tuple:
    """Random inputs shaped like the placeholders' ``tensor_meta`` (for shape propagation only)."""
    generator = torch.Generator().manual_seed(0)
    inputs = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        meta = node.meta.get("tensor_meta")
        if meta is None or not hasattr(meta, "shape"):
            raise InputError(f"placeholder {node.name!r} has no tensor_meta; give check inputs, or trace the model "
                             "with hant.trace(model, example_inputs) first")
        if meta.dtype.is_floating_point:
            inputs.append(torch.randn(tuple(meta.shape), generator=generator).to(meta.dtype))
        else:
            inputs.append(torch.zeros(tuple(meta.shape), dtype=meta.dtype))
    return tuple(inputs)


def _has_shapes(gm: GraphModule) -> bool:
    return all("tensor_meta" in n.meta for n in gm.graph.nodes if n.op not in ("output", "get_attr"))


def _run(gm: GraphModule, inputs: tuple) -> Any:
    """Run ``gm`` once, filling ``tensor_meta`` on every node on the way; return its outputs."""
    with torch.no_grad():
        return ShapeProp(gm).propagate(*inputs)


def _require_deterministic(gm: GraphModule, inputs: tuple, outputs: Any) -> None:
    """Raise :class:`PassError` unless ``gm`` gives exactly ``outputs`` on ``inputs`` again.

    Asked when a pass fails its numeric check, before the failure is blamed on the pass:
    a model whose outputs change from run to run (dropout in train mode) cannot be checked.
    """
    with torch.no_grad():
        again = gm(*inputs)
    ok, _, why = compare_outputs(outputs, again, 0.0, 0.0)
    if not ok:
        raise PassError(f"the model's outputs differ between two runs on the same inputs ({why}); "
                        "numeric checks need a deterministic model: call model.eval()")


# ---------------------------------------------------------------- the manager

class PassManager:
    """Run passes in order (to a fixed point when ``fixed_point``), prove exact ones, roll back failures.

    ``passes``: anything :func:`hant.passes.base.resolve` accepts (preset name, comma list,
    pass classes or instances). ``cost``: a cost-model spec or object (None: no pricing).
    ``check``: example inputs (tensor or tuple); with them every exact pass is checked and
    rolled back when it breaks numerics beyond ``rtol``/``atol``. ``max_iterations`` bounds
    the fixed-point loop.
    """

    def __init__(self, passes: str | Iterable, *, cost: Any = "roofline:cpu", check: Any = None,
                 rtol: float = 1e-4, atol: float = 1e-5, fixed_point: bool = False, max_iterations: int = 10):
        from hant.cost_models import get as get_cost_model

        self.passes = resolve(passes)
        for item in self.passes:
            cls = item if isinstance(item, type) else type(item)
            if not (isinstance(cls, type) and issubclass(cls, Pass)):
                raise PassError(f"{item!r} is not a hant Pass (subclass hant.passes.Pass and register it)")
        self.cost_model = get_cost_model(cost) if cost is not None else None
        self.check_inputs = as_input_tuple(check) if check is not None else None
        if rtol < 0 or atol < 0:
            raise PassError(f"tolerances must be non-negative, got rtol={rtol}, atol={atol}")
        if max_iterations < 1:
            raise PassError(f"max_iterations must be at least 1, got {max_iterations}")
        self.rtol, self.atol = rtol, atol
        self.fixed_point, self.max_iterations = fixed_point, max_iterations

    def _instances(self, context: PassContext) -> list[Pass]:
        instances = []
        for item in self.passes:
            instance = item(context) if isinstance(item, type) else item
            instance.context = context
            instances.append(instance)
        return instances

    def _cost(self, gm: GraphModule):
        return None if self.cost_model is None else self.cost_model.graph_cost(gm)

    def __call__(self, gm: GraphModule) -> ManagerResult:
        """Run the passes on a deep copy of ``gm``; ``gm`` is never touched."""
        return self.run(gm)

    def run(self, gm: GraphModule, *, copy_tensors: bool = True, outputs: Any = None) -> ManagerResult:
        """Run the passes over a copy of ``gm`` and return the result; ``gm`` is never touched.

        ``copy_tensors=False`` copies only the graph and module tree and lets the result
        share unchanged parameters with ``gm`` (passes never write to tensors; the manager
        checks that). :func:`hant.optimize` uses it on the copy it traced itself.

        ``outputs``: ``gm``'s outputs on the check inputs when the caller already has them
        (:func:`hant.optimize` gets them from tracing, which ran the graph to fill
        ``tensor_meta``); the manager then does not run ``gm`` before the first pass. They
        must come from ``gm`` itself on those very inputs: they are the reference every
        pass is checked against.
        """
        if not isinstance(gm, GraphModule):
            raise PassError(f"PassManager takes a torch.fx.GraphModule, got {type(gm).__name__}; "
                            "capture the model with hant.trace(model, example_inputs) first")
        current = copy.deepcopy(gm) if copy_tensors else _structural_copy(gm)
        inputs = self.check_inputs if self.check_inputs is not None else _inputs_from_meta(current)
        reference = original = None
        if self.check_inputs is not None or not _has_shapes(current):
            try:
                known = outputs is not None and self.check_inputs is not None and _has_shapes(current)
                first = outputs if known else _run(current, inputs)
            except Exception as exc:
                raise InputError(f"the inputs do not run through the graph: {type(exc).__name__}: {exc}") from exc
            if self.check_inputs is not None:
                reference = original = first

        context = PassContext(cost=self.cost_model, check_inputs=self.check_inputs, rtol=self.rtol, atol=self.atol)
        passes = self._instances(context)
        if reference is not None and not all(pass_.exact for pass_ in passes):
            _require_deterministic(current, inputs, reference)
        report = PassReport(cost_model=getattr(self.cost_model, "name", "") if self.cost_model else "")
        seen_decisions: set[Decision] = set()
        cost_report = cost_first = self._cost(current)
        any_modified = False
        # A pass that ran on this very graph and left it unchanged would leave it unchanged
        # again (passes are deterministic): it is skipped. ``version`` counts kept changes.
        # A pass that changed the graph runs again even when it claims to be idempotent.
        version, unchanged_at = 0, {}
        iterations = self.max_iterations if self.fixed_point else 1
        for iteration in range(1, iterations + 1):
            changed_this_round = False
            for index, pass_ in enumerate(passes):
                key = type(pass_) if isinstance(self.passes[index], type) else id(pass_)
                if unchanged_at.get(key) == version:
                    continue
                current, reference, cost_report, row, decisions = self._run_one(
                    pass_, iteration, current, inputs, reference, cost_report, context)
                report.rows.append(row)
                for decision in decisions:
                    if decision not in seen_decisions:
                        seen_decisions.add(decision)
                        report.decisions.append(decision)
                if row.modified and not row.rolled_back:
                    changed_this_round = any_modified = True
                    version += 1
                else:
                    unchanged_at[key] = version
            if not changed_this_round:
                break
        max_error = None
        if original is not None:
            _, max_error, _ = compare_outputs(original, reference, self.rtol, self.atol)
        return ManagerResult(current, report, any_modified, cost_first, cost_report, max_error)

    def _run_one(self, pass_: Pass, iteration: int, current: GraphModule, inputs: tuple, reference: Any,
                 cost_report: Any, context: PassContext):
        """Run one pass on a copy of ``current``.

        Returns the module to keep, its outputs on the inputs, its cost report, the report
        row and the pass's decisions.
        """
        cost_before = cost_report.latency_s if cost_report is not None else None
        work = _structural_copy(current, recompile=False)  # a pass that edits it recompiles it
        before_signature = _signature(current)
        versions = [(t, t._version) for t in _tensors(current)]
        first_decision = len(context.decisions)
        start = time.perf_counter()
        failure, result_module, modified = "", None, False
        try:
            result = pass_(work)
            if result is None:
                raise PassError(f"pass {pass_.name!r} returned None; a pass returns torch.fx PassResult")
            result_module, modified = result.graph_module, bool(result.modified)
        except Exception as exc:  # a failing pass is reported and rolled back, never kept
            failure = f"raised {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        if any(t._version != v for t, v in versions):
            raise PassError(f"pass {pass_.name!r} modified a parameter or buffer in place; passes must put new "
                            "weights into new modules (see hant.passes.surgery.new_parameter)")
        nodes_changed = 0
        if not failure:
            after_signature = _signature(result_module)
            nodes_changed = len(before_signature ^ after_signature)
            modified = modified or nodes_changed > 0
        max_error, cost_after, outputs = None, cost_report, reference
        if not failure and modified:
            try:
                result_module.graph.lint()
                result_module.recompile()
                outputs = _run(result_module, inputs)  # also re-propagates shapes
                if reference is not None:
                    ok, max_error, why = compare_outputs(reference, outputs, self.rtol, self.atol)
                    if not ok and pass_.exact:
                        failure = f"broke numerics: {why}"
                else:
                    outputs = None
                if not failure:
                    cost_after = self._cost(result_module)
            except Exception as exc:
                failure = f"left a graph that does not run: {type(exc).__name__}: {str(exc).strip()[:200]}"
            if failure.startswith("broke numerics"):
                _require_deterministic(current, inputs, reference)  # blame the pass only if the model is not to blame
        seconds = time.perf_counter() - start

        decisions = context.decisions[first_decision:]
        if failure:
            decisions = [dataclasses.replace(d, action="rolled_back", reason=f"{d.action}, then the pass was rolled "
                                             f"back ({failure}); was: {d.reason}") for d in decisions]
            row = PassRow(iteration, pass_.name, pass_.exact, modified, nodes_changed, cost_before, cost_before,
                          max_error, seconds, rolled_back=True, reason=failure)
            return current, reference, cost_report, row, decisions
        if not modified:
            row = PassRow(iteration, pass_.name, pass_.exact, False, 0, cost_before, cost_before, None, seconds)
            return current, reference, cost_report, row, decisions
        reason = "" if pass_.exact or max_error is None else f"lossy: output drift {max_error:.2e}"
        latency_after = cost_after.latency_s if cost_after is not None else None
        row = PassRow(iteration, pass_.name, pass_.exact, True, nodes_changed, cost_before, latency_after,
                      max_error, seconds, reason=reason)
        return result_module, outputs, cost_after, row, decisions
