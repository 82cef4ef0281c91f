"""The audit store: recording, pseudonyms, feedback, summary and export as logged data.

The store's tests run on SQLite and on PostgreSQL (``[sqlite]``/``[postgresql]``, see
tests/serving/conftest.py for the server they need), the last one through a real outage of
PostgreSQL: a TCP forwarder between the app and the server that is stopped and started again.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from sqlalchemy import Engine

import serving.audit as audit_module
from carepath.cli import main
from envs.env import CarePathEnv
from envs.rules import action_mask
from envs.spec import ACTION_NAMES, FEATURE_INDEX, FEATURE_NAMES
from offline_data.dataset import load_dataset
from offline_data.pseudonymise import pseudonym
from serving.audit import AuditStore, UnknownAuditId
from serving.db import make_engine, pseudonym_key
from tests.serving.conftest import PATIENT, AuditDatabase, serve

KEY = b"0123456789abcdef-audit-test-key"
START = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)


class Clock:
    """Replaces the store's clock so records can be placed in given weeks."""

    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(audit_module, "utc_now", c)
    return c


@dataclass
class Db:
    """A fresh audit store (SQLite or PostgreSQL) and an engine on it."""

    database: AuditDatabase
    engine: Engine

    @property
    def url(self) -> str:
        return self.database.url


@pytest.fixture
def db(audit_db: AuditDatabase) -> Iterator[Db]:
    engine = make_engine(audit_db.url)
    yield Db(audit_db, engine)
    engine.dispose()


def features_of(obs) -> dict[str, float]:
    return {name: float(obs[j]) for j, name in enumerate(FEATURE_NAMES)}


def patient_weeks(seed: int, weeks: int) -> list[tuple[dict[str, float], int]]:
    """A simulated patient's observations and an allowed action each week."""
    env = CarePathEnv()
    rng = np.random.default_rng(seed)
    obs, _ = env.reset(seed=seed)
    out = []
    for _ in range(weeks):
        action = int(rng.choice(np.flatnonzero(action_mask(obs[None])[0])))
        out.append((features_of(obs), action))
        obs, *_ = env.step(action)
    return out


def record(store: AuditStore, patient: str | None, features, *, channel="rest", request=None, response=None):
    return store.record_recommendation(
        token_name="ehr", channel=channel, patient_id=patient, policy_name="cql", policy_version="1.2.0",
        features=features, request=request if request is not None else {"features": features},
        response=response if response is not None else {"ranked": ["continue"]})


def test_recommendation_and_feedback_round_trip(db):
    store = AuditStore(db.engine, KEY)
    features = patient_weeks(1, 1)[0][0]
    audit_id = store.record_recommendation(
        token_name="ehr", channel="cds-hooks", patient_id="MRN-4711", policy_name="cql", policy_version="1.2.0",
        features=features, request={"hook": "patient-view"}, response={"cards": [{"summary": "Raise dose"}]})
    assert len(audit_id) == 32 and int(audit_id, 16) >= 0
    first = store.record_feedback(audit_id=audit_id, token_name="ehr", suggestion_id="s-1", action="raise_dose",
                                  outcome="accepted")
    second = store.record_feedback(audit_id=audit_id, token_name="page", suggestion_id="s-2",
                                   action="add_psychotherapy", outcome="overridden",
                                   override_reason="patient prefers therapy", clinician_id="dr-who")
    assert second > first
    got = store.get(audit_id)
    assert got is not None
    assert (got.channel, got.token_name, got.policy_name, got.policy_version) == ("cds-hooks", "ehr", "cql", "1.2.0")
    assert got.patient_pseudonym == pseudonym(KEY, "MRN-4711")
    assert got.features == features and list(got.features) == list(FEATURE_NAMES)
    assert got.request == {"hook": "patient-view"} and got.response == {"cards": [{"summary": "Raise dose"}]}
    assert [(f.action, f.outcome, f.override_reason) for f in got.feedback] == [
        ("raise_dose", "accepted", None), ("add_psychotherapy", "overridden", "patient prefers therapy")]
    assert got.feedback[1].clinician_pseudonym == pseudonym(KEY, "dr-who")
    assert got.created_at.tzinfo is not None
    assert store.get("0" * 32) is None
    assert store.count_recommendations() == 1
    assert [r.audit_id for r in store.iter_recommendations()] == [audit_id]


