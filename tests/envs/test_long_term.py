"""The long-term course and the cost of doing more (spec version 2).

Taper-and-stop, relapse after remission, waiting weeks, regimen complexity,
the cost model and the observed sustained-remission counter, each checked
on the pure dynamics with fixed seeds.
"""

import numpy as np
import pytest
import yaml

from envs import dynamics as D
from envs.params import DEFAULT_PARAMS_PATH, EnvSettings, load_params
from envs.rules import MIN_WEEKS_WELL_BEFORE_TAPER, action_mask, blocking_rules
from envs.spec import FEATURE_INDEX, Action
from policies.baselines import StardPolicy
from tests.conftest import make_obs

S = D.S
TAPER = int(Action.TAPER_ANTIDEPRESSANT)


def _well_patients(params, n: int, seed: int = 0) -> np.ndarray:
    """Patients in sustained, resolved remission on an SSRI (state set by hand)."""
    settings = EnvSettings()
    state = D.initial_state(n, params, settings, np.random.default_rng(seed))
    state[:, S.SEV] = state[:, S.O_PHQ] = 2.0
    state[:, S.NAT] = params.course.resolved_share * state[:, S.SEV0]
    state[:, S.WELL] = state[:, S.IN_REM] = 1.0
    state[:, S.W_WELL] = 40.0  # well for long past the grace weeks
    state[:, S.O_WELL] = MIN_WEEKS_WELL_BEFORE_TAPER
    state[:, S.W_STEP] = state[:, S.W_DRUG] = state[:, S.W_DOSE] = 40.0
    state[:, S.T] = 40.0
    state[:, S.O_ITEM9] = 0.0
    state[:, S.ADH] = state[:, S.ADH_PROP] = 1.0  # taking every dose: full protection
    return state


def test_taper_needs_sustained_remission_on_an_antidepressant():
    assert action_mask(make_obs(weeks_well=MIN_WEEKS_WELL_BEFORE_TAPER))[0, TAPER]
    early = make_obs(weeks_well=MIN_WEEKS_WELL_BEFORE_TAPER - 1)
    assert not action_mask(early)[0, TAPER]
    assert [r.name for r in blocking_rules(early[0])["taper_antidepressant"]] == ["remission_not_sustained"]
    no_drug = make_obs(weeks_well=52, dose_level=0)
    assert "no_antidepressant" in [r.name for r in blocking_rules(no_drug[0])["taper_antidepressant"]]


def test_taper_stops_the_drug_with_brief_discontinuation_symptoms(params):
    settings = EnvSettings()
    state = _well_patients(params, 200)
    rng = np.random.default_rng(1)
    result = D.step(state, np.full(200, TAPER), params, settings, rng)
    s = result.state
    assert np.all(s[:, S.DRUG_CLASS] == -1) and np.all(s[:, S.DOSE] == 0) and np.all(s[:, S.AUG] == 0)
    assert np.all(s[:, S.LAST_CLASS] == 0) and not result.invalid.any()
    first_week = s[:, S.SIDE_EFF].mean()
    for _ in range(8):
        s = D.step(s, np.zeros(200, dtype=np.int64), params, settings, rng).state
    assert first_week > 0.5 and s[:, S.SIDE_EFF].mean() < 0.1 * first_week
    # a re-challenge restarts the class that worked, without counting a new step
    result = D.step(s, np.full(200, int(Action.SWITCH_CLASS)), params, settings, rng)
    applied = ~result.invalid & (s[:, S.DROPPED] == 0)
    assert applied.mean() > 0.8
    assert np.all(result.state[applied, S.DRUG_CLASS] == 0)
    assert np.array_equal(result.state[:, S.LEVEL], s[:, S.LEVEL])


def _weekly_relapse(params, state: np.ndarray, action: int = 0) -> float:
    """Share of ``state``'s patients who relapse in one week (hazard, not noise)."""
    settings = EnvSettings()
    s = D.step(state, np.full(len(state), action), params, settings, np.random.default_rng(3)).state
    return float((s[:, S.RELAPSES] > state[:, S.RELAPSES]).mean())


N_HAZARD = 200_000  # one week of many patients: the hazard ratios are tight


