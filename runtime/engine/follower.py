"""Replicas follow the registry's change feed, so a fleet acts on one registry as one server.

    follower = RegistryFollower(registry, engine=engine, prefetch_aliases=("prod",)).start()
    ...
    follower.stop()

Every replica shares the registry (PostgreSQL + S3); each one tails its `changes` table.
Requests already resolve their ref at submission, so what a replica must still learn is
what it holds on its own: an adapter whose version was deleted is evicted from the pool
(it stops serving here and its memory is freed), a ref-resolution cache, if the server
keeps one, forgets the adapter's entries when an alias moves, and a version just promoted
to a watched alias (`prefetch_aliases`, e.g. `prod`; `latest` means every new version) is
loaded before the first request for it arrives.

How changes arrive: on PostgreSQL the registry sends `NOTIFY lpx_changes` in the same
transaction as each event row, and the follower `LISTEN`s on its own connection, so it
wakes within milliseconds of the commit; it still reads `changes(after)` at least every
`poll_s`, which covers a lost listen connection. On SQLite (one machine) it polls every
`poll_s`. Either way, the feed is read in id order and a change is acted on once.

What to do for a change is a pure function (`actions_for`), tested with literal cases; the
thread only fetches changes and carries those actions out.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import sqlalchemy as sa

from loraplex.errors import LoraplexError
from loraplex.registry import Change, Identity, db
from loraplex.registry.refs import LATEST
from loraplex.registry.registry import CHANGES_CHANNEL

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
    """Tails `registry.changes()` on a daemon thread and applies `actions_for` each change.

    `engine` (evict/prefetch) and `invalidate` (the server's resolution cache, keyed by
    `t/n`) are both optional; the thread never raises: a registry that does not answer is
    logged and read again on the next round, from where it left off."""

    def __init__(self, registry: Any, *, engine: Any = None,
                 invalidate: Callable[[str], None] | None = None,
                 prefetch_aliases: Iterable[str] = (), poll_s: float = 0.5,
                 listen: bool = True) -> None:
        self.registry = registry
        self.engine = engine
        self.invalidate = invalidate
        self.prefetch_aliases = frozenset(prefetch_aliases)
        self.poll_s = poll_s
        self.listen = listen and registry.engine.dialect.name == "postgresql"
        self.position = 0  # id of the last change acted on
        self.applied = 0  # changes acted on since start (tests, debugging)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._listener: Any = None

    def start(self) -> RegistryFollower:
        """Begin at the feed's head: a server that just started holds nothing stale."""
        self.position = self._head()
        self._thread = threading.Thread(target=self._run, name="loraplex-follower",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._close_listener()

    def catch_up(self) -> int:
        """Act on every change after `position`; the number acted on."""
        done = 0
        while True:
            batch = self.registry.changes(self.position)
            for change in batch:
                self._apply(change)
                self.position = change.id
                done += 1
            if len(batch) == 0:
                self.applied += done
                return done

    # -- the thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.catch_up()
            except Exception:  # noqa: BLE001 - the registry may be down: say so, retry
                log.warning("registry follower: reading changes failed; retrying",
                            exc_info=True)
            self._wait()

    def _wait(self) -> None:
        """Until a NOTIFY arrives (PostgreSQL) or `poll_s` passes, or stop."""
        if not self.listen:
            self._stop.wait(self.poll_s)
            return
        try:
            conn = self._listener or self._open_listener()
            for _ in conn.notifies(timeout=self.poll_s, stop_after=1):
                pass
        except Exception:  # noqa: BLE001 - a lost listen connection: poll, reconnect later
            log.warning("registry follower: LISTEN connection lost; polling", exc_info=True)
            self._close_listener()
            self._stop.wait(self.poll_s)

    def _open_listener(self) -> Any:
        import psycopg

        url = self.registry.engine.url.set(drivername="postgresql")
        conn = psycopg.connect(url.render_as_string(hide_password=False), autocommit=True)
        conn.execute(f"LISTEN {CHANGES_CHANNEL}")
        self._listener = conn
        return conn

    def _close_listener(self) -> None:
        if self._listener is not None:
            try:
                self._listener.close()
            except Exception:  # noqa: BLE001, S110 - closing a broken connection
                pass
            self._listener = None

    def _head(self) -> int:
        with db.read_tx(self.registry.engine) as conn:
            return conn.execute(sa.select(sa.func.max(db.changes.c.id))).scalar() or 0

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
