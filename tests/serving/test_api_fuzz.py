"""Hostile API input: property-based fuzzing of the whole OpenAPI schema, and hand-written attacks.

The fuzzing half drives schemathesis's pytest integration over every operation of
``/openapi.json`` against the app in process: the schema's examples, the coverage phase
(boundaries, missing and extra fields, wrong types, undeclared content types and methods) and
Hypothesis fuzzing in positive and negative mode. Every call carries the bearer token except a share,
fixed by the case itself, sent with none or an invalid one. Checks (shared with
``benchmarks/api_fuzz.py``, which runs the same fuzzing with many more requests): no 5xx anywhere,
responses conform to the schema where it declares them, every 4xx answers JSON whose ``detail``
names what was wrong (for a 422 from validation: a ``loc`` down to the field), a call without a valid
token never gets past authentication, and no rejected request leaves an audit row. The requests made
are counted and the count asserted (at least :data:`MIN_REQUESTS`): the figure is proven, not assumed.

The hand-written half sends what a generator rarely produces: bodies over the size limit, JSON
nested 10,000 deep, ``NaN``/``Infinity``/``1e309``, duplicate keys, unknown fields, wrong content
types, unicode, RTL overrides, NUL and lone surrogates in identifiers, booleans and strings for
numbers, an array for an object. Each is a 4xx naming the field and leaves no audit row.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings

from benchmarks.api_fuzz import FuzzTarget, detail_problem, load_schema, make_target, send
from tests.serving.conftest import PATIENT

#: Hypothesis examples per operation in the fuzzing phase (positive and negative mixed); the schema's
#: examples and the coverage phase add their own cases on top.
FUZZ_EXAMPLES = 150
#: What a CI run must have sent, across all operations.
MIN_REQUESTS = 1000
#: Operations of the schema (the CDS Hooks catch-all routes for unknown services included).
OPERATIONS = 9


# ----------------------------------------------------------------------------- fuzzing the schema


@pytest.fixture(scope="module")
def fuzz_target(prepared_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> FuzzTarget:
    return make_target(prepared_bundle, tmp_path_factory.mktemp("fuzz"))


@pytest.fixture()
def api_schema(fuzz_target: FuzzTarget) -> Any:
    schema = load_schema(fuzz_target, FUZZ_EXAMPLES, deterministic=True)
    schema.config.phases.update(phases=["examples", "coverage", "fuzzing"])
    return schema


@pytest.fixture()
def nodeid_shim(request: pytest.FixtureRequest) -> None:
    """schemathesis 4.32's lazy schemas read and rename ``Node._nodeid``, which pytest 9.2 no longer
    has (it keeps ``_id``): give the node the attribute so that the per-operation subtests run."""
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@pytest.mark.usefixtures("nodeid_shim")
@settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_fuzz_every_operation(case: schemathesis.Case, fuzz_target: FuzzTarget) -> None:
    send(fuzz_target, case)


def test_fuzzing_sent_enough_requests_and_audited_only_answers(fuzz_target: FuzzTarget) -> None:
    """Runs after the fuzzing (file order): its figures, proven."""
    if fuzz_target.sent == 0:
        pytest.skip("test_fuzz_every_operation did not run")
    print(f"\nfuzzed {fuzz_target.sent} requests ({fuzz_target.seconds:.1f} s in the app), "
          f"5xx: {fuzz_target.server_errors}, statuses {dict(sorted(fuzz_target.statuses.items()))}, "
          f"credentials {dict(fuzz_target.credentials)}")
    for operation, statuses in fuzz_target.by_operation.items():
        print(f"  {operation:<48} {fuzz_target.requests[operation]:>5}  {dict(sorted(statuses.items()))}")
    assert fuzz_target.sent >= MIN_REQUESTS, fuzz_target.requests
    assert fuzz_target.server_errors == 0, fuzz_target.statuses
    assert len(fuzz_target.requests) == OPERATIONS  # every operation was fuzzed
    assert fuzz_target.credentials["none"] and fuzz_target.credentials["invalid"]
    assert fuzz_target.statuses[401] and fuzz_target.audited_answers  # both sides of the gate were reached
    # one audit row per answered recommendation: nothing rejected was recorded
    assert fuzz_target.audit_rows() == fuzz_target.audited_answers + fuzz_target.seeded_rows


# ----------------------------------------------------------------------------- hand-written hostile input

REST = "/v1/recommendations"
FEEDBACK = "/v1/feedback"
CDS = "/cds-services/carepath-next-step"
CDS_FEEDBACK = f"{CDS}/feedback"
HOOK: dict[str, Any] = {"hook": "patient-view", "hookInstance": "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea",
                        "context": {"userId": "Practitioner/prac-1", "patientId": "pt-1"}}
OBSERVATION = {"resourceType": "Observation", "status": "final",
               "code": {"coding": [{"system": "http://loinc.org", "code": "44261-6"}]},
               "effectiveDateTime": "2024-01-01", "valueInteger": 14}
PREFETCH = {"patient": {"resourceType": "Patient", "id": "pt-1", "gender": "female"},
            "phq9": {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": OBSERVATION}]}}


def dumps(body: Any) -> bytes:
    return json.dumps(body).encode()


def rest(**fields: Any) -> bytes:
    return dumps({"features": PATIENT, **fields})


def hook(context: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
    return {**HOOK, "context": {**HOOK["context"], **(context or {})}, "prefetch": PREFETCH, **fields}


@dataclass
class Hostile:
    client: TestClient
    headers: dict[str, str]
    target: FuzzTarget

    def post(self, path: str, body: bytes | Iterator[bytes], content_type: str | None = "application/json",
             **headers: str) -> Any:
        sent = {**self.headers, **headers}
        if content_type is not None:
            sent["Content-Type"] = content_type
        return self.client.post(path, content=body, headers=sent)


@pytest.fixture(scope="module")
def hostile(prepared_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hostile]:
    """One app for every hand-written case (a raised server exception fails the test: no 5xx hides)."""
    target = make_target(prepared_bundle, tmp_path_factory.mktemp("hostile"))
    with TestClient(target.app) as client:
        yield Hostile(client, {"Authorization": f"Bearer {target.token}"}, target)


def assert_refused(hostile: Hostile, path: str, body: bytes | Iterator[bytes], status: int,
                   named: tuple[str | int, ...] | str, content_type: str | None = "application/json") -> None:
    """Posted, ``body`` gets ``status`` with a detail naming ``named`` (a ``loc`` prefix, or words of the
    message), and leaves no audit row."""
    rows_before = hostile.target.audit_rows()
    response = hostile.post(path, body, content_type=content_type)
    assert response.status_code == status, response.text
    answer = response.json()
    assert detail_problem(status, answer) is None, answer
    detail = answer["detail"]
    if isinstance(named, tuple):
        assert isinstance(detail, list), detail
        assert any(tuple(error["loc"][:len(named)]) == named for error in detail), (named, detail)
    else:
        assert named in json.dumps(detail, ensure_ascii=False), (named, detail)
    assert hostile.target.audit_rows() == rows_before


def test_the_unspoilt_requests_are_answered(hostile: Hostile) -> None:
    """The bodies the hostile cases below are made from are valid: each refusal is the spoiling's doing."""
    before = hostile.target.audit_rows()
    assert hostile.post(REST, rest(patient_id="MRN-1", top_k=3, explain=False)).status_code == 200
    assert hostile.post(CDS, dumps(hook())).status_code == 200
    assert hostile.target.audit_rows() == before + 2


