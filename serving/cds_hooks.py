"""HL7 CDS Hooks 2.0: a ``patient-view`` service that reads FHIR R4 prefetch and answers one card.

- ``GET /cds-services``: discovery (no token, as the specification wants).
- ``POST /cds-services/carepath-next-step``: the EHR sends the prefetch (the
  Patient, PHQ-9, item 9, GAD-7, active MedicationRequests); the answer is one
  card with the ranked next steps as suggestions, each carrying a draft FHIR
  ServiceRequest the clinician may accept, and the reasons they may give for
  overriding it. The card's ``uuid`` is the audit id, so feedback links back to
  what was shown.
- ``POST /cds-services/carepath-next-step/feedback``: what the clinician chose.

This service never queries the FHIR server itself (it is given no reason to
hold FHIR credentials): without the required prefetch it answers 412. The raw
prefetch holds names and identifiers, so the audit trail gets only the derived
features; ``fhirAuthorization`` is neither stored nor logged.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Annotated, Any, Final, Literal

from fastapi import APIRouter, Depends, HTTPException
from fastapi.responses import JSONResponse
from fhir.resources.R4B.servicerequest import ServiceRequest
from pydantic import BaseModel, ConfigDict, Field

from envs.spec import FEATURE_NAMES
from serving.app import ServingState, StateDep, StrictJSONRoute, require_scope
from serving.audit import UnknownAuditId
from serving.auth import TokenInfo
from serving.fhir_input import REQUIRED_PREFETCH, PrefetchError, features_from_prefetch
from serving.recommender import Recommender
from serving.schemas import UNPROCESSABLE, Recommendation, Suggestion

log = logging.getLogger("carepath.cds_hooks")

SERVICE_ID: Final = "carepath-next-step"
HOOK: Final = "patient-view"
TOP_K: Final = 3
SUMMARY_MAX: Final = 140
CARE_SYSTEM: Final = "https://carepath.example"
#: The coding system of the action in a suggested ServiceRequest (how feedback finds the action again).
ACTION_SYSTEM: Final = f"{CARE_SYSTEM}/action"
OVERRIDE_SYSTEM: Final = f"{CARE_SYSTEM}/override-reason"

PREFETCH: Final[dict[str, str]] = {
    "patient": "Patient/{{context.patientId}}",
    "phq9": "Observation?patient={{context.patientId}}&code=http://loinc.org|44261-6&_sort=-date&_count=20",
    "item9": "Observation?patient={{context.patientId}}&code=http://loinc.org|44260-8&_sort=-date&_count=20",
    "gad7": "Observation?patient={{context.patientId}}&code=http://loinc.org|70274-6&_sort=-date&_count=20",
    "medications": "MedicationRequest?patient={{context.patientId}}&status=active",
}
assert set(REQUIRED_PREFETCH) <= set(PREFETCH)

OVERRIDE_REASONS: Final[tuple[dict[str, str], ...]] = tuple(
    {"system": OVERRIDE_SYSTEM, "code": code, "display": display} for code, display in (
        ("patient-preference", "The patient prefers another option"),
        ("contraindication", "Contraindicated for this patient"),
        ("clinical-judgement", "Clinical judgement: another step is better now"),
        ("already-done", "Already done or already planned"),
        ("data-incorrect", "The data shown are wrong or out of date"),
    ))

TOPIC: Final[dict[str, str]] = {"system": f"{CARE_SYSTEM}/topic", "code": "depression-next-step",
                                "display": "Next step of depression care"}

DISCOVERY: Final[dict[str, Any]] = {"services": [{
    "hook": HOOK,
    "id": SERVICE_ID,
    "title": "carepath: next step of depression care",
    "description": "Ranked next steps of depression care (measurement-based stepped care) with the expected PHQ-9 "
                   "change, its uncertainty and the reasons, from a policy learned offline. Decision support only.",
    "prefetch": PREFETCH,
    "usageRequirements": "Send the prefetch 'patient' and 'phq9' (required) and 'item9', 'gad7', 'medications' "
                         "(recommended): this service does not query the FHIR server itself. Needs a bearer "
                         "token with the 'recommend' scope (feedback: 'feedback'). For adults in treatment for "
                         "depression.",
}]}


# ----------------------------------------------------------------------------- request models


class HookContext(BaseModel):
    """``patient-view`` context; other context fields (encounterId, ...) are accepted and unused."""

    model_config = ConfigDict(extra="allow")

    userId: str = Field(min_length=1, max_length=256)
    # a FHIR id (R4: [A-Za-z0-9\-.]{1,64}); it goes into the suggested ServiceRequest's subject reference
    patientId: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9\-.]{1,64}$")


class HookRequest(BaseModel):
    """A CDS Hooks 2.0 service call."""

    model_config = ConfigDict(extra="allow")

    hook: str = Field(min_length=1, max_length=100)
    hookInstance: uuid.UUID
    context: HookContext
    prefetch: dict[str, Any] | None = None
    fhirServer: str | None = Field(None, max_length=2000)
    # an access token to the EHR: accepted as the specification allows, never stored, logged or shown
    fhirAuthorization: dict[str, Any] | None = Field(None, repr=False, exclude=True)


class Coding(BaseModel):
    system: str | None = Field(None, max_length=500)
    code: str | None = Field(None, max_length=200)
    display: str | None = Field(None, max_length=500)


class OverrideReason(BaseModel):
    reason: Coding | None = None
    userComment: str | None = Field(None, max_length=500)


class AcceptedSuggestion(BaseModel):
    id: str = Field(min_length=1, max_length=64)


class FeedbackItem(BaseModel):
    card: uuid.UUID
    outcome: Literal["accepted", "overridden"]
    acceptedSuggestions: list[AcceptedSuggestion] = Field(default_factory=list, max_length=20)
    overrideReason: OverrideReason | None = None
    outcomeTimestamp: datetime


class FeedbackBody(BaseModel):
    feedback: list[FeedbackItem] = Field(min_length=1, max_length=50)


# ----------------------------------------------------------------------------- the router


def build_router() -> APIRouter:
    """The CDS Hooks endpoints (included by :func:`serving.app.create_app`)."""
    router = APIRouter(tags=["cds-hooks"], route_class=StrictJSONRoute)

    @router.get("/cds-services")
    async def discovery() -> dict[str, Any]:
        return DISCOVERY

    @router.post(f"/cds-services/{SERVICE_ID}", responses=UNPROCESSABLE)
    async def patient_view(body: HookRequest, state: StateDep,
                     token: Annotated[TokenInfo, Depends(require_scope("recommend"))]) -> Any:
        if body.hook != HOOK:
            raise HTTPException(400, detail=f"service {SERVICE_ID!r} answers the {HOOK!r} hook, not {body.hook!r}")
        prefetch = body.prefetch or {}
        missing = [key for key in REQUIRED_PREFETCH if prefetch.get(key) is None]
        if missing:
            return JSONResponse(status_code=412, content={
                "detail": f"required prefetch {', '.join(map(repr, missing))} is missing or null; this service "
                          "does not query the FHIR server itself: send the prefetch templates of GET /cds-services",
                "missingPrefetch": missing})
        try:
            features, notes = features_from_prefetch(prefetch, datetime.now(UTC), patient_id=body.context.patientId)
        except PrefetchError as err:
            raise HTTPException(422, detail=str(err)) from None
        recommender = state.recommender(None)
        await recommender.explainer_warmed()
        recommendation = recommender.recommend(features, top_k=TOP_K, explain=True)
        audit_uuid = uuid.uuid4()
        answer = {"cards": [build_card(recommendation, notes, card_uuid=audit_uuid,
                                       patient_id=body.context.patientId)]}
        _record(state, recommender, token, body, features, answer, audit_uuid)
        return answer

    @router.post(f"/cds-services/{SERVICE_ID}/feedback", responses=UNPROCESSABLE)
    async def feedback(body: FeedbackBody, state: StateDep,
                 token: Annotated[TokenInfo, Depends(require_scope("feedback"))]) -> dict[str, Any]:
        # every item is checked before any is written: a 4xx leaves nothing half-recorded
        rows = [_feedback_rows(state, item) for item in body.feedback]
        for audit_id, suggestion_id, action, outcome, reason in (row for group in rows for row in group):
            try:
                state.audit.record_feedback(audit_id=audit_id, token_name=token.name, suggestion_id=suggestion_id,
                                            action=action, outcome=outcome, override_reason=reason)
            except UnknownAuditId as err:  # pragma: no cover - checked above; kept for a concurrent purge
                raise HTTPException(404, detail=str(err)) from None
        return {}

    @router.post("/cds-services/{service_id}")
    @router.post("/cds-services/{service_id}/feedback")
    async def unknown_service(service_id: str) -> None:
        raise HTTPException(404, detail=f"unknown CDS service {service_id[:100]!r}; this server offers "
                                        f"{SERVICE_ID!r} (GET /cds-services)")

    return router


def _record(state: ServingState, recommender: Recommender, token: TokenInfo, body: HookRequest,
            features: Mapping[str, float], answer: Mapping[str, Any], audit_uuid: uuid.UUID) -> None:
    """Audit the call: the derived features only, never the raw prefetch (names, identifiers)."""
    observation = recommender.observation(features)
    state.audit.record_recommendation(
        audit_id=audit_uuid.hex, token_name=token.name, channel="cds-hooks", patient_id=body.context.patientId,
        policy_name=recommender.policy.name, policy_version=recommender.info.version,
            certificate_id=recommender.info.certification.id,
        features=dict(zip(FEATURE_NAMES, map(float, observation), strict=True)),
        request={"hook": body.hook, "hookInstance": str(body.hookInstance), "features": dict(features)},
        response=answer)


FeedbackRow = tuple[str, str, str, str, str | None]


def _feedback_rows(state: ServingState, item: FeedbackItem) -> list[FeedbackRow]:
    """The feedback rows one item records: (audit id, suggestion id, action, outcome, override reason)."""
    audit_id = item.card.hex
    record = state.audit.get(audit_id)
    cards = record.response.get("cards") if record is not None and isinstance(record.response, dict) else None
    if record is None or record.channel != "cds-hooks" or not cards:
        raise HTTPException(404, detail=f"unknown card {str(item.card)!r}: no CDS Hooks card was answered under it")
    actions = suggestion_actions(cards[0])
    if item.outcome == "accepted":
        if not item.acceptedSuggestions:
            raise HTTPException(422, detail=f"card {str(item.card)!r}: outcome 'accepted' needs acceptedSuggestions")
        unknown = [s.id for s in item.acceptedSuggestions if s.id not in actions]
        if unknown:
            raise HTTPException(422, detail=f"card {str(item.card)!r} has no suggestion {unknown[0][:64]!r}; "
                                            f"its suggestions are {', '.join(actions)}")
        return [(audit_id, s.id, actions[s.id], "accepted", None) for s in item.acceptedSuggestions]
    first = next(iter(actions))  # the rank-1 suggestion: what the clinician overrode
    return [(audit_id, first, actions[first], "overridden", _override_text(item.overrideReason))]


def suggestion_actions(card: Mapping[str, Any]) -> dict[str, str]:
    """Suggestion uuid -> action name of a stored card, rank-1 first (read from the ServiceRequest coding)."""
    found: dict[str, str] = {}
    suggestions = sorted(card.get("suggestions", []), key=lambda s: not s.get("isRecommended", False))
    for suggestion in suggestions:
        for action in suggestion.get("actions", []):
            codings = action.get("resource", {}).get("code", {}).get("coding", [])
            names = [c["code"] for c in codings if c.get("system") == ACTION_SYSTEM and "code" in c]
            if names:
                found[str(suggestion["uuid"])] = names[0]
                break
    return found


def _override_text(reason: OverrideReason | None) -> str | None:
    if reason is None:
        return None
    code = reason.reason.code if reason.reason is not None else None
    parts = [p for p in (code, reason.userComment) if p]
    return ": ".join(parts) or None


# ----------------------------------------------------------------------------- the card


def build_card(rec: Recommendation, notes: list[str], *, card_uuid: uuid.UUID, patient_id: str) -> dict[str, Any]:
    """One CDS Hooks card holding the ranked suggestions of ``rec``."""
    summary = card_summary(rec)
    assert len(summary) <= SUMMARY_MAX, summary
    # an uncertified policy is a warning in itself: no logged data vouches for it
    indicator = "critical" if rec.critical else "warning" if rec.alerts or not rec.policy.certification.certified \
        else "info"
    return {
        "uuid": str(card_uuid),
        "summary": summary,
        "detail": card_detail(rec, notes),
        "indicator": indicator,
        "source": {"label": f"carepath ({rec.policy.name} {rec.policy.version})", "topic": TOPIC},
        "suggestions": [_suggestion(s, patient_id) for s in rec.suggestions],
        "selectionBehavior": "at-most-one",
        "overrideReasons": [dict(r) for r in OVERRIDE_REASONS],
    }


def card_summary(rec: Recommendation) -> str:
    """At most 140 characters, as CDS Hooks requires; the label is shortened rather than the numbers."""
    top = rec.suggestions[0]
    if rec.critical:
        text = f"URGENT: self-harm risk (PHQ-9 item 9): {top.label.lower()} today"
    elif top.action == "continue" or top.benefit is None:
        text = f"Consider: {top.label}"
    else:
        b = top.benefit
        tail = f" (PHQ-9 {_signed(b.phq9_change_vs_continue)} vs continuing, {b.horizon_weeks} wk)"
        text = f"Consider: {top.label}" + tail
        if len(text) > SUMMARY_MAX:
            text = f"Consider: {top.label[:SUMMARY_MAX - len(tail) - 11]}…{tail}"
    return text if len(text) <= SUMMARY_MAX else text[:SUMMARY_MAX - 1] + "…"


def card_detail(rec: Recommendation, notes: list[str]) -> str:
    """The card's markdown: why each step, what was blocked and assumed, how good the policy is."""
    cert = rec.policy.certification
    lines: list[str] = [f"**{'Certified' if cert.certified else 'NOT CERTIFIED'}**: {cert.statement}"
                        + (f" First-ranked step alone: {cert.first_choice}." if cert.first_choice else ""), ""]
    if rec.alerts:
        lines += ["**Alerts**", *(f"- {a}" for a in rec.alerts), ""]
    lines.append("**Ranked next steps**")
    for s in rec.suggestions:
        lines.append(f"{s.rank}. **{s.label}**{_benefit_text(s)}")
        if s.rationale is not None and s.rationale.contributions:
            reasons = "; ".join(f"{c.text} ({'raises' if c.shap > 0 else 'lowers'} its score)"
                                for c in s.rationale.contributions[:3])
            lines.append(f"   Why: {reasons}.")
    if rec.blocked:
        lines += ["", "**Not suggested: blocked by clinical rules**"]
        lines += [f"- {b.label}: {'; '.join(r.description for r in b.rules)}" for b in rec.blocked]
    if rec.imputed:
        lines += ["", "**Not in the record: assumed**"]
        lines += [f"- {i.feature.replace('_', ' ')} = {round(i.value, 2):g}: {i.reason}" for i in rec.imputed]
    if notes:
        lines += ["", "**Read from the FHIR record**", *(f"- {n}" for n in notes)]
    lines += ["", "**How good is this policy**", *(f"- {e}" for e in rec.policy.evaluation_summary),
              "", rec.uncertainty, "", f"*{rec.decision_support}*"]
    return "\n".join(lines)


