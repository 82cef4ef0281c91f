"""A synthetic logged-data problem with known policy values, for tests and benchmarks.

Every week a patient is in one of ``S`` states, drawn afresh and uniformly
(observed as ``obs[..., 0]``); the logged action follows ``behavior[s]``; the
reward is Bernoulli(``mu[s, a]``), so it lies in [0, 1]; after each week the
episode continues with probability ``p_continue`` up to ``horizon`` weeks,
independently of the actions. Because the states do not depend on the actions,
the value of any state-based policy ``pi`` (S, A) is known in closed form:

    V(pi) = vbar * sum_{t < H} (gamma * p_continue)^t,   vbar = mean_s sum_a pi[s, a] mu[s, a]

and so is its Q-function on every step, which gives DR an exact ``q_hat``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from offline_data.dataset import Episodes

F64 = NDArray[np.float64]


def _as_table(probs: NDArray[np.floating], shape: tuple[int, int], what: str) -> F64:
    table = np.asarray(probs, dtype=np.float64)
    if table.shape != shape or (table < 0).any() or not np.allclose(table.sum(axis=1), 1.0):
        raise ValueError(f"{what} must be an {shape} table of probabilities with rows summing to 1")
    return table


@dataclass(frozen=True)
class SyntheticProblem:
    mu: F64  # (S, A) mean reward
    behavior: F64  # (S, A) logging policy
    horizon: int
    p_continue: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "behavior", _as_table(self.behavior, self.mu.shape, "behavior"))
        if not 0.0 <= self.p_continue <= 1.0 or self.horizon < 1:
            raise ValueError("p_continue must lie in [0, 1] and horizon be at least 1")

    @property
    def n_states(self) -> int:
        return int(self.mu.shape[0])

    @property
    def n_actions(self) -> int:
        return int(self.mu.shape[1])

    def sample(self, n: int, seed: int = 0) -> Episodes:
        """``n`` logged episodes, padded to ``horizon``, fully vectorised."""
        rng = np.random.default_rng(seed)
        h, a = self.horizon, self.n_actions
        state = rng.integers(0, self.n_states, size=(n, h))
        cumulative = np.cumsum(self.behavior, axis=1)[state]  # (n, h, A)
        action = np.minimum((rng.random((n, h, 1)) >= cumulative).sum(axis=2), a - 1)
        # never land on a zero-probability action through round-off at the top end
        action = np.where(self.behavior[state, action] > 0, action, self.behavior[state].argmax(axis=2))
        reward = (rng.random((n, h)) < self.mu[state, action]).astype(np.float32)
        if self.p_continue < 1.0:
            lengths = np.minimum(rng.geometric(1.0 - self.p_continue, size=n), h) if self.p_continue > 0 \
                else np.ones(n, dtype=np.int64)
        else:
            lengths = np.full(n, h)
        valid = np.arange(h) < lengths[:, None]
        last = valid & (np.arange(h) == lengths[:, None] - 1)
        return Episodes(
            obs=np.where(valid, state, 0).astype(np.float32)[..., None],
            action=np.where(valid, action, 0).astype(np.int64),
            reward=np.where(valid, reward, 0).astype(np.float32),
            mask=np.broadcast_to(valid[..., None], (n, h, a)).copy(),
            behavior_prob=np.where(valid, self.behavior[state, action], 1.0).astype(np.float32),
            terminated=last & (lengths[:, None] < h),
            truncated=last & (lengths[:, None] == h),
            t=np.where(valid, np.arange(h), -1).astype(np.int64),
            valid=valid,
            lengths=lengths.astype(np.int64),
            patient_id=np.char.add("p", np.arange(n).astype(str)).astype(object),
            episode_id=np.arange(n, dtype=np.int64),
        )

    def target_probs(self, episodes: Episodes, pi: NDArray[np.floating]) -> F64:
        """``pi[s_t]`` on every valid step, (E, L, A), zeros on padded steps."""
        table = _as_table(pi, self.mu.shape, "pi")
        state = episodes.obs[..., 0].astype(np.int64)
        return np.where(episodes.valid[..., None], table[state], 0.0)

    def _discounted_horizon(self, gamma: float, start: int = 0) -> F64:
        """``sum_{k=t}^{H-1} (gamma p)^(k-t)`` for each t >= start."""
        factor = gamma * self.p_continue
        remaining = self.horizon - np.arange(start, self.horizon)
        return np.array([float(np.sum(factor ** np.arange(m))) for m in remaining])

    def true_value(self, pi: NDArray[np.floating], gamma: float = 1.0) -> float:
        table = _as_table(pi, self.mu.shape, "pi")
        vbar = float((table * self.mu).sum(axis=1).mean())
        return vbar * float(self._discounted_horizon(gamma)[0])

    def true_q(self, episodes: Episodes, pi: NDArray[np.floating], gamma: float = 1.0) -> F64:
        """Exact ``Q^pi(s_t, a)`` on every valid step, (E, L, A): ``mu[s_t, a]`` plus the discounted future."""
        table = _as_table(pi, self.mu.shape, "pi")
        vbar = float((table * self.mu).sum(axis=1).mean())
        future = vbar * (self._discounted_horizon(gamma) - 1.0)  # value of steps t+1.. given alive at t
        state = episodes.obs[..., 0].astype(np.int64)
        length = episodes.valid.shape[1]
        q = self.mu[state] + future[:length, None]
        return np.where(episodes.valid[..., None], q, 0.0)


@dataclass
class TablePolicy:
    """A :class:`~policies.base.Policy` over the synthetic states: ``pi[int(obs[:, 0])]``, restricted to the mask."""

    name: str
    table: F64

    def action_probs(self, obs: NDArray[np.floating], mask: NDArray[np.bool_]) -> F64:
        p = np.where(mask, self.table[np.asarray(obs)[:, 0].astype(np.int64)], 0.0)
        return p / p.sum(axis=1, keepdims=True)


__all__ = ["SyntheticProblem", "TablePolicy"]
