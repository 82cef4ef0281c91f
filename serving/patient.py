"""A patient's state as a clinician gives it -> the observation a policy reads.

A clinician (or an EHR) gives named base features (``envs.spec.BASE_FEATURES``),
any of which may be missing. This module turns them into the full observation
vector (``envs.spec.FEATURE_NAMES``) and says what it had to assume:

- A given measurement (PHQ-9, item 9, GAD-7, side effects, adherence, sleep,
  steps) counts as observed this week: its ``mask_`` indicator is 1. A missing
  one gets indicator 0, as in the logged data, and a typical value.
- A missing feature that a safety rule reads (``envs.rules.RULE_FEATURES``) is
  assumed in the way that blocks the most (dose unknown -> no dose to raise;
  weeks on step unknown -> too early to switch; digital access unknown -> none),
  so that no action is ever suggested that the rule might block. Two exceptions,
  both on the side of safety: unknown specialist care allows referral, and an
  unknown item 9 cannot trigger the referral rule, so it raises an alert.
- Any other missing feature takes the median of the data the policy was
  prepared on (stored in the bundle), and is listed as imputed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

import numpy as np
from numpy.typing import NDArray

from envs.rules import RULE_FEATURES
from envs.spec import (
    BASE_FEATURES,
    FEATURE_BOUNDS,
    FEATURE_INDEX,
    MASK_PREFIX,
    MASKABLE_FEATURES,
    MAX_DOSE_LEVEL,
    MAX_TREATMENT_LEVEL,
    N_FEATURES,
)

#: Values assumed for missing features the safety rules read (see the module docstring).
RULE_FEATURE_DEFAULTS: Final[dict[str, float]] = {
    "phq9_item9": 0.0,
    "dose_level": 0.0,
    "weeks_on_dose": 0.0,
    "weeks_on_step": 0.0,
    "on_augmentation": 1.0,
    "on_psychotherapy": 1.0,
    "on_digital": 1.0,
    "digital_access": 0.0,
    "in_specialist_care": 0.0,
    "weeks_well": 0.0,  # unknown: not yet in sustained remission, so no taper is suggested
}
assert set(RULE_FEATURE_DEFAULTS) == set(RULE_FEATURES)

ITEM9_MISSING_ALERT: Final = (
    "PHQ-9 item 9 (thoughts of self-harm) was not given, so the self-harm safety rule could not be checked: "
    "ask about it before acting on any suggestion."
)


@dataclass(frozen=True)
class Imputation:
    """A feature the clinician did not give, the value used instead, and why."""

    name: str
    value: float
    reason: str


@dataclass(frozen=True)
class PatientObservation:
    """The observation row a policy reads, with what was given and what assumed."""

    obs: NDArray[np.float64]  # (N_FEATURES,)
    given: dict[str, float]
    imputed: list[Imputation] = field(default_factory=list)
    alerts: list[str] = field(default_factory=list)

    def named(self) -> dict[str, float]:
        """The whole observation by feature name (for the audit trail)."""
        return {name: float(self.obs[i]) for name, i in FEATURE_INDEX.items()}


def build_observation(features: Mapping[str, float | int | None], medians: Mapping[str, float]) -> PatientObservation:
    """Named base features (None or absent = missing) -> the observation row.

    ``medians`` gives a typical value for every base feature (from the bundle).
    Unknown names and out-of-range or non-finite values raise ``ValueError`` naming them.
    """
    unknown = sorted(set(features) - set(BASE_FEATURES))
    if unknown:
        raise ValueError(f"unknown patient feature(s) {', '.join(map(repr, unknown))}; "
                         f"expected some of {', '.join(BASE_FEATURES)}")
    obs = np.zeros(N_FEATURES, dtype=np.float64)
    given: dict[str, float] = {}
    imputed: list[Imputation] = []
    alerts: list[str] = []
    for name in BASE_FEATURES:
        raw = features.get(name)
        if raw is not None:
            value = _checked(name, raw)
            given[name] = value
        elif name in RULE_FEATURE_DEFAULTS:
            value = RULE_FEATURE_DEFAULTS[name]
            reason = ("not given: the self-harm rule could not be checked" if name == "phq9_item9"
                      else "not given: assumed so that no action a safety rule might block is suggested")
            imputed.append(Imputation(name, value, reason))
        else:
            if name not in medians:
                raise ValueError(f"the policy bundle has no typical value for missing feature {name!r}")
            value = float(medians[name])
            imputed.append(Imputation(name, value, "not given: typical value in the data the policy was prepared on"))
        obs[FEATURE_INDEX[name]] = value
        if name in MASKABLE_FEATURES:
            obs[FEATURE_INDEX[MASK_PREFIX + name]] = 1.0 if raw is not None else 0.0
    if "phq9_item9" not in given:
        alerts.append(ITEM9_MISSING_ALERT)
    return PatientObservation(obs=obs, given=given, imputed=imputed, alerts=alerts)


def _checked(name: str, raw: float | int) -> float:
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise ValueError(f"patient feature {name!r} must be a number, got {raw!r}")
    value = float(raw)
    low, high = FEATURE_BOUNDS[name]
    if not math.isfinite(value) or not low <= value <= high:
        raise ValueError(f"patient feature {name!r} must be in [{low:g}, {high:g}], got {raw!r}")
    return value


# ------------------------------------------------------------------ words

_AGE_BANDS: Final = ("18-29", "30-44", "45-59", "60+")
_DIGITAL: Final = ("no digital CBT", "in guided digital CBT", "in unguided digital CBT")


def _n(value: float) -> str:
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"


def describe_feature(name: str, obs: NDArray[np.floating]) -> str:
    """One feature of an observation in a clinician's words ("PHQ-9 18, up 4 in 4 weeks")."""
    v = float(obs[FEATURE_INDEX[name]])
    if name.startswith(MASK_PREFIX):
        base = name[len(MASK_PREFIX):]
        return f"{_LABELS[base]} {'measured this week' if v >= 0.5 else 'not measured this week'}"
    if name == "phq9":
        change = float(obs[FEATURE_INDEX["phq9_change_4w"]])
        trend = "unchanged" if change == 0 else f"{'up' if change > 0 else 'down'} {_n(abs(change))}"
        return f"PHQ-9 {_n(v)}, {trend} in 4 weeks"
    if name == "phq9_change_4w":
        return f"PHQ-9 {'up' if v > 0 else 'down' if v < 0 else 'unchanged'} {_n(abs(v))} in 4 weeks".replace(
            "unchanged 0", "unchanged")
    words = {
        "phq9_item9": lambda: f"PHQ-9 item 9 (self-harm) {_n(v)} of 3",
        "gad7": lambda: f"GAD-7 {_n(v)}",
        "weeks_since_measurement": lambda: f"PHQ-9 last measured {_n(v)} weeks ago",
        "phq9_at_intake": lambda: f"PHQ-9 {_n(v)} at intake",
        "treatment_level": lambda: f"treatment step {_n(v)} of {MAX_TREATMENT_LEVEL}",
        "weeks_on_step": lambda: f"{_n(v)} weeks on the current step",
        "dose_level": lambda: ("no antidepressant" if v <= 0 else f"dose level {_n(v)} of {MAX_DOSE_LEVEL}"),
        "weeks_on_dose": lambda: f"{_n(v)} weeks since the dose changed",
        "on_psychotherapy": lambda: "in psychotherapy" if v >= 0.5 else "not in psychotherapy",
        "on_digital": lambda: _DIGITAL[round(min(max(v, 0), 2))],
        "on_augmentation": lambda: "augmented" if v >= 0.5 else "not augmented",
        "in_specialist_care": lambda: "in specialist care" if v >= 0.5 else "not in specialist care",
        "side_effect_burden": lambda: f"side-effect burden {_n(v)} of 10",
        "adherence": lambda: f"takes {v:.0%} of doses",
        "engagement": lambda: f"engagement {v:.0%}",
        "weeks_in_care": lambda: f"{_n(v)} weeks in care",
        "age_band": lambda: f"age {_AGE_BANDS[round(min(max(v, 0), 3))]}",
        "sex": lambda: "male" if v >= 0.5 else "female",
        "prior_episodes": lambda: f"{_n(v)} prior episodes",
        "digital_access": lambda: "has digital access" if v >= 0.5 else "no digital access",
        "weeks_well": lambda: f"{_n(v)} weeks in sustained remission" if v > 0 else "not in sustained remission",
        "sleep_hours": lambda: f"sleeps {_n(v)} h a night",
        "daily_steps": lambda: f"{_n(v)} thousand steps a day",
    }
    return words[name]()


_LABELS: Final[dict[str, str]] = {
    "phq9": "PHQ-9",
    "phq9_item9": "PHQ-9 item 9",
    "gad7": "GAD-7",
    "side_effect_burden": "side-effect burden",
    "adherence": "adherence",
    "sleep_hours": "sleep",
    "daily_steps": "daily steps",
}
assert set(_LABELS) == set(MASKABLE_FEATURES)
