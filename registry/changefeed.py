"""The change feed: every version created, alias moved and version deleted, in id order.

    head = reg.latest_change_id()
    for change in reg.wait_for_changes(head, timeout=5.0):   # [] when nothing happened
        ...

Writers add one `lpx_changes` row per event inside their own transaction (`emit`), so a
change is visible exactly when what it describes is. `db.lock_changes` makes ids become
visible in id order on PostgreSQL, so a reader asking for `id > last` never skips one.

Waiting: on PostgreSQL each event also sends `NOTIFY lpx_changes` in the same transaction,
and `ChangeFeed.wait` `LISTEN`s on one connection of its own, so it returns within
milliseconds of the commit. SQLite has no notifications; the feed is re-read every
`RegistrySettings.change_poll_s`. A listen connection that fails is closed and the wait
polls instead; the next wait opens a new one.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from loraplex.registry import db
from loraplex.registry.records import Change
from loraplex.registry.rows import utc

CHANNEL = "lpx_changes"  # PostgreSQL NOTIFY channel of new `lpx_changes` rows

log = logging.getLogger("loraplex.registry")


def emit(conn: Connection, kind: str, tenant: str, name: str, version: int | None,
         alias: str | None, digest: str | None, at: datetime) -> None:
    """Record one event inside the caller's write transaction."""
    db.lock_changes(conn)
    conn.execute(sa.insert(db.changes).values(kind=kind, tenant=tenant, name=name,
                                              version=version, alias=alias, digest=digest,
                                              at=at))
    if conn.dialect.name == "postgresql":  # delivered at commit; waiters wake at once
        conn.execute(sa.text("SELECT pg_notify(:channel, '')"), {"channel": CHANNEL})


def read(engine: Engine, after: int, limit: int) -> list[Change]:
    """Events with id > `after`, oldest first, at most `limit`."""
    with db.read_tx(engine) as conn:
        rows = conn.execute(sa.select(db.changes).where(db.changes.c.id > after)
                            .order_by(db.changes.c.id).limit(limit)).all()
    return [Change(id=r.id, kind=r.kind, tenant=r.tenant, name=r.name, version=r.version,
                   alias=r.alias, digest=r.digest, at=utc(r.at)) for r in rows]


def latest_id(engine: Engine) -> int:
    """The id of the newest event, 0 for an empty feed (one primary-key lookup)."""
    with db.read_tx(engine) as conn:
        return conn.execute(sa.select(sa.func.max(db.changes.c.id))).scalar() or 0


class ChangeFeed:
    """Waits for events: LISTEN/NOTIFY on PostgreSQL, polling on SQLite. Thread-safe: one
    caller at a time listens, any other concurrent caller polls."""

    def __init__(self, engine: Engine, poll_s: float) -> None:
        self.engine = engine
        self.poll_s = poll_s
        self.notified = engine.dialect.name == "postgresql"
        self._lock = threading.Lock()
        self._listener: Any = None  # psycopg connection LISTENing on CHANNEL
        self._closed = False

    def wait(self, after: int, timeout: float, limit: int) -> list[Change]:
        """Events after `after`, as soon as there is at least one, or [] after `timeout`
        seconds."""
        deadline = time.monotonic() + max(0.0, timeout)
        locked = self.notified and self._lock.acquire(blocking=False)
        listening = locked
        try:
            while True:
                if listening:  # LISTEN before reading: no NOTIFY falls between the two
                    listening = not self._closed and self._listen()
                batch = read(self.engine, after, limit)
                left = deadline - time.monotonic()
                if batch or left <= 0:
                    return batch
                if not (listening and self._await_notify(left)):
                    time.sleep(min(self.poll_s, left))
        finally:
            if locked:
                if self._closed:
                    self._drop_listener()
                self._lock.release()

    def close(self) -> None:
        """Close the LISTEN connection now, or, while a wait holds it, when that wait
        returns (closing never waits for a waiter's timeout)."""
        self._closed = True
        if self._lock.acquire(blocking=False):
            try:
                self._drop_listener()
            finally:
                self._lock.release()

    def _listen(self) -> bool:
        """Ensure the LISTEN connection; False (poll instead) when it cannot be opened."""
        if self._listener is not None:
            return True
        try:
            import psycopg

            url = self.engine.url.set(drivername="postgresql")
            conn = psycopg.connect(url.render_as_string(hide_password=False),
                                   autocommit=True)
            conn.execute(f"LISTEN {CHANNEL}")
        except Exception:  # noqa: BLE001 - the database may be down: poll this time
            log.warning("change feed: cannot LISTEN on %s; polling",
                        self.engine.url.render_as_string(hide_password=True), exc_info=True)
            return False
        self._listener = conn
        return True

    def _await_notify(self, timeout: float) -> bool:
        """Block until a NOTIFY arrives or `timeout` passes; False if the listen
        connection failed (it is dropped, the caller polls)."""
        try:
            for _ in self._listener.notifies(timeout=timeout, stop_after=1):
                pass
            return True
        except Exception:  # noqa: BLE001 - a lost listen connection: poll, reopen next time
            log.warning("change feed: LISTEN connection lost; polling", exc_info=True)
            self._drop_listener()
            return False

    def _drop_listener(self) -> None:
        if self._listener is not None:
            try:
                self._listener.close()
            except Exception:  # noqa: BLE001, S110 - closing a broken connection
                pass
            self._listener = None
