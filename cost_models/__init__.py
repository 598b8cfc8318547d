"""hant.cost_models: the CostModel protocol, the spec registry and the built-in models."""

from hant.cost_models.base import (
    COMPUTE_SKIP_KINDS, Cost, CostModel, CostReport, CostRow, NodeSumCostModel, available, get, register,
)

__all__ = [name for name in dir() if not name.startswith("_")]
