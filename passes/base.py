"""Pass, PassContext and the pass registry.

A hant pass is a torch.fx ``PassBase``: ``pass_(gm)`` returns torch.fx's ``PassResult``,
so torch's own PassManager, ExecuTorch's ``transform`` and other fx pass runners take it
unchanged. A pass may rewrite ``gm`` in place; hant's PassManager hands it a copy, so a
pass that breaks numerics can be rolled back.

Everything else a pass needs (cost model, check inputs, tolerances, where to write its
decisions) reaches it through ``pass_.context``, a :class:`PassContext` that the
PassManager sets before running. A pass run alone gets the defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

from torch.fx.passes.infra.pass_base import PassBase, PassResult

from hant.errors import PassError

__all__ = ["Pass", "PassContext", "Decision", "PassResult", "register", "get", "available", "PRESETS", "resolve"]


@dataclass(frozen=True)
class Decision:
    """One rewrite a pass considered: taken ("applied") or left ("refused"/"not_cheaper"), and why."""
    pass_name: str
    site: str            # node name(s) the rewrite concerns, e.g. "layer1_0_conv1 + layer1_0_bn1"
    action: str          # "applied" | "refused" | "not_cheaper"
    reason: str = ""
    cost_before: float | None = None
    cost_after: float | None = None


@dataclass
class PassContext:
    """What a pass may consult while it runs.

    ``cost`` is a cost model (any object with ``node_cost``/``graph_cost``); a pass that
    must price a rewrite and finds None uses ``hant.cost_models.get("roofline:cpu")``.
    ``check_inputs`` are real inputs for numeric checks; ``rtol``/``atol``
    the tolerances of exact passes. ``decisions`` collects :class:`Decision` rows.
    """
    cost: Any = None
    check_inputs: tuple | None = None
    rtol: float = 1e-4
    atol: float = 1e-5
    decisions: list[Decision] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)


class Pass(PassBase):
    """Base class of hant passes.

    Subclasses set ``name`` (registry key), ``exact`` (output unchanged up to float
    rounding) and ``idempotent``, and implement ``call(gm) -> PassResult``. ``call`` may
    mutate ``gm``; it must leave it valid (``gm.graph.lint()`` passes, ``gm.recompile()``
    done) and must never touch modules or tensors shared with the caller's model:
    new weights go into new modules.
    """

    name: str = ""
    exact: bool = True
    idempotent: bool = True

    def __init__(self, context: PassContext | None = None):
        self.context = context or PassContext()

    def decide(self, site: str, action: str, reason: str = "", cost_before: float | None = None,
               cost_after: float | None = None) -> None:
        """Record one decision in the context, for the report."""
        self.context.decisions.append(Decision(self.name, site, action, reason, cost_before, cost_after))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, exact={self.exact})"


_REGISTRY: dict[str, type[Pass]] = {}

# Presets are lists of names. "exact" is every exact pass, in an order that exposes the
# most folding: clean up first, fold BN into its neighbour, collapse linear chains, then
# fuse parallel ops that the folding has made siblings, and clean up again.
PRESETS: dict[str, list[str]] = {
    "exact": ["cleanup", "fuse_bn", "fold_linear", "fuse_parallel", "cleanup"],
}


def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available by its ``name``."""
    if not cls.name:
        raise PassError(f"{cls.__name__} has no name; set the class attribute `name`")
    _REGISTRY[cls.name] = cls
    return cls


def available() -> list[str]:
    """Registered pass names, sorted."""
    return sorted(_REGISTRY)


def get(name: str) -> type[Pass]:
    """The pass class registered as ``name``; :class:`PassError` listing valid names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise PassError(
            f"unknown pass {name!r}; valid passes: {', '.join(available())}; presets: {', '.join(sorted(PRESETS))}"
        ) from None


def resolve(spec: str | Iterable[str | Pass | type[Pass]]) -> list[Pass | type[Pass]]:
    """Expand a preset name, a comma list, or a list of names/classes/instances into passes."""
    if isinstance(spec, str):
        names = [s.strip() for s in spec.split(",") if s.strip()]
        spec = [n for name in names for n in PRESETS.get(name, [name])]
    if not spec:
        raise PassError("no passes given; name a preset (exact) or a comma list of passes")
    return [get(item) if isinstance(item, str) else item for item in spec]

