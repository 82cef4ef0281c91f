"""``carepath tokens`` and ``carepath audit``: API tokens and the audit store.

Errors are raised as ValueError with one clear message; the ``carepath``
dispatcher prints it on one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from carepath.argtypes import non_negative_int, positive_int

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from serving.auth import TokenStore

DB_HELP = "audit database, any SQLAlchemy URL (default sqlite:///carepath-audit.sqlite in the current folder)"
TOKENS_EPILOG = ("Tokens are stored hashed: a token is shown once, when it is created. Clients send it as "
                 "'Authorization: Bearer <token>'. Scopes: recommend, feedback, admin.")
AUDIT_EPILOG = ("The audit store holds every recommendation served and every clinician choice, with "
                "pseudonymous patient and clinician ids only.")


def _db_option(parser: argparse.ArgumentParser) -> None:
    from serving.db import DEFAULT_DB_URL

    parser.add_argument("--db", default=DEFAULT_DB_URL, metavar="URL", help=DB_HELP)


def _open(url: str, *, create: bool) -> Engine:
    """The database at ``url``; unless ``create``, a SQLite file must exist already
    (a mistyped --db should not silently start an empty store)."""
    from serving.db import make_engine, sqlite_file

    file = sqlite_file(url)
    if not create and file is not None and not file.exists():
        raise ValueError(f"no audit database at {file}; pass --db URL (the server's), or create a token first")
    return make_engine(url)


# ----------------------------------------------------------------------------- tokens


def configure_tokens(parser: argparse.ArgumentParser) -> None:
    from serving.auth import DEFAULT_SCOPES, SCOPES

    parser.epilog = TOKENS_EPILOG
    sub = parser.add_subparsers(dest="tokens_command", metavar="ACTION")
    create = sub.add_parser("create", help="create a token and print it (once)", epilog=TOKENS_EPILOG,
                            description="Create a bearer token for a client and print it. Only its hash is "
                                        "stored: copy it now, it cannot be shown again.")
    create.add_argument("name", help="who or what uses the token (1-64 of letters, digits, '_', '.', '-'); "
                                     "written into every audit record")
    create.add_argument("--scope", action="append", choices=SCOPES, default=None, dest="scopes",
                        help=f"a scope to grant; repeat for several (default: {' '.join(DEFAULT_SCOPES)})")
    _db_option(create)
    listing = sub.add_parser("list", help="list tokens: name, scopes, created, revoked", epilog=TOKENS_EPILOG)
    _db_option(listing)
    revoke = sub.add_parser("revoke", help="revoke a token (its name stays taken, for the audit trail)",
                            epilog=TOKENS_EPILOG)
    revoke.add_argument("name", help="the token's name")
    _db_option(revoke)
    parser.set_defaults(_parser=parser)


def run_tokens(args: argparse.Namespace) -> int:
    if args.tokens_command is None:
        args._parser.print_help()
        return 2
    from serving.auth import DEFAULT_SCOPES, TokenStore

    engine = _open(args.db, create=args.tokens_command == "create")
    try:
        store = TokenStore(engine)
        if args.tokens_command == "create":
            token = store.create(args.name, args.scopes or DEFAULT_SCOPES)
            print(token)
            print(f"token {args.name!r} created; copy it now: it cannot be shown again", file=sys.stderr)
        elif args.tokens_command == "list":
            _print_tokens(store)
        else:
            details = store.revoke(args.name)
            assert details.revoked_at is not None
            print(f"token {args.name!r} revoked (at {details.revoked_at:%Y-%m-%d %H:%M:%S} UTC)")
    finally:
        engine.dispose()
    return 0


def _print_tokens(store: TokenStore) -> None:
    tokens = store.list()
    if not tokens:
        print("no tokens; create one with `carepath tokens create NAME`")
        return
    width = max(len("name"), *(len(t.name) for t in tokens))
    print(f"{'name':<{width}}  {'scopes':<26}  {'created (UTC)':<19}  status")
    for t in tokens:
        status = "active" if t.revoked_at is None else f"revoked {t.revoked_at:%Y-%m-%d %H:%M:%S}"
        print(f"{t.name:<{width}}  {' '.join(t.scopes):<26}  {t.created_at:%Y-%m-%d %H:%M:%S}  {status}")


# ----------------------------------------------------------------------------- audit


def configure_audit(parser: argparse.ArgumentParser) -> None:
    parser.epilog = AUDIT_EPILOG
    sub = parser.add_subparsers(dest="audit_command", metavar="ACTION")
    summary = sub.add_parser("summary", help="count recommendations by channel and policy, feedback by outcome",
                             epilog=AUDIT_EPILOG)
    _db_option(summary)
    export = sub.add_parser(
        "export", help="export clinician choices as logged data (Parquet) for offline learning and evaluation",
        description="Turn recommendations with clinician feedback into one row per patient-week in the logged-data "
                    "schema: the action is the clinician's choice, the reward the PHQ-9 fall to the next record; "
                    "behaviour probabilities are estimated. The rows pass through `carepath data import` "
                    "(validation, a second keyed pseudonymisation, k-anonymity report).",
        epilog=AUDIT_EPILOG)
    export.add_argument("--out", type=Path, required=True, help="output file, .parquet")
    _db_option(export)
    export.add_argument("--key-file", type=Path, default=None,
                        help="pseudonymisation key file (else env CAREPATH_PSEUDONYM_KEY, else the store's own "
                             "key beside a SQLite file)")
    export.add_argument("--k", type=positive_int, default=5, help="k-anonymity threshold of the report (default 5)")
    export.add_argument("--seed", type=non_negative_int, default=0, help="seed of the behaviour model's sample")
    parser.set_defaults(_parser=parser)


def run_audit(args: argparse.Namespace) -> int:
    if args.audit_command is None:
        args._parser.print_help()
        return 2
    engine = _open(args.db, create=False)
    try:
        if args.audit_command == "summary":
            _print_summary(engine)
        else:
            _export(engine, args)
    finally:
        engine.dispose()
    return 0


def _print_summary(engine: Engine) -> None:
    from serving.audit import audit_summary

    s = audit_summary(engine)
    print(f"recommendations: {s.recommendations:,} ({s.without_feedback:,} without feedback)")
    for name, n in s.by_channel.items():
        print(f"  channel {name}: {n:,}")
    for name, n in s.by_policy.items():
        print(f"  policy {name}: {n:,}")
    print(f"feedback: {s.feedback:,}")
    for name, n in s.by_outcome.items():
        print(f"  {name}: {n:,}")


def _export(engine: Engine, args: argparse.Namespace) -> None:
    from serving.audit import AuditStore
    from serving.db import pseudonym_key

    store = AuditStore(engine, pseudonym_key(args.db, args.key_file))
    result = store.export_logged(args.out, key_file=args.key_file, k=args.k, estimate_seed=args.seed)
    print(f"wrote {result.rows:,} patient-weeks of {result.patients:,} patients ({result.episodes:,} episodes) "
          f"to {result.out}; behaviour probabilities ESTIMATED")
    skipped = {"without feedback": result.without_feedback, "without a patient id": result.without_patient,
               "overridden without the step taken": result.without_choice,
               "with incomplete features": result.bad_features,
               "superseded by a later record in the same week": result.superseded,
               "whose chosen action the clinical rules block": result.blocked}
    shown = "; ".join(f"{n:,} {why}" for why, n in skipped.items() if n)
    if shown:
        print(f"  left out recommendations: {shown}")
