"""The 0/1 integer programs: budgets hold and the optimum equals brute force on small instances."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hant.errors import PassError
from hant.passes.selection import (
    FEASIBILITY_TOL,
    ExtraConstraint, max_gain_under_budget, min_importance_for_saving, multiple_choice,
)


def _exclusive_ok(subset, exclusive):
    return all(len(set(subset) & set(g)) <= 1 for g in exclusive)


def _subsets(n):
    for r in range(n + 1):
        yield from itertools.combinations(range(n), r)


def _instance(seed, n):
    rng = np.random.default_rng(seed)
    gains = rng.uniform(-0.2, 1.0, n)
    imps = rng.uniform(0.0, 1.0, n)
    exclusive = [tuple(rng.choice(n, size=2, replace=False)) for _ in range(rng.integers(0, 3))] if n > 1 else []
    return gains, imps, exclusive


@given(seed=st.integers(0, 10_000), n=st.integers(1, 8), budget=st.floats(0.0, 3.0))
@settings(max_examples=40, deadline=None)
def test_max_gain_matches_brute_force_and_respects_budget(seed, n, budget):
    gains, imps, exclusive = _instance(seed, n)
    sel = max_gain_under_budget(gains, imps, budget, exclusive=exclusive)
    assert sel.total_importance <= budget + 1e-9
    assert _exclusive_ok(sel.chosen, exclusive)
    assert all(gains[i] > 0 for i in sel.chosen)
    best = max(sum(gains[list(s)]) for s in _subsets(n)
               if sum(imps[list(s)]) <= budget and _exclusive_ok(s, exclusive))
    assert sel.total_gain == pytest.approx(best, abs=1e-9)


@given(seed=st.integers(0, 10_000), n=st.integers(1, 8), fraction=st.floats(0.0, 1.2))
@settings(max_examples=40, deadline=None)
def test_min_importance_matches_brute_force(seed, n, fraction):
    gains, imps, exclusive = _instance(seed, n)
    feasible = [s for s in _subsets(n) if _exclusive_ok(s, exclusive) and all(gains[i] > 0 for i in s)]
    reachable = max(sum(gains[list(s)]) for s in feasible)
    saving = fraction * reachable
    if saving > reachable + FEASIBILITY_TOL:
        with pytest.raises(PassError, match="Relax the latency target"):
            min_importance_for_saving(gains, imps, saving, exclusive=exclusive)
        return
    try:
        sel = min_importance_for_saving(gains, imps, saving, exclusive=exclusive)
    except PassError:
        # Within the solver's tolerance of unreachable, refusing is as correct as accepting.
        assert saving > reachable
        return
    assert sel.total_gain >= saving - FEASIBILITY_TOL
    assert _exclusive_ok(sel.chosen, exclusive)
    # The optimum lies between the best selection that meets the saving up to the solver's
    # tolerance and the best that meets it strictly (when one does).
    best_tolerant = min(sum(imps[list(s)]) for s in feasible if sum(gains[list(s)]) >= saving - FEASIBILITY_TOL)
    strict = [sum(imps[list(s)]) for s in feasible if sum(gains[list(s)]) >= saving]
    assert sel.total_importance >= best_tolerant - 1e-9
    if strict:
        assert sel.total_importance <= min(strict) + 1e-9


def test_unreachable_saving_names_the_best_reachable():
    with pytest.raises(PassError, match="most any selection saves is 3"):
        min_importance_for_saving([1.0, 2.0, -1.0], [0.1, 0.1, 0.1], 10.0)


def test_units_without_gain_are_never_chosen_even_with_free_budget():
    sel = max_gain_under_budget([0.0, -1.0, 0.5], [0.0, 0.0, 0.0], 100.0)
    assert sel.chosen == (2,)


@pytest.mark.parametrize("seed", range(15))
def test_multiple_choice_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 4, size=rng.integers(1, 5))
    scores = [rng.uniform(0, 1, k) for k in sizes]
    lats = [rng.uniform(0.1, 1, k) for k in sizes]
    params = [rng.uniform(0, 1, k) for k in sizes]
    budget = float(sum(np.mean(t) for t in lats))
    max_params = float(sum(np.max(p) for p in params)) * 0.8
    extra = [ExtraConstraint(params, upper=max_params, name="params")]
    combos = [c for c in itertools.product(*[range(k) for k in sizes])
              if sum(lats[s][k] for s, k in enumerate(c)) <= budget
              and sum(params[s][k] for s, k in enumerate(c)) <= max_params]
    if not combos:
        with pytest.raises(PassError, match="Raise the budget"):
            multiple_choice(scores, lats, budget, extra=extra)
        return
    choice = multiple_choice(scores, lats, budget, extra=extra)
    assert len(choice.options) == len(sizes)
    assert choice.total_latency <= budget + 1e-9
    assert sum(params[s][k] for s, k in enumerate(choice.options)) <= max_params + 1e-9
    best = min(sum(scores[s][k] for s, k in enumerate(c)) for c in combos)
    assert choice.total_score == pytest.approx(best, abs=1e-9)


def test_multiple_choice_diversity_constraint_excludes_an_earlier_solution():
    scores = [[0.0, 0.1], [0.0, 0.2]]
    lats = [[1.0, 1.0], [1.0, 1.0]]
    first = multiple_choice(scores, lats, 10.0)
    assert first.options == (0, 0)
    earlier = [[1.0 if k == first.options[s] else 0.0 for k in range(2)] for s in range(2)]
    second = multiple_choice(scores, lats, 10.0, extra=[ExtraConstraint(earlier, upper=1.0, name="diversity")])
    assert second.options == (1, 0)


def test_multiple_choice_rejects_ragged_input():
    with pytest.raises(PassError, match="same number"):
        multiple_choice([[1.0, 2.0]], [[1.0]], 1.0)
