import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from envs.rules import RULE_BY_NAME, RULES, action_mask, blocking_rules
from envs.spec import (
    ACTION_LABELS,
    ACTION_NAMES,
    BASE_FEATURES,
    FEATURE_BOUNDS,
    FEATURE_NAMES,
    MASKABLE_FEATURES,
    N_FEATURES,
    Action,
    action_index,
    feature_index,
)
from tests.conftest import make_obs


def test_names_are_unique_and_complete():
    assert len(set(FEATURE_NAMES)) == len(FEATURE_NAMES) == N_FEATURES
    assert set(MASKABLE_FEATURES) <= set(BASE_FEATURES)
    assert list(FEATURE_BOUNDS) == list(FEATURE_NAMES)
    assert ACTION_NAMES == tuple(a.name.lower() for a in Action)
    assert set(ACTION_LABELS) == set(ACTION_NAMES)
    assert all(lo < hi for lo, hi in FEATURE_BOUNDS.values())


def test_lookups_name_what_is_wrong():
    assert action_index("refer_specialist") == Action.REFER_SPECIALIST
    assert feature_index("phq9") == 0
    with pytest.raises(ValueError, match="unknown action 'electroshock'"):
        action_index("electroshock")
    with pytest.raises(ValueError, match="unknown feature 'bmi'"):
        feature_index("bmi")


def allowed(obs):
    return {ACTION_NAMES[a] for a in np.flatnonzero(action_mask(obs)[0])}


def test_item9_two_or_more_leaves_only_referral():
    assert allowed(make_obs(phq9_item9=2)) == {"refer_specialist"}
    assert allowed(make_obs(phq9_item9=3, in_specialist_care=1)) == {"refer_specialist"}
    assert "continue" in allowed(make_obs(phq9_item9=1))
    rules = blocking_rules(make_obs(phq9_item9=2)[0])
    assert [r.name for r in rules["continue"]] == ["item9_referral_only"]
    assert RULE_BY_NAME["item9_referral_only"].critical


def test_dose_rules():
    assert "raise_dose" in allowed(make_obs(dose_level=1, weeks_on_dose=2))
    assert "raise_dose" not in allowed(make_obs(dose_level=3))
    assert "raise_dose" not in allowed(make_obs(dose_level=2, weeks_on_dose=1))
    no_drug = allowed(make_obs(dose_level=0, weeks_on_dose=0))
    assert not {"raise_dose", "switch_within_class", "augment"} & no_drug
    # starting a first antidepressant is allowed at any week
    assert "switch_class" in allowed(make_obs(dose_level=0, weeks_on_step=0))


def test_step_rules():
    early = allowed(make_obs(weeks_on_step=1))
    assert not {"switch_within_class", "switch_class", "augment"} & early
    assert {"switch_within_class", "switch_class", "augment"} <= allowed(make_obs(weeks_on_step=2))
    assert "augment" not in allowed(make_obs(on_augmentation=1))


def test_once_only_treatments_and_access():
    assert "add_psychotherapy" not in allowed(make_obs(on_psychotherapy=1))
    for flag in ({"on_digital": 1}, {"digital_access": 0}):
        got = allowed(make_obs(**flag))
        assert not {"add_digital_guided", "add_digital_unguided"} & got
    assert "refer_specialist" not in allowed(make_obs(in_specialist_care=1))
    by_name = blocking_rules(make_obs(digital_access=0)[0])["add_digital_guided"]
    assert [r.name for r in by_name] == ["no_digital_access"]


def test_every_rule_can_fire():
    fired = set()
    for obs in (make_obs(phq9_item9=2), make_obs(dose_level=0), make_obs(dose_level=3),
                make_obs(weeks_on_dose=0, weeks_on_step=0), make_obs(on_augmentation=1),
                make_obs(on_psychotherapy=1), make_obs(on_digital=2, digital_access=0),
                make_obs(in_specialist_care=1)):
        for rules in blocking_rules(obs[0]).values():
            fired |= {r.name for r in rules}
    assert fired == {r.name for r in RULES}


def test_wrong_shape_is_refused():
    with pytest.raises(ValueError, match=rf"shape \(n, {N_FEATURES}\)"):
        action_mask(np.zeros((2, 5)))


feature_values = st.fixed_dictionaries({
    name: st.floats(lo, hi, allow_nan=False).map(lambda v, lo=lo, hi=hi: float(round(v)) if hi - lo > 1 else v)
    for name, (lo, hi) in FEATURE_BOUNDS.items()
})


@settings(max_examples=300, deadline=None)
@given(feature_values)
def test_continue_or_referral_is_always_allowed(features):
    obs = make_obs(**features)
    mask = action_mask(obs)[0]
    assert mask.any()
    if features["phq9_item9"] >= 2:
        assert mask.sum() == 1 and mask[Action.REFER_SPECIALIST]
    else:
        assert mask[Action.CONTINUE]
