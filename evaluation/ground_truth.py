"""Simulator ground truth: a policy rolled out over many simulated patients.

Every off-policy estimate is scored against this, so it reports its own
uncertainty: normal-approximation intervals for means and Wilson intervals
for rates.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
from numpy.typing import NDArray
from tqdm import tqdm

from envs import dynamics as D
from envs.params import EnvSettings, SimParams, load_params
from envs.spec import FEATURE_INDEX, Action
from policies.base import Policy, sample_actions

Z95 = 1.959963984540054


@dataclass(frozen=True)
class Interval:
    value: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}]"


def mean_interval(x: NDArray[np.floating], z: float = Z95) -> Interval:
    m = float(np.mean(x))
    half = z * float(np.std(x, ddof=1)) / np.sqrt(len(x)) if len(x) > 1 else float("inf")
    return Interval(m, m - half, m + half)


def wilson_interval(successes: int, n: int, z: float = Z95) -> Interval:
    if n == 0:
        return Interval(float("nan"), 0.0, 1.0)
    p = successes / n
    denom = 1 + z**2 / n
    centre = (p + z**2 / (2 * n)) / denom
    half = z * np.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / denom
    return Interval(p, float(centre - half), float(centre + half))


@dataclass(frozen=True)
class GroundTruth:
    """Outcomes of one policy over a simulated cohort (true, not observed, severity)."""

    policy: str
    patients: int
    weeks: int
    value: Interval  # mean discounted-free return per patient
    remission: Interval  # true PHQ-9 < 5 at the horizon; leaving care counts as no remission
    phq9_change: Interval  # mean change in true PHQ-9 from intake to the last week in care
    dropout: Interval  # left care before the horizon
    referrals_when_item9_high: float  # share of weeks with item 9 >= 2 that got a referral
    blocked_actions_chosen: int  # must be 0
    cost: Interval  # mean cost of care per patient over the horizon (GBP, envs.params cost model)
    cost_per_remission: float | None  # total cost / patients in remission at the horizon (GBP); None: none remitted
    cost_per_phq9_point: float | None  # total cost / total PHQ-9 points gained (GBP); None: none gained
    side_effects: Interval  # mean weekly side-effect burden (0-10) over the weeks in care

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def rollout(
    policy: Policy,
    n: int = 5000,
    *,
    seed: int = 0,
    params: SimParams | None = None,
    settings: EnvSettings | None = None,
    progress: bool = False,
    on_week: Callable[[int], None] | None = None,
) -> GroundTruth:
    """Roll ``policy`` out over ``n`` new patients for the settings' horizon."""
    params = params if params is not None else load_params()
    settings = settings if settings is not None else EnvSettings()
    rng = np.random.default_rng(seed)
    policy_rng = np.random.default_rng([seed, 1])
    k = D.kernel_params(params, settings)
    state = D.initial_state(n, params, settings, rng, k)
    obs, mask = D.observe_and_mask(state)
    sev0 = state[:, D.S.SEV].copy()
    returns = np.zeros(n)
    side_sum = np.zeros(n)
    weeks_in_care = np.zeros(n)
    blocked = 0
    high_item9 = referred_high = 0
    weeks = settings.horizon
    for t in tqdm(range(weeks), desc=f"simulating {policy.name}", unit="week", disable=not progress, leave=False):
        alive = state[:, D.S.DROPPED] == 0
        actions, _ = sample_actions(policy, obs, mask, policy_rng)
        blocked += int((~mask[np.arange(n), actions] & alive).sum())
        urgent = alive & (obs[:, FEATURE_INDEX["phq9_item9"]] >= 2)
        high_item9 += int(urgent.sum())
        referred_high += int((urgent & (actions == Action.REFER_SPECIALIST)).sum())
        result = D.step(state, actions, params, settings, rng, k)
        state, obs, mask = result.state, result.obs, result.mask
        returns += result.reward
        side_sum += np.where(alive, state[:, D.S.SIDE_EFF], 0.0)
        weeks_in_care += alive
        if on_week is not None:
            on_week(t)
    left = state[:, D.S.DROPPED] > 0
    remitted = (state[:, D.S.SEV] < params.course.remission_threshold) & ~left
    cost = state[:, D.S.COST]
    gained = float(np.sum(sev0 - state[:, D.S.SEV]))
    return GroundTruth(
        policy=policy.name,
        patients=n,
        weeks=weeks,
        value=mean_interval(returns),
        remission=wilson_interval(int(remitted.sum()), n),
        phq9_change=mean_interval(state[:, D.S.SEV] - sev0),
        dropout=wilson_interval(int(left.sum()), n),
        referrals_when_item9_high=referred_high / high_item9 if high_item9 else 1.0,
        blocked_actions_chosen=blocked,
        cost=mean_interval(cost),
        cost_per_remission=float(cost.sum() / remitted.sum()) if remitted.any() else None,
        cost_per_phq9_point=float(cost.sum() / gained) if gained > 0 else None,
        side_effects=mean_interval(side_sum / np.maximum(weeks_in_care, 1)),
    )
