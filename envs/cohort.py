"""Batched cohort rollouts over the pure dynamics (no gym wrapper in the way).

Used by calibration, ground-truth evaluation and data generation: ``n``
patients start together and are stepped for a fixed number of weeks; those
who leave care stay frozen (the dynamics return them unchanged).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from envs import dynamics as D
from envs.params import EnvSettings, SimParams, load_params

#: (observation, mask, week index) -> one action per patient
ActionFn = Callable[[NDArray[np.float32], NDArray[np.bool_], int], NDArray[np.int64]]


@dataclass(frozen=True)
class CohortRun:
    """What a cohort rollout recorded.

    ``columns[t, i, j]`` is state column ``record[j]`` of patient ``i`` at week
    ``t`` (t = 0 is intake, so there are ``weeks + 1`` rows); ``active[t, i]``
    is true while the patient is still in care at week ``t``.
    """

    record: tuple[D.S, ...]
    columns: NDArray[np.float32]
    actions: NDArray[np.int8]
    rewards: NDArray[np.float32]
    active: NDArray[np.bool_]
    final_state: NDArray[np.float64]

    def column(self, col: D.S) -> NDArray[np.float32]:
        """One recorded state column over time, shape (weeks + 1, n)."""
        return self.columns[:, :, self.record.index(col)]


def run_cohort(
    act: ActionFn,
    n: int,
    weeks: int,
    *,
    seed: int,
    params: SimParams | None = None,
    settings: EnvSettings | None = None,
    record: Sequence[D.S] = (D.S.SEV, D.S.LEVEL, D.S.W_STEP, D.S.DROPPED),
    eligible: Callable[[NDArray[np.float64]], NDArray[np.bool_]] | None = None,
    setup: Callable[[NDArray[np.float64]], None] | None = None,
) -> CohortRun:
    """Roll ``n`` patients for ``weeks`` weeks under ``act``.

    ``eligible`` (state at intake -> bool per patient) keeps only the patients
    a trial would enrol; the rest are dropped before the first week, so the
    same seed gives the same enrolled patients in every arm. ``setup`` then
    changes the enrolled patients' state in place (e.g. a trial's prompt
    access to therapy).
    """
    params = params if params is not None else load_params()
    settings = settings if settings is not None else EnvSettings(horizon=max(weeks, 1))
    rng = np.random.default_rng(seed)
    k = D.kernel_params(params, settings)
    state = D.initial_state(n, params, settings, rng, k)
    if eligible is not None:
        state = state[eligible(state)]
    if setup is not None:
        setup(state)
    return run_from(state, act, weeks, rng=rng, params=params, settings=settings, record=record, kparams=k)


def run_from(
    state: NDArray[np.float64],
    act: ActionFn,
    weeks: int,
    *,
    rng: np.random.Generator,
    params: SimParams,
    settings: EnvSettings,
    record: Sequence[D.S] = (D.S.SEV, D.S.LEVEL, D.S.W_STEP, D.S.DROPPED),
    kparams: NDArray[np.float64] | None = None,
) -> CohortRun:
    """Roll patients on from a given ``state`` (e.g. those a trial enrols
    after a run-in): arms that start from the same state with the same seed
    share their noise (common random numbers)."""
    k = kparams if kparams is not None else D.kernel_params(params, settings)
    n = len(state)
    record = tuple(record)
    cols = np.array([int(c) for c in record])
    columns = np.empty((weeks + 1, n, len(record)), dtype=np.float32)
    actions = np.zeros((weeks, n), dtype=np.int8)
    rewards = np.zeros((weeks, n), dtype=np.float32)
    active = np.zeros((weeks + 1, n), dtype=bool)
    columns[0] = state[:, cols]
    active[0] = state[:, D.S.DROPPED] == 0
    obs, mask = D.observe_and_mask(state)
    for t in range(weeks):
        a = np.asarray(act(obs, mask, t), dtype=np.int64)
        result = D.step(state, a, params, settings, rng, k)
        state, obs, mask = result.state, result.obs, result.mask
        actions[t] = a
        rewards[t] = result.reward
        columns[t + 1] = state[:, cols]
        active[t + 1] = ~result.terminated
    return CohortRun(record, columns, actions, rewards, active, state)