def _benefit_text(s: Suggestion) -> str:
    b = s.benefit
    if b is None:
        return ""
    return (f": expected PHQ-9 change {_signed(b.phq9_change_vs_continue)} vs continuing over {b.horizon_weeks} "
            f"weeks ({100 * b.level:.0f} % interval {_signed(b.low)} to {_signed(b.high)}); "
            f"policy probability {s.probability:.2f}")


def _signed(value: float) -> str:
    """One decimal with its sign, never "-0.0"."""
    return f"{round(value, 1) + 0.0:+.1f}"


def _suggestion(s: Suggestion, patient_id: str) -> dict[str, Any]:
    """A suggestion whose one action creates a draft ServiceRequest (validated with fhir.resources R4B)."""
    request = ServiceRequest.model_validate({
        "resourceType": "ServiceRequest",
        "status": "draft",
        "intent": "proposal",
        "priority": "stat" if s.critical else "routine",
        "subject": {"reference": f"Patient/{patient_id}"},
        "code": {"text": s.label, "coding": [{"system": ACTION_SYSTEM, "code": s.action, "display": s.label}]},
        "note": [{"text": "Suggested by carepath (decision support); review before ordering."}],
    })
    return {
        "label": s.label,
        "uuid": s.id,
        "isRecommended": s.rank == 1,
        "actions": [{"type": "create", "description": f"Draft a request: {s.label}",
                     "resource": json.loads(request.model_dump_json(exclude_none=True))}],
    }
