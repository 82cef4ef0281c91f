"""Hostile API input at scale: property-based fuzzing of every operation of the OpenAPI schema.

The app runs in process (ASGI) over a prepared policy bundle and a fresh SQLite audit store.
schemathesis turns each operation of ``/openapi.json`` into a Hypothesis strategy, in positive
(valid by the schema) and negative (invalid) mode; Hypothesis draws ``--requests`` cases in all,
spread over the operations that take input. Each case is sent with the bearer token, except a share
fixed by the case itself sent with none or an invalid one. Generated bodies alone rarely get past
the first check of the CDS Hooks service (the hook name) or the feedback endpoints (an existing audit
id), so schema hooks graft a share of them onto valid ones: a valid call whose FHIR prefetch has up to
three fields replaced by generated values or removed, and feedback on answers made before fuzzing.
Every case is checked:

- no 5xx (an exception escaping the app counts as one);
- the response conforms to the schema where the schema declares its status;
- every 4xx is JSON whose ``detail`` says what was wrong: a message, or (422 from validation) errors
  each with a ``loc`` from ``body``/``query``/``path`` down to the field;
- a call without a valid token never gets past authentication on a protected operation;
- at the end: the audit store holds exactly one row per answered recommendation (a rejected request
  leaves none).

An operation's run stops at its first failure, which Hypothesis shrinks to a minimal case: the
result keeps that case as a curl command (token filtered). Prints a table and writes
``benchmarks/results/api_fuzz.json`` (requests per operation, status histogram, 5xx count,
failures). ``tests/serving/test_api_fuzz.py`` runs the same checks with at least 1,000 requests in
CI (plus schemathesis's schema examples and coverage phase); this is the longer run.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import tempfile
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
#: One call in ten goes without a token, one in ten with an invalid one.
CREDENTIAL_SHARES = ("none", "invalid", *["valid"] * 8)
#: Operations anyone may call (no token).
PUBLIC_PATHS = frozenset({"/healthz", "/cds-services"})
#: Paths whose 200 answers each write one audit row.
AUDITED_PATHS = frozenset({"/v1/recommendations", "/cds-services/carepath-next-step"})
#: Parts of a request a validation error's ``loc`` may start with.
REQUEST_PARTS = frozenset({"body", "query", "path", "header", "cookie"})


# ----------------------------------------------------------------------------- what every answer must satisfy


def detail_problem(status: int, body: Any) -> str | None:
    """Why a 4xx answer fails to say what was wrong (None when it says it).

    It must be a JSON object with a ``detail``: a non-empty message, or (422 from validation) a
    non-empty list of errors, each with a ``msg`` and a ``loc`` starting at the part of the request
    at fault (``["body", "features", "phq9"]``).
    """
    if not isinstance(body, dict) or "detail" not in body:
        return f"{status} without a JSON object holding 'detail'"
    detail = body["detail"]
    if isinstance(detail, str):
        return None if detail.strip() else f"{status} with an empty detail"
    if not isinstance(detail, list) or not detail:
        return f"{status} with a detail that is neither a message nor a list of errors: {detail!r}"[:300]
    for error in detail:
        if not isinstance(error, dict) or not error.get("msg"):
            return f"{status} with an error without a message: {error!r}"[:300]
        loc = error.get("loc")
        if not isinstance(loc, list) or not loc or loc[0] not in REQUEST_PARTS:
            return f"{status} with an error whose loc names no part of the request: {error!r}"[:300]
    return None


def auth_problem(kind: str, path: str, status: int, body: Any) -> str | None:
    """Why an answer to a call without a valid token is wrong (None when it is right).

    On a protected operation such a call gets 401, or is refused before authentication because
    its body is not usable JSON at all (413, or 422 ``json_invalid``); an unknown CDS service is
    404 to anyone.
    """
    if kind == "valid" or path in PUBLIC_PATHS:
        return None
    if status in (401, 404, 405, 413):
        return None
    if status == 422 and isinstance(body, dict) and isinstance(body.get("detail"), list):
        if all(isinstance(e, dict) and e.get("type") == "json_invalid" for e in body["detail"]):
            return None
    return f"a call with {kind} credentials to {path} got {status}, not 401"


def credential(case: Any, volatile: frozenset[str] = frozenset()) -> str:
    """Which credential a case is sent with: a function of the case alone, so that a shrunk or
    replayed failure is sent the same way (``volatile``: ids that differ from run to run, left out)."""
    from schemathesis.core import NotSet

    body = None if isinstance(case.body, NotSet) else case.body  # NOT_SET's repr holds its address
    key = repr((case.method, case.formatted_path, case.query, body, case.media_type))
    for text in volatile:
        key = key.replace(text, "")
    return CREDENTIAL_SHARES[zlib.crc32(key.encode("utf-8", "surrogatepass")) % len(CREDENTIAL_SHARES)]


def auth_headers(kind: str, token: str) -> dict[str, str]:
    if kind == "valid":
        return {"Authorization": f"Bearer {token}"}
    if kind == "invalid":
        return {"Authorization": "Bearer cp_not-a-token"}
    return {}


def detail_names_the_field(ctx: Any, response: Any, case: Any) -> bool | None:
    """A schemathesis check: every 4xx says what was wrong (see :func:`detail_problem`)."""
    if 400 <= response.status_code < 500:
        try:
            body = response.json()
        except ValueError:
            raise AssertionError(f"{response.status_code} answered with a body that is not JSON") from None
        problem = detail_problem(response.status_code, body)
        if problem:
            raise AssertionError(problem)
    return None


# ----------------------------------------------------------------------------- grafts onto valid requests

PATIENT_ID = "pt-fuzz-1"
LOINC = "http://loinc.org"


def _observation(oid: str, code: str, value: int, when: str, *, integer: bool = False) -> dict[str, Any]:
    return {"resourceType": "Observation", "id": oid, "status": "final",
            "code": {"coding": [{"system": LOINC, "code": code}]}, "subject": {"reference": f"Patient/{PATIENT_ID}"},
            "effectiveDateTime": when,
            **({"valueInteger": value} if integer else {"valueQuantity": {"value": value, "unit": "{score}"}})}


def _searchset(*resources: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": r} for r in resources]}


#: A valid prefetch of the CDS Hooks service: the base the fuzzed prefetches are mutated from.
PREFETCH: dict[str, Any] = {
    "patient": {"resourceType": "Patient", "id": PATIENT_ID, "gender": "female", "birthDate": "1980-04-02"},
    "phq9": _searchset(_observation("phq-1", "44261-6", 19, "2024-01-08"),
                       _observation("phq-2", "44261-6", 14, "2024-02-12T09:30:00Z")),
    "item9": _searchset(_observation("i9-1", "44260-8", 1, "2024-02-12", integer=True)),
    "gad7": _searchset(_observation("gad-1", "70274-6", 9, "2024-02")),
    "medications": _searchset({
        "resourceType": "MedicationRequest", "id": "mr-1", "status": "active", "intent": "order",
        "subject": {"reference": f"Patient/{PATIENT_ID}"}, "authoredOn": "2024-01-08",
        "medicationCodeableConcept": {"coding": [{"system": "http://www.whocc.no/atc", "code": "N06AB06"}],
                                      "text": "Sertraline 50 mg tablet"}}),
}


def _paths(value: Any, path: tuple[str | int, ...] = ()) -> list[tuple[str | int, ...]]:
    """Every place in a JSON document (the root left out)."""
    found = [path] if path else []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found += _paths(item, (*path, key))
    return found


#: Deepest first: Hypothesis leans towards the first choices, and removing a whole resource says little.
PREFETCH_PATHS = sorted(_paths(PREFETCH), key=len, reverse=True)


def _strategies() -> tuple[Any, dict[str, Any]]:
    """Any JSON value, and values that fit a FHIR field by its name (so that some get past validation)."""
    from datetime import UTC

    from hypothesis import strategies as st

    scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
               | st.text(max_size=20))
    any_json = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                            | st.dictionaries(st.text(max_size=10), inner, max_size=3), max_leaves=8)
    when = (st.dates().map(str) | st.datetimes(timezones=st.just(UTC)).map(lambda d: d.isoformat())
            | st.sampled_from(["2024", "2024-02", "0001-01-01", "9999-12-31", "2024-02-30", ""]))
    score = st.integers(-5, 40) | st.integers() | st.floats(-1e6, 1e6)
    by_name = {
        "value": score, "valueInteger": score, "effectiveDateTime": when, "authoredOn": when, "birthDate": when,
        "issued": when, "gender": st.sampled_from(["female", "male", "other", "unknown", ""]),
        "status": st.sampled_from(["final", "amended", "preliminary", "entered-in-error", "cancelled", "active",
                                   "stopped", "draft"]),
        "code": st.sampled_from(["44261-6", "44260-8", "70274-6", "LA6571-9", "N06AB06", "N05A", ""]),
        "system": st.sampled_from([LOINC, "http://www.whocc.no/atc", "http://snomed.info/sct", ""]),
        "text": st.sampled_from(["Sertraline 50 mg", "Prozac", "ibuprofen", "", "SERTRALINE/ZOLOFT"]),
        "reference": st.sampled_from([f"Patient/{PATIENT_ID}", "Patient/someone-else", "#med-1", "Patient/",
                                      f"https://ehr.example/fhir/Patient/{PATIENT_ID}/_history/2"]),
        "resourceType": st.sampled_from(["Patient", "Observation", "Bundle", "MedicationRequest", "Medication",
                                         "OperationOutcome", ""]),
    }
    return any_json, by_name


def _mutated(document: Any, changes: list[tuple[tuple[str | int, ...], Any]]) -> Any:
    """A deep copy of ``document`` with each (path, value) applied (value ``_DELETE``: removed)."""
    import copy

    result = copy.deepcopy(document)
    for path, value in changes:
        holder = result
        for step in path[:-1]:
            try:
                holder = holder[step]
            except (KeyError, IndexError, TypeError):
                break
        else:
            try:
                if value is _DELETE:
                    del holder[path[-1]]
                else:
                    holder[path[-1]] = value
            except (KeyError, IndexError, TypeError):
                pass
    return result


_DELETE = object()


@dataclass
class Known:
    """Answers made before fuzzing, so that generated feedback can name them."""

    audit_id: str
    suggestions: list[str]
    card: str
    card_suggestions: list[str]


def seed_answers(target: FuzzTarget) -> Known:
    """One REST and one CDS Hooks answer (two audit rows, counted in ``target.seeded_rows``)."""
    from fastapi.testclient import TestClient

    client = TestClient(target.app)
    headers = {"Authorization": f"Bearer {target.token}"}
    rest = client.post("/v1/recommendations", headers=headers, json={"features": {"phq9": 17, "phq9_item9": 0}})
    cds = client.post("/cds-services/carepath-next-step", headers=headers, json={
        "hook": "patient-view", "hookInstance": "0b3c6c4e-4b1e-4f5e-9a51-0d5e8a3d2f10",
        "context": {"userId": "Practitioner/1", "patientId": PATIENT_ID}, "prefetch": PREFETCH})
    assert rest.status_code == 200 and cds.status_code == 200, (rest.text, cds.text)
    target.seeded_rows += 2
    card = cds.json()["cards"][0]
    known = Known(rest.json()["audit_id"], [s["id"] for s in rest.json()["suggestions"]],
                  card["uuid"], [s["uuid"] for s in card["suggestions"]])
    target.volatile = frozenset({known.audit_id, *known.suggestions, known.card, *known.card_suggestions})
    return known


def register_grafts(schema: Any, target: FuzzTarget) -> None:
    """Schema hooks grafting a share of the generated bodies onto valid requests (see the module doc)."""
    from hypothesis import strategies as st

    known = seed_answers(target)
    any_json, by_name = _strategies()

    def change(path: tuple[str | int, ...]) -> Any:
        value = by_name.get(str(path[-1]), any_json) | any_json
        return st.tuples(st.just(path), value | st.just(_DELETE))

    changes = st.lists(st.sampled_from(PREFETCH_PATHS).flatmap(change), max_size=3)

    def cds_call(body: Any) -> Any:
        generated = body if isinstance(body, dict) else {}
        valid = {"hook": "patient-view", "hookInstance": "8e1f2a4c-3b5d-4e6f-8a7b-9c0d1e2f3a4b",
                 "context": {"userId": "Practitioner/1", "patientId": PATIENT_ID}}
        mutated = changes.map(lambda c: {**valid, "prefetch": _mutated(PREFETCH, c)})
        # a quarter as generated, a quarter a valid envelope round the generated rest, half a mutated prefetch
        return st.one_of(st.just(body), st.just({**generated, **valid}), mutated, mutated)

    def rest_feedback(body: Any) -> Any:
        if not isinstance(body, dict):
            return st.just(body)
        suggestion = st.sampled_from(known.suggestions) | st.just(body.get("suggestion_id"))
        return st.just(body) | suggestion.map(lambda s: {**body, "audit_id": known.audit_id, "suggestion_id": s})

    def cds_feedback(body: Any) -> Any:
        items = body.get("feedback") if isinstance(body, dict) else None
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            return st.just(body)
        accepted = st.lists(st.sampled_from(known.card_suggestions).map(lambda s: {"id": s}), max_size=2)
        grafted = st.lists(accepted, min_size=len(items), max_size=len(items)).map(lambda picks: {
            **body, "feedback": [{**item, "card": known.card, "acceptedSuggestions": pick}
                                 for item, pick in zip(items, picks, strict=True)]})
        return st.just(body) | grafted

    grafts = {"/cds-services/carepath-next-step": cds_call, "/v1/feedback": rest_feedback,
              "/cds-services/carepath-next-step/feedback": cds_feedback}

    def flatmap_body(context: Any, body: Any) -> Any:
        graft = grafts.get(context.operation.path) if context.operation is not None else None
        return graft(body) if graft is not None else st.just(body)

    schema.hook(flatmap_body)


# ----------------------------------------------------------------------------- the app under fuzzing


@dataclass
class FuzzTarget:
    """The app in process, its token and audit store, and what was sent to it."""

    app: Any
    token: str
    db_url: str
    requests: Counter[str] = field(default_factory=Counter)  # by operation ("POST /v1/feedback")
    statuses: Counter[int] = field(default_factory=Counter)
    by_operation: dict[str, Counter[int]] = field(default_factory=dict)
    credentials: Counter[str] = field(default_factory=Counter)
    audited_answers: int = 0
    seeded_rows: int = 0  # audit rows of the answers made before fuzzing (see seed_answers)
    volatile: frozenset[str] = frozenset()  # their ids (random), which generated feedback may hold
    seconds: float = 0.0  # spent in the app, generation not counted

    @property
    def sent(self) -> int:
        return sum(self.requests.values())

    @property
    def server_errors(self) -> int:
        return sum(n for status, n in self.statuses.items() if status >= 500)

    def audit_rows(self) -> int:
        from sqlalchemy import func, select
        from sqlalchemy.orm import Session

        from serving.db import RecommendationRecord, make_engine

        with Session(make_engine(self.db_url)) as session:
            return int(session.scalar(select(func.count()).select_from(RecommendationRecord)) or 0)


def make_target(bundle: Path, folder: Path) -> FuzzTarget:
    """The app over ``bundle`` with a fresh audit store in ``folder`` and a recommend+feedback token."""
    from serving.app import ServeSettings, create_app
    from serving.auth import TokenStore
    from serving.db import make_engine

    db_url = f"sqlite:///{folder / 'fuzz-audit.sqlite'}"
    token = TokenStore(make_engine(db_url)).create("fuzz-clinic")
    # no rate limit: fuzzing sends far more than 20 requests a second on one token
    app = create_app(ServeSettings(policies=[bundle], db_url=db_url, rate_limit=0, allow_uncertified=True))
    return FuzzTarget(app, token, db_url)


def load_schema(target: FuzzTarget, examples: int, *, deterministic: bool) -> Any:
    """The app's OpenAPI schema for schemathesis: positive and negative cases, ``examples`` per operation."""
    import schemathesis
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_asgi("/openapi.json", target.app)
    schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
                                    max_examples=examples, deterministic=deterministic, database="none")
    # reproductions hide the token only: the default also blanks FHIR fields such as authoredOn
    sanitization = schema.config.output.sanitization
    sanitization.keys_to_sanitize = sanitization.sensitive_markers = ("authorization",)
    register_grafts(schema, target)
    return schema


