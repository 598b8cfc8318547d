"""hant.passes: Pass, PassManager, registry; one transformation per module."""

from hant.passes.base import PRESETS, Decision, Pass, PassContext, PassResult, available, get, register, resolve
from hant.passes import cleanup, fuse_bn  # noqa: F401  (register the passes)
from hant.passes import fold_linear, fuse_parallel  # noqa: F401  (register the passes)
from hant.passes.manager import ManagerResult, PassManager, PassReport, PassRow
from hant.passes.optimize import OptimizeResult, optimize

__all__ = [name for name in dir() if not name.startswith("_")]
