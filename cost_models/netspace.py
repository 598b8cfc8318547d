"""A space of random convolutional networks, for profiling and for training latency predictors.

:func:`sample_spec` draws a network description (a JSON-able dict) from a :class:`NetSpace`;
:func:`build` turns a description into an ``nn.Module``, always the same one for the same
description (architecture and weights). The networks follow the families real classifiers
come from, so a predictor trained on them meets familiar blocks in torchvision models:

* ``resnet``: basic or bottleneck residual blocks (ResNeXt-style grouped 3x3 when
  ``group_width`` is set), max-pool stem, ReLU;
* ``mobilenet_v2``: inverted residuals, ReLU6, 1280-channel head;
* ``mobilenet_v3``: inverted residuals with ReLU or hardswish, squeeze-excite gated by
  hardsigmoid, a hidden linear layer in the head;
* ``efficientnet``: MBConv with squeeze-excite (sigmoid gate) and SiLU;
* ``regnet``: grouped bottlenecks (bottleneck ratio 1, fixed group width), optional SE (RegNetY);
* ``shufflenet``: ShuffleNetV2 units (split the channels in two, convolve one half with
  1x1 / depthwise kxk / 1x1, concatenate, shuffle the channels), max-pool stem; channels
  are even but need not fill SIMD blocks (onnxruntime then runs them NCHW);
* ``squeezenet``: fire modules (1x1 squeeze, then 1x1 and 3x3 expands concatenated), max
  pools between stages, max-pool stem;
* ``mixed``: every stage draws its own block type, activation, kernel and SE.

Widths, depths, kernels (3, 5, 7), expansions, strides, activations, SE and the input
resolution (96 to 320 in the default space) are all drawn at random.

Spec (version 1)::

    {"version": 1, "family": "efficientnet", "resolution": 192,
     "stem": {"channels": 32, "kernel": 3, "act": "silu", "maxpool": false},
     "stages": [{"block": "mbconv", "depth": 2, "channels": 24, "stride": 2, "kernel": 5,
                 "expand": 6, "act": "silu", "se": true, "se_gate": "sigmoid",
                 "group_width": 0, "bottleneck": 1.0}, ...],
     "head": {"channels": 1280, "hidden": 0, "act": "silu", "classes": 1000}}

The network's input is ``input_shape(spec) = (1, 3, resolution, resolution)``.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass

import torch
import torch.nn as nn

from hant.errors import CostModelError

__all__ = ["NetSpace", "SPACES", "FAMILIES", "BLOCKS", "ACTIVATIONS", "sample_spec", "build", "input_shape",
           "validate_spec"]

SPEC_VERSION = 1
FAMILIES = ("resnet", "mobilenet_v2", "mobilenet_v3", "efficientnet", "regnet", "mixed", "shufflenet", "squeezenet")
BLOCKS = ("basic", "bottleneck", "inverted_residual", "mbconv", "regnet", "shuffle", "fire")
ACTIVATIONS = {"relu": nn.ReLU, "relu6": nn.ReLU6, "hardswish": nn.Hardswish, "silu": nn.SiLU}
GATES = {"sigmoid": nn.Sigmoid, "hardsigmoid": nn.Hardsigmoid}
KERNELS = (3, 5, 7)


@dataclass(frozen=True)
class NetSpace:
    """The ranges :func:`sample_spec` draws from.

    ``resolutions``: (lowest, highest, step) of the square input side; ``width``: range of the
    multiplier on each family's usual widths; ``depth``: most blocks per stage (at least 1);
    ``classes``: classifier outputs; ``head_scale``: multiplier on the head's widths.
    """
    name: str
    resolutions: tuple[int, int, int] = (96, 320, 16)
    width: tuple[float, float] = (0.35, 1.6)
    depth: int = 5
    classes: int = 1000
    head_scale: float = 1.0


SPACES = {
    "default": NetSpace("default"),
    # For smoke tests and demos: small inputs, narrow and shallow networks, still every block type.
    "tiny": NetSpace("tiny", resolutions=(32, 64, 16), width=(0.1, 0.25), depth=2, classes=10,
                     head_scale=0.125),
}


def _divisible(value: float, divisor: int = 8) -> int:
    """Round to the nearest multiple of ``divisor`` (not below 90% of the value, not below divisor)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def _strides(rng: random.Random, stages: int, budget: int) -> list[int]:
    """Stage strides: ``budget`` of them are 2 (the first stage may stay at 1), the rest 1."""
    budget = min(budget, stages)
    candidates = list(range(1, stages)) if budget < stages else list(range(stages))
    twos = set(rng.sample(candidates, budget))
    return [2 if i in twos else 1 for i in range(stages)]


