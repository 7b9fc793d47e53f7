"""One reader of the registry's change feed for every `WatchAdapters` stream of a server.

    hub = ChangeHub(registry, stop_check_s=0.5)
    async for change in hub.follow(after_id, stop=lambda: state.draining):
        ...

A stream reads the feed incrementally. It first reads the changes after its `after_id`,
a page at a time (`registry.changes(after)`), until it has caught up with the hub; from then
on the hub hands it each new change as the hub reads it. The hub is one task that waits on
`registry.wait_for_changes(position)` in a worker thread: PostgreSQL wakes it by NOTIFY
within milliseconds of the commit, SQLite is re-read every `change_poll_s`. Every read asks
only for the changes after the last one read, so a watcher never re-reads the feed from
its start, and a thousand watchers cost one waiting thread and one LISTEN connection. A
thread per watcher would hold the worker threads that admission and registry reads need.

A watcher too slow to take what the hub hands it (its queue is full) drops back to reading
the feed itself from its last change, then rejoins the hub. Changes reach each watcher in
id order, once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

QUEUE_SIZE = 10_000  # changes a watcher may fall behind the hub before it reads for itself
PAGE = 1000  # changes per catch-up read
WAIT_S = 1.0  # one wait of the hub's; a change ends it at once, so this only bounds how
# long a read abandoned by a stopped hub keeps its worker thread


@dataclass(eq=False)
class _Watcher:
    start: int  # the hub's position when it joined: the hub hands it every change after it
    queue: asyncio.Queue = field(default_factory=lambda: asyncio.Queue(QUEUE_SIZE))
    lagging: bool = False  # its queue overflowed: it catches up from the feed again


class ChangeHub:
    """Fans the registry's change feed out to the watchers of one event loop."""

    def __init__(self, registry: Any, *, stop_check_s: float) -> None:
        self.registry = registry
        self.stop_check_s = stop_check_s
        self.position = 0  # id of the last change the hub read
        self._watchers: set[_Watcher] = set()
        self._task: asyncio.Task | None = None
        self._starting = asyncio.Lock()

    async def follow(self, after: int, stop: Callable[[], bool]) -> AsyncIterator[Any]:
        """The changes with id > `after`, in id order, as they happen, until `stop()`
        (checked at least every `stop_check_s`)."""
        while not stop():
            w = await self._join()
            try:
                while after < w.start and not stop():  # catch up, a page at a time
                    batch = await asyncio.to_thread(self.registry.changes, after, limit=PAGE)
                    if not batch:
                        break
                    for change in batch:
                        after = change.id
                        yield change
                while not stop() and not w.lagging:
                    try:
                        change = await asyncio.wait_for(w.queue.get(), self.stop_check_s)
                    except TimeoutError:
                        continue
                    if change.id > after:
                        after = change.id
                        yield change
            finally:
                self._leave(w)

    async def _join(self) -> _Watcher:
        async with self._starting:
            if self._task is None or self._task.done():
                self.position = await asyncio.to_thread(self.registry.latest_change_id)
                self._task = asyncio.get_running_loop().create_task(self._run())
            w = _Watcher(start=self.position)  # no await between reading and joining
            self._watchers.add(w)
            return w

    def _leave(self, w: _Watcher) -> None:
        """The last watcher gone, the hub stops at once (its read in flight, at most
        `WAIT_S`, finishes in its thread and is dropped), so no task outlives the server."""
        self._watchers.discard(w)
        if not self._watchers and self._task is not None:
            self._task.cancel()
            self._task = None

    async def _run(self) -> None:
        """Read the feed while anyone watches; hand each change to every watcher."""
        while self._watchers:
            try:
                batch = await asyncio.to_thread(self.registry.wait_for_changes,
                                                self.position, WAIT_S)
            except Exception:  # noqa: BLE001 - the registry may be down: say so, retry
                log.warning("change hub: reading the change feed failed; retrying",
                            exc_info=True)
                await asyncio.sleep(WAIT_S)
                continue
            if not batch:
                continue
            self.position = batch[-1].id
            for w in list(self._watchers):
                for change in batch:
                    try:
                        w.queue.put_nowait(change)
                    except asyncio.QueueFull:
                        w.lagging = True
                        break
