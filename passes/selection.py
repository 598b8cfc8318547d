"""0/1 selection by integer programming (``scipy.optimize.milp``, HiGHS), shared by the lossy passes.

Three problems, each solved to proven optimality (``mip_rel_gap=0``):

* :func:`max_gain_under_budget`: choose units to maximise total gain subject to total
  importance <= budget (nonlinearity removal, "accuracy budget" mode);
* :func:`min_importance_for_saving`: choose units to minimise total importance subject to
  total gain >= a required saving (nonlinearity removal, "latency target" mode: predicted
  latency = baseline - gain <= target);
* :func:`multiple_choice`: exactly one option per site, minimise total score subject to
  total latency <= budget, plus optional extra linear constraints (operator substitution).

Mutual exclusion: ``exclusive`` is a list of index groups; at most one unit of each group is
chosen (units that share an activation, say). Infeasible problems raise :class:`PassError`
saying what is reachable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from hant.errors import PassError

__all__ = ["Selection", "Choice", "ExtraConstraint", "max_gain_under_budget", "min_importance_for_saving",
           "multiple_choice"]

_OPTIONS = {"mip_rel_gap": 0.0, "presolve": True}
_SLACK = 1e-9        # relative slack on budgets, so a total that equals the budget is accepted
# HiGHS accepts an integer solution whose constraints are violated by up to its MIP
# feasibility tolerance (absolute, 1e-6 by default; scipy's ``milp`` does not expose it):
# every budget and saving below holds up to this much.
FEASIBILITY_TOL = 1e-6


@dataclass(frozen=True)
class Selection:
    """Chosen unit indices (sorted) and their totals."""
    chosen: tuple[int, ...]
    total_gain: float
    total_importance: float


@dataclass(frozen=True)
class ExtraConstraint:
    """``lower <= sum over sites of values[site][option] * z[site][option] <= upper``.

    ``values`` has the same ragged shape as the scores (e.g. parameters or MACs of each
    option; or 1 for the options of an earlier solution, to ask for diversity).
    """
    values: Sequence[Sequence[float]]
    upper: float = math.inf
    lower: float = -math.inf
    name: str = ""


@dataclass(frozen=True)
class Choice:
    """The chosen option index per site and the totals of the chosen options."""
    options: tuple[int, ...]
    total_score: float
    total_latency: float


def _exclusion_rows(exclusive: Iterable[Iterable[int]], n: int) -> list[np.ndarray]:
    rows = []
    for group in exclusive:
        idx = sorted(set(int(i) for i in group))
        if any(i < 0 or i >= n for i in idx):
            raise PassError(f"exclusive group {idx} names a unit outside 0..{n - 1}")
        if len(idx) > 1:
            row = np.zeros(n)
            row[idx] = 1.0
            rows.append(row)
    return rows


def _solve_binary(c: np.ndarray, rows: list[np.ndarray], lower: list[float], upper: list[float],
                  fixed_zero: np.ndarray) -> np.ndarray | None:
    """Minimise ``c @ z`` over binary z with the given rows; None when infeasible."""
    n = len(c)
    ub = np.where(fixed_zero, 0.0, 1.0)
    constraints = [LinearConstraint(np.vstack(rows), lower, upper)] if rows else []
    res = milp(c, integrality=np.ones(n), bounds=Bounds(np.zeros(n), ub), constraints=constraints, options=_OPTIONS)
    if res.status != 0 or res.x is None:
        if res.status == 2:     # infeasible
            return None
        raise PassError(f"the integer program did not solve: {res.message}")
    return np.round(res.x).astype(bool)


def _check_vectors(gains: Sequence[float], importances: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    g = np.asarray(gains, dtype=float)
    imp = np.asarray(importances, dtype=float)
    if g.shape != imp.shape or g.ndim != 1:
        raise PassError(f"gains and importances must be equal-length vectors, got {g.shape} and {imp.shape}")
    if not (np.all(np.isfinite(g)) and np.all(np.isfinite(imp))):
        raise PassError("gains and importances must be finite numbers")
    return g, imp


def _selection(z: np.ndarray, g: np.ndarray, imp: np.ndarray) -> Selection:
    chosen = tuple(int(i) for i in np.flatnonzero(z))
    return Selection(chosen, float(g[z].sum()), float(imp[z].sum()))


def max_gain_under_budget(gains: Sequence[float], importances: Sequence[float], budget: float, *,
                          exclusive: Iterable[Iterable[int]] = ()) -> Selection:
    """Maximise ``sum(gains[chosen])`` subject to ``sum(importances[chosen]) <= budget``.

    Units with gain <= 0 are never chosen (they cannot help). Importances may be negative
    (a unit that improves the metric); they then free budget for others.
    """
    g, imp = _check_vectors(gains, importances)
    if len(g) == 0:
        return Selection((), 0.0, 0.0)
    rows = [imp] + _exclusion_rows(exclusive, len(g))
    upper = [budget + _SLACK * max(1.0, abs(budget))] + [1.0] * (len(rows) - 1)
    z = _solve_binary(-g, rows, [-np.inf] * len(rows), upper, fixed_zero=g <= 0)
    if z is None:   # only possible when negative-importance units are forced, which they are not
        return Selection((), 0.0, 0.0)
    return _selection(z, g, imp)


def min_importance_for_saving(gains: Sequence[float], importances: Sequence[float], saving: float, *,
                              exclusive: Iterable[Iterable[int]] = ()) -> Selection:
    """Minimise ``sum(importances[chosen])`` subject to ``sum(gains[chosen]) >= saving``.

    With a latency target, ``saving = baseline_latency - target_latency``. Units with gain
    <= 0 are never chosen, and nothing is chosen when ``saving <= 0``. The saving is met up to
    :data:`FEASIBILITY_TOL`. Raises :class:`PassError` naming the largest reachable saving
    when no selection reaches ``saving``.
    """
    g, imp = _check_vectors(gains, importances)
    if saving <= 0:                 # the target is met already: nothing needs to go
        return Selection((), 0.0, 0.0)
    rows = [g] + _exclusion_rows(exclusive, len(g))
    lower = [saving - _SLACK * max(1.0, abs(saving))] + [-np.inf] * (len(rows) - 1)
    upper = [np.inf] + [1.0] * (len(rows) - 1)
    z = _solve_binary(imp, rows, lower, upper, fixed_zero=g <= 0)
    if z is None:
        best = max_gain_under_budget(g, np.zeros_like(g), 0.0, exclusive=exclusive).total_gain
        raise PassError(f"no selection saves {saving:.4g}; the most any selection saves is {best:.4g}. "
                        "Relax the latency target.")
    return _selection(z, g, imp)


def multiple_choice(scores: Sequence[Sequence[float]], latencies: Sequence[Sequence[float]], budget: float, *,
                    extra: Sequence[ExtraConstraint] = ()) -> Choice:
    """Pick exactly one option per site: minimise total score subject to total latency <= budget.

    ``scores[s][k]`` and ``latencies[s][k]`` describe option ``k`` of site ``s`` (sites may
    have different numbers of options). ``extra`` adds linear constraints over the same
    options. Raises :class:`PassError` with the smallest reachable latency when the budget
    cannot be met.
    """
    if len(scores) != len(latencies) or any(len(a) != len(b) for a, b in zip(scores, latencies)):
        raise PassError("scores and latencies must have the same number of sites and options per site")
    if any(len(s) == 0 for s in scores):
        raise PassError("every site needs at least one option")
    sizes = [len(s) for s in scores]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    n = int(offsets[-1])
    c = np.concatenate([np.asarray(s, dtype=float) for s in scores]) if n else np.zeros(0)
    lat = np.concatenate([np.asarray(t, dtype=float) for t in latencies]) if n else np.zeros(0)
    if not (np.all(np.isfinite(c)) and np.all(np.isfinite(lat))):
        raise PassError("scores and latencies must be finite numbers")
    if n == 0:
        return Choice((), 0.0, 0.0)
    rows, lower, upper = [lat], [-np.inf], [budget + _SLACK * max(1.0, abs(budget))]
    for s in range(len(sizes)):
        row = np.zeros(n)
        row[offsets[s]:offsets[s + 1]] = 1.0
        rows.append(row)
        lower.append(1.0)
        upper.append(1.0)
    for con in extra:
        if len(con.values) != len(sizes) or any(len(v) != k for v, k in zip(con.values, sizes)):
            raise PassError(f"extra constraint {con.name or ''} must have one value per option of every site")
        rows.append(np.concatenate([np.asarray(v, dtype=float) for v in con.values]))
        lower.append(con.lower)
        upper.append(con.upper)
    z = _solve_binary(c, rows, lower, upper, fixed_zero=np.zeros(n, dtype=bool))
    if z is None:
        fastest = sum(float(np.min(t)) for t in latencies)
        raise PassError(f"no choice meets latency budget {budget:.4g} (with the extra constraints); the fastest "
                        f"choice takes {fastest:.4g}. Raise the budget or relax the constraints.")
    options = tuple(int(np.flatnonzero(z[offsets[s]:offsets[s + 1]])[0]) for s in range(len(sizes)))
    return Choice(options, float(c[z].sum()), float(lat[z].sum()))
