import numpy as np
import pytest

from envs import dynamics as D
from envs.params import EnvSettings
from envs.spec import Action
from evaluation.ground_truth import rollout
from evaluation.zoo import MixturePolicy, PreferAction, lean, policy_zoo
from policies import make_baseline


@pytest.fixture(scope="module")
def states(params):
    settings = EnvSettings()
    rng = np.random.default_rng(0)
    state = D.initial_state(3000, params, settings, rng, D.kernel_params(params, settings))
    return D.observe_and_mask(state)


def test_zoo_has_ten_uniquely_named_candidates_that_respect_the_mask(states):
    obs, mask = states
    mask = mask.copy()
    mask[::3, Action.ADD_PSYCHOTHERAPY] = False  # make sure a lean towards a blocked action is caught
    zoo = policy_zoo()
    assert len(zoo) >= 10 and len({p.name for p in zoo}) == len(zoo)
    for policy in zoo:
        probs = policy.action_probs(obs, mask)
        assert np.allclose(probs.sum(axis=1), 1.0), policy.name
        assert np.all(probs[~mask] == 0.0), policy.name


def test_lean_mixes_in_the_preferred_action_where_allowed(states):
    obs, mask = states
    base = make_baseline("stard")
    leaning = lean("x", base, Action.ENGAGEMENT_NUDGE, 0.25)
    nudge = PreferAction(Action.ENGAGEMENT_NUDGE).action_probs(obs, mask)
    expected = 0.75 * base.action_probs(obs, mask) + 0.25 * nudge
    assert np.allclose(leaning.action_probs(obs, mask), expected)
    with pytest.raises(ValueError, match="weights must be non-negative"):
        MixturePolicy("bad", ((base, -1.0),))


def test_zoo_members_differ_in_true_value_in_the_documented_order():
    zoo = {p.name: p for p in policy_zoo()}
    value = {name: rollout(zoo[name], 2000, seed=3).value for name in
             ("stard_lean_switch_class", "stard_eps0.1", "stard_lean_psychotherapy_0.3")}
    low, mid, high = (value[n] for n in ("stard_lean_switch_class", "stard_eps0.1", "stard_lean_psychotherapy_0.3"))
    assert low.high < mid.low and mid.high < high.low
