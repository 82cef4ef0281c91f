"""Serving latency, throughput, start-up time and memory against ``carepath serve`` on loopback.

For each ``--explainers`` choice (default ``deep,permutation``: DeepLIFT through
the network, then shap's permutation explainer) and each ``--workers`` count in
turn (default ``1,2``: one process, then one per core on a 2-core machine, side
by side in one run), starts ``carepath serve``
in its own process group over a prepared policy bundle and a fresh SQLite audit
store, then, with ``--clients`` concurrent
keep-alive clients (threads) and ``--requests`` requests per phase:

- phase ``explain``: ``POST /v1/recommendations`` with the SHAP rationale (top 3
  steps, top 5 contributions each): p50/p95/p99 latency (target p95 <= 50 ms);
- phase ``plain``: the same without SHAP: requests per second (target >= 300);
- phase ``explain_1_client``: one client, a quarter of the requests: the latency of a
  request that does not queue behind seven others;

plus the start-up time from process start to the first healthy answer, which
includes loading and warming the explainer (target <= 10 s), the server's
resident memory after the load per worker process (VmRSS, and its peak VmHWM;
target <= 700 MiB per worker),
and whether the audit store holds exactly one row per answered request.

Patients are drawn from a fixed generator over the API's ranges. Clients and
server share the machine's cores, so the figures include the load generator's
own cost. Prints a table and writes ``benchmarks/results/serve_latency.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import httpx
import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
P95_TARGET_MS = 50.0
THROUGHPUT_TARGET = 300.0
STARTUP_TARGET_S = 10.0
MEMORY_TARGET_MIB = 700.0  # per worker


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: The load is one token at the server's capacity, not a client the per-token limit is meant for.
NO_RATE_LIMIT = ("--rate-limit", "0")


class ServeProcess:
    """``carepath serve`` in its own process group, restartable on the same store and port."""

    def __init__(self, policy: str | Path, db_url: str, *, port: int | None = None, log: Path | None = None,
                 extra_args: Sequence[str] = NO_RATE_LIMIT, log_stdout: bool = False, workers: int = 1) -> None:
        """``log``: where its stderr goes (and its stdout, the access log, with ``log_stdout``)."""
        self.policy = str(policy)
        self.workers = workers
        self.extra_args = list(extra_args)
        self.db_url = db_url
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.log_stdout = log_stdout
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None, "the server is not started"
        return self.proc.pid

    def start(self, timeout: float = 180.0) -> float:
        """Start it and wait until /healthz answers; returns the seconds that took."""
        carepath = Path(sys.executable).with_name("carepath")
        self._close_log()
        self._log_file = self.log.open("ab") if self.log is not None else None
        started = time.perf_counter()
        self.proc = subprocess.Popen(
            # latency and robustness, not certification: the test bundles carry no certificate
            [str(carepath), "serve", "--policy", self.policy, "--port", str(self.port), "--db", self.db_url,
             "--allow-uncertified", "--workers", str(self.workers), *self.extra_args],
            stdout=self._log_file if self.log_stdout and self._log_file else subprocess.DEVNULL,
            stderr=self._log_file or subprocess.DEVNULL, start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"carepath serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"carepath serve did not answer /healthz within {timeout:.0f} s:\n"
                                   f"{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return time.perf_counter() - started
            except httpx.TransportError:
                pass
            time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL the whole process group (no shutdown, no flush: a crash) and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._close_log()

    def stop(self) -> None:
        """A clean shutdown (SIGTERM), SIGKILL if it takes over 30 s."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
        self._close_log()

    def log_tail(self, chars: int = 3000) -> str:
        if self.log is None or not self.log.exists():
            return "(no log kept)"
        return self.log.read_text(errors="replace")[-chars:]

    def log_tracebacks(self) -> int:
        """How many tracebacks the server logged (uvicorn logs an unhandled error with one)."""
        if self.log is None or not self.log.exists():
            return 0
        return self.log.read_text(errors="replace").count("Traceback (most recent call last)")

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def random_patients(n: int, seed: int) -> list[dict[str, float]]:
    """Plausible patients over the API's ranges, some features missing."""
    rng = np.random.default_rng(seed)
    patients = []
    for _ in range(n):
        p: dict[str, float] = {
            "phq9": int(rng.integers(5, 28)), "phq9_item9": int(rng.choice(4, p=[0.7, 0.2, 0.07, 0.03])),
            "gad7": int(rng.integers(0, 22)), "phq9_change_4w": int(rng.integers(-8, 9)),
            "phq9_at_intake": int(rng.integers(10, 28)), "treatment_level": int(rng.integers(1, 5)),
            "weeks_on_step": int(rng.integers(0, 13)), "dose_level": int(rng.integers(0, 4)),
            "weeks_on_dose": int(rng.integers(0, 13)), "on_psychotherapy": int(rng.integers(0, 2)),
            "on_digital": int(rng.integers(0, 3)), "on_augmentation": int(rng.integers(0, 2)),
            "in_specialist_care": int(rng.integers(0, 2)), "digital_access": int(rng.integers(0, 2)),
            "weeks_in_care": int(rng.integers(0, 27)), "age_band": int(rng.integers(0, 4)),
            "sex": int(rng.integers(0, 2)), "adherence": round(float(rng.uniform(0.3, 1.0)), 2),
        }
        for name in rng.choice(list(p), size=int(rng.integers(0, 4)), replace=False):
            del p[str(name)]
        patients.append(p)
    return patients


