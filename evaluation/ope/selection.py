"""Policy-selection metrics: how well off-policy estimates rank a set of candidate policies.

Following the benchmark of Fu et al. 2021 ("Benchmarks for deep off-policy
evaluation", ICLR): the Spearman rank correlation between estimates and true
values and regret@k (how much value is lost by deploying the best of the top
``k`` candidates by estimate instead of the truly best one), also normalised
by the spread of true values (max - min); and the share of candidates whose
interval covers its true value.

Unidentifiable candidates (estimate NaN) are never selected: they rank below
every finite estimate for regret@k, and are left out of the rank correlation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import stats

from evaluation.ope.estimators import Estimate

if TYPE_CHECKING:
    from evaluation.ground_truth import Interval

F64 = NDArray[np.float64]


def _pair(estimates: ArrayLike, truths: ArrayLike) -> tuple[F64, F64]:
    est = np.asarray(estimates, dtype=np.float64).ravel()
    true = np.asarray(truths, dtype=np.float64).ravel()
    if est.shape != true.shape:
        raise ValueError(f"got {len(est)} estimates for {len(true)} true values")
    if len(true) == 0:
        raise ValueError("no candidate policies")
    if not np.isfinite(true).all():
        raise ValueError("true values must be finite")
    return est, true


def spearman(estimates: ArrayLike, truths: ArrayLike) -> float:
    """Spearman rank correlation over the candidates with a finite estimate (NaN if fewer than 2, or constant)."""
    est, true = _pair(estimates, truths)
    keep = np.isfinite(est)
    if keep.sum() < 2 or np.ptp(est[keep]) == 0 or np.ptp(true[keep]) == 0:
        return float("nan")
    return float(stats.spearmanr(est[keep], true[keep]).statistic)


def top_k(estimates: ArrayLike, k: int) -> NDArray[np.intp]:
    """Indices of the ``k`` highest estimates (NaN last; ties keep the input order)."""
    est = np.asarray(estimates, dtype=np.float64).ravel()
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    order = np.argsort(-np.where(np.isfinite(est), est, -np.inf), kind="stable")
    return order[:k]


def regret_at_k(estimates: ArrayLike, truths: ArrayLike, k: int = 1, normalise: bool = False) -> float:
    """``max(truth) - max(truth[top k by estimate])``; normalised: divided by ``max(truth) - min(truth)``.

    0 means the truly best policy is among the top ``k``; normalised regret 1
    means the best of the top ``k`` is the worst candidate. With every
    estimate NaN nothing can be chosen and the regret is NaN.
    """
    est, true = _pair(estimates, truths)
    if not np.isfinite(est).any():
        return float("nan")
    chosen = top_k(est, k)
    chosen = chosen[np.isfinite(est[chosen])]
    regret = float(true.max() - true[chosen].max())
    if not normalise:
        return regret
    spread = float(np.ptp(true))
    return regret / spread if spread > 0 else 0.0


def coverage(lows: ArrayLike, highs: ArrayLike, truths: ArrayLike) -> float:
    """Share of candidates with ``low <= truth <= high`` (a NaN or missing interval does not cover)."""
    low = np.asarray(lows, dtype=np.float64).ravel()
    high = np.asarray(highs, dtype=np.float64).ravel()
    true = np.asarray(truths, dtype=np.float64).ravel()
    if not low.shape == high.shape == true.shape:
        raise ValueError(f"got {len(low)} lows, {len(high)} highs and {len(true)} true values")
    if len(true) == 0:
        raise ValueError("no candidate policies")
    return float(np.mean((low <= true) & (true <= high)))


def _truth(value: float | Interval) -> float:
    return float(value.value) if hasattr(value, "value") else float(value)


@dataclass(frozen=True)
class SelectionMetrics:
    estimator: str
    n_candidates: int
    n_identifiable: int
    spearman: float
    regret_at_k: dict[int, float]
    normalised_regret_at_k: dict[int, float]
    coverage: float | None  # None when the estimates carry no intervals


def selection_metrics(estimates: Mapping[str, Estimate], truths: Mapping[str, float | Interval],
                      ks: Sequence[int] = (1, 3)) -> SelectionMetrics:
    """Every metric for one estimator over candidate policies; both mappings are keyed by policy name.

    ``truths`` are true values, or the :class:`~evaluation.ground_truth.Interval`
    of a simulator rollout (``rollout(policy).value``), whose point value is used.
    """
    missing = sorted(set(estimates) ^ set(truths))
    if missing:
        raise ValueError(f"estimates and truths must name the same policies; unmatched: {missing}")
    names = sorted(estimates)
    kinds = {estimates[n].estimator for n in names}
    if len(kinds) > 1:
        raise ValueError(f"compare one estimator at a time, got {sorted(kinds)}")
    est = np.array([estimates[n].value for n in names])
    true = np.array([_truth(truths[n]) for n in names])
    with_interval = all(estimates[n].low is not None for n in names)
    cover = float(np.mean([estimates[n].covers(t) for n, t in zip(names, true, strict=True)])) if with_interval \
        else None
    return SelectionMetrics(
        estimator=kinds.pop() if kinds else "",
        n_candidates=len(names),
        n_identifiable=int(np.isfinite(est).sum()),
        spearman=spearman(est, true),
        regret_at_k={k: regret_at_k(est, true, k) for k in ks},
        normalised_regret_at_k={k: regret_at_k(est, true, k, normalise=True) for k in ks},
        coverage=cover,
    )


__all__ = ["SelectionMetrics", "coverage", "regret_at_k", "selection_metrics", "spearman", "top_k"]
