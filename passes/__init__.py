"""hant.passes: Pass, PassManager, registry; one transformation per module."""

from hant.passes.base import PRESETS, Decision, Pass, PassContext, PassResult, available, get, register, resolve
from hant.passes import cleanup, fuse_bn  # noqa: F401  (register the passes)
from hant.passes import fold_linear, fuse_parallel  # noqa: F401  (register the passes)
from hant.passes.manager import ManagerResult, PassManager, PassReport, PassRow
from hant.passes.optimize import OptimizeResult, optimize
from hant.passes import relocate_padding, remove_nonlinearity  # noqa: F401  (register the lossy passes)
from hant.passes.distill import finetune
from hant.passes.remove_nonlinearity import LinearizeResult, linearize

__all__ = [name for name in dir() if not name.startswith("_")]
