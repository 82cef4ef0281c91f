"""Shared fixtures: the calibrated parameters and small helpers."""

from __future__ import annotations

import numpy as np
import pytest

from envs import dynamics as D
from envs.params import EnvSettings, SimParams, load_params
from envs.spec import FEATURE_BOUNDS, FEATURE_INDEX, N_FEATURES


@pytest.fixture(scope="session")
def params() -> SimParams:
    return load_params()


def make_obs(**features: float) -> np.ndarray:
    """One observation row: a patient at week 6 of level 1 on an SSRI at dose 1,
    PHQ-9 15, no other treatment, with digital access; override by name."""
    base = {
        "phq9": 15, "phq9_item9": 0, "gad7": 9, "phq9_at_intake": 18, "treatment_level": 1,
        "weeks_on_step": 6, "dose_level": 1, "weeks_on_dose": 6, "engagement": 0.7, "weeks_in_care": 6,
        "adherence": 0.8, "digital_access": 1, "mask_phq9": 1, "mask_phq9_item9": 1, "mask_gad7": 1,
    }
    base.update(features)
    obs = np.zeros((1, N_FEATURES), dtype=np.float32)
    for name, value in base.items():
        obs[0, FEATURE_INDEX[name]] = value
    return obs


def rollout_states(params: SimParams, settings: EnvSettings, n: int, weeks: int, seed: int,
                   pick=None) -> list[np.ndarray]:
    """States over ``weeks`` under the first allowed action (or ``pick(mask, rng)``)."""
    rng = np.random.default_rng(seed)
    pick_rng = np.random.default_rng(seed + 1)
    state = D.initial_state(n, params, settings, rng)
    states = [state]
    mask = D.mask_from_state(state)
    for _ in range(weeks):
        actions = pick(mask, pick_rng) if pick else mask.argmax(axis=1)
        result = D.step(state, actions, params, settings, rng)
        state, mask = result.state, result.mask
        states.append(state)
    return states


def random_allowed(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    p = mask / mask.sum(axis=1, keepdims=True)
    return (rng.random((len(mask), 1)) < p.cumsum(axis=1)).argmax(axis=1)


def obs_in_bounds(obs: np.ndarray) -> bool:
    low = np.array([lo for lo, _ in FEATURE_BOUNDS.values()])
    high = np.array([hi for _, hi in FEATURE_BOUNDS.values()])
    return bool(np.all((obs >= low) & (obs <= high)))