def test_raw_identifiers_are_never_stored(db):
    store = AuditStore(db.engine, KEY)
    patient, clinician = "MRN-9183726", "clinician-Q55821"
    request = {"patient_id": patient, "context": {"patientId": patient},
               "prefetch": {"patient": {"resourceType": "Patient", "id": patient,
                                        "name": [{"family": "Zyxwvutson", "given": ["Quentina"]}],
                                        "birthDate": "1971-04-09", "gender": "female"},
                            "phq9": {"resourceType": "Observation", "subject": {"reference": f"Patient/{patient}"},
                                     "valueQuantity": {"value": 17}}}}
    audit_id = record(store, patient, patient_weeks(2, 1)[0][0], request=request,
                      response={"patient": patient, "cards": []})
    store.record_feedback(audit_id=audit_id, token_name="ehr", suggestion_id="s", action="continue",
                          outcome="accepted", clinician_id=clinician)
    stored = db.database.stored_text()
    assert pseudonym(KEY, patient).encode() in stored  # the test looks in the right place
    for secret in (patient, clinician, "Zyxwvutson", "Quentina", "1971-04-09"):
        assert secret.encode() not in stored
    got = store.get(audit_id)
    assert got is not None
    alias = pseudonym(KEY, patient)
    assert got.request["patient_id"] == alias and got.response["patient"] == alias
    assert got.request["prefetch"]["phq9"]["subject"]["reference"] == f"Patient/{alias}"
    assert got.request["prefetch"]["patient"]["gender"] == "female"  # what is not identifying stays
    assert got.request["prefetch"]["phq9"]["valueQuantity"] == {"value": 17}


def test_same_patient_gets_the_same_pseudonym_across_restarts(db):
    url, key_file = db.url, db.database.key_file
    pseudonyms = []
    for _ in range(2):  # two "server starts": new engine, key found again (SQLite: from the store's key file)
        engine = make_engine(url)
        store = AuditStore(engine, pseudonym_key(url, key_file, environ={}))
        got = store.get(record(store, "MRN-1", patient_weeks(3, 1)[0][0]))
        assert got is not None
        pseudonyms.append(got.patient_pseudonym)
        engine.dispose()
    assert pseudonyms[0] == pseudonyms[1] and pseudonyms[0] is not None and "MRN-1" not in pseudonyms[0]


def test_writing_with_another_key_is_refused(db):
    features = patient_weeks(4, 1)[0][0]
    record(AuditStore(db.engine, KEY), "MRN-1", features)
    with pytest.raises(ValueError, match="made with another key"):
        record(AuditStore(db.engine, b"another-key-of-enough-length"), "MRN-1", features)


def test_bad_input_is_refused(db):
    store = AuditStore(db.engine, KEY)
    features = patient_weeks(5, 1)[0][0]
    with pytest.raises(UnknownAuditId, match="f" * 32) as err:
        store.record_feedback(audit_id="f" * 32, token_name="ehr", suggestion_id="s", action="continue",
                              outcome="accepted")
    assert isinstance(err.value, ValueError)
    audit_id = record(store, "MRN-1", features)
    with pytest.raises(ValueError, match="unknown action 'electroshock'"):
        store.record_feedback(audit_id=audit_id, token_name="ehr", suggestion_id="s", action="electroshock",
                              outcome="accepted")
    with pytest.raises(ValueError, match="unknown outcome 'ignored'"):
        store.record_feedback(audit_id=audit_id, token_name="ehr", suggestion_id="s", action="continue",
                              outcome="ignored")
    with pytest.raises(ValueError, match="unknown channel 'fax'"):
        record(store, "MRN-1", features, channel="fax")
    with pytest.raises(ValueError, match="unknown feature 'mood'"):
        record(store, "MRN-1", {**features, "mood": 1.0})
    with pytest.raises(ValueError, match="phq9 is not a finite number"):
        record(store, "MRN-1", {**features, "phq9": float("nan")})
    with pytest.raises(ValueError, match="response cannot be stored as JSON"):
        record(store, "MRN-1", features, response={"benefit": float("inf")})
    with pytest.raises(ValueError, match="recorded already"):
        store.record_recommendation(token_name="ehr", channel="rest", patient_id=None, policy_name="cql",
                                    policy_version="1", features=features, request={}, response={},
                                    audit_id=audit_id)
    with pytest.raises(ValueError, match="bad audit id"):
        store.record_recommendation(token_name="ehr", channel="rest", patient_id=None, policy_name="cql",
                                    policy_version="1", features=features, request={}, response={},
                                    audit_id="not-hex")
    assert store.count_recommendations() == 1