NEST = 10_000
OVER = 65 * 1024  # the default limit is 64 KiB


@pytest.mark.parametrize(("path", "body", "status", "named"), [
    # oversized: declared by Content-Length
    (REST, rest(patient_id="x" * OVER), 413, "request body over 65536 bytes"),
    (CDS, dumps(hook(padding="x" * OVER)), 413, "request body over 65536 bytes"),
    # deep JSON: 10,000 levels, and deeper than 64 under a field
    (REST, b"[" * NEST, 422, ("body",)),
    (REST, b'{"f":' * NEST, 422, ("body",)),
    (REST, b'{"features": ' + b"[" * 100 + b"]" * 100 + b"}", 422, ("body", "features")),
    (CDS, dumps(hook()).replace(b'"prefetch": {', b'"prefetch": {"deep": ' + b"[" * 500 + b"]" * 500 + b", "),
     422, ("body", "prefetch", "deep")),
    (CDS_FEEDBACK, b'{"feedback": ' + b"[" * NEST, 422, ("body",)),
    # NaN and infinities: not JSON; 1e309 overflows to one
    (REST, rest().replace(b'"phq9": 18', b'"phq9": NaN'), 422, ("body", "features", "phq9")),
    (REST, rest().replace(b'"adherence": 0.8', b'"adherence": Infinity'), 422, ("body", "features", "adherence")),
    (REST, rest().replace(b'"gad7": 12', b'"gad7": -Infinity'), 422, ("body", "features", "gad7")),
    (REST, rest().replace(b'"phq9": 18', b'"phq9": 1e309'), 422, ("body", "features", "phq9")),
    (REST, rest().replace(b'"adherence": 0.8', b'"adherence": -1e309'), 422, ("body", "features", "adherence")),
    (REST, rest(top_k=3).replace(b'"top_k": 3', b'"top_k": NaN'), 422, ("body", "top_k")),
    (CDS, dumps(hook()).replace(b'"valueInteger": 14', b'"valueInteger": NaN'), 422,
     ("body", "prefetch", "phq9", "entry", 0, "resource", "valueInteger")),
    # huge numbers
    (REST, rest().replace(b'"phq9": 18', b'"phq9": 1' + b"0" * 400), 422, ("body", "features", "phq9")),
    (REST, rest().replace(b'"phq9": 18', b'"phq9": 1' + b"0" * 5000), 422, ("body",)),
    (REST, rest().replace(b'"adherence": 0.8', b'"adherence": 1e308'), 422, ("body", "features", "adherence")),
    (REST, rest(top_k=10**30), 422, ("body", "top_k")),
    # booleans and strings where numbers go, numbers where booleans go
    (REST, rest().replace(b'"phq9": 18', b'"phq9": true'), 422, ("body", "features", "phq9")),
    (REST, rest().replace(b'"adherence": 0.8', b'"adherence": false'), 422, ("body", "features", "adherence")),
    (REST, rest(top_k=True), 422, ("body", "top_k")),
    (REST, rest().replace(b'"phq9": 18', b'"phq9": "18"'), 422, ("body", "features", "phq9")),
    (REST, rest(explain=1), 422, ("body", "explain")),
    (REST, rest(explain="yes"), 422, ("body", "explain")),
    # unknown fields
    (REST, rest(debug=True), 422, ("body", "debug")),
    (REST, dumps({"features": {**PATIENT, "favourite_colour": 3}}), 422, ("body", "features", "favourite_colour")),
    (FEEDBACK, dumps({"audit_id": "a", "suggestion_id": "s", "action": "continue", "outcome": "accepted",
                      "admin": True}), 422, ("body", "admin")),
    # not an object, or nothing at all
    (REST, b"", 422, ("body",)),
    (REST, b"[]", 422, ("body",)),
    (REST, b"null", 422, ("body",)),
    (REST, b'"features"', 422, ("body",)),
    (REST, b"12", 422, ("body",)),
    (REST, b"{", 422, ("body",)),
    (REST, dumps({"features": [PATIENT]}), 422, ("body", "features")),
    (CDS, b"[]", 422, ("body",)),
    (CDS_FEEDBACK, b"{}", 422, ("body", "feedback")),
    (FEEDBACK, b"[]", 422, ("body",)),
    # duplicate keys: parsers disagree on which value counts (here: the self-harm item)
    (REST, b'{"features": {"phq9": 18, "phq9_item9": 3, "phq9_item9": 0}}', 422, ("body", "features", "phq9_item9")),
    (REST, b'{"features": {}, "features": {"phq9": 18}}', 422, ("body", "features")),
    (CDS, b'{"hookInstance": "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea", ' + dumps(hook())[1:], 422,
     ("body", "hookInstance")),
    (CDS_FEEDBACK, b'{"feedback": [], "feedback": []}', 422, ("body", "feedback")),
    # text that is not text
    (REST, b'{"features": {}, "patient_id": "MRN\xff\xfe"}', 422, ("body",)),
    (REST, rest(patient_id="MRN-1").replace(b"MRN-1", b"MRN\\ud800"), 422, ("body", "patient_id")),
    (REST, b'{"features": {"\\udfff": 1}}', 422, ("body", "features")),
])
def test_hostile_bodies_are_refused_naming_the_field(hostile: Hostile, path: str, body: bytes, status: int,
                                                     named: tuple[str | int, ...] | str) -> None:
    assert_refused(hostile, path, body, status, named)


