"""The errors a user can cause. Every one says what to do about it.

They live beside the public face rather than in a layer so that every layer
(graphs, cost_models, passes, tools) may raise them without breaking the
one-way import rule.
"""


class HantError(Exception):
    """Base class of every error hant raises on purpose."""


class TraceError(HantError):
    """The model could be neither symbolically traced nor exported."""


class InputError(HantError):
    """The example inputs do not run through the model, or have a bad shape."""


class PassError(HantError):
    """An unknown pass, a bad pass configuration, or a pass that cannot run."""


class CostModelError(HantError):
    """An unknown cost-model spec, a missing predictor file, or bad measurement data."""


class ExportError(HantError):
    """The exported model does not reproduce the module it came from."""
