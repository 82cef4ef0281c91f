"""The one place where observation features and actions are named.

Everything else (policies, logged-data columns, SHAP, the API schema, the
clinician page) reads these lists; nothing else spells a feature name.
Order is part of the contract: the observation vector and the action space
follow these tuples, so never reorder, only append (and bump
``SPEC_VERSION``).
"""

from __future__ import annotations

from enum import IntEnum
from typing import Final

#: 2: action ``taper_antidepressant`` and feature ``weeks_well`` (long-term course).
SPEC_VERSION: Final = 2
#: What changed in each version, for the errors that refuse older files.
SPEC_CHANGES: Final[dict[int, str]] = {
    2: "version 2 added the action taper_antidepressant and the feature weeks_well",
}

#: Base observation features, in observation order.
BASE_FEATURES: Final[tuple[str, ...]] = (
    "phq9",  # last observed PHQ-9 total (0-27), carried forward when not measured
    "phq9_item9",  # last observed PHQ-9 item 9, suicidality (0-3)
    "gad7",  # last observed GAD-7 total (0-21)
    "weeks_since_measurement",  # weeks since PHQ-9 was last observed
    "phq9_change_4w",  # last observed PHQ-9 minus the one observed about 4 weeks before
    "phq9_at_intake",  # PHQ-9 observed at intake (response = a 50 % fall from it)
    "treatment_level",  # 1-4, STAR*D-style step of care
    "weeks_on_step",  # weeks since the current step started
    "dose_level",  # 0 (no drug) to 3 (maximum)
    "weeks_on_dose",  # weeks since the dose last changed (or the drug started)
    "on_psychotherapy",  # 0/1
    "on_digital",  # 0 none, 1 guided, 2 unguided digital CBT
    "on_augmentation",  # 0/1
    "in_specialist_care",  # 0/1, already referred to specialist care
    "side_effect_burden",  # last reported side-effect burden (0-10)
    "adherence",  # last reported share of doses taken (0-1)
    "engagement",  # engagement with care this week (0-1, from contact logs)
    "weeks_in_care",  # weeks since intake
    "age_band",  # 0: 18-29, 1: 30-44, 2: 45-59, 3: 60+
    "sex",  # 0 female, 1 male
    "prior_episodes",  # number of prior depressive episodes (capped at 5)
    "digital_access",  # 0/1, patient can use digital therapy
    "sleep_hours",  # wearable: mean nightly sleep (hours); often missing
    "daily_steps",  # wearable: mean daily steps (thousands); often missing
    # weeks since an observed PHQ-9 first fell below 5 with none of 10 or more
    # since (sustained remission, as guidelines judge it before a taper); 0 otherwise
    "weeks_well",
)

#: Features that can be missing in a given week. Each gets a ``mask_<name>``
#: indicator in the observation: 1 = freshly observed this week, 0 = missing
#: (the value is then carried forward, or 0 for never-observed wearables).
MASKABLE_FEATURES: Final[tuple[str, ...]] = (
    "phq9",
    "phq9_item9",
    "gad7",
    "side_effect_burden",
    "adherence",
    "sleep_hours",
    "daily_steps",
)

MASK_PREFIX: Final = "mask_"

#: Full observation order: base features then their missingness indicators.
FEATURE_NAMES: Final[tuple[str, ...]] = BASE_FEATURES + tuple(
    MASK_PREFIX + name for name in MASKABLE_FEATURES
)
N_FEATURES: Final = len(FEATURE_NAMES)
FEATURE_INDEX: Final[dict[str, int]] = {name: i for i, name in enumerate(FEATURE_NAMES)}


class Action(IntEnum):
    """Next steps of care, in action-space order."""

    CONTINUE = 0
    RAISE_DOSE = 1
    SWITCH_WITHIN_CLASS = 2
    SWITCH_CLASS = 3
    AUGMENT = 4
    ADD_PSYCHOTHERAPY = 5
    ADD_DIGITAL_GUIDED = 6
    ADD_DIGITAL_UNGUIDED = 7
    ENGAGEMENT_NUDGE = 8
    REFER_SPECIALIST = 9
    TAPER_ANTIDEPRESSANT = 10  # taper and stop after sustained remission (spec version 2)


ACTION_NAMES: Final[tuple[str, ...]] = tuple(a.name.lower() for a in Action)
N_ACTIONS: Final = len(ACTION_NAMES)