def fill_store(store: AuditStore, clock: Clock) -> dict[str, list[tuple[int, int, float]]]:
    """3 patients x 4 weekly decisions (patients interleaved in time), plus noise the export must
    skip; returns per raw patient id the expected (t, action, phq9) of each exported week."""
    expected: dict[str, list[tuple[int, int, float]]] = {}
    histories = {f"MRN-{100 + p}": patient_weeks(10 + p, 4) for p in range(3)}
    for week in range(4):
        for p, (patient, history) in enumerate(histories.items()):
            features, action = history[week]
            clock.now = START + timedelta(weeks=week, hours=5 * p)
            if patient == "MRN-100" and week == 2:  # an earlier record in the same week: superseded
                earlier = patient_weeks(99, 1)[0]
                audit_id = record(store, patient, earlier[0])
                store.record_feedback(audit_id=audit_id, token_name="ehr", suggestion_id="x",
                                      action=ACTION_NAMES[earlier[1]], outcome="accepted")
                clock.now += timedelta(days=2)
            audit_id = record(store, patient, features)
            suggested = ACTION_NAMES[(action + 1) % len(ACTION_NAMES)]
            store.record_feedback(audit_id=audit_id, token_name="ehr", suggestion_id="a", action=suggested,
                                  outcome="accepted")  # a first answer, replaced by the clinician's later one
            if p == 1:  # the clinician overrode the suggestion and says what was done instead
                store.record_feedback(audit_id=audit_id, token_name="ehr", suggestion_id="b", action=suggested,
                                      outcome="overridden", override_reason="clinical judgement",
                                      chosen_action=ACTION_NAMES[action])
            else:
                store.record_feedback(audit_id=audit_id, token_name="ehr", suggestion_id="b",
                                      action=ACTION_NAMES[action], outcome="accepted")
            expected.setdefault(patient, []).append((week, action, features["phq9"]))
    clock.now = START + timedelta(weeks=1)
    record(store, "MRN-100", histories["MRN-100"][1][0])  # no feedback: skipped
    audit_id = record(store, None, histories["MRN-101"][1][0])  # no patient: skipped
    store.record_feedback(audit_id=audit_id, token_name="ehr", suggestion_id="c", action="continue",
                          outcome="accepted")
    return expected


def test_export_turns_clinician_choices_into_logged_data(db, clock, tmp_path):
    store = AuditStore(db.engine, KEY)
    expected = fill_store(store, clock)
    out = tmp_path / "export" / "logged.parquet"
    messages: list[str] = []
    result = store.export_logged(out, warn=messages.append, report=messages.append)
    assert (result.rows, result.patients, result.episodes) == (12, 3, 3)
    assert (result.without_feedback, result.without_patient, result.superseded, result.blocked) == (1, 1, 1, 0)
    assert any("k-anonymity" in m for m in messages)

    data = load_dataset(out)
    assert data.behavior_prob_estimated
    frame = data.frame
    ids = frame.patient_ids[frame.patient_code]
    for raw, weeks in expected.items():
        exported_id = pseudonym(KEY, pseudonym(KEY, raw))  # the importer pseudonymises the stored pseudonym
        rows = np.flatnonzero(ids == exported_id)
        assert frame.t[rows].tolist() == [t for t, _, _ in weeks]
        assert frame.action[rows].tolist() == [a for _, a, _ in weeks]
        phq9 = np.array([v for _, _, v in weeks])
        np.testing.assert_allclose(frame.reward[rows], np.append(phq9[:-1] - phq9[1:], 0.0))
        np.testing.assert_allclose(frame.obs[rows, FEATURE_INDEX["phq9"]], phq9)
        assert frame.truncated[rows].tolist() == [False, False, False, True]
        assert not frame.terminated[rows].any()
    assert frame.behavior_prob is not None
    assert np.all((frame.behavior_prob > 0) & (frame.behavior_prob <= 1))
    for raw in expected:
        assert raw.encode() not in out.read_bytes()


