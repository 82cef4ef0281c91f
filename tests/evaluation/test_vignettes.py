"""Guideline vignettes: the shipped cases are valid and say what the guidelines say, a bad
case file is refused with the case and the problem named, scoring ranks as documented,
and ``carepath vignettes`` writes its JSON report."""

import json
import re
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import yaml

from carepath.cli import main
from envs.rules import action_mask
from envs.spec import ACTION_NAMES, FEATURE_INDEX, N_ACTIONS, N_FEATURES
from evaluation.vignettes import (
    CASES_PATH,
    build_observation,
    chance_in_top,
    load_cases,
    rank_actions,
    resolve_policy,
    score,
)
from policies.base import restrict_to_mask
from policies.baselines import StardPolicy
from policies.bundle import BundleManifest, save_bundle
from policies.networks import NetworkSpec, PolicyNetwork

A = {name: i for i, name in enumerate(ACTION_NAMES)}


@pytest.fixture(scope="module")
def cases():
    return load_cases()


def by_id(cases):
    return {c.id: c for c in cases}


# ----------------------------------------------------------------------------- the shipped cases


def test_shipped_cases_are_valid_and_allowed_by_the_rules(cases):
    assert len(cases) >= 24
    assert len({c.id for c in cases}) == len(cases)
    for case in cases:
        obs = case.observation()
        assert obs.shape == (N_FEATURES,)
        allowed = action_mask(obs[None, :])[0]
        assert case.acceptable_first, case.id
        for action in case.acceptable_first:
            assert allowed[A[action]], f"{case.id}: {action} is blocked by the rules"
        assert not set(case.acceptable_first) & set(case.unacceptable), case.id
        # every case cites a guideline named in the file's header
        assert re.search(r"NICE NG222|CANMAT 2023|APA 2010|APA 2019", case.source), case.id


def test_shipped_cases_say_what_the_guidelines_say(cases):
    f = {c.id: c.features for c in cases}
    item9 = [c for c in cases if c.features["phq9_item9"] >= 2]
    assert len(item9) >= 4
    for case in item9:  # NICE NG222 1.2.9: urgent referral, and nothing else first
        assert case.critical and case.acceptable_first == ("refer_specialist",), case.id
    assert any(c.features["phq9_item9"] == 3 for c in item9)
    for case in cases:
        if case.features["digital_access"] == 0:
            assert not {"add_digital_guided", "add_digital_unguided"} & set(case.acceptable_first), case.id
        if case.features["prior_episodes"] >= 2 and case.features["weeks_well"] > 0:
            # NICE NG222 1.8.5, CANMAT 2023: maintenance for those at higher risk of recurrence
            assert "taper_antidepressant" not in case.acceptable_first, case.id
            assert "continue" in case.acceptable_first, case.id
        if case.features["side_effect_burden"] >= 8:
            assert "raise_dose" not in case.acceptable_first and case.critical, case.id
    c = by_id(cases)
    assert c["remission_30_weeks_first_episode"].acceptable_first == ("taper_antidepressant", "continue")
    assert "taper_antidepressant" in c["remission_30_weeks_two_prior"].unacceptable
    assert c["remission_8_weeks"].acceptable_first == ("continue",) and f["remission_8_weeks"]["weeks_well"] < 26
    assert c["no_response_starting_dose_4w"].acceptable_first == ("raise_dose",)
    assert "continue" in c["no_response_max_dose_week9"].unacceptable
    assert "switch_class" in c["less_severe_untreated_digital_access"].unacceptable  # NICE NG222 1.5.3
    assert sum(c.critical for c in cases) >= 6


