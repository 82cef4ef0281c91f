"""The recommender: patient input, safety rules, ranking, benefit intervals, SHAP additivity, bundles."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from envs.rules import action_mask
from envs.spec import ACTION_NAMES, BASE_FEATURES, FEATURE_BOUNDS, FEATURE_INDEX, N_ACTIONS, N_FEATURES
from evaluation.ope.fqe import resample_episodes
from offline_data.dataset import load_dataset
from policies.bundle import BundleError, load, update_bundle
from serving.benefit import phq9_fall
from serving.patient import ITEM9_MISSING_ALERT, RULE_FEATURE_DEFAULTS, build_observation, describe_feature
from serving.recommender import NotPrepared, Recommender, rank_actions
from serving.schemas import INTEGER_FEATURES
from tests.serving.conftest import PATIENT

MEDIANS = {name: 1.0 for name in BASE_FEATURES}


@pytest.fixture(scope="module")
def recommender(prepared_bundle: Path) -> Recommender:
    return Recommender(prepared_bundle)


# ------------------------------------------------------------------ patient input


def test_given_features_are_kept_and_measurements_marked_observed() -> None:
    p = build_observation({"phq9": 18, "gad7": 12, "dose_level": 2}, MEDIANS)
    assert p.obs[FEATURE_INDEX["phq9"]] == 18 and p.obs[FEATURE_INDEX["mask_phq9"]] == 1
    assert p.obs[FEATURE_INDEX["gad7"]] == 12 and p.obs[FEATURE_INDEX["mask_gad7"]] == 1
    # a measurement not given is missing this week, as in the logged data
    assert p.obs[FEATURE_INDEX["mask_sleep_hours"]] == 0
    assert p.given == {"phq9": 18.0, "gad7": 12.0, "dose_level": 2.0}


def test_missing_rule_features_are_assumed_so_that_more_is_blocked() -> None:
    p = build_observation({"phq9": 15, "phq9_item9": 0}, MEDIANS)
    imputed = {i.name: i.value for i in p.imputed}
    for name, value in RULE_FEATURE_DEFAULTS.items():
        if name != "phq9_item9":
            assert imputed[name] == value
    mask = action_mask(p.obs[None, :])[0]
    # unknown dose, weeks on step and digital access: nothing that might be unsafe is allowed
    for blocked in ("raise_dose", "switch_within_class", "augment", "add_digital_guided", "add_psychotherapy"):
        assert not mask[ACTION_NAMES.index(blocked)]
    # ... but referral, the safe action, stays open
    assert mask[ACTION_NAMES.index("refer_specialist")]
    # other features take the bundle's typical values
    assert imputed["gad7"] == 1.0 and p.obs[FEATURE_INDEX["mask_gad7"]] == 0


def test_missing_item9_raises_an_alert_and_a_given_one_does_not() -> None:
    assert ITEM9_MISSING_ALERT in build_observation({"phq9": 15}, MEDIANS).alerts
    assert build_observation({"phq9": 15, "phq9_item9": 0}, MEDIANS).alerts == []


@pytest.mark.parametrize(("features", "named"), [
    ({"phq9": 28}, "phq9"), ({"phq9_item9": -1}, "phq9_item9"), ({"gad7": float("nan")}, "gad7"),
    ({"sleep_hours": float("inf")}, "sleep_hours"), ({"phq9": "high"}, "phq9"), ({"phq10": 3}, "phq10"),
    ({"mask_phq9": 1}, "mask_phq9"),
])
def test_bad_input_names_the_feature(features: dict[str, object], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        build_observation(features, MEDIANS)  # type: ignore[arg-type]


def test_features_in_words() -> None:
    p = build_observation({"phq9": 18, "phq9_change_4w": 4, "dose_level": 0, "age_band": 3}, MEDIANS)
    assert describe_feature("phq9", p.obs) == "PHQ-9 18, up 4 in 4 weeks"
    assert describe_feature("dose_level", p.obs) == "no antidepressant"
    assert describe_feature("age_band", p.obs) == "age 60+"
    assert describe_feature("mask_sleep_hours", p.obs) == "sleep not measured this week"


# ------------------------------------------------------------------ ranking and safety


def test_ranking_puts_allowed_first_then_probability_then_score() -> None:
    probs = np.array([0.0, 0.7, 0.3, 0.0])
    scores = np.array([5.0, 1.0, 2.0, 9.0])
    mask = np.array([True, True, True, False])
    assert rank_actions(probs, scores, mask) == [1, 2, 0, 3]


def test_a_typical_patient_gets_ranked_allowed_steps_with_benefit_and_rationale(recommender: Recommender) -> None:
    answer = recommender.recommend(PATIENT, top_k=3)
    assert len(answer.suggestions) == 3 and [s.rank for s in answer.suggestions] == [1, 2, 3]
    obs = recommender.observation(PATIENT)
    mask = action_mask(obs[None, :])[0]
    assert all(mask[ACTION_NAMES.index(s.action)] for s in answer.suggestions)
    assert {b.action for b in answer.blocked} == {ACTION_NAMES[a] for a in np.flatnonzero(~mask)}
    assert all(b.rules for b in answer.blocked)
    for s in answer.suggestions:
        assert s.benefit is not None and s.benefit.low <= s.benefit.phq9_change_vs_continue <= s.benefit.high
        assert s.rationale is not None and len(s.rationale.contributions) == 5
        assert not s.critical
    assert not answer.critical and "Decision support" in answer.decision_support
    assert recommender.recommend(PATIENT, top_k=2, explain=False).suggestions[0].rationale is None


def test_continue_has_zero_benefit_against_itself(recommender: Recommender) -> None:
    answer = recommender.recommend(PATIENT, top_k=N_ACTIONS)
    cont = next(s for s in answer.suggestions if s.action == "continue")
    assert cont.benefit is not None
    assert cont.benefit.phq9_change_vs_continue == cont.benefit.low == cont.benefit.high == 0.0


def test_high_item9_leaves_only_referral_marked_critical(recommender: Recommender) -> None:
    answer = recommender.recommend({**PATIENT, "phq9_item9": 2}, top_k=5)
    assert [s.action for s in answer.suggestions] == ["refer_specialist"]
    assert answer.critical and answer.suggestions[0].critical
    assert answer.alerts[0].startswith("CRITICAL")
    # even a patient already in specialist care is re-referred
    again = recommender.recommend({**PATIENT, "phq9_item9": 3, "in_specialist_care": 1})
    assert [s.action for s in again.suggestions] == ["refer_specialist"] and again.critical


def _feature_value(name: str) -> st.SearchStrategy[float | int | None]:
    low, high = FEATURE_BOUNDS[name]
    value: st.SearchStrategy[float | int] = (st.integers(int(low), int(high)) if name in INTEGER_FEATURES
                                             else st.floats(low, high, allow_nan=False))
    return st.none() | value


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.fixed_dictionaries({name: _feature_value(name) for name in BASE_FEATURES}), st.integers(1, N_ACTIONS))
def test_no_suggestion_is_ever_blocked(recommender: Recommender, features: dict[str, float | None],
                                       top_k: int) -> None:
    answer = recommender.recommend(features, top_k=top_k, explain=False)
    obs = recommender.observation(features)
    mask = action_mask(obs[None, :])[0]
    suggested = {s.action for s in answer.suggestions}
    assert suggested and all(mask[ACTION_NAMES.index(a)] for a in suggested)
    assert not suggested & {b.action for b in answer.blocked}
    if (features.get("phq9_item9") or 0) >= 2:
        assert suggested == {"refer_specialist"} and answer.critical


def test_shap_values_add_up_to_score_minus_base(recommender: Recommender) -> None:
    rng = np.random.default_rng(0)
    for _ in range(5):
        features = {**PATIENT, "phq9": int(rng.integers(0, 28)), "gad7": int(rng.integers(0, 22))}
        obs = recommender.observation(features)
        explanation = recommender.explainer.explain(obs)
        assert explanation.values.shape == (N_FEATURES, N_ACTIONS)
        np.testing.assert_allclose(explanation.values.sum(axis=0) + explanation.base_values,
                                   recommender.policy.outputs(obs[None, :])[0], atol=1e-4)
    # and the response carries the same numbers
    answer = recommender.recommend(PATIENT, top_k=1)
    rationale = answer.suggestions[0].rationale
    assert rationale is not None and rationale.score == pytest.approx(answer.suggestions[0].score)
    action = ACTION_NAMES.index(answer.suggestions[0].action)
    full = recommender.explainer.explain(recommender.observation(PATIENT))
    assert rationale.base_value == pytest.approx(float(full.base_values[action]))
    top = np.argsort(-np.abs(full.values[:, action]))[:5]
    assert [c.shap for c in rationale.contributions] == pytest.approx(full.values[top, action].tolist())


def test_both_explainers_add_up_and_agree_on_what_matters(recommender: Recommender, prepared_bundle: Path) -> None:
    """The default is DeepLIFT through the network; shap's permutation explainer stays available
    (``--explainer permutation``). Both add up; on a served policy they rank the same features first."""
    assert "DeepExplainer" in recommender.explainer_method and recommender.explainer_state == "ready"
    permutation = Recommender(prepared_bundle, explainer="permutation")
    assert "permutation" in permutation.explainer_method
    obs = recommender.observation(PATIENT)
    deep, perm = recommender.explainer.explain(obs), permutation.explainer.explain(obs)
    for e in (deep, perm):
        np.testing.assert_allclose(e.values.sum(axis=0) + e.base_values, recommender.policy.outputs(obs[None, :])[0],
                                   atol=1e-4)
    np.testing.assert_allclose(deep.base_values, perm.base_values, atol=1e-5)  # both: the background's mean score
    answer = recommender.recommend(PATIENT, top_k=1)
    action = ACTION_NAMES.index(answer.suggestions[0].action)
    corr = np.corrcoef(deep.values[:, action], perm.values[:, action])[0, 1]
    assert corr > 0.8  # measured 0.996 on the test bundle
    with pytest.raises(ValueError, match="explainer must be one of"):
        Recommender(prepared_bundle, explainer="lime")  # type: ignore[arg-type]


# ------------------------------------------------------------------ bundles


def test_an_unprepared_bundle_is_refused_with_the_command_to_fix_it(tmp_path: Path) -> None:
    from tests.evaluation.test_evaluate_cli import make_bundle

    bundle = make_bundle(tmp_path / "policy")
    with pytest.raises(NotPrepared, match="carepath prepare"):
        Recommender(bundle)


def test_a_tampered_benefit_file_refuses_to_load(prepared_bundle: Path, tmp_path: Path) -> None:
    copy = tmp_path / "policy"
    shutil.copytree(prepared_bundle, copy)
    benefit = copy / "benefit.safetensors"
    data = bytearray(benefit.read_bytes())
    data[-3] ^= 0xFF
    benefit.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="benefit.safetensors"):
        load(copy)


@pytest.mark.parametrize("section", [(), ("benefit",)], ids=["explain", "explain.benefit"])
def test_an_unknown_key_in_the_serving_section_is_refused(prepared_bundle: Path, tmp_path: Path,
                                                          section: tuple[str, ...]) -> None:
    """What prepare writes is a closed set: an extra key is an edit no command made."""
    copy = tmp_path / "policy"
    shutil.copytree(prepared_bundle, copy)
    manifest = json.loads((copy / "bundle.json").read_text())
    target = manifest["explain"]
    for key in section:
        target = target[key]
    target["unexpected"] = 1
    (copy / "bundle.json").write_text(json.dumps(manifest))
    name = ".".join(("explain", *section))
    with pytest.raises(BundleError, match=f"field '{name}' has unknown key.*'unexpected'"):
        Recommender(copy, warm=False)
    Recommender(prepared_bundle, warm=False)  # the bundle as prepared still serves


def test_updating_a_bundle_keeps_weights_and_extra_files(prepared_bundle: Path, tmp_path: Path) -> None:
    copy = tmp_path / "policy"
    shutil.copytree(prepared_bundle, copy)
    before = json.loads((copy / "bundle.json").read_text())
    policy = update_bundle(copy, evaluation={"note": "re-evaluated"})
    assert policy.manifest.weights_sha256 == before["weights_sha256"]
    assert policy.manifest.files == before["files"] and policy.manifest.evaluation == {"note": "re-evaluated"}
    assert set(policy.extra_tensors("benefit.safetensors")) and not list(tmp_path.glob(".policy*"))


def test_benefit_reward_is_the_observed_phq9_fall_and_resampling_keeps_episodes(logged_path: Path) -> None:
    transitions = load_dataset(logged_path).transitions()
    fall = phq9_fall(transitions)
    live = ~transitions.done
    np.testing.assert_allclose(fall[live], (transitions.obs[live, 0] - transitions.next_obs[live, 0]))
    assert np.all(fall[transitions.done] == 0)
    sample = resample_episodes(transitions, np.random.default_rng(0))
    starts = np.flatnonzero(np.r_[True, np.diff(sample.episode) != 0])
    assert np.all(np.diff(sample.episode) >= 0) and len(starts) == transitions.episode.max() + 1
    assert np.all(sample.done[np.r_[starts[1:] - 1, len(sample) - 1]])  # each episode still ends done


def test_a_clear_disagreement_between_policy_and_benefit_model_is_shown() -> None:
    from serving.recommender import benefit_disagreement

    mask = np.ones(N_ACTIONS, dtype=bool)
    change = np.zeros(N_ACTIONS)
    lo, hi = change - 0.5, change + 0.5
    assert benefit_disagreement(lo, hi, change, mask, first=0) is None  # overlapping intervals: no note
    change[7], lo[7], hi[7] = -2.0, -2.6, -1.4
    note = benefit_disagreement(lo, hi, change, mask, first=0)
    assert note is not None and "2.0 points lower" in note and "unguided digital CBT" in note
    mask[7] = False  # a blocked step is never held up as better
    assert benefit_disagreement(lo, hi, change, mask, first=0) is None