def rss_mib(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process in MiB, from /proc."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields["VmRSS"], fields["VmHWM"]


def worker_pids(pid: int) -> list[int]:
    """The processes that answer requests: ``pid`` itself with one worker, else its spawned workers
    (not multiprocessing's resource tracker)."""
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children += [int(c) for c in (task / "children").read_text().split()]
    workers = [c for c in children
               if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]
    return workers or [pid]


def load_phase(url: str, token: str, patients: list[dict[str, float]], requests: int, clients: int,
               explain: bool) -> dict[str, Any]:
    """``requests`` POSTs split over ``clients`` threads; latencies of the answered ones."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    counter = iter(range(requests))

    def client() -> None:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as http:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                body = {"patient_id": f"bench-{i % 500}", "features": patients[i % len(patients)], "top_k": 3,
                        "explain": explain}
                start = time.perf_counter()
                r = http.post("/v1/recommendations", json=body)
                elapsed = time.perf_counter() - start
                with lock:
                    if r.status_code == 200:
                        latencies.append(elapsed)
                    else:
                        errors.append(f"{r.status_code}: {r.text[:200]}")

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    return {"requests": requests, "answered": len(latencies), "errors": len(errors), "first_errors": errors[:3],
            "wall_s": round(wall, 2), "requests_per_s": round(len(latencies) / wall, 1),
            "p50_ms": round(float(np.percentile(ms, 50)), 2), "p95_ms": round(float(np.percentile(ms, 95)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2), "max_ms": round(float(ms.max()), 2)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", default="runs/cql/seed0/policy",
                        help="prepared policy bundle (default: the one 'make demo' trains)")
    parser.add_argument("--requests", type=int, default=2000, help="requests per phase")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients")
    parser.add_argument("--warmup", type=int, default=50, help="unmeasured requests before each phase")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", default="1,2", help="worker counts to measure in turn (default 1,2)")
    parser.add_argument("--explainers", default="deep,permutation",
                        help="SHAP explainers to measure in turn at each worker count (default deep,permutation)")
    parser.add_argument("--out", type=Path, default=RESULTS / "serve_latency.json")
    args = parser.parse_args(argv)
    if not (Path(args.policy) / "bundle.json").is_file():
        raise SystemExit(f"{args.policy}: no policy bundle; run 'make demo' first or pass --policy PATH")


    counts = [int(w) for w in args.workers.split(",")]
    explainers = [e.strip() for e in args.explainers.split(",") if e.strip()]
    runs = [measure(args, workers, explainer) for explainer in explainers for workers in counts]
    figures = {"benchmark": "serve_latency", "machine": platform.platform(), "cpus": os.cpu_count(),
               "policy": args.policy, "clients": args.clients, "startup_target_s": STARTUP_TARGET_S,
               "p95_target_ms": P95_TARGET_MS, "throughput_target": THROUGHPUT_TARGET,
               "memory_target_mib_per_worker": MEMORY_TARGET_MIB, "runs": runs}
    print(f"{'explainer':<11} {'workers':>7} {'start s':>7} {'phase':<16} {'req/s':>7} {'p50 ms':>7} {'p95 ms':>7} "
          f"{'p99 ms':>7} {'errors':>6} {'MiB/worker':>10} {'audit':>6}")
    for run in runs:
        for name, p in run["phases"].items():
            print(f"{run['explainer']:<11} {run['workers']:>7} {run['startup_s']:>7.1f} {name:<16} "
                  f"{p['requests_per_s']:>7.1f} {p['p50_ms']:>7.1f} {p['p95_ms']:>7.1f} {p['p99_ms']:>7.1f} "
                  f"{p['errors']:>6} "
                  f"{max(run['rss_mib_after_load']):>10.0f} {'ok' if run['audit_rows_match'] else 'MISMATCH':>6}")
    for explainer in explainers:
        same = [run for run in runs if run["explainer"] == explainer]
        base = same[0]["phases"]
        for run in same[1:]:
            ratios = {name: round(p["requests_per_s"] / base[name]["requests_per_s"], 2)
                      for name, p in run["phases"].items()}
            run["throughput_ratio_vs_first"] = ratios
            print(f"{explainer}: {run['workers']} workers vs {same[0]['workers']}: throughput x{ratios['plain']:.2f} "
                  f"without SHAP, x{ratios['explain']:.2f} with it; p95 with SHAP "
                  f"{run['phases']['explain']['p95_ms']:.0f} vs {base['explain']['p95_ms']:.0f} ms")
    for workers in counts:
        pair = {run["explainer"]: run["phases"]["explain"] for run in runs if run["workers"] == workers}
        if len(explainers) > 1 and all(e in pair for e in explainers[:2]):
            a, b = explainers[:2]
            print(f"{workers} worker(s), with SHAP: {a} {pair[a]['requests_per_s']:.0f} req/s p95 "
                  f"{pair[a]['p95_ms']:.0f} ms vs {b} {pair[b]['requests_per_s']:.0f} req/s p95 "
                  f"{pair[b]['p95_ms']:.0f} ms "
                  f"(x{pair[a]['requests_per_s'] / pair[b]['requests_per_s']:.2f})")
    print(f"targets: p95 with SHAP <= {P95_TARGET_MS:.0f} ms; without SHAP >= {THROUGHPUT_TARGET:.0f} req/s; "
          f"start-up <= {STARTUP_TARGET_S:.0f} s; <= {MEMORY_TARGET_MIB:.0f} MiB per worker")
    from evaluation.cli import write_json_atomic

    write_json_atomic(args.out, figures)
    print(f"wrote {args.out}")


def measure(args: argparse.Namespace, workers: int, explainer: str) -> dict[str, Any]:
    """One server with ``workers`` processes and ``explainer``, its three load phases, memory and audit rows."""
    from serving.audit import audit_summary
    from serving.auth import TokenStore
    from serving.db import make_engine

    with tempfile.TemporaryDirectory(prefix="carepath-serve-bench-") as tmp:
        db_url = f"sqlite:///{Path(tmp) / 'audit.sqlite'}"
        token = TokenStore(make_engine(db_url)).create("bench")
        # the log is a file, not a pipe: nobody reads it during the load, and a full pipe would stall the server
        with ServeProcess(args.policy, db_url, log=Path(tmp) / "server.log", workers=workers,
                          extra_args=(*NO_RATE_LIMIT, "--explainer", explainer)) as server:
            try:
                startup_s = server.start()
            except RuntimeError as err:
                raise SystemExit(str(err)) from None
            url = server.url
            patients = random_patients(1000, args.seed)
            phases = {}
            for name, explain, clients in (("explain", True, args.clients), ("plain", False, args.clients),
                                           ("explain_1_client", True, 1)):
                load_phase(url, token, patients, args.warmup, clients, explain)
                requests = args.requests if clients > 1 else max(1, args.requests // 4)
                phases[name] = load_phase(url, token, patients, requests, clients, explain)
            memory = [rss_mib(pid) for pid in worker_pids(server.pid)]
        audited = audit_summary(make_engine(db_url)).recommendations
    answered = sum(p["answered"] for p in phases.values()) + len(phases) * args.warmup
    return {"explainer": explainer, "workers": workers, "startup_s": round(startup_s, 2), "phases": phases,
            "rss_mib_after_load": [round(m[0], 1) for m in memory], "rss_mib_peak": [round(m[1], 1) for m in memory],
            "answered": answered, "audit_rows": audited, "audit_rows_match": answered == audited}


if __name__ == "__main__":
    main()
