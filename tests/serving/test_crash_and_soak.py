"""``carepath serve`` as a process under load: a short soak, then SIGKILL mid-load and a restart.

One server is started per audit store backend (a fresh SQLite store, WAL with
durable commits; then a fresh PostgreSQL database, see tests/serving/conftest.py
for the server it needs): the soak runs on it, then the crash test kills it and
restarts it on the same store. The harness is benchmarks/serve_soak.py (5 minutes
there, 30 s here on each backend).
A killed training run resuming from its checkpoint is tests/test_train.py's.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.serve_latency import NO_RATE_LIMIT
from benchmarks.serve_soak import GROWTH_TARGET_PCT, ServeProcess, crash_and_restart, format_crash, format_soak, soak
from tests.serving.conftest import BACKENDS, AuditDatabase, audit_database

pytestmark = pytest.mark.slow

SOAK_SECONDS = 30.0
CLIENTS = 8


@pytest.fixture(scope="module", params=BACKENDS)
def server(request: pytest.FixtureRequest, prepared_bundle: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServeProcess, str, AuditDatabase]]:
    from serving.auth import TokenStore
    from serving.db import make_engine

    folder = tmp_path_factory.mktemp("serve_process")
    with audit_database(request.param, folder) as database:
        engine = make_engine(database.url)
        token = TokenStore(engine).create("soak-clinic")
        engine.dispose()
        key = [] if database.key_file is None else ["--key-file", str(database.key_file)]
        process = ServeProcess(prepared_bundle, database.url, log=folder / "serve.log",
                               extra_args=[*NO_RATE_LIMIT, *key])
        startup = process.start(timeout=240)  # loading and warming the explainer: 10-15 s, more on a busy machine
        print(f"\ncarepath serve on {database.backend} answered /healthz {startup:.1f} s after its start")
        try:
            yield process, token, database
        finally:
            process.stop()


def test_soak_has_no_errors_flat_memory_and_an_audit_row_per_answer(server):
    process, token, _ = server
    figures = soak(process, token, seconds=SOAK_SECONDS, clients=CLIENTS, warmup_s=3, window_s=5,
                   growth_span_s=SOAK_SECONDS / 3)
    print("\n" + format_soak(figures))
    assert figures["errors"] == 0, figures["first_errors"]
    assert figures["answered"] > 0 and all(w["requests"] > 0 for w in figures["windows"]), figures["windows"]
    assert figures["memory_samples"] >= SOAK_SECONDS * 0.8
    assert figures["memory_growth_pct"] < GROWTH_TARGET_PCT, figures
    assert figures["audit_rows"] == figures["answered"]
    assert figures["server_tracebacks"] == 0, process.log_tail()


def test_sigkill_mid_load_loses_no_answered_audit_row_and_restarts(server):
    process, token, database = server
    figures = crash_and_restart(process, token, kill_after=2.5, after_s=2.0, clients=6, key_file=database.key_file)
    print("\n" + format_crash(figures))
    assert figures["answered_before_kill"] > 0, figures
    assert figures["errors_before_kill"] == 0, figures["first_errors"]
    # every request answered 200 before the kill has its row, in a sound store (SQLite: the file passes
    # its integrity check; PostgreSQL: every session of the dead server has ended)
    assert figures["missing_after_kill"] == 0
    assert figures["integrity_check"] == "ok"
    # nothing else but requests cut off in flight (committed, never answered): at most one per client
    assert figures["committed_in_flight"] <= figures["unanswered_at_kill"] <= 6
    assert figures["audit_rows_after_kill"] == figures["answered_before_kill"] + figures["committed_in_flight"]
    # the restarted server answers on the same store, and its rows add up
    assert figures["answered_after_restart"] > 0 and figures["errors_after_restart"] == 0
    assert figures["missing_after_restart"] == 0
    assert figures["audit_rows"] == figures["answered"] + figures["committed_in_flight"]
    assert figures["audit_rows_match"]
