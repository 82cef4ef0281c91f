"""CDS Hooks 2.0 patient-view service: the tests play an EHR (the CDS client) sending FHIR R4 prefetch."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.R4B.servicerequest import ServiceRequest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from envs.spec import ACTION_LABELS, ACTION_NAMES
from serving.auth import TokenStore
from serving.cds_hooks import OVERRIDE_SYSTEM, SUMMARY_MAX, card_summary
from serving.db import FeedbackRecord, RecommendationRecord, make_engine
from serving.fhir_input import PrefetchError, features_from_prefetch

URL = "/cds-services/carepath-next-step"
PATIENT_ID = "pt-58f1c2d9"
FAMILY, GIVEN = "Oyelaran-Whitcombe", "Theodora"
MRN = "MRN-00471193"
STREET = "17 Larkspur Close"
PHONE = "+44 7700 900417"
IDENTIFYING = (FAMILY, GIVEN, MRN, STREET, PHONE, PATIENT_ID)
NOW = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)


# ----------------------------------------------------------------------------- FHIR as an EHR sends it


def fhir_time(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S+00:00")


def patient(birth: str = "1985-04-12", gender: str = "female") -> dict[str, Any]:
    return {
        "resourceType": "Patient", "id": PATIENT_ID,
        "identifier": [{"system": "https://hospital.example/mrn", "value": MRN}],
        "name": [{"use": "official", "family": FAMILY, "given": [GIVEN]}],
        "telecom": [{"system": "phone", "value": PHONE}],
        "address": [{"line": [STREET], "city": "Leeds", "postalCode": "LS6 2AB"}],
        "gender": gender, "birthDate": birth,
    }


def observation(oid: str, code: str, display: str, value: Any, when: datetime, *,
                integer: bool = False, components: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "Observation", "id": oid, "status": "final",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                  "code": "survey"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": code, "display": display}]},
        "subject": {"reference": f"Patient/{PATIENT_ID}", "display": f"{GIVEN} {FAMILY}"},
        "effectiveDateTime": fhir_time(when),
    }
    if integer:
        resource["valueInteger"] = value
    else:
        resource["valueQuantity"] = {"value": value, "unit": "{score}", "system": "http://unitsofmeasure.org",
                                     "code": "{score}"}
    if components:
        resource["component"] = components
    return resource


def item9_component(value: int) -> dict[str, Any]:
    return {"code": {"coding": [{"system": "http://loinc.org", "code": "44260-8",
                                 "display": "Thoughts that you would be better off dead"}]}, "valueInteger": value}


def searchset(resources: list[dict[str, Any]]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "searchset", "total": len(resources),
            "entry": [{"fullUrl": f"https://ehr.example/fhir/{r['resourceType']}/{r['id']}", "resource": r,
                       "search": {"mode": "match"}} for r in resources]}


def sertraline(authored: datetime) -> dict[str, Any]:
    return {
        "resourceType": "MedicationRequest", "id": "mr-1", "status": "active", "intent": "order",
        "medicationCodeableConcept": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm",
                                                  "code": "312940", "display": "sertraline 50 MG Oral Tablet"}],
                                      "text": "Sertraline 50 mg tablet"},
        "subject": {"reference": f"Patient/{PATIENT_ID}"},
        "authoredOn": fhir_time(authored),
        "dosageInstruction": [{"text": "50 mg once daily",
                               "doseAndRate": [{"doseQuantity": {"value": 50, "unit": "mg"}}]}],
    }


def prefetch(now: datetime, *, item9: int = 1, medications: bool = True) -> dict[str, Any]:
    """Three PHQ-9 totals over 8 weeks (the latest a panel with item 9 as component), item 9, GAD-7, sertraline."""
    phq9 = [
        observation("phq-3", "44261-6", "PHQ-9 total score", 14, now - timedelta(days=3),
                    components=[item9_component(item9)]),
        observation("phq-2", "44261-6", "PHQ-9 total score", 17, now - timedelta(weeks=4, days=3)),
        observation("phq-1", "44261-6", "PHQ-9 total score", 21, now - timedelta(weeks=8, days=3), integer=True),
    ]
    items = [observation("i9-1", "44260-8", "PHQ-9 item 9", 0, now - timedelta(weeks=8, days=3), integer=True)]
    gad7 = [observation("gad-1", "70274-6", "GAD-7 total score", 11, now - timedelta(days=3))]
    data = {"patient": patient(), "phq9": searchset(phq9), "item9": searchset(items), "gad7": searchset(gad7)}
    if medications:
        data["medications"] = searchset([sertraline(now - timedelta(weeks=6, days=2))])
    return data


def hook_call(data: dict[str, Any] | None = None, *, hook: str = "patient-view") -> dict[str, Any]:
    return {
        "hook": hook, "hookInstance": str(uuid.uuid4()),
        "fhirServer": "https://ehr.example/fhir",
        "fhirAuthorization": {"access_token": "secret-ehr-token", "token_type": "Bearer", "expires_in": 300,
                              "scope": "patient/*.read", "subject": "carepath"},
        "context": {"userId": "Practitioner/prac-42", "patientId": PATIENT_ID},
        "prefetch": prefetch(datetime.now(UTC)) if data is None else data,
    }


def db_bytes(db_url: str) -> bytes:
    path = Path(db_url.removeprefix("sqlite:///"))
    wal = path.with_name(path.name + "-wal")
    return path.read_bytes() + (wal.read_bytes() if wal.exists() else b"")


def count(db_url: str, table: Any) -> int:
    engine = make_engine(db_url)
    try:
        with Session(engine) as session:
            return int(session.scalar(select(func.count()).select_from(table)) or 0)
    finally:
        engine.dispose()


# ----------------------------------------------------------------------------- discovery and calls


def test_discovery_needs_no_token_and_lists_the_prefetch(served):
    answer = served.client.get("/cds-services")
    assert answer.status_code == 200
    (service,) = answer.json()["services"]
    assert service["hook"] == "patient-view" and service["id"] == "carepath-next-step"
    assert service["title"] and service["description"] and service["usageRequirements"]
    assert set(service["prefetch"]) == {"patient", "phq9", "item9", "gad7", "medications"}
    assert service["prefetch"]["patient"] == "Patient/{{context.patientId}}"
    assert "44261-6" in service["prefetch"]["phq9"] and "70274-6" in service["prefetch"]["gad7"]
    assert "44260-8" in service["prefetch"]["item9"] and "status=active" in service["prefetch"]["medications"]


def test_patient_view_answers_one_valid_card(served):
    answer = served.client.post(URL, json=hook_call(), headers=served.headers)
    assert answer.status_code == 200, answer.text
    (card,) = answer.json()["cards"]
    assert str(uuid.UUID(card["uuid"])) == card["uuid"]
    assert 0 < len(card["summary"]) <= SUMMARY_MAX and card["summary"].startswith("Consider: ")
    assert card["indicator"] in {"info", "warning", "critical"}
    assert card["source"]["label"].startswith("carepath (serving-test-policy ")
    assert card["selectionBehavior"] == "at-most-one"
    assert {r["code"] for r in card["overrideReasons"]} >= {"patient-preference", "contraindication",
                                                            "clinical-judgement", "already-done"}
    assert all(r["system"] == OVERRIDE_SYSTEM and r["display"] for r in card["overrideReasons"])
    suggestions = card["suggestions"]
    assert 1 <= len(suggestions) <= 3
    assert [s["isRecommended"] for s in suggestions] == [True] + [False] * (len(suggestions) - 1)
    assert len({s["uuid"] for s in suggestions}) == len(suggestions)
    for s in suggestions:
        (action,) = s["actions"]
        assert action["type"] == "create" and action["description"]
        request = ServiceRequest.model_validate(action["resource"])
        assert request.status == "draft" and request.intent == "proposal"
        assert request.subject.reference == f"Patient/{PATIENT_ID}"
        assert request.code is not None and request.code.text == s["label"] and s["label"] in ACTION_LABELS.values()
    # sertraline -> dose assumed at the maximum: raise dose is blocked, and the detail says why
    assert "Raise the antidepressant dose" not in [s["label"] for s in suggestions]
    detail = card["detail"]
    assert "maximum" in detail and "Ranked next steps" in detail and "Decision support only" in detail
    assert "interval" in detail and "Why:" in detail and "How good is this policy" in detail
    assert FAMILY not in answer.text and MRN not in answer.text and "secret-ehr-token" not in answer.text


def test_item9_of_3_gives_one_critical_referral(served):
    answer = served.client.post(URL, json=hook_call(prefetch(datetime.now(UTC), item9=3)), headers=served.headers)
    assert answer.status_code == 200, answer.text
    (card,) = answer.json()["cards"]
    assert card["indicator"] == "critical"
    (suggestion,) = card["suggestions"]
    assert suggestion["label"] == ACTION_LABELS["refer_specialist"] and suggestion["isRecommended"]
    assert suggestion["actions"][0]["resource"]["priority"] == "stat"
    assert "self-harm" in card["summary"] and len(card["summary"]) <= SUMMARY_MAX
    assert "CRITICAL" in card["detail"]


@pytest.mark.parametrize("key", ["phq9", "patient"])
def test_missing_required_prefetch_is_412_naming_the_key(served, key):
    data = prefetch(datetime.now(UTC))
    if key == "patient":
        data[key] = None  # null: the EHR could not prefetch it
    else:
        del data[key]  # absent
    answer = served.client.post(URL, json=hook_call(data), headers=served.headers)
    assert answer.status_code == 412
    body = answer.json()
    assert body["missingPrefetch"] == [key] and repr(key) in body["detail"]
    assert "does not query the FHIR server" in body["detail"]
    assert count(served.db_url, RecommendationRecord) == 0


def test_tokens_are_checked(served):
    assert served.client.post(URL, json=hook_call()).status_code == 401
    other = TokenStore(make_engine(served.db_url)).create("feedback-only", ["feedback"])
    answer = served.client.post(URL, json=hook_call(), headers={"Authorization": f"Bearer {other}"})
    assert answer.status_code == 403 and "recommend" in answer.json()["detail"]


def test_invalid_fhir_is_refused_naming_the_key_and_field(served):
    data = prefetch(datetime.now(UTC))
    data["phq9"]["entry"][1]["resource"]["valueQuantity"]["value"] = "abc"
    answer = served.client.post(URL, json=hook_call(data), headers=served.headers)
    assert answer.status_code == 422, answer.text
    detail = answer.json()["detail"]
    assert "'phq9'" in detail and "entry[1].resource.valueQuantity.value" in detail

    data = prefetch(datetime.now(UTC))
    data["patient"]["birthDate"] = f"{GIVEN}-{MRN}"  # never echoed back
    answer = served.client.post(URL, json=hook_call(data), headers=served.headers)
    assert answer.status_code == 422 and "birthDate" in answer.text
    assert GIVEN not in answer.text and MRN not in answer.text

    data = prefetch(datetime.now(UTC))
    data["phq9"] = patient()
    answer = served.client.post(URL, json=hook_call(data), headers=served.headers)
    assert answer.status_code == 422 and "expected a FHIR Bundle" in answer.json()["detail"]


def test_prefetch_about_another_patient_is_refused(served):
    data = prefetch(datetime.now(UTC))
    data["gad7"]["entry"][0]["resource"]["subject"] = {"reference": "Patient/someone-else"}
    answer = served.client.post(URL, json=hook_call(data), headers=served.headers)
    assert answer.status_code == 422 and "another patient" in answer.json()["detail"]


def test_wrong_hook_is_400_and_unknown_service_404(served):
    assert served.client.post(URL, json=hook_call(hook="order-sign"), headers=served.headers).status_code == 400
    answer = served.client.post("/cds-services/no-such-service", json=hook_call(), headers=served.headers)
    assert answer.status_code == 404 and "no-such-service" in answer.json()["detail"]
    bad = hook_call()
    bad["hookInstance"] = "not-a-uuid"
    assert served.client.post(URL, json=bad, headers=served.headers).status_code == 422


def test_audit_has_one_row_per_call_and_no_identifiers(served):
    ids = []
    for _ in range(2):
        answer = served.client.post(URL, json=hook_call(), headers=served.headers)
        assert answer.status_code == 200
        ids.append(uuid.UUID(answer.json()["cards"][0]["uuid"]).hex)
    served.client.post(URL, json=hook_call({"patient": patient()}), headers=served.headers)  # 412: not recorded
    assert count(served.db_url, RecommendationRecord) == 2
    audit = served.client.app.state.carepath.audit
    record = audit.get(ids[0])
    assert record is not None and record.channel == "cds-hooks" and record.patient_pseudonym
    assert set(record.request) == {"hook", "hookInstance", "features"}
    assert record.request["features"]["phq9"] == 14 and record.features["dose_level"] == 3
    assert record.response["cards"][0]["uuid"] == str(uuid.UUID(ids[0]))
    stored = db_bytes(served.db_url)
    for text in (*IDENTIFYING, "secret-ehr-token", "Practitioner/prac-42"):
        assert text.encode() not in stored, text


# ----------------------------------------------------------------------------- feedback


def answered_card(served) -> dict[str, Any]:
    answer = served.client.post(URL, json=hook_call(prefetch(datetime.now(UTC), medications=False)),
                                headers=served.headers)
    assert answer.status_code == 200
    card: dict[str, Any] = answer.json()["cards"][0]
    assert len(card["suggestions"]) >= 2
    return card


def action_of(suggestion: dict[str, Any]) -> str:
    return suggestion["actions"][0]["resource"]["code"]["coding"][0]["code"]


def test_feedback_accepted_and_overridden_are_recorded(served):
    card = answered_card(served)
    first, second = card["suggestions"][:2]
    when = datetime.now(UTC).isoformat()
    body = {"feedback": [
        {"card": card["uuid"], "outcome": "accepted", "acceptedSuggestions": [{"id": second["uuid"]}],
         "outcomeTimestamp": when},
        {"card": card["uuid"], "outcome": "overridden", "outcomeTimestamp": when,
         "overrideReason": {"reason": {"system": OVERRIDE_SYSTEM, "code": "patient-preference",
                                       "display": "The patient prefers another option"},
                            "userComment": "wants to wait for the next visit"}},
    ]}
    answer = served.client.post(f"{URL}/feedback", json=body, headers=served.headers)
    assert answer.status_code == 200 and answer.json() == {}
    record = served.client.app.state.carepath.audit.get(uuid.UUID(card["uuid"]).hex)
    accepted, overridden = record.feedback
    assert (accepted.outcome, accepted.suggestion_id, accepted.action) == ("accepted", second["uuid"],
                                                                          action_of(second))
    assert accepted.action in ACTION_NAMES and accepted.override_reason is None
    assert (overridden.outcome, overridden.suggestion_id, overridden.action) == ("overridden", first["uuid"],
                                                                                 action_of(first))
    assert overridden.override_reason == "patient-preference: wants to wait for the next visit"
    assert count(served.db_url, FeedbackRecord) == 2


def test_feedback_errors_record_nothing(served):
    card = answered_card(served)
    when = datetime.now(UTC).isoformat()
    good = {"card": card["uuid"], "outcome": "accepted", "outcomeTimestamp": when,
            "acceptedSuggestions": [{"id": card["suggestions"][0]["uuid"]}]}
    stranger = str(uuid.uuid4())
    answer = served.client.post(f"{URL}/feedback", headers=served.headers, json={"feedback": [
        good, {"card": stranger, "outcome": "overridden", "outcomeTimestamp": when}]})
    assert answer.status_code == 404 and stranger in answer.json()["detail"]
    answer = served.client.post(f"{URL}/feedback", headers=served.headers, json={"feedback": [
        good, {**good, "acceptedSuggestions": [{"id": "not-a-suggestion"}]}]})
    assert answer.status_code == 422 and "not-a-suggestion" in answer.json()["detail"]
    assert count(served.db_url, FeedbackRecord) == 0
    assert served.client.post(f"{URL}/feedback", json={"feedback": [good]}).status_code == 401
    rec_only = TokenStore(make_engine(served.db_url)).create("recommend-only", ["recommend"])
    answer = served.client.post(f"{URL}/feedback", json={"feedback": [good]},
                                headers={"Authorization": f"Bearer {rec_only}"})
    assert answer.status_code == 403


# ----------------------------------------------------------------------------- features_from_prefetch


def test_features_from_prefetch_reads_scores_trend_and_times():
    features, notes = features_from_prefetch(prefetch(NOW), NOW)
    assert features["phq9"] == 14 and features["phq9_at_intake"] == 21
    assert features["phq9_change_4w"] == 14 - 17  # against the total 4 weeks before, not the intake
    assert features["weeks_since_measurement"] == 0  # 3 days ago
    assert features["weeks_in_care"] == 8
    assert features["phq9_item9"] == 1  # the panel's component is later than the separate item 9 Observation
    assert features["gad7"] == 11
    assert features["sex"] == 0 and features["age_band"] == 1  # 40 years old: 30-44
    assert all(FAMILY not in n and MRN not in n for n in notes)


def test_age_band_and_sex():
    for birth, band in (("2005-03-03", 0), ("1996-03-02", 1), ("1996-03-03", 0), ("1966-03-02", 3),
                        ("1966-03-03", 2), ("1981-06-15", 1), ("1990", 1)):
        features, _ = features_from_prefetch({"patient": patient(birth)}, NOW)
        assert features["age_band"] == band, birth
    features, notes = features_from_prefetch({"patient": patient("2010-01-01", "other")}, NOW)
    assert features["age_band"] == 0 and "sex" not in features
    assert any("under 18" in n for n in notes) and any("Sex not used" in n for n in notes)
    features, notes = features_from_prefetch({"patient": patient("1981")}, NOW)  # 44 or 45: band unknown
    assert "age_band" not in features and any("not certain" in n for n in notes)


def test_change_needs_a_total_at_least_3_weeks_earlier():
    totals = [observation(f"p{i}", "44261-6", "PHQ-9", v, NOW - timedelta(weeks=w))
              for i, (v, w) in enumerate(((12, 1), (15, 3), (19, 6), (22, 12)))]
    features, _ = features_from_prefetch({"phq9": searchset(totals)}, NOW)
    assert features["phq9_change_4w"] == 12 - 19  # 6 weeks before is >= 3 weeks before the latest (1 week)
    assert features["weeks_since_measurement"] == 1 and features["weeks_in_care"] == 12
    features, notes = features_from_prefetch({"phq9": searchset(totals[:2])}, NOW)
    assert "phq9_change_4w" not in features and any("4-week change is imputed" in n for n in notes)
    assert features["phq9_at_intake"] == 15


def test_weeks_well_counts_from_the_first_total_below_5_until_one_of_10_or_more():
    def weeks_well(series: tuple[tuple[int, int], ...]) -> tuple[float, list[str]]:
        totals = [observation(f"p{i}", "44261-6", "PHQ-9", v, NOW - timedelta(weeks=w))
                  for i, (v, w) in enumerate(series)]
        features, notes = features_from_prefetch({"phq9": searchset(totals)}, NOW)
        return features["weeks_well"], notes

    # remission 30 weeks ago; a noisy 7 does not end it
    value, notes = weeks_well(((3, 0), (7, 10), (4, 20), (4, 30), (18, 40)))
    assert value == 30 and any("sustained remission for 30 weeks" in n for n in notes)
    # a relapse to 12 ends the run: it restarts at the next total below 5
    assert weeks_well(((2, 0), (4, 6), (12, 10), (3, 30), (18, 40)))[0] == 6
    # never below 5: not in remission, and the taper rule stays closed
    value, notes = weeks_well(((6, 0), (9, 4), (16, 12)))
    assert value == 0 and not any("sustained remission" in n for n in notes)


def test_medication_sets_dose_to_maximum_with_a_note():
    authored = NOW - timedelta(weeks=5, days=1)
    features, notes = features_from_prefetch({"medications": searchset([sertraline(authored)])}, NOW)
    assert features["dose_level"] == 3 and features["weeks_on_dose"] == 5 and features["weeks_on_step"] == 5
    assert any("maximum" in n and "raise the dose" in n for n in notes)

    features, notes = features_from_prefetch({"medications": searchset([])}, NOW)
    assert features["dose_level"] == 0 and "weeks_on_dose" not in features
    stopped = {**sertraline(authored), "status": "stopped"}
    features, _ = features_from_prefetch({"medications": searchset([stopped])}, NOW)
    assert features["dose_level"] == 0

    contained = {**sertraline(authored), "contained": [{"resourceType": "Medication", "id": "m",
                                                        "code": {"coding": [{"system": "http://www.whocc.no/atc",
                                                                             "code": "N06AB06"}]}}],
                 "medicationReference": {"reference": "#m"}}
    del contained["medicationCodeableConcept"]
    features, _ = features_from_prefetch({"medications": searchset([contained])}, NOW)
    assert features["dose_level"] == 3

    unknown = {**sertraline(authored), "medicationCodeableConcept": {"text": "Study drug XR-17"}}
    features, notes = features_from_prefetch({"medications": searchset([unknown])}, NOW)
    assert "dose_level" not in features and any("could not be recognised" in n for n in notes)
    features, notes = features_from_prefetch({}, NOW)
    assert "dose_level" not in features and any("No medication prefetch" in n for n in notes)


def test_out_of_range_values_are_clipped_and_bad_fhir_named():
    totals = [observation("p1", "44261-6", "PHQ-9", 31, NOW - timedelta(days=1))]
    features, notes = features_from_prefetch({"phq9": searchset(totals)}, NOW)
    assert features["phq9"] == 27 and any("clipped" in n for n in notes)
    totals[0]["valueQuantity"]["value"] = "abc"
    with pytest.raises(PrefetchError, match=r"'phq9'.*entry\[0\]\.resource\.valueQuantity\.value") as err:
        features_from_prefetch({"phq9": searchset(totals)}, NOW)
    assert err.value.key == "phq9"
    with pytest.raises(PrefetchError, match="another patient"):
        features_from_prefetch({"patient": patient()}, NOW, patient_id="someone-else")


def test_entered_in_error_and_coded_item9_answers():
    item9 = observation("i1", "44260-8", "item 9", 0, NOW - timedelta(days=2))
    del item9["valueQuantity"]
    item9["valueCodeableConcept"] = {"coding": [{"system": "http://loinc.org", "code": "LA6570-1"}]}
    wrong = observation("i2", "44260-8", "item 9", 3, NOW - timedelta(days=1), integer=True)
    wrong["status"] = "entered-in-error"
    features, notes = features_from_prefetch({"item9": searchset([item9, wrong])}, NOW)
    assert features["phq9_item9"] == 2 and any("entered-in-error" in n for n in notes)


def test_summary_stays_within_140_characters(served):
    card = answered_card(served)
    assert len(card["summary"]) <= SUMMARY_MAX
    recommendation = served.client.app.state.carepath.recommenders["serving-test-policy"].recommend(
        {"phq9": 20}, top_k=3, explain=False)
    top = recommendation.suggestions[0]
    longer = top.model_copy(update={"label": "A very long label " * 20, "action": "switch_class"})
    assert len(card_summary(recommendation.model_copy(update={"suggestions": [longer]}))) <= SUMMARY_MAX
