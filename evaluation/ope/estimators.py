"""Importance-sampling and doubly robust off-policy estimators on padded episodes.

The value estimated is ``V(pi_e) = E[sum_{t < L} gamma^t r_t]`` under the
target policy ``pi_e``: with ``gamma = 1`` (the default) the expected total
reward per patient over the logged horizon. ``w_t`` is the cumulative
importance weight up to and including step ``t`` (:mod:`evaluation.ope.weights`,
optionally capped at ``clip``), ``w_{-1} = 1``, ``n`` the number of episodes.

- ``is``: trajectory importance sampling (Precup, Sutton & Singh 2000,
  "Eligibility traces for off-policy policy evaluation", ICML),
  ``mean_i w_{i,L-1} G_i`` with ``G_i = sum_t gamma^t r_it``.
- ``wis``: weighted (self-normalised) IS, ``sum_i w_{i,L-1} G_i / sum_i w_{i,L-1}``
  (same paper; biased, consistent, far lower variance).
- ``pdis``: per-decision IS (Precup et al. 2000), ``mean_i sum_t gamma^t w_it r_it``:
  a reward is weighted only by the ratios of the actions before it.
- ``wpdis``: weighted per-decision IS, ``sum_t gamma^t sum_i w_it r_it / sum_i w_it``
  (Thomas 2015, PhD thesis "Safe reinforcement learning").
- ``dr``: per-decision doubly robust estimator (Jiang & Li 2016, "Doubly robust
  off-policy value evaluation for reinforcement learning", ICML; their recursion unrolled),
  ``mean_i sum_t gamma^t [w_it (r_it - q_hat_it(a_it)) + w_{i,t-1} v_hat_it]``,
  ``v_hat_it = sum_a pi_e(a|s_it) q_hat_it(a)``: unbiased if the weights are
  exact, low variance if ``q_hat`` is good.
- ``wdr``: weighted doubly robust (Thomas & Brunskill 2016, "Data-efficient
  off-policy policy evaluation for reinforcement learning", ICML): DR with
  each ``w_it`` replaced by ``w_it / sum_j w_jt`` (and ``w_{i,-1}`` by ``1/n``).

``q_hat`` (E, L, A) is a fitted Q-function of the *target* policy on each
logged step (``Q^pi(s_t, a)`` for every action), e.g. from FQE. It is set to 0
on padded steps (absorbing, zero reward). With ``q_hat = 0``, DR is PDIS and
WDR is WPDIS.

Effective sample size (Kish, ``(sum w)^2 / sum w^2``): of the trajectory
weights ``w_{., L-1}`` for ``is`` and ``wis``; for the per-decision estimators
the minimum over steps of the ESS of ``w_{., t}`` (the most degenerate step;
usually the last, since weights are products). It is reported for every
estimator, including the unweighted ones, as a diagnostic of weight
degeneracy.

Identifiability: when no episode has a non-zero trajectory weight (e.g. a
deterministic target that never takes the logged actions), no estimator says
anything about ``pi_e`` from the data: IS would return 0, WIS 0/0, DR the
model's guess alone. Such estimates come back with ``identifiable=False``,
value NaN and a ``reason``. (A non-zero trajectory weight keeps every earlier
step's weight non-zero, so this is also the condition for every per-step
normaliser of WPDIS and WDR to be positive.)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from evaluation.ope import intervals as iv
from evaluation.ope.terms import RatioTerms
from evaluation.ope.weights import (
    check_episodes,
    check_probabilities,
    check_rows_sum_to_one,
    cumulate_in_place,
    importance_ratios,
    kish_ess,
    take_logged,
)

if TYPE_CHECKING:
    from evaluation.ground_truth import Interval
    from offline_data.dataset import Episodes

F64 = NDArray[np.float64]

ESTIMATORS: tuple[str, ...] = ("is", "wis", "pdis", "wpdis", "dr", "wdr")
IS_FAMILY: tuple[str, ...] = ("is", "wis", "pdis", "wpdis")
MODEL_BASED = frozenset({"dr", "wdr"})
TRAJECTORY = frozenset({"is", "wis"})
SELF_NORMALISED = frozenset({"wis", "wpdis", "wdr"})
INTERVALS: tuple[str, ...] = ("bootstrap", "bca", "t", "bernstein", "hoeffding")
LOWER_BOUNDS = frozenset({"bernstein", "hoeffding"})
#: Estimators with a high-confidence lower bound: non-negative (shifted) terms that clipping can only lower.
BOUNDABLE = frozenset({"is", "pdis"})


@dataclass(frozen=True)
class Estimate:
    """One off-policy estimate of a policy's value, with its interval and diagnostics.

    ``low``/``high`` are None when no interval was requested. For
    ``hoeffding`` and ``bernstein`` the interval is a one-sided lower bound:
    ``high`` is +inf and ``low`` holds with probability ``level``.
    """

    estimator: str
    value: float
    low: float | None
    high: float | None
    interval: str | None  # bootstrap | bca | t | bernstein | hoeffding
    level: float | None
    ess: float  # Kish ESS; see the module docstring for which weights
    n_episodes: int
    identifiable: bool
    reason: str | None = None  # why not identifiable
    warnings: tuple[str, ...] = ()
    gamma: float = 1.0
    clip: float | None = None

    def covers(self, truth: float) -> bool:
        """Whether the interval contains ``truth`` (False without an interval or an identifiable value)."""
        if self.low is None or self.high is None or not self.identifiable:
            return False
        return bool(self.low <= truth <= self.high)

    def as_interval(self) -> Interval:
        """As :class:`evaluation.ground_truth.Interval` (NaN ends without an interval)."""
        from evaluation.ground_truth import Interval  # imports the simulator; only when asked

        nan = float("nan")
        return Interval(self.value, nan if self.low is None else self.low, nan if self.high is None else self.high)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        if not self.identifiable:
            return f"{self.estimator}: not identifiable ({self.reason})"
        text = f"{self.estimator}: {self.value:.3f}"
        if self.low is not None and self.high is not None and self.level is not None:
            text += f" [{self.low:.3f}, {self.high:.3f}] ({self.interval}, {self.level:.0%})"
        return text + f", ESS {self.ess:.1f} of {self.n_episodes}"


@dataclass(frozen=True)
class OPEData:
    """Episodes reduced to what the estimators need, float64, (E, L) unless noted."""

    reward: F64  # 0 on padded steps
    weights: F64  # cumulative, clipped; carried unchanged over padded steps
    discount: F64  # (L,) gamma ** t
    valid: NDArray[np.bool_]
    q_logged: F64 | None  # q_hat at the logged action, 0 on padded steps
    v_hat: F64 | None  # sum_a pi_e(a|s) q_hat(s, a), 0 on padded steps
    gamma: float
    clip: float | None
    clipped_share: float  # share of logged steps whose cumulative weight the clip lowered

    @property
    def n_episodes(self) -> int:
        return int(self.reward.shape[0])


def prepare(
    episodes: Episodes,
    target_probs: NDArray[np.floating],
    *,
    q_hat: NDArray[np.floating] | None = None,
    gamma: float = 1.0,
    clip: float | None = None,
) -> OPEData:
    """Validate the inputs and compute the weights once (shared by every estimator and interval).

    ``target_probs`` is (E, L) (``pi_e`` of the logged action) or (E, L, A)
    (every action, as :func:`~evaluation.ope.weights.target_probabilities`
    returns); ``q_hat`` needs the latter.
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must lie in [0, 1], got {gamma!r}")
    check_episodes(episodes)
    valid = np.asarray(episodes.valid)
    if valid.shape[1] == 0:
        raise ValueError("the episodes have no logged steps")
    probs = check_probabilities(target_probs, episodes)
    # ratios, then cumulative weights, in one (E, L) buffer: at a million steps each temporary costs milliseconds
    weights, over = cumulate_in_place(importance_ratios(take_logged(probs, episodes), episodes), clip)
    n_valid = max(1, int(valid.sum()))
    clipped_share = 0.0 if over is None else float(np.count_nonzero(over & valid)) / n_valid
    reward = np.where(valid, np.asarray(episodes.reward), np.float64(0.0))
    discount = np.power(gamma, np.arange(valid.shape[1], dtype=np.float64))
    q_logged = v_hat = None
    if q_hat is not None:
        if probs.ndim != 3:
            raise ValueError("DR and WDR need the target probabilities of every action, shape (E, L, A), to form "
                             "v_hat = sum_a pi_e(a|s) q_hat(s, a); got probabilities of the logged action only")
        q = np.asarray(q_hat, dtype=np.float64)
        if q.shape != probs.shape:
            raise ValueError(f"q_hat has shape {q.shape}, expected {probs.shape} (one value per step and action)")
        check_rows_sum_to_one(probs, episodes)
        action = np.asarray(episodes.action)
        q_logged = np.where(valid, np.take_along_axis(q, action[..., None], axis=2)[..., 0], 0.0)
        v_hat = np.where(valid, np.einsum("ela,ela->el", probs, q), 0.0)
        bad = valid & ~(np.isfinite(q_logged) & np.isfinite(v_hat))
        if bad.any():
            e, t = (int(i[0]) for i in np.nonzero(bad))
            raise ValueError(f"q_hat is not finite at episode {e} step {t}")
    return OPEData(reward=reward, weights=weights, discount=discount, valid=valid, q_logged=q_logged, v_hat=v_hat,
                   gamma=float(gamma), clip=clip, clipped_share=clipped_share)