def _stage(block: str, depth: int, channels: int, stride: int, kernel: int = 3, expand: float = 1, act: str = "relu",
           se: bool = False, se_gate: str = "sigmoid", group_width: int = 0, bottleneck: float = 1.0) -> dict:
    return dict(block=block, depth=depth, channels=channels, stride=stride, kernel=kernel, expand=expand, act=act,
                se=se, se_gate=se_gate, group_width=group_width, bottleneck=bottleneck)


def _sample_stage(rng: random.Random, family: str, index: int, channels: int, stride: int, depth: int) -> dict:
    if family == "shufflenet":
        return _stage("shuffle", depth, channels, stride, rng.choice((3, 3, 5)), 1, "relu")
    if family == "squeezenet":
        return _stage("fire", depth, channels, stride, 3, 1, "relu", bottleneck=rng.choice((0.125, 0.125, 0.25)))
    if family == "mixed":
        block = rng.choice(BLOCKS)
        act = rng.choice(tuple(ACTIVATIONS))
        return _stage(block, depth, channels, stride, rng.choice(KERNELS), rng.choice((1, 3, 4, 6)), act,
                      rng.random() < 0.4, rng.choice(tuple(GATES)), rng.choice((0, 8, 16)) if block != "regnet"
                      else rng.choice((8, 16, 24, 32)), rng.choice((0.25, 0.5, 1.0)))
    if family == "resnet":
        block = "basic" if rng.random() < 0.5 else "bottleneck"
        grouped = block == "bottleneck" and rng.random() < 0.3
        return _stage(block, depth, channels, stride, rng.choice((3, 3, 5)), 1, "relu", rng.random() < 0.15,
                      "sigmoid", rng.choice((4, 8, 16)) if grouped else 0, 0.5 if grouped else 0.25)
    if family == "mobilenet_v2":
        expand = 1 if index == 0 else rng.choice((3, 4, 6, 6))
        return _stage("inverted_residual", depth, channels, stride, rng.choice((3, 3, 3, 5, 7)), expand, "relu6")
    if family == "mobilenet_v3":
        expand = 1 if index == 0 else rng.choice((2.5, 3, 4, 6))
        act = "relu" if index < 2 else rng.choice(("hardswish", "hardswish", "relu"))
        return _stage("inverted_residual", depth, channels, stride, rng.choice((3, 5)), expand, act,
                      rng.random() < 0.6, "hardsigmoid")
    if family == "efficientnet":
        expand = 1 if index == 0 else rng.choice((4, 6, 6))
        return _stage("mbconv", depth, channels, stride, rng.choice((3, 5, 5, 7)), expand, "silu", True, "sigmoid")
    group_width = rng.choice((8, 16, 24, 32, 48, 64))
    return _stage("regnet", depth, max(channels, group_width), stride, 3, 1, "relu", rng.random() < 0.5, "sigmoid",
                  group_width, 1.0)


# Per family: stem channels, stage widths before the width multiplier, head channels, hidden head width.
_BASE = {
    "resnet": (64, (64, 128, 256, 512), 0, 0),
    "mobilenet_v2": (32, (16, 24, 32, 64, 96, 160, 320), 1280, 0),
    "mobilenet_v3": (16, (16, 24, 40, 80, 112, 160), 960, 1280),
    "efficientnet": (32, (16, 24, 40, 80, 112, 192, 320), 1280, 0),
    "regnet": (32, (48, 104, 208, 440), 0, 0),
    "mixed": (32, (24, 48, 96, 160, 256), 1024, 0),
    "shufflenet": (24, (116, 232, 464), 1024, 0),
    "squeezenet": (64, (128, 256, 384, 512), 0, 0),
}