#: Human-readable labels, for the clinician page and reports.
ACTION_LABELS: Final[dict[str, str]] = {
    "continue": "Continue current treatment",
    "raise_dose": "Raise the antidepressant dose",
    "switch_within_class": "Switch to another drug of the same class",
    "switch_class": "Switch to another antidepressant class",
    "augment": "Augment the antidepressant",
    "add_psychotherapy": "Add psychotherapy (CBT)",
    "add_digital_guided": "Add guided digital CBT",
    "add_digital_unguided": "Add unguided digital CBT",
    "engagement_nudge": "Engagement nudge (outreach, reminder)",
    "refer_specialist": "Refer to specialist care",
    "taper_antidepressant": "Taper and stop the antidepressant (sustained remission)",
}

#: Classes of care, for fairness tabulations of what is recommended.
ACTION_CARE_CLASS: Final[dict[str, str]] = {
    "continue": "continue",
    "raise_dose": "medication",
    "switch_within_class": "medication",
    "switch_class": "medication",
    "augment": "medication",
    "add_psychotherapy": "psychotherapy",
    "add_digital_guided": "digital",
    "add_digital_unguided": "digital",
    "engagement_nudge": "engagement",
    "refer_specialist": "specialist",
    "taper_antidepressant": "step_down",
}

#: Item 9 at or above this makes referral the only safe action.
ITEM9_REFERRAL_THRESHOLD: Final = 2

#: Subgroup columns used by the logged data and fairness reports.
SUBGROUP_FEATURES: Final[tuple[str, ...]] = ("sex", "age_band", "digital_access")

#: Drug classes the simulator knows, in the order "switch class" walks them.
DRUG_CLASSES: Final[tuple[str, ...]] = ("ssri", "snri", "atypical", "tca_maoi")
MAX_DOSE_LEVEL: Final = 3
MAX_TREATMENT_LEVEL: Final = 4


def action_index(name: str) -> int:
    """Index of an action by name, with an error that lists the valid names."""
    try:
        return ACTION_NAMES.index(name)
    except ValueError:
        raise ValueError(
            f"unknown action {name!r}; expected one of {', '.join(ACTION_NAMES)}"
        ) from None


def feature_index(name: str) -> int:
    """Index of an observation feature by name, with a helpful error."""
    try:
        return FEATURE_INDEX[name]
    except KeyError:
        raise ValueError(
            f"unknown feature {name!r}; expected one of {', '.join(FEATURE_NAMES)}"
        ) from None

#: Bounds of each observation feature (the observation space, API schema and
#: import validation read these). Week counters are bounded by ten years.
_MAX_WEEKS = 520.0
FEATURE_BOUNDS: Final[dict[str, tuple[float, float]]] = {
    "phq9": (0.0, 27.0),
    "phq9_item9": (0.0, 3.0),
    "gad7": (0.0, 21.0),
    "weeks_since_measurement": (0.0, _MAX_WEEKS),
    "phq9_change_4w": (-27.0, 27.0),
    "phq9_at_intake": (0.0, 27.0),
    "treatment_level": (1.0, float(MAX_TREATMENT_LEVEL)),
    "weeks_on_step": (0.0, _MAX_WEEKS),
    "dose_level": (0.0, float(MAX_DOSE_LEVEL)),
    "weeks_on_dose": (0.0, _MAX_WEEKS),
    "on_psychotherapy": (0.0, 1.0),
    "on_digital": (0.0, 2.0),
    "on_augmentation": (0.0, 1.0),
    "in_specialist_care": (0.0, 1.0),
    "side_effect_burden": (0.0, 10.0),
    "adherence": (0.0, 1.0),
    "engagement": (0.0, 1.0),
    "weeks_in_care": (0.0, _MAX_WEEKS),
    "age_band": (0.0, 3.0),
    "sex": (0.0, 1.0),
    "prior_episodes": (0.0, 5.0),
    "digital_access": (0.0, 1.0),
    "sleep_hours": (0.0, 14.0),
    "daily_steps": (0.0, 40.0),
    "weeks_well": (0.0, _MAX_WEEKS),
    **{MASK_PREFIX + name: (0.0, 1.0) for name in MASKABLE_FEATURES},
}
assert tuple(FEATURE_BOUNDS) == FEATURE_NAMES
