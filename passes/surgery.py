"""Graph-surgery helpers shared by the passes.

They keep the house rules in one place: new modules get readable unique names
(``layer1_0_conv1_folded``), new nodes copy ``meta`` (``nn_module_stack``,
``stack_trace``) from the node they replace, and nothing that still has users is erased.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn as nn
from torch.fx import GraphModule, Node

__all__ = ["unique_module_name", "add_module", "replace_with_module", "copy_meta", "prune_unused", "readable",
           "new_parameter"]

_META_KEYS = ("nn_module_stack", "stack_trace", "source_fn_stack", "from_node", "seq_nr")


def readable(name: str) -> str:
    """A dotted module path or node name turned into an identifier: ``layer1.0.conv1`` -> ``layer1_0_conv1``."""
    return re.sub(r"\W+", "_", name).strip("_") or "op"


def unique_module_name(gm: GraphModule, base: str) -> str:
    """``base`` made an identifier and unique among ``gm``'s attributes."""
    base = readable(base)
    name, i = base, 1
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    return name


def add_module(gm: GraphModule, base: str, module: nn.Module) -> str:
    """Add ``module`` as a top-level submodule under a unique readable name; return the name."""
    name = unique_module_name(gm, base)
    gm.add_module(name, module)
    return name


def copy_meta(src: Node, dst: Node) -> None:
    """Copy provenance meta (module stack, stack trace, ...) from ``src`` to ``dst``."""
    for key in _META_KEYS:
        if key in src.meta:
            dst.meta[key] = src.meta[key]


def replace_with_module(gm: GraphModule, old: Node, module: nn.Module, args: tuple[Any, ...], base_name: str,
                        kwargs: dict | None = None) -> Node:
    """Insert ``call_module(module)(*args)`` before ``old``, redirect ``old``'s users to it.

    ``old`` itself is left in place (now unused, unless something else still refers to it);
    call :func:`prune_unused` once the rewrite is done. Returns the new node, named after
    ``base_name``, with ``old``'s meta.
    """
    target = add_module(gm, base_name, module)
    with gm.graph.inserting_before(old):
        new = gm.graph.call_module(target, args, kwargs or {})
    new.name = gm.graph._graph_namespace.create_name(target, new)
    copy_meta(old, new)
    if "tensor_meta" in old.meta:
        new.meta["tensor_meta"] = old.meta["tensor_meta"]
    old.replace_all_uses_with(new)
    return new


def prune_unused(gm: GraphModule, *, edited: bool = True) -> GraphModule:
    """Erase dead nodes, then delete submodules, parameters and buffers no node uses; recompile.

    A parameter or buffer is used when a ``get_attr`` node names it or it belongs to a
    module a ``call_module`` node calls. Impure nodes (in-place ops, asserts) are kept by
    fx's own dead-code check.

    ``edited=False`` tells that the caller has not changed the graph since ``gm`` was last
    compiled: then the module is recompiled (and its graph linted) only when this call
    removed something.
    """
    removed = gm.graph.eliminate_dead_code()
    modules = sum(1 for _ in gm.modules())
    gm.delete_all_unused_submodules()
    removed = removed or sum(1 for _ in gm.modules()) != modules
    fetched = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    tensors = list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False))
    for name, _ in tensors:
        owner_path, _, attr = name.rpartition(".")
        if name in fetched or owner_path in called:
            continue
        owner = gm.get_submodule(owner_path) if owner_path else gm
        if hasattr(owner, attr):
            delattr(owner, attr)
            removed = True
    if edited or removed:
        gm.graph.lint()
        gm.recompile()
    return gm


def new_parameter(tensor: torch.Tensor) -> nn.Parameter:
    """A fresh parameter holding a detached copy of ``tensor`` (never shared with the caller)."""
    return nn.Parameter(tensor.detach().clone(), requires_grad=tensor.requires_grad)
