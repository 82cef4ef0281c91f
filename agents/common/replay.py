"""Logged transitions held as tensors, sampled by vectorised indexing.

A third of a popular offline library's update time is Python-side batch
sampling; here a batch is one ``torch.randint`` and one gather per array.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray


@dataclass(frozen=True)
class Batch:
    obs: torch.Tensor  # (b, n_features) float32
    actions: torch.Tensor  # (b,) int64
    rewards: torch.Tensor  # (b,) float32
    next_obs: torch.Tensor  # (b, n_features) float32
    dones: torch.Tensor  # (b,) float32: 1 where the episode ended (terminated, not truncated)
    masks: torch.Tensor  # (b, n_actions) bool: allowed at obs
    next_masks: torch.Tensor  # (b, n_actions) bool: allowed at next_obs


class TensorReplay:
    """All transitions on one device; ``sample`` draws a uniform batch with replacement.

    ``feature_names`` and ``action_names`` name the observation columns and the actions (default
    ``feature_0``, ... and ``action_0``, ...): agents take their sizes and the names their bundles
    record from here, so they learn from any logged data; serving refuses a bundle whose names
    are not the ones it serves."""

    def __init__(
        self,
        obs: NDArray[np.floating],
        actions: NDArray[np.integer],
        rewards: NDArray[np.floating],
        next_obs: NDArray[np.floating],
        dones: NDArray[np.bool_] | NDArray[np.floating],
        masks: NDArray[np.bool_],
        next_masks: NDArray[np.bool_],
        device: torch.device | str = "cpu",
        seed: int = 0,
        feature_names: Sequence[str] | None = None,
        action_names: Sequence[str] | None = None,
    ) -> None:
        n = len(obs)
        for name, arr in (("actions", actions), ("rewards", rewards), ("next_obs", next_obs), ("dones", dones),
                          ("masks", masks), ("next_masks", next_masks)):
            if len(arr) != n:
                raise ValueError(f"transitions: {name} has {len(arr)} rows, obs has {n}")
        if n == 0:
            raise ValueError("transitions: no data to learn from")
        n_features, n_actions = np.shape(obs)[1], np.shape(masks)[1]
        self.feature_names = tuple(feature_names) if feature_names is not None else tuple(
            f"feature_{i}" for i in range(n_features))
        self.action_names = tuple(action_names) if action_names is not None else tuple(
            f"action_{j}" for j in range(n_actions))
        if len(self.feature_names) != n_features or len(self.action_names) != n_actions:
            raise ValueError(f"transitions: {len(self.feature_names)} feature names for {n_features} columns, "
                             f"{len(self.action_names)} action names for {n_actions} actions")
        masks = np.asarray(masks, dtype=bool)
        actions = np.asarray(actions, dtype=np.int64)
        if not masks[np.arange(n), actions].all():
            bad = int(np.flatnonzero(~masks[np.arange(n), actions])[0])
            raise ValueError(f"transitions: row {bad} logs action {actions[bad]}, which its mask blocks")
        self.device = torch.device(device)
        self.n = n

        def t(x: NDArray[np.generic], dtype: torch.dtype) -> torch.Tensor:
            return torch.as_tensor(np.ascontiguousarray(x)).to(self.device, dtype)

        self.obs = t(obs, torch.float32)
        self.actions = t(actions, torch.int64)
        self.rewards = t(rewards, torch.float32)
        self.next_obs = t(next_obs, torch.float32)
        self.dones = t(np.asarray(dones, dtype=np.float32), torch.float32)
        self.masks = t(masks, torch.bool)
        self.next_masks = t(np.asarray(next_masks, dtype=bool), torch.bool)
        # terminal transitions may have an all-false next mask; allow "continue" there so
        # max over the next state's actions stays finite (its value is zeroed by done anyway)
        empty = ~self.next_masks.any(dim=1)
        self.next_masks[empty, 0] = True
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        # Every column of a transition in one row, so that a batch is one gather instead of
        # seven (sampling was a sixth of an update). Observations, rewards and dones become
        # views into it (held once); actions and masks keep their integer and bool copies,
        # which callers index directly and which are small.
        f, a = self.obs.shape[1], self.masks.shape[1]
        self._packed = torch.cat([self.obs, self.next_obs, self.rewards[:, None], self.dones[:, None],
                                  self.actions[:, None].to(torch.float32), self.masks.to(torch.float32),
                                  self.next_masks.to(torch.float32)], dim=1)
        self.obs, self.next_obs = self._packed[:, :f], self._packed[:, f:2 * f]
        self.rewards, self.dones = self._packed[:, 2 * f], self._packed[:, 2 * f + 1]
        self._columns = (f, a)

    def sample(self, batch_size: int) -> Batch:
        idx = torch.randint(self.n, (batch_size,), device=self.device, generator=self.generator)
        return self.rows(idx)

    def rows(self, idx: torch.Tensor) -> Batch:
        """The transitions at ``idx`` (any shape: a batched sweep stacks its members' batches)."""
        rows = self._packed[idx]
        f, a = self._columns
        return Batch(rows[..., :f], rows[..., 2 * f + 2].to(torch.int64), rows[..., 2 * f], rows[..., f:2 * f],
                     rows[..., 2 * f + 1], rows[..., 2 * f + 3:2 * f + 3 + a] > 0.5, rows[..., 2 * f + 3 + a:] > 0.5)

    def obs_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard deviation of observations, for the network's normalisation."""
        return self.obs.mean(dim=0), self.obs.std(dim=0)


def masked_max(q: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """max over allowed actions: the bootstrap target never uses a blocked action."""
    return q.masked_fill(~mask, float("-inf")).max(dim=1).values


def masked_logsumexp(q: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(q.masked_fill(~mask, float("-inf")), dim=1)


def masked_argmax(q: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return q.masked_fill(~mask, float("-inf")).argmax(dim=1)


def replay_from_transitions(transitions: object, device: torch.device | str = "cpu", seed: int = 0) -> TensorReplay:
    """A :class:`TensorReplay` from ``offline_data``'s ``Transitions`` (obs, action, reward,
    next_obs, done, mask, next_mask)."""
    t: Any = transitions
    return TensorReplay(t.obs, t.action, t.reward, t.next_obs, t.done, t.mask, t.next_mask, device=device, seed=seed,
                        feature_names=getattr(t, "feature_names", None), action_names=getattr(t, "action_names", None))
