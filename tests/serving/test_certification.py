"""Serving and certification: refusal of uncertified policies, what clinicians read, the audit trail."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, inspect, text

from policies.bundle import update_bundle
from serving.recommender import NOT_CERTIFIED, Recommender, certification_info
from tests.serving.conftest import PATIENT

CERTIFIED: dict[str, Any] = {
    "certified": True, "confidence": 0.95, "lower_bound": 1.2, "improvement": 3.4, "id": "cert-0123456789abcdef",
    "episodes": {"candidate": 2500, "safety": 2500}, "reasons": [],
    "candidate": {"family": "mixture", "weight": 0.2, "threshold": 0.0, "truncation": 20.0},
    "behaviour_model": {"kind": "baseline", "name": "stard", "epsilon": 0.1},
    "first_choice": {"statement": "not covered: taking only the first-ranked step is not vouched for"},
}


@pytest.fixture(scope="module")
def certified_bundle(prepared_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The prepared test bundle with a hand-written certificate (the protocol itself is tested in
    tests/evaluation/test_certify.py): what serving does with one."""
    folder = tmp_path_factory.mktemp("certified") / "policy"
    shutil.copytree(prepared_bundle, folder)
    update_bundle(folder, certificate=CERTIFIED)
    return folder


def test_certification_in_words():
    none = certification_info({})
    assert not none.certified and none.statement == NOT_CERTIFIED and none.id is None
    yes = certification_info(CERTIFIED)
    assert yes.certified and yes.id == CERTIFIED["id"] and "at least +1.2 percentage points" in yes.statement
    assert "95 %" in yes.statement and "2500" in yes.statement and "not covered" in (yes.first_choice or "")
    no = certification_info({**CERTIFIED, "certified": False, "lower_bound": -0.8,
                             "reasons": ["remission lower bound -0.80 pp is not above 0"]})
    assert not no.certified and "Not certified" in no.statement and "-0.80 pp" in no.statement


def test_serve_refuses_an_uncertified_policy_unless_allowed(prepared_bundle: Path, tmp_path: Path):
    from serving.app import ServeSettings, create_app

    with pytest.raises(ValueError, match="not certified.*--allow-uncertified"):
        create_app(ServeSettings(policies=[prepared_bundle], db_url=f"sqlite:///{tmp_path / 'a.sqlite'}"))
    assert not (tmp_path / "a.sqlite").exists()  # refused before the audit store is opened
    app = create_app(ServeSettings(policies=[prepared_bundle], db_url=f"sqlite:///{tmp_path / 'b.sqlite'}",
                                   allow_uncertified=True))
    assert app is not None


def test_a_certified_policy_serves_its_candidate_and_audits_its_certificate(certified_bundle: Path, tmp_path: Path):
    from serving.app import ServeSettings, create_app
    from serving.audit import AuditStore
    from serving.auth import TokenStore
    from serving.db import make_engine, pseudonym_key

    db_url = f"sqlite:///{tmp_path / 'audit.sqlite'}"
    app = create_app(ServeSettings(policies=[certified_bundle], db_url=db_url))  # no flag needed
    token = TokenStore(make_engine(db_url)).create("clinic")
    with TestClient(app) as client:
        answer = client.post("/v1/recommendations", json={"features": PATIENT, "patient_id": "p-1"},
                             headers={"Authorization": f"Bearer {token}"}).json()
    cert = answer["policy"]["certification"]
    assert cert["certified"] and cert["id"] == CERTIFIED["id"]
    store = AuditStore(make_engine(db_url), pseudonym_key(db_url, None))
    rows = list(store.iter_recommendations())
    assert len(rows) == 1 and rows[0].certificate_id == CERTIFIED["id"]
    # the served probabilities are the certificate's mixture of the network and current care
    rec = Recommender(certified_bundle, warm=False)
    assert rec.policy.served is not None and rec.policy.served.weight == pytest.approx(0.2)


def test_uncertified_answers_say_so_on_every_channel(prepared_bundle: Path):
    from serving.cds_hooks import build_card
    from serving.cli import format_recommendation

    rec = Recommender(prepared_bundle, warm=False).recommend(PATIENT, explain=False)
    assert not rec.policy.certification.certified
    card = build_card(rec, [], card_uuid=__import__("uuid").uuid4(), patient_id="p")
    assert card["detail"].startswith("**NOT CERTIFIED**") and card["indicator"] in ("warning", "critical")
    assert "Not certified" in format_recommendation(rec.model_dump())


def test_an_audit_store_from_before_certificates_gains_the_column(tmp_path: Path):
    from serving.db import make_engine

    path = tmp_path / "old.sqlite"
    old = create_engine(f"sqlite:///{path}")
    with old.begin() as connection:  # the table as an earlier carepath created it
        connection.execute(text("CREATE TABLE recommendations (audit_id VARCHAR(32) PRIMARY KEY, created_at "
                                "DATETIME, token_name VARCHAR(64), channel VARCHAR(16), patient_pseudonym "
                                "VARCHAR(64), policy_name TEXT, policy_version TEXT, features_json TEXT, "
                                "request_json TEXT, response_json TEXT)"))
        connection.execute(text("INSERT INTO recommendations VALUES ('a' , '2026-01-01', 't', 'rest', NULL, "
                                "'p', 'v', '{}', '{}', '{}')"))
    old.dispose()
    engine = make_engine(f"sqlite:///{path}")
    columns = {c["name"] for c in inspect(engine).get_columns("recommendations")}
    assert "certificate_id" in columns
    with engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM recommendations")).scalar() == 1


def test_a_reason_resting_on_an_assumed_value_says_so(prepared_bundle: Path):
    from serving.recommender import _flag_assumed
    from serving.schemas import Contribution

    flagged = _flag_assumed(Contribution(feature="on_psychotherapy", value=1.0, shap=0.4, text="in psychotherapy"),
                            {"on_psychotherapy"})
    assert flagged.text.startswith("in psychotherapy (assumed: not given")
    kept = _flag_assumed(Contribution(feature="phq9", value=18.0, shap=0.4, text="PHQ-9 18"), {"on_psychotherapy"})
    assert kept.text == "PHQ-9 18"
    # end to end: every reason about a feature the clinician left out carries the flag
    features = {k: v for k, v in PATIENT.items() if k != "on_psychotherapy"}
    answer = Recommender(prepared_bundle, warm=False).recommend(features, top_k=5)
    assumed = {i.feature for i in answer.imputed}
    assert "on_psychotherapy" in assumed
    for s in answer.suggestions:
        assert s.rationale is not None
        for c in s.rationale.contributions:
            assert ("(assumed: not given" in c.text) == (c.feature in assumed), c