def test_a_streamed_body_over_the_limit_is_refused_as_it_arrives(hostile: Hostile) -> None:
    chunks = iter([b'{"features": {}, "patient_id": "'] + [b"x" * 8192] * 9 + [b'"}'])  # no Content-Length
    assert_refused(hostile, REST, chunks, 413, "request body over 65536 bytes")


@pytest.mark.parametrize("content_type", [
    "text/plain", "multipart/form-data; boundary=x", "multipart/form-data", "application/x-www-form-urlencoded",
    "application/xml", None,
])
@pytest.mark.parametrize("path", [REST, CDS, FEEDBACK, CDS_FEEDBACK])
def test_wrong_content_types_are_refused(hostile: Hostile, path: str, content_type: str | None) -> None:
    body = dumps(hook()) if path == CDS else rest()
    if content_type and content_type.startswith("multipart"):
        body = b'--x\r\nContent-Disposition: form-data; name="features"\r\n\r\n{}\r\n--x--\r\n'
    assert_refused(hostile, path, body, 422, ("body",), content_type=content_type)


@pytest.mark.parametrize(("patient_id", "named"), [
    ("MRN\u00000042", ("body", "patient_id")),        # NUL
    ("\u202e2400-NRM", ("body", "patient_id")),        # RTL override: reads as another id
    ("MRN\u200b0042", ("body", "patient_id")),         # zero-width space
    ("MRN\u20660042\u2069", ("body", "patient_id")),   # bidi isolate
    ("MRN\n0042", ("body", "patient_id")),             # a newline forges log lines
    ("MRN\x1b[31m0042", ("body", "patient_id")),       # terminal escape
    ("\ue000", ("body", "patient_id")),                # private use
    ("x" * 129, ("body", "patient_id")),
    ("", ("body", "patient_id")),
])
def test_unprintable_patient_ids_are_refused(hostile: Hostile, patient_id: str,
                                             named: tuple[str | int, ...]) -> None:
    assert_refused(hostile, REST, rest(patient_id=patient_id), 422, named)


