"""Policy-selection metrics: rank correlation, regret@k, interval coverage."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from evaluation.ope import Estimate, coverage, regret_at_k, selection_metrics, spearman, top_k


def make_estimate(value, low=None, high=None, estimator="wis"):
    identifiable = bool(np.isfinite(value))
    return Estimate(estimator=estimator, value=value, low=low, high=high, interval=None if low is None else "t",
                    level=None if low is None else 0.95, ess=10.0, n_episodes=100, identifiable=identifiable,
                    reason=None if identifiable else "no overlap")


def test_spearman():
    truths = [1.0, 2.0, 3.0, 4.0]
    assert spearman([10, 20, 30, 40], truths) == pytest.approx(1.0)
    assert spearman([4, 3, 2, 1], truths) == pytest.approx(-1.0)
    # one swapped pair among 4: 1 - 6 * (1 + 1) / (4 * 15) = 0.8
    assert spearman([1, 3, 2, 4], truths) == pytest.approx(0.8)
    # NaN estimates are left out: the remaining three are in order
    assert spearman([1, np.nan, 3, 4], truths) == pytest.approx(1.0)
    assert np.isnan(spearman([1, np.nan, np.nan, np.nan], truths))
    assert np.isnan(spearman([2, 2, 2, 2], truths))


def test_regret_at_k_by_hand():
    truths = np.array([5.0, 9.0, 1.0, 7.0])  # best is candidate 1 (9), worst 2 (1), spread 8
    estimates = np.array([8.0, 2.0, 6.0, 4.0])  # ranks candidates 0, 2, 3, 1
    assert list(top_k(estimates, 2)) == [0, 2]
    assert regret_at_k(estimates, truths, k=1) == 4.0  # picks 0: 9 - 5
    assert regret_at_k(estimates, truths, k=2) == 4.0  # best of {0, 2} is 5
    assert regret_at_k(estimates, truths, k=3) == 2.0  # best of {0, 2, 3} is 7
    assert regret_at_k(estimates, truths, k=4) == 0.0
    assert regret_at_k(estimates, truths, k=1, normalise=True) == 0.5  # 4 / 8
    assert regret_at_k(np.array([0.0, 0.0, 9.0, 0.0]), truths, k=1, normalise=True) == 1.0  # chose the worst


def test_regret_never_selects_unidentifiable_candidates():
    truths = [5.0, 9.0, 1.0]
    assert list(top_k([np.nan, 1.0, 0.0], 2)) == [1, 2]
    assert regret_at_k([np.nan, 1.0, 0.0], truths, k=1) == 0.0
    assert regret_at_k([np.nan, np.nan, 0.0], truths, k=2) == 8.0  # only candidate 2 can be chosen
    assert np.isnan(regret_at_k([np.nan, np.nan, np.nan], truths, k=1))


def test_coverage():
    assert coverage([0, 0, 0, np.nan], [2, 2, 2, np.nan], [1, 3, 2, 1]) == 0.5  # ends count as covered
    assert coverage([0.0], [np.inf], [5.0]) == 1.0  # a one-sided lower bound


def test_selection_metrics_from_estimates():
    truths = {"a": 5.0, "b": 9.0, "c": 1.0, "d": 7.0}
    estimates = {"a": make_estimate(8.0, 4.0, 12.0), "b": make_estimate(2.0, 1.0, 3.0),
                 "c": make_estimate(6.0, 0.0, 7.0), "d": make_estimate(4.0, 3.0, 8.0)}
    m = selection_metrics(estimates, truths, ks=(1, 3))
    assert m.estimator == "wis" and m.n_candidates == 4 and m.n_identifiable == 4
    assert m.regret_at_k == {1: 4.0, 3: 2.0}
    assert m.normalised_regret_at_k == {1: 0.5, 3: 0.25}
    assert m.coverage == 0.75  # b's [1, 3] misses 9
    assert m.spearman == pytest.approx(spearman([8, 2, 6, 4], [5, 9, 1, 7]))
    no_intervals = selection_metrics({k: make_estimate(v.value) for k, v in estimates.items()}, truths)
    assert no_intervals.coverage is None

    @dataclasses.dataclass
    class Interval:  # duck-types evaluation.ground_truth.Interval (importing it loads the simulator)
        value: float
        low: float
        high: float

    as_intervals = selection_metrics(estimates, {k: Interval(v, v - 1, v + 1) for k, v in truths.items()}, ks=(1, 3))
    assert as_intervals == m


def test_selection_metrics_rejects_mismatches():
    with pytest.raises(ValueError, match="unmatched: \\['b'\\]"):
        selection_metrics({"a": make_estimate(1.0)}, {"a": 1.0, "b": 2.0})
    with pytest.raises(ValueError, match="one estimator at a time"):
        selection_metrics({"a": make_estimate(1.0), "b": make_estimate(2.0, estimator="is")}, {"a": 1.0, "b": 2.0})
    with pytest.raises(ValueError, match="2 estimates for 3 true values"):
        spearman([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="k must be at least 1"):
        regret_at_k([1, 2], [1, 2], k=0)