def send(target: FuzzTarget, case: Any) -> None:
    """Send one case with its credential, count it, and check the answer (AssertionError or
    schemathesis's FailureGroup when a check fails; both carry a curl reproduction)."""
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import response_schema_conformance

    kind = credential(case, target.volatile)
    operation = case.operation.label
    target.requests[operation] += 1
    target.credentials[kind] += 1
    statuses = target.by_operation.setdefault(operation, Counter())
    started = time.perf_counter()
    try:
        response = case.call(headers=auth_headers(kind, target.token))
    except Exception as err:  # an exception escaping the app: a real server answers 500
        target.statuses[500] += 1
        statuses[500] += 1
        raise AssertionError(f"server error: {type(err).__name__}: {str(err)[:300]}\n"
                             f"{case.as_curl_command()}") from err
    finally:
        target.seconds += time.perf_counter() - started
    status = response.status_code
    target.statuses[status] += 1
    statuses[status] += 1
    path = case.formatted_path
    if status == 200 and case.method.upper() == "POST" and path in AUDITED_PATHS:
        target.audited_answers += 1
    try:
        body = response.json()
    except ValueError:
        body = None
    problem = auth_problem(kind, path, status, body)
    if problem:
        raise AssertionError(f"{problem}\n{case.as_curl_command()}")
    case.validate_response(response, checks=[not_a_server_error, response_schema_conformance, detail_names_the_field])


