"""hant.passes: Pass, PassManager, registry; one transformation per module."""

from hant.passes.base import PRESETS, Decision, Pass, PassContext, PassResult, available, get, register, resolve

__all__ = [name for name in dir() if not name.startswith("_")]