def estimator_terms(name: str, data: OPEData) -> RatioTerms:
    """The estimator ``name`` as ratio terms (:mod:`evaluation.ope.terms`): value, bootstrap and jackknife."""
    w, r, g = data.weights, data.reward, data.discount
    length = w.shape[1]
    # einsum rather than ``(w * r) @ g``: no (E, L) temporaries, and no threaded BLAS call for a matrix-vector
    # product, which costs more than the arithmetic at these sizes on a busy machine
    if name == "is":
        return RatioTerms.mean(w[:, -1] * np.einsum("ij,j->i", r, g))
    if name == "wis":
        final = w[:, -1]
        num = (final * np.einsum("ij,j->i", r, g))[:, None]
        return RatioTerms(num, final[:, None], np.array([0], dtype=np.int64))
    if name == "pdis":
        return RatioTerms.mean(np.einsum("ij,ij,j->i", w, r, g))
    if name == "wpdis":
        num = np.multiply(w, r)
        num *= g
        return RatioTerms(num, w, np.arange(length, dtype=np.int64))
    if name not in MODEL_BASED:
        raise ValueError(f"unknown estimator {name!r}; expected one of {', '.join(ESTIMATORS)}")
    if data.q_logged is None or data.v_hat is None:
        raise ValueError(f"{name} needs q_hat, the (E, L, A) Q-values of the target policy (e.g. from FQE)")
    q, v = data.q_logged, data.v_hat
    if name == "dr":
        # sum_t g_t [w_t (r_t - q_t) + w_{t-1} v_t] with w_{-1} = 1
        x = (np.einsum("ij,ij,j->i", w, r, g) - np.einsum("ij,ij,j->i", w, q, g) + g[0] * v[:, 0]
             + np.einsum("ij,ij,j->i", w[:, :-1], v[:, 1:], g[1:]))
        return RatioTerms.mean(x)
    # wdr: sum_t [sum_i w_it g_t (r-q)_it / sum_i w_it + sum_i w_{i,t-1} g_t v_it / sum_i w_{i,t-1}].
    # For t >= 1 the second ratio shares its denominator with step t - 1's first one, so the two merge:
    # one column per step over sum_i w_it, plus mean(v_0) for t = 0. Half the columns, half the bootstrap work.
    per_step = g * (r - q)
    per_step[:, :-1] += g[1:] * v[:, 1:]
    num = np.concatenate([g[0] * v[:, :1], w * per_step], axis=1)
    index = np.concatenate([[-1], np.arange(length)]).astype(np.int64)
    return RatioTerms(num, w, index)


