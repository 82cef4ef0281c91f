"""Target-policy probabilities, importance ratios and cumulative weights.

Conventions (those of :class:`offline_data.dataset.Episodes`):

- arrays are padded (E, L); padded steps have ``valid`` false, reward 0 and
  behaviour probability 1. Here the target probability of the logged action
  is also set to 1 on padded steps, so the per-step ratio there is exactly 1
  and an episode that ended keeps its last cumulative weight. This is the
  usual "absorbing state with zero reward" padding of per-decision estimators
  (e.g. Thomas 2015, PhD thesis "Safe reinforcement learning"): it keeps
  WPDIS and WDR exact for episodes of different lengths.
- ``rho_t = pi_e(a_t | s_t) / pi_b(a_t | s_t)``; the cumulative weight is
  ``w_t = prod_{k <= t} rho_k``.
- Clipping caps the *cumulative* weight, ``w_t <- min(w_t, clip)``
  (truncated importance sampling, Ionides 2008, "Truncated importance
  sampling", J. Comput. Graph. Stat. 17(2)). Capping the product, not each
  ratio, is what bounds every per-episode term (a per-step cap ``c`` still
  allows ``c ** L``), so the clip is also the weight bound that the
  Hoeffding and Bernstein lower bounds use. It is applied to every step's
  cumulative weight, i.e. the same way in all six estimators.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

if TYPE_CHECKING:  # policies/__init__ imports torch; the estimators never need it at run time
    from offline_data.dataset import Episodes
    from policies.base import Policy

F64 = NDArray[np.float64]

#: Slack allowed on probabilities (float32 round-off of logged probabilities and policy outputs).
PROB_TOL = 1e-6
#: Slack on a row of target probabilities summing to 1.
SUM_TOL = 1e-4


def _where(index: tuple[NDArray[np.intp], ...]) -> str:
    """'episode 3 step 1' (and 'action 2') for the first offending entry."""
    names = ("episode", "step", "action")
    return " ".join(f"{name} {int(i[0])}" for name, i in zip(names, index, strict=False))


def check_episodes(episodes: Episodes) -> None:
    """Shapes agree and the logged behaviour probabilities and rewards are usable.

    Raises ``ValueError`` naming the field and the first offending episode and step.
    """
    valid = np.asarray(episodes.valid)
    if valid.ndim != 2 or valid.dtype != np.bool_:
        raise ValueError(f"episodes.valid must be a boolean (E, L) array, got {valid.dtype} {valid.shape}")
    shape = valid.shape
    if shape[0] == 0:
        raise ValueError("no episodes: off-policy estimates need at least one logged episode")
    for name in ("action", "reward", "behavior_prob"):
        got = np.shape(getattr(episodes, name))
        if got != shape:
            raise ValueError(f"episodes.{name} has shape {got}, expected {shape} (the shape of episodes.valid)")
    if np.shape(episodes.lengths) != (shape[0],):
        raise ValueError(f"episodes.lengths has shape {np.shape(episodes.lengths)}, expected ({shape[0]},)")
    mask_shape = np.shape(episodes.mask)
    if len(mask_shape) != 3 or mask_shape[:2] != shape:
        raise ValueError(f"episodes.mask has shape {mask_shape}, expected {(*shape, 'n_actions')}")
    bp = np.asarray(episodes.behavior_prob)
    if not (bp.min() > 0 and bp.max() <= 1 + PROB_TOL):  # padded steps hold 1, so this is the common case
        bad = valid & ~((bp > 0) & (bp <= 1 + PROB_TOL))  # also catches NaN
        if bad.any():
            at = np.nonzero(bad)
            value = float(bp[at[0][0], at[1][0]])
            why = ("is 0: the logged action could not have been taken under the behaviour policy, so importance "
                   "ratios are undefined (re-estimate the behaviour policy or drop these steps)") if value == 0 \
                else "must lie in (0, 1]"
            raise ValueError(f"episodes.behavior_prob {why}; got {value!r} at {_where(at)} "
                             f"({int(bad.sum())} logged step(s) affected)")
    reward = np.asarray(episodes.reward)
    if not np.isfinite(reward).all():
        bad = valid & ~np.isfinite(reward)
        if bad.any():
            raise ValueError(f"episodes.reward is not finite at {_where(np.nonzero(bad))}")


def n_actions(episodes: Episodes) -> int:
    return int(np.shape(episodes.mask)[2])


def check_probabilities(probs: NDArray[np.floating], episodes: Episodes, what: str = "target probabilities") -> F64:
    """Validate target probabilities: (E, L) of the logged action or (E, L, A) of every action.

    Entries must be finite and in [0, 1] (on valid steps for (E, L); everywhere
    for (E, L, A), where padded steps should hold zeros). Returns float64.
    """
    p = np.asarray(probs, dtype=np.float64)
    shape = np.shape(episodes.valid)
    full = (*shape, n_actions(episodes))
    if p.shape not in (shape, full):
        raise ValueError(f"{what} have shape {p.shape}; expected {shape} (probability of the logged action) "
                         f"or {full} (every action) to match the episodes")
    if p.min() >= 0 and p.max() <= 1 + PROB_TOL:  # the common case, without a boolean array
        return p
    bad = ~((p >= 0) & (p <= 1 + PROB_TOL))  # also catches NaN
    if p.ndim == 2:  # only logged steps matter
        bad &= np.asarray(episodes.valid)
    if bad.any():
        at = np.nonzero(bad)
        raise ValueError(f"{what} must lie in [0, 1]; got {float(p[tuple(i[0] for i in at)])!r} at {_where(at)}")
    return p


def check_rows_sum_to_one(probs: F64, episodes: Episodes, what: str = "target probabilities") -> None:
    """Every valid step's (E, L, A) row sums to 1 (needed wherever ``sum_a pi(a|s) Q(s, a)`` is formed)."""
    bad = np.asarray(episodes.valid) & (np.abs(probs.sum(axis=2) - 1.0) > SUM_TOL)
    if bad.any():
        at = np.nonzero(bad)
        total = float(probs[at[0][0], at[1][0]].sum())
        raise ValueError(f"{what} must sum to 1 over actions on every logged step; got {total:.6g} at {_where(at)}")


