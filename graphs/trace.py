"""Capture: turn an nn.Module into a torch.fx GraphModule with shapes in ``node.meta``.

The canonical form is what ``torch.fx.symbolic_trace`` gives (``call_module`` nodes
with module names kept). Models that symbolic tracing cannot take are captured with
``torch.export`` and unlifted, which gives ATen-level ``call_function`` nodes with
``get_attr`` weights. The op views in :mod:`hant.graphs.ops` understand both forms.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import linecache
import os
import traceback
from typing import Any, Iterable, Sequence

import torch
import torch.fx
from torch.fx.passes.shape_prop import ShapeProp

from hant.errors import InputError, TraceError

__all__ = ["trace", "trace_with_outputs", "propagate_shapes", "as_input_tuple", "TRACE_METHODS"]

TRACE_METHODS = ("auto", "symbolic", "export")


def as_input_tuple(example_inputs: Any) -> tuple:
    """Normalise example inputs: a lone tensor becomes a 1-tuple, lists become tuples."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (list, tuple)):
        return tuple(example_inputs)
    raise InputError(
        f"example inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}; "
        "pass e.g. torch.randn(1, 3, 224, 224)"
    )


class _LeafTracer(torch.fx.Tracer):
    """A tracer that also keeps the given module types or qualified names as leaves."""

    def __init__(self, leaf_modules: Iterable[type | str] = ()):
        super().__init__()
        self._leaf_types = tuple(m for m in leaf_modules if isinstance(m, type))
        self._leaf_names = {m for m in leaf_modules if isinstance(m, str)}

    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self._leaf_names or (self._leaf_types and isinstance(m, self._leaf_types)):
            return True
        return super().is_leaf_module(m, module_qualified_name)


_LIBRARY_DIRS = tuple(
    os.path.dirname(os.path.abspath(path)) + os.sep for path in (torch.__file__, __file__)
)


def _user_frame(exc: BaseException) -> str:
    """The innermost traceback frame outside torch and hant, as 'file:line: code', or ''."""
    frames = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(frames):
        name = os.path.abspath(frame.filename)
        if frame.filename.startswith("<") or name.startswith(_LIBRARY_DIRS):
            continue
        code = frame.line or linecache.getline(frame.filename, frame.lineno).strip()
        return f"{frame.filename}:{frame.lineno}: {code}"
    return ""


def _symbolic(model: torch.nn.Module, leaf_modules, concrete_args) -> torch.fx.GraphModule:
    tracer = _LeafTracer(leaf_modules)
    graph = tracer.trace(model, concrete_args=concrete_args)
    if concrete_args:
        _default_concrete_args(model, graph, concrete_args)
    name = model.__class__.__name__
    return torch.fx.GraphModule(tracer.root, graph, name)


