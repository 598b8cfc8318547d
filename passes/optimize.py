"""hant.optimize: trace a model, run a pass pipeline with numeric proof, return the result."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule

from hant.graphs.trace import as_input_tuple, trace_with_outputs
from hant.passes.manager import PassManager, PassReport

__all__ = ["optimize", "OptimizeResult"]


@dataclass
class OptimizeResult:
    """What :func:`optimize` returns.

    ``module``: the rewritten GraphModule (an ordinary nn.Module, no unused submodules or
    tensors). ``report``: per pass run and per decision; prints as a table.
    ``cost_before``/``cost_after``: the cost model's reports of the traced and the rewritten
    graph (None with ``cost=None``). ``max_error``: max over outputs of
    ``max|optimized - original| / max|original|`` on the example inputs (None with
    ``check=False``).
    """
    module: GraphModule
    report: PassReport
    cost_before: Any
    cost_after: Any
    max_error: float | None

    @property
    def speedup(self) -> float | None:
        """Predicted latency ratio before/after, by the cost model (None without one)."""
        if self.cost_before is None or not self.cost_after.latency_s:
            return None
        return self.cost_before.latency_s / self.cost_after.latency_s

    def __str__(self) -> str:
        lines = [str(self.report), ""]
        if self.cost_before is not None:
            lines.append(f"cost [{self.cost_before.model}]: {self.cost_before.latency_s * 1e6:.1f} us -> "
                         f"{self.cost_after.latency_s * 1e6:.1f} us (predicted speedup {self.speedup:.3f}x)")
        if self.max_error is not None:
            lines.append(f"max relative output error vs the original: {self.max_error:.2e}")
        return "\n".join(lines)


def optimize(model: torch.nn.Module, example_inputs: Any, *, passes: Any = "exact", cost: Any = "roofline:cpu",
             check: bool = True, rtol: float = 1e-4, atol: float = 1e-5, fixed_point: bool = True,
             max_iterations: int = 10) -> OptimizeResult:
    """Trace ``model`` on ``example_inputs`` (with :func:`hant.trace`) and run ``passes`` over it.

    The user's model is never mutated (tracing deep-copies it). ``passes`` is a preset
    (``"exact"``), a comma list, or pass classes/instances; they run to a fixed point
    (bounded by ``max_iterations``) unless ``fixed_point=False``. With ``check`` every exact
    pass is proven on the example inputs within ``rtol``/``atol`` and rolled back when it
    breaks numerics (see :class:`hant.passes.manager.PassManager`). ``cost`` is a cost-model
    spec or object, or None.
    """
    inputs = as_input_tuple(example_inputs)
    gm, outputs = trace_with_outputs(model, inputs)
    manager = PassManager(passes, cost=cost, check=inputs if check else None, rtol=rtol, atol=atol,
                          fixed_point=fixed_point, max_iterations=max_iterations)
    # gm is trace's own deep copy of the model; its outputs come from the tracing run
    result = manager.run(gm, copy_tensors=False, outputs=outputs)
    return OptimizeResult(result.graph_module, result.report, result.cost_before, result.cost_after,
                          result.max_error)
