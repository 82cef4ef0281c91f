import numpy as np
import pytest

from envs import dynamics as D
from envs.params import EnvSettings
from envs.spec import Action
from evaluation.ground_truth import rollout
from evaluation.zoo import ZOOS, MixturePolicy, PreferAction, lean, policy_zoo
from policies import make_baseline


@pytest.fixture(scope="module")
def states(params):
    settings = EnvSettings()
    rng = np.random.default_rng(0)
    state = D.initial_state(3000, params, settings, rng, D.kernel_params(params, settings))
    return D.observe_and_mask(state)


@pytest.mark.parametrize("kind", sorted(ZOOS))
def test_zoo_has_ten_uniquely_named_candidates_that_respect_the_mask(states, kind):
    obs, mask = states
    mask = mask.copy()
    mask[::3, Action.ADD_PSYCHOTHERAPY] = False  # make sure a lean towards a blocked action is caught
    zoo = ZOOS[kind]()
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
    names = ("stard_lean_switch_class_0.05", "stard_eps0.1", "stard_lean_digital_guided_0.05")
    low, mid, high = (rollout(zoo[name], 20_000, seed=3).value for name in names)
    assert low.high < mid.low and mid.high < high.low


@pytest.fixture(scope="module")
def stard_log(tmp_path_factory):
    from offline_data.dataset import load_dataset
    from offline_data.generate import generate

    path = tmp_path_factory.mktemp("zoo") / "log.parquet"
    generate(path, policy="stard", epsilon=0.1, patients=2000, seed=11, include_true_phq9=False)
    return load_dataset(path).episodes()


def test_the_identifiable_zoo_is_overlapped_by_the_log_and_the_stress_zoo_is_not(stard_log):
    """The split the accuracy benchmark rests on: every identifiable member keeps a usable effective
    sample size on an epsilon-0.1 STAR*D log, the random policy of the stress zoo does not."""
    from evaluation.ope import estimate, target_probabilities

    def ess(policy):
        return estimate("wis", stard_log, target_probabilities(policy, stard_log), interval=None).ess

    n = len(stard_log.obs)
    identifiable = {p.name: ess(p) for p in policy_zoo()}
    assert min(identifiable.values()) >= 0.02 * n, identifiable
    stress = {p.name: ess(p) for p in ZOOS["stress"]()}
    # (under 1 %: since spec 2 more patients leave care early, and a short episode matches any policy)
    assert stress["random"] < 0.01 * n, stress
    assert sorted(stress.values())[len(stress) // 2] < sorted(identifiable.values())[0]


def test_a_trained_bundle_joins_the_stress_zoo_as_it_is_and_the_identifiable_zoo_as_a_lean(tmp_path, states):
    from tests.evaluation.test_evaluate_cli import make_bundle

    bundle = make_bundle(tmp_path / "policy")
    identifiable = policy_zoo([bundle])
    stress = ZOOS["stress"]([bundle])
    assert len(identifiable) == len(policy_zoo()) + 1 and len(stress) == len(ZOOS["stress"]()) + 1
    trained, leaning = stress[-1], identifiable[-1]
    assert trained.name == "cli-test-policy" and leaning.name == "stard_lean_cli-test-policy_0.1"
    obs, mask = states
    expected = 0.9 * make_baseline("stard").action_probs(obs, mask) + 0.1 * trained.action_probs(obs, mask)
    assert np.allclose(leaning.action_probs(obs, mask), expected)
    with pytest.raises(ValueError, match="unique"):
        policy_zoo([bundle, bundle])