def effective_sample_size(name: str, data: OPEData) -> float:
    """Kish ESS: trajectory weights for IS/WIS, the minimum over steps for per-decision estimators."""
    if name in TRAJECTORY:
        return float(kish_ess(data.weights[:, -1]))
    return float(kish_ess(data.weights, axis=0).min())


def _ess_warnings(ess: float, n: int, min_ess: float, min_ess_fraction: float) -> tuple[str, ...]:
    notes = []
    if ess < min_ess:
        notes.append(f"effective sample size {ess:.1f} < {min_ess:g}: too small to trust")
    if ess < min_ess_fraction * n:
        notes.append(f"effective sample size {ess:.1f} is below {min_ess_fraction:.0%} of the {n} episodes: "
                     "the importance weights are degenerate")
    return tuple(notes)


def _reward_bounds(data: OPEData, reward_range: tuple[float, float] | None) -> tuple[float, float, tuple[str, ...]]:
    observed = data.reward[data.valid]
    notes: tuple[str, ...] = ()
    if reward_range is None:
        low, high = float(observed.min()), float(observed.max())
        notes = (f"reward range [{low:g}, {high:g}] taken from the data; pass reward_range= for a bound that "
                 "holds as stated",)
    else:
        low, high = float(reward_range[0]), float(reward_range[1])
        if not high >= low:
            raise ValueError(f"reward_range must be (low, high) with high >= low, got {reward_range}")
        if observed.min() < low or observed.max() > high:
            raise ValueError(f"logged rewards span [{observed.min():g}, {observed.max():g}], outside "
                             f"reward_range [{low:g}, {high:g}]")
    if not data.valid.all():  # padded steps (episodes that ended early) earn exactly 0
        low, high = min(low, 0.0), max(high, 0.0)
    return low, high, notes