def _default_concrete_args(model: torch.nn.Module, graph: torch.fx.Graph, concrete_args: dict[str, Any]) -> None:
    """Make each fixed argument's placeholder default to its fixed value.

    fx keeps a placeholder for an argument given in ``concrete_args``, with the signature's
    default, and asserts at run time that the caller passes the fixed value. Defaulting the
    placeholder to that value lets the traced module be called with the remaining inputs
    only, while passing another value still fails the assert.
    """
    parameters = [p for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(parameters) != len(placeholders):
        return  # *args / **kwargs: fx names placeholders its own way; leave them as traced
    for parameter, node in zip(parameters, placeholders):
        value = concrete_args.get(parameter.name, torch.fx.PH)
        if value is not torch.fx.PH and not isinstance(value, torch.Tensor):
            node.args = (value,)


def _export(model: torch.nn.Module, inputs: tuple) -> torch.fx.GraphModule:
    program = torch.export.export(model, inputs, strict=False)
    return program.module()


@contextlib.contextmanager
def _buffers_kept(module: torch.nn.Module):
    """Restore every buffer's value on exit: a run in train mode must not move BatchNorm statistics."""
    saved = [(buffer, buffer.detach().clone()) for buffer in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def propagate_shapes(gm: torch.fx.GraphModule, example_inputs: Any) -> torch.fx.GraphModule:
    """Fill ``node.meta["tensor_meta"]`` of every node by running ``gm`` on the inputs.

    Runs under ``torch.no_grad`` and leaves ``gm``'s state as it found it (a train-mode
    BatchNorm's running statistics are restored after the run). Raises :class:`InputError`
    when the inputs do not run. Returns ``gm`` for chaining.
    """
    _propagate(gm, as_input_tuple(example_inputs))
    return gm


def _propagate(gm: torch.fx.GraphModule, inputs: tuple) -> Any:
    """:func:`propagate_shapes`, returning the graph's outputs on the inputs."""
    try:
        with torch.no_grad(), _buffers_kept(gm):
            return ShapeProp(gm).propagate(*inputs)
    except Exception as exc:  # the model's own error, wrapped
        raise InputError(f"the example inputs do not run through the graph: {exc}") from exc


def _check_runs(model: torch.nn.Module, inputs: tuple) -> None:
    try:
        with torch.no_grad(), _buffers_kept(model):
            model(*inputs)
    except Exception as exc:
        shapes = ", ".join(str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__ for t in inputs)
        raise InputError(
            f"the model does not run on example inputs of shape {shapes}: {type(exc).__name__}: {exc}. "
            "Give inputs the model accepts (check channels and spatial size)."
        ) from exc


def trace(
    model: torch.nn.Module,
    example_inputs: Any,
    *,
    leaf_modules: Sequence[type | str] = (),
    concrete_args: dict[str, Any] | None = None,
    method: str = "auto",
) -> torch.fx.GraphModule:
    """Capture ``model`` as a GraphModule with ``tensor_meta`` on every node.

    The model is deep-copied first: the caller's module, parameters and buffers are never
    touched. ``method="auto"`` tries ``torch.fx.symbolic_trace`` and falls back to
    ``torch.export`` (unlifted with ``.module()``); ``"symbolic"`` and ``"export"`` force one.
    ``leaf_modules`` (types or qualified names) and ``concrete_args`` go to the symbolic tracer.

    ``gm.meta["hant_trace_method"]`` records the method that succeeded.

    Raises :class:`InputError` when the inputs do not run through the model, and
    :class:`TraceError`, naming the failing source line, when neither method can capture it.
    """
    return trace_with_outputs(model, example_inputs, leaf_modules=leaf_modules, concrete_args=concrete_args,
                              method=method)[0]


def trace_with_outputs(
    model: torch.nn.Module,
    example_inputs: Any,
    *,
    leaf_modules: Sequence[type | str] = (),
    concrete_args: dict[str, Any] | None = None,
    method: str = "auto",
) -> tuple[torch.fx.GraphModule, Any]:
    """:func:`trace`, also returning the captured graph's outputs on ``example_inputs``.

    The outputs come from the run that filled ``tensor_meta`` (no extra run), so a caller
    that needs them, like :func:`hant.optimize` for its numeric checks, saves a forward
    pass. Arguments and errors as for :func:`trace`.
    """
    if method not in TRACE_METHODS:
        raise TraceError(f"unknown trace method {method!r}; use one of {', '.join(TRACE_METHODS)}")
    if not isinstance(model, torch.nn.Module):
        raise TraceError(f"expected an nn.Module, got {type(model).__name__}")
    inputs = as_input_tuple(example_inputs)
    model = copy.deepcopy(model)

    failures: list[tuple[str, BaseException]] = []
    if method in ("auto", "symbolic"):
        try:
            gm = _symbolic(model, leaf_modules, concrete_args)
            outputs = _propagate(gm, inputs)
            gm.meta["hant_trace_method"] = "symbolic"
            return gm, outputs
        except Exception as exc:
            failures.append(("symbolic_trace", exc))
    _check_runs(model, inputs)  # bad inputs are the user's, not the tracer's, problem
    if method in ("auto", "export"):
        try:
            gm = _export(model, inputs)
            outputs = _propagate(gm, inputs)
            gm.meta["hant_trace_method"] = "export"
            return gm, outputs
        except Exception as exc:
            failures.append(("torch.export", exc))

    lines = []
    for how, exc in failures:
        cause = exc
        while cause.__cause__ is not None:  # the innermost error names the model's own line
            cause = cause.__cause__
        where = _user_frame(cause)
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        lines.append(f"  {how} failed{(' at ' + where) if where else ''}: {type(cause).__name__}: {first}")
    raise TraceError(
        f"could not capture {type(model).__name__}:\n" + "\n".join(lines) + "\n"
        "Fix: mark the module that holds data-dependent control flow as a leaf "
        "(trace(..., leaf_modules=[TheModule or 'path.to.module'])), or fix the branching inputs "
        "with concrete_args={'flag': value}."
    )