def test_observation_marks_what_was_measured(cases):
    c = by_id(cases)
    obs = c["missed_reviews"].observation()
    assert obs[FEATURE_INDEX["mask_phq9"]] == 0 and obs[FEATURE_INDEX["phq9"]] == 14
    assert obs[FEATURE_INDEX["weeks_since_measurement"]] == 4
    untreated = c["more_severe_untreated"].observation()
    # no drug: no side-effect or adherence report, as in the simulator
    assert untreated[FEATURE_INDEX["mask_side_effect_burden"]] == 0 and untreated[FEATURE_INDEX["mask_adherence"]] == 0
    on_drug = c["poor_adherence"].observation()
    assert on_drug[FEATURE_INDEX["mask_adherence"]] == 1 and on_drug[FEATURE_INDEX["adherence"]] == pytest.approx(0.3)
    for obs in (untreated, on_drug):
        assert obs[FEATURE_INDEX["mask_sleep_hours"]] == 0 and obs[FEATURE_INDEX["sleep_hours"]] == 0
    with_wearable = build_observation({**c["poor_adherence"].features, "sleep_hours": 6.5})
    assert with_wearable[FEATURE_INDEX["mask_sleep_hours"]] == 1


# ----------------------------------------------------------------------------- refused files


def write_cases(tmp_path, cases, defaults=None, name="cases.yaml"):
    raw = yaml.safe_load(CASES_PATH.read_text())
    doc = {"format": "carepath-vignettes", "version": 1, "defaults": defaults or raw["defaults"], "cases": cases}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def good_case(**changes):
    case = {"id": "week6_no_response", "title": "Week 6, no response", "features": {"phq9": 17},
            "acceptable_first": ["raise_dose"], "critical": False, "source": "NICE NG222 rec. 1.9.1"}
    case.update(changes)
    return case


def test_a_small_good_file_loads(tmp_path):
    (case,) = load_cases(write_cases(tmp_path, [good_case()]))
    assert case.id == "week6_no_response" and case.features["phq9"] == 17 and case.features["dose_level"] == 1


@pytest.mark.parametrize("changes, problem", [
    ({"acceptable_first": ["raise_dose", "magic_pill"]}, "unknown action 'magic_pill'"),
    ({"unacceptable": ["electroshock"]}, "unknown action 'electroshock'"),
    ({"features": {"phq9": 17, "mood_ring": 3}}, "unknown feature 'mood_ring'"),
    ({"features": {"phq9": 30}}, "feature 'phq9' must be in [0, 27], got 30"),
    ({"features": {"dose_level": 1.5}}, "feature 'dose_level' must be a whole number"),
    ({"features": {"digital_access": True}}, "feature 'digital_access' must be a number"),
    ({"features": {"dose_level": 3}}, "acceptable action 'raise_dose' is blocked by the safety rules for this "
                                      "patient (maximum_dose)"),
    ({"features": {"phq9_item9": 2}}, "acceptable action 'raise_dose' is blocked by the safety rules for this "
                                       "patient (item9_referral_only)"),
    ({"acceptable_first": ["taper_antidepressant"]}, "(remission_not_sustained)"),
    ({"acceptable_first": []}, "acceptable_first must name at least one action"),
    ({"unacceptable": ["raise_dose"]}, "raise_dose listed as both acceptable and unacceptable"),
    ({"source": ""}, "'source' must be non-empty text"),
    ({"critical": "yes"}, "'critical' must be true or false"),
    ({"not_measured": ["age_band"]}, "not_measured names 'age_band', which are not measurements"),
    ({"comment": "x"}, "unknown key(s) 'comment'"),
])
def test_bad_cases_are_refused_naming_the_case_and_problem(tmp_path, changes, problem):
    path = write_cases(tmp_path, [good_case(), good_case(id="the_bad_one", **changes)])
    with pytest.raises(ValueError) as err:
        load_cases(path)
    message = str(err.value)
    assert str(path) in message and "case 'the_bad_one'" in message and problem in message


def test_bad_files_are_refused(tmp_path):
    case = good_case()
    del case["source"]
    with pytest.raises(ValueError, match=r"case 'week6_no_response': missing 'source'"):
        load_cases(write_cases(tmp_path, [case]))
    with pytest.raises(ValueError, match=r"case 'week6_no_response': id is used twice"):
        load_cases(write_cases(tmp_path, [good_case(), good_case()]))
    with pytest.raises(ValueError, match=r"case 1: 'id' must be lower case"):
        load_cases(write_cases(tmp_path, [good_case(id="Week 6!")]))
    defaults = yaml.safe_load(CASES_PATH.read_text())["defaults"]
    del defaults["weeks_well"]
    with pytest.raises(ValueError, match=r"defaults must give every feature but the wearables; missing weeks_well"):
        load_cases(write_cases(tmp_path, [good_case()], defaults=defaults))
    doubled = tmp_path / "doubled.yaml"
    doubled.write_text(CASES_PATH.read_text().replace("  phq9_item9: 0\n", "  phq9_item9: 0\n  phq9: 3\n", 1))
    with pytest.raises(ValueError, match=r"key 'phq9' is given twice"):
        load_cases(doubled)
    with pytest.raises(FileNotFoundError, match="vignette file not found"):
        load_cases(tmp_path / "absent.yaml")