def test_relapse_is_likelier_off_treatment(params):
    state = _well_patients(params, N_HAZARD, seed=2)
    stopped = state.copy()  # the same patients, the drug stopped
    stopped[:, S.DRUG_CLASS] = -1.0
    stopped[:, S.DOSE] = 0.0
    on, off = _weekly_relapse(params, state), _weekly_relapse(params, stopped)
    c = params.course
    assert off / on == pytest.approx(c.relapse_hazard / c.relapse_hazard_on_treatment, rel=0.15)
    assert c.relapse_hazard > c.relapse_hazard_on_treatment  # Geddes 2003: continuation halves relapse


@pytest.mark.parametrize(("column", "value"), [("FAILS", 3.0), ("SEV", 8.0), ("PRIOR", 4.0)])
def test_failed_steps_residual_symptoms_and_prior_episodes_raise_relapse(params, column, value):
    state = _well_patients(params, N_HAZARD, seed=4)
    state[:, S.PRIOR] = 0.0
    base = _weekly_relapse(params, state)
    state[:, S[column]] = value
    assert _weekly_relapse(params, state) > 1.15 * base


def test_a_drug_protects_only_as_far_as_it_is_taken(params):
    state = _well_patients(params, N_HAZARD, seed=6)
    taken = _weekly_relapse(params, state)
    state[:, S.ADH] = 0.3
    assert _weekly_relapse(params, state) > 1.15 * taken


def test_no_relapse_before_remission_has_lasted_the_grace_weeks(params):
    state = _well_patients(params, N_HAZARD, seed=7)
    state[:, S.W_WELL] = 0.0
    assert _weekly_relapse(params, state) == 0.0


def test_relapse_is_likeliest_before_the_episode_has_run_its_course(params):
    state = _well_patients(params, N_HAZARD, seed=5)
    resolved = _weekly_relapse(params, state)
    state[:, S.NAT] = state[:, S.SEV0]  # just remitted: the episode has not resolved
    assert _weekly_relapse(params, state) > 1.15 * resolved


def test_psychotherapy_starts_after_the_patients_wait(params):
    settings = EnvSettings()
    rng = np.random.default_rng(6)
    state = D.initial_state(50, params, settings, rng)
    state[:, S.WAIT_PSY] = 4.0
    result = D.step(state, np.full(50, int(Action.ADD_PSYCHOTHERAPY)), params, settings, rng)
    s = result.state
    started = ~result.invalid
    assert started.mean() > 0.9
    assert np.all(s[started, S.PSY] == 1) and np.all(s[started, S.W_PSY] == -3)
    costs = [s[:, S.COST].copy()]
    for _ in range(5):
        s = D.step(s, np.zeros(50, dtype=np.int64), params, settings, rng).state
        costs.append(s[:, S.COST].copy())
    weekly = np.diff(np.array(costs), axis=0)[:, (s[:, S.DROPPED] == 0) & started]
    drug = params.costs.weekly_drug
    # waiting weeks cost the drug only; sessions are charged once therapy has started
    assert np.allclose(weekly[:3], drug) and np.allclose(weekly[4:], drug + params.costs.weekly_psychotherapy)


def test_cost_model_charges_one_off_and_weekly_costs(params):
    settings = EnvSettings()
    rng = np.random.default_rng(7)
    state = D.initial_state(30, params, settings, rng)
    state[:, S.WAIT_REF] = 0.0
    s = D.step(state, np.full(30, int(Action.REFER_SPECIALIST)), params, settings, rng).state
    c = params.costs
    alive = s[:, S.DROPPED] == 0
    expected = c.specialist_first_appointment + c.weekly_drug + c.weekly_specialist
    assert np.allclose(s[alive, S.COST], expected)
    # the reward weighs the cost per 100 GBP
    cheap = EnvSettings(reward_weights={"cost": 0.0})
    dear = EnvSettings(reward_weights={"cost": 1.0})
    r0 = D.step(state, np.full(30, int(Action.REFER_SPECIALIST)), params, cheap, np.random.default_rng(8)).reward
    r1 = D.step(state, np.full(30, int(Action.REFER_SPECIALIST)), params, dear, np.random.default_rng(8)).reward
    assert np.allclose((r0 - r1)[alive], expected / D.COST_UNIT)


