"""High-confidence lower bounds on a policy's improvement over current care, from logged episodes.

Every logged episode ``i`` was produced by current care ``pi_b``; its trajectory
importance weight ``rho_i = prod_t pi_c(a_t | s_t) / pi_b(a_t | s_t)`` turns its
outcome ``Y_i`` into an unbiased estimate of the candidate ``pi_c``'s value. The
improvement is paired by episode (the same patients vouch for both policies):

    d_i = min(rho_i, c) (Y_i - m) - (Y_i - m),   mean(d) estimates V(pi_c) - V(pi_b)

For ``Y_i - m >= 0`` truncating the weight at ``c`` can only lower the
expectation, so a lower bound on ``E d`` is a lower bound on the improvement
(Thomas, Theocharous & Ghavamzadeh 2015, "High confidence off-policy
evaluation", AAAI; and their "High confidence policy improvement", ICML 2015).
Remission (0/1) has ``m = 0``; a return has ``m`` = the lowest return seen on
the candidate split, and is clipped there.

Two bounds on ``E d``:

- ``t``: one-sided Student t, ``mean - t_{1-delta, n-1} sd / sqrt(n)``. Approximate
  (it trusts the central limit theorem), tight; HCPI's choice for its safety test.
- ``bernstein``: the empirical Bernstein bound (Maurer & Pontil 2009, Theorem 4)
  on ``d`` in ``[-(M - m), (c - 1)(M - m)]``: exact for bounded outcomes, looser.
  Returns have no known range, so their Bernstein bound uses the range seen on the
  candidate split: stated in the certificate as an assumption.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import NDArray
from scipy import stats

from evaluation.ope.intervals import bernstein_lower

F64 = NDArray[np.float64]
Method = Literal["t", "bernstein"]
METHODS: tuple[str, ...] = ("t", "bernstein")


@dataclass(frozen=True)
class PairedBound:
    """A lower bound on ``V(candidate) - V(current care)`` and what it rests on."""

    improvement: float  # mean of the paired differences
    lower_bound: float
    behaviour_value: float  # mean outcome under current care (the logged episodes)
    candidate_value: float  # improvement + behaviour value
    ess: float  # Kish effective sample size of the truncated weights
    truncated_share: float  # share of episodes whose weight the truncation lowered
    episodes: int


def paired_differences(rho: F64, outcome: F64, floor: float, truncation: float) -> F64:
    """``d_i = min(rho_i, c) (Y_i - m) - (Y_i - m)`` with ``Y - m`` clipped at 0 (see the module docstring)."""
    shifted = np.maximum(np.asarray(outcome, dtype=np.float64) - floor, 0.0)
    return np.minimum(rho, truncation) * shifted - shifted


def lower_bound(d: F64, method: str, confidence: float, support: tuple[float, float]) -> float:
    """A one-sided ``confidence`` lower bound on ``E d``; ``support`` is the range ``d`` can take
    (the Bernstein bound needs it)."""
    n = len(d)
    if n < 2:
        raise ValueError(f"a lower bound needs at least 2 episodes, got {n}")
    if method == "t":
        sd = float(np.std(d, ddof=1))
        return float(np.mean(d)) - float(stats.t.ppf(confidence, n - 1)) * sd / np.sqrt(n)
    if method == "bernstein":
        return bernstein_lower(d, support[0], support[1], confidence).low
    raise ValueError(f"bound method must be one of {METHODS}, got {method!r}")


def paired_bound(rho: F64, outcome: F64, *, floor: float, ceiling: float, truncation: float, method: str,
                 confidence: float) -> PairedBound:
    """The improvement's point estimate and lower bound on these episodes."""
    outcome = np.asarray(outcome, dtype=np.float64)
    d = paired_differences(rho, outcome, floor, truncation)
    top = max(ceiling, float(outcome.max()) if len(outcome) else ceiling) - floor
    support = (-top, (truncation - 1.0) * top)  # d_i lies here
    w = np.minimum(rho, truncation)
    ess = float(w.sum() ** 2 / max(float((w * w).sum()), 1e-300))
    behaviour = float(np.clip(outcome, floor, None).mean())
    improvement = float(d.mean())
    return PairedBound(improvement, lower_bound(d, method, confidence, support), behaviour, behaviour + improvement,
                       ess, float((rho > truncation).mean()), len(d))


@dataclass(frozen=True)
class SelectionScore:
    """How a candidate is predicted to fare on the safety part, from the selection part alone."""

    predicted_bound: float  # the safety test's bound if the safety part behaved like this one
    pass_probability: float  # the chance that bound clears 0 (normal approximation)


def selection_score(d: F64, confidence: float, n_test: int) -> SelectionScore:
    """Score per-episode differences ``d`` of the selection part for a safety test on ``n_test`` episodes.

    HCPI (Thomas et al. 2015, section 5) picks the best predicted bound with its width doubled,
    which turns the choice toward candidates that change little: a change at intake, with weights
    of about 50 on the few patients the log explored it on, loses to one that changes nothing.
    Here the candidate most likely to pass is chosen. With ``m``, ``s`` the mean and standard
    deviation of ``d`` on ``n1`` episodes, the safety mean is about normal around the true
    improvement, which is about normal around ``m``, so the test passes with probability about
    ``Phi((m - t s / sqrt(n2)) / (s sqrt(1/n1 + 1/n2)))``: increasing in ``m sqrt(n1) / s``.
    Heavy weights make ``s`` itself unreliable, which the caller guards against with a minimum
    effective sample size."""
    n = len(d)
    if n < 2:
        return SelectionScore(float("-inf"), 0.0)
    m, sd = float(np.mean(d)), float(np.std(d, ddof=1))
    bound = m - float(stats.t.ppf(confidence, max(n_test - 1, 1))) * sd / np.sqrt(max(n_test, 1))
    if sd <= 0.0:
        return SelectionScore(bound, 1.0 if bound > 0 else 0.0)
    spread = sd * np.sqrt(1.0 / n + 1.0 / max(n_test, 1))
    return SelectionScore(bound, float(stats.norm.cdf(bound / spread)))


__all__ = ["METHODS", "PairedBound", "SelectionScore", "lower_bound", "paired_bound", "paired_differences",
           "selection_score"]