def target_probabilities(policy: Policy, episodes: Episodes) -> F64:
    """``pi_e(a | s_t)`` for every action on every step, (E, L, A), zeros on padded steps.

    The policy is called once, on all valid steps together (``obs[valid]``,
    ``mask[valid]``), so a vectorised policy costs one batched forward pass.
    """
    check_episodes(episodes)
    valid = np.asarray(episodes.valid)
    e, length = valid.shape
    a = n_actions(episodes)
    out = np.zeros((e, length, a))
    if not valid.any():
        return out
    probs = np.asarray(policy.action_probs(episodes.obs[valid], episodes.mask[valid]), dtype=np.float64)
    name = getattr(policy, "name", type(policy).__name__)
    if probs.shape != (int(valid.sum()), a):
        raise ValueError(f"policy {name!r} returned probabilities of shape {probs.shape}, "
                         f"expected ({int(valid.sum())}, {a})")
    out[valid] = probs
    check_probabilities(out, episodes, f"probabilities of policy {name!r}")
    check_rows_sum_to_one(out, episodes, f"probabilities of policy {name!r}")
    return out


def take_logged(p: F64, episodes: Episodes) -> F64:
    """(E, L) probabilities of the logged action from validated (E, L) or (E, L, A) ones (padded steps as given)."""
    if p.ndim == 2:
        return p
    action = np.asarray(episodes.action)
    if action.min() < 0 or action.max() >= p.shape[2]:
        raise ValueError(f"episodes.action must lie in [0, {p.shape[2]}), got values in "
                         f"[{int(action.min())}, {int(action.max())}]")
    return np.take_along_axis(p, action[..., None], axis=2)[..., 0]


def logged_action_probs(probs: NDArray[np.floating], episodes: Episodes) -> F64:
    """``pi_e(a_t | s_t)`` of the logged action, (E, L), 1 on padded steps (so their ratio is 1).

    Accepts (E, L, A) probabilities of every action or (E, L) ones already
    taken at the logged action; validates either.
    """
    return np.where(np.asarray(episodes.valid), take_logged(check_probabilities(probs, episodes), episodes), 1.0)


def importance_ratios(pi_logged: NDArray[np.floating], episodes: Episodes) -> F64:
    """Per-step ratios ``rho_t = pi_e(a_t|s_t) / pi_b(a_t|s_t)``, (E, L), 1 on padded steps.

    ``pi_logged`` is the target probability of the logged action; its padded entries are ignored.
    """
    rho = np.ones(np.shape(episodes.valid))
    np.divide(pi_logged, episodes.behavior_prob, out=rho, where=np.asarray(episodes.valid))
    return rho


def cumulate_in_place(rho: F64, clip: float | None) -> tuple[F64, NDArray[np.bool_] | None]:
    """Turn ratios into capped cumulative weights in place; also where the cap lowered them (None without one)."""
    if clip is not None and not clip > 0:
        raise ValueError(f"clip must be a positive weight cap, got {clip!r}")
    np.cumprod(rho, axis=1, out=rho)
    over = None
    if clip is not None:
        over = rho > clip
        rho[over] = clip  # an overflowed (infinite) product becomes the cap, as it should
    if not np.isfinite(rho).all():
        raise ValueError("importance weights overflow (a product of ratios is infinite); pass clip= to cap them")
    return rho, over


def cumulative_weights(rho: NDArray[np.floating], clip: float | None = None) -> F64:
    """``w_t = min(prod_{k <= t} rho_k, clip)`` (E, L); see the module docstring for why the product is capped."""
    return cumulate_in_place(np.array(rho, dtype=np.float64), clip)[0]


def kish_ess(weights: NDArray[np.floating], axis: int = 0) -> F64:
    """Kish effective sample size ``(sum w)^2 / sum w^2`` along ``axis`` (0 where every weight is 0)."""
    w = np.moveaxis(np.asarray(weights, dtype=np.float64), axis, 0)
    total = w.sum(axis=0)
    squares = np.einsum("i...,i...->...", w, w)  # no (E, L) temporary
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.asarray(np.where(squares > 0, np.square(total) / np.where(squares > 0, squares, 1.0), 0.0))


__all__ = ["check_episodes", "check_probabilities", "cumulative_weights", "importance_ratios", "kish_ess",
           "logged_action_probs", "target_probabilities"]