def test_adherence_falls_with_every_concurrent_treatment(params):
    settings = EnvSettings()
    state = D.initial_state(100, params, settings, np.random.default_rng(10))
    state[:, S.SE_SENS] = 0.0  # no side effects: only complexity moves adherence
    plain = D.step(state, np.zeros(100, dtype=np.int64), params, settings, np.random.default_rng(11)).state
    busy = state.copy()
    busy[:, S.PSY] = busy[:, S.REF] = 1.0
    busy[:, S.DIG] = 1.0
    busy = D.step(busy, np.zeros(100, dtype=np.int64), params, settings, np.random.default_rng(11)).state
    loss = params.tolerability.complexity_adherence_loss
    assert loss > 0
    np.testing.assert_allclose(plain[:, S.ADH] - busy[:, S.ADH], np.minimum(3 * loss, plain[:, S.ADH]), atol=1e-9)


def test_weeks_well_counts_sustained_remission_as_observed(params):
    params = params.replace({"course.relapse_hazard": 0.0, "course.relapse_hazard_on_treatment": 0.0})
    settings = EnvSettings(missingness=0.0, observation_noise=0.0)
    rng = np.random.default_rng(12)
    state = D.initial_state(10, params, settings, rng)
    state[:, S.SEV] = 2.0
    state[:, S.NAT] = 2.0
    s = state
    for _ in range(3):
        s = D.step(s, np.zeros(10, dtype=np.int64), params, settings, rng).state
    alive = s[:, S.DROPPED] == 0
    assert alive.sum() >= 8 and np.all(s[alive, S.O_WELL] >= 2)
    s = s.copy()
    s[:, S.NAT] = 27.0  # the episode returns, no treatment response left to hold it
    s[:, S.WELL] = s[:, S.R_DRUG] = s[:, S.NS_RESP] = s[:, S.TR] = 0.0
    for _ in range(3):
        s = D.step(s, np.zeros(10, dtype=np.int64), params, settings, rng).state
    alive = s[:, S.DROPPED] == 0
    assert np.all(s[alive, S.O_WELL] == 0)  # an observed PHQ-9 of 10 or more ends it


def test_stard_tapers_low_risk_remitters_only():
    obs = np.repeat(make_obs(phq9=3, weeks_well=MIN_WEEKS_WELL_BEFORE_TAPER, weeks_on_step=40), 2, axis=0)
    obs[1, FEATURE_INDEX["prior_episodes"]] = 3  # recurrent: maintenance, not a taper
    mask = action_mask(obs)
    probs = StardPolicy().action_probs(obs, mask)
    assert probs[0, TAPER] == 1.0 and probs[1, TAPER] == 0.0
    assert StardPolicy(taper=False).action_probs(obs, mask)[:, TAPER].max() == 0.0


@pytest.mark.parametrize(("key", "value", "message"), [
    ("course.relapse_hazard", 1.5, r"course\.relapse_hazard: 1\.5 is outside the allowed range \[0, 1\]"),
    ("services.psychotherapy_wait_mean_weeks", -1, r"psychotherapy_wait_mean_weeks: -1\.0 is outside"),
    ("costs.weekly_drug", float("nan"), r"costs\.weekly_drug: nan is outside"),
    ("response.onset_tau_drug", 0.0, r"onset_tau_drug: 0\.0 is outside the allowed range"),
    ("course.relapse_hazard", "high", r"course\.relapse_hazard: expected a number, got 'high'"),
    ("course.relapse_hazard", True, r"expected a number, got True"),
    ("course.no_such_thing", 1.0, r"unknown parameter\(s\) \['no_such_thing'\]"),
])
def test_bad_parameter_overrides_name_the_key_and_range(key, value, message):
    with pytest.raises(ValueError, match=message):
        load_params(overrides={key: value})


def test_bad_parameter_file_names_the_key(tmp_path):
    raw = yaml.safe_load(DEFAULT_PARAMS_PATH.read_text())
    raw["costs"]["weekly_psychotherapy"] = -5
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match=r"costs\.weekly_psychotherapy: -5\.0 is outside the allowed range"):
        load_params(path)


def test_fingerprint_follows_values_not_layout(tmp_path, params):
    path = tmp_path / "params.yaml"
    path.write_text("# a comment\n" + DEFAULT_PARAMS_PATH.read_text())
    assert load_params(path).fingerprint() == params.fingerprint()
    assert load_params(overrides={"course.relapse_hazard": 0.02}).fingerprint() != params.fingerprint()


