"""Bearer tokens, the database engine and the pseudonymisation key.

The token store's tests run on SQLite and on PostgreSQL (``[sqlite]``/``[postgresql]``; see
tests/serving/conftest.py for the server the latter need).
"""

from __future__ import annotations

import hashlib
import stat

import pytest
from sqlalchemy import text

from carepath.cli import main
from serving.auth import DEFAULT_SCOPES, TokenStore, bearer_token
from serving.db import make_engine, pseudonym_key


@pytest.fixture
def db(audit_db):
    """A fresh store on each backend: (the database, an engine on it)."""
    engine = make_engine(audit_db.url)
    yield audit_db, engine
    engine.dispose()


def test_token_round_trip_keeps_name_and_scopes(db):
    store = TokenStore(db[1])
    token = store.create("ward-7.app", ["admin", "recommend", "admin"])
    assert token.startswith("cp_") and len(token) > 40
    info = store.verify(token)
    assert info is not None
    assert info.name == "ward-7.app" and info.scopes == ("recommend", "admin")  # SCOPES order, no repeats
    assert info.allows("admin") and not info.allows("feedback")
    default = store.verify(store.create("ehr"))
    assert default is not None and default.scopes == DEFAULT_SCOPES
    assert store.create("other") != store.create("another")


def test_database_holds_only_the_hash_of_a_token(db):
    database, engine = db
    token = TokenStore(engine).create("cds")
    stored = database.stored_text()  # SQLite: the file and its write-ahead log; PostgreSQL: every row
    assert token.encode() not in stored
    assert token[3:].encode() not in stored  # not even without its prefix
    assert hashlib.sha256(token.encode()).hexdigest().encode() in stored  # the test looks in the right place


def test_wrong_malformed_and_revoked_tokens_are_rejected(db):
    store = TokenStore(db[1])
    token = store.create("page")
    for wrong in (token[:-1] + ("A" if token[-1] != "A" else "B"), token + "x", token.upper(), "", None,
                  "cp_" + "a" * 5000):
        assert store.verify(wrong) is None
    revoked = store.revoke("page")
    assert revoked.revoked_at is not None and not revoked.active
    assert store.verify(token) is None
    assert store.revoke("page").revoked_at == revoked.revoked_at  # revoking again changes nothing
    with pytest.raises(ValueError, match="no token named 'nobody'"):
        store.revoke("nobody")


def test_duplicate_names_unknown_scopes_and_bad_names_are_refused(db):
    store = TokenStore(db[1])
    store.create("ehr")
    with pytest.raises(ValueError, match="'ehr' exists already"):
        store.create("ehr")
    store.revoke("ehr")
    with pytest.raises(ValueError, match="'ehr' exists already"):
        store.create("ehr", ["admin"])
    with pytest.raises(ValueError, match="unknown scope 'superuser'"):
        store.create("x", ["recommend", "superuser"])
    with pytest.raises(ValueError, match="no scope"):
        store.create("x", [])
    for bad in ("", "a" * 65, "has space", "slash/name", "ünicode"):
        with pytest.raises(ValueError, match="bad token name"):
            store.create(bad)
    assert store.create("a" * 64)
    assert [t.name for t in store.list()] == ["ehr", "a" * 64]


def test_list_shows_creation_and_revocation(db):
    store = TokenStore(db[1])
    store.create("first")
    store.create("second", ["feedback"])
    store.revoke("first")
    first, second = store.list()
    assert (first.name, first.active, second.name, second.scopes, second.active) == (
        "first", False, "second", ("feedback",), True)
    assert first.created_at.tzinfo is not None and first.revoked_at is not None
    assert first.revoked_at >= first.created_at


@pytest.mark.parametrize(("header", "expected"), [
    ("Bearer cp_abc-DEF_123", "cp_abc-DEF_123"),
    ("bearer cp_abc", "cp_abc"),
    ("BEARER   cp_abc  ", "cp_abc"),
    ("Bearer abc+/==", "abc+/=="),
    (None, None),
    ("", None),
    ("Bearer", None),
    ("Bearer ", None),
    ("Basic dXNlcjpwYXNz", None),
    ("Bearer two tokens", None),
    ("Bearer tok\u00e9n", None),
    ("cp_abc", None),
    ("Token cp_abc", None),
])
def test_bearer_header_parsing(header, expected):
    assert bearer_token(header) == expected