def lower_bound(name: str, data: OPEData, method: str, level: float,
                reward_range: tuple[float, float] | None = None) -> iv.IntervalResult:
    """High-confidence lower bound on ``V(pi_e)`` from IS or PDIS (Thomas et al. 2015, HCOPE).

    Rewards are shifted to be non-negative, ``r' = r - r_min`` (padded steps
    included, whose reward is 0), so the per-episode terms
    ``y_i = w_{i,L-1} G'_i`` (IS) or ``sum_t gamma^t w_it r'_it`` (PDIS) lie in
    ``[0, clip * (r_max - r_min) * sum_t gamma^t]``, and
    ``V = E[y] + r_min * sum_t gamma^t``. The range needs a bound on the
    weights: ``clip``, which HCOPE advises choosing on separate data. Since
    ``y >= 0``, clipping can only lower ``E[y]``, and so can actions the
    behaviour policy never takes, so the bound stays a valid lower bound on
    ``V`` under clipping and imperfect support. ``reward_range`` defaults to
    the observed range (then the guarantee is only approximate; a warning
    says so).
    """
    if name not in BOUNDABLE:
        raise ValueError(f"{method} lower bounds are available for {' and '.join(sorted(BOUNDABLE))} only: "
                         f"{name}'s per-episode terms are not independent non-negative terms whose mean is the "
                         "value (self-normalised, or DR terms that clipping can move either way); use a "
                         "bootstrap or t interval")
    if data.clip is None:
        raise ValueError(f"{method} lower bounds need bounded importance weights: pass clip= (the cap on "
                         "cumulative weights; choose it on separate data, as HCOPE does, or set it to a known "
                         "maximum weight so that it never binds)")
    r_low, r_high, notes = _reward_bounds(data, reward_range)
    shifted = data.reward - r_low  # padded steps too: their reward 0 becomes -r_low >= 0
    horizon = float(data.discount.sum())
    w, g = data.weights, data.discount
    y = w[:, -1] * np.einsum("ij,j->i", shifted, g) if name == "is" else np.einsum("ij,ij,j->i", w, shifted, g)
    upper = data.clip * (r_high - r_low) * horizon
    if upper == 0:  # every reward identical: the value is known exactly
        return iv.IntervalResult(r_low * horizon, float("inf"), method, level, notes)
    bound = (iv.hoeffding_lower if method == "hoeffding" else iv.bernstein_lower)(y, 0.0, upper, level)
    return iv.IntervalResult(bound.low + r_low * horizon, bound.high, method, level, notes + bound.warnings)


def _check_options(names: Sequence[str], interval: str | None, level: float, n_boot: int) -> None:
    unknown = [n for n in names if n not in ESTIMATORS]
    if unknown:
        raise ValueError(f"unknown estimator(s) {unknown}; expected some of {', '.join(ESTIMATORS)}")
    if interval is not None and interval not in INTERVALS:
        raise ValueError(f"unknown interval {interval!r}; expected one of {', '.join(INTERVALS)} or None")
    iv.check_level(level)
    if interval in ("bootstrap", "bca") and n_boot < 2:
        raise ValueError(f"n_boot must be at least 2, got {n_boot}")
    if interval in LOWER_BOUNDS:
        refused = [n for n in names if n not in BOUNDABLE]
        if refused:
            raise ValueError(f"{interval} lower bounds are available for {' and '.join(sorted(BOUNDABLE))} only, "
                             f"not {', '.join(refused)}: self-normalised and DR estimates have no per-episode terms "
                             "with a known range whose mean is the value; use a bootstrap or t interval")


