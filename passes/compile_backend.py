"""The ``torch.compile`` backend ``"hant"``: exact passes on dynamo's graph, then a downstream backend.

    model = torch.compile(model.eval(), backend="hant")            # exact passes, then inductor
    model = torch.compile(model.eval(), backend="hant", options={"downstream": "eager"})

Dynamo hands a backend a torch-level FX graph (``call_function`` nodes such as
``F.conv2d`` / ``F.batch_norm``) in which, in recent torch, every parameter and buffer
is a *placeholder* whose example input is the live tensor. Folding needs constants, so
for inference the backend **freezes** them: each parameter/buffer placeholder becomes a
``get_attr`` of the tensor it was called with at compile time (what inductor's
``freezing`` does). The op views already read that form (functional ops with ``get_attr``
weights), so hant's ``"exact"`` PassManager runs unchanged, checked on the example inputs
(a pass that breaks numerics is rolled back). The result goes to the downstream backend:
``"inductor"`` (default, via ``torch._inductor.compile_fx.compile_fx``), or ``"eager"``
(the rewritten graph's own ``forward``), or any registered dynamo backend name.

Contract: frozen weights are read once; a model whose weights change after compilation
(training, in-place updates) must be recompiled. When gradients are needed (grad mode on
and a parameter requires grad) the graph is handed downstream untouched, since frozen
weights would get no gradients. Registered under the ``torch_dynamo_backends`` entry point
of the package (dynamo loads it on first use of the name); where the package metadata is
stale (an editable checkout not reinstalled), :func:`register` registers it by hand.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch.fx import GraphModule

from hant.errors import PassError

__all__ = ["hant_backend", "freeze_parameters", "register", "BACKEND_NAME", "DOWNSTREAM_DEFAULT"]

BACKEND_NAME = "hant"
DOWNSTREAM_DEFAULT = "inductor"
_OPTIONS = ("downstream", "passes", "rtol", "atol")


def _is_weight(node: torch.fx.Node, value: Any) -> bool:
    """A placeholder that dynamo lifted from a module's parameters or buffers."""
    if isinstance(value, torch.nn.Parameter):
        return True
    name = str(node.target)
    return isinstance(value, torch.Tensor) and ("_parameters_" in name or "_buffers_" in name)


def freeze_parameters(gm: GraphModule, example_inputs: Sequence[Any]) -> tuple[GraphModule, list[int]]:
    """A copy of ``gm`` whose parameter/buffer placeholders are ``get_attr`` constants.

    Returns the new module and the positions of ``example_inputs`` it still takes (the
    remaining placeholders, in order). The constants are detached copies, so the caller's
    tensors are never shared with the rewritten graph.
    """
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    if len(placeholders) != len(example_inputs):
        raise PassError(f"dynamo gave {len(example_inputs)} example inputs for {len(placeholders)} placeholders")
    frozen = GraphModule(gm, gm.graph.__deepcopy__(), gm.__class__.__name__)
    keep: list[int] = []
    for index, (node, value) in enumerate(zip(frozen.graph.find_nodes(op="placeholder"), example_inputs)):
        if not _is_weight(node, value):
            keep.append(index)
            continue
        attr = f"_frozen_{index}_{node.name}"
        frozen.register_buffer(attr, value.detach().clone())
        with frozen.graph.inserting_before(node):
            constant = frozen.graph.get_attr(attr)
        constant.meta.update(node.meta)
        node.replace_all_uses_with(constant)
        frozen.graph.erase_node(node)
    frozen.graph.lint()
    frozen.recompile()
    return frozen, keep


def _downstream(name: str | Callable, gm: GraphModule, inputs: list) -> Callable:
    if callable(name):
        return name(gm, inputs)
    if name == "eager":
        return gm.forward
    if name == "inductor":
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, inputs)
    from torch._dynamo.backends.registry import lookup_backend

    return lookup_backend(name)(gm, inputs)


def _needs_grad(example_inputs: Sequence[Any]) -> bool:
    return torch.is_grad_enabled() and any(isinstance(v, torch.Tensor) and v.requires_grad for v in example_inputs)


def hant_backend(gm: GraphModule, example_inputs: list, *, options: dict | None = None) -> Callable:
    """The dynamo backend: freeze weights, run hant's exact passes (checked), compile downstream.

    ``options`` (``torch.compile(..., options={...})``): ``downstream`` (``"inductor"``,
    ``"eager"``, another backend name or a backend callable), ``passes`` (default
    ``"exact"``; any spec :class:`hant.passes.PassManager` takes), ``rtol``/``atol`` of the
    check (1e-4 / 1e-5). Unknown options raise :class:`PassError`.
    """
    from hant.passes.manager import PassManager

    options = dict(options or {})
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise PassError(f"unknown option(s) {', '.join(unknown)} for backend 'hant'; valid: {', '.join(_OPTIONS)}")
    downstream = options.get("downstream", DOWNSTREAM_DEFAULT)
    if _needs_grad(example_inputs):
        return _downstream(downstream, gm, example_inputs)
    from torch._guards import tracing
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    # dynamo compiles inside a fake-tensor tracing context (ShapeProp would pick it up); the check needs real tensors
    with unset_fake_temporarily(), tracing(None):
        frozen, keep = freeze_parameters(gm, example_inputs)
        inputs = [example_inputs[i] for i in keep]
        manager = PassManager(options.get("passes", "exact"), cost=None, check=tuple(inputs),
                              rtol=options.get("rtol", 1e-4), atol=options.get("atol", 1e-5), fixed_point=True)
        rewritten = manager(frozen).graph_module
    compiled = _downstream(downstream, rewritten, inputs)

    def run(*args):
        return compiled(*[args[i] for i in keep])

    run.hant_graph_module = rewritten      # for inspection and tests: what was handed downstream
    return run


def register() -> None:
    """Register ``hant_backend`` with dynamo as ``"hant"`` (for installs without the entry point)."""
    from torch._dynamo.backends.registry import _COMPILER_FNS, register_backend

    if BACKEND_NAME not in _COMPILER_FNS:
        register_backend(hant_backend, name=BACKEND_NAME)

