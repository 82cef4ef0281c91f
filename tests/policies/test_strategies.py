"""The strategies kept to check the simulator obey the rules like any policy."""

import numpy as np
import pytest

from envs.params import EnvSettings
from envs.rules import action_mask
from envs.spec import Action
from policies.strategies import STRATEGIES, AddEverythingPolicy, SwitchEveryTwoWeeksPolicy
from tests.conftest import make_obs, random_allowed, rollout_states


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_strategies_never_choose_a_blocked_action_and_refer_on_item9(params, name):
    policy = STRATEGIES[name]()
    from envs import dynamics as D

    for state in rollout_states(params, EnvSettings(horizon=30), 300, 30, seed=5, pick=random_allowed)[::3]:
        obs, mask = D.observe_and_mask(state)
        probs = policy.action_probs(obs, mask)
        assert np.allclose(probs.sum(axis=1), 1.0) and not (probs * ~mask).any()
    urgent = make_obs(phq9_item9=2)
    assert policy.action_probs(urgent, action_mask(urgent))[0, Action.REFER_SPECIALIST] == 1.0


def test_add_everything_adds_in_order_and_switcher_switches_until_remission():
    obs = make_obs(weeks_on_step=6)
    probs = AddEverythingPolicy().action_probs(obs, action_mask(obs))
    assert probs[0, Action.AUGMENT] == 1.0
    augmented = make_obs(weeks_on_step=6, on_augmentation=1)
    assert AddEverythingPolicy().action_probs(augmented, action_mask(augmented))[0, Action.ADD_PSYCHOTHERAPY] == 1.0
    assert SwitchEveryTwoWeeksPolicy().action_probs(obs, action_mask(obs))[0, Action.SWITCH_CLASS] == 1.0
    remitted = make_obs(weeks_on_step=6, phq9=3)
    assert SwitchEveryTwoWeeksPolicy().action_probs(remitted, action_mask(remitted))[0, Action.CONTINUE] == 1.0
    too_early = make_obs(weeks_on_step=1)
    assert SwitchEveryTwoWeeksPolicy().action_probs(too_early, action_mask(too_early))[0, Action.CONTINUE] == 1.0