# ----------------------------------------------------------------------------- the benchmark


def fuzz_operation(target: FuzzTarget, operation: Any, examples: int, seed: int) -> str | None:
    """Fuzz one operation; the minimal failing case (a message with its curl command) or None."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hypothesis_seed
    from hypothesis import strategies as st
    from schemathesis import GenerationMode

    strategy = st.one_of(operation.as_strategy(generation_mode=GenerationMode.POSITIVE),
                         operation.as_strategy(generation_mode=GenerationMode.NEGATIVE))
    failures: list[str] = []

    @hypothesis_seed(seed)
    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck),
              phases=[Phase.generate, Phase.shrink], print_blob=False)
    @given(case=strategy)
    def run(case: Any) -> None:
        try:
            send(target, case)
        except Exception as err:
            failures.append(str(err))  # the last one recorded is the shrunk case Hypothesis reports
            raise

    try:
        run()
    except Exception:
        return failures[-1] if failures else "the fuzzing run failed without a recorded case"
    return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", default="runs/cql/seed0/policy",
                        help="prepared policy bundle (default: the one 'make demo' trains)")
    parser.add_argument("--requests", type=int, default=20_000,
                        help="generated requests in all, spread over the operations that take input")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "api_fuzz.json")
    args = parser.parse_args(argv)
    if not (Path(args.policy) / "bundle.json").is_file():
        raise SystemExit(f"{args.policy}: no policy bundle; run 'make demo' first or pass --policy PATH")

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="carepath-api-fuzz-") as tmp:
        target = make_target(Path(args.policy), Path(tmp))
        schema = load_schema(target, examples=1, deterministic=False)
        operations = [result.ok() for result in schema.get_all_operations()]
        with_input = [op for op in operations if op.body or op.path_parameters or op.query]
        per_operation = math.ceil(args.requests / max(1, len(with_input)))
        failures: dict[str, str] = {}
        for operation in operations:
            examples = per_operation if operation in with_input else 10
            failure = fuzz_operation(target, operation, examples, args.seed)
            if failure is not None:
                failures[operation.label] = failure
            print(f"{operation.label:<48} {target.requests[operation.label]:>7} requests "
                  f"{'FAILED' if failure else 'ok'}", flush=True)
        audit_rows = target.audit_rows()
    wall = time.perf_counter() - started
    figures = {
        "benchmark": "api_fuzz", "machine": platform.platform(), "cpus": os.cpu_count(),
        "policy": args.policy, "seed": args.seed, "requests_asked": args.requests,
        "requests": target.sent, "wall_s": round(wall, 1), "app_s": round(target.seconds, 1),
        "server_errors_5xx": target.server_errors,
        "statuses": {str(k): v for k, v in sorted(target.statuses.items())},
        "requests_per_operation": dict(target.requests),
        "statuses_per_operation": {op: {str(k): v for k, v in sorted(c.items())}
                                   for op, c in target.by_operation.items()},
        "credentials": dict(target.credentials),
        "answered_recommendations": target.audited_answers, "seeded_rows": target.seeded_rows,
        "audit_rows": audit_rows, "audit_rows_match": audit_rows == target.audited_answers + target.seeded_rows,
        "failures": [{"operation": op, "minimal_case": text} for op, text in failures.items()],
    }
    print(f"\n{target.sent} requests in {wall:.0f} s ({target.seconds:.0f} s in the app); "
          f"statuses {figures['statuses']}")
    print(f"5xx: {target.server_errors}; failed operations: {len(failures)}; audit rows {audit_rows} for "
          f"{target.audited_answers} answered recommendations and {target.seeded_rows} seeded "
          f"({'match' if figures['audit_rows_match'] else 'MISMATCH'})")
    for op, text in failures.items():
        print(f"\n--- {op}\n{text}")
    from evaluation.cli import write_json_atomic  # atomic: never a half-written result

    write_json_atomic(args.out, figures)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
