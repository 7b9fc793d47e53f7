"""Replicas follow the registry's change feed, so a fleet acts on one registry as one server.

    follower = RegistryFollower(registry, engine=engine, prefetch_aliases=("prod",)).start()
    ...
    follower.stop()

Every replica shares the registry (PostgreSQL + S3); each one follows its change feed.
Requests already resolve their ref at submission, so what a replica must still learn is
what it holds on its own: an adapter whose version was deleted is evicted from the pool
(it stops serving here and its memory is freed), a ref-resolution cache, if the server
keeps one, forgets the adapter's entries when an alias moves, and a version just promoted
to a watched alias (`prefetch_aliases`, e.g. `prod`; `latest` means every new version) is
loaded before the first request for it arrives.

How changes arrive: the registry's `wait_for_changes(position, timeout=poll_s)` returns
as soon as there is a change after `position` (PostgreSQL wakes it by NOTIFY within
milliseconds of the commit; SQLite is polled), or an empty list after `poll_s`. Either
way, the feed is read in id order and a change is acted on once.

What to do for a change is a pure function (`actions_for`), tested with literal cases; the
thread only fetches changes and carries those actions out.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from loraplex.errors import LoraplexError
from loraplex.registry import Change, Identity
from loraplex.registry.refs import LATEST

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Action:
    """One thing a replica does about a change: forget a key, evict a digest, prefetch a ref."""

    kind: Literal["invalidate", "evict", "prefetch"]
    target: str  # invalidate: `t/n`; evict: `sha256:…`; prefetch: a pinned `t/n:vN`


def actions_for(change: Change, prefetch_aliases: frozenset[str]) -> list[Action]:
    """What a replica does about `change` (see the module docstring)."""
    key = f"{change.tenant}/{change.name}"
    actions = [Action("invalidate", key)]  # every kind changes what some ref of `key` names
    if change.kind == "version_deleted" and change.digest:
        actions.append(Action("evict", change.digest))
    promoted = (change.kind == "alias_moved" and change.alias in prefetch_aliases) or \
        (change.kind == "version_created" and LATEST in prefetch_aliases)
    if promoted and change.version is not None:
        actions.append(Action("prefetch", f"{key}:v{change.version}"))
    return actions


class RegistryFollower:
    """Follows `registry.wait_for_changes()` on a daemon thread, applying `actions_for`.

    `engine` (evict/prefetch) and `invalidate` (the server's resolution cache, keyed by
    `t/n`) are both optional; the thread never raises: a registry that does not answer is
    logged and read again on the next round, from where it left off."""

    def __init__(self, registry: Any, *, engine: Any = None,
                 invalidate: Callable[[str], None] | None = None,
                 prefetch_aliases: Iterable[str] = (), poll_s: float = 0.5) -> None:
        self.registry = registry
        self.engine = engine
        self.invalidate = invalidate
        self.prefetch_aliases = frozenset(prefetch_aliases)
        self.poll_s = poll_s
        self.listen = bool(registry.changes_notify)  # woken by the database, not polling
        self.position = 0  # id of the last change acted on
        self.applied = 0  # changes acted on since start (tests, debugging)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> RegistryFollower:
        """Begin at the feed's head: a server that just started holds nothing stale."""
        self.position = self.registry.latest_change_id()
        self._thread = threading.Thread(target=self._run, name="loraplex-follower",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread; it notices within `poll_s`."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- the thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._apply_all(self.registry.wait_for_changes(self.position, self.poll_s))
            except Exception:  # noqa: BLE001 - the registry may be down: say so, retry
                log.warning("registry follower: reading changes failed; retrying",
                            exc_info=True)
                self._stop.wait(self.poll_s)

    def _apply_all(self, batch: list[Change]) -> int:
        for change in batch:
            self._apply(change)
            self.position = change.id
            self.applied += 1
        return len(batch)

    def _apply(self, change: Change) -> None:
        for action in actions_for(change, self.prefetch_aliases):
            try:
                self._do(action)
            except LoraplexError as e:  # e.g. an adapter for another base: not ours to serve
                log.info("registry follower: %s %s skipped: %s", action.kind, action.target, e)

    def _do(self, action: Action) -> None:
        if action.kind == "invalidate":
            if self.invalidate is not None:
                self.invalidate(action.target)
        elif self.engine is None or not self.engine.ready:
            return
        elif action.kind == "evict":
            self.engine.evict(action.target)
        elif action.kind == "prefetch":
            self.engine.prefetch(Identity.system(), action.target, wait=False)