def sample_spec(rng: random.Random | int, space: NetSpace | str = "default") -> dict:
    """A random network spec (JSON-able dict) from ``space`` (a :class:`NetSpace` or a name in :data:`SPACES`).

    ``rng`` is a ``random.Random`` (advanced by the call) or an int seed. The same seed gives
    the same spec.
    """
    space = _space(space)
    rng = rng if isinstance(rng, random.Random) else random.Random(rng)
    family = rng.choice(FAMILIES)
    stem_channels, widths, head, hidden = _BASE[family]
    lo, hi, step = space.resolutions
    resolution = rng.randrange(lo, hi + 1, step)
    width = rng.uniform(*space.width)
    n_stages = rng.randint(max(2, len(widths) - 2), len(widths))
    widths = sorted(rng.sample(widths, n_stages)) if n_stages < len(widths) else list(widths)
    maxpool = family in ("resnet", "shufflenet", "squeezenet") or (family == "mixed" and rng.random() < 0.3)
    # the stem halves the input (twice with a max pool); stages may halve it until 1/32 in total
    strides = _strides(rng, n_stages, 3 if maxpool else 4)
    stages = []
    for i, (base, stride) in enumerate(zip(widths, strides)):
        channels = _divisible(base * width * rng.uniform(0.8, 1.25), 4 if family == "shufflenet" else 8)
        stages.append(_sample_stage(rng, family, i, channels, stride, rng.randint(1, space.depth)))
    act = stages[-1]["act"]
    spec = {
        "version": SPEC_VERSION, "family": family, "resolution": resolution,
        "stem": {"channels": _divisible(stem_channels * max(width, 0.5)), "kernel": 7 if family == "resnet" and
                 rng.random() < 0.7 else 3, "act": "hardswish" if family == "mobilenet_v3" else stages[0]["act"],
                 "maxpool": maxpool},
        "stages": stages,
        "head": {"channels": _divisible(head * max(width, 1.0) * space.head_scale) if head else 0,
                 "hidden": _divisible(hidden * rng.uniform(0.75, 1.0) * space.head_scale) if hidden else 0,
                 "act": act, "classes": space.classes},
    }
    validate_spec(spec)
    return spec


def _space(space: NetSpace | str) -> NetSpace:
    if isinstance(space, NetSpace):
        return space
    if space not in SPACES:
        raise CostModelError(f"unknown network space {space!r}; use one of {', '.join(SPACES)}")
    return SPACES[space]


def input_shape(spec: dict) -> tuple[int, int, int, int]:
    """The input a network of ``spec`` takes: ``(1, 3, resolution, resolution)``."""
    return 1, 3, int(spec["resolution"]), int(spec["resolution"])


# ---------------------------------------------------------------- validation

_STAGE_TYPES = dict(block=str, depth=int, channels=int, stride=int, kernel=int, expand=(int, float), act=str, se=bool,
                    se_gate=str, group_width=int, bottleneck=(int, float))


def validate_spec(spec: dict) -> None:
    """Raise :class:`CostModelError`, saying which field is wrong, unless ``spec`` is a valid version-1 spec."""
    def need(condition: bool, what: str) -> None:
        if not condition:
            raise CostModelError(f"bad network spec: {what}; make specs with hant.cost_models.netspace.sample_spec")

    need(isinstance(spec, dict), f"expected a dict, got {type(spec).__name__}")
    need(spec.get("version") == SPEC_VERSION, f"version must be {SPEC_VERSION}, got {spec.get('version')!r}")
    need(spec.get("family") in FAMILIES, f"family must be one of {FAMILIES}, got {spec.get('family')!r}")
    need(isinstance(spec.get("resolution"), int) and 8 <= spec["resolution"] <= 2048,
         f"resolution must be an int in 8..2048, got {spec.get('resolution')!r}")
    stem = spec.get("stem")
    need(isinstance(stem, dict) and isinstance(stem.get("channels"), int) and stem["channels"] > 0
         and stem.get("kernel") in KERNELS and stem.get("act") in ACTIVATIONS and isinstance(stem.get("maxpool"), bool),
         f"stem must have positive int channels, kernel in {KERNELS}, act in {tuple(ACTIVATIONS)}, bool maxpool")
    stages = spec.get("stages")
    need(isinstance(stages, list) and len(stages) > 0, "stages must be a non-empty list")
    for i, stage in enumerate(stages):
        need(isinstance(stage, dict) and set(stage) == set(_STAGE_TYPES),
             f"stage {i} must have exactly the fields {sorted(_STAGE_TYPES)}")
        for name, kind in _STAGE_TYPES.items():
            need(isinstance(stage[name], kind), f"stage {i} field {name!r} has type {type(stage[name]).__name__}")
        need(stage["block"] in BLOCKS, f"stage {i} block must be one of {BLOCKS}, got {stage['block']!r}")
        need(stage["depth"] >= 1 and stage["channels"] >= 1 and stage["stride"] in (1, 2) and
             stage["kernel"] in KERNELS and stage["expand"] >= 1 and stage["group_width"] >= 0 and
             0 < stage["bottleneck"] <= 4, f"stage {i} has a depth, channel, stride, kernel, expansion, "
                                            "group width or bottleneck out of range")
        need(stage["block"] != "shuffle" or stage["channels"] % 2 == 0,
             f"stage {i} is a shuffle stage with an odd channel count {stage['channels']} (it splits them in two)")
        need(stage["act"] in ACTIVATIONS and stage["se_gate"] in GATES,
             f"stage {i} act must be one of {tuple(ACTIVATIONS)} and se_gate one of {tuple(GATES)}")
    head = spec.get("head")
    need(isinstance(head, dict) and all(isinstance(head.get(k), int) and head[k] >= 0
                                        for k in ("channels", "hidden", "classes")) and head["classes"] > 0
         and head.get("act") in ACTIVATIONS, "head must have int channels >= 0, hidden >= 0, classes > 0 and an act")
    total = 2 * (2 if stem["maxpool"] else 1) * 2 ** sum(s["stride"] == 2 for s in stages)
    need(total <= spec["resolution"], f"total stride {total} exceeds the resolution {spec['resolution']}")


