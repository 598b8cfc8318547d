"""hant: hardware-aware network transformation on torch.fx.

This module is the public face. It re-exports; the work lives in hant.graphs,
hant.cost_models, hant.passes and hant.tools.
"""

from hant.errors import CostModelError, ExportError, HantError, InputError, PassError, TraceError
from hant.graphs import trace

__version__ = "0.1.0"

__all__ = ["HantError", "TraceError", "InputError", "PassError", "CostModelError", "ExportError", "trace"]
