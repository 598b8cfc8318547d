"""Exact algebra of linear (affine) tensor maps, for folding chains and branch sums.

Two families of affine maps are modelled. Maps built from a single op hold that op's
tensors as they are (no copy: most ops are never folded); every composed or summed map
is computed in float64:

* :class:`ConvMap`: ``y = conv(x, W, stride, padding, dilation, groups) + c`` on a
  ``(N, C, *spatial)`` tensor with zero padding. ``c`` is a per-channel bias ``(Cout,)``
  or, when zero padding makes the constant position dependent, a full map
  ``(Cout, *out_size)`` for the traced spatial size. Per-channel scale/shift (eval
  BatchNorm, ``mul``/``add`` by a per-channel constant), identity and average pooling are
  depthwise ConvMaps.
* :class:`LinearMap`: ``y = x @ W.T + b`` on the last dimension.

``compose(first, second)`` and ``add(a, b, alpha)`` return a new map when the result is
exactly one map of the same family, else a ``str`` saying why not (the refusal reason a
pass reports). Nothing here knows about torch.fx.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import product

import torch
import torch.nn.functional as F

__all__ = ["ConvMap", "LinearMap", "AffineMap", "compose", "add", "conv_map", "diagonal_conv_map",
           "identity_conv_map", "avg_pool_conv_map", "linear_map", "diagonal_linear_map", "identity_linear_map",
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
    g = math.gcd(a.groups, b.groups)
    wa = regroup_blocks(_f64(a.blocks), g)
    wb = regroup_blocks(_f64(b.blocks), g)
    wa = dilate_taps(wa, tuple(max(a.dilation[d] // steps[d], 1) if ka[d] > 1 else 1 for d in range(n)))
    out = wa.new_zeros(g, wb.shape[1], wa.shape[2], *size)
    span = wa.shape[3:]
    for tap in product(*(range(k) for k in kb)):
        start = [a.stride[d] * b.dilation[d] * tap[d] // steps[d] for d in range(n)]
        where = (slice(None),) * 3 + tuple(slice(s, s + w) for s, w in zip(start, span))
        out[where] += torch.einsum("gom,gmi...->goi...", wb[(Ellipsis,) + tuple(tap)], wa)
    if a.has_bias_map or b.has_bias_map or (any(b.padding) and bool(a.const.any())):
        image = _f64(_expand_const(a)).unsqueeze(0)
        const = b.apply(image)[0]
    else:
        per_tap = _f64(b.blocks).sum(dim=tuple(range(3, 3 + n)))     # (gb, co, m)
        ca = _f64(a.const).view(b.groups, -1, 1)                         # (gb, m, 1)
        const = torch.bmm(per_tap, ca).reshape(-1) + _f64(b.const)
    return ConvMap(out, tuple(stride), tuple(padding), tuple(steps), const,
                   a.in_size, b.out_size)


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
    return ConvMap(out, a.stride, tuple(padding), tuple(units), const, a.in_size, a.out_size)
