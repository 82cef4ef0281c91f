"""The Policy protocol every part of carepath speaks.

A policy maps observations (rows in ``envs.spec.FEATURE_NAMES`` order) and
action masks to a probability for each action. Probabilities of blocked
actions are exactly zero: :func:`restrict_to_mask` is the one place that
enforces it, and every policy's ``action_probs`` goes through it.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray

from envs.spec import N_ACTIONS, N_FEATURES

FloatArray = NDArray[np.float64]
BoolArray = NDArray[np.bool_]
IntArray = NDArray[np.int64]


@runtime_checkable
class Policy(Protocol):
    """Anything with a name and ``action_probs(obs, mask) -> (n, n_actions)``."""

    name: str

    def action_probs(self, obs: NDArray[np.floating], mask: BoolArray) -> FloatArray:
        """Probability of each action, rows summing to 1, zero where ``mask`` is false."""
        ...


def check_inputs(obs: NDArray[np.floating], mask: BoolArray) -> tuple[NDArray[np.floating], BoolArray]:
    """Validate shapes, with an error that says what was expected."""
    obs = np.asarray(obs)
    mask = np.asarray(mask, dtype=bool)
    if obs.ndim == 1:
        obs = obs[None, :]
    if mask.ndim == 1:
        mask = mask[None, :]
    if obs.ndim != 2 or obs.shape[1] != N_FEATURES:
        raise ValueError(f"observations must have shape (n, {N_FEATURES}), got {obs.shape}")
    if mask.shape != (obs.shape[0], N_ACTIONS):
        raise ValueError(f"action mask must have shape ({obs.shape[0]}, {N_ACTIONS}), got {mask.shape}")
    if not mask.any(axis=1).all():
        row = int(np.flatnonzero(~mask.any(axis=1))[0])
        raise ValueError(f"action mask row {row} allows no action")
    return obs, mask


def restrict_to_mask(probs: FloatArray, mask: BoolArray) -> FloatArray:
    """Zero the blocked actions and renormalise; rows with no mass left become
    uniform over the allowed actions."""
    p = np.where(mask, np.clip(probs, 0.0, None), 0.0)
    total = p.sum(axis=1, keepdims=True)
    uniform = mask / mask.sum(axis=1, keepdims=True)
    return np.where(total > 0, p / np.where(total > 0, total, 1.0), uniform)


def mix_epsilon(probs: FloatArray, mask: BoolArray, epsilon: float) -> FloatArray:
    """(1 - epsilon) * policy + epsilon * uniform over allowed actions."""
    if not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"epsilon must be in [0, 1], got {epsilon}")
    if epsilon == 0.0:
        return probs
    uniform = mask / mask.sum(axis=1, keepdims=True)
    return (1.0 - epsilon) * probs + epsilon * uniform


def greedy_actions(policy: Policy, obs: NDArray[np.floating], mask: BoolArray) -> IntArray:
    """Most probable allowed action per row (ties: lowest index)."""
    probs = np.where(mask, policy.action_probs(obs, mask), -1.0)
    return probs.argmax(axis=1).astype(np.int64)


def sample_actions(
    policy: Policy, obs: NDArray[np.floating], mask: BoolArray, rng: np.random.Generator
) -> tuple[IntArray, FloatArray]:
    """Sample one action per row; returns the actions and the probability of each."""
    probs = policy.action_probs(obs, mask)
    cumulative = probs.cumsum(axis=1)
    u = rng.random((len(probs), 1)) * cumulative[:, -1:]
    actions = (u >= cumulative).sum(axis=1)
    # guard against float round-off at the top end and never land on a blocked action
    actions = np.minimum(actions, N_ACTIONS - 1)
    chosen_p = probs[np.arange(len(probs)), actions]
    bad = chosen_p <= 0
    if bad.any():
        actions[bad] = probs[bad].argmax(axis=1)
        chosen_p = probs[np.arange(len(probs)), actions]
    return actions.astype(np.int64), chosen_p
