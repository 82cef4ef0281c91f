"""A native batched ``VectorEnv``: ``num_envs`` patients stepped in one kernel call.

Autoreset follows Gymnasium 1.x's next-step mode: the step after a patient's
episode ends starts a new patient in that slot, ignores its action and
returns the new patient's first observation with zero reward.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from gymnasium import spaces
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space
from numpy.typing import NDArray

from envs import dynamics as D
from envs.env import build_settings, observation_space
from envs.params import SimParams
from envs.spec import ACTION_NAMES, FEATURE_NAMES, N_ACTIONS


class CarePathVectorEnv(VectorEnv[NDArray[np.float32], NDArray[np.int64], NDArray[Any]]):
    """``num_envs`` independent patients; the kwargs are those of :class:`envs.env.CarePathEnv`."""

    metadata = {"render_modes": [], "autoreset_mode": AutoresetMode.NEXT_STEP}  # noqa: RUF012 - Gymnasium declares it a plain dict
    feature_names: ClassVar[list[str]] = list(FEATURE_NAMES)
    action_names: ClassVar[list[str]] = list(ACTION_NAMES)

    def __init__(
        self,
        num_envs: int = 1,
        params: SimParams | None = None,
        params_path: str | Path | None = None,
        param_overrides: dict[str, Any] | None = None,
        render_mode: str | None = None,
        **settings: Any,
    ) -> None:
        if not isinstance(num_envs, int) or num_envs < 1:
            raise ValueError(f"num_envs must be a positive integer, got {num_envs!r}")
        if render_mode is not None:
            raise ValueError("the vector environment does not render; use CarePathEnv(render_mode='ansi')")
        self.num_envs = num_envs
        self.render_mode = None
        self.params, self.settings = build_settings(params, params_path, param_overrides, settings)
        self._k = D.kernel_params(self.params, self.settings)
        self.single_observation_space = observation_space()
        self.single_action_space = spaces.Discrete(N_ACTIONS)
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self._state: NDArray[np.float64] | None = None
        self._mask = np.ones((num_envs, N_ACTIONS), dtype=bool)
        self._prev_done = np.zeros(num_envs, dtype=bool)

    def reset(
        self, *, seed: int | list[int] | None = None, options: dict[str, Any] | None = None
    ) -> tuple[NDArray[np.float32], dict[str, Any]]:
        if isinstance(seed, list):
            raise ValueError("pass one integer seed: the patients share one generator")
        super().reset(seed=seed)
        self._state = D.initial_state(self.num_envs, self.params, self.settings, self.np_random, self._k)
        obs, self._mask = D.observe_and_mask(self._state)
        self._prev_done = np.zeros(self.num_envs, dtype=bool)
        zeros = np.zeros(self.num_envs, dtype=bool)
        return obs, self._info(zeros)

    def step(
        self, actions: Any
    ) -> tuple[NDArray[np.float32], NDArray[np.float64], NDArray[np.bool_], NDArray[np.bool_], dict[str, Any]]:
        if self._state is None:
            raise RuntimeError("call reset() before step()")
        actions = np.asarray(actions)
        if actions.shape != (self.num_envs,):
            raise ValueError(f"expected {self.num_envs} actions, got shape {actions.shape}")
        restart = self._prev_done
        if restart.any():
            # next-step autoreset: these slots start new patients; their actions are ignored
            live = ~restart
            state = self._state.copy()
            obs = np.empty((self.num_envs, len(FEATURE_NAMES)), dtype=np.float32)
            mask = np.empty((self.num_envs, N_ACTIONS), dtype=bool)
            reward = np.zeros(self.num_envs)
            terminated = np.zeros(self.num_envs, dtype=bool)
            invalid = np.zeros(self.num_envs, dtype=bool)
            if live.any():
                r = D.step(self._state[live], actions[live], self.params, self.settings, self.np_random, self._k)
                state[live], obs[live], mask[live] = r.state, r.obs, r.mask
                reward[live], terminated[live], invalid[live] = r.reward, r.terminated, r.invalid
            fresh = D.initial_state(int(restart.sum()), self.params, self.settings, self.np_random, self._k)
            state[restart] = fresh
            obs[restart], mask[restart] = D.observe_and_mask(fresh)
        else:
            r = D.step(self._state, actions, self.params, self.settings, self.np_random, self._k)
            state, obs, mask, reward, terminated, invalid = r.state, r.obs, r.mask, r.reward, r.terminated, r.invalid
        self._state, self._mask = state, mask
        truncated = ~terminated & (state[:, D.S.T] >= self.settings.horizon)
        self._prev_done = terminated | truncated
        return obs, reward, terminated, truncated, self._info(invalid)

    def action_masks(self) -> NDArray[np.bool_]:
        """Allowed actions per patient now."""
        return self._mask.copy()

    def _info(self, invalid: NDArray[np.bool_]) -> dict[str, Any]:
        assert self._state is not None
        every = np.ones(self.num_envs, dtype=bool)
        return {
            "action_mask": self._mask.copy(),
            "_action_mask": every,
            "true_phq9": self._state[:, D.S.SEV].copy(),
            "_true_phq9": every,
            "invalid_action": invalid,
            "_invalid_action": every,
        }
