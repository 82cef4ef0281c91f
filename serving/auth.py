"""Bearer tokens for the API: created by an admin, stored hashed, checked per request.

A token is ``cp_`` + 32 random bytes (URL-safe base64), shown once when it is
created. The database keeps only its sha256: a copy of the database (a
backup, a leaked file) holds no usable credential. A plain hash (no salt, no
slow KDF) is right here because tokens are random with 256 bits of entropy,
not guessable passwords, and a lookup by hash keeps each request one indexed
query.

Each token has a name (who or what uses it; it is written into every audit
row) and scopes: ``recommend`` (ask for recommendations), ``feedback``
(record what the clinician chose), ``admin``. Revoked tokens stay in the
table, so their names in old audit rows still mean something.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from sqlalchemy import Engine, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from serving.db import ApiToken, utc_now

SCOPES: Final[tuple[str, ...]] = ("recommend", "feedback", "admin")
DEFAULT_SCOPES: Final[tuple[str, ...]] = ("recommend", "feedback")
TOKEN_PREFIX: Final = "cp_"  # noqa: S105 - a public prefix that marks carepath tokens, not a secret
NAME_PATTERN: Final = re.compile(r"[A-Za-z0-9_.-]{1,64}")
#: Longer Authorization values are not ours; refusing them early saves hashing junk.
MAX_TOKEN_LENGTH: Final = 256
#: RFC 6750 ``b64token`` after the scheme.
_BEARER: Final = re.compile(r"bearer +([A-Za-z0-9\-._~+/]+=*)", re.IGNORECASE)


@dataclass(frozen=True)
class TokenInfo:
    """Who a verified token belongs to and what it may do."""

    name: str
    scopes: tuple[str, ...]

    def allows(self, scope: str) -> bool:
        return scope in self.scopes


@dataclass(frozen=True)
class TokenDetails(TokenInfo):
    """A token as ``tokens list`` shows it."""

    created_at: datetime
    revoked_at: datetime | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def check_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name):
        raise ValueError(f"bad token name {name!r}: expected 1-64 characters of letters, digits, '_', '.' or '-'")
    return name


def check_scopes(scopes: Iterable[str]) -> tuple[str, ...]:
    """Known scopes, without repeats, in :data:`SCOPES` order; at least one."""
    wanted = set(scopes)
    unknown = sorted(wanted - set(SCOPES))
    if unknown:
        raise ValueError(f"unknown scope {', '.join(map(repr, unknown))}; expected one of {', '.join(SCOPES)}")
    if not wanted:
        raise ValueError(f"no scope given; expected one or more of {', '.join(SCOPES)}")
    return tuple(s for s in SCOPES if s in wanted)


def bearer_token(authorization_header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header (scheme in any case); None otherwise."""
    if not authorization_header:
        return None
    match = _BEARER.fullmatch(authorization_header.strip())
    return match.group(1) if match else None


class TokenStore:
    """Tokens in the audit database (see the module doc)."""

    def __init__(self, engine: Engine, *, cache_seconds: float = 0.0) -> None:
        """``cache_seconds``: remember a successful verification that long (the server uses a few
        seconds, saving a database round trip per request; a revocation then takes effect within
        that time). Failures are never cached, so unknown tokens cannot fill the cache."""
        self.engine = engine
        self.cache_seconds = cache_seconds
        self._cache: dict[str, tuple[TokenInfo, float]] = {}

    def create(self, name: str, scopes: Iterable[str] = DEFAULT_SCOPES) -> str:
        """A new token for ``name``; the plaintext is returned here and never again."""
        check_name(name)
        kept = check_scopes(scopes)
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        taken = ValueError(f"a token named {name!r} exists already (revoked tokens keep their names, for the "
                           "audit trail); choose another name")
        with Session(self.engine) as session:
            if session.scalar(select(ApiToken.id).where(ApiToken.name == name)) is not None:
                raise taken
            session.add(ApiToken(name=name, token_sha256=token_sha256(token), scopes=" ".join(kept),
                                 created_at=utc_now()))
            try:
                session.commit()
            except IntegrityError:  # created by someone else since the check
                raise taken from None
        return token

    def verify(self, token: str | None) -> TokenInfo | None:
        """The token's owner and scopes, or None when it is unknown, malformed or revoked."""
        if not token or len(token) > MAX_TOKEN_LENGTH:
            return None
        digest = token_sha256(token)
        now = time.monotonic()
        cached = self._cache.get(digest)
        if cached is not None and cached[1] > now:
            return cached[0]
        with Session(self.engine) as session:
            row = session.scalar(select(ApiToken).where(ApiToken.token_sha256 == digest))
            if row is None or not hmac.compare_digest(row.token_sha256, digest) or row.revoked_at is not None:
                self._cache.pop(digest, None)
                return None
            info = TokenInfo(row.name, tuple(row.scopes.split()))
        if self.cache_seconds > 0:
            self._cache[digest] = (info, now + self.cache_seconds)
        return info

    def revoke(self, name: str) -> TokenDetails:
        """Revoke the token named ``name`` (again: no change, the first time is kept)."""
        with Session(self.engine) as session:
            row = session.scalar(select(ApiToken).where(ApiToken.name == name))
            if row is None:
                raise ValueError(f"no token named {name!r}; `carepath tokens list` shows the names")
            if row.revoked_at is None:
                row.revoked_at = utc_now()
                session.commit()
            return _details(row)

    def list(self) -> list[TokenDetails]:
        """Every token, active and revoked, oldest first."""
        with Session(self.engine) as session:
            rows = session.scalars(select(ApiToken).order_by(ApiToken.created_at, ApiToken.id))
            return [_details(row) for row in rows]


def _details(row: ApiToken) -> TokenDetails:
    return TokenDetails(row.name, tuple(row.scopes.split()), row.created_at, row.revoked_at)
