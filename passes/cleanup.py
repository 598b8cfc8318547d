"""cleanup: remove no-op nodes, dead code, and unused submodules and parameters (exact).

* Identity-like nodes (``nn.Identity``, dropout in eval or with ``p=0``, stochastic depth
  in eval, ``clone``/``contiguous``/``detach``/``alias``; see
  :func:`hant.graphs.ops.is_identity_like`) are bypassed: their users read the input.
  Two safety rules keep that exact:

  - modules (``nn.Identity``, dropout) return their input object itself, so bypassing them
    changes nothing else;
  - a call that may copy (everything else) stays when it, its input or any of their users
    writes in place (bypassing would let a mutation reach a tensor it did not reach
    before), and when a user is a view/reshape-style op or the graph output, since
    ``x.transpose(...).contiguous().view(...)`` needs the copy's memory layout and an
    output must not alias an input.
* Dead nodes are erased; submodules, parameters and buffers no node uses are deleted
  (:func:`hant.passes.surgery.prune_unused`).
"""

from __future__ import annotations

from torch.fx import GraphModule, Node

from hant.graphs.ops import is_identity_like, is_inplace, is_shape_op, module_of
from hant.passes.base import Pass, PassResult, register
from hant.passes.surgery import prune_unused

__all__ = ["Cleanup"]


def _source(node: Node):
    """The input an identity-like node passes through."""
    if node.args:
        return node.args[0]
    for key in ("input", "self", "x"):
        if key in node.kwargs:
            return node.kwargs[key]
    return None


def _bypassable(node: Node) -> bool:
    if not is_identity_like(node):
        return False
    source = _source(node)
    if not isinstance(source, Node):
        return False
    if module_of(node) is not None:  # nn.Identity / dropout modules return their input itself
        return True
    # a call that may copy: keep it where memory layout or aliasing matters
    if any(is_inplace(n) for n in (node, source, *node.users, *source.users)):
        return False
    return not any(user.op == "output" or is_shape_op(user) for user in node.users)


def _state(gm: GraphModule) -> tuple:
    return (len(gm.graph.nodes), len(list(gm.named_modules())),
            len(list(gm.named_parameters(remove_duplicate=False))), len(list(gm.named_buffers(remove_duplicate=False))))


@register
class Cleanup(Pass):
    """Bypass identity-like nodes, erase dead code, delete unused submodules and tensors."""

    name = "cleanup"
    exact = True
    idempotent = True

    def call(self, gm: GraphModule) -> PassResult:
        before = _state(gm)
        bypassed = False
        for node in list(gm.graph.nodes):
            if _bypassable(node):
                node.replace_all_uses_with(_source(node))
                self.decide(node.name, "applied", "no-op removed (identity, eval dropout or copy)")
                bypassed = True
        prune_unused(gm, edited=bypassed)
        return PassResult(gm, _state(gm) != before)
