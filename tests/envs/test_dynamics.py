import dataclasses

import numpy as np
import pytest

from envs import dynamics as D
from envs.params import EnvSettings, load_params
from envs.spec import FEATURE_INDEX, N_ACTIONS, Action
from tests.conftest import obs_in_bounds, random_allowed, rollout_states

S = D.S


def test_same_seed_same_trajectory_and_different_seed_differs(params):
    settings = EnvSettings()
    a = rollout_states(params, settings, 50, 20, seed=3, pick=random_allowed)
    b = rollout_states(params, settings, 50, 20, seed=3, pick=random_allowed)
    c = rollout_states(params, settings, 50, 20, seed=4, pick=random_allowed)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[-1], c[-1])


def test_step_does_not_mutate_its_input(params):
    rng = np.random.default_rng(0)
    settings = EnvSettings()
    state = D.initial_state(20, params, settings, rng)
    before = state.copy()
    D.step(state, np.zeros(20, dtype=np.int64), params, settings, rng)
    assert np.array_equal(state, before)


def test_observations_stay_in_bounds_under_random_care(params):
    settings = EnvSettings(horizon=60)
    states = rollout_states(params, settings, 400, 60, seed=1, pick=random_allowed)
    for s in states:
        assert obs_in_bounds(D.observe(s))
        assert np.all((s[:, S.SEV] >= 0) & (s[:, S.SEV] <= 27))


def test_patients_who_left_care_are_frozen(params):
    settings = EnvSettings(horizon=40)
    rng = np.random.default_rng(5)
    state = D.initial_state(500, params, settings, rng)
    left_at = {}
    for t in range(40):
        result = D.step(state, D.mask_from_state(state).argmax(1), params, settings, rng)
        for i in np.flatnonzero(state[:, S.DROPPED] > 0):
            assert np.array_equal(result.state[i], state[i])
            assert result.reward[i] == 0.0
        for i in np.flatnonzero(result.terminated):
            left_at.setdefault(int(i), t)
        state = result.state
    assert left_at, "some patients should leave care in 40 weeks"


def test_blocked_action_raises_with_the_rule_or_is_penalised(params):
    rng = np.random.default_rng(0)
    strict = EnvSettings(invalid_action="raise")
    state = D.initial_state(3, params, strict, rng)
    state[:, S.O_ITEM9] = 0
    # week 0 of level 1: a switch is too early
    with pytest.raises(ValueError, match=r"action 3 \(switch_class\) is not allowed .*too early"):
        D.step(state, np.array([0, 3, 0]), params, strict, rng)
    lenient = dataclasses.replace(strict, invalid_action="penalize")
    penalised = D.step(state, np.array([3, 3, 3]), params, lenient, np.random.default_rng(1))
    continued = D.step(state, np.array([0, 0, 0]), params, lenient, np.random.default_rng(1))
    assert penalised.invalid.all()
    assert np.array_equal(penalised.state, continued.state)
    weight = lenient.reward_weights["invalid_action"]
    assert np.allclose(continued.reward - penalised.reward, weight)


@pytest.mark.parametrize("bad", [N_ACTIONS, -1])
def test_action_outside_the_space_is_named(params, bad):
    rng = np.random.default_rng(0)
    state = D.initial_state(2, params, EnvSettings(), rng)
    with pytest.raises(ValueError, match=f"action {bad} is outside the action space"):
        D.step(state, np.array([0, bad]), params, EnvSettings(), rng)
    with pytest.raises(ValueError, match="one action per patient"):
        D.step(state, np.array([0]), params, EnvSettings(), rng)
    with pytest.raises(ValueError, match="integers"):
        D.step(state, np.array([0.5, 1.0]), params, EnvSettings(), rng)


def _apply(params, state, action, settings=None):
    settings = settings or EnvSettings()
    return D.step(state, np.full(len(state), int(action)), params, settings, np.random.default_rng(9)).state