def test_export_splits_the_episode_at_a_blocked_choice(db, clock, tmp_path):
    store = AuditStore(db.engine, KEY)
    history = patient_weeks(21, 4)
    blocked_week = 2
    obs = np.array([[history[blocked_week][0][n] for n in FEATURE_NAMES]], dtype=np.float32)
    blocked_action = int(np.flatnonzero(~action_mask(obs)[0])[0])
    for week, (features, action) in enumerate(history):
        clock.now = START + timedelta(weeks=week)
        chosen = blocked_action if week == blocked_week else action
        audit_id = record(store, "MRN-7", features)
        store.record_feedback(audit_id=audit_id, token_name="ehr", suggestion_id="s", action="continue",
                              outcome="overridden", chosen_action=ACTION_NAMES[chosen])
    result = store.export_logged(tmp_path / "out.parquet", warn=lambda m: None, report=lambda m: None)
    assert (result.rows, result.episodes, result.blocked) == (3, 2, 1)
    frame = load_dataset(tmp_path / "out.parquet").frame
    assert frame.t.tolist() == [0, 1, 3]
    assert frame.truncated.tolist() == [False, True, True]
    phq9 = [h[0]["phq9"] for h in history]
    np.testing.assert_allclose(frame.reward, [phq9[0] - phq9[1], phq9[1] - phq9[2], 0.0])


def test_export_with_nothing_to_export_writes_nothing(db, clock, tmp_path):
    store = AuditStore(db.engine, KEY)
    out = tmp_path / "logged.parquet"
    with pytest.raises(ValueError, match="holds no recommendation"):
        store.export_logged(out)
    record(store, "MRN-1", patient_weeks(6, 1)[0][0])  # no feedback
    with pytest.raises(ValueError, match="1 without clinician feedback"):
        store.export_logged(out)
    assert not out.exists() and not list(tmp_path.glob(".*tmp"))


def test_audit_cli_summary_and_export(db, clock, tmp_path, capsys, monkeypatch):
    url, key_file = db.url, db.database.key_file
    monkeypatch.delenv("CAREPATH_PSEUDONYM_KEY", raising=False)
    store = AuditStore(db.engine, pseudonym_key(url, key_file))
    expected = fill_store(store, clock)
    assert main(["audit", "summary", "--db", url]) == 0
    out = capsys.readouterr().out
    # 12 exported weeks + 1 superseded + 1 without feedback + 1 without patient; two answers per week + 2
    assert "recommendations: 15 (1 without feedback)" in out
    assert "channel rest: 15" in out and "policy cql 1.2.0: 15" in out
    assert "feedback: 26" in out and "accepted: 22" in out and "overridden: 4" in out

    key_folder = tmp_path / "keys"
    key_folder.mkdir()
    (key_folder / "export.key").write_text("x" * 40)
    target = tmp_path / "shared" / "logged.parquet"
    assert main(["audit", "export", "--out", str(target), "--db", url,
                 "--key-file", str(key_folder / "export.key")]) == 0
    out = capsys.readouterr().out
    assert "wrote 12 patient-weeks of 3 patients" in out and "1 without feedback" in out
    ids = set(load_dataset(target).patient_ids())
    alias = pseudonym(pseudonym_key(url, key_file), "MRN-100")
    assert pseudonym(b"x" * 40, alias) in ids and len(ids) == len(expected)

    (target.parent / "beside.key").write_text("y" * 40)
    assert main(["audit", "export", "--out", str(target), "--db", url,
                 "--key-file", str(target.parent / "beside.key")]) == 2
    assert "keep the pseudonymisation key apart" in capsys.readouterr().err
    assert main(["audit", "summary", "--db", f"sqlite:///{tmp_path}/typo.sqlite"]) == 2
    assert "no audit database" in capsys.readouterr().err


