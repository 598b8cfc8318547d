"""fuse_parallel: horizontal fusion of sibling convolutions or linears.

Convolutions that read the same tensor with the same kernel size, stride, padding,
dilation, groups (1) and padding mode, or linears that read the same tensor, become ONE
op whose weights are the siblings' weights concatenated along the output channels,
followed by ``torch.split`` along the channel dim (1 for convs, last for linears) whose
pieces replace the siblings. This is exact: every output channel is computed by the same
dot product as before.

The fusion is priced with the context's cost model (the same resolution as fold_linear:
``roofline:cpu``, else ``flops``, when the context has none): the siblings against the
fused op plus the split (its getitems are views), kept only when strictly cheaper. The
split is priced at least as a copy of its elements (the model's price of a concatenation
of the pieces): eager torch slices channels as views, but exported to ONNX it is a Split
kernel that copies every element and cuts the fused op off from the ops after it
(onnxruntime's Conv+ReLU and Conv+Add fusions, its blocked-layout chains), so a fusion
that only saves a kernel launch makes the deployed model slower. Grouped convolutions are refused:
their fused output channels interleave per group, so a split cannot separate them.
Transposed convolutions, non-zero padding modes and run-time weights are left alone.
Every choice is recorded with :meth:`Pass.decide`. New weights go into new modules.
"""

from __future__ import annotations

import operator
from collections import defaultdict

import torch
import torch.nn as nn
from torch.fx import GraphModule, Node
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from hant.graphs.ops import conv_of, linear_of, output_dtype, output_shape
from hant.passes.base import Pass, PassResult, register
from hant.passes.fold_linear import Price, cost_model_for, price
from hant.passes.surgery import add_module, copy_meta, prune_unused, readable

__all__ = ["FuseParallel"]

_CONV_MODULES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def _signature(node: Node) -> tuple | None:
    """What siblings must share to be fused, or None when the node is not a fusable conv/linear."""
    shape, dtype = output_shape(node), output_dtype(node)
    if shape is None:
        return None
    conv = conv_of(node)
    if conv is not None:
        if conv.transposed or conv.padding_mode != "zeros" or conv.weight is None or (conv.has_bias and
                                                                                       conv.bias is None):
            return None
        return ("conv", conv.input, conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups,
                tuple(shape[2:]), dtype, conv.weight.device)
    lin = linear_of(node)
    if lin is not None:
        if lin.weight is None or (lin.has_bias and lin.bias is None):
            return None
        return ("linear", lin.input, tuple(shape[:-1]), dtype, lin.weight.device)
    return None


def _split_price(gm: GraphModule, model, split: Node, pieces: list[Node], dim: int) -> Price:
    """The split's price: the model's own, or, when higher, that of copying every element once.

    The copy is priced as the concatenation of the pieces (it reads and writes the same
    bytes as a Split kernel), through a scratch node erased again before returning.
    """
    with gm.graph.inserting_after(pieces[-1]):
        scratch = gm.graph.call_function(torch.cat, (list(pieces), dim))
    scratch.meta["tensor_meta"] = split.args[0].meta["tensor_meta"]
    try:
        return max(price(model, [split]), price(model, [scratch]))
    finally:
        gm.graph.erase_node(scratch)


@register
class FuseParallel(Pass):
    """Fuse convs/linears that read the same tensor into one op plus a split; see the module docstring."""

    name = "fuse_parallel"
    exact = True
    idempotent = True

    def call(self, gm: GraphModule) -> PassResult:
        model = cost_model_for(self.context)
        groups: dict[tuple, list[Node]] = defaultdict(list)
        for node in gm.graph.nodes:
            if node.op in ("call_module", "call_function"):
                key = _signature(node)
                if key is not None:
                    groups[key].append(node)
        modified = False
        for key, siblings in groups.items():
            if len(siblings) < 2:
                continue
            site = " | ".join(n.name for n in siblings)
            if key[0] == "conv" and key[6] != 1:
                self.decide(site, "refused", f"grouped convolutions (groups {key[6]}): fused output channels "
                                             "would interleave per group, so one split cannot separate them")
                continue
            modified |= self._fuse(gm, model, siblings, site, is_conv=key[0] == "conv")
        if modified:
            prune_unused(gm)
        return PassResult(gm, modified)

    def _fuse(self, gm: GraphModule, model, siblings: list[Node], site: str, is_conv: bool) -> bool:
        views = [conv_of(n) if is_conv else linear_of(n) for n in siblings]
        first = views[0]
        weight = torch.cat([v.weight.detach() for v in views], dim=0)
        has_bias = any(v.bias is not None for v in views)
        bias = torch.cat([v.bias.detach() if v.bias is not None else weight.new_zeros(v.weight.shape[0])
                          for v in views]) if has_bias else None
        sizes = [int(v.weight.shape[0]) for v in views]
        if is_conv:
            n = first.spatial_dims
            module = _CONV_MODULES[n](first.in_channels, weight.shape[0], first.kernel_size, stride=first.stride,
                                      padding=first.padding, dilation=first.dilation, groups=1, bias=has_bias,
                                      device="meta")
            dim = 1
        else:
            module = nn.Linear(first.in_features, weight.shape[0], bias=has_bias, device="meta")
            dim = len(output_shape(siblings[0])) - 1
        module.weight = nn.Parameter(weight.clone())
        if has_bias:
            module.bias = nn.Parameter(bias.clone())

        target = add_module(gm, f"{readable(siblings[0].name)}_fused", module)
        fused_shape = list(output_shape(siblings[0]))
        fused_shape[dim] = sum(sizes)
        with gm.graph.inserting_before(siblings[0]):
            fused = gm.graph.call_module(target, (first.input,))
            copy_meta(siblings[0], fused)
            fused.meta["tensor_meta"] = _extract_tensor_metadata(
                torch.empty(fused_shape, dtype=output_dtype(siblings[0]), device="meta"))
            split = gm.graph.call_function(torch.split, (fused, sizes), {"dim": dim})
            split.meta["tensor_meta"] = tuple(s.meta["tensor_meta"] for s in siblings)
            pieces = []
            for i, sibling in enumerate(siblings):
                piece = gm.graph.call_function(operator.getitem, (split, i))
                copy_meta(sibling, piece)
                piece.meta["tensor_meta"] = sibling.meta["tensor_meta"]
                pieces.append(piece)
        added = [fused, split, *pieces]
        # The getitems are views of the split's outputs (one multi-output Split in ONNX): not priced.
        before, after = price(model, siblings), price(model, [fused]) + _split_price(gm, model, split, pieces, dim)
        reason = f"{len(siblings)} {'convs' if is_conv else 'linears'} -> one with {sum(sizes)} outputs + split"
        if not after < before:
            for node in reversed(added):
                gm.graph.erase_node(node)
            delattr(gm, target)
            self.decide(site, "not_cheaper", reason, before.figure(after), after.figure(before))
            return False
        for sibling, piece in zip(siblings, pieces):
            sibling.replace_all_uses_with(piece)
        self.decide(site, "applied", reason, before.figure(after), after.figure(before))
        return True
