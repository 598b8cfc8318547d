"""Exact algebra of linear (affine) tensor maps, for folding chains and branch sums.

Two families of affine maps are modelled. Maps built from a single op hold that op's
tensors as they are (no copy: most ops are never folded); every composed or summed map
is computed in float64:

* :class:`ConvMap`: ``y = conv(x, W, stride, padding, dilation, groups) + c`` on a
  ``(N, C, *spatial)`` tensor with zero padding. ``c`` is a per-channel bias ``(Cout,)``
  or, when zero padding makes the constant position dependent, a full map
  ``(Cout, *out_size)`` for the traced spatial size (never for a single output position,
  where it is per-channel). Per-channel scale/shift (eval BatchNorm, ``mul``/``add`` by a
  per-channel constant), identity and average pooling are depthwise ConvMaps.
* :class:`LinearMap`: ``y = x @ W.T + b`` on the last dimension.

``compose(first, second)`` and ``add(a, b, alpha)`` return a new map when the result is
exactly one map of the same family, else a ``str`` saying why not (the refusal reason a
pass reports). Nothing here knows about torch.fx.

Classifier heads cross between the families: a LinearMap on the channels of an
``(N, C, 1, ..., 1)`` tensor is a 1x..x1 ConvMap (:func:`linear_as_conv_map`); a ConvMap
with a single output position is a LinearMap on its flattened input
(:func:`single_position_linear`); and a pointwise map commutes with a global average
(:func:`commute_with_global_mean`, :func:`after_global_mean`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import product

import torch
import torch.nn.functional as F

__all__ = ["ConvMap", "LinearMap", "AffineMap", "compose", "add", "conv_map", "diagonal_conv_map",
           "identity_conv_map", "avg_pool_conv_map", "linear_map", "diagonal_linear_map", "identity_linear_map",
           "linear_as_conv_map", "single_position_linear", "commute_with_global_mean", "after_global_mean",
           "regroup_blocks", "dilate_taps"]

_F64 = torch.float64
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _f64(t: torch.Tensor) -> torch.Tensor:
    """The algebra runs in float64 on the CPU, whatever device the model lives on."""
    return t.to(device="cpu", dtype=_F64)


@dataclass(frozen=True)
class ConvMap:
    """``y = conv(x) + const`` with weight blocks ``(groups, Cout/groups, Cin/groups, *kernel)``.

    ``in_size``/``out_size`` are the spatial sizes of input and output (traced shapes);
    ``const`` is ``(Cout,)`` or a position-dependent map ``(Cout, *out_size)``.
    """
    blocks: torch.Tensor
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    const: torch.Tensor
    in_size: tuple[int, ...]
    out_size: tuple[int, ...]

    @property
    def groups(self) -> int:
        return self.blocks.shape[0]

    @property
    def in_channels(self) -> int:
        return self.blocks.shape[0] * self.blocks.shape[2]

    @property
    def out_channels(self) -> int:
        return self.blocks.shape[0] * self.blocks.shape[1]

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return tuple(self.blocks.shape[3:])

    @property
    def spatial_dims(self) -> int:
        return len(self.stride)

    @property
    def has_bias_map(self) -> bool:
        """True when the constant varies with position (a border effect of zero padding)."""
        return self.const.dim() > 1

    @property
    def is_pointwise(self) -> bool:
        """True when each output position reads only the same input position (1x..x1 kernel, stride 1,
        no padding): the map is then the same at every position and for any spatial size."""
        n = self.spatial_dims
        return (self.kernel_size == (1,) * n and self.stride == (1,) * n and self.padding == (0,) * n
                and not self.has_bias_map)

    @property
    def weight(self) -> torch.Tensor:
        """The weight in torch's grouped layout ``(Cout, Cin/groups, *kernel)``."""
        return self.blocks.reshape(self.out_channels, *self.blocks.shape[2:])

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Evaluate the map (for tests and for computing constant maps)."""
        w = self.weight.to(device=x.device, dtype=x.dtype)
        y = _CONV[self.spatial_dims](x, w, None, self.stride, self.padding, self.dilation, self.groups)
        c = self.const.to(device=x.device, dtype=x.dtype)
        return y + (c if self.has_bias_map else c.view(-1, *[1] * self.spatial_dims))


@dataclass(frozen=True)
class LinearMap:
    """``y = x @ weight.T + bias`` on the last dimension."""
    weight: torch.Tensor
    bias: torch.Tensor

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1]

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]


AffineMap = ConvMap | LinearMap


# ---------------------------------------------------------------- constructors

def conv_map(weight: torch.Tensor, bias: torch.Tensor | None, stride, padding, dilation, groups: int,
             in_size, out_size) -> ConvMap:
    """A ConvMap for an ordinary zero-padded convolution (a view of its tensors, never written to)."""
    w = weight.detach()
    cout = w.shape[0]
    blocks = w.reshape(groups, cout // groups, *w.shape[1:])
    const = bias.detach() if bias is not None else torch.zeros(cout, dtype=_F64)
    return ConvMap(blocks, tuple(stride), tuple(padding), tuple(dilation), const, tuple(in_size), tuple(out_size))


def diagonal_conv_map(scale: torch.Tensor, shift: torch.Tensor, size) -> ConvMap:
    """Per-channel ``y = scale * x + shift`` as a depthwise 1x..x1 ConvMap."""
    n = len(size)
    blocks = _f64(scale.detach()).reshape(-1, 1, 1, *[1] * n)
    return ConvMap(blocks, (1,) * n, (0,) * n, (1,) * n, _f64(shift.detach()), tuple(size), tuple(size))


def identity_conv_map(channels: int, size) -> ConvMap:
    """The identity on ``channels`` channels of spatial size ``size``."""
    return diagonal_conv_map(torch.ones(channels, dtype=_F64), torch.zeros(channels, dtype=_F64), size)


def avg_pool_conv_map(channels: int, kernel, stride, padding, divisor: int | None, in_size, out_size) -> ConvMap:
    """Average pooling that counts padded zeros (or has none) as a depthwise ConvMap."""
    n = len(kernel)
    value = 1.0 / (divisor if divisor else math.prod(kernel))
    blocks = torch.full((channels, 1, 1, *kernel), value, dtype=_F64)
    return ConvMap(blocks, tuple(stride), tuple(padding), (1,) * n, torch.zeros(channels, dtype=_F64),
                   tuple(in_size), tuple(out_size))


def linear_map(weight: torch.Tensor, bias: torch.Tensor | None) -> LinearMap:
    """A LinearMap for ``nn.Linear`` (a view of its tensors, never written to)."""
    w = weight.detach()
    b = bias.detach() if bias is not None else torch.zeros(w.shape[0], dtype=_F64)
    return LinearMap(w, b)


def diagonal_linear_map(scale: torch.Tensor, shift: torch.Tensor) -> LinearMap:
    return LinearMap(torch.diag(_f64(scale.detach())), _f64(shift.detach()))


def identity_linear_map(features: int) -> LinearMap:
    return LinearMap(torch.eye(features, dtype=_F64), torch.zeros(features, dtype=_F64))


def linear_as_conv_map(m: LinearMap, spatial_dims: int) -> ConvMap:
    """``m`` acting on the channels of an ``(N, C, 1, ..., 1)`` tensor: a 1x..x1 ConvMap on one position."""
    ones = (1,) * spatial_dims
    blocks = m.weight.detach().reshape(1, m.out_channels, m.in_channels, *ones)
    return ConvMap(blocks, ones, (0,) * spatial_dims, ones, m.bias.detach(), ones, ones)


def single_position_linear(m: ConvMap) -> LinearMap:
    """A ConvMap with a single output position as a LinearMap on its row-major flattened input
    ``(Cin * prod(in_size))``; kernel taps that fall on the zero padding multiply zeros and are dropped."""
    if math.prod(m.out_size) != 1:
        raise ValueError(f"the map has {math.prod(m.out_size)} output positions, not one")
    dense = regroup_blocks(_f64(m.blocks), 1)[0]                   # (Cout, Cin, *kernel)
    weight = dense.new_zeros(m.out_channels, m.in_channels, *m.in_size)
    taps, places = [], []
    for k, p, d, size in zip(m.kernel_size, m.padding, m.dilation, m.in_size):
        first = -(-p // d)                                          # first tap at input position >= 0
        last = min(k - 1, (size - 1 + p) // d)                      # last tap at input position < size
        taps.append(slice(first, last + 1))
        places.append(slice(first * d - p, max(last * d - p + 1, 0), d))
    weight[(slice(None),) * 2 + tuple(places)] = dense[(slice(None),) * 2 + tuple(taps)]
    return LinearMap(weight.reshape(m.out_channels, -1), _f64(m.const).reshape(-1))


def commute_with_global_mean(m: ConvMap) -> ConvMap:
    """For a pointwise ``m`` (:attr:`ConvMap.is_pointwise`): the map ``p`` on one position with
    ``mean(m(x)) = p(mean(x))``, means taken over all positions (the same weights and constant)."""
    if not m.is_pointwise:
        raise ValueError("only a pointwise map commutes with a global average")
    ones = (1,) * m.spatial_dims
    return ConvMap(m.blocks, m.stride, m.padding, m.dilation, m.const, ones, ones)


def after_global_mean(p: ConvMap, size) -> ConvMap:
    """``p(mean of x over all positions)`` for ``x`` of spatial size ``size``, ``p`` a map on one position,
    as one ConvMap (kernel = stride = ``size``). Its blocks are an expanded view of ``p``'s, so the map
    costs no memory until its weights are copied."""
    size = tuple(size)
    n = len(size)
    if p.in_size != (1,) * n or not p.is_pointwise:
        raise ValueError("the map after a global average must be pointwise on one position")
    blocks = (_f64(p.blocks) / math.prod(size)).expand(*p.blocks.shape[:3], *size)
    return ConvMap(blocks, size, (0,) * n, (1,) * n, p.const, size, (1,) * n)


# ---------------------------------------------------------------- helpers

def regroup_blocks(blocks: torch.Tensor, groups: int) -> torch.Tensor:
    """Coarsen ``(g, co, ci, *k)`` blocks to ``groups`` (a divisor of g) block-diagonal blocks."""
    g, co, ci = blocks.shape[:3]
    if groups == g:
        return blocks
    r = g // groups
    src = blocks.reshape(groups, r, co, ci, *blocks.shape[3:])
    out = blocks.new_zeros(groups, r * co, r * ci, *blocks.shape[3:])
    for j in range(r):
        out[:, j * co:(j + 1) * co, j * ci:(j + 1) * ci] = src[:, j]
    return out


def dilate_taps(blocks: torch.Tensor, steps: tuple[int, ...]) -> torch.Tensor:
    """Spread the kernel taps ``steps`` apart (zeros between), per spatial dim."""
    k = blocks.shape[3:]
    size = tuple((kk - 1) * s + 1 for kk, s in zip(k, steps))
    out = blocks.new_zeros(*blocks.shape[:3], *size)
    out[(slice(None),) * 3 + tuple(slice(None, None, s) for s in steps)] = blocks
    return out


def _gcd_step(*steps: int) -> int:
    g = 0
    for s in steps:
        g = math.gcd(g, s)
    return g or 1


def _per_channel_if_single_position(const: torch.Tensor, out_size) -> torch.Tensor:
    """A bias map over a single output position is a per-channel bias."""
    return const.reshape(-1) if const.dim() > 1 and math.prod(out_size) == 1 else const


def _is_diagonal(m: ConvMap) -> bool:
    """True for a per-channel map (groups = channels, one input and one output channel per group)."""
    return m.blocks.shape[1] == 1 and m.blocks.shape[2] == 1


def _expand_const(m: ConvMap) -> torch.Tensor:
    """The constant term as a full ``(Cout, *out_size)`` map."""
    if m.has_bias_map:
        return m.const
    return m.const.view(-1, *[1] * m.spatial_dims).expand(-1, *m.out_size)


# ---------------------------------------------------------------- composition

def compose(first: AffineMap, second: AffineMap) -> AffineMap | str:
    """``second(first(x))`` as one map of the same family, or the reason it is not exact."""
    if type(first) is not type(second):
        return "a convolution-shaped map and a last-dimension linear map do not compose"
    if first.out_channels != second.in_channels:
        return f"channel counts differ ({first.out_channels} vs {second.in_channels})"
    if isinstance(first, LinearMap):
        w2 = _f64(second.weight)
        return LinearMap(w2 @ _f64(first.weight), w2 @ _f64(first.bias) + _f64(second.bias))
    return _compose_conv(first, second)


def _compose_conv(a: ConvMap, b: ConvMap) -> ConvMap | str:
    n = a.spatial_dims
    if b.spatial_dims != n or tuple(a.out_size) != tuple(b.in_size):
        return "spatial sizes of the two maps disagree"
    ka, kb = a.kernel_size, b.kernel_size
    for d in range(n):
        pointwise = ka[d] == 1 and a.stride[d] == 1 and a.padding[d] == 0
        if b.padding[d] and not pointwise:
            return (f"the second op zero-pads the first one's output (padding {tuple(b.padding)}) and the first "
                    f"is not a stride-1 unpadded pointwise op (kernel {ka}, stride {a.stride}, padding "
                    f"{a.padding}): the zero border is not the image of any input border, so the fold is not "
                    "exact at the borders")
    steps, size, stride, padding = [], [], [], []
    for d in range(n):
        step_a = a.dilation[d] if ka[d] > 1 else 0
        step_b = a.stride[d] * b.dilation[d] if kb[d] > 1 else 0
        unit = _gcd_step(step_a, step_b)
        steps.append(unit)
        size.append((a.stride[d] * b.dilation[d] * (kb[d] - 1) + a.dilation[d] * (ka[d] - 1)) // unit + 1)
        stride.append(a.stride[d] * b.stride[d])
        padding.append(a.padding[d] + a.stride[d] * b.padding[d])
    a_steps = tuple(max(a.dilation[d] // steps[d], 1) if ka[d] > 1 else 1 for d in range(n))
    product_of = _block_product(a, b, a_steps)
    g = math.gcd(a.groups, b.groups)
    out = torch.zeros(g, b.out_channels // g, a.in_channels // g, *size, dtype=_F64)
    for tap in product(*(range(k) for k in kb)):
        term = product_of(tap)                                         # (g, b's Cout/g, a's Cin/g, *a's span)
        start = [a.stride[d] * b.dilation[d] * tap[d] // steps[d] for d in range(n)]
        where = (slice(None),) * 3 + tuple(slice(s, s + w) for s, w in zip(start, term.shape[3:]))
        out[where] += term
    if a.has_bias_map or b.has_bias_map or (any(b.padding) and bool(a.const.any())):
        image = _f64(_expand_const(a)).unsqueeze(0)
        const = b.apply(image)[0]
    else:
        per_tap = _f64(b.blocks).sum(dim=tuple(range(3, 3 + n)))     # (gb, co, m)
        ca = _f64(a.const).view(b.groups, -1, 1)                         # (gb, m, 1)
        const = torch.bmm(per_tap, ca).reshape(-1) + _f64(b.const)
    return ConvMap(out, tuple(stride), tuple(padding), tuple(steps), _per_channel_if_single_position(const, b.out_size),
                   a.in_size, b.out_size)


def _block_product(a: ConvMap, b: ConvMap, a_steps: tuple[int, ...]):
    """``tap -> blocks``: b's kernel tap ``tap`` times a's kernel (taps spread ``a_steps`` apart), in
    ``gcd(a.groups, b.groups)`` groups. A per-channel side scales the other one's blocks instead of
    being expanded to block-diagonal dense blocks (a global pool after a dense 1x1 stays cheap)."""
    n = a.spatial_dims
    if _is_diagonal(a):                       # gcd = b.groups; a scales b's input channels
        g = b.groups
        wb = _f64(b.blocks)
        wa = dilate_taps(_f64(a.blocks), a_steps)
        wa = wa.reshape(g, 1, wb.shape[2], *wa.shape[3:])
        return lambda tap: wb[(Ellipsis,) + tuple(tap)].reshape(*wb.shape[:3], *[1] * n) * wa
    wa = dilate_taps(_f64(a.blocks), a_steps)
    if _is_diagonal(b):                       # gcd = a.groups; b scales a's output channels
        g = a.groups
        wb = _f64(b.blocks).reshape(g, wa.shape[1], *b.kernel_size)
        return lambda tap: wb[(Ellipsis,) + tuple(tap)].reshape(g, wa.shape[1], 1, *[1] * n) * wa
    g = math.gcd(a.groups, b.groups)
    wa = regroup_blocks(wa, g)
    wb = regroup_blocks(_f64(b.blocks), g)
    return lambda tap: torch.einsum("gom,gmi...->goi...", wb[(Ellipsis,) + tuple(tap)], wa)


# ---------------------------------------------------------------- sums

def add(a: AffineMap, b: AffineMap, alpha: float = 1.0) -> AffineMap | str:
    """``a(x) + alpha * b(x)`` for two maps of the same input, or the reason it is not one map."""
    if type(a) is not type(b):
        return "a convolution-shaped map and a last-dimension linear map cannot be summed into one op"
    if a.in_channels != b.in_channels or a.out_channels != b.out_channels:
        return "the branches have different channel counts"
    if isinstance(a, LinearMap):
        return LinearMap(_f64(a.weight) + alpha * _f64(b.weight), _f64(a.bias) + alpha * _f64(b.bias))
    return _add_conv(a, b, alpha)


def _add_conv(a: ConvMap, b: ConvMap, alpha: float) -> ConvMap | str:
    """Place both kernels in one kernel spanning the union of their input offsets.

    With zero padding this is always exact once strides and output sizes agree: per dim,
    branch b reads offsets ``[-p_b, e_b]`` and yields ``floor((L + p_b - e_b - 1) / s) + 1``
    outputs; equal outputs put ``L + P - max(e) - 1`` between two numerators with the same
    floor, so the union kernel with the largest padding ``P`` yields the same outputs too.
    """
    n = a.spatial_dims
    if b.spatial_dims != n or a.out_size != b.out_size or a.in_size != b.in_size:
        return "the branches have different spatial sizes"
    if a.stride != b.stride:
        return f"the branches have different strides ({a.stride} vs {b.stride})"
    ka, kb = a.kernel_size, b.kernel_size
    units, size, padding, offsets = [], [], [], ([], [])
    for d in range(n):
        starts = (-a.padding[d], -b.padding[d])
        lo = min(starts)
        ends = (starts[0] + a.dilation[d] * (ka[d] - 1), starts[1] + b.dilation[d] * (kb[d] - 1))
        unit = _gcd_step(a.dilation[d] if ka[d] > 1 else 0, b.dilation[d] if kb[d] > 1 else 0,
                         starts[0] - lo, starts[1] - lo)
        units.append(unit)
        size.append((max(ends) - lo) // unit + 1)
        padding.append(-lo)
        offsets[0].append((starts[0] - lo) // unit)
        offsets[1].append((starts[1] - lo) // unit)
    g = math.gcd(a.groups, b.groups)
    out = torch.zeros(g, a.out_channels // g, a.in_channels // g, *size, dtype=_F64)
    for m, offs, scale in ((a, offsets[0], 1.0), (b, offsets[1], alpha)):
        steps = tuple(m.dilation[d] // units[d] if m.kernel_size[d] > 1 else 1 for d in range(n))
        w = dilate_taps(regroup_blocks(_f64(m.blocks), g), steps)
        where = (slice(None),) * 3 + tuple(slice(o, o + s) for o, s in zip(offs, w.shape[3:]))
        out[where] += scale * w
    if a.has_bias_map or b.has_bias_map:
        const = _f64(_expand_const(a)) + alpha * _f64(_expand_const(b))
    else:
        const = _f64(a.const) + alpha * _f64(b.const)
    return ConvMap(out, a.stride, tuple(padding), tuple(units), _per_channel_if_single_position(const, a.out_size),
                   a.in_size, a.out_size)
