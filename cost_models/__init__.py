"""hant.cost_models: the CostModel protocol, the spec registry and the built-in models."""

from hant.cost_models.base import (
    COMPUTE_SKIP_KINDS, Cost, CostModel, CostReport, CostRow, NodeSumCostModel, available, get, register,
)
from hant.cost_models.flops import FlopsModel
from hant.cost_models.roofline import CalibrationSummary, Device, KindConstants, RooflineModel, roofline_kind
from hant.errors import CostModelError


def _flops(argument: str | None) -> FlopsModel:
    if argument is not None:
        raise CostModelError(f"'flops' takes no argument, got 'flops:{argument}'; use 'flops'")
    return FlopsModel()


register("flops", _flops, "MACs, params and bytes per node, no latency")
register("roofline", lambda device: RooflineModel(device or "cpu"),
         "roofline:DEVICE analytical latency; devices: " + ", ".join(RooflineModel.presets()))
from hant.cost_models.store import LatencyStore, NetworkRecord, OpRecord, RuntimeKey  # noqa: E402
from hant.cost_models.measured import MeasuredModel  # noqa: E402
from hant.cost_models.lut import LutModel  # noqa: E402

__all__ = [name for name in dir() if not name.startswith("_")]

import hant.cost_models.learned  # noqa: E402,F401  registers "learned"