def estimate_all(
    episodes: Episodes,
    target_probs: NDArray[np.floating],
    *,
    names: Iterable[str] | None = None,
    q_hat: NDArray[np.floating] | None = None,
    gamma: float = 1.0,
    clip: float | None = None,
    interval: str | None = None,
    level: float = 0.95,
    n_boot: int = 1000,
    seed: int = 0,
    reward_range: tuple[float, float] | None = None,
    min_ess: float = 30.0,
    min_ess_fraction: float = 0.01,
) -> dict[str, Estimate]:
    """Several estimators on the same data: weights computed once, bootstrap resamples shared.

    ``names`` defaults to IS, WIS, PDIS, WPDIS, plus DR and WDR when ``q_hat``
    is given (IS and PDIS only for the Hoeffding and Bernstein lower bounds).
    See :func:`estimate` for the other arguments.
    """
    if names is not None:
        chosen = tuple(names)
    elif interval in LOWER_BOUNDS:
        chosen = ("is", "pdis")
    else:
        chosen = IS_FAMILY + (("dr", "wdr") if q_hat is not None else ())
    _check_options(chosen, interval, level, n_boot)
    if q_hat is None and any(n in MODEL_BASED for n in chosen):
        raise ValueError("dr and wdr need q_hat, the (E, L, A) Q-values of the target policy (e.g. from FQE)")
    data = prepare(episodes, target_probs, q_hat=q_hat, gamma=gamma, clip=clip)
    n = data.n_episodes
    if interval is not None and n < 2:
        raise ValueError(f"an interval needs at least 2 episodes, got {n}")
    identifiable = bool((data.weights[:, -1] > 0).any())
    reason = None if identifiable else (
        "no logged episode has a non-zero importance weight: the target policy never takes the logged actions "
        "(no overlap with the behaviour policy), so the data say nothing about its value")
    clip_note = (f"clip={clip:g} lowered {data.clipped_share:.1%} of the cumulative weights (biased estimate)",) \
        if clip is not None and data.clipped_share > 0 else ()

    terms = {name: estimator_terms(name, data) for name in chosen}
    values = {name: terms[name].value() for name in chosen}
    results: dict[str, iv.IntervalResult] = {}
    if identifiable and interval in ("bootstrap", "bca"):
        boot = dict(zip(chosen, iv.bootstrap_values([terms[k] for k in chosen], n_boot, seed), strict=True))
        for name in chosen:
            results[name] = (iv.percentile_interval(boot[name], level) if interval == "bootstrap"
                             else iv.bca_interval(boot[name], values[name], terms[name].jackknife(), level))
    elif identifiable and interval == "t":
        results = {name: iv.t_interval(terms[name], level, values[name]) for name in chosen}
    elif identifiable and interval in LOWER_BOUNDS:
        results = {name: lower_bound(name, data, interval, level, reward_range) for name in chosen}

    out = {}
    for name in chosen:
        ess = effective_sample_size(name, data)
        notes = ((reason,) if reason else ()) + _ess_warnings(ess, n, min_ess, min_ess_fraction) + clip_note
        low = high = None
        if interval is not None:
            low, high = (results[name].low, results[name].high) if identifiable else (float("nan"), float("nan"))
            notes += results[name].warnings if identifiable else ()
        out[name] = Estimate(
            estimator=name, value=values[name] if identifiable else float("nan"), low=low, high=high,
            interval=interval, level=level if interval is not None else None, ess=ess, n_episodes=n,
            identifiable=identifiable, reason=reason, warnings=notes, gamma=data.gamma, clip=clip)
    return out


def estimate(
    name: str,
    episodes: Episodes,
    target_probs: NDArray[np.floating],
    *,
    q_hat: NDArray[np.floating] | None = None,
    gamma: float = 1.0,
    clip: float | None = None,
    interval: str | None = None,
    level: float = 0.95,
    n_boot: int = 1000,
    seed: int = 0,
    reward_range: tuple[float, float] | None = None,
    min_ess: float = 30.0,
    min_ess_fraction: float = 0.01,
) -> Estimate:
    """Estimate the value of the target policy with one estimator, optionally with an interval.

    Args:
        name: ``is``, ``wis``, ``pdis``, ``wpdis``, ``dr`` or ``wdr`` (module docstring).
        episodes: logged, padded episodes with behaviour probabilities.
        target_probs: ``pi_e`` of the logged action (E, L) or of every action (E, L, A).
        q_hat: (E, L, A) Q-values of the target policy; required by ``dr`` and ``wdr``.
        gamma: discount in [0, 1]; 1 gives the expected total reward over the logged horizon.
        clip: cap on the cumulative importance weight ``w_t`` (every step, every estimator).
        interval: ``bootstrap`` (percentile), ``bca``, ``t``, ``bernstein`` or ``hoeffding``
            (one-sided lower bounds, IS and PDIS only, need ``clip``), or None.
        level: confidence level of the interval or bound.
        n_boot, seed: bootstrap resamples and their seed (same seed, same interval).
        reward_range: (min, max) per-step reward for the lower bounds; default the observed range.
        min_ess, min_ess_fraction: a warning is attached when the ESS is below either.
    """
    return estimate_all(episodes, target_probs, names=(name,), q_hat=q_hat, gamma=gamma, clip=clip,
                        interval=interval, level=level, n_boot=n_boot, seed=seed, reward_range=reward_range,
                        min_ess=min_ess, min_ess_fraction=min_ess_fraction)[name]


__all__ = ["ESTIMATORS", "INTERVALS", "Estimate", "OPEData", "estimate", "estimate_all", "estimator_terms",
           "lower_bound", "prepare"]