def test_a_recorded_row_survives_sigkill(db):
    """The store commits before returning: a server killed right after keeps the row."""
    url = db.url
    features = patient_weeks(8, 1)[0][0]
    child = (
        "import os, signal, sys\n"
        "from serving.audit import AuditStore\n"
        "from serving.db import make_engine\n"
        f"store = AuditStore(make_engine({url!r}), {KEY!r})\n"
        "audit_id = store.record_recommendation(token_name='ehr', channel='rest', patient_id='MRN-1',"
        f" policy_name='cql', policy_version='1', features={features!r}, request={{}}, response={{}})\n"
        "print(audit_id, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert done.returncode == -9, done.stderr
    audit_id = done.stdout.strip()
    got = AuditStore(db.engine, KEY).get(audit_id)
    assert got is not None and got.features == features


def test_serve_refuses_to_start_with_a_key_that_does_not_match_the_store(prepared_bundle, tmp_path):
    from offline_data.pseudonymise import key_fingerprint
    from serving.app import ServeSettings, create_app

    db_url = f"sqlite:///{tmp_path / 'audit.sqlite'}"
    first, second = tmp_path / "first.key", tmp_path / "second.key"
    first.write_bytes(b"k" * 32)
    second.write_bytes(b"z" * 32)
    create_app(ServeSettings(policies=[prepared_bundle], db_url=db_url, key_file=str(first), allow_uncertified=True))
    with pytest.raises(ValueError, match="another key") as refused:
        create_app(ServeSettings(policies=[prepared_bundle], db_url=db_url, key_file=str(second),
                                 allow_uncertified=True))
    assert key_fingerprint(b"k" * 32) in str(refused.value) and key_fingerprint(b"z" * 32) in str(refused.value)


def test_an_unreachable_audit_store_answers_503_with_no_recommendation_and_recovers(served_on, monkeypatch):
    from sqlalchemy.exc import OperationalError

    served = served_on
    state = served.client.app.state.carepath  # type: ignore[attr-defined]
    before = state.audit.count_recommendations()

    def down(**_: object) -> str:
        raise OperationalError("INSERT INTO recommendations", {}, ConnectionRefusedError("connection refused"))

    with monkeypatch.context() as patch:
        patch.setattr(state.audit, "record_recommendation", down)
        r = served.client.post("/v1/recommendations", json={"features": PATIENT}, headers=served.headers)
        assert r.status_code == 503 and r.headers["Retry-After"] == "5"
        assert "audit store is unavailable" in r.json()["detail"] and "suggestions" not in r.json()
    # the store is back: answers (and audit rows) resume without a restart
    r = served.client.post("/v1/recommendations", json={"features": PATIENT}, headers=served.headers)
    assert r.status_code == 200 and state.audit.count_recommendations() == before + 1


class Forwarder:
    """A TCP forwarder from 127.0.0.1:``port`` to ``target``: the app's way to PostgreSQL.

    :meth:`stop` closes the listener and every live connection (to the app, the server is gone:
    its connections drop and new ones are refused); :meth:`start` listens again on the same port.
    """

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = 0  # chosen by the first start
        self.accepted = 0  # connections accepted so far
        self._listener: socket.socket | None = None
        self._live: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        assert self._listener is None, "started already"
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # the port again despite TIME_WAIT
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._spawn(self._accept, listener)

    def stop(self) -> None:
        listener, self._listener = self._listener, None
        if listener is None:
            return
        with self._lock:
            live, self._live = self._live, set()
        for sock in (listener, *live):
            try:  # wakes the thread blocked on it, which then closes it
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in self._threads:
            thread.join(timeout=10)
        assert not any(t.is_alive() for t in self._threads), "a forwarder thread did not stop"
        self._threads = []

    def _spawn(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self, listener: socket.socket) -> None:
        with listener:
            while True:
                try:
                    client, _ = listener.accept()
                except OSError:  # shut down by stop()
                    return
                try:
                    upstream = socket.create_connection(self.target, timeout=10)
                except OSError:
                    client.close()
                    continue
                upstream.settimeout(None)
                with self._lock:
                    if self._listener is not listener:  # stopped meanwhile
                        client.close()
                        upstream.close()
                        return
                    self._live.update((client, upstream))
                    self.accepted += 1
                self._spawn(self._pump, client, upstream)

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        import selectors

        with a, b, selectors.DefaultSelector() as selector:
            selector.register(a, selectors.EVENT_READ, b)
            selector.register(b, selectors.EVENT_READ, a)
            while True:
                for key, _ in selector.select():
                    source, sink = key.fileobj, key.data
                    try:
                        data = source.recv(65536)  # type: ignore[union-attr]
                        if not data:
                            return
                        sink.sendall(data)
                    except OSError:
                        return


@pytest.fixture
def via_forwarder(postgres_db: AuditDatabase) -> Iterator[tuple[Forwarder, str]]:
    """A forwarder to the test database's server, and the database's URL through it."""
    from sqlalchemy import make_url

    url = make_url(postgres_db.url)
    forwarder = Forwarder((url.host or "127.0.0.1", url.port or 5432))
    forwarder.start()
    try:
        yield forwarder, url.set(host="127.0.0.1", port=forwarder.port).render_as_string(hide_password=False)
    finally:
        forwarder.stop()


def test_a_real_postgresql_outage_answers_503_without_a_recommendation_and_recovers_by_itself(
        prepared_bundle, postgres_db, via_forwarder, caplog):
    """PostgreSQL really gone (every connection dropped, new ones refused), then back: no 500, no
    traceback, no answer without its audit row, and no restart needed."""
    from serving.auth import TokenStore

    forwarder, url = via_forwarder
    engine = make_engine(postgres_db.url)  # straight to the server, to count rows behind the app's back
    direct = AuditStore(engine, postgres_db.key)
    answered: list[str] = []
    with serve(prepared_bundle, url, postgres_db.key_file) as served:
        uncached = {"Authorization": f"Bearer {TokenStore(engine).create('second-clinic')}"}

        def recommend(headers: dict[str, str]):
            return served.client.post("/v1/recommendations", json={"patient_id": "MRN-77", "features": PATIENT},
                                      headers=headers)

        r = recommend(served.headers)
        assert r.status_code == 200, r.text
        answered.append(r.json()["audit_id"])
        assert forwarder.accepted > 0  # the app reaches PostgreSQL through the forwarder, not around it

        # a blip between requests: the pooled connections are dead when the next request comes
        forwarder.stop()
        forwarder.start()
        r = recommend(served.headers)
        assert r.status_code == 200, r.text
        answered.append(r.json()["audit_id"])

        forwarder.stop()
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            # a token verified a moment ago (cached: the audit write fails) and one never seen (the
            # token lookup fails): both 503, nothing of the recommendation in the answer
            for headers in (served.headers, uncached, served.headers):
                r = recommend(headers)
                assert r.status_code == 503, r.text
                assert r.headers["Retry-After"] == "5"
                assert list(r.json()) == ["detail"] and "audit store is unavailable" in r.json()["detail"]
        assert direct.count_recommendations() == 2
        assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR or rec.exc_info], caplog.text
        assert sum("audit store unavailable" in rec.getMessage() for rec in caplog.records) == 3

        forwarder.start()  # PostgreSQL is back: the very next requests are answered
        for headers in (served.headers, uncached, served.headers):
            r = recommend(headers)
            assert r.status_code == 200, r.text
            answered.append(r.json()["audit_id"])
    try:
        assert direct.count_recommendations() == len(answered) == 5
        for audit_id in answered:  # each answer has its row
            got = direct.get(audit_id)
            assert got is not None and got.patient_pseudonym == pseudonym(postgres_db.key, "MRN-77")
    finally:
        engine.dispose()
