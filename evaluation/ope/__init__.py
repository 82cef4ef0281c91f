"""Off-policy evaluation: importance-sampling and doubly robust estimators, intervals, selection metrics.

The common path is one call::

    from evaluation.ope import estimate, target_probabilities

    probs = target_probabilities(policy, episodes)          # (E, L, A), one batched policy call
    est = estimate("wis", episodes, probs, interval="bca")  # Estimate: value, low, high, ESS, warnings
    dr = estimate("wdr", episodes, probs, q_hat=q_hat, interval="t")

Importing this package does not import torch (FQE, which does, is a separate module).
"""

from evaluation.ope.estimators import (
    ESTIMATORS,
    INTERVALS,
    Estimate,
    OPEData,
    estimate,
    estimate_all,
    estimator_terms,
    lower_bound,
    prepare,
)
from evaluation.ope.intervals import (
    IntervalResult,
    bca_interval,
    bernstein_lower,
    bootstrap_values,
    hoeffding_lower,
    percentile_interval,
    refit_interval,
    resample_counts,
    t_interval,
)
from evaluation.ope.selection import SelectionMetrics, coverage, regret_at_k, selection_metrics, spearman, top_k
from evaluation.ope.terms import RatioTerms
from evaluation.ope.weights import (
    cumulative_weights,
    importance_ratios,
    kish_ess,
    logged_action_probs,
    target_probabilities,
)

# FQE imports torch, so it is not imported here: ``from evaluation.ope.fqe import FQEConfig, fit_fqe``.

__all__ = [
    "ESTIMATORS",
    "INTERVALS",
    "Estimate",
    "IntervalResult",
    "OPEData",
    "RatioTerms",
    "SelectionMetrics",
    "bca_interval",
    "bernstein_lower",
    "bootstrap_values",
    "coverage",
    "cumulative_weights",
    "estimate",
    "estimate_all",
    "estimator_terms",
    "hoeffding_lower",
    "importance_ratios",
    "kish_ess",
    "logged_action_probs",
    "lower_bound",
    "percentile_interval",
    "prepare",
    "refit_interval",
    "regret_at_k",
    "resample_counts",
    "selection_metrics",
    "spearman",
    "t_interval",
    "target_probabilities",
    "top_k",
]
