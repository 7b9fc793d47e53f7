"""Console sign-in sessions, CSRF tokens, the Origin check and the security headers.

A session is a random id in a cookie (HttpOnly, SameSite=Strict, Path=/console, Secure
when the server speaks TLS) naming, in this process's memory only, the token the person
signed in with and a CSRF token. The token never reaches a URL, a page or a log line; the
cookie is worth nothing after sign-out, `IDLE_S` without a request, `LIFETIME_S` in all,
or a restart. Every request authenticates the session's token again with the registry
(the same call, cache and failure backoff as the gRPC door), so a revoked or expired token
ends its console sessions at their next request.

Every state-changing request is a POST that must carry the session's CSRF token in a form
field (compared in constant time) and, where the browser says where it comes from
(`Sec-Fetch-Site`, `Origin`), come from this server's own origin. The sign-in form, which has no session yet, carries a one-time nonce
that must match a short-lived cookie set with the form (a double submit), so another site
cannot sign a visitor in either.
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

COOKIE = "loraplex_console"
SIGNIN_COOKIE = "loraplex_console_signin"
PATH = "/console"
IDLE_S = 8 * 3600.0
LIFETIME_S = 24 * 3600.0
SIGNIN_S = 600  # how long a sign-in form stays usable
MAX_SESSIONS = 10000

# default-src 'none': nothing loads unless named; no inline script or style anywhere
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "cross-origin-opener-policy": "same-origin",
}


@dataclass
class Session:
    token: str  # held only here, in memory
    csrf: str
    created: float
    seen: float
    identity: Any = field(default=None)  # as of the last request's authentication


class SessionStore:
    """Sessions by id: bounded (the least recently used goes first), expiring."""

    def __init__(self, *, clock=time.monotonic, limit: int = MAX_SESSIONS) -> None:
        self._clock = clock
        self._limit = limit
        self._lock = threading.Lock()
        self._sessions: OrderedDict[str, Session] = OrderedDict()

    def create(self, token: str, identity: Any) -> tuple[str, Session]:
        """A fresh session (a new id at every sign-in: no fixation)."""
        sid = secrets.token_urlsafe(32)
        now = self._clock()
        s = Session(token=token, csrf=secrets.token_urlsafe(32), created=now, seen=now,
                    identity=identity)
        with self._lock:
            self._sessions[sid] = s
            while len(self._sessions) > self._limit:
                self._sessions.popitem(last=False)
        return sid, s

    def get(self, sid: str | None) -> Session | None:
        """The live session `sid` names (its idle clock restarts), else None."""
        if not sid:
            return None
        now = self._clock()
        with self._lock:
            s = self._sessions.get(sid)
            if s is None:
                return None
            if now - s.seen > IDLE_S or now - s.created > LIFETIME_S:
                del self._sessions[sid]
                return None
            s.seen = now
            self._sessions.move_to_end(sid)
            return s

    def drop(self, sid: str | None) -> None:
        with self._lock:
            self._sessions.pop(sid or "", None)

    def __len__(self) -> int:
        return len(self._sessions)


def same(given: str | None, expected: str | None) -> bool:
    """Constant-time equality of two secrets; a missing one never matches."""
    if not given or not expected:
        return False
    return hmac.compare_digest(given.encode(), expected.encode())


def origin_ok(headers: Any, scheme: str) -> bool:
    """A POST comes from this server's own pages. The browser says so in `Sec-Fetch-Site`
    (`same-origin`), which every current browser sends whatever the referrer policy; else
    in `Origin`, which must then name the scheme and host the request was sent to. Under
    `Referrer-Policy: no-referrer` browsers send `Origin: null` even for a same-origin
    form, so `null` (like a missing header: a script, an old browser) proves nothing
    either way and leaves the decision to the CSRF token, which every POST carries."""
    site = headers.get("sec-fetch-site")
    if site is not None:
        return site == "same-origin"
    origin = headers.get("origin")
    if origin is None or origin == "null":
        return True
    host = headers.get("host") or ""
    return bool(host) and origin == f"{scheme}://{host}"


def cookie(name: str, value: str, *, secure: bool, max_age: int | None = None) -> str:
    """A `Set-Cookie` value: HttpOnly, SameSite=Strict, scoped to the console."""
    parts = [f"{name}={value}", f"Path={PATH}", "HttpOnly", "SameSite=Strict"]
    if secure:
        parts.append("Secure")
    if max_age is not None:
        parts.append(f"Max-Age={max_age}")
    return "; ".join(parts)


def clear_cookie(name: str, *, secure: bool) -> str:
    return cookie(name, "", secure=secure, max_age=0)


class SecurityHeaders:
    """ASGI middleware: the headers above on every console response, and `no-store` on
    everything but the static files (pages and JSON show tenants' data)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        static = scope.get("path", "").startswith(f"{PATH}/static/")
        cache = b"no-cache" if static else b"no-store"

        async def with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                given = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k.encode(), v.encode()) for k, v in HEADERS.items()
                         if k.encode() not in given]
                if b"cache-control" not in given:
                    extra.append((b"cache-control", cache))
                message["headers"] = list(message.get("headers", [])) + extra
            await send(message)

        await self.app(scope, receive, with_headers)
