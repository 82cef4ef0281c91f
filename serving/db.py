"""The audit database: engine, tables and the pseudonymisation key.

SQLite is the default (one file beside the server, nothing to install); any
SQLAlchemy URL works, e.g. PostgreSQL with ``postgresql+psycopg://user@host/db``
(install the driver: ``pip install -e '.[postgres]'``; give the password in
``~/.pgpass`` or the URL). The tables are created on open (:func:`make_engine`),
so a fresh file is ready. A database server that goes away is survived: pooled
connections are pinged before use, so the server answers 503 while it is gone
and carries on by itself once it is back (tests/serving/test_audit.py runs
such an outage against a real PostgreSQL).

SQLite runs in WAL journal mode with ``synchronous=FULL``: a row is on disk
when its transaction commits, so a SIGKILL (or power loss) of the server
loses no committed audit row, and readers (``carepath audit summary``) never
block the writing server.

Raw patient and clinician identifiers are never stored: they become
``HMAC-SHA256(key, id)`` pseudonyms (the function of
:mod:`offline_data.pseudonymise`, so a patient links across imported logs and
the audit store under one key). :func:`pseudonym_key` finds the key.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import tempfile
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from sqlalchemy import DateTime, Engine, ForeignKey, String, Text, create_engine, event, inspect, make_url, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.pool import StaticPool
from sqlalchemy.types import TypeDecorator

from offline_data.pseudonymise import KEY_ENV_VAR, load_key, pseudonym

DEFAULT_DB_URL: Final = "sqlite:///carepath-audit.sqlite"
#: The key generated for a file-based SQLite store lives at ``<db file>`` + this.
KEY_FILE_SUFFIX: Final = ".key"


# ----------------------------------------------------------------------------- tables


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in, aware UTC datetimes out, on every backend.

    SQLite has no time zones and hands back naive datetimes; storing naive UTC
    and re-attaching UTC on the way out keeps comparisons and arithmetic right.
    """

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value.isoformat()}; expected an aware (UTC) datetime")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


