"""Per-tenant rate limits at the intake: requests per minute and tokens per minute.

Each tenant has two token buckets, each holding up to one minute's allowance and refilled
continuously. A request takes one from the request bucket before its prompt is tokenized
(a tenant over its request rate costs the server nothing more), then its prompt tokens plus
`max_new_tokens` from the token bucket. A request that does not fit is refused with
`RateLimited` (RESOURCE_EXHAUSTED) whose `retry_after_s` is when it would fit; the gRPC door
sends that as RetryInfo, the HTTP door as 429.

Thread-safe: the intake runs on callers' threads.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from loraplex.errors import ResourceExhausted, quote

MAX_TENANTS = 100_000  # idle buckets (full again) are dropped beyond this many


class RateLimited(ResourceExhausted):
    """A tenant is over its rate: retry after `retry_after_s` seconds."""

    def __init__(self, message: str, *, retry_after_s: float, field: str | None = None) -> None:
        super().__init__(message, field=field)
        self.retry_after_s = retry_after_s


class _Buckets:
    def __init__(self, per_minute: int, clock: Callable[[], float]) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0  # per second
        self.clock = clock
        self._level: dict[str, tuple[float, float]] = {}  # tenant -> (level, as of)

    def take(self, tenant: str, amount: float) -> float:
        """Take `amount`; 0.0 when taken, else the seconds until it would fit (nothing
        taken). An amount above the capacity can never fit: its wait is for a full bucket."""
        now = self.clock()
        level, at = self._level.get(tenant, (self.capacity, now))
        level = min(self.capacity, level + (now - at) * self.rate)
        if level >= amount:
            self._level[tenant] = (level - amount, now)
            return 0.0
        self._level[tenant] = (level, now)
        if len(self._level) > MAX_TENANTS:
            self._forget_full(now)
        return (min(amount, self.capacity) - level) / self.rate

    def give_back(self, tenant: str, amount: float) -> None:
        level, at = self._level.get(tenant, (self.capacity, self.clock()))
        self._level[tenant] = (min(self.capacity, level + amount), at)

    def _forget_full(self, now: float) -> None:
        for tenant, (level, at) in list(self._level.items()):
            if level + (now - at) * self.rate >= self.capacity:
                del self._level[tenant]


class RateLimiter:
    """Requests and tokens per minute for each tenant (None: that limit is off)."""

    def __init__(self, requests_per_minute: int | None, tokens_per_minute: int | None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._requests = _Buckets(requests_per_minute, clock) if requests_per_minute else None
        self._tokens = _Buckets(tokens_per_minute, clock) if tokens_per_minute else None

    def request(self, tenant: str) -> None:
        """Count one request of `tenant`, or raise RateLimited."""
        if self._requests is None:
            return
        with self._lock:
            wait = self._requests.take(tenant, 1)
        if wait:
            raise RateLimited(f"tenant {quote(tenant)} is over its rate of "
                              f"{self._requests.capacity:g} requests per minute; retry in "
                              f"{wait:.1f}s", retry_after_s=wait, field="request")

    def tokens(self, tenant: str, tokens: int) -> None:
        """Count `tokens` (prompt + max_new_tokens) of `tenant`, or raise RateLimited (and
        hand back the request counted for it: it was never served)."""
        if self._tokens is None:
            return
        with self._lock:
            wait = self._tokens.take(tenant, tokens)
            if wait and self._requests is not None:
                self._requests.give_back(tenant, 1)
        if wait:
            cap = self._tokens.capacity
            hint = (" (more than a whole minute's allowance: send a shorter prompt or a "
                    "smaller max_new_tokens)" if tokens > cap else "")
            raise RateLimited(f"tenant {quote(tenant)} is over its rate of {cap:g} tokens "
                              f"per minute (this request: {tokens}){hint}; retry in "
                              f"{wait:.1f}s", retry_after_s=wait,
                              field="sampling.max_new_tokens")
