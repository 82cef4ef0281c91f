"""``CarePath-Depression-v0``: one patient, one week per step.

A thin shell over :mod:`envs.dynamics` (as Gymnasium's CartPole is over its
equations): it holds one patient's state row and a seeded generator, and
translates the dynamics' arrays into Gymnasium's API.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, SupportsFloat, cast

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from numpy.typing import NDArray

from envs import dynamics as D
from envs.params import EnvSettings, SimParams, load_params
from envs.spec import ACTION_NAMES, FEATURE_BOUNDS, FEATURE_NAMES, N_ACTIONS

ObsType = NDArray[np.float32]


def observation_space() -> spaces.Box:
    low = np.array([lo for lo, _ in FEATURE_BOUNDS.values()], dtype=np.float32)
    high = np.array([hi for _, hi in FEATURE_BOUNDS.values()], dtype=np.float32)
    return spaces.Box(low, high, dtype=np.float32)


def build_settings(
    params: SimParams | None,
    params_path: str | Path | None,
    param_overrides: dict[str, Any] | None,
    settings: dict[str, Any],
) -> tuple[SimParams, EnvSettings]:
    """Env kwargs -> (SimParams, EnvSettings), with errors naming the bad kwarg."""
    if params is None:
        params = load_params(params_path, param_overrides)
    elif params_path is not None or param_overrides:
        raise ValueError("pass either params or params_path/param_overrides, not both")
    try:
        env_settings = EnvSettings(**settings)
    except TypeError as err:
        raise ValueError(f"unknown environment setting: {err}") from None
    return params, env_settings


def validate_action(action: Any) -> int:
    """An action as an int, or a ValueError that names what was passed."""
    try:
        value = int(action)
        ok = value == action and 0 <= value < N_ACTIONS
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok:
        raise ValueError(f"action {action!r} is outside the action space: expected an integer 0..{N_ACTIONS - 1}")
    return value


class CarePathEnv(gym.Env[ObsType, np.int64]):
    """Depression care for one patient, weekly decisions over a horizon.

    Observation: ``feature_names`` (PHQ-9, GAD-7, treatment, engagement, ...
    and a ``mask_<feature>`` missingness indicator per maskable feature).
    Action: one of ``action_names``. ``info["action_mask"]`` says what is
    clinically allowed now; ``info["true_phq9"]`` is the hidden severity, for
    evaluation only. Episodes end when the patient leaves care (terminated)
    or at the horizon (truncated).

    Keyword arguments are the fields of :class:`~envs.params.EnvSettings`
    (``horizon``, ``observation_noise``, ``missingness``, ``heterogeneity``,
    ``wearables``, ``invalid_action``, ``initial_treatment``,
    ``reward_weights``, ``action_costs``) plus ``params_path`` /
    ``param_overrides`` to change the calibrated model.
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 1}  # noqa: RUF012 - Gymnasium declares it a plain dict
    feature_names: ClassVar[list[str]] = list(FEATURE_NAMES)
    action_names: ClassVar[list[str]] = list(ACTION_NAMES)

    def __init__(
        self,
        render_mode: str | None = None,
        params: SimParams | None = None,
        params_path: str | Path | None = None,
        param_overrides: dict[str, Any] | None = None,
        **settings: Any,
    ) -> None:
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be one of {self.metadata['render_modes']}, got {render_mode!r}")
        self.render_mode = render_mode
        self.params, self.settings = build_settings(params, params_path, param_overrides, settings)
        self._k = D.kernel_params(self.params, self.settings)
        self.observation_space = cast("spaces.Space[ObsType]", observation_space())
        self.action_space = spaces.Discrete(N_ACTIONS)
        self._state: NDArray[np.float64] | None = None
        self._mask = np.ones(N_ACTIONS, dtype=bool)
        self._last_action: int | None = None

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[ObsType, dict[str, Any]]:
        super().reset(seed=seed)
        self._state = D.initial_state(1, self.params, self.settings, self.np_random, self._k)
        obs, mask = D.observe_and_mask(self._state)
        self._mask = mask[0]
        self._last_action = None
        return obs[0], self._info(invalid=False)

    def step(self, action: Any) -> tuple[ObsType, SupportsFloat, bool, bool, dict[str, Any]]:
        if self._state is None:
            raise RuntimeError("call reset() before step()")
        a = validate_action(action)
        result = D.step_unchecked(self._state, np.array([a], dtype=np.int64), self.settings, self.np_random, self._k)
        self._state = result.state
        self._mask = result.mask[0]
        self._last_action = a
        terminated = bool(result.terminated[0])
        truncated = bool(not terminated and self._state[0, D.S.T] >= self.settings.horizon)
        return result.obs[0], float(result.reward[0]), terminated, truncated, self._info(bool(result.invalid[0]))

    def action_masks(self) -> NDArray[np.bool_]:
        """Allowed actions now (the hook sb3-contrib's MaskablePPO looks for)."""
        return self._mask.copy()

    def _info(self, invalid: bool) -> dict[str, Any]:
        assert self._state is not None
        return {
            "action_mask": self._mask.copy(),
            "true_phq9": float(self._state[0, D.S.SEV]),
            "invalid_action": invalid,
        }

    def render(self) -> str | None:
        if self.render_mode != "ansi" or self._state is None:
            return None
        s = self._state[0]
        drug = "none" if s[D.S.DRUG_CLASS] < 0 else D.DRUG_CLASSES[int(s[D.S.DRUG_CLASS])]
        last = "-" if self._last_action is None else ACTION_NAMES[self._last_action]
        return (
            f"week {int(s[D.S.T]):3d} | PHQ-9 observed {int(s[D.S.O_PHQ]):2d} (true {s[D.S.SEV]:4.1f}) | "
            f"level {int(s[D.S.LEVEL])} {drug} dose {int(s[D.S.DOSE])}"
            f"{' +aug' if s[D.S.AUG] else ''}{' +CBT' if s[D.S.PSY] else ''}"
            f"{' +digital' if s[D.S.DIG] else ''}{' +specialist' if s[D.S.REF] else ''} | last action {last}"
        )
