"""Security: headers and CSP, closed CORS, per-token rate limit, revocation, constant-time token
checks, and no patient identifier or feature value in server logs."""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from benchmarks.serve_latency import ServeProcess
from serving.app import ServeSettings, create_app
from serving.auth import TokenStore
from serving.db import make_engine
from serving.security import CONTENT_SECURITY_POLICY, RateLimiter
from tests.serving.conftest import PATIENT, Served

#: Values no log line may contain: a patient id and feature values nobody else uses.
SECRET_ID = "MRN-LOGCHECK-7f3a9"
SECRET_FEATURES = {**PATIENT, "sleep_hours": 6.4321, "daily_steps": 12.3457}


def make_client(bundle: Path, tmp_path: Path, **settings: object) -> tuple[TestClient, dict[str, str], str]:
    db_url = f"sqlite:///{tmp_path / 'audit.sqlite'}"
    token = TokenStore(make_engine(db_url)).create("clinic")
    app = create_app(ServeSettings(policies=[bundle], db_url=db_url, allow_uncertified=True, **settings))  # type: ignore[arg-type]
    return TestClient(app), {"Authorization": f"Bearer {token}"}, db_url


def test_every_answer_carries_security_headers_and_api_answers_are_not_cached(served: Served) -> None:
    c = served.client
    answers = {
        "page": c.get("/"), "script": c.get("/static/app.js"), "health": c.get("/healthz"),
        "ok": c.post("/v1/recommendations", json={"features": PATIENT}, headers=served.headers),
        "unauthorised": c.post("/v1/recommendations", json={"features": PATIENT}),
        "too_large": c.post("/v1/recommendations", content=b"{" * 70_000, headers=served.headers),
        "cds": c.get("/cds-services"),
    }
    assert answers["ok"].status_code == 200 and answers["too_large"].status_code == 413
    for name, r in answers.items():
        assert r.headers["content-security-policy"] == CONTENT_SECURITY_POLICY, name
        assert r.headers["x-content-type-options"] == "nosniff", name
        assert r.headers["x-frame-options"] == "DENY" and r.headers["referrer-policy"] == "no-referrer", name
        assert "server" not in r.headers, name
    for name in ("ok", "unauthorised", "cds"):
        assert answers[name].headers["cache-control"] == "no-store", name
    assert "default-src 'self'" in CONTENT_SECURITY_POLICY and "'unsafe-inline'" not in CONTENT_SECURITY_POLICY


def test_cors_is_closed_unless_an_origin_is_named(served: Served, prepared_bundle: Path, tmp_path: Path) -> None:
    evil = {"Origin": "https://evil.example"}
    r = served.client.post("/v1/recommendations", json={"features": PATIENT}, headers={**served.headers, **evil})
    assert "access-control-allow-origin" not in r.headers
    preflight = served.client.options("/v1/recommendations", headers={
        **evil, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"})
    assert "access-control-allow-origin" not in preflight.headers and preflight.status_code >= 400
    client, _, _ = make_client(prepared_bundle, tmp_path, cors_origins=("https://ehr.example",))
    with client:
        ok = client.options("/v1/recommendations", headers={
            "Origin": "https://ehr.example", "Access-Control-Request-Method": "POST"})
        assert ok.headers["access-control-allow-origin"] == "https://ehr.example"
        other = client.get("/healthz", headers=evil)
        assert "access-control-allow-origin" not in other.headers


def test_rate_limit_is_per_token_with_retry_after(prepared_bundle: Path, tmp_path: Path) -> None:
    client, headers, db_url = make_client(prepared_bundle, tmp_path, rate_limit=0.5, rate_burst=3)
    other = {"Authorization": f"Bearer {TokenStore(make_engine(db_url)).create('other-clinic')}"}
    with client:
        codes = [client.post("/v1/recommendations", json={"features": PATIENT, "explain": False},
                             headers=headers).status_code for _ in range(5)]
        assert codes == [200, 200, 200, 429, 429]
        limited = client.get("/v1/policies", headers=headers)
        assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
        assert "rate limit" in limited.json()["detail"]
        # another token has its own bucket
        assert client.get("/v1/policies", headers=other).status_code == 200


def test_token_bucket_refills_at_its_rate() -> None:
    limiter = RateLimiter(rate=2.0, burst=2)
    assert [limiter.retry_after("a", now=0.0) for _ in range(3)] == [0.0, 0.0, 0.5]
    assert limiter.retry_after("a", now=0.5) == 0.0  # one token back after half a second
    assert limiter.retry_after("b", now=0.5) == 0.0
    assert RateLimiter(rate=0).retry_after("a") == 0.0  # off
    with pytest.raises(ValueError, match="rate limit"):
        RateLimiter(rate=-1)


def test_a_revoked_token_is_refused_and_tokens_are_compared_in_constant_time(
        prepared_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    client, headers, db_url = make_client(prepared_bundle, tmp_path, token_cache_seconds=0.0)
    compared: list[int] = []
    real = hmac.compare_digest

    def spy(a: str, b: str) -> bool:
        compared.append(1)
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    with client:
        assert client.get("/v1/policies", headers=headers).status_code == 200
        assert compared  # the digest comparison went through hmac.compare_digest
        TokenStore(make_engine(db_url)).revoke("clinic")
        assert client.get("/v1/policies", headers=headers).status_code == 401


def test_app_logs_hold_no_patient_identifier_or_feature_value(served: Served,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    served.client.post("/v1/recommendations", json={"patient_id": SECRET_ID, "features": SECRET_FEATURES},
                       headers=served.headers)
    served.client.post("/v1/recommendations", json={"patient_id": SECRET_ID,
                                                    "features": {**SECRET_FEATURES, "phq9": 99}},
                       headers=served.headers)
    text = caplog.text
    assert SECRET_ID not in text and "6.4321" not in text and "12.3457" not in text


@pytest.fixture(scope="module")
def server_process(prepared_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[
        tuple[str, str, Path]]:
    """``carepath serve`` as a clinic runs it (default rate limit), stdout and stderr captured to a file."""
    tmp = tmp_path_factory.mktemp("served")
    db_url = f"sqlite:///{tmp / 'audit.sqlite'}"
    token = TokenStore(make_engine(db_url)).create("clinic")
    log = tmp / "server.log"
    with ServeProcess(prepared_bundle, db_url, log=log, extra_args=(), log_stdout=True) as server:
        server.start(timeout=120)
        yield server.url, token, log


def test_server_logs_hold_no_patient_identifier_or_feature_value(server_process: tuple[str, str, Path]) -> None:
    url, token, log = server_process
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=url, headers=headers, timeout=30) as http:
        assert http.post("/v1/recommendations", json={"patient_id": SECRET_ID,
                                                      "features": SECRET_FEATURES}).status_code == 200
        assert http.post("/v1/recommendations", json={"patient_id": SECRET_ID,
                                                      "features": {**SECRET_FEATURES, "phq9": 99}}).status_code == 422
        assert http.post("/cds-services/carepath-next-step", json={
            "hook": "patient-view", "hookInstance": "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea",
            "context": {"userId": "Practitioner/1", "patientId": SECRET_ID}, "prefetch": {}}).status_code == 412
        r = http.get("/healthz")
        assert "server" not in r.headers
    time.sleep(0.5)
    text = log.read_text()
    assert "POST /v1/recommendations" in text  # the access log is on: it is the place a leak would show
    assert SECRET_ID not in text and "6.4321" not in text and "12.3457" not in text
