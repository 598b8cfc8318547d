"""hant: hardware-aware network transformation on torch.fx.

This module is the public face. It re-exports; the work lives in hant.graphs,
hant.cost_models, hant.passes and hant.tools.
"""

from hant.errors import CostModelError, ExportError, HantError, InputError, PassError, TraceError
from hant.graphs import trace
from hant.tools.report import inspect

__version__ = "0.1.0"

__all__ = ["HantError", "TraceError", "InputError", "PassError", "CostModelError", "ExportError", "trace"]
__all__ += ["inspect"]
from hant.graphs.export import export_onnx
from hant.passes import OptimizeResult, PassManager, optimize

__all__ += ["optimize", "OptimizeResult", "PassManager", "export_onnx"]
from hant.tools.diff import diff

__all__ += ["diff"]
from hant.passes import LinearizeResult, finetune, linearize

__all__ += ["linearize", "LinearizeResult", "finetune"]
