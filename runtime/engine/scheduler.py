"""Intake: a bounded waiting queue, fair across tenants, with aging.

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

The distinct-adapters-per-step cap is the pool's: a request whose adapter would need a
device slot is not admitted when no slot is empty or evictable (`Residency.spare_slots`),
counted per rank bucket (`Residency.bucket_spare`): an adapter takes a spare slot of the
smallest bucket that holds its rank or of a larger one, as the pool will.

`schedule` decides a whole step from plain data — the pool's `Residency`, the free KV rows,
the running sequences' `RunView`s — and returns a `StepPlan` (see `plan.py`). It calls
nothing outside this module while it holds its lock, so no lock order can invert.

Thread-safety: `push`, `remove`, `__len__` and `waiting` may be called from any thread
(`submit`, `cancel`); `schedule`, `charge`, `finished` from the engine thread. The lock is a
leaf: nothing is called while it is held.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum

from loraplex.errors import Overloaded, ResourceExhausted, quote
from loraplex.runtime.engine.plan import Admit, RunView, StepPlan, compose_batch
from loraplex.runtime.lora.pool import Residency


class Placement(Enum):
    ADMITTED = "admitted"  # a row (and adapter slot) is reserved for it in this plan
    NOT_READY = "not_ready"  # adapter not in memory yet: try others, come back next step
    NO_CAPACITY = "no_capacity"  # no adapter slot / row for it now


@dataclass(frozen=True, eq=False)
class Ticket:
    """A waiting request as the scheduler sees it."""

    request_id: str
    tenant: str
    digest: str | None = None  # its adapter (None: the bare base)
    prompt: Sequence[int] = ()
    enqueued: float = field(default_factory=time.monotonic)
    cost: int = 1  # tokens charged at admission (the prompt); generated ones via charge()
    budget: int = 0  # tokens it may cost in all (prompt + max_new_tokens): per-tenant caps
    deadline: float | None = None  # time.monotonic() seconds


class _Placer:
    """Within one `schedule` call: which waiting requests fit, given the free rows and the
    pool's residency, counting the slots this plan already claimed. Pure bookkeeping."""

    def __init__(self, rows: Sequence[int], residency: Residency) -> None:
        self.rows = list(rows)
        self.res = residency
        # spare slots per rank bucket, smallest rank first
        self.spare = list(residency.bucket_spare) or [residency.spare_slots]
        self.claimed: set[str] = set()  # digests this plan keeps in / brings into a slot
        self.activate: list[str] = []
        self.load: list[str] = []

    def place(self, t: Ticket) -> Placement:
        if not self.rows:
            return Placement.NO_CAPACITY
        d = t.digest
        if d is None or d in self.claimed:
            return Placement.ADMITTED
        bucket = self.res.bucket_of.get(d, 0)
        if d in self.res.in_slot:
            if d not in self.res.busy:  # its slot was counted as evictable
                if self.spare[bucket] <= 0:
                    return Placement.NO_CAPACITY
                self.spare[bucket] -= 1
            self.claimed.add(d)
            return Placement.ADMITTED
        if d in self.res.on_host:
            room = next((k for k in range(bucket, len(self.spare)) if self.spare[k] > 0), None)
            if room is None:
                return Placement.NO_CAPACITY
            self.spare[room] -= 1
            self.claimed.add(d)
            self.activate.append(d)
            return Placement.ADMITTED
        if d not in self.res.loading and d not in self.load:
            self.load.append(d)  # e.g. dropped from host before it got in
        return Placement.NOT_READY


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
                raise ValueError(f"duplicate request id {quote(ticket.request_id)}")
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
            raise ResourceExhausted(f"tenant {quote(ticket.tenant)} already has {len(queue)} "
                                    f"requests waiting (per-tenant limit {cap})",
                                    field="request")
        cap = self.max_waiting_tokens_per_tenant
        if cap is not None:
            queued = sum(t.budget for t in queue)
            if queued + ticket.budget > cap:
                raise ResourceExhausted(f"too many tokens: tenant {quote(ticket.tenant)} would "
                                        f"have {queued + ticket.budget} tokens waiting (prompt + "
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
    def schedule(self, now: float, free_rows: Sequence[int], residency: Residency,
                 running: Sequence[RunView] = (), prefill_budget: int = 512) -> StepPlan:
        """Decide one step: drop waiting requests past their deadline, admit up to
        `len(free_rows)` requests that fit, and compose the batch (`running` then the
        newly admitted, oldest first)."""
        placer = _Placer(free_rows, residency)
        with self._lock:
            dropped = tuple(self._expire(now))
            admitted = self._admit(placer, now)
        views = list(running) + [RunView(a.row, t.prompt, 0, None, len(t.prompt))
                                 for a, t in admitted]
        decode, prefill = compose_batch(views, prefill_budget)
        return StepPlan(admitted=tuple(a for a, _ in admitted), decode=decode,
                        prefill=prefill, activate=tuple(placer.activate),
                        load=tuple(placer.load), dropped=dropped)

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
    def _expire(self, now: float) -> Iterator[str]:
        for t in [t for t in self._by_id.values() if t.deadline is not None and now >= t.deadline]:
            self._take(t, admitted=False)
            yield t.request_id

    def _admit(self, placer: _Placer, now: float) -> list[tuple[Admit, Ticket]]:
        """Aged requests first (one that cannot fit holds everything back), then fair order."""
        admitted: list[tuple[Admit, Ticket]] = []

        def take(t: Ticket) -> None:
            self._take(t, admitted=True)
            admitted.append((Admit(t.request_id, t.tenant, t.digest, placer.rows.pop(0)), t))

        aged = sorted((t for t in self._by_id.values() if now - t.enqueued >= self.aging_s),
                      key=lambda t: t.enqueued)
        skipped: set[str] = set()  # request ids passed over this round
        for t in aged:
            if not placer.rows:
                return admitted
            outcome = placer.place(t)
            if outcome is Placement.ADMITTED:
                take(t)
            elif outcome is Placement.NO_CAPACITY:
                return admitted  # hold everything back until this one fits
            else:
                skipped.add(t.request_id)
        while placer.rows:
            ticket = self._next_fair(skipped, placer)
            if ticket is None:
                break
            take(ticket)
        return admitted

    def _next_fair(self, skipped: set[str], placer: _Placer) -> Ticket | None:
        """Try tenants from the smallest counter up; first placeable request wins."""
        order = sorted((t for t, q in self._queues.items() if q),
                       key=lambda t: (self._served.get(t, 0.0), self._queues[t][0].enqueued))
        for tenant in order:
            for ticket in list(self._tickets(tenant, skipped)):
                if placer.place(ticket) is Placement.ADMITTED:
                    return ticket
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
