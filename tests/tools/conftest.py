"""Fixtures for the tools tests: a small cost model whose numbers follow from shapes alone.

It lets the report and CLI tests check formatting and selection independently of the
real cost models' constants.
"""

import pytest

from hant.cost_models import Cost, NodeSumCostModel
from hant.cost_models import base as cost_base
from hant.graphs import module_of, op_kind, output_shape

class ShapeCost(NodeSumCostModel):
    """MACs = output elements (x2 for convs, so rows differ), 4 bytes per element read and written,
    1 ns per MAC, params of the called module; views and identities cost nothing."""
    name = "shapecost"
    free_kinds = ("shape", "identity")

    def node_cost(self, node):
        shape = output_shape(node)
        if shape is None or op_kind(node) in self.free_kinds:
            return Cost()
        elements = shape.numel()
        macs = elements * (2 if op_kind(node) == "conv" else 1)
        return Cost(latency_s=macs * 1e-9, macs=macs, bytes_read=4 * elements, bytes_written=4 * elements,
                    params=sum(p.numel() for p in module.parameters()) if (module := module_of(node)) else 0)


@pytest.fixture
def shapecost(monkeypatch):
    """Register :class:`ShapeCost` as spec ``shapecost`` for one test, and return an instance."""
    monkeypatch.setitem(cost_base._FACTORIES, "shapecost", (lambda argument: ShapeCost(), "test model"))
    return ShapeCost()
