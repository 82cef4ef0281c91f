"""Shared serving fixtures: one small prepared policy bundle per session, an app with a token,
fresh audit databases on SQLite and PostgreSQL.

The PostgreSQL variants (``[postgresql]``) need a server: set ``CAREPATH_TEST_POSTGRES_URL`` to an
admin-capable SQLAlchemy URL, e.g. ``postgresql+psycopg://carepath:PASSWORD@127.0.0.1:5432/postgres``
(a role that may create databases: each test creates its own ``carepath_test_*`` database and drops
it afterwards), and install the driver (``pip install -e '.[postgres]'``). Without them these variants
skip, unless ``CAREPATH_REQUIRE_POSTGRES=1`` (CI sets it, see .ci/run), which makes them fail.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest
import torch
from fastapi.testclient import TestClient

from envs.spec import N_ACTIONS, N_FEATURES
from offline_data.dataset import load_dataset
from offline_data.generate import generate
from policies.bundle import ActionSelection, BundleManifest, save_bundle
from policies.networks import NetworkSpec, PolicyNetwork
from serving.benefit import BenefitConfig
from serving.prepare import PrepareConfig, prepare_bundle

#: A few seconds of preparation: enough to exercise every piece, not to be accurate.
SMALL_PREPARE = PrepareConfig(background_size=8, max_rows=2000,
                              benefit=BenefitConfig(members=3, horizon_weeks=4, updates_per_iteration=15,
                                                    hidden=(16,)))

#: A typical patient as a clinician would enter one (base features by name).
PATIENT = {
    "phq9": 18, "phq9_item9": 1, "gad7": 12, "phq9_change_4w": 4, "phq9_at_intake": 20, "treatment_level": 1,
    "weeks_on_step": 6, "dose_level": 2, "weeks_on_dose": 4, "on_psychotherapy": 0, "on_digital": 0,
    "on_augmentation": 0, "in_specialist_care": 0, "digital_access": 1, "weeks_in_care": 6, "age_band": 1,
    "sex": 0, "adherence": 0.8, "engagement": 0.7,
}


@pytest.fixture(scope="session")
def logged_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("serving_data") / "stard.parquet"
    generate(path, policy="stard", epsilon=0.3, patients=200, seed=0)
    return path


def make_prepared_bundle(folder: Path, data: Path, name: str = "serving-test-policy",
                         output: str = "q_values") -> Path:
    torch.manual_seed(0)
    net = PolicyNetwork(NetworkSpec(N_FEATURES, N_ACTIONS, hidden=(16,), output=output))  # type: ignore[arg-type]
    manifest = BundleManifest(algorithm="cql" if output == "q_values" else "bc", name=name, network=net.spec,
                              selection=ActionSelection("greedy"))
    save_bundle(folder, net, manifest)
    prepare_bundle(folder, load_dataset(data), SMALL_PREPARE, progress=False)
    return folder


@pytest.fixture(scope="session")
def prepared_bundle(tmp_path_factory: pytest.TempPathFactory, logged_path: Path) -> Path:
    return make_prepared_bundle(tmp_path_factory.mktemp("bundles") / "policy", logged_path)


# ----------------------------------------------------------------------------- audit databases

BACKENDS = ("sqlite", "postgresql")
POSTGRES_URL_ENV = "CAREPATH_TEST_POSTGRES_URL"
REQUIRE_POSTGRES_ENV = "CAREPATH_REQUIRE_POSTGRES"
#: The pseudonymisation key of PostgreSQL test stores (SQLite stores keep their own beside the file).
POSTGRES_TEST_KEY = b"postgres-test-pseudonym-key-0123456789"


def _no_postgres(reason: str) -> NoReturn:
    if os.environ.get(REQUIRE_POSTGRES_ENV) == "1":
        pytest.fail(f"{reason}, and {REQUIRE_POSTGRES_ENV}=1 requires the PostgreSQL tests to run")
    pytest.skip(reason)


def postgres_admin_url() -> str:
    """The admin URL of the test server (``CAREPATH_TEST_POSTGRES_URL``); skips or fails without it."""
    url = os.environ.get(POSTGRES_URL_ENV, "").strip()
    if not url:
        _no_postgres(f"no PostgreSQL server for the tests: set {POSTGRES_URL_ENV}="
                     "postgresql+psycopg://USER:PASSWORD@127.0.0.1:5432/postgres (a role that may create databases)")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        _no_postgres("the PostgreSQL driver psycopg is not installed (pip install -e '.[postgres]')")
    return url


def _psycopg_conninfo(url: str) -> str:
    """A SQLAlchemy URL (``postgresql+psycopg://...``) as a libpq URI psycopg connects to."""
    from sqlalchemy import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() != "postgresql":
        pytest.fail(f"{POSTGRES_URL_ENV} must be a postgresql URL (postgresql+psycopg://...), "
                    f"not a {parsed.get_backend_name()} one")
    return parsed.set(drivername="postgresql").render_as_string(hide_password=False)


@dataclass(frozen=True)
class AuditDatabase:
    """A fresh, empty audit database."""

    backend: str  # "sqlite" | "postgresql"
    url: str  # SQLAlchemy URL
    path: Path | None  # the SQLite file; None on PostgreSQL
    key_file: Path | None  # the pseudonymisation key: None on SQLite (kept beside the file), a file on PostgreSQL

    @property
    def key(self) -> bytes:
        from serving.db import pseudonym_key

        return pseudonym_key(self.url, self.key_file, environ={})

    def stored_text(self) -> bytes:
        """Everything the store holds: the SQLite file and its write-ahead log, or every row of
        every table as text on PostgreSQL (what an attacker with the database would see)."""
        if self.path is not None:
            wal = self.path.with_name(self.path.name + "-wal")
            return self.path.read_bytes() + (wal.read_bytes() if wal.exists() else b"")
        import psycopg
        from psycopg import sql

        with psycopg.connect(_psycopg_conninfo(self.url)) as conn:
            tables = conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'").fetchall()
            rows = [row[0] for (table,) in tables for row in conn.execute(
                sql.SQL("SELECT t::text FROM {} AS t").format(sql.Identifier(table)))]
        return "\n".join(rows).encode()


@contextmanager
def audit_database(backend: str, folder: Path) -> Iterator[AuditDatabase]:
    """A fresh audit database on ``backend``: a SQLite file in ``folder``, or a new PostgreSQL
    database ``carepath_test_<random>`` on the test server, dropped afterwards (its connections
    with it)."""
    if backend == "sqlite":
        path = folder / "audit.sqlite"
        yield AuditDatabase(backend, f"sqlite:///{path}", path, None)
        return
    if backend != "postgresql":
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    import psycopg
    from psycopg import sql
    from sqlalchemy import make_url

    admin = postgres_admin_url()
    name = f"carepath_test_{secrets.token_hex(6)}"
    with psycopg.connect(_psycopg_conninfo(admin), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    key_file = folder / "postgres-audit.key"
    key_file.write_bytes(POSTGRES_TEST_KEY)
    try:
        yield AuditDatabase(backend, make_url(admin).set(database=name).render_as_string(hide_password=False),
                            None, key_file)
    finally:
        drop = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        with psycopg.connect(_psycopg_conninfo(admin), autocommit=True) as conn:
            # An autovacuum worker may be in the database for a moment; a role without
            # pg_signal_backend cannot end it (.ci/postgres grants it), so wait it out.
            for attempt in range(20):
                try:
                    conn.execute(drop)
                    break
                except (psycopg.errors.InsufficientPrivilege, psycopg.errors.ObjectInUse):
                    if attempt == 19:
                        raise
                    time.sleep(0.5)


@pytest.fixture(params=BACKENDS)
def audit_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[AuditDatabase]:
    """A fresh audit database, once on SQLite and once on PostgreSQL."""
    with audit_database(request.param, tmp_path) as database:
        yield database


@pytest.fixture()
def postgres_db(tmp_path: Path) -> Iterator[AuditDatabase]:
    """A fresh audit database on the PostgreSQL test server."""
    with audit_database("postgresql", tmp_path) as database:
        yield database


# ----------------------------------------------------------------------------- the app


@dataclass
class Served:
    client: TestClient
    token: str
    db_url: str
    headers: dict[str, str]


@contextmanager
def serve(bundle: Path, db_url: str, key_file: Path | None = None) -> Iterator[Served]:
    """The app over ``bundle`` on the audit store at ``db_url``, with a recommend+feedback token."""
    from serving.app import ServeSettings, create_app
    from serving.auth import TokenStore
    from serving.db import make_engine

    engine = make_engine(db_url)
    token = TokenStore(engine).create("test-clinic")
    engine.dispose()
    app = create_app(ServeSettings(policies=[bundle], db_url=db_url, allow_uncertified=True,
                                   key_file=None if key_file is None else str(key_file)))
    try:
        with TestClient(app) as client:
            yield Served(client, token, db_url, {"Authorization": f"Bearer {token}"})
    finally:
        app.state.carepath.audit.engine.dispose()


@pytest.fixture()
def served(prepared_bundle: Path, tmp_path: Path) -> Iterator[Served]:
    """The app over the prepared bundle with a fresh SQLite audit store and a recommend+feedback token."""
    with serve(prepared_bundle, f"sqlite:///{tmp_path / 'audit.sqlite'}") as app:
        yield app


@pytest.fixture()
def served_on(prepared_bundle: Path, audit_db: AuditDatabase) -> Iterator[Served]:
    """As ``served``, once on SQLite and once on PostgreSQL."""
    with serve(prepared_bundle, audit_db.url, audit_db.key_file) as app:
        yield app
