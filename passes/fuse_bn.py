"""fuse_bn: fold eval-mode BatchNorm into the conv or linear next to it (exact).

Two rewrites, both exact up to float rounding:

* **layer -> BN**: ``BN(conv(x))`` (conv 1d/2d/3d, transposed or not) or ``BN(linear(x))``
  becomes one conv/linear whose weights are scaled per output channel and whose bias
  absorbs the shift. Taken only when the layer's output feeds the BN alone: duplicating a
  conv to keep its other users would cost more than the BN it saves, so such a site is
  refused.
* **BN -> layer**: ``conv(BN(x))`` / ``linear(BN(x))`` becomes one layer whose weights are
  scaled per input channel. The shift ``b`` reaches the output as ``conv(b-field)``, the
  conv of a field equal to ``b`` inside the input and to the padding value outside. That
  is a constant per output channel when the conv is not transposed and pads with zeros
  nowhere (no padding, or reflect/replicate/circular padding, which copy ``a*x+b``
  faithfully); it then goes into the bias. Otherwise (zero padding, transposed convs) it
  varies near the borders, and is added as a **constant bias map**, a buffer computed for
  the traced spatial size (the rewritten graph then takes only that size). The BN's
  output may feed several convs/linears: each gets its own folded copy.

Refused, with the reason in the report: train-mode BN or ``track_running_stats=False``, a
layer whose output has other users, a BN output that feeds something other than
convs/linears, weights computed at run time, a BN channel axis that is not the layer's
feature axis. Weights shared with another call site are cloned for this site: new
weights always go into new modules, so the other call site keeps the original.

The pass reads graphs only through op views, so it works on traced (``call_module``)
and exported (ATen with ``get_attr`` weights) graphs; the folded layer is always a new
``call_module`` of a fresh ``nn.Conv*``/``nn.Linear``.
"""

from __future__ import annotations

import operator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx import GraphModule

from hant.graphs.ops import BatchNormView, ConvView, LinearView, batchnorm_of, conv_of, linear_of, output_shape
from hant.passes.base import Pass, PassResult, register
from hant.passes.surgery import copy_meta, prune_unused, readable, replace_with_module, unique_module_name

__all__ = ["FuseBatchNorm"]

_CONV_CLASSES = {(1, False): nn.Conv1d, (2, False): nn.Conv2d, (3, False): nn.Conv3d,
                 (1, True): nn.ConvTranspose1d, (2, True): nn.ConvTranspose2d, (3, True): nn.ConvTranspose3d}
_FUNCTIONAL = {(1, False): F.conv1d, (2, False): F.conv2d, (3, False): F.conv3d,
               (1, True): F.conv_transpose1d, (2, True): F.conv_transpose2d, (3, True): F.conv_transpose3d}


def _layer_of(node) -> ConvView | LinearView | None:
    return conv_of(node) or linear_of(node)


def _site(view) -> str:
    return view.node.target if view.node.op == "call_module" else view.node.name


def _folded_name(view) -> str:
    """``layer1_0_conv1`` -> ``layer1_0_conv1_folded`` (a layer folded twice keeps one suffix)."""
    base = readable(_site(view))
    return base if base.endswith("_folded") else f"{base}_folded"