# ----------------------------------------------------------------------------- scoring


@dataclass
class PreferencePolicy:
    """Deterministic: the allowed action earliest in ``order`` gets the most probability."""

    order: tuple[str, ...]
    name: str = "preference"

    def action_probs(self, obs, mask):
        rank = {a: i for i, a in enumerate(self.order)}
        weights = np.array([2.0 ** -rank.get(a, len(rank) + i) for i, a in enumerate(ACTION_NAMES)])
        return restrict_to_mask(np.tile(weights, (len(obs), 1)), mask)


def preferring(first):
    return PreferencePolicy((first, *[a for a in ACTION_NAMES if a != first]), name=f"prefers {first}")


def test_a_policy_that_always_refers_passes_self_harm_cases_and_fails_others(cases):
    result = score(preferring("refer_specialist"), cases)
    rows = {c.id: c for c in result.cases}
    for case in cases:
        if case.features["phq9_item9"] >= 2:
            assert rows[case.id].first_ok and rows[case.id].top3 == ("refer_specialist",)
    assert not rows["no_response_max_dose_week9"].first_ok
    assert not rows["remission_8_weeks"].first_ok
    assert rows["treatment_resistant_level4"].first_ok
    assert rows["item9_1_improving"].first_ok  # NICE NG222 1.2.12: referral may be considered
    assert result.critical_failures == ["intolerable_side_effects_starting_dose", "intolerable_side_effects_max_dose"]
    assert 0 < result.first_share < 0.5


def test_a_policy_that_always_continues_fails_no_response_at_maximum_dose(cases):
    result = score(preferring("continue"), cases)
    rows = {c.id: c for c in result.cases}
    assert not rows["no_response_max_dose_week9"].first_ok
    assert rows["no_response_max_dose_week9"].first_unacceptable
    assert rows["remission_8_weeks"].first_ok and rows["early_week1_new_ssri"].first_ok
    assert rows["item9_3_severe"].first_ok  # the rules leave referral alone
    assert set(result.critical_failures) == {"intolerable_side_effects_starting_dose",
                                             "intolerable_side_effects_max_dose"}
    assert rows["no_response_max_dose_week9"].top3 == ("continue", "switch_within_class", "switch_class")
    assert rows["no_response_max_dose_week9"].top3_ok


def test_shares_are_means_over_cases(cases):
    result = score(preferring("continue"), cases)
    assert result.first_share == pytest.approx(np.mean([c.first_ok for c in result.cases]))
    assert result.top3_share == pytest.approx(np.mean([c.top3_ok for c in result.cases]))
    assert result.first_share <= result.top3_share
    payload = result.as_dict()
    assert payload["n_cases"] == len(cases) and len(payload["cases"]) == len(cases)
    json.dumps(payload, allow_nan=False)


def test_ties_count_at_their_odds():
    assert chance_in_top([[0, 1, 2, 3]], {3}, 1) == pytest.approx(0.25)
    assert chance_in_top([[0, 1, 2, 3]], {3}, 3) == pytest.approx(0.75)
    assert chance_in_top([[5], [0, 1]], {1}, 1) == 0.0
    assert chance_in_top([[5], [0, 1]], {1}, 2) == pytest.approx(0.5)
    assert chance_in_top([[5], [0, 1]], {5}, 1) == 1.0
    assert chance_in_top([[5], [0, 1]], {0, 1}, 3) == 1.0


