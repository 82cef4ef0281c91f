"""HTTP hardening: security headers with a strict Content-Security-Policy, a per-token rate limit.

CORS stays closed unless origins are named (``carepath serve --cors-origin``): without
``Access-Control-Allow-Origin`` a browser page from another origin cannot read any answer.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import Final

from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: The page loads only its own scripts, styles and images; nothing may frame it.
CONTENT_SECURITY_POLICY: Final = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)

SECURITY_HEADERS: Final[tuple[tuple[bytes, bytes], ...]] = (
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
    (b"permissions-policy", b"camera=(), microphone=(), geolocation=(), payment=(), usb=()"),
)
#: Answers about patients must not stay in shared or browser caches.
NO_STORE_PREFIXES: Final = ("/v1/", "/cds-services")


class SecurityHeaders:
    """Plain ASGI middleware adding :data:`SECURITY_HEADERS` to every response, and
    ``Cache-Control: no-store`` to API answers."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        no_store = str(scope.get("path", "")).startswith(NO_STORE_PREFIXES)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"server"]
                present = {k.lower() for k, _ in headers}
                headers += [(k, v) for k, v in SECURITY_HEADERS if k not in present]
                if no_store:
                    headers = [(k, v) for k, v in headers if k.lower() != b"cache-control"]
                    headers.append((b"cache-control", b"no-store"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


@dataclass
class RateLimiter:
    """A token bucket per API token: ``rate`` requests a second on average, bursts up to ``burst``.

    In memory, per server process (``carepath serve`` runs one worker). ``rate`` 0 turns it off.
    """

    rate: float = 20.0
    burst: int = 60
    _buckets: dict[str, tuple[float, float]] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.rate) and self.rate >= 0):
            raise ValueError(f"rate limit must be a non-negative number of requests per second, got {self.rate}")
        if self.rate > 0 and self.burst < 1:
            raise ValueError(f"rate limit burst must be at least 1, got {self.burst}")

    def retry_after(self, key: str, now: float | None = None) -> float:
        """Take one request from ``key``'s bucket: 0 when allowed, else seconds until it would be."""
        if self.rate == 0:
            return 0.0
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, last = self._buckets.get(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rate
