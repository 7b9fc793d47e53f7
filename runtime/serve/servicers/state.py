"""What every servicer shares: the engine, the registry, the settings and the serving state.

Readiness and draining are read from the engine — the one place they live (`Engine.ready`,
`Engine.draining`, flipped by `Engine.start` and `Engine.drain`) — so health, intake and
a SIGTERM drain can never disagree. Only a registry-only server (no engine) keeps its own
draining flag, since nothing else could hold it.

Heavy registry work (uploads, merges, compression) runs on `heavy`, a pool of its own
(`registry_workers` threads at the Linux nice value `registry_nice`), so a flood of it
queues there, and yields the CPU to the engine, while authentication, intake and light
registry reads keep the default executor to themselves. `WorkGate`s bound the uploads and
the derivations (merge, compress) in progress, all tenants together and per tenant.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from loraplex.errors import ResourceExhausted, Unavailable, quote
from loraplex.runtime.api.surface import EngineClient

T = TypeVar("T")
RETRY_S = 5.0


class WorkGate:
    """How many calls of one kind (`what`: "uploads", "derivations") may be in progress:
    `total` in all, `per_tenant` for one tenant. A call past either bound is refused at
    once (RESOURCE_EXHAUSTED with a retry delay): a waiting upload would hold its stream,
    and its memory, open anyway, and a waiting merge its caller's thread."""

    def __init__(self, total: int, per_tenant: int, what: str = "uploads") -> None:
        self.total, self.per_tenant, self.what = total, per_tenant, what
        self._lock = threading.Lock()
        self._by_tenant: dict[str, int] = {}

    @property
    def in_progress(self) -> int:
        with self._lock:
            return sum(self._by_tenant.values())

    @contextmanager
    def hold(self, tenant: str) -> Iterator[None]:
        with self._lock:
            mine = self._by_tenant.get(tenant, 0)
            if sum(self._by_tenant.values()) >= self.total:
                raise _busy(f"{self.total} {self.what} are in progress (the server's limit)")
            if mine >= self.per_tenant:
                raise _busy(f"tenant {quote(tenant)} has {mine} {self.what} in progress (the "
                            f"per-tenant limit)")
            self._by_tenant[tenant] = mine + 1
        try:
            yield
        finally:
            with self._lock:
                n = self._by_tenant[tenant] - 1
                if n:
                    self._by_tenant[tenant] = n
                else:
                    del self._by_tenant[tenant]


def _busy(why: str) -> ResourceExhausted:
    e = ResourceExhausted(f"{why}; retry when one finishes", field="request")
    e.retry_after_s = RETRY_S  # type: ignore[attr-defined]  # RetryInfo (grpc_errors)
    return e


def _lower_priority(nice: int) -> None:
    """A heavy-pool thread's Linux nice value (per thread): the engine thread wins the CPU."""
    if nice <= 0:
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except (AttributeError, OSError):  # not Linux, or not permitted: normal priority
        pass


@dataclass
class ServingState:
    registry: Any  # loraplex.registry.Registry
    engine: EngineClient | None  # Engine or fleet's RayEngine; None: registry-only server
    settings: Any  # ServerSettings
    base_fingerprint: Any | None = None  # BaseFingerprint of the served base, once known
    _registry_only_draining: bool = False
    _heavy: ThreadPoolExecutor | None = None
    memory: Any | None = None  # memory.MemoryTrimmer: asked to trim after heavy work
    uploads: WorkGate = field(default_factory=lambda: WorkGate(4, 2, "uploads"))
    derivations: WorkGate = field(default_factory=lambda: WorkGate(2, 1, "derivations"))

    def __post_init__(self) -> None:
        settings = self.settings
        if settings is not None and hasattr(settings, "max_concurrent_uploads"):
            self.uploads = WorkGate(settings.max_concurrent_uploads,
                                    settings.max_uploads_per_tenant, "uploads")
            self.derivations = WorkGate(settings.max_concurrent_derivations,
                                        settings.max_derivations_per_tenant,
                                        "merges/compressions")

    async def run_heavy(self, fn: Callable[..., T], /, *args: Any, **kw: Any) -> T:
        """`fn(*args, **kw)` on the heavy-registry pool (context variables carried over)."""
        if self._heavy is None:
            workers = getattr(self.settings, "registry_workers", 4)
            nice = getattr(self.settings, "registry_nice", 0)
            self._heavy = ThreadPoolExecutor(workers, thread_name_prefix="loraplex-registry",
                                             initializer=_lower_priority, initargs=(nice,))
        call = functools.partial(contextvars.copy_context().run, fn, *args, **kw)
        return await asyncio.get_running_loop().run_in_executor(self._heavy, call)

    def released(self) -> None:
        """Heavy work ended (an upload, a merge): its buffers are free, give them back."""
        if self.memory is not None:
            self.memory.request()

    def close(self) -> None:
        if self.memory is not None:
            self.memory.stop()
        if self._heavy is not None:
            self._heavy.shutdown(wait=False, cancel_futures=True)
            self._heavy = None

    @property
    def ready(self) -> bool:
        """The engine has loaded the base and is not stopped (it may be draining)."""
        return self.engine is not None and bool(self.engine.ready)

    @property
    def draining(self) -> bool:
        if self.engine is not None:
            return bool(self.engine.draining)
        return self._registry_only_draining

    def begin_drain(self) -> None:
        """Stop admitting new work now (in-flight requests keep running): the engine's
        `drain` with no wait, which flips `engine.draining` before it returns."""
        if self.engine is not None:
            self.engine.drain(0.0)
        else:
            self._registry_only_draining = True

    def require_engine(self) -> EngineClient:
        """The engine, if this server may admit generation work now."""
        if self.draining:
            raise Unavailable("server is draining; retry on another replica")
        if self.engine is None:
            raise Unavailable("this server has no engine (registry-only)")
        if not self.ready:
            raise Unavailable("the base model is still loading; retry shortly")
        return self.engine