def test_a_committed_row_is_on_disk(db):
    """What the audit trail relies on: a commit returns once the row is durable."""
    database, engine = db
    with engine.connect() as conn:
        if database.backend == "sqlite":
            assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
            assert conn.execute(text("PRAGMA synchronous")).scalar() == 2  # FULL
            assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
        else:  # the server's settings as this connection sees them: a commit waits for the WAL flush
            assert conn.execute(text("SHOW synchronous_commit")).scalar() != "off"  # on, local, remote_*
            assert conn.execute(text("SHOW fsync")).scalar() == "on"


def test_bad_database_urls_are_refused_without_the_password(tmp_path):
    for url in ("not a url", "nosuchdialect://user:hunter2@host/db", "postgresql+nosuchdriver://u:hunter2@h/db",
                f"sqlite:///{tmp_path}/missing-folder/audit.sqlite",
                "postgresql+psycopg://u:hunter2@127.0.0.1:1/db"):  # nothing listens on port 1
        with pytest.raises(ValueError) as err:
            make_engine(url)
        assert "hunter2" not in str(err.value)
        if "hunter2" in url:
            assert ":***@" in str(err.value)


def test_pseudonym_key_sources(tmp_path):
    url = f"sqlite:///{tmp_path}/audit.sqlite"
    key_file = tmp_path / "given.key"
    key_file.write_text("k" * 32 + "\n")
    env_key = "e" * 32
    assert pseudonym_key(url, key_file, environ={"CAREPATH_PSEUDONYM_KEY": env_key}) == b"k" * 32
    assert pseudonym_key(url, environ={"CAREPATH_PSEUDONYM_KEY": env_key}) == env_key.encode()
    stored = pseudonym_key(url, environ={})
    kept = tmp_path / "audit.sqlite.key"
    assert kept.exists() and stat.S_IMODE(kept.stat().st_mode) == 0o600
    assert len(stored) == 64 and pseudonym_key(url, environ={}) == stored  # generated once, then reused
    assert not list(tmp_path.glob(".*tmp")), "no temporary key file may be left behind"
    assert pseudonym_key("sqlite://", environ={}) != pseudonym_key("sqlite://", environ={})  # in memory: ephemeral
    with pytest.raises(ValueError, match="--key-file KEY or set CAREPATH_PSEUDONYM_KEY") as err:
        pseudonym_key("postgresql+psycopg://carepath:hunter2@db/audit", environ={})
    assert "hunter2" not in str(err.value)
    short = tmp_path / "short.key"
    short.write_text("tooshort")
    with pytest.raises(ValueError, match="at least 16"):
        pseudonym_key(url, short, environ={})


def test_tokens_cli_create_list_revoke(audit_db, tmp_path, capsys):
    db_url = audit_db.url
    assert main(["tokens", "create", "ehr-gateway", "--scope", "recommend", "--scope", "admin", "--db", db_url]) == 0
    captured = capsys.readouterr()
    token = captured.out.strip()
    assert "cannot be shown again" in captured.err
    engine = make_engine(db_url)
    info = TokenStore(engine).verify(token)
    assert info is not None and info.scopes == ("recommend", "admin")

    assert main(["tokens", "create", "ehr-gateway", "--db", db_url]) == 2
    assert "exists already" in capsys.readouterr().err
    assert main(["tokens", "list", "--db", db_url]) == 0
    listing = capsys.readouterr().out
    assert "ehr-gateway" in listing and "recommend admin" in listing and "active" in listing
    assert token not in listing
    assert main(["tokens", "revoke", "ehr-gateway", "--db", db_url]) == 0
    assert "revoked" in capsys.readouterr().out
    assert TokenStore(engine).verify(token) is None
    assert main(["tokens", "list", "--db", db_url]) == 0
    assert "revoked 20" in capsys.readouterr().out
    assert main(["tokens", "revoke", "nobody", "--db", db_url]) == 2
    assert "no token named 'nobody'" in capsys.readouterr().err
    assert main(["tokens", "list", "--db", f"sqlite:///{tmp_path}/typo.sqlite"]) == 2
    assert "no audit database" in capsys.readouterr().err
    assert not (tmp_path / "typo.sqlite").exists()
    engine.dispose()


def test_tokens_cli_refuses_unknown_scope(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["tokens", "create", "x", "--scope", "root", "--db", f"sqlite:///{tmp_path}/a.sqlite"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'root'" in capsys.readouterr().err
