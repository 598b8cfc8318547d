"""SESE regions: natural blocks of real networks, and every region checked against the definition
by plain reachability (no dominator code), on torchvision graphs and on generated graphs."""

from __future__ import annotations

import random

import pytest
import torch
import torch.fx
import torch.nn as nn
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st

from hant.graphs import Region, module_path, natural_regions, region_between, sese_regions, trace
from helpers import max_rel_error, randomize_bn

BLOCKS = {
    "resnet18": [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)],
    "mobilenet_v2": [f"features.{i}" for i in range(1, 18)],
}


# ---------------------------------------------------------------- an independent SESE checker

def _reachable(starts, step, blocked=None) -> set:
    seen, stack = set(), [s for s in starts if s is not blocked]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        stack.extend(n for n in step(node) if n is not blocked)
    return seen


def _assert_sese(gm: torch.fx.GraphModule, region: Region) -> None:
    """The region's definition, checked with reachability only."""
    nodes = list(gm.graph.nodes)
    by_name = {n.name: n for n in nodes}
    output = gm.graph.output_node()
    placeholders = [n for n in nodes if n.op == "placeholder"]
    varying = _reachable(placeholders, lambda n: n.users)
    live = varying & _reachable([output], lambda n: n.all_input_nodes)
    entry, exit = by_name[region.entry], by_name[region.exit]
    inside = {by_name[name] for name in region.nodes}
    assert list(region.nodes) == [n.name for n in nodes if n in inside], "nodes are not in graph order"
    assert exit in inside and entry not in inside and output not in inside
    for node in inside:
        outside_inputs = [a for a in node.all_input_nodes if a in varying and a not in inside and a is not entry]
        assert not outside_inputs, f"{region}: {node} reads {outside_inputs} from outside"
        if node is not exit:
            assert set(node.users) <= inside, f"{region}: {node} leaks to {set(node.users) - inside}"
    assert {u for u in entry.users if u in live} <= inside, "entry is used outside the region"
    assert exit not in _reachable(placeholders, lambda n: n.users, blocked=entry), "entry does not dominate exit"
    assert output not in _reachable([entry], lambda n: n.users, blocked=exit), "exit does not post-dominate entry"
    entry_shape = getattr(entry.meta.get("tensor_meta"), "shape", None)  # None for tuples and non-tensors
    assert region.input_shape == (tuple(entry_shape) if entry_shape is not None else None)


# ---------------------------------------------------------------- natural blocks of real networks

