"""A doubly robust paired difference for remission: the importance weights with a control variate.

Trajectory importance sampling multiplies 26 weekly ratios, and its variance grows with
every week the candidate departs from current care. The doubly robust estimator (Jiang &
Li 2016; for a terminal 0/1 outcome ``Y``) subtracts what a model of the outcome already
predicts, step by step:

    DR_i = w_{T-1} Y_i + sum_t (w_{t-1} v_t - w_t q_t(a_t)),   v_t = sum_a pi_c(a | s_t) q_t(a)

with ``w_t`` the cumulative weight up to step ``t`` (``w_{-1} = 1``) and ``q_t(a)`` a model of
``P(Y = 1 | s_t, a)``. It is unbiased for any ``q`` when the weights are exact (no truncation
here), and its variance is small where ``q`` is good. ``q`` is fitted on the selection half
only (a logistic regression of the episode's outcome on the week's observation and action,
under current care), so the safety half stays untouched. The paired difference is
``d_i = DR_i - Y_i``; its bound is the one-sided Student t (the terms have no known range).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from offline_data.dataset import Episodes

F64 = NDArray[np.float64]
#: Rows the outcome model is fitted on at most (a random sample of logged weeks).
MAX_FIT_ROWS = 200_000


class OutcomeModel:
    """``q(s, a)``: the probability of remission at the end given this week's observation and action."""

    def __init__(self, episodes: Episodes, outcome: F64, seed: int = 0) -> None:
        valid = np.asarray(episodes.valid)
        rows = np.flatnonzero(valid.ravel())
        if len(rows) > MAX_FIT_ROWS:
            rows = np.sort(np.random.default_rng(seed).choice(rows, MAX_FIT_ROWS, replace=False))
        obs = episodes.obs.reshape(-1, episodes.obs.shape[-1])[rows]
        action = episodes.action.ravel()[rows]
        y = np.repeat(outcome[:, None], valid.shape[1], axis=1).ravel()[rows]
        self.n_actions = episodes.mask.shape[-1]
        self.scaler = StandardScaler().fit(obs)
        self.model = LogisticRegression(C=1.0, max_iter=300)
        if len(np.unique(y)) < 2:  # every episode the same: a constant model
            self.constant: float | None = float(y.mean()) if len(y) else 0.0
        else:
            self.constant = None
            self.model.fit(self._design(obs, action), y)

    def _design(self, obs: NDArray[np.floating], action: NDArray[np.integer]) -> F64:
        onehot = np.zeros((len(action), self.n_actions))
        onehot[np.arange(len(action)), action] = 1.0
        return np.hstack([self.scaler.transform(obs), onehot])

    def predict_all(self, episodes: Episodes) -> F64:
        """``q`` for every action on every logged step, (E, L, A); 0 on padded steps."""
        valid = np.asarray(episodes.valid)
        out = np.zeros((*valid.shape, self.n_actions))
        obs = episodes.obs[valid]
        for a in range(self.n_actions):
            if self.constant is not None:
                out[valid, a] = self.constant
            else:
                out[valid, a] = self.model.predict_proba(self._design(obs, np.full(len(obs), a)))[:, 1]
        return out


def dr_differences(probs: F64, episodes: Episodes, outcome: F64, q_all: F64) -> F64:
    """``d_i = DR_i - Y_i`` per episode (see the module docstring); padded steps contribute nothing."""
    valid = np.asarray(episodes.valid)
    chosen = np.take_along_axis(probs, episodes.action[..., None], axis=2)[..., 0]
    ratio = np.where(valid, chosen / np.where(valid, episodes.behavior_prob, 1.0), 1.0)
    w = np.cumprod(ratio, axis=1)
    w_before = np.concatenate([np.ones((len(w), 1)), w[:, :-1]], axis=1)
    q_taken = np.take_along_axis(q_all, episodes.action[..., None], axis=2)[..., 0]
    v = (probs * q_all).sum(axis=2)
    control = np.where(valid, w_before * v - w * q_taken, 0.0).sum(axis=1)
    last = np.maximum(episodes.lengths - 1, 0)
    w_last = w[np.arange(len(w)), last]
    return np.asarray(w_last * outcome + control - outcome, dtype=np.float64)


__all__ = ["OutcomeModel", "dr_differences"]