def _new_conv(view: ConvView, weight: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    """A fresh conv module with ``view``'s geometry holding ``weight`` and ``bias`` (new tensors, not copied)."""
    cls = _CONV_CLASSES[(view.spatial_dims, view.transposed)]
    kwargs = dict(stride=view.stride, padding=view.padding, dilation=view.dilation, groups=view.groups, bias=True)
    if view.transposed:
        kwargs["output_padding"] = view.output_padding
    else:
        kwargs["padding_mode"] = view.padding_mode
    module = cls(view.in_channels, view.out_channels, view.kernel_size, device="meta", **kwargs)
    module.weight = nn.Parameter(weight, requires_grad=view.weight.requires_grad)
    module.bias = nn.Parameter(bias, requires_grad=view.weight.requires_grad)
    return module


def _new_linear(view: LinearView, weight: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    module = nn.Linear(view.in_features, view.out_features, device="meta")
    module.weight = nn.Parameter(weight, requires_grad=view.weight.requires_grad)
    module.bias = nn.Parameter(bias, requires_grad=view.weight.requires_grad)
    return module


def _out_channel_scale(view: ConvView, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``weight`` with output channel ``o`` multiplied by ``scale[o]``."""
    if not view.transposed:
        return weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))
    # transposed weight: (in, out / groups, k...); output channel g * out_per_group + j
    g = view.groups
    grouped = weight.reshape(g, weight.shape[0] // g, *weight.shape[1:])
    factor = scale.reshape(g, 1, weight.shape[1], *([1] * (weight.dim() - 2)))
    return (grouped * factor).reshape(weight.shape)


def _in_channel_scale(view: ConvView, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``weight`` with input channel ``i`` multiplied by ``scale[i]``."""
    if view.transposed:
        return weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))
    # weight: (out, in / groups, k...); output channel o reads input channels of its group
    g = view.groups
    out_per_group, in_per_group = weight.shape[0] // g, weight.shape[1]
    grouped = weight.reshape(g, out_per_group, in_per_group, *weight.shape[2:])
    factor = scale.reshape(g, 1, in_per_group, *([1] * (weight.dim() - 2)))
    return (grouped * factor).reshape(weight.shape)


def _pads_with_zeros(view: ConvView) -> bool:
    """True when some input position outside the tensor is read as zero (so a shift does not pass through)."""
    if view.transposed:
        return True
    if view.padding_mode != "zeros":
        return False
    if isinstance(view.padding, str):
        return view.padding != "valid" and any(k > 1 for k in view.kernel_size)
    return any(p > 0 for p in view.padding)


def _shift_response(view: ConvView, shift: torch.Tensor, input_shape: torch.Size) -> torch.Tensor:
    """``conv(b-field)`` with the original weights and no bias, in float64: (1, out, spatial...)."""
    field = shift.reshape(1, -1, *([1] * view.spatial_dims)).expand(1, -1, *input_shape[2:])
    weight = view.weight.detach().double()
    conv = _FUNCTIONAL[(view.spatial_dims, view.transposed)]
    kwargs = dict(stride=view.stride, dilation=view.dilation, groups=view.groups)
    if view.transposed:
        return conv(field, weight, None, padding=view.padding, output_padding=view.output_padding, **kwargs)
    if view.padding_mode != "zeros":  # the module pads explicitly, then convolves unpadded
        pad = [p for p in reversed(view.padding) for _ in range(2)]
        return conv(F.pad(field, pad, mode=view.padding_mode), weight, None, **kwargs)
    return conv(field, weight, None, padding=view.padding, **kwargs)


@register
class FuseBatchNorm(Pass):
    """Fold eval-mode BatchNorm into an adjacent conv or linear (see the module docstring)."""

    name = "fuse_bn"
    exact = True
    idempotent = True

    def call(self, gm: GraphModule) -> PassResult:
        # Two sweeps: every BN that can go into the layer before it first (no bias map
        # needed, and a conv between two BNs then takes both), the rest into the layers after.
        call_sites = self._call_sites(gm)
        changed, left = False, {}
        for node in list(gm.graph.nodes):
            bn = batchnorm_of(node)
            if bn is None or not bn.output.users:
                continue
            reason = self._refusal(bn)
            if reason:
                self.decide(_site(bn), "refused", reason)
                continue
            before = _layer_of(bn.input)
            problem = self._after_layer_problem(before, bn) if before is not None else "no conv or linear before it"
            if problem is None:
                self._fold_after(gm, before, bn, call_sites)
                changed = True
            else:
                left[node] = problem
        if changed:
            gm.graph.eliminate_dead_code()  # the layers folded above no longer count as users
        alive = set(gm.graph.nodes)
        for node, before_problem in left.items():
            bn = batchnorm_of(node) if node in alive else None
            if bn is None or not bn.output.users:
                continue
            after = [_layer_of(user) for user in bn.output.users]
            problem = self._before_layers_problem(after, bn)
            if problem is None:
                for view in after:
                    self._fold_before(gm, bn, view, call_sites)
                changed = True
            else:
                self.decide(_site(bn), "refused",
                            f"cannot fold into the layer before ({before_problem}) nor after ({problem})")
        if changed:
            prune_unused(gm)
        return PassResult(gm, changed)

    # ------------------------------------------------------------ site analysis

    @staticmethod
    def _call_sites(gm: GraphModule) -> dict[int, int]:
        """How many conv/linear nodes use each weight tensor (by identity)."""
        counts: dict[int, int] = {}
        for node in gm.graph.nodes:
            view = _layer_of(node)
            if view is not None and view.weight is not None:
                counts[id(view.weight)] = counts.get(id(view.weight), 0) + 1
        return counts

    @staticmethod
    def _refusal(bn: BatchNormView) -> str:
        """Why this BatchNorm has no fixed affine form, or ''."""
        if not bn.track_running_stats:
            return ("BatchNorm has track_running_stats=False: it normalises with batch statistics, "
                    "which no fixed weights reproduce")
        if bn.training:
            return "BatchNorm is in training mode (it uses batch statistics); call model.eval() first"
        if bn.node is not bn.output and len(bn.node.users) > 1:
            return "the BatchNorm's saved mean/variance outputs are used"
        return ""

    @staticmethod
    def _after_layer_problem(view, bn: BatchNormView) -> str | None:
        """Why BN(view(x)) cannot be folded into ``view``, or None."""
        if view.weight is None:
            return f"{view.node.name} computes its weight at run time"
        if len(view.output.users) > 1:
            return (f"{view.node.name}'s output has {len(view.output.users)} users; folding would need a duplicate "
                    "of the layer, which costs more than the BatchNorm")
        if bn.input is not view.output:
            return f"{view.node.name}'s result reaches the BatchNorm indirectly"
        if isinstance(view, LinearView):
            shape = output_shape(view.output)
            if shape is None or len(shape) != 2:
                return "the linear output is not 2-D (N, features), so the BatchNorm channel axis is not its features"
            if view.out_features != bn.num_features:
                return "channel counts differ"
        elif view.out_channels != bn.num_features:
            return "channel counts differ"
        return None

    @staticmethod
    def _before_layers_problem(views, bn: BatchNormView) -> str | None:
        """Why view(BN(x)) cannot be folded for every user ``view`` of the BN, or None."""
        shape = output_shape(bn.input)
        for view in views:
            if view is None:
                return "its output feeds an op that is not a conv or linear"
            if view.weight is None:
                return f"{view.node.name} computes its weight at run time"
            if view.input is not bn.output:
                return f"the BatchNorm output is not {view.node.name}'s data input"
            if isinstance(view, LinearView):
                if shape is None or len(shape) != 2:
                    return "the BatchNorm input is not 2-D (N, features), so its channels are not the linear's features"
                if view.in_features != bn.num_features:
                    return "channel counts differ"
            else:
                if view.in_channels != bn.num_features:
                    return "channel counts differ"
                if isinstance(view.padding, str) and view.padding_mode != "zeros":
                    return f"{view.node.name} pads {view.padding!r} in {view.padding_mode!r} mode"
                if _pads_with_zeros(view) and (shape is None or len(shape) != view.spatial_dims + 2):
                    return "the traced input shape is unknown, so no bias map can be computed for the padding"
        return None

    def _shared_note(self, view, call_sites: dict[int, int]) -> str:
        others = call_sites.get(id(view.weight), 1) - 1
        return f"; weights shared with {others} other call site(s): cloned for this site" if others > 0 else ""

    # ------------------------------------------------------------ rewrites

    def _fold_after(self, gm: GraphModule, view, bn: BatchNormView, call_sites: dict[int, int]) -> None:
        """BN(view(x)) -> view'(x)."""
        # scale and shift in float64; the weights are scaled in their own dtype (one rounding,
        # and no float64 copy of large weight tensors)
        dtype = view.weight.dtype
        scale, shift = bn.scale_shift(torch.float64)
        weight = view.weight.detach()
        bias = view.bias.detach().double() if view.bias is not None else torch.zeros_like(scale)
        new_bias = (bias * scale + shift).to(dtype)
        if isinstance(view, LinearView):
            module = _new_linear(view, weight * scale.to(dtype)[:, None], new_bias)
        else:
            module = _new_conv(view, _out_channel_scale(view, weight, scale.to(dtype)), new_bias)
        new = replace_with_module(gm, bn.output, module, (view.input,), _folded_name(view))
        copy_meta(view.node, new)
        self.decide(f"{_site(view)} + {_site(bn)}", "applied",
                    "BatchNorm folded into the preceding layer" + self._shared_note(view, call_sites))

    def _fold_before(self, gm: GraphModule, bn: BatchNormView, view, call_sites: dict[int, int]) -> None:
        """view(BN(x)) -> view'(x) (+ a constant bias map where padding reads zeros)."""
        dtype = view.weight.dtype
        scale, shift = bn.scale_shift(torch.float64)
        weight = view.weight.detach()
        bias = view.bias.detach().double() if view.bias is not None else None
        bias_map = None
        if isinstance(view, LinearView):
            new_weight = weight * scale.to(dtype)[None, :]
            new_bias = weight.double() @ shift + (bias if bias is not None else 0.0)
            module = _new_linear(view, new_weight, new_bias.to(dtype))
            how = "BatchNorm folded into the following linear"
        else:
            new_weight = _in_channel_scale(view, weight, scale.to(dtype))
            response = _shift_response(view, shift, output_shape(bn.input) or torch.Size())
            base = bias if bias is not None else torch.zeros(view.out_channels, dtype=torch.float64)
            if _pads_with_zeros(view):
                new_bias, bias_map = base, response
                how = (f"BatchNorm folded into the following conv; its zero padding needs a constant bias map "
                       f"{tuple(response.shape)} for the traced input size")
            else:
                dims = tuple(range(2, response.dim()))
                new_bias = base + response.mean(dim=dims).reshape(-1)
                how = "BatchNorm folded into the following conv"
            module = _new_conv(view, new_weight, new_bias.to(dtype))
        new = replace_with_module(gm, view.output, module, (bn.input,), _folded_name(view))
        copy_meta(view.node, new)
        if bias_map is not None:
            buffer = unique_module_name(gm, f"{new.target}_bias_map")
            gm.register_buffer(buffer, bias_map.to(dtype))
            with gm.graph.inserting_after(new):
                fetch = gm.graph.get_attr(buffer)
            with gm.graph.inserting_after(fetch):
                total = gm.graph.call_function(operator.add, (new, fetch))
            copy_meta(view.node, total)
            new.replace_all_uses_with(total, delete_user_cb=lambda user: user is not total)
        self.decide(f"{_site(bn)} + {_site(view)}", "applied", how + self._shared_note(view, call_sites))
