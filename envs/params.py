"""Simulator parameters (the calibrated model) and settings (what a user varies).

``SimParams`` holds the numbers in ``envs/params/default.yaml``: effect sizes,
delays and hazards with their sources. ``EnvSettings`` holds the knobs a
researcher turns per experiment: horizon, reward weights, and DTR-Gym-style
stress settings (observation noise, missingness, between-patient variation).
"""

from __future__ import annotations

import dataclasses
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


@dataclass(frozen=True)
class Tolerability:
    class_side_effects: tuple[float, ...]
    augment_side_effects: float
    side_effect_habituation_tau: float
    side_effect_persistent_share: float
    adherence_loss_per_side_effect: float
    adherence_full_effect: float


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


@dataclass(frozen=True)
class Dropout:
    base_logit: float
    side_effect_coef: float
    no_improvement_coef: float
    disengagement_coef: float
    failed_step_coef: float


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
class SimParams:
    """The calibrated patient-response model. Load with :func:`load_params`."""

    population: Population
    response: Response
    course: Course
    tolerability: Tolerability
    engagement: Engagement
    dropout: Dropout
    measurement: Measurement

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


RewardWeights = dict[str, float]


def default_reward_weights() -> RewardWeights:
    """Reward = improvement + remission bonus - side effects - dropout - cost."""
    return {
        "improvement": 0.1,  # per PHQ-9 point of true improvement this week
        "remission": 0.5,  # per week with true PHQ-9 below the remission threshold
        "side_effects": 0.03,  # per point of side-effect burden (0-10) per week
        "dropout": 3.0,  # once, when the patient leaves care
        "cost": 1.0,  # scales the per-action costs below
        "invalid_action": 0.5,  # per clinically disallowed action (invalid_action="penalize")
    }


def default_action_costs() -> dict[str, float]:
    """One-off cost of each action (relative units; specialist care is dearest)."""
    return {
        "continue": 0.0,
        "raise_dose": 0.02,
        "switch_within_class": 0.05,
        "switch_class": 0.05,
        "augment": 0.08,
        "add_psychotherapy": 0.4,
        "add_digital_guided": 0.15,
        "add_digital_unguided": 0.03,
        "engagement_nudge": 0.02,
        "refer_specialist": 0.8,
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
    action_costs: dict[str, float] = field(default_factory=default_action_costs)

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
        unknown = set(self.action_costs) - set(default_action_costs())
        if unknown:
            raise ValueError(
                f"unknown action cost(s) {sorted(unknown)}; expected {sorted(default_action_costs())}"
            )
        # Partial dicts from a config merge over the defaults.
        object.__setattr__(self, "reward_weights", {**default_reward_weights(), **self.reward_weights})
        object.__setattr__(self, "action_costs", {**default_action_costs(), **self.action_costs})


T = TypeVar("T")


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
    for name in names:
        value = values[name]
        hint = hints[name]
        try:
            if hint is float:
                kwargs[name] = float(value)
            elif hint == tuple[float, ...]:
                kwargs[name] = tuple(float(v) for v in value)
            else:
                kwargs[name] = value
        except (TypeError, ValueError):
            raise ValueError(f"{where}.{name}: expected {hint}, got {value!r}") from None
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