def test_the_random_policy_scores_at_chance_and_stard_well(cases):
    uniform = score(resolve_policy("random"), cases)
    for row, case in zip(uniform.cases, cases, strict=True):
        allowed = action_mask(case.observation()[None, :])[0]
        assert row.tie_at_top == (allowed.sum() > 1)
        assert row.first_chance == pytest.approx(len(case.acceptable_first) / allowed.sum())
    assert uniform.first_share == pytest.approx(uniform.expected_share)
    stard = score(resolve_policy("stard"), cases)
    assert stard.critical_failures == []
    assert stard.first_share >= 0.6 and uniform.first_share <= 0.45
    assert stard.first_share > uniform.first_share + 0.2


@dataclass
class GreedyWithScores:
    """All probability on continue; scores order the rest (as a greedy bundle's Q-values do)."""

    name: str = "greedy"

    def action_probs(self, obs, mask):
        probs = np.zeros((len(obs), N_ACTIONS))
        probs[:, A["continue"]] = 1.0
        return restrict_to_mask(probs, mask)

    def outputs(self, obs):
        scores = np.zeros((len(obs), N_ACTIONS))
        scores[:, A["augment"]] = 2.0
        scores[:, A["switch_class"]] = 1.0
        return scores


def test_scores_break_ties_below_the_top(cases):
    c = by_id(cases)
    groups, _ = rank_actions(GreedyWithScores(), c["no_response_max_dose_week9"].observation())
    assert groups[0][:3] == [[A["continue"]], [A["augment"]], [A["switch_class"]]]
    row = score(GreedyWithScores(), [c["no_response_max_dose_week9"]]).cases[0]
    assert row.top3 == ("continue", "augment", "switch_class") and not row.first_ok and row.top3_chance == 1.0


def test_policy_specs_are_checked():
    policy = resolve_policy("stard:0.1")
    assert isinstance(policy, StardPolicy) and policy.epsilon == pytest.approx(0.1)
    with pytest.raises(ValueError, match="not a baseline name.*no policy bundle folder"):
        resolve_policy("magic")
    with pytest.raises(ValueError, match="epsilon must be in"):
        resolve_policy("stard:1.5")


# ----------------------------------------------------------------------------- the command


def test_cli_prints_the_table_and_writes_json(tmp_path, capsys, cases):
    out = tmp_path / "reports" / "vignettes.json"
    assert main(["vignettes", "--policy", "random", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "first suggestion acceptable:" in printed and "early_week1_new_ssri" in printed
    assert "critical case failed: intolerable_side_effects_starting_dose" in printed
    payload = json.loads(out.read_text())
    assert payload["n_cases"] == len(cases) and payload["policy_spec"] == "random"
    assert len(payload["cases_sha256"]) == 64
    for key in ("first_share", "top3_share", "expected_share"):
        assert 0.0 <= payload[key] <= 1.0
    assert payload["critical_failures"] == ["intolerable_side_effects_starting_dose",
                                            "intolerable_side_effects_max_dose"]
    assert [p.name for p in out.parent.iterdir()] == ["vignettes.json"], "no temporary file may be left behind"


def test_cli_json_on_a_bundle(tmp_path, capsys):
    torch.manual_seed(0)
    net = PolicyNetwork(NetworkSpec(N_FEATURES, N_ACTIONS, hidden=(8,), output="q_values"))
    bundle = save_bundle(tmp_path / "policy", net, BundleManifest(algorithm="cql", name="tiny", network=net.spec))
    assert main(["vignettes", "--policy", str(bundle), "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["policy"] == "tiny"
    # a greedy bundle ranks by its Q-values: no ties, so the columns and the shares agree
    assert not any(c["tie_at_top"] for c in payload["cases"] if len(c["top3"]) > 1)
    assert payload["first_share"] == pytest.approx(np.mean([c["first_ok"] for c in payload["cases"]]))


def test_cli_refuses_bad_input_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "v.json"
    bad = write_cases(tmp_path, [good_case(acceptable_first=["magic_pill"])], name="bad.yaml")
    assert main(["vignettes", "--policy", "stard", "--cases", str(bad), "--out", str(out)]) == 2
    assert "case 'week6_no_response'" in capsys.readouterr().err
    assert main(["vignettes", "--policy", "magic", "--out", str(out)]) == 2
    assert main(["vignettes", "--policy", "stard", "--out", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]
