"""Admin commands on a resolved adapter version: prefetch, unload, pin, unpin, resident.

Each command is a small function of the pool that runs on the engine thread (the pool is
engine-thread-only), handed over through the inbox; the caller's thread waits for the
answer. The ref was resolved once, by the caller (`Intake.resolve`), so these take an
`AdapterVersion`. All return a bool and are safe to repeat.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING, Any

from loraplex.errors import DeadlineExceeded, Unavailable
from loraplex.runtime.api.types import ResidentAdapter

if TYPE_CHECKING:
    from loraplex.registry import AdapterVersion
    from loraplex.runtime.lora.pool import AdapterPool


class AdminCommands:
    def __init__(self, pool: Callable[[], AdapterPool | None],
                 submit: Callable[[Callable[[], Any]], Future]) -> None:
        self._pool = pool
        self._submit = submit

    def prefetch(self, version: AdapterVersion, *, wait: bool = True,
                 timeout: float | None = 120.0) -> bool:
        """Bring an adapter into host memory and, if a slot is free or evictable, into a
        slot. True if it was not in a slot before. With `wait`, returns once it is resident
        (raising its load error, e.g. DataCorruption)."""

        def do(pool: AdapterPool) -> tuple[bool, Future]:
            return pool.slot_of(version.digest) is not None, pool.when_resident(version)

        was_in_slot, landed = self._call(do)
        if wait:
            try:
                landed.result(timeout)
            except FutureTimeout:
                raise DeadlineExceeded(f"adapter {version.ref} is still loading after "
                                       f"{timeout}s", field="ref") from None
        return not was_in_slot

    def unload(self, version: AdapterVersion) -> bool:
        """Drop an adapter from slot and host memory (after its running sequences end)."""
        return self._call(lambda pool: pool.remove(version.digest))

    def evict(self, digest: str) -> bool:
        """`unload` by digest, without a version: the registry may have deleted it already
        (the registry follower calls this on `version_deleted`)."""
        return self._call(lambda pool: pool.remove(digest))

    def pin(self, version: AdapterVersion) -> bool:
        """Keep an adapter in a device slot until `unpin` (loads it if needed)."""

        def do(pool: AdapterPool) -> bool:
            pool.check_fits(version)
            pool.ensure_loading(version)
            return pool.pin(version.digest)

        return self._call(do)

    def unpin(self, version: AdapterVersion) -> bool:
        return self._call(lambda pool: pool.unpin(version.digest))

    def resident(self, limit: int | None = None) -> list[ResidentAdapter]:
        """Adapters in a device slot or host memory, slots first, then host copies most
        recently used first; at most `limit` (None: all). Empty once the engine stopped."""
        try:
            return [ResidentAdapter(**d)
                    for d in self._call(lambda pool: pool.resident(limit))]
        except Unavailable:
            return []

    def _call(self, fn: Callable[[AdapterPool], Any], timeout: float | None = 60.0) -> Any:
        pool = self._pool()
        if pool is None:
            raise Unavailable("engine is not running")
        return self._submit(lambda: fn(pool)).result(timeout)
