"""Request and response models of the REST API (pydantic), built from ``envs.spec``.

The patient feature model is generated from the feature list and bounds in
:mod:`envs.spec`, so the OpenAPI schema, the validation and the simulator can
never disagree about a range (PHQ-9 0-27, item 9 0-3, ...). Unknown fields are
refused, so a misspelt feature is an error rather than a silently missing value.
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, create_model, field_validator
from pydantic_core import PydanticCustomError

from envs.spec import BASE_FEATURES, FEATURE_BOUNDS

#: Features that are whole numbers (scores, counts, codes, flags).
INTEGER_FEATURES: Final[frozenset[str]] = frozenset({
    "phq9", "phq9_item9", "gad7", "weeks_since_measurement", "phq9_change_4w", "phq9_at_intake",
    "treatment_level", "weeks_on_step", "dose_level", "weeks_on_dose", "on_psychotherapy", "on_digital",
    "on_augmentation", "in_specialist_care", "weeks_in_care", "age_band", "sex", "prior_episodes",
    "digital_access", "weeks_well",
})
assert INTEGER_FEATURES <= set(BASE_FEATURES)

DECISION_SUPPORT: Final = (
    "Decision support only: carepath suggests, the clinician decides. Every figure is a model estimate "
    "with the uncertainty shown, learned from logged and simulated care, not a prediction for this patient alone."
)

_FEATURE_HELP: Final[dict[str, str]] = {
    "phq9": "last PHQ-9 total (0-27)",
    "phq9_item9": "last PHQ-9 item 9, thoughts of self-harm (0-3)",
    "gad7": "last GAD-7 total (0-21)",
    "age_band": "0: 18-29, 1: 30-44, 2: 45-59, 3: 60+",
    "sex": "0 female, 1 male",
    "on_digital": "0 none, 1 guided, 2 unguided digital CBT",
}


def _json_number(value: Any) -> Any:
    """Let only a JSON number (or null) through: ``true`` would otherwise count as 1 and ``"12"`` as 12."""
    if value is None or (isinstance(value, int | float) and not isinstance(value, bool)):
        return value
    raise PydanticCustomError("number_type", "Input should be a number, not {kind}",
                              {"kind": _JSON_KINDS.get(type(value), type(value).__name__)})


_JSON_KINDS: Final[dict[type, str]] = {bool: "a boolean", str: "a string", list: "an array", dict: "an object"}


Number = BeforeValidator(_json_number)


def _feature_field(name: str) -> Any:
    low, high = FEATURE_BOUNDS[name]
    kind: Any = int if name in INTEGER_FEATURES else float
    bound_low: Any = int(low) if kind is int else low
    bound_high: Any = int(high) if kind is int else high
    description = _FEATURE_HELP.get(name, name.replace("_", " "))
    bounded: Any = Annotated[kind, Field(ge=bound_low, le=bound_high, allow_inf_nan=False)]
    return (Annotated[bounded | None, Number, Field(description=description)], None)


PatientFeatures: type[BaseModel] = create_model(
    "PatientFeatures",
    __config__=ConfigDict(extra="forbid"),
    __doc__="A patient's state by named feature; any may be missing (null or absent).",
    **{name: _feature_field(name) for name in BASE_FEATURES},
)


class RecommendationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    patient_id: str | None = Field(None, min_length=1, max_length=128,
                                   description="the clinic's patient id; stored only as a keyed pseudonym")
    features: PatientFeatures  # type: ignore[valid-type]
    top_k: Annotated[int, Number] = Field(3, ge=1, le=10, description="how many ranked next steps to return")
    explain: bool = Field(True, strict=True, description="add the SHAP rationale of each suggestion")

    @field_validator("patient_id")
    @classmethod
    def _printable(cls, value: str | None) -> str | None:
        # control, bidi-override, zero-width and unassigned characters spoof how an id reads in a log or a list
        if value is not None and not value.isprintable():
            raise ValueError("a patient id must be printable: no control, formatting (bidi override, zero-width) "
                             "or unassigned characters")
        return value


class ImputedFeature(BaseModel):
    feature: str
    value: float
    reason: str


class Contribution(BaseModel):
    feature: str
    value: float
    shap: float
    text: str


class Rationale(BaseModel):
    method: str
    base_value: float
    score: float
    contributions: list[Contribution]


class BenefitEstimate(BaseModel):
    phq9_change_vs_continue: float = Field(description="expected PHQ-9 change against continuing; negative = better")
    low: float
    high: float
    level: float
    horizon_weeks: int
    method: str


class Suggestion(BaseModel):
    id: str
    rank: int
    action: str
    label: str
    care_class: str
    score: float
    score_kind: Literal["q_value", "logit"]
    probability: float
    critical: bool
    benefit: BenefitEstimate | None
    rationale: Rationale | None


class BlockingRule(BaseModel):
    name: str
    description: str
    critical: bool


class BlockedAction(BaseModel):
    action: str
    label: str
    rules: list[BlockingRule]


class Certification(BaseModel):
    """What the logged data vouches for (``carepath certify``), in words a clinician can read."""

    certified: bool
    id: str | None = None
    statement: str  # one sentence: certified or not, and the bound
    first_choice: str | None = None  # whether taking only the first-ranked step is covered
    confidence: float | None = None
    lower_bound_pp: float | None = None  # remission vs current care, percentage points
    improvement_pp: float | None = None


class PolicyInfo(BaseModel):
    name: str
    algorithm: str
    version: str
    created: str
    evaluation_summary: list[str]
    certification: Certification


class Recommendation(BaseModel):
    decision_support: str = DECISION_SUPPORT
    critical: bool
    alerts: list[str]
    suggestions: list[Suggestion]
    blocked: list[BlockedAction]
    imputed: list[ImputedFeature]
    uncertainty: str
    policy: PolicyInfo


class RecommendationResponse(Recommendation):
    audit_id: str


class FieldError(BaseModel):
    """One reason a request was refused: where in the request (``loc``, from ``body``, ``query`` or
    ``path`` down to the field) and why."""

    loc: list[str | int]
    msg: str
    type: str


class ErrorAnswer(BaseModel):
    """A refused request: the errors naming each field at fault, or a message saying what is wrong."""

    detail: str | list[FieldError]


#: The documented 422 of an operation with a body: validation errors naming the field (``loc``), or a
#: message (a FHIR prefetch or feedback that is valid JSON but cannot be used, which it names).
UNPROCESSABLE: Final[dict[int | str, dict[str, Any]]] = {
    422: {"model": ErrorAnswer, "description": "Refused: the errors name each field at fault, or a message "
                                                "says what is wrong"}}


class PolicySummary(BaseModel):
    name: str
    algorithm: str
    version: str
    created: str
    features: list[str]
    actions: list[str]
    evaluation_summary: list[str]
    evaluation: dict[str, Any]
