"""Slow down callers whose calls keep being refused.

Why: every call costs the server's event loop (and the GIL the engine thread needs) the
same receive, interceptors and status send whether it is served or refused, and a client
that loops on a refused call — a retry storm, or a hostile tenant sending bad tokens,
oversized prompts or uploads, invalid merges — sends the next one as soon as it hears back.
Refusing faster only makes such a loop spin faster. So once a caller (its tenant when known,
else its address) has had `free` refusals within `WINDOW_S`, it is over its budget:

- each further refusal is held `delay_s` before it is sent (`pace`), and
- each of its calls waits `delay_s` before it starts (`pace_start`): an oversized upload's
  bytes, a flood of generations, are then taken in at that pace too.

A closed loop then costs one call per `delay_s` per connection instead of hundreds a second,
and the budget frees itself once the caller's refusals fall out of the window. A held call
is an idle task, but it counts against the server's `max_concurrent_rpcs`, so at most
`max_held` are held at once; past that, calls go on at once (figures:
bench/results/storm.md).

Which outcomes count: UNAUTHENTICATED, PERMISSION_DENIED, INVALID_ARGUMENT and
RESOURCE_EXHAUSTED — what a well-behaved client does not repeat in a loop. NOT_FOUND
(asking whether something exists) and UNAVAILABLE (the server's state, not the caller's
doing) never do. A caller within its budget is never delayed.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict, deque

PACED_CODES = frozenset({"UNAUTHENTICATED", "PERMISSION_DENIED", "INVALID_ARGUMENT",
                         "RESOURCE_EXHAUSTED"})
WINDOW_S = 10.0
_KEYS = 4096  # callers remembered (least recently refused forgotten first)


class RefusalPacer:
    """Counts refusals per caller within `WINDOW_S`; see the module docstring. A `free`
    of 0 turns pacing off."""

    def __init__(self, free: int = 20, delay_s: float = 1.0, max_held: int = 64) -> None:
        self.free, self.delay_s, self.max_held = free, delay_s, max_held
        self.held = 0  # refusals being held now
        self.paced = 0  # refusals held so far (tests, metrics)
        self._lock = threading.Lock()
        self._seen: OrderedDict[str, deque[float]] = OrderedDict()

    def delay_for(self, key: str, code: str, now: float | None = None) -> float:
        """Record one outcome of `key`'s call; the seconds to hold it before answering."""
        if self.free <= 0 or code not in PACED_CODES:
            return 0.0
        now = time.monotonic() if now is None else now
        with self._lock:
            times = self._seen.pop(key, None) or deque()
            self._seen[key] = times  # most recently refused last
            while times and times[0] <= now - WINDOW_S:
                times.popleft()
            times.append(now)
            while len(times) > self.free + 1:  # only "more than free" matters
                times.popleft()
            while len(self._seen) > _KEYS:
                self._seen.popitem(last=False)
            return self.delay_s if len(times) > self.free else 0.0

    def over_budget(self, key: str, now: float | None = None) -> bool:
        """Whether `key` has had more than `free` refusals within the window."""
        if self.free <= 0:
            return False
        now = time.monotonic() if now is None else now
        with self._lock:
            times = self._seen.get(key)
            return bool(times) and len([t for t in times if t > now - WINDOW_S]) > self.free

    async def pace(self, key: str, code: str) -> None:
        """Hold this refusal for its delay (if any, and if fewer than `max_held` are held)."""
        await self._hold(self.delay_for(key, code))

    async def pace_start(self, key: str) -> None:
        """Hold the start of a call of a caller over its budget."""
        await self._hold(self.delay_s if self.over_budget(key) else 0.0)

    async def _hold(self, delay: float) -> None:
        if delay <= 0:
            return
        with self._lock:
            if self.held >= self.max_held:
                return
            self.held += 1
            self.paced += 1
        try:
            await asyncio.sleep(delay)
        finally:
            with self._lock:
                self.held -= 1
