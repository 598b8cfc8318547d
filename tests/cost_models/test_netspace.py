"""The network space: deterministic, rich, valid specs; every spec builds and traces."""

import copy
import json
import random

import pytest
import torch

import hant
from hant.cost_models.netspace import (
    ACTIVATIONS, BLOCKS, FAMILIES, KERNELS, SPACES, build, input_shape, sample_spec, validate_spec,
)
from hant.errors import CostModelError
from hant.graphs.ops import op_kind




def test_specs_are_deterministic_and_json():
    for seed in range(5):
        spec = sample_spec(random.Random(seed))
        assert spec == sample_spec(seed) and json.loads(json.dumps(spec)) == spec
    assert len({json.dumps(sample_spec(seed), sort_keys=True) for seed in range(30)}) == 30


def test_the_default_space_covers_every_choice():
    specs = [sample_spec(seed) for seed in range(300)]
    stages = [stage for spec in specs for stage in spec["stages"]]
    assert {s["family"] for s in specs} == set(FAMILIES)
    assert {s["block"] for s in stages} == set(BLOCKS)
    assert {s["act"] for s in stages} == set(ACTIVATIONS)
    assert {s["kernel"] for s in stages} == set(KERNELS)
    assert {s["se"] for s in stages} == {True, False} and {s["stride"] for s in stages} == {1, 2}
    assert len({s["expand"] for s in stages}) >= 4 and any(s["group_width"] for s in stages)
    resolutions = [s["resolution"] for s in specs]
    assert min(resolutions) == 96 and max(resolutions) == 320
    assert max(s["depth"] for s in stages) == SPACES["default"].depth


def _trace(spec):
    model = build(spec)
    gm = hant.trace(model, torch.randn(input_shape(spec)))
    assert gm.meta["hant_trace_method"] == "symbolic"
    return model, gm


@pytest.mark.parametrize("seed", range(10))
def test_tiny_networks_build_and_trace(seed):
    spec = sample_spec(seed, "tiny")
    model, gm = _trace(spec)
    out = gm(torch.randn(input_shape(spec)))
    assert out.shape == (1, spec["head"]["classes"])
    kinds = {op_kind(n) for n in gm.graph.nodes}
    assert {"conv", "batchnorm", "activation", "pool", "linear"} <= kinds and "other" not in kinds


@pytest.mark.parametrize("seed", [0, 1])
def test_default_networks_build_and_trace(seed):
    spec = sample_spec(seed)
    _, gm = _trace(spec)
    assert gm.graph.find_nodes(op="output")[0].meta["tensor_meta"].shape == (1, 1000)


def test_build_is_deterministic_and_leaves_the_global_rng_alone():
    spec = sample_spec(4, "tiny")
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    a, b = build(spec), build(copy.deepcopy(spec))
    assert torch.rand(1) == expected
    assert not a.training
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


def _broken(change):
    spec = sample_spec(0)
    change(spec)
    return spec


@pytest.mark.parametrize("spec", [
    "not a dict",
    _broken(lambda s: s.pop("stages")),
    _broken(lambda s: s.update(version=99)),
    _broken(lambda s: s.update(family="transformer")),
    _broken(lambda s: s["stages"][0].update(block="attention")),
    _broken(lambda s: s["stages"][0].update(kernel=4)),
    _broken(lambda s: s["stages"][0].update(depth=0)),
    _broken(lambda s: s["stages"][0].update(act="gelu")),
    _broken(lambda s: s["stages"][0].pop("se")),
    _broken(lambda s: s["head"].update(classes=0)),
    _broken(lambda s: s.update(resolution=8) or [st.update(stride=2) for st in s["stages"]]),
    _broken(lambda s: s["stages"][0].update(block="shuffle", channels=58 + 1)),
])
def test_bad_specs_raise_cost_model_error(spec):
    with pytest.raises(CostModelError, match="bad network spec"):
        validate_spec(spec)
    with pytest.raises(CostModelError):
        build(spec)


def test_unknown_space_raises_cost_model_error():
    with pytest.raises(CostModelError, match="network space"):
        sample_spec(0, "huge")
