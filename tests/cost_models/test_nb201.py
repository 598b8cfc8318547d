"""NAS-Bench-201 networks: build, trace, parameter counts by hand, fast featurisation."""

import numpy as np
import pytest
import torch

import hant
from hant.cost_models.learned.features import featurize
from hant.cost_models.learned.nb201 import OPS, all_arch_strings, arch_string, family, nb201, parse_arch

ALL_NONE = arch_string(["none"] * 6)


def _cell_params(ops, c):
    """Parameters of one cell of width c: ReLU-conv(no bias)-BN edges own k*k*c*c + 2c."""
    per_op = {"none": 0, "skip_connect": 0, "avg_pool_3x3": 0,
              "nor_conv_1x1": c * c * 1 + 2 * c, "nor_conv_3x3": c * c * 9 + 2 * c}
    return sum(per_op[op] for op in ops)


def _hand_count(arch, C=16, N=5, classes=10):
    """NAS-Bench-201's parameter count from the paper's layer shapes."""
    ops = parse_arch(arch)
    stem = 3 * C * 9 + 2 * C                            # conv3x3 3->C, BN(C)

    def reduction(cin, cout):                           # two ReLU-conv3x3-BN + avgpool/1x1 shortcut
        return cin * cout * 9 + 2 * cout + cout * cout * 9 + 2 * cout + cin * cout

    cells = N * sum(_cell_params(ops, c) for c in (C, 2 * C, 4 * C))
    head = 2 * 4 * C + 4 * C * classes + classes        # BN(4C) + linear
    return stem + reduction(C, 2 * C) + reduction(2 * C, 4 * C) + cells + head


def _params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("op", OPS)
def test_every_op_builds_and_traces(op):
    arch = arch_string([op] * 6)
    model = nb201(arch)
    x = torch.randn(2, 3, 32, 32)
    gm = hant.trace(model, x)
    torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)
    assert all("tensor_meta" in n.meta for n in gm.graph.nodes if n.op not in ("output",))
    assert gm(x).shape == (2, 10)


def test_all_none_cell_is_degenerate_but_runs():
    model = nb201(ALL_NONE)
    gm = hant.trace(model, torch.randn(1, 3, 32, 32))
    graph = featurize(gm)
    dead = graph.x[:, list(hant.cost_models.learned.FEATURE_NAMES).index("dead")]
    # the stem feeds only zeroed cells: it cannot reach the output
    assert dead[list(graph.names).index("stem_0")] == 1
    assert _params(model) == _hand_count(ALL_NONE)


@pytest.mark.parametrize("arch, published", [
    (arch_string(["nor_conv_3x3"] * 6), 1_531_546),    # the largest NAS-Bench-201 network (1.53 M)
    (ALL_NONE, 73_306),                                # the parameter-free cell (0.073 M)
    ("|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|nor_conv_3x3~1|nor_conv_3x3~2|", None),
    ("|nor_conv_1x1~0|+|avg_pool_3x3~0|skip_connect~1|+|none~0|nor_conv_1x1~1|nor_conv_3x3~2|", None),
])
def test_parameter_count_matches_hand_count(arch, published):
    expected = _hand_count(arch)
    if published is not None:
        assert expected == published
    assert _params(nb201(arch)) == expected


def test_width_depth_and_classes_change_the_count():
    arch = arch_string(["nor_conv_1x1"] * 6)
    assert _params(nb201(arch, C=8, N=2, num_classes=100)) == _hand_count(arch, 8, 2, 100)


@pytest.mark.parametrize("bad", ["", "|conv~0|+|none~0|none~1|+|none~0|none~1|none~2|", "|none~0|+|none~0|",
                                 "|none~1|+|none~0|none~1|+|none~0|none~1|none~2|", None])
def test_bad_cell_strings_raise(bad):
    with pytest.raises(hant.CostModelError):
        nb201(bad)


def test_there_are_15625_distinct_cells():
    archs = all_arch_strings()
    assert len(set(archs)) == 5 ** 6 == 15625
    assert all(arch_string(parse_arch(a)) == a for a in archs[::997])


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_assembled_features_equal_traced_features(seed):
    """NB201Family assembles a network's features from pieces; they must equal a real trace's."""
    rng = np.random.default_rng(seed)
    archs = all_arch_strings()
    for arch in [archs[i] for i in rng.choice(len(archs), 3, replace=False)] + [ALL_NONE]:
        traced = featurize(hant.trace(nb201(arch), torch.randn(1, 3, 32, 32)))
        assembled = family().featurize(arch)
        assert traced.x.shape == assembled.x.shape
        np.testing.assert_array_equal(np.array(sorted(map(tuple, traced.x))),
                                      np.array(sorted(map(tuple, assembled.x))))
        # same wiring: the multiset of (producer row, consumer row) pairs, as feature pairs
        def pairs(g):
            return sorted(tuple(g.x[s]) + tuple(g.x[d]) for s, d in g.edges.T)
        assert pairs(traced) == pairs(assembled)
