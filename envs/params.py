"""Simulator parameters (the calibrated model) and settings (what a user varies).

``SimParams`` holds the numbers in ``envs/params/default.yaml``: effect sizes,
delays and hazards with their sources. ``EnvSettings`` holds the knobs a
researcher turns per experiment: horizon, reward weights, and DTR-Gym-style
stress settings (observation noise, missingness, between-patient variation).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_type_hints

import yaml

DEFAULT_PARAMS_PATH = Path(__file__).with_name("params") / "default.yaml"


@dataclass(frozen=True)
class Population:
    severity_mean: float
    severity_sd: float
    severity_min: float
    anxiety_slope: float
    anxiety_sd: float
    chronic_share: float
    prior_episodes_mean: float
    age_band_probs: tuple[float, ...]
    male_share: float
    digital_access: float
    digital_access_over_60: float
    adherence_beta: tuple[float, ...]
    side_effect_sensitivity_sd: float
    engagement_beta: tuple[float, ...]
    dropout_propensity_sd: float


@dataclass(frozen=True)
class Response:
    treatment_resistant_share: float
    resistant_effect_factor: float
    drug_responder_prob: float
    within_class_correlation: float
    resistance_per_failed_step: float
    drug_effect_responder: float
    drug_effect_partial: float
    class_effect: tuple[float, ...]
    dose_factor: tuple[float, ...]
    onset_tau_drug: float
    augment_responder_prob: float
    augment_effect_responder: float
    augment_effect_partial: float
    onset_tau_augment: float
    psychotherapy_responder_prob: float
    psychotherapy_effect_responder: float
    psychotherapy_effect_partial: float
    onset_tau_psychotherapy: float
    digital_responder_prob: float
    digital_effect_responder: float
    digital_effect_partial: float
    onset_tau_digital: float
    specialist_effect: float
    onset_tau_specialist: float
    nonspecific_responder_prob: float
    nonspecific_effect_responder: float
    nonspecific_effect_partial: float
    nonspecific_chronic_factor: float
    onset_tau_nonspecific: float
    nondrug_resistance_weight: float


@dataclass(frozen=True)
class Course:
    approach_rate: float
    process_noise_sd: float
    anxiety_process_noise_sd: float
    spontaneous_remission_hazard: float
    spontaneous_remission_factor: float
    relapse_hazard: float
    relapse_hazard_on_treatment: float
    relapse_hazard_per_prior_episode: float
    remission_threshold: float
    relapse_per_failed_step: float
    relapse_residual_coef: float
    episode_resolution_rate: float
    resolved_share: float
    well_response_share: float
    relapse_unresolved_coef: float
    relapse_grace_weeks: float


@dataclass(frozen=True)
class Tolerability:
    class_side_effects: tuple[float, ...]
    augment_side_effects: float
    side_effect_habituation_tau: float
    side_effect_persistent_share: float
    adherence_loss_per_side_effect: float
    adherence_full_effect: float
    discontinuation_side_effects: float
    discontinuation_tau: float
    complexity_adherence_loss: float
    adherence_decline_when_well: float


@dataclass(frozen=True)
class Engagement:
    revert_rate: float
    loss_when_not_improving: float
    nudge_boost: float
    habituation_unguided: float
    habituation_guided: float
    digital_start_engagement: float
    digital_dropout_base_unguided: float
    digital_dropout_base_guided: float
    human_support: float
    psychotherapy_support_share: float
    nudge_habituation: float
    nudge_memory: float


@dataclass(frozen=True)
class Dropout:
    base_logit: float
    side_effect_coef: float
    no_improvement_coef: float
    disengagement_coef: float
    failed_step_coef: float
    change_coef: float
    burden_coef: float


@dataclass(frozen=True)
class Measurement:
    phq9_noise_sd: float
    gad7_noise_sd: float
    response_logit: float
    response_engagement_coef: float
    response_severity_coef: float
    side_effect_report_prob: float
    adherence_report_prob: float
    item9_base: float
    item9_severity_coef: float
    item9_thresholds: tuple[float, ...]
    specialist_item9_reduction: float
    wearable_observed_prob: float
    sleep_mean: float
    sleep_severity_coef: float
    sleep_noise_sd: float
    steps_mean: float
    steps_severity_coef: float
    steps_noise_sd: float


@dataclass(frozen=True)
class Services:
    psychotherapy_wait_mean_weeks: float
    specialist_wait_mean_weeks: float


@dataclass(frozen=True)
class Costs:
    """The cost model (GBP): one-off costs of the visit or referral an action
    starts, and weekly costs of each active treatment."""

    review_visit: float
    psychotherapy_assessment: float
    digital_setup_guided: float
    digital_setup_unguided: float
    nudge: float
    specialist_first_appointment: float
    weekly_drug: float
    weekly_augmentation: float
    weekly_psychotherapy: float
    weekly_digital_guided: float
    weekly_digital_unguided: float
    weekly_specialist: float
    psychotherapy_course_weeks: float
    digital_course_weeks: float

    def action_costs(self) -> dict[str, float]:
        """One-off cost of each action (GBP); ``EnvSettings.action_costs`` overrides some."""
        return {
            "continue": 0.0,  # the weekly measurement contact is part of every arm
            "raise_dose": self.review_visit,
            "switch_within_class": self.review_visit,
            "switch_class": self.review_visit,
            "augment": self.review_visit,
            "add_psychotherapy": self.psychotherapy_assessment,
            "add_digital_guided": self.digital_setup_guided,
            "add_digital_unguided": self.digital_setup_unguided,
            "engagement_nudge": self.nudge,
            "refer_specialist": self.specialist_first_appointment,
            "taper_antidepressant": self.review_visit,
        }


@dataclass(frozen=True)
class SimParams:
    """The calibrated patient-response model. Load with :func:`load_params`."""

    population: Population
    response: Response
    course: Course
    tolerability: Tolerability
    engagement: Engagement
    dropout: Dropout
    measurement: Measurement
    services: Services
    costs: Costs

    def replace(self, overrides: Mapping[str, Any]) -> SimParams:
        """A copy with dotted overrides, e.g. ``{"response.drug_responder_prob": 0.5}``."""
        sections: dict[str, dict[str, Any]] = {}
        for dotted, value in overrides.items():
            section, _, name = dotted.partition(".")
            if not hasattr(self, section) or not name:
                raise ValueError(f"unknown simulator parameter {dotted!r}")
            sections.setdefault(section, {})[name] = value
        replaced: dict[str, Any] = {}
        for section, values in sections.items():
            current = getattr(self, section)
            merged = {**dataclasses.asdict(current), **values}
            replaced[section] = _build(type(current), merged, section)
        return dataclasses.replace(self, **replaced)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """sha256 of the parameter values (not of the file: comments and layout do
        not count), recorded in logs and bundles to tell which simulator made them."""
        import hashlib
        import json

        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


RewardWeights = dict[str, float]


def default_reward_weights() -> RewardWeights:
    """Reward = improvement + remission bonus - side effects - dropout - cost."""
    return {
        "improvement": 0.1,  # per PHQ-9 point of true improvement this week
        "remission": 0.5,  # per week with true PHQ-9 below the remission threshold
        "side_effects": 0.03,  # per point of side-effect burden (0-10) per week
        "dropout": 3.0,  # once, when the patient leaves care
        "cost": 0.05,  # per 100 GBP of care (envs.params.Costs: one-off action costs + weekly treatment costs)
        "invalid_action": 0.5,  # per clinically disallowed action (invalid_action="penalize")
    }


@dataclass(frozen=True)
class EnvSettings:
    """What a user varies per experiment; every field is an env kwarg.

    ``observation_noise``, ``missingness`` and ``heterogeneity`` scale the
    calibrated measurement noise, the share of missing measurements and the
    between-patient spread (1.0 = calibrated, 0.0 = none), so that a policy
    can be stress-tested as in DTR-Gym.
    """

    horizon: int = 26
    observation_noise: float = 1.0
    missingness: float = 1.0
    heterogeneity: float = 1.0
    wearables: bool = True
    invalid_action: Literal["raise", "penalize"] = "penalize"
    initial_treatment: Literal["ssri", "none"] = "ssri"
    reward_weights: RewardWeights = field(default_factory=default_reward_weights)
    #: one-off action costs (GBP) that override the parameter file's cost model
    action_costs: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.horizon, int) or self.horizon < 1:
            raise ValueError(f"horizon must be a positive integer of weeks, got {self.horizon!r}")
        for name in ("observation_noise", "missingness", "heterogeneity"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not 0.0 <= value <= 10.0:
                raise ValueError(f"{name} must be a number in [0, 10], got {value!r}")
        if self.missingness > 1.0 / 0.95:
            # The scale multiplies the missing share; above ~1.05 every
            # measurement would be missing and the patient unobservable.
            raise ValueError(f"missingness must be at most 1.05, got {self.missingness!r}")
        if self.invalid_action not in ("raise", "penalize"):
            raise ValueError(
                f"invalid_action must be 'raise' or 'penalize', got {self.invalid_action!r}"
            )
        if self.initial_treatment not in ("ssri", "none"):
            raise ValueError(
                f"initial_treatment must be 'ssri' or 'none', got {self.initial_treatment!r}"
            )
        unknown = set(self.reward_weights) - set(default_reward_weights())
        if unknown:
            raise ValueError(
                f"unknown reward weight(s) {sorted(unknown)}; expected {sorted(default_reward_weights())}"
            )
        from envs.spec import ACTION_NAMES

        unknown = set(self.action_costs) - set(ACTION_NAMES)
        if unknown:
            raise ValueError(f"unknown action cost(s) {sorted(unknown)}; expected some of {sorted(ACTION_NAMES)}")
        for name, value in self.action_costs.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value < math.inf:
                raise ValueError(f"action cost {name!r} must be a number of GBP >= 0, got {value!r}")
        # Partial dicts from a config merge over the defaults.
        object.__setattr__(self, "reward_weights", {**default_reward_weights(), **self.reward_weights})
        object.__setattr__(self, "action_costs", dict(self.action_costs))


T = TypeVar("T")

#: Allowed range of a parameter, by section and name pattern (first match wins);
#: anything not listed only has to be a finite number.
_RANGES: tuple[tuple[str, str, float, float], ...] = (
    ("costs", r".*", 0.0, 1e6),
    ("services", r".*", 0.0, 520.0),
    (r".*", r"(relapse_hazard|relapse_hazard_on_treatment|spontaneous_remission_hazard)", 0.0, 1.0),
    ("tolerability", "adherence_full_effect", 1e-3, 1.0),  # a divisor
    ("engagement", "nudge_memory", 0.0, 1.0),
    ("engagement", "nudge_habituation", 0.0, 100.0),
    (r".*", r".*(_prob|_probs|_share|_correlation|_rate|_full_effect|_factor)|digital_access.*", 0.0, 1.0),
    (r".*", r"class_effect", 0.0, 2.0),  # relative size of each drug class
    (r".*", r".*_beta", 1e-3, 1e4),  # Beta distribution shape parameters
    (r".*", r"onset_tau_.*|.*_tau", 1e-3, 520.0),
    (r".*", r".*_sd", 0.0, 100.0),
    (r".*", r"severity_mean|severity_min|remission_threshold", 0.0, 27.0),
    (r".*", r"drug_effect_.*|augment_effect_.*|psychotherapy_effect_.*"
            r"|digital_effect_.*|specialist_effect|nonspecific_effect_.*", 0.0, 1.0),
)


def allowed_range(section: str, name: str) -> tuple[float, float]:
    """The range a parameter must lie in ((-inf, inf) when only finiteness is checked)."""
    for sec, pattern, low, high in _RANGES:
        if re.fullmatch(sec, section) and re.fullmatch(pattern, name):
            return low, high
    return -math.inf, math.inf


class _RangeError(ValueError):
    pass


def _check_range(where: str, section: str, name: str, value: float) -> None:
    low, high = allowed_range(section, name)
    if not math.isfinite(value) or not low <= value <= high:
        raise _RangeError(f"{where}.{name}: {value!r} is outside the allowed range [{low:g}, {high:g}]")


def _build(cls: type[T], values: Mapping[str, Any], where: str) -> T:
    """Build a params dataclass from a mapping; name any missing or unknown key."""
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(values) - names
    if unknown:
        raise ValueError(f"{where}: unknown parameter(s) {sorted(unknown)}")
    missing = names - set(values)
    if missing:
        raise ValueError(f"{where}: missing parameter(s) {sorted(missing)}")
    kwargs: dict[str, Any] = {}
    section = where.rpartition(":")[2]
    for name in names:
        value = values[name]
        hint = hints[name]
        try:
            if isinstance(value, bool | str):  # YAML's yes/no and quoted numbers are typos here
                raise TypeError
            if hint is float:
                kwargs[name] = float(value)
                _check_range(where, section, name, kwargs[name])
            elif hint == tuple[float, ...]:
                if isinstance(value, Mapping) or any(isinstance(v, bool | str) for v in value):
                    raise TypeError
                kwargs[name] = tuple(float(v) for v in value)
                for v in kwargs[name]:
                    _check_range(where, section, name, v)
            else:
                kwargs[name] = value
        except _RangeError:
            raise
        except (TypeError, ValueError):
            expected = "a number" if hint is float else "a list of numbers"
            raise ValueError(f"{where}.{name}: expected {expected}, got {value!r}") from None
    return cls(**kwargs)


def load_params(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> SimParams:
    """Read simulator parameters from YAML (default: the calibrated file)."""
    path = Path(path) if path is not None else DEFAULT_PARAMS_PATH
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"simulator parameter file not found: {path}") from None
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    sections: dict[str, Any] = {}
    for f in dataclasses.fields(SimParams):
        if f.name not in raw:
            raise ValueError(f"{path}: missing section {f.name!r}")
        section_cls = get_type_hints(SimParams)[f.name]
        sections[f.name] = _build(section_cls, raw[f.name] or {}, f"{path}:{f.name}")
    unknown = set(raw) - set(sections)
    if unknown:
        raise ValueError(f"{path}: unknown section(s) {sorted(unknown)}")
    params = SimParams(**sections)
    return params.replace(overrides) if overrides else params