# ---------------------------------------------------------------- building

def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: str | None = None) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(ACTIVATIONS[act]())
    return nn.Sequential(*layers)


class SqueezeExcite(nn.Module):
    """``x * gate(fc2(act(fc1(avgpool(x)))))`` with 1x1 convolutions, as in torchvision."""

    def __init__(self, channels: int, squeeze: int, act: str, gate: str):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.act = ACTIVATIONS[act]()
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.gate = GATES[gate]()

    def forward(self, x):
        return x * self.gate(self.fc2(self.act(self.fc1(self.pool(x)))))


class Block(nn.Module):
    """``out_act(body(x) + shortcut(x))``; the sum only when ``residual``, ``shortcut`` None is identity."""

    def __init__(self, body: nn.Module, residual: bool, shortcut: nn.Module | None = None,
                 out_act: nn.Module | None = None):
        super().__init__()
        self.body, self.residual, self.shortcut, self.out_act = body, residual, shortcut, out_act

    def forward(self, x):
        y = self.body(x)
        if self.residual:
            y = y + (self.shortcut(x) if self.shortcut is not None else x)
        if self.out_act is not None:
            y = self.out_act(y)
        return y


class ShuffleUnit(nn.Module):
    """ShuffleNetV2's unit: when it keeps shape it splits the channels and convolves one half;
    otherwise (stride 2 or new width) it convolves the whole input in two branches. The halves
    are concatenated and their channels interleaved (a transpose)."""

    def __init__(self, cin: int, cout: int, stride: int, kernel: int, act: str):
        super().__init__()
        self.half = half = cout // 2
        self.split = stride == 1 and cin == cout
        if not self.split:
            self.branch1 = nn.Sequential(_conv_bn(cin, cin, kernel, stride, groups=cin), _conv_bn(cin, half, 1, act=act))
        inner = half if self.split else cin
        self.branch2 = nn.Sequential(_conv_bn(inner, half, 1, act=act), _conv_bn(half, half, kernel, stride, groups=half),
                                     _conv_bn(half, half, 1, act=act))

    def forward(self, x):
        if self.split:
            a, b = x.chunk(2, 1)
            y = torch.cat((a, self.branch2(b)), 1)
        else:
            y = torch.cat((self.branch1(x), self.branch2(x)), 1)
        return y.unflatten(1, (2, self.half)).transpose(1, 2).flatten(1, 2)