def utc_now() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class ApiToken(Base):
    """A bearer token: only its sha256 is kept (the plaintext is shown once)."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    scopes: Mapped[str] = mapped_column(Text)  # space-separated
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utc_now)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class RecommendationRecord(Base):
    """One answered request: what the policy saw, what was asked and answered."""

    __tablename__ = "recommendations"

    audit_id: Mapped[str] = mapped_column(String(32), primary_key=True)  # uuid4 hex
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utc_now, index=True)
    token_name: Mapped[str] = mapped_column(String(64))
    channel: Mapped[str] = mapped_column(String(16))  # "rest" | "cds-hooks" | "page"
    patient_pseudonym: Mapped[str | None] = mapped_column(String(64), index=True)
    policy_name: Mapped[str] = mapped_column(Text)
    policy_version: Mapped[str] = mapped_column(Text)
    # the certificate that vouched for the policy (carepath certify); None: served uncertified
    certificate_id: Mapped[str | None] = mapped_column(String(64), nullable=True, default=None)
    features_json: Mapped[str] = mapped_column(Text)  # named features after imputation
    request_json: Mapped[str] = mapped_column(Text)
    response_json: Mapped[str] = mapped_column(Text)

    feedback: Mapped[list[FeedbackRecord]] = relationship(back_populates="recommendation",
                                                          order_by="FeedbackRecord.id")


class FeedbackRecord(Base):
    """What the clinician did with a recommendation."""

    __tablename__ = "feedback"

    id: Mapped[int] = mapped_column(primary_key=True)
    audit_id: Mapped[str] = mapped_column(ForeignKey("recommendations.audit_id"), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utc_now)
    token_name: Mapped[str] = mapped_column(String(64))
    suggestion_id: Mapped[str] = mapped_column(Text)
    action: Mapped[str] = mapped_column(String(64))  # the suggested action this is about (envs.spec.ACTION_NAMES)
    outcome: Mapped[str] = mapped_column(String(16))  # "accepted" | "overridden"
    # what the clinician did instead of an overridden suggestion, when known (a CDS Hooks
    # override does not say): the action exported as logged data
    chosen_action: Mapped[str | None] = mapped_column(String(64))
    override_reason: Mapped[str | None] = mapped_column(Text)
    clinician_pseudonym: Mapped[str | None] = mapped_column(String(64))

    recommendation: Mapped[RecommendationRecord] = relationship(back_populates="feedback")


class Setting(Base):
    """Small key/value facts about the store (e.g. the pseudonym key's fingerprint)."""

    __tablename__ = "settings"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


# ----------------------------------------------------------------------------- the engine


def redact_url(url: str) -> str:
    """The URL with any password replaced by ``***`` (works on unparseable URLs too)."""
    return re.sub(r"(//[^/@:]*:)[^/@]*@", r"\1***@", url)


def _parse_url(url: str) -> URL:
    try:
        return make_url(url)
    except (ArgumentError, ValueError) as err:
        raise ValueError(f"bad database URL {redact_url(url)!r}: {redact_url(str(err))}; expected e.g. "
                         f"{DEFAULT_DB_URL} or postgresql+psycopg://user@host/db") from None


def sqlite_file(url: str | URL) -> Path | None:
    """The database file of a file-based SQLite URL; None for in-memory or other databases."""
    parsed = _parse_url(url) if isinstance(url, str) else url
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or database in (None, "", ":memory:"):
        return None
    assert database is not None
    if database.startswith("file:"):  # SQLite URI filenames: not resolved here
        return None
    return Path(database)


def make_engine(url: str = DEFAULT_DB_URL, *, create_tables: bool = True) -> Engine:
    """Open the database at ``url`` and create the tables that are missing.

    Raises ValueError naming the URL (without its password) when it cannot be
    parsed, its driver is not installed or the database cannot be opened.
    """
    parsed = _parse_url(url)
    try:
        engine = _create(parsed)
    except (ArgumentError, NoSuchModuleError, ImportError) as err:
        raise ValueError(f"cannot open database {redact_url(url)!r}: {redact_url(str(err))}") from None
    if create_tables:
        try:
            Base.metadata.create_all(engine)
            _add_missing_columns(engine)
        except SQLAlchemyError as err:
            engine.dispose()
            detail = redact_url(str(getattr(err, "orig", None) or err))
            raise ValueError(f"cannot open database {redact_url(url)!r}: {detail}") from None
    return engine


#: Columns added after a table was first created: (table, column, SQL type). An audit store
#: made by an older carepath gets them added (nullable), so its rows are kept.
ADDED_COLUMNS: tuple[tuple[str, str, str], ...] = (("recommendations", "certificate_id", "VARCHAR(64)"),)


def _add_missing_columns(engine: Engine) -> None:
    names = {(table, column["name"]) for table in ("recommendations",)
             for column in inspect(engine).get_columns(table)}
    with engine.begin() as connection:
        for table, column, sql_type in ADDED_COLUMNS:
            if (table, column) not in names:
                connection.execute(text(f"ALTER TABLE {table} ADD COLUMN {column} {sql_type}"))


def _create(url: URL) -> Engine:
    if url.get_backend_name() != "sqlite":
        # pre-ping: a pooled connection the server dropped (restart, outage) is replaced on checkout
        # instead of failing the next request; while the server is unreachable, connecting raises
        # OperationalError, which the app answers with 503
        return create_engine(url, pool_pre_ping=True)
    file = sqlite_file(url)
    if file is not None and not file.parent.exists():
        raise ArgumentError(f"the folder {file.parent} does not exist")
    # One connection shared by all threads for in-memory databases (each new
    # connection would otherwise see an empty database).
    pool = {"poolclass": StaticPool} if file is None else {}
    engine = create_engine(url, connect_args={"check_same_thread": False}, **pool)
    event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _sqlite_pragmas(dbapi_connection: Any, connection_record: Any) -> None:
    """WAL + synchronous=FULL: every commit is durable; foreign keys enforced."""
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
    finally:
        cursor.close()


# ----------------------------------------------------------------------------- pseudonyms


def pseudonymise(identifier: str, key: bytes) -> str:
    """``HMAC-SHA256(key, identifier)`` in hex, as offline_data pseudonymises imported logs."""
    if not identifier:
        raise ValueError("empty identifier; expected a patient or clinician id")
    return pseudonym(key, identifier)


def pseudonym_key(url: str, key_file: str | Path | None = None,
                  environ: Mapping[str, str] | None = None) -> bytes:
    """The key that turns ids into pseudonyms for the store at ``url``.

    In order: the contents of ``key_file``; the environment variable
    ``CAREPATH_PSEUDONYM_KEY``; for a file-based SQLite store, a random key
    generated once and kept in ``<db file>.key`` (mode 0600), so that a patient
    keeps their pseudonym across restarts; for an in-memory SQLite store, a
    fresh random key (nothing outlives the process anyway). Any other URL
    without a key is refused.
    """
    environ = os.environ if environ is None else environ
    if key_file is not None or environ.get(KEY_ENV_VAR):
        return load_key(key_file, environ)
    parsed = _parse_url(url)
    file = sqlite_file(parsed)
    if file is not None:
        return _stored_key(Path(str(file) + KEY_FILE_SUFFIX))
    if parsed.get_backend_name() == "sqlite":
        return secrets.token_hex(32).encode()
    raise ValueError(f"no pseudonymisation key for the database {redact_url(url)!r}: pass --key-file KEY or set "
                     f"{KEY_ENV_VAR} (e.g. `python -c \"import secrets; print(secrets.token_hex(32))\" > KEY`); "
                     "keep the same key for the life of the store, or patients' pseudonyms change")


def _stored_key(path: Path) -> bytes:
    """Read the key at ``path``, creating it (32 random bytes, hex) when absent.

    The key is written to a temporary file and hard-linked into place, which
    fails if another process got there first: then its key is used, so two
    servers starting together agree.
    """
    if not path.exists():
        if not path.parent.exists():
            raise ValueError(f"cannot keep the pseudonymisation key at {path}: the folder does not exist")
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # mode 0600
        try:
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), 0o600)
                f.write((secrets.token_hex(32) + "\n").encode())
                f.flush()
                os.fsync(f.fileno())
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
        finally:
            os.unlink(tmp)
        _fsync_folder(path.parent)
    return load_key(path, environ={})


def _fsync_folder(folder: Path) -> None:
    """Make the new directory entry durable too (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
