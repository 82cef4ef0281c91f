import numpy as np
import pytest

from envs.params import EnvSettings
from evaluation.ground_truth import mean_interval, rollout, wilson_interval
from policies import RandomPolicy, StardPolicy


def test_rollout_is_reproducible_and_safe(params):
    a = rollout(StardPolicy(epsilon=0.1), 1500, seed=3, params=params)
    b = rollout(StardPolicy(epsilon=0.1), 1500, seed=3, params=params)
    assert a == b
    assert a.blocked_actions_chosen == 0
    assert a.referrals_when_item9_high == 1.0
    for interval in (a.value, a.remission, a.dropout, a.phq9_change):
        assert interval.low <= interval.value <= interval.high


def test_policies_of_different_quality_are_told_apart(params):
    """STAR*D care lowers severity more than no active treatment over 26 weeks
    (same seed: the same patients in both arms)."""
    stard = rollout(StardPolicy(), 3000, seed=1, params=params, settings=EnvSettings(horizon=26))
    untreated = rollout(_Continue(), 3000, seed=1, params=params,
                        settings=EnvSettings(horizon=26, initial_treatment="none"))
    assert stard.phq9_change.high < untreated.phq9_change.low
    assert stard.remission.low > untreated.remission.high
    assert RandomPolicy().name == "random"


class _Continue:
    name = "continue_only"

    def action_probs(self, obs, mask):
        probs = np.zeros(mask.shape)
        probs[:, 0] = mask[:, 0]
        probs[~mask[:, 0], 9] = 1.0  # referral where it is the only allowed action
        return probs


def test_intervals_cover_at_the_nominal_rate():
    rng = np.random.default_rng(0)
    covered_mean = covered_rate = 0
    for _ in range(400):
        x = rng.normal(1.0, 2.0, 200)
        covered_mean += mean_interval(x).low <= 1.0 <= mean_interval(x).high
        k = int(rng.binomial(150, 0.3))
        w = wilson_interval(k, 150)
        covered_rate += w.low <= 0.3 <= w.high
    assert 0.91 <= covered_mean / 400 <= 0.99
    assert 0.91 <= covered_rate / 400 <= 0.99


def test_costs_and_side_effects_are_reported_and_add_up(params):
    """Cost per patient, per remission and per PHQ-9 point follow from the same totals; doing
    more (every treatment at once) costs more and brings more side effects than STAR*D care."""
    from policies.strategies import AddEverythingPolicy

    settings = EnvSettings(horizon=26)
    stard = rollout(StardPolicy(), 3000, seed=2, params=params, settings=settings)
    everything = rollout(AddEverythingPolicy(), 3000, seed=2, params=params, settings=settings)
    for t in (stard, everything):
        assert t.cost.low <= t.cost.value <= t.cost.high and t.cost.value > 0
        remitted = t.remission.value * t.patients
        assert t.cost_per_remission == pytest.approx(t.cost.value * t.patients / remitted, rel=1e-9)
        assert t.cost_per_phq9_point > 0 and 0 <= t.side_effects.value <= 10
    assert everything.cost.low > 2 * stard.cost.high
    assert everything.side_effects.low > stard.side_effects.high