def test_one_off_costs_come_from_the_parameter_file_and_settings_override_them(params):
    raise_at = D.K_COSTS + int(Action.RAISE_DOSE)
    assert D.kernel_params(params, EnvSettings())[raise_at] == params.costs.review_visit
    dear = params.replace({"costs.review_visit": 1000.0})
    assert D.kernel_params(dear, EnvSettings())[raise_at] == 1000.0
    assert D.kernel_params(dear, EnvSettings(action_costs={"raise_dose": 5.0}))[raise_at] == 5.0
    with pytest.raises(ValueError, match="unknown action cost"):
        EnvSettings(action_costs={"raise_the_dose": 5.0})


def test_a_rechallenge_restarts_the_drug_that_worked(params):
    """Taper, then restart: the same drug meets the same patient (its responder status returns)."""
    settings = EnvSettings()
    state = _well_patients(params, 2000, seed=8)
    before = state[:, S.R_DRUG].copy()
    rng = np.random.default_rng(13)
    stopped = D.step(state, np.full(len(state), TAPER), params, settings, rng).state
    again = D.step(stopped, np.full(len(state), int(Action.SWITCH_CLASS)), params, settings, rng)
    # (a relapse event in the restart week would end the response again)
    ok = ~again.invalid & (stopped[:, S.DROPPED] == 0) & (again.state[:, S.RELAPSES] == state[:, S.RELAPSES])
    assert ok.mean() > 0.8
    assert np.array_equal(again.state[ok, S.R_DRUG], before[ok])
    assert np.array_equal(again.state[ok, S.TRIED:S.TRIED + 4], state[ok, S.TRIED:S.TRIED + 4])


def test_well_ends_when_the_response_is_clearly_lost(params):
    settings = EnvSettings()
    state = _well_patients(params, 500, seed=9)
    state[:, S.RELAPSES] = 0.0
    state[:, S.SEV] = state[:, S.SEV0]  # symptoms back, without a relapse event
    state[:, S.NAT] = state[:, S.SEV0]
    state[:, S.R_DRUG] = state[:, S.NS_RESP] = state[:, S.TR] = 0.0
    s = D.step(state, np.zeros(500, dtype=np.int64), params, settings, np.random.default_rng(14)).state
    lost = s[:, S.SEV] > (params.course.well_response_share + 0.25) * s[:, S.SEV0]
    assert lost.mean() > 0.5 and np.all(s[lost, S.WELL] == 0)
    # hysteresis: a response only blurred stays well (unless a relapse event came this very week)
    kept = ~lost & (s[:, S.RELAPSES] == 0)
    assert kept.sum() > 50 and np.all(s[kept, S.WELL] == 1)


def test_waits_have_the_configured_mean(params):
    state = D.initial_state(100_000, params, EnvSettings(), np.random.default_rng(15))
    svc = params.services
    assert state[:, S.WAIT_PSY].mean() == pytest.approx(svc.psychotherapy_wait_mean_weeks, rel=0.03)
    assert state[:, S.WAIT_REF].mean() == pytest.approx(svc.specialist_wait_mean_weeks, rel=0.03)
    assert state[:, S.WAIT_PSY].min() == 0 and np.all(state[:, S.WAIT_PSY] == np.round(state[:, S.WAIT_PSY]))


def test_repeated_nudges_lose_their_effect(params):
    """A nudge every week keeps less engagement than the first nudge's boost would suggest."""
    settings = EnvSettings()
    state = D.initial_state(2000, params, settings, np.random.default_rng(16))
    state[:, S.ENG] = state[:, S.ENG_BASE] = 0.5
    rng = np.random.default_rng(17)
    first = D.step(state, np.full(2000, int(Action.ENGAGEMENT_NUDGE)), params, settings, rng).state
    s = first
    for _ in range(10):
        before = s
        s = D.step(s, np.full(2000, int(Action.ENGAGEMENT_NUDGE)), params, settings, rng).state
    nudged = (s[:, S.DROPPED] == 0) & (s[:, S.NUDGES] > 3.0)  # (item 9 >= 2 turns a nudge into referral)
    assert nudged.mean() > 0.7
    boost = params.engagement.nudge_boost
    # the eleventh nudge closes far less of the gap than the first did
    late = boost / (1.0 + params.engagement.nudge_habituation * before[nudged, S.NUDGES])
    assert np.all(late < 0.3 * boost)
