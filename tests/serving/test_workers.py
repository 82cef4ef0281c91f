"""``carepath serve --workers N``: several processes, one audit store, one rate limit, no orphans."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from benchmarks.serve_latency import ServeProcess, worker_pids
from serving.app import ServeSettings
from serving.workers import check_workers, default_workers, per_worker, settings_from_env, settings_to_env
from tests.serving.conftest import PATIENT


def test_worker_count_is_checked_and_the_rate_limit_shared_out(prepared_bundle: Path):
    with pytest.raises(ValueError, match="between 1 and"):
        check_workers(0)
    with pytest.raises(ValueError, match="per core"):
        check_workers(1000)
    assert check_workers(default_workers()) == default_workers() >= 1
    settings = ServeSettings(policies=[prepared_bundle], rate_limit=20.0, rate_burst=5)
    two = per_worker(settings, 2)
    assert two.rate_limit == 10.0 and two.rate_burst == 3 and two.workers == 2  # ceil(5 / 2): never below 1
    assert per_worker(settings, 1) == settings
    off = ServeSettings(policies=[prepared_bundle], rate_limit=0.0)
    assert per_worker(off, 4).rate_limit == 0.0 and per_worker(off, 4).workers == 4
    again = settings_from_env(settings_to_env(two))
    assert again.rate_limit == 10.0 and again.workers == 2 and again.cors_origins == ()
    assert again.policies == [str(prepared_bundle.resolve())]
    # a refused client is told the limit it is held to, and that it is shared among the processes
    from fastapi.testclient import TestClient

    from serving.app import create_app
    from serving.auth import TokenStore
    from serving.db import make_engine

    db_url = f"sqlite:///{prepared_bundle.parent / 'shared-limit.sqlite'}"
    token = TokenStore(make_engine(db_url)).create("limited")
    limited = per_worker(ServeSettings(policies=[prepared_bundle], db_url=db_url, allow_uncertified=True,
                                       rate_limit=1.0, rate_burst=2), 2)
    with TestClient(create_app(limited)) as client:
        codes = [client.get("/v1/policies", headers={"Authorization": f"Bearer {token}"}) for _ in range(3)]
    assert [r.status_code for r in codes] == [200, 429, 429]
    assert "0.5 requests a second (about 1 across 2 server processes)" in codes[1].json()["detail"]


def test_preflight_refuses_what_would_stop_every_worker(prepared_bundle: Path, tmp_path: Path):
    import torch

    from envs.spec import N_ACTIONS, N_FEATURES
    from policies.bundle import ActionSelection, BundleManifest, save_bundle
    from policies.networks import NetworkSpec, PolicyNetwork
    from serving.recommender import NotPrepared
    from serving.workers import preflight

    db_url = f"sqlite:///{tmp_path / 'a.sqlite'}"
    with pytest.raises(ValueError, match="two policies are named"):
        preflight(ServeSettings(policies=[prepared_bundle, prepared_bundle], db_url=db_url, allow_uncertified=True))
    torch.manual_seed(0)
    net = PolicyNetwork(NetworkSpec(N_FEATURES, N_ACTIONS, hidden=(8,), output="q_values"))  # type: ignore[arg-type]
    raw = save_bundle(tmp_path / "raw", net, BundleManifest(algorithm="cql", name="raw", network=net.spec,
                                                           selection=ActionSelection("greedy")))
    with pytest.raises(NotPrepared, match="not prepared for serving"):
        preflight(ServeSettings(policies=[raw], db_url=db_url, allow_uncertified=True))
    with pytest.raises(ValueError, match="not certified"):
        preflight(ServeSettings(policies=[prepared_bundle], db_url=db_url))
    preflight(ServeSettings(policies=[prepared_bundle], db_url=db_url, allow_uncertified=True))


def test_a_background_explainer_that_fails_says_so():
    import numpy as np

    from envs.spec import N_FEATURES
    from serving.explain import BackgroundExplainer

    def broken(rows: np.ndarray) -> np.ndarray:
        raise FloatingPointError("the network is broken")

    explainer = BackgroundExplainer(broken, np.zeros((4, N_FEATURES)))
    assert explainer.wait(60) and explainer.failed and not explainer.ready
    with pytest.raises(RuntimeError, match="could not be built: the network is broken"):
        explainer.explain(np.zeros(N_FEATURES))


def test_serve_refuses_a_bad_worker_count_before_loading_anything(prepared_bundle: Path, tmp_path: Path, capsys):
    from carepath.cli import main

    code = main(["serve", "--policy", str(prepared_bundle), "--db", f"sqlite:///{tmp_path / 'a.sqlite'}",
                 "--allow-uncertified", "--workers", "0"])
    assert code == 2 and "--workers must be between 1 and" in capsys.readouterr().err
    assert not (tmp_path / "a.sqlite").exists()  # nothing opened, nothing written


@pytest.mark.slow
def test_two_workers_answer_with_one_audit_row_each_and_die_with_their_parent(prepared_bundle: Path, tmp_path: Path):
    from serving.audit import audit_summary
    from serving.auth import TokenStore
    from serving.db import make_engine

    db_url = f"sqlite:///{tmp_path / 'audit.sqlite'}"
    token = TokenStore(make_engine(db_url)).create("workers")
    headers = {"Authorization": f"Bearer {token}"}
    with ServeProcess(prepared_bundle, db_url, log=tmp_path / "serve.log", workers=2) as server:
        server.start(timeout=240)
        workers = worker_pids(server.pid)
        assert len(workers) == 2 and server.pid not in workers

        def ask(i: int) -> httpx.Response:
            # a new connection per request, so the kernel spreads them over both workers
            body = {"patient_id": f"p-{i % 3}", "features": PATIENT, "top_k": 3, "explain": True}
            return httpx.post(f"{server.url}/v1/recommendations", json=body, headers=headers, timeout=60)

        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(ask, range(40)))
        assert [r.status_code for r in answers] == [200] * 40, answers[0].text
        # the same request gets the same ranking and rationale from whichever worker answered it
        # (each suggestion's own id aside: it names that answer's suggestion in the audit store)
        same = [[{k: v for k, v in s.items() if k != "id"} for s in r.json()["suggestions"]]
                for i, r in enumerate(answers) if i % 3 == 0]
        assert all(a == same[0] for a in same) and same[0]
        assert any(s["rationale"] for s in same[0]), "the SHAP rationale was asked for"
        assert audit_summary(make_engine(db_url)).recommendations == 40
        assert server.proc is not None
        os.kill(server.pid, 9)  # the parent alone: its workers must not live on, answering unaudited
        server.proc.wait()
        for pid in workers:
            deadline_ok = _gone(pid)
            assert deadline_ok, f"worker {pid} outlived its parent"


def _gone(pid: int, timeout: float = 10.0) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split()[2]
        except FileNotFoundError:
            return True
        if state == "Z":  # dead, waiting to be reaped by init
            return True
        time.sleep(0.1)
    return False


def test_explainers_warm_in_the_background_and_an_explained_request_waits_for_them(prepared_bundle: Path,
                                                                                    tmp_path: Path):
    from fastapi.testclient import TestClient

    from serving.app import create_app
    from serving.auth import TokenStore
    from serving.db import make_engine
    from serving.recommender import Recommender

    db_url = f"sqlite:///{tmp_path / 'audit.sqlite'}"
    token = TokenStore(make_engine(db_url)).create("warm")
    app = create_app(ServeSettings(policies=[prepared_bundle], db_url=db_url, allow_uncertified=True,
                                   warm_explainers="background"))
    with TestClient(app) as client:
        assert client.get("/healthz").json()["explainers"] in ("warming", "ready")
        body = {"features": PATIENT, "top_k": 2, "explain": True}
        r = client.post("/v1/recommendations", json=body, headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200 and all(s["rationale"] for s in r.json()["suggestions"])
        assert client.get("/healthz").json()["explainers"] == "ready"
        # the same rationale as an explainer warmed before the app existed
        now = Recommender(prepared_bundle).recommend(PATIENT, top_k=2, explain=True)
        first = r.json()["suggestions"][0]["rationale"]
        assert first["contributions"] == [c.model_dump() for c in now.suggestions[0].rationale.contributions]
    with pytest.raises(ValueError, match="warm_explainers"):
        create_app(ServeSettings(policies=[prepared_bundle], db_url=db_url, allow_uncertified=True,
                                 warm_explainers="later"))
