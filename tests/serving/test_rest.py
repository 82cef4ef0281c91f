"""The REST API: auth, validation that names the field, answers, audit rows one to one, feedback, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from carepath.cli import main
from envs.spec import N_ACTIONS, N_FEATURES
from serving.auth import TokenStore
from serving.db import FeedbackRecord, RecommendationRecord, make_engine
from tests.serving.conftest import PATIENT, Served


def audit_rows(db_url: str) -> int:
    with Session(make_engine(db_url)) as session:
        return int(session.scalar(select(func.count()).select_from(RecommendationRecord)) or 0)


def test_health_and_schema_need_no_token(served: Served) -> None:
    health = served.client.get("/healthz")
    assert health.status_code == 200 and health.json()["policies"] == ["serving-test-policy"]
    schema = served.client.get("/openapi.json").json()
    phq9 = schema["components"]["schemas"]["PatientFeatures"]["properties"]["phq9"]
    assert phq9["anyOf"][0] == {"type": "integer", "minimum": 0, "maximum": 27}
    assert "/v1/recommendations" in schema["paths"] and "/cds-services" in schema["paths"]


def test_recommendations_need_a_token_with_the_right_scope(served: Served) -> None:
    body = {"features": PATIENT}
    missing = served.client.post("/v1/recommendations", json=body)
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    wrong = served.client.post("/v1/recommendations", json=body, headers={"Authorization": "Bearer cp_nope"})
    assert wrong.status_code == 401
    feedback_only = TokenStore(make_engine(served.db_url)).create("feedback-only", scopes=("feedback",))
    forbidden = served.client.post("/v1/recommendations", json=body,
                                   headers={"Authorization": f"Bearer {feedback_only}"})
    assert forbidden.status_code == 403 and "recommend" in forbidden.json()["detail"]
    assert served.client.get("/v1/policies").status_code == 401
    assert audit_rows(served.db_url) == 0


def test_an_answer_is_ranked_labelled_and_audited_once(served: Served) -> None:
    answers = []
    for top_k in (1, 2, 3):
        r = served.client.post("/v1/recommendations", headers=served.headers,
                               json={"patient_id": "MRN-0042", "features": PATIENT, "top_k": top_k})
        assert r.status_code == 200, r.text
        answers.append(r.json())
    assert [len(a["suggestions"]) for a in answers] == [1, 2, 3]
    first = answers[-1]
    assert first["decision_support"].startswith("Decision support only")
    assert first["policy"]["name"] == "serving-test-policy" and first["policy"]["version"]
    assert first["suggestions"][0]["benefit"]["level"] == 0.9 and first["suggestions"][0]["rationale"]
    assert len({a["audit_id"] for a in answers}) == 3 and audit_rows(served.db_url) == 3
    # the raw patient id is never stored
    db_file = Path(served.db_url.removeprefix("sqlite:///"))
    stored = b"".join(p.read_bytes() for p in db_file.parent.glob(db_file.name + "*"))
    assert b"MRN-0042" not in stored


@pytest.mark.parametrize(("body", "named"), [
    ({"features": {**PATIENT, "phq9": 30}}, "phq9"),
    ({"features": {**PATIENT, "phq9_item9": 4}}, "phq9_item9"),
    ({"features": {**PATIENT, "phq9": 12.5}}, "phq9"),
    ({"features": {**PATIENT, "favourite_colour": 3}}, "favourite_colour"),
    ({"features": PATIENT, "top_k": 0}, "top_k"),
    ({"features": PATIENT, "debug": True}, "debug"),
    ({}, "features"),
])
def test_bad_requests_get_422_naming_the_field(served: Served, body: dict[str, object], named: str) -> None:
    r = served.client.post("/v1/recommendations", json=body, headers=served.headers)
    assert r.status_code == 422
    assert named in json.dumps(r.json()["detail"])
    assert audit_rows(served.db_url) == 0


def test_non_json_nan_and_oversized_bodies_are_refused(served: Served) -> None:
    headers = {**served.headers, "Content-Type": "application/json"}
    nan = served.client.post("/v1/recommendations", content=b'{"features": {"phq9": NaN}}', headers=headers)
    assert nan.status_code == 422
    big = served.client.post("/v1/recommendations", content=b" " * (65 * 1024), headers=headers)
    assert big.status_code == 413
    text = served.client.post("/v1/recommendations", content=b"phq9=12",
                              headers={**served.headers, "Content-Type": "text/plain"})
    assert text.status_code == 422


def test_feedback_is_recorded_against_its_recommendation(served: Served) -> None:
    answer = served.client.post("/v1/recommendations", headers=served.headers,
                                json={"patient_id": "p1", "features": PATIENT}).json()
    top = answer["suggestions"][0]
    ok = served.client.post("/v1/feedback", headers=served.headers, json={
        "audit_id": answer["audit_id"], "suggestion_id": top["id"], "action": top["action"], "outcome": "accepted"})
    assert ok.status_code == 200 and ok.json()["recorded"]
    override = served.client.post("/v1/feedback", headers=served.headers, json={
        "audit_id": answer["audit_id"], "suggestion_id": top["id"], "action": top["action"], "outcome": "overridden",
        "override_reason": "patient prefers therapy", "chosen_action": "add_psychotherapy"})
    assert override.status_code == 200
    unknown = served.client.post("/v1/feedback", headers=served.headers, json={
        "audit_id": "0" * 32, "suggestion_id": "x", "action": "continue", "outcome": "accepted"})
    assert unknown.status_code == 404
    bad = served.client.post("/v1/feedback", headers=served.headers, json={
        "audit_id": answer["audit_id"], "suggestion_id": "x", "action": "teleport", "outcome": "accepted"})
    assert bad.status_code == 422 and "action" in json.dumps(bad.json()["detail"])
    with Session(make_engine(served.db_url)) as session:
        rows = session.scalars(select(FeedbackRecord).order_by(FeedbackRecord.id)).all()
        assert [(r.outcome, r.chosen_action) for r in rows] == [("accepted", None),
                                                                 ("overridden", "add_psychotherapy")]


def test_policies_lists_the_served_policy_with_its_evaluation(served: Served) -> None:
    r = served.client.get("/v1/policies", headers=served.headers)
    assert r.status_code == 200
    (policy,) = r.json()
    assert policy["name"] == "serving-test-policy"
    assert len(policy["features"]) == N_FEATURES and len(policy["actions"]) == N_ACTIONS
    assert policy["evaluation_summary"]


def test_recommend_cli_prints_a_table_and_json(prepared_bundle: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    patient = tmp_path / "patient.json"
    patient.write_text(json.dumps({"features": PATIENT}))
    assert main(["recommend", "--policy", str(prepared_bundle), "--patient", str(patient), "--top-k", "2"]) == 0
    table = capsys.readouterr().out
    assert "Decision support only" in table and "expected PHQ-9 change" in table and "why:" in table
    assert main(["recommend", "--policy", str(prepared_bundle), "--patient", str(patient), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["suggestions"]) == 3
    patient.write_text(json.dumps({"phq9": 40}))
    assert main(["recommend", "--policy", str(prepared_bundle), "--patient", str(patient)]) == 2
    assert "phq9" in capsys.readouterr().err
