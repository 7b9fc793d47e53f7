"""Admission: a bounded waiting queue, fair across tenants, with aging.

Fairness is fair queuing on tokens served (the "virtual token counter" of Sheng et al.,
"Fairness in Serving Large Language Models", OSDI '24, a deficit-round-robin on tokens):
every tenant has a counter of the tokens the engine has served it (its prompt tokens,
charged at admission, and every generated token);
the next free row goes to the waiting tenant with the smallest counter. A tenant that
arrives (or returns after idling) starts at the smallest counter of the tenants already
active, so it cannot bank credit while idle, and one tenant's burst is served in turn with
everyone else instead of ahead of them.

Within a tenant, requests go first-in first-out, except that a request the engine cannot
place yet (its adapter still loading, or no adapter slot free) is passed over without
blocking the ones behind it. Aging bounds every wait: a request queued for longer than
`aging_s` is admitted before anyone else, and while one such request cannot be placed for
lack of capacity nothing else is admitted, so finishing sequences free room for it.

The distinct-adapters-per-step cap is the pool's: `place` refuses a request whose adapter
would need a device slot when all `max_slots` slots hold adapters of running sequences.

Thread-safety: `push`, `remove` and `__len__` may be called from any thread (`submit`,
`cancel`); `pick`, `charge`, `finished` from the engine thread.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from loraplex.errors import Overloaded, ResourceExhausted


class Placement(Enum):
    ADMITTED = "admitted"  # the engine took it (row + adapter slot reserved)
    NOT_READY = "not_ready"  # adapter still loading: try others, come back next step
    NO_CAPACITY = "no_capacity"  # no adapter slot / row for it now
    DROPPED = "dropped"  # the engine finished it (error, cancelled, deadline): forget it


@dataclass
class Ticket:
    """A waiting request as the scheduler sees it; `payload` is the engine's sequence."""

    request_id: str
    tenant: str
    payload: Any
    enqueued: float = field(default_factory=time.monotonic)
    cost: int = 1  # tokens charged at admission (the prompt); generated ones via charge()
    budget: int = 0  # tokens it may cost in all (prompt + max_new_tokens): per-tenant caps