def test_actions_change_treatment_as_named(params):
    rng = np.random.default_rng(2)
    s = D.initial_state(1, params, EnvSettings(), rng)
    s[:, S.O_ITEM9] = 0
    s[:, S.W_STEP] = s[:, S.W_DOSE] = 4
    assert _apply(params, s, Action.RAISE_DOSE)[0, S.DOSE] == 2
    switched = _apply(params, s, Action.SWITCH_CLASS)[0]
    assert (switched[S.DRUG_CLASS], switched[S.LEVEL], switched[S.W_STEP], switched[S.DOSE]) == (1, 2, 1, 1)
    within = _apply(params, s, Action.SWITCH_WITHIN_CLASS)[0]
    assert (within[S.DRUG_CLASS], within[S.LEVEL]) == (0, 2)
    assert _apply(params, s, Action.AUGMENT)[0, S.AUG] == 1
    assert _apply(params, s, Action.ADD_PSYCHOTHERAPY)[0, S.PSY] == 1
    assert _apply(params, s, Action.ADD_DIGITAL_GUIDED)[0, S.DIG] in (0, 1)  # may drop out at once
    assert _apply(params, s, Action.REFER_SPECIALIST)[0, S.REF] == 1
    nudged = _apply(params, s, Action.ENGAGEMENT_NUDGE)[0, S.ENG]
    assert nudged > _apply(params, s, Action.CONTINUE)[0, S.ENG]


def test_drug_effect_is_delayed_and_builds_up(params):
    """Responders improve gradually over weeks, not in one step (onset tau)."""
    quiet = params.replace({"course.process_noise_sd": 0.0, "course.spontaneous_remission_hazard": 0.0,
                            "dropout.base_logit": -30.0})
    settings = EnvSettings(horizon=12)
    rng = np.random.default_rng(0)
    s = D.initial_state(2000, quiet, settings, rng)
    s[:, S.R_DRUG] = 1.0
    s[:, S.TR] = 0.0
    s[:, S.O_ITEM9] = 0
    sev = [s[:, S.SEV].mean()]
    for _ in range(12):
        s = D.step(s, np.zeros(len(s), dtype=np.int64), quiet, settings, rng).state
        sev.append(s[:, S.SEV].mean())
    gained = (sev[0] - np.array(sev)) / (sev[0] - sev[-1])
    assert gained[1] < 0.3, "week 1 should show under a third of the 12-week improvement"
    assert gained[6] > 0.75, "most of the effect should be there by week 6"
    assert sev[-1] < 0.5 * sev[0], "responders should halve their severity within 12 weeks"


def test_stress_settings_switch_noise_missingness_and_variation(params):
    clean = EnvSettings(observation_noise=0.0, missingness=0.0, heterogeneity=0.0, wearables=False)
    s = rollout_states(params, clean, 300, 8, seed=0)
    for state in s:
        assert np.array_equal(state[:, S.O_PHQ], np.clip(np.round(state[:, S.SEV]), 0, 27))
        assert (state[:, S.M_PHQ] == 1).all()
        obs = D.observe(state)
        assert (obs[:, FEATURE_INDEX["mask_sleep_hours"]] == 0).all()
    assert np.ptp(s[0][:, S.SEV0]) == 0.0 and np.ptp(s[0][:, S.ADH_PROP]) == 0.0
    noisy = rollout_states(params, EnvSettings(missingness=1.0), 2000, 8, seed=0)
    missing = 1 - np.mean([st[:, S.M_PHQ].mean() for st in noisy[1:]])
    assert 0.15 < missing < 0.6


def test_missing_not_at_random(params):
    """Sicker and disengaged patients answer the PHQ-9 less often."""
    states = rollout_states(params, EnvSettings(horizon=10), 6000, 10, seed=2)
    sev = np.concatenate([s[:, S.SEV] for s in states[1:]])
    seen = np.concatenate([s[:, S.M_PHQ] for s in states[1:]]) > 0
    assert seen[sev < 8].mean() > seen[sev > 18].mean() + 0.05


def test_item9_high_is_rare_and_rises_with_severity(params):
    states = rollout_states(params, EnvSettings(horizon=6), 20000, 0, seed=3)
    s = states[0]
    high = s[:, S.O_ITEM9] >= 2
    assert 0.002 < high.mean() < 0.08
    assert high[s[:, S.SEV] > 20].mean() > high[s[:, S.SEV] < 14].mean()


def test_parameter_files_are_validated(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("population: {}\n")
    with pytest.raises(ValueError, match="missing parameter"):
        load_params(bad)
    with pytest.raises(ValueError, match=r"response: unknown parameter\(s\) \['magic'\]"):
        load_params().replace({"response.magic": 1.0})
    with pytest.raises(ValueError, match="dose_factor' must have 4 value"):
        D.kernel_params(load_params().replace({"response.dose_factor": [0, 1]}), EnvSettings())
    with pytest.raises(FileNotFoundError, match="nowhere.yaml"):
        load_params(tmp_path / "nowhere.yaml")
    with pytest.raises(ValueError, match="horizon must be a positive integer"):
        EnvSettings(horizon=0)
    with pytest.raises(ValueError, match="unknown reward weight"):
        EnvSettings(reward_weights={"happiness": 1.0})