class Fire(nn.Module):
    """SqueezeNet's fire module: a 1x1 squeeze, then 1x1 and 3x3 expands side by side, concatenated."""

    def __init__(self, cin: int, cout: int, squeeze: int, act: str):
        super().__init__()
        self.squeeze = nn.Sequential(nn.Conv2d(cin, squeeze, 1), ACTIVATIONS[act]())
        self.expand1 = nn.Sequential(nn.Conv2d(squeeze, cout // 2, 1), ACTIVATIONS[act]())
        self.expand3 = nn.Sequential(nn.Conv2d(squeeze, cout - cout // 2, 3, padding=1), ACTIVATIONS[act]())

    def forward(self, x):
        s = self.squeeze(x)
        return torch.cat((self.expand1(s), self.expand3(s)), 1)


def _groups(channels: int, group_width: int) -> int:
    return max(1, channels // group_width) if group_width else 1


def _block(stage: dict, cin: int, stride: int) -> nn.Module:
    kind, cout, k, act = stage["block"], stage["channels"], stage["kernel"], stage["act"]
    if kind == "shuffle":
        return ShuffleUnit(cin, cout, stride, k, act)
    if kind == "fire":
        fire = Fire(cin, cout, max(8, _divisible(cout * stage["bottleneck"])), act)
        return nn.Sequential(nn.MaxPool2d(3, 2, 1), fire) if stride == 2 else fire
    se = SqueezeExcite
    if kind in ("basic", "bottleneck", "regnet"):
        shortcut = _conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else None
        if kind == "basic":
            layers = [_conv_bn(cin, cout, k, stride, act=act), _conv_bn(cout, cout, k)]
            if stage["se"]:
                layers.append(se(cout, max(8, cout // 16), "relu", stage["se_gate"]))
        else:
            gw = stage["group_width"]
            mid = _divisible(cout * stage["bottleneck"], gw if gw else 8)
            layers = [_conv_bn(cin, mid, 1, act=act), _conv_bn(mid, mid, k, stride, _groups(mid, gw), act=act)]
            if stage["se"]:
                layers.append(se(mid, max(8, cin // 4 if kind == "regnet" else mid // 16), "relu", stage["se_gate"]))
            layers.append(_conv_bn(mid, cout, 1))
        return Block(nn.Sequential(*layers), True, shortcut, ACTIVATIONS[act]())
    # inverted residual / MBConv: expand 1x1, depthwise kxk, optional SE, project 1x1 (linear)
    mid = _divisible(cin * stage["expand"])
    layers = [_conv_bn(cin, mid, 1, act=act)] if mid != cin else []
    layers.append(_conv_bn(mid, mid, k, stride, groups=mid, act=act))
    if stage["se"]:
        squeeze = max(8, cin // 4) if kind == "mbconv" else _divisible(mid / 4)
        layers.append(se(mid, squeeze, "silu" if kind == "mbconv" else "relu", stage["se_gate"]))
    layers.append(_conv_bn(mid, cout, 1))
    return Block(nn.Sequential(*layers), stride == 1 and cin == cout)


class Network(nn.Module):
    """stem -> stages -> head (1x1 conv, global average pool, optional hidden linear, classifier)."""

    def __init__(self, spec: dict):
        super().__init__()
        stem = spec["stem"]
        layers: list[nn.Module] = [_conv_bn(3, stem["channels"], stem["kernel"], 2, act=stem["act"])]
        if stem["maxpool"]:
            layers.append(nn.MaxPool2d(3, 2, 1))
        self.stem = nn.Sequential(*layers)
        cin, stages = stem["channels"], []
        for stage in spec["stages"]:
            blocks = []
            for i in range(stage["depth"]):
                blocks.append(_block(stage, cin, stage["stride"] if i == 0 else 1))
                cin = stage["channels"]
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        head = spec["head"]
        layers = []
        if head["channels"]:
            layers.append(_conv_bn(cin, head["channels"], 1, act=head["act"]))
            cin = head["channels"]
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(1)]
        if head["hidden"]:
            layers += [nn.Linear(cin, head["hidden"]), ACTIVATIONS[head["act"]]()]
            cin = head["hidden"]
        layers.append(nn.Linear(cin, head["classes"]))
        self.head = nn.Sequential(*layers)

    def forward(self, x):
        return self.head(self.stages(self.stem(x)))


def build(spec: dict) -> nn.Module:
    """The eval-mode network a spec describes; the same spec always gives the same weights.

    Raises :class:`CostModelError` for a spec :func:`validate_spec` rejects. The global RNG is untouched.
    """
    validate_spec(spec)
    seed = int(hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:15], 16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Network(spec).eval()