class Scheduler:
    def __init__(self, max_waiting: int, aging_s: float, *,
                 max_waiting_per_tenant: int | None = None,
                 max_waiting_tokens_per_tenant: int | None = None) -> None:
        self.max_waiting = max_waiting
        self.aging_s = aging_s
        self.max_waiting_per_tenant = max_waiting_per_tenant
        self.max_waiting_tokens_per_tenant = max_waiting_tokens_per_tenant
        self._lock = threading.Lock()
        self._queues: dict[str, deque[Ticket]] = {}
        self._by_id: dict[str, Ticket] = {}
        self._served: dict[str, float] = {}  # tenant -> tokens served (virtual counter)
        self._running: dict[str, int] = {}  # tenant -> sequences in the batch

    # -- any thread ---------------------------------------------------------------------
    def push(self, ticket: Ticket) -> None:
        """Queue a request; raises Overloaded when `max_waiting` requests already wait."""
        with self._lock:
            if len(self._by_id) >= self.max_waiting:
                raise Overloaded(f"waiting queue is full ({self.max_waiting} requests); "
                                 "retry later", field="request")
            if ticket.request_id in self._by_id:
                raise ValueError(f"duplicate request id {ticket.request_id!r}")
            self._check_tenant_limits(ticket)
            t = ticket.tenant
            if not self._active(t):
                self._served[t] = max(self._served.get(t, 0.0), self._floor())
            self._queues.setdefault(t, deque()).append(ticket)
            self._by_id[ticket.request_id] = ticket

    def _check_tenant_limits(self, ticket: Ticket) -> None:
        """Per-tenant back-pressure: refuse (ResourceExhausted) rather than let one tenant's
        burst fill the shared queue. Caller holds the lock."""
        queue = self._queues.get(ticket.tenant, ())
        cap = self.max_waiting_per_tenant
        if cap is not None and len(queue) >= cap:
            raise ResourceExhausted(f"tenant {ticket.tenant!r} already has {len(queue)} "
                                    f"requests waiting (per-tenant limit {cap})",
                                    field="request")
        cap = self.max_waiting_tokens_per_tenant
        if cap is not None:
            queued = sum(t.budget for t in queue)
            if queued + ticket.budget > cap:
                raise ResourceExhausted(f"too many tokens: tenant {ticket.tenant!r} would have "
                                        f"{queued + ticket.budget} tokens waiting (prompt + "
                                        f"max_new_tokens; per-tenant limit {cap})",
                                        field="sampling.max_new_tokens")

    def remove(self, request_id: str) -> Ticket | None:
        """Take a waiting request out of the queue (cancel); None if it is not waiting."""
        with self._lock:
            ticket = self._by_id.pop(request_id, None)
            if ticket is not None:
                self._queues[ticket.tenant].remove(ticket)
            return ticket

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_id)

    def waiting(self) -> list[Ticket]:
        with self._lock:
            return list(self._by_id.values())

    # -- engine thread -----------------------------------------------------------------
    def pick(self, free_rows: int, place: Callable[[Ticket], Placement],
             now: float | None = None) -> list[Ticket]:
        """Admit up to `free_rows` requests; `place` tries to start one on the engine."""
        now = time.monotonic() if now is None else now
        admitted: list[Ticket] = []
        with self._lock:
            aged = sorted((t for t in self._by_id.values() if now - t.enqueued >= self.aging_s),
                          key=lambda t: t.enqueued)
            skipped: set[str] = set()  # request ids passed over this round
            for t in aged:
                if len(admitted) >= free_rows:
                    return admitted
                outcome = place(t)
                if outcome is Placement.ADMITTED:
                    self._take(t, admitted=True)
                    admitted.append(t)
                elif outcome is Placement.DROPPED:
                    self._take(t, admitted=False)
                elif outcome is Placement.NO_CAPACITY:
                    return admitted  # hold everything back until this one fits
                else:
                    skipped.add(t.request_id)
            while len(admitted) < free_rows:
                ticket = self._next_fair(skipped, place)
                if ticket is None:
                    break
                admitted.append(ticket)
        return admitted

    def charge(self, tenant: str, tokens: int) -> None:
        """Count `tokens` (prompt or generated) served to `tenant`."""
        with self._lock:
            self._served[tenant] = self._served.get(tenant, 0.0) + tokens

    def finished(self, tenant: str) -> None:
        """An admitted sequence of `tenant` left the batch."""
        with self._lock:
            n = self._running.get(tenant, 0) - 1
            if n > 0:
                self._running[tenant] = n
            else:
                self._running.pop(tenant, None)

    def served(self) -> dict[str, float]:
        with self._lock:
            return dict(self._served)

    # -- internals (lock held) -----------------------------------------------------------
    def _next_fair(self, skipped: set[str], place: Callable[[Ticket], Placement]) -> Ticket | None:
        """Try tenants from the smallest counter up; first placeable request wins."""
        order = sorted((t for t, q in self._queues.items() if q),
                       key=lambda t: (self._served.get(t, 0.0), self._queues[t][0].enqueued))
        for tenant in order:
            for ticket in list(self._tickets(tenant, skipped)):
                outcome = place(ticket)
                if outcome is Placement.ADMITTED:
                    self._take(ticket, admitted=True)
                    return ticket
                if outcome is Placement.DROPPED:
                    self._take(ticket, admitted=False)
                else:
                    skipped.add(ticket.request_id)
        return None

    def _tickets(self, tenant: str, skipped: set[str]) -> Iterator[Ticket]:
        return (t for t in self._queues[tenant] if t.request_id not in skipped)

    def _take(self, ticket: Ticket, *, admitted: bool) -> None:
        self._by_id.pop(ticket.request_id, None)
        self._queues[ticket.tenant].remove(ticket)
        if admitted:
            self._running[ticket.tenant] = self._running.get(ticket.tenant, 0) + 1
            self._served[ticket.tenant] = self._served.get(ticket.tenant, 0.0) + ticket.cost

    def _active(self, tenant: str) -> bool:
        return bool(self._queues.get(tenant)) or self._running.get(tenant, 0) > 0

    def _floor(self) -> float:
        active = [self._served.get(t, 0.0) for t in set(self._queues) | set(self._running)
                  if self._active(t)]
        return min(active, default=0.0)