@pytest.mark.parametrize(("context", "fields", "named"), [
    ({"patientId": "pt\u00001"}, {}, ("body", "context", "patientId")),
    ({"patientId": "\u202ept-1"}, {}, ("body", "context", "patientId")),
    ({"patientId": "😀"}, {}, ("body", "context", "patientId")),
    ({"patientId": "مريض-1"}, {}, ("body", "context", "patientId")),
    ({"patientId": "pt-1/_history/2"}, {}, ("body", "context", "patientId")),  # would change the reference
    ({"patientId": "../Practitioner/1"}, {}, ("body", "context", "patientId")),
    ({"patientId": "x" * 65}, {}, ("body", "context", "patientId")),
    ({"patientId": 42}, {}, ("body", "context", "patientId")),
    ({"userId": "Practitioner/\u00001"}, {}, ("body", "context", "userId")),
    ({}, {"hookInstance": "😀"}, ("body", "hookInstance")),
    ({}, {"hookInstance": "d1577c69-dfbe-44ad-ba6d-3e05e953b2e\u0000"}, ("body", "hookInstance")),
    ({}, {"hookInstance": "\u202ed1577c69-dfbe-44ad-ba6d-3e05e953b2ea"}, ("body", "hookInstance")),
    ({}, {"hookInstance": ""}, ("body", "hookInstance")),
    ({}, {"hookInstance": 1}, ("body", "hookInstance")),
    ({}, {"hook": "patient-view\u0000"}, ("body", "hook")),
])
def test_hostile_cds_identifiers_are_refused(hostile: Hostile, context: dict[str, Any], fields: dict[str, Any],
                                             named: tuple[str | int, ...]) -> None:
    assert_refused(hostile, CDS, dumps(hook(context, **fields)), 422, named)


def test_printable_unicode_ids_are_answered_and_never_stored(hostile: Hostile) -> None:
    """Identifiers of any script (and emoji) are printable: answered, and kept only as a pseudonym."""
    before = hostile.target.audit_rows()
    ids = ["患者-0042", "مريض-٤٢", "Zoë Ångström", "MRN-😀-42"]
    for patient_id in ids:
        assert hostile.post(REST, rest(patient_id=patient_id)).status_code == 200
    assert hostile.target.audit_rows() == before + len(ids)
    db = Path(hostile.target.db_url.removeprefix("sqlite:///"))
    stored = b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*"))
    assert not any(patient_id.encode() in stored for patient_id in ids)


def test_negative_zero_is_zero(hostile: Hostile) -> None:
    """``-0`` and ``-0.0`` are the number 0 (JSON Schema: an integer when the fraction is zero): in range,
    answered exactly as 0, not refused."""
    answers = []
    for literal in (b"0", b"-0", b"-0.0", b"0.0"):
        body = rest(explain=False).replace(b'"on_psychotherapy": 0', b'"on_psychotherapy": ' + literal)
        response = hostile.post(REST, body)
        assert response.status_code == 200, response.text
        answers.append([(s["action"], s["score"]) for s in response.json()["suggestions"]])
    assert all(answer == answers[0] for answer in answers)


def test_no_token_is_401_before_any_validation(hostile: Hostile) -> None:
    before = hostile.target.audit_rows()
    for headers in ({}, {"Authorization": ""}, {"Authorization": "Bearer cp_nope"}, {"Authorization": "Basic eDp5"}):
        for path, body in ((REST, rest(patient_id="x" * 500)), (CDS, dumps(hook())), (FEEDBACK, b"{}")):
            response = hostile.client.post(path, content=body, headers={"Content-Type": "application/json",
                                                                         **headers})
            assert response.status_code == 401 and "bearer token" in response.json()["detail"]
    assert hostile.target.audit_rows() == before
