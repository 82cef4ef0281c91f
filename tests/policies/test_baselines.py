import numpy as np
import pytest

from envs import dynamics as D
from envs.params import EnvSettings
from envs.rules import action_mask
from envs.spec import N_ACTIONS, Action
from policies import RandomPolicy, StardPolicy, UsualCarePolicy, greedy_actions, make_baseline, sample_actions
from policies.base import Policy
from tests.conftest import make_obs, random_allowed, rollout_states

POLICIES = [StardPolicy(), StardPolicy(epsilon=0.2), UsualCarePolicy(), UsualCarePolicy(epsilon=0.1), RandomPolicy()]


def probs_for(policy, obs):
    return policy.action_probs(obs, action_mask(obs))[0]


@pytest.fixture(scope="module")
def varied_states(params):
    """Patients in many situations: random care over 40 weeks, every 4th week."""
    return rollout_states(params, EnvSettings(horizon=40), 300, 40, seed=0, pick=random_allowed)[::4]


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: f"{p.name}-{p.epsilon}")
def test_probabilities_are_valid_and_zero_on_blocked_actions(varied_states, policy):
    assert isinstance(policy, Policy)
    for state in varied_states:
        obs, mask = D.observe_and_mask(state)
        probs = policy.action_probs(obs, mask)
        assert probs.shape == (len(obs), N_ACTIONS)
        assert np.allclose(probs.sum(axis=1), 1.0)
        assert np.all(probs[~mask] == 0.0)
        assert np.all(probs >= 0)


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: f"{p.name}-{p.epsilon}")
def test_item9_high_means_referral_whatever_epsilon(policy):
    probs = probs_for(policy, make_obs(phq9_item9=2))
    assert probs[Action.REFER_SPECIALIST] == 1.0


def test_stard_raises_dose_at_a_visit_without_remission():
    stard = StardPolicy()
    assert probs_for(stard, make_obs(phq9=14, weeks_on_step=4, weeks_on_dose=4))[Action.RAISE_DOSE] == 1.0
    # not a visit week, remitted, or intolerable side effects: no raise
    assert probs_for(stard, make_obs(phq9=14, weeks_on_step=5, weeks_on_dose=5))[Action.CONTINUE] == 1.0
    assert probs_for(stard, make_obs(phq9=3, weeks_on_step=4, weeks_on_dose=4))[Action.CONTINUE] == 1.0
    assert probs_for(stard, make_obs(phq9=14, weeks_on_step=4, side_effect_burden=8))[Action.SWITCH_CLASS] == 1.0


def test_stard_moves_to_the_next_level_after_twelve_weeks_without_remission():
    stard = StardPolicy()
    level1 = probs_for(stard, make_obs(phq9=15, phq9_at_intake=18, weeks_on_step=12, dose_level=3, weeks_on_dose=4))
    assert level1[Action.CONTINUE] == 0.0
    assert level1[Action.AUGMENT] > 0 and level1[Action.SWITCH_CLASS] > 0 and level1[Action.ADD_PSYCHOTHERAPY] > 0
    level3 = probs_for(stard, make_obs(phq9=15, treatment_level=3, weeks_on_step=12, dose_level=3, weeks_on_dose=4))
    assert level3[Action.SWITCH_CLASS] == 1.0
    level4 = probs_for(stard, make_obs(phq9=15, treatment_level=4, weeks_on_step=12, dose_level=3, weeks_on_dose=4))
    assert level4[Action.REFER_SPECIALIST] == 1.0
    # a stale (carried-forward) score is not enough to change the step
    stale = probs_for(stard, make_obs(phq9=15, weeks_on_step=12, dose_level=3, weeks_on_dose=4, mask_phq9=0))
    assert stale[Action.CONTINUE] == 1.0
    # a responder without remission chooses follow-up half of the time
    responder = probs_for(stard, make_obs(phq9=8, phq9_at_intake=20, weeks_on_step=12, dose_level=3, weeks_on_dose=4))
    assert responder[Action.CONTINUE] == pytest.approx(stard.responder_follow_up)


def test_epsilon_mixes_uniformly_over_allowed_actions():
    obs = make_obs(phq9=15, weeks_on_step=5, weeks_on_dose=5)
    mask = action_mask(obs)
    greedy = StardPolicy().action_probs(obs, mask)[0]
    mixed = StardPolicy(epsilon=0.3).action_probs(obs, mask)[0]
    expected = 0.7 * greedy + 0.3 * mask[0] / mask[0].sum()
    assert np.allclose(mixed, expected)
    assert np.allclose(RandomPolicy().action_probs(obs, mask)[0], mask[0] / mask[0].sum())


def test_sampling_follows_the_probabilities_and_greedy_picks_the_mode():
    obs = np.repeat(make_obs(phq9=15, weeks_on_step=5, weeks_on_dose=5), 20000, axis=0)
    mask = action_mask(obs)
    policy = StardPolicy(epsilon=0.5)
    actions, chosen = sample_actions(policy, obs, mask, np.random.default_rng(0))
    probs = policy.action_probs(obs[:1], mask[:1])[0]
    freq = np.bincount(actions, minlength=N_ACTIONS) / len(actions)
    assert np.all(mask[np.arange(len(actions)), actions])
    assert np.allclose(freq, probs, atol=0.015)
    assert np.allclose(chosen, probs[actions])
    assert (greedy_actions(policy, obs[:3], mask[:3]) == Action.CONTINUE).all()


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="unknown baseline policy 'magic'"):
        make_baseline("magic")
    with pytest.raises(ValueError, match="epsilon must be in"):
        StardPolicy(epsilon=1.5)
    obs = make_obs()
    with pytest.raises(ValueError, match="action mask must have shape"):
        StardPolicy().action_probs(obs, np.ones((1, 3), dtype=bool))
    with pytest.raises(ValueError, match="allows no action"):
        StardPolicy().action_probs(obs, np.zeros((1, N_ACTIONS), dtype=bool))


def test_stard_follow_up_changes_step_only_on_relapse():
    """A remitter in follow-up is not moved on by one noisy score of 6, only by a relapse."""
    stard = StardPolicy()
    noisy = probs_for(stard, make_obs(phq9=6, phq9_at_intake=18, weeks_on_step=20, dose_level=3, weeks_on_dose=16))
    assert noisy[Action.CONTINUE] == 1.0
    relapse = probs_for(stard, make_obs(phq9=13, phq9_at_intake=18, weeks_on_step=20, dose_level=3,
                                        weeks_on_dose=16))
    assert relapse[Action.CONTINUE] == 0.0
