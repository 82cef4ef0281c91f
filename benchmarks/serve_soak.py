"""Soak and crash durability of ``carepath serve`` on loopback.

Starts ``carepath serve`` (one worker) in its own process over a prepared policy
bundle and a fresh SQLite audit store (WAL, ``synchronous=FULL``), then:

- soak: ``--clients`` keep-alive clients (threads) post ``/v1/recommendations``
  back to back for ``--seconds`` (default 5 minutes), every other request with
  the SHAP rationale, each with its own patient id, after an unmeasured
  ``--warmup``. Per ``--window`` seconds: requests, errors, p50/p95/p99 latency
  and the server's resident memory (VmRSS, sampled every second). Overall:
  errors (any answer but 200, any connection error; target 0), memory growth
  from the first to the last window (target < 10 %), and audit rows against
  answered requests (they must match: a row is committed before its answer).
- ``--kill-after S``: load again, SIGKILL the server S seconds in, check the
  store the dead server left (SQLite: ``PRAGMA integrity_check``, PostgreSQL: its
  sessions all ended; every audit id answered
  200 has its row; the only extra rows are of requests that were in flight, i.e.
  committed but never answered), restart the server on the same store and port,
  load it ``--after`` seconds more and count again: audit rows == answered
  requests (+ those committed in flight) across both runs.

Clients and server share the machine's cores. Prints a table and writes
``benchmarks/results/serve_soak.json``. ``tests/serving/test_crash_and_soak.py``
runs the same harness CI-sized, on SQLite and on PostgreSQL (the functions here take any
store URL; a PostgreSQL store needs its pseudonymisation key, ``key_file``).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import numpy as np

if __package__ in (None, ""):  # run as a script (python benchmarks/serve_soak.py): find the benchmarks package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.serve_latency import ServeProcess, random_patients, rss_mib

RESULTS = Path(__file__).resolve().parent / "results"
GROWTH_TARGET_PCT = 10.0


# ----------------------------------------------------------------------------- the load


@dataclass(frozen=True)
class Outcome:
    """One request: when it ended (time.monotonic), how long it took, what came back."""

    end: float
    latency_s: float
    status: int  # the HTTP status; 0: no answer (connection refused, reset or closed)
    patient_id: str
    explain: bool
    audit_id: str | None = None
    error: str | None = None


@dataclass
class Load:
    """``clients`` keep-alive clients posting recommendations back to back until stopped.

    Every request has its own patient id (``{prefix}-{client}-{n}``); every other
    one asks for the SHAP rationale. With ``stop_on_disconnect`` a client stops at
    its first connection error (the server was killed), otherwise it counts the
    error, waits a moment and goes on.
    """

    url: str
    token: str
    clients: int = 8
    prefix: str = "soak"
    seed: int = 0
    stop_on_disconnect: bool = False
    started: float = 0.0
    _outcomes: list[Outcome] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> float:
        patients = random_patients(500, self.seed)
        self._threads = [threading.Thread(target=self._client, args=(k, patients), daemon=True)
                         for k in range(self.clients)]
        self.started = time.monotonic()
        for t in self._threads:
            t.start()
        return self.started

    def stop(self, timeout: float = 60.0) -> list[Outcome]:
        """Let each client finish the request it is in, then return every outcome."""
        self._stop.set()
        self.join(timeout)
        return self.outcomes

    def join(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        alive = sum(t.is_alive() for t in self._threads)
        if alive:
            raise RuntimeError(f"{alive} load client(s) still running after {timeout:.0f} s")

    def run(self, seconds: float) -> list[Outcome]:
        self.start()
        time.sleep(seconds)
        return self.stop()

    @property
    def outcomes(self) -> list[Outcome]:
        with self._lock:
            return list(self._outcomes)

    def _client(self, k: int, patients: list[dict[str, float]]) -> None:
        headers = {"Authorization": f"Bearer {self.token}"}
        with httpx.Client(base_url=self.url, headers=headers, timeout=30) as http:
            n = 0
            while not self._stop.is_set():
                patient_id = f"{self.prefix}-{k}-{n}"
                explain = (n + k) % 2 == 0
                body = {"patient_id": patient_id, "features": patients[(k * 7919 + n) % len(patients)],
                        "top_k": 3, "explain": explain}
                n += 1
                start = time.monotonic()
                try:
                    r = http.post("/v1/recommendations", json=body)
                    audit_id = r.json()["audit_id"] if r.status_code == 200 else None
                    error = None if r.status_code == 200 else f"{r.status_code}: {r.text[:200]}"
                    status = r.status_code
                except httpx.TransportError as err:
                    status, audit_id, error = 0, None, f"{type(err).__name__}: {err}"
                except Exception as err:  # a 200 without an audit id, say: an error all the same
                    status, audit_id, error = -1, None, f"{type(err).__name__}: {err}"
                end = time.monotonic()
                with self._lock:
                    self._outcomes.append(Outcome(end, end - start, status, patient_id, explain, audit_id, error))
                if status == 0:
                    if self.stop_on_disconnect:
                        return
                    time.sleep(0.1)


class MemorySampler:
    """VmRSS of a process every ``interval`` seconds, as (time.monotonic, MiB)."""

    def __init__(self, pid: int, interval: float = 1.0) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            try:
                self.samples.append((time.monotonic(), rss_mib(self.pid)[0]))
            except (FileNotFoundError, ProcessLookupError):
                return
            if self._stop.wait(self.interval):
                return


# ----------------------------------------------------------------------------- figures


def _ms(latencies: Iterable[float]) -> dict[str, float | None]:
    ms = np.array(list(latencies)) * 1000
    if ms.size == 0:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None}
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    return {"p50_ms": round(float(p50), 2), "p95_ms": round(float(p95), 2), "p99_ms": round(float(p99), 2)}


def window_stats(outcomes: list[Outcome], samples: list[tuple[float, float]], start: float, seconds: float,
                 width: float) -> list[dict[str, Any]]:
    """Requests (by when they ended), errors, latency percentiles and mean VmRSS per window."""
    windows = []
    for w in range(math.ceil(seconds / width - 1e-9)):
        lo, hi = start + w * width, start + min((w + 1) * width, seconds)
        inside = [o for o in outcomes if lo <= o.end < hi]
        rss = [mib for t, mib in samples if lo <= t < hi]
        windows.append({"t_s": round(w * width, 1), "requests": len(inside),
                        "errors": sum(o.status != 200 for o in inside),
                        **_ms(o.latency_s for o in inside if o.status == 200),
                        "rss_mib": round(float(np.mean(rss)), 1) if rss else None})
    return windows


def memory_growth(samples: list[tuple[float, float]], start: float, end: float, span: float) -> dict[str, float]:
    """Mean VmRSS over the first ``span`` seconds of [start, end] against the last ``span``; growth in %."""
    first = [mib for t, mib in samples if start <= t < start + span]
    last = [mib for t, mib in samples if end - span <= t <= end]
    if not first or not last:
        raise ValueError(f"too few memory samples ({len(samples)}) to compare the first and last {span:g} s")
    a, b = float(np.mean(first)), float(np.mean(last))
    return {"rss_mib_first": round(a, 1), "rss_mib_last": round(b, 1),
            "memory_growth_pct": round(100 * (b - a) / a, 2)}


# ----------------------------------------------------------------------------- the audit store


@contextlib.contextmanager
def _engine(db_url: str) -> Iterator[Any]:
    from serving.db import make_engine

    engine = make_engine(db_url, create_tables=False)
    try:
        yield engine
    finally:
        engine.dispose()


def audit_rows(db_url: str) -> int:
    from sqlalchemy import func, select

    from serving.db import RecommendationRecord

    with _engine(db_url) as engine, engine.connect() as c:
        return int(c.scalar(select(func.count()).select_from(RecommendationRecord)) or 0)


def audited_ids(db_url: str, ids: Iterable[str]) -> set[str]:
    """Which of ``ids`` have a row in the store."""
    from sqlalchemy import select

    from serving.db import RecommendationRecord

    ids = list(ids)
    found: set[str] = set()
    with _engine(db_url) as engine, engine.connect() as c:
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            found.update(c.scalars(select(RecommendationRecord.audit_id)
                                   .where(RecommendationRecord.audit_id.in_(chunk))))
    return found


def rows_of_patients(db_url: str, patient_ids: Iterable[str], key_file: str | Path | None = None) -> int:
    """How many rows belong to these patients (found by their pseudonyms under the store's key:
    ``key_file``, else as the server finds it, see serving.db.pseudonym_key)."""
    from sqlalchemy import func, select

    from serving.db import RecommendationRecord, pseudonym_key, pseudonymise

    key = pseudonym_key(db_url, key_file)
    pseudonyms = [pseudonymise(p, key) for p in patient_ids]
    if not pseudonyms:
        return 0
    with _engine(db_url) as engine, engine.connect() as c:
        return int(c.scalar(select(func.count()).select_from(RecommendationRecord)
                            .where(RecommendationRecord.patient_pseudonym.in_(pseudonyms))) or 0)


def integrity_check(db_url: str, timeout: float = 15.0) -> str:
    """The state the killed server left its store in: "ok" when sound.

    SQLite: ``PRAGMA integrity_check`` of the file the dead process wrote.
    PostgreSQL (any server database): the killed server was a client, the
    database server alone writes its files; what can be left behind are the dead
    client's sessions, with a transaction in them. "ok" once every other session
    on the store's database has ended (each of its transactions committed or
    rolled back by the server), which is waited for up to ``timeout`` seconds:
    the counts that follow then see the final state. The store's database must
    be the server's alone (as in the benchmark and the tests).
    """
    from sqlalchemy import make_url, text

    with _engine(db_url) as engine, engine.connect() as c:
        if make_url(db_url).get_backend_name() == "sqlite":
            return "; ".join(str(row[0]) for row in c.execute(text("PRAGMA integrity_check")))
        others = text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                      "AND pid <> pg_backend_pid()")
        deadline = time.monotonic() + timeout
        while True:
            left = int(c.scalar(others) or 0)
            c.rollback()  # pg_stat_activity is read once per transaction: a new one for each look
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        return "ok" if not left else f"{left} session(s) of the killed server still open after {timeout:g} s"


# ----------------------------------------------------------------------------- the runs


def soak(server: ServeProcess, token: str, *, seconds: float, clients: int = 8, warmup_s: float = 15.0,
         window_s: float = 15.0, growth_span_s: float | None = None, seed: int = 0) -> dict[str, Any]:
    """Warm up, then load ``server`` for ``seconds``; figures per window and overall.

    Memory growth compares the mean VmRSS of the first ``growth_span_s`` seconds
    after the warm-up with that of the last (default: the first and last window).
    """
    rows_before = audit_rows(server.db_url)
    warm = Load(server.url, token, clients=clients, prefix="warmup", seed=seed).run(warmup_s) if warmup_s else []
    load = Load(server.url, token, clients=clients, prefix="soak", seed=seed + 1)
    with MemorySampler(server.pid) as memory:
        start = load.start()
        time.sleep(seconds)
        outcomes = load.stop()
    end = start + seconds
    answered = sum(o.status == 200 for o in warm + outcomes)
    errors = [o for o in warm + outcomes if o.status != 200]
    rows = audit_rows(server.db_url) - rows_before
    ok = [o.latency_s for o in outcomes if o.status == 200]
    return {
        "seconds": seconds, "clients": clients, "warmup_s": warmup_s, "window_s": window_s,
        "warmup_requests": len(warm), "requests": len(outcomes),  # answered and errors count both
        "answered": answered, "errors": len(errors),
        "first_errors": [o.error for o in errors[:3]],
        "requests_per_s": round(sum(o.status == 200 for o in outcomes) / seconds, 1), **_ms(ok),
        **memory_growth(memory.samples, start, end, growth_span_s or window_s),
        "memory_samples": len(memory.samples), "rss_mib_peak": round(rss_mib(server.pid)[1], 1),
        "audit_rows": rows, "audit_rows_match": rows == answered,
        "server_tracebacks": server.log_tracebacks(),
        "windows": window_stats(outcomes, memory.samples, start, seconds, window_s),
    }


def crash_and_restart(server: ServeProcess, token: str, *, kill_after: float, after_s: float = 3.0,
                      clients: int = 8, seed: int = 0, key_file: str | Path | None = None) -> dict[str, Any]:
    """Load ``server``, SIGKILL it ``kill_after`` seconds in, check the store, restart, load, count again.

    ``key_file``: the store's pseudonymisation key, when the server is given one (always on PostgreSQL).
    """
    rows_before = audit_rows(server.db_url)
    load = Load(server.url, token, clients=clients, prefix="crash", seed=seed, stop_on_disconnect=True)
    load.start()
    time.sleep(kill_after)
    server.kill()
    killed_at = time.monotonic() - load.started
    load.join()
    outcomes = load.outcomes
    answered = [o for o in outcomes if o.status == 200]
    unanswered = [o for o in outcomes if o.status == 0]  # in flight (or refused) when the server died
    refused = [o for o in outcomes if o.status not in (0, 200)]  # errors before the kill
    answered_ids = [o.audit_id for o in answered if o.audit_id]
    missing = len(set(answered_ids) - audited_ids(server.db_url, answered_ids))
    integrity = integrity_check(server.db_url)
    rows_after_kill = audit_rows(server.db_url)
    committed_in_flight = rows_of_patients(server.db_url, [o.patient_id for o in unanswered], key_file)

    restart_s = server.start()
    after = Load(server.url, token, clients=clients, prefix="restart", seed=seed + 1).run(after_s)
    after_answered = [o for o in after if o.status == 200]
    after_ids = [o.audit_id for o in after_answered if o.audit_id]
    rows_final = audit_rows(server.db_url)
    total_answered = len(answered) + len(after_answered)
    return {
        "kill_after_s": kill_after, "killed_at_s": round(killed_at, 2), "clients": clients,
        "answered_before_kill": len(answered), "unanswered_at_kill": len(unanswered),
        "errors_before_kill": len(refused), "first_errors": [o.error for o in refused[:3]],
        "missing_after_kill": missing, "integrity_check": integrity,
        "audit_rows_after_kill": rows_after_kill - rows_before,
        "committed_in_flight": committed_in_flight,
        "restart_s": round(restart_s, 2), "answered_after_restart": len(after_answered),
        "errors_after_restart": sum(o.status != 200 for o in after),
        "missing_after_restart": len(set(after_ids) - audited_ids(server.db_url, after_ids)),
        "answered": total_answered, "audit_rows": rows_final - rows_before,
        # a row is committed before its answer leaves, so the store may hold the rows of
        # requests in flight at the kill (committed, never answered), and nothing else
        "audit_rows_match": rows_final - rows_before == total_answered + committed_in_flight
        and rows_after_kill - rows_before == len(answered) + committed_in_flight,
    }


def format_soak(figures: dict[str, Any]) -> str:
    lines = [f"{'t s':>6} {'requests':>8} {'errors':>6} {'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7} {'RSS MiB':>8}"]
    for w in figures["windows"]:
        cells = [f"{w[k]:>7.1f}" if w[k] is not None else f"{'-':>7}" for k in ("p50_ms", "p95_ms", "p99_ms")]
        rss = f"{w['rss_mib']:>8.1f}" if w["rss_mib"] is not None else f"{'-':>8}"
        lines.append(f"{w['t_s']:>6.0f} {w['requests']:>8} {w['errors']:>6} {' '.join(cells)} {rss}")
    f = figures
    lines += [
        f"soak {f['seconds']:g} s, {f['clients']} clients: {f['requests']} requests "
        f"(+{f['warmup_requests']} in {f['warmup_s']:g} s warm-up), {f['errors']} errors, "
        f"{f['requests_per_s']:.1f} req/s, "
        f"p50 {f['p50_ms']} ms, p95 {f['p95_ms']} ms, p99 {f['p99_ms']} ms",
        f"memory: {f['rss_mib_first']:.1f} -> {f['rss_mib_last']:.1f} MiB resident ({f['memory_growth_pct']:+.2f} %, "
        f"target < {GROWTH_TARGET_PCT:.0f} %), peak {f['rss_mib_peak']:.1f} MiB",
        f"audit rows {f['audit_rows']} for {f['answered']} answered requests "
        f"({'match' if f['audit_rows_match'] else 'MISMATCH'}); server tracebacks: {f['server_tracebacks']}",
    ]
    return "\n".join(lines)


def format_crash(c: dict[str, Any]) -> str:
    return "\n".join([
        f"SIGKILL at {c['killed_at_s']:.1f} s under {c['clients']} clients: {c['answered_before_kill']} answered, "
        f"{c['unanswered_at_kill']} cut off; store after the kill: {c['audit_rows_after_kill']} rows, "
        f"{c['missing_after_kill']} answered ids missing, {c['committed_in_flight']} committed in flight, "
        f"integrity {c['integrity_check']}",
        f"restarted in {c['restart_s']:.1f} s: {c['answered_after_restart']} more answered, "
        f"{c['errors_after_restart']} errors; across both runs {c['audit_rows']} audit rows for {c['answered']} "
        f"answered + {c['committed_in_flight']} in flight ({'match' if c['audit_rows_match'] else 'MISMATCH'})",
    ])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", default="runs/cql/seed0/policy",
                        help="prepared policy bundle (default: the one 'make demo' trains)")
    parser.add_argument("--seconds", type=float, default=300.0, help="soak length after the warm-up (0: no soak)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients")
    parser.add_argument("--window", type=float, default=15.0, help="seconds per reported window")
    parser.add_argument("--warmup", type=float, default=15.0, help="unmeasured seconds of load before the soak")
    parser.add_argument("--kill-after", type=float, default=None, metavar="SECONDS",
                        help="then load again, SIGKILL the server this many seconds in, restart it and count "
                             "answered requests against audit rows")
    parser.add_argument("--after", type=float, default=5.0, help="seconds of load after the restart")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "serve_soak.json")
    args = parser.parse_args(argv)
    if not (Path(args.policy) / "bundle.json").is_file():
        raise SystemExit(f"{args.policy}: no policy bundle; run 'make demo' first or pass --policy PATH")
    if args.seconds <= 0 and args.kill_after is None:
        raise SystemExit("nothing to do: give --seconds > 0 and/or --kill-after SECONDS")

    from evaluation.cli import write_json_atomic
    from serving.auth import TokenStore
    from serving.db import make_engine

    figures: dict[str, Any] = {"benchmark": "serve_soak", "machine": platform.platform(), "cpus": os.cpu_count(),
                               "policy": args.policy, "clients": args.clients, "workers": 1,
                               "memory_growth_target_pct": GROWTH_TARGET_PCT}
    with tempfile.TemporaryDirectory(prefix="carepath-serve-soak-") as tmp:
        db_url = f"sqlite:///{Path(tmp) / 'audit.sqlite'}"
        engine = make_engine(db_url)
        token = TokenStore(engine).create("soak")
        engine.dispose()
        with ServeProcess(args.policy, db_url, log=Path(tmp) / "serve.log") as server:
            figures["startup_s"] = round(server.start(), 2)
            print(f"start-up incl. warm-up: {figures['startup_s']:.1f} s", flush=True)
            if args.seconds > 0:
                figures["soak"] = soak(server, token, seconds=args.seconds, clients=args.clients,
                                       warmup_s=args.warmup, window_s=args.window, seed=args.seed)
                print(format_soak(figures["soak"]), flush=True)
            if args.kill_after is not None:
                figures["crash"] = crash_and_restart(server, token, kill_after=args.kill_after, after_s=args.after,
                                                     clients=args.clients, seed=args.seed + 100)
                print(format_crash(figures["crash"]), flush=True)
    write_json_atomic(args.out, figures)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