def _blocks_io(model: nn.Module, paths: list[str], x: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each block's input and output in one eager run (inputs cloned before in-place ops touch them)."""
    captured = {}

    def keep(path):
        return lambda m, args: captured.update({path: args[0].clone()})

    def finish(path):
        return lambda m, args, out: captured.update({path: (captured[path], out)})

    handles = [model.get_submodule(p).register_forward_pre_hook(keep(p)) for p in paths]
    handles += [model.get_submodule(p).register_forward_hook(finish(p)) for p in paths]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return captured


@pytest.mark.parametrize("form", ["symbolic", "export"])
@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_blocks_are_natural_regions(capture, name, form):
    model, x, gm = capture(name, form)
    regions = {r.module: r for r in natural_regions(gm)}
    io = _blocks_io(model, BLOCKS[name], x)
    for path in BLOCKS[name]:
        assert path in regions, f"{name} {form}: block {path} is not a natural region"
        region = regions[path]
        _assert_sese(gm, region)
        ops = [n.name for n in gm.graph.nodes if (module_path(n) or "").startswith(path + ".")
               or module_path(n) == path]
        assert list(region.nodes) == ops
        block_input, block_output = io[path]
        assert region.input_shape == tuple(block_input.shape) and region.output_shape == tuple(block_output.shape)
        with torch.no_grad():
            assert max_rel_error(block_output, region.extract(gm)(block_input)) <= 1e-6
    found = [r for r in natural_regions(gm) if r.module in BLOCKS[name]]
    assert [r.module for r in found] == BLOCKS[name], "blocks are not in graph order"


def test_stems_and_nesting_are_natural_regions(capture):
    _, _, gm = capture("mobilenet_v2", "symbolic")
    modules = [r.module for r in natural_regions(gm)]
    assert "features.0" in modules and "features.18" in modules  # conv-BN-ReLU6 stems
    assert "features" in modules and "classifier" in modules
    assert "features.0.0" not in modules  # a lone conv is a leaf: only with leaves=True
    assert "features.0.0" in [r.module for r in natural_regions(gm, leaves=True)]
    _, _, gm = capture("resnet18", "symbolic")
    modules = [r.module for r in natural_regions(gm)]
    assert modules.index("layer1") < modules.index("layer1.1")  # outer first where exits coincide


def test_residual_stem_is_not_a_region(capture):
    # features.3.conv.0 reads the block input, which the skip connection also reads: its
    # exit does not post-dominate that entry, so it is not single-entry single-exit.
    _, _, gm = capture("mobilenet_v2", "symbolic")
    assert "features.3.conv.0" not in [r.module for r in natural_regions(gm)]
    add = next(n for n in gm.graph.nodes if module_path(n) == "features.3" and n.op == "call_function")
    block_input = next(a for a in add.args if not (module_path(a) or "").startswith("features.3"))
    stem_exit = next(n for n in gm.graph.nodes if module_path(n) == "features.3.conv.0.2")
    assert region_between(gm, block_input.name, stem_exit.name) is None
    assert region_between(gm, block_input.name, add.name) is not None


def test_extract_is_exact_in_float64():
    model = randomize_bn(torchvision.models.resnet18(), seed=5).double()
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    gm = trace(model, x)
    region = next(r for r in natural_regions(gm) if r.module == "layer2.0")
    block_input, block_output = _blocks_io(model, ["layer2.0"], x)["layer2.0"]
    with torch.no_grad():
        assert max_rel_error(block_output, region.extract(gm)(block_input)) <= 1e-14


@pytest.mark.parametrize("form", ["symbolic", "export", "core_aten"])
@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_every_region_is_single_entry_single_exit(capture, name, form):
    _, _, gm = capture(name, form)
    canonical = sese_regions(gm)
    assert len({r.entry for r in canonical}) == len(canonical), "more than one canonical region per entry"
    runs = sese_regions(gm, runs=True) if name == "resnet18" else canonical
    assert {(r.entry, r.exit) for r in canonical} <= {(r.entry, r.exit) for r in runs}
    for region in runs + natural_regions(gm, leaves=True):
        _assert_sese(gm, region)
    tagged = {r.module for r in runs if r.module}
    if name == "resnet18":
        assert set(BLOCKS[name]) <= tagged


# ---------------------------------------------------------------- generated graphs, brute force

def _random_graph(seed: int, size: int, inputs: int, dead: int) -> torch.fx.GraphModule:
    rng = random.Random(seed)
    graph = torch.fx.Graph()
    values = [graph.placeholder(f"x{i}") for i in range(inputs)]
    for _ in range(size):
        if rng.random() < 0.4 and len(values) > 1:
            a, b = rng.sample(values[-4:], 2)
            values.append(graph.call_function(torch.add, (a, b)))
        else:
            unary = rng.choice([torch.relu, torch.neg, torch.sin])
            values.append(graph.call_function(unary, (rng.choice(values[-3:]),)))
    results = [v for v in values if not v.users and v.op != "placeholder"] or values[-1:]
    for _ in range(dead):  # side nodes: read a value, used by nobody
        graph.call_function(torch._assert, (graph.call_function(torch.isfinite, (rng.choice(values),)), "finite"))
    graph.output(tuple(results))  # every value reaches the output: the side nodes are only the asserts
    return torch.fx.GraphModule(nn.Module(), graph)


def _brute_force_regions(gm: torch.fx.GraphModule) -> dict[tuple[str, str], set[str]]:
    """Every (entry, exit) with entry dominating exit and exit post-dominating entry, by reachability."""
    nodes = list(gm.graph.nodes)
    output = gm.graph.output_node()
    placeholders = [n for n in nodes if n.op == "placeholder"]
    live = _reachable(placeholders, lambda n: n.users) & _reachable([output], lambda n: n.all_input_nodes)
    dominated = {e: live - _reachable(placeholders, lambda n: n.users, blocked=e) for e in live}
    post_dominated = {x: live - _reachable([output], lambda n: n.all_input_nodes, blocked=x) for x in live}
    regions = {}
    for e in live:
        for x in live:
            if x is e or x is output or x not in dominated[e] or e not in post_dominated[x]:
                continue
            regions[e.name, x.name] = {n.name for n in dominated[e] & post_dominated[x] if n is not e}
    return regions


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10**6), size=st.integers(1, 14), inputs=st.integers(1, 2))
def test_regions_match_brute_force_on_generated_graphs(seed, size, inputs):
    gm = _random_graph(seed, size, inputs, dead=0)
    expected = _brute_force_regions(gm)
    found = {(r.entry, r.exit): set(r.nodes) for r in sese_regions(gm, runs=True)}
    assert found == expected
    for region in sese_regions(gm):
        _assert_sese(gm, region)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10**6), size=st.integers(2, 12), dead=st.integers(1, 3))
def test_regions_with_side_nodes_stay_single_entry_single_exit(seed, size, dead):
    gm = _random_graph(seed, size, 1, dead)
    for region in sese_regions(gm, runs=True):
        _assert_sese(gm, region)
        side = [n for n in region.interior(gm) if not n.users and n.op != "output"]
        assert all(n.target is torch._assert for n in side)
