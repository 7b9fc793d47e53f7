"""The adapter pool: device slots over a host LRU over the registry, keyed by digest.

Tiers, fastest first:
- device: slots of pre-allocated stacked tensors in every LoRA layer, in rank buckets
  (`SlotLayout`, runtime/api/slots.py); bringing an adapter in is a `copy_` into a free slot
  (`write_slot`), nothing is allocated. An adapter goes into the smallest bucket that holds
  its largest rank and has room, else the next larger one (`_free_slot`). A slot used by a
  running sequence (`refs > 0`) or pinned is never evicted; otherwise the least recently
  used slot of that bucket makes room.
- host: recently used adapters' tensors in memory, LRU, bounded by `host_cache_bytes` (see
  "The host bound" below). An adapter that requests are waiting for is never dropped
  before it reaches a slot.
- registry: `load_fn(version)` (read, digest check, prepare) on loader threads, so a cold
  load never runs on the engine thread; `poll()` collects what finished. The loader threads
  and the CUDA copy stream are in `loading.py`; this module keeps the tiers.

The host bound is strict: host bytes held plus bytes reserved for loads in flight never
exceed `host_cache_bytes`. A load reserves `host_bytes_of(version)` (an upper bound of what
it will hold) before it starts, evicting least recently used host copies that nothing waits
for to make room; when there is no room yet, the load waits in a FIFO queue (back-pressure:
its requests stay queued) and starts as soon as room frees up. An adapter larger than the
whole bound can never be held and is refused (FailedPrecondition). A load that lands
bigger than its reservation (a DoRA adapter's factors) takes the difference from the tier
or goes back to the queue with its real size. `host_peak_bytes` records the highest
held + reserved total ever reached, so that tests and benchmarks check the bound from the
pool's own accounting.

Everything but `load_fn` runs on the engine thread: no locks. `add/activate/remove`-style
calls return a bool and are safe to repeat. All evictions go through `_evict`.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

from loraplex.errors import FailedPrecondition, LoraplexError, ResourceExhausted, Unavailable
from loraplex.limits import MAX_RANK
from loraplex.runtime.api.observer import EngineObserver, notify
from loraplex.runtime.api.slots import SlotLayout
from loraplex.runtime.lora.loading import HostAdapter, LoaderThreads, copy_stream

if TYPE_CHECKING:
    from loraplex.registry import AdapterVersion

log = logging.getLogger(__name__)


@dataclass
class _Slot:
    digest: str | None = None
    ref: str = ""
    refs: int = 0  # running sequences using it
    pinned: bool = False
    last_used: float = 0.0
    nbytes: int = 0  # the adapter's tensors (what its host copy holds)


@dataclass(frozen=True)
class Residency:
    """What the pool holds at the start of a step (digests): the snapshot the scheduler
    decides from, without asking the pool anything while it decides."""

    in_slot: frozenset[str] = frozenset()  # in a device slot
    busy: frozenset[str] = frozenset()  # in a slot that cannot be evicted (in use or pinned)
    on_host: frozenset[str] = frozenset()  # in host memory, ready to copy into a slot
    loading: frozenset[str] = frozenset()  # being read from the registry, or queued for room
    spare_slots: int = 0  # slots a new adapter could take now: empty + evictable
    # the same per rank bucket, smallest rank first (empty: one bucket, `spare_slots`)
    bucket_spare: tuple[int, ...] = ()
    # digest -> rank bucket: of its slot (in a slot), else the smallest that holds it (on
    # host); absent = 0. An adapter takes a spare slot of its bucket or of a larger one.
    bucket_of: Mapping[str, int] = field(default_factory=dict)


class SlotRequest(Protocol):
    """A request that needs its adapter in a slot this step (the engine's `plan.Admit`)."""

    request_id: str
    digest: str | None  # None: the bare base, slot 0


@dataclass
class LoadFailure:
    digest: str
    error: LoraplexError


@dataclass(frozen=True)
class TierBytes:
    """The pool's byte accounting at one moment (engine thread; read by `stats()`)."""

    device: int  # tensors of the adapters in device slots
    host: int  # host copies held
    loading: int  # reserved for loads in flight
    limit: int  # host + loading never exceed it
    peak: int  # the highest host + loading ever reached
    host_adapters: int  # adapters with a host copy
    queued: int  # loads waiting for host room


@dataclass(frozen=True)
class Activation:
    """What `activate_for` did: the slot of every admitted request's adapter, and the
    adapters that could not be put into a slot (their requests fail with that error)."""

    slots: dict[str, int]  # request id -> adapter slot (0: no adapter)
    failed: dict[str, LoraplexError]  # request id -> why its adapter could not be activated


class AdapterPool:
    def __init__(self, *, max_slots: int | None = None, host_cache_bytes: int,
                 load_fn: Callable[[AdapterVersion], HostAdapter],
                 write_slot: Callable[[int, HostAdapter], None],
                 host_bytes_of: Callable[[AdapterVersion], int] = lambda v: v.size_bytes,
                 clear_slot: Callable[[int], None],
                 loader_threads: int = 2,
                 loader_nice: int = 0,
                 observer: EngineObserver | None = None,
                 on_loaded: Callable[[], None] | None = None,
                 device: torch.device | None = None,
                 layout: SlotLayout | None = None) -> None:
        """`layout`: the layers' rank buckets; None = one bucket of `max_slots` slots."""
        if layout is None:
            if max_slots is None:
                raise ValueError("AdapterPool needs max_slots or a layout")
            layout = SlotLayout.single(max_slots, MAX_RANK)
        elif max_slots is not None and max_slots != layout.max_slots:
            raise ValueError(f"max_slots {max_slots} differs from the layout's "
                             f"{layout.max_slots}")
        self.layout = layout
        self.max_slots = max_slots = layout.max_slots
        self.host_cache_bytes = host_cache_bytes
        self._write_slot = write_slot
        self._clear_slot = clear_slot
        self._observer = observer or EngineObserver()
        self._loading = LoaderThreads(
            load_fn, threads=loader_threads, nice=loader_nice,
            on_done=on_loaded or (lambda: None),
            on_load_time=lambda s: self._notify("on_adapter_load", "registry", s))
        self._slots = [_Slot() for _ in range(max_slots + 1)]  # index 0 = no adapter, unused
        self._slot_of: dict[str, int] = {}  # digest -> slot
        self._host: OrderedDict[str, HostAdapter] = OrderedDict()  # LRU, oldest first
        self._host_need: dict[str, int] = {}  # digest -> smallest rank bucket that holds it
        self._wanted: dict[str, int] = {}  # digest -> waiting requests that need it
        self._pin_wanted: set[str] = set()  # pinned before it reached a slot
        self._drop_when_idle: set[str] = set()  # unloaded while in use
        self._landing: dict[str, list[Future]] = {}  # prefetch waiters, by digest
        self._host_bytes = 0
        self._device_bytes = 0
        self._host_bytes_of = host_bytes_of
        self._reserved: dict[str, int] = {}  # digest -> bytes reserved for its load in flight
        self._reserved_bytes = 0
        self._queued: OrderedDict[str, tuple[AdapterVersion, int]] = OrderedDict()  # FIFO
        self._refused: list[LoadFailure] = []  # too big for the tier: reported by `poll`
        self.host_peak_bytes = 0
        # CUDA: host->slot copies (from the pinned host tier) on their own stream
        self._copy_stream = (torch.cuda.Stream(device) if device is not None
                             and device.type == "cuda" else None)

    # -- queries ---------------------------------------------------------------------------
    def slot_of(self, digest: str) -> int | None:
        return self._slot_of.get(digest)

    def is_loading(self, digest: str) -> bool:
        """Being read from the registry, or queued until the host tier has room for it."""
        return digest in self._loading or digest in self._queued

    def on_host(self, digest: str) -> bool:
        return digest in self._host

    @property
    def loading(self) -> int:
        return len(self._loading) + len(self._queued)

    @property
    def slots_used(self) -> int:
        return len(self._slot_of)

    @property
    def host_bytes(self) -> int:
        return self._host_bytes

    def tier_bytes(self) -> TierBytes:
        """Counters only (no iteration): any thread may read them while the engine runs."""
        return TierBytes(device=self._device_bytes, host=self._host_bytes,
                         loading=self._reserved_bytes,
                         limit=self.host_cache_bytes, peak=self.host_peak_bytes,
                         host_adapters=len(self._host), queued=len(self._queued))

    def residency(self) -> Residency:
        """A snapshot for the scheduler (see `Residency`)."""
        busy = {d for d, i in self._slot_of.items()
                if self._slots[i].refs > 0 or self._slots[i].pinned}
        spare = [sum(1 for i in b.slots if self._spare(i)) for b in self.layout.buckets]
        bucket_of: dict[str, int] = {}
        if len(spare) > 1:
            bucket_of = dict(self._host_need)
            bucket_of.update((d, self.layout.bucket_of_slot(i))
                             for d, i in self._slot_of.items())
        return Residency(in_slot=frozenset(self._slot_of), busy=frozenset(busy),
                         on_host=frozenset(self._host),
                         loading=self._loading.digests() | frozenset(self._queued),
                         spare_slots=sum(spare), bucket_spare=tuple(spare),
                         bucket_of=bucket_of)

    def resident(self, limit: int | None = None) -> list[dict]:
        """One dict per adapter held in a slot or in host memory (see ResidentAdapter):
        device slots first (by slot), then host copies, most recently used first; at most
        `limit` of them (None: all)."""
        order = [*sorted(self._slot_of, key=self._slot_of.__getitem__),
                 *(d for d in reversed(self._host) if d not in self._slot_of)]
        out = []
        for digest in order[:limit]:
            slot = self._slot_of.get(digest)
            s = self._slots[slot] if slot else None
            host = self._host.get(digest)
            out.append(dict(digest=digest, ref=(s.ref if s else host.ref), slot=slot,
                            on_host=host is not None,
                            pinned=bool(s and s.pinned) or digest in self._pin_wanted,
                            active_sequences=s.refs if s else 0,
                            size_bytes=host.nbytes if host else s.nbytes))
        return out

    # -- loading ---------------------------------------------------------------------------
    def want(self, version: AdapterVersion) -> None:
        """A request needs this adapter: count it and start a load if it is not at hand."""
        d = version.digest
        self._wanted[d] = self._wanted.get(d, 0) + 1
        self.ensure_loading(version)

    def unwant(self, digest: str) -> None:
        n = self._wanted.get(digest, 0) - 1
        if n > 0:
            self._wanted[digest] = n
        else:
            self._wanted.pop(digest, None)

    def ensure_loading(self, version: AdapterVersion) -> bool:
        """Start a registry load unless the adapter is in a slot, on host, loading or
        queued; the load waits in the queue while the host tier has no room for it. An
        adapter larger than the whole tier is refused: its waiters fail at the next `poll`."""
        d = version.digest
        if d in self._slot_of or d in self._host or self.is_loading(d):
            if d in self._slot_of:
                self._observer_cache("hit", "device")
            elif d in self._host:
                self._observer_cache("hit", "host")
            return False
        self._observer_cache("miss", "host")
        need = self._host_bytes_of(version)
        if need > self.host_cache_bytes:
            self._refuse(d, too_big(version, need, self.host_cache_bytes))
            return False
        self._queued[d] = (version, need)
        self._start_queued()
        return True

    def check_fits(self, version: AdapterVersion) -> None:
        """Raise the FailedPrecondition `ensure_loading` would report for an adapter the
        host tier can never hold (admin calls say so at once)."""
        need = self._host_bytes_of(version)
        if need > self.host_cache_bytes:
            raise too_big(version, need, self.host_cache_bytes)

    def when_resident(self, version: AdapterVersion) -> Future:
        """Load if needed; the future completes (True) once the adapter is on host, having
        been put into a slot if one is free or evictable, or fails with the load error."""
        fut: Future = Future()
        self.check_fits(version)
        d = version.digest
        if d in self._slot_of or d in self._host:
            self.ensure_loading(version)  # counts the hit
            self.activate(d)
            fut.set_result(True)
        else:
            self._landing.setdefault(d, []).append(fut)
            self.ensure_loading(version)
        return fut

    def poll(self) -> list[LoadFailure]:
        """Collect finished loads into the host tier, start queued loads the tier has room
        for now; return the loads that failed or were refused."""
        failures, self._refused = self._refused, []
        for job in self._loading.finished():
            d = job.version.digest
            reserved = self._unreserve(d)
            try:
                host = job.future.result()
            except Exception as e:  # noqa: BLE001 - a failed load fails only its requests
                if not isinstance(e, LoraplexError):
                    log.error("loading adapter %s failed", job.version.ref, exc_info=e)
                    e = _internal(e)
                failures.append(LoadFailure(d, e))
                self._fail_landing(d, e)
                continue
            if not self._admit_host(job.version, host, reserved):
                continue
            self._host_need[d] = self._need(host) or 0  # (None: refused at activation)
            waiters = self._landing.pop(d, [])
            if d in self._pin_wanted or waiters:
                self.activate(d)
            for fut in waiters:
                fut.set_result(True)
        self._start_queued()
        return failures

    def _admit_host(self, version: AdapterVersion, host: HostAdapter, reserved: int) -> bool:
        """Put a landed load into the host tier within the bound. One bigger than its
        reservation takes the difference from evictable host copies; failing that, it
        is dropped and queued again with its real size (False)."""
        d = version.digest
        if host.nbytes > reserved and not self._make_room(host.nbytes):
            if host.nbytes > self.host_cache_bytes:
                self._refuse(d, too_big(version, host.nbytes, self.host_cache_bytes))
            else:
                self._queued[d] = (version, host.nbytes)
            return False
        self._host[d] = host
        self._host_bytes += host.nbytes
        self._note_peak()
        return True

    # -- device slots ----------------------------------------------------------------------
    def activate(self, digest: str) -> int | None:
        """Put a host-resident adapter into a slot (or find it there); None if it cannot be
        placed now (not on host, or every slot in use or pinned)."""
        slot = self._slot_of.get(digest)
        if slot is not None:
            self._slots[slot].last_used = time.monotonic()
            return slot
        host = self._host.get(digest)
        if host is None:
            return None
        need = self._need(host)
        if need is None:  # the host loader checks every rank: only a bug gets here
            raise FailedPrecondition(f"adapter {host.ref} has rank {host.max_rank}; this "
                                     f"engine serves up to max_rank {self.layout.max_rank}",
                                     field="adapter")
        slot = self._free_slot(need)
        if slot is None:
            return None
        t0 = time.monotonic()
        try:
            with copy_stream(self._copy_stream):
                self._write_slot(slot, host)  # copy_ into the pre-allocated stacks
        except Exception:
            self._clear_slot(slot)  # leave no half-written slot behind
            self._evict(digest, "host")  # and no host copy that cannot be placed
            raise
        self._notify("on_adapter_load", "host", time.monotonic() - t0)
        s = self._slots[slot]
        s.digest, s.ref, s.refs, s.last_used = digest, host.ref, 0, time.monotonic()
        s.nbytes = host.nbytes
        self._device_bytes += host.nbytes
        s.pinned = digest in self._pin_wanted
        self._pin_wanted.discard(digest)
        self._slot_of[digest] = slot
        self._host.move_to_end(digest)
        return slot

    def activate_for(self, requests: Iterable[SlotRequest]) -> Activation:
        """Hold a slot for every request joining the batch: adapters already in a slot first (so
        no copy below can evict them), then host -> slot copies. A copy that raises fails
        only the requests of that adapter (the pool leaves no half-written slot behind)."""
        slots: dict[str, int] = {}
        failed: dict[str, LoraplexError] = {}
        errors: dict[str, LoraplexError] = {}
        order = sorted(requests, key=lambda a: a.digest not in self._slot_of)
        for a in order:
            if a.digest is None:
                slots[a.request_id] = 0
                continue
            if a.digest in errors:
                failed[a.request_id] = errors[a.digest]
                continue
            try:
                slot = self.acquire(a.digest)
            except Exception as e:  # noqa: BLE001 - this adapter cannot go in: fail its requests
                log.exception("activating adapter %s failed", a.digest)
                errors[a.digest] = e if isinstance(e, LoraplexError) else LoraplexError(
                    f"adapter {a.digest[:19]} could not be activated: {type(e).__name__}")
                failed[a.request_id] = errors[a.digest]
                continue
            if slot is None:  # the plan's slot accounting disagrees with the pool: a bug
                failed[a.request_id] = Unavailable("no adapter slot free; retry",
                                                   field="adapter")
            else:
                slots[a.request_id] = slot
        return Activation(slots, failed)

    def acquire(self, digest: str) -> int | None:
        """Activate and count one running sequence on the adapter; None if not possible now."""
        slot = self.activate(digest)
        if slot is not None:
            self._slots[slot].refs += 1
        return slot

    def release(self, slot: int) -> None:
        """A running sequence on `slot` ended."""
        if slot <= 0:
            return
        s = self._slots[slot]
        s.refs = max(0, s.refs - 1)
        s.last_used = time.monotonic()
        if s.refs == 0 and s.digest in self._drop_when_idle:
            self.remove(s.digest)

    def pin(self, digest: str) -> bool:
        """Keep the adapter in a slot until `unpin`. False if already pinned.

        Raises ResourceExhausted when it would pin the last unpinned slot that the adapters
        of some rank could take (something must be left for every other adapter)."""
        slot = self._slot_of.get(digest)
        if (slot is not None and self._slots[slot].pinned) or digest in self._pin_wanted:
            return False
        pinned = sum(1 for s in self._slots[1:] if s.pinned) + len(self._pin_wanted)
        if pinned + 1 >= self.max_slots:
            raise ResourceExhausted(f"pinning would leave no free adapter slot "
                                    f"({pinned} of {self.max_slots} pinned)", field="ref")
        self._check_pin_room(digest, slot)
        if slot is None:
            self._pin_wanted.add(digest)
            slot = self.activate(digest)  # may still be None: activated when it lands
        if slot is not None:
            self._slots[slot].pinned = True
        return True

    def unpin(self, digest: str) -> bool:
        if digest in self._pin_wanted:
            self._pin_wanted.discard(digest)
            return True
        slot = self._slot_of.get(digest)
        if slot is None or not self._slots[slot].pinned:
            return False
        self._slots[slot].pinned = False
        return True

    def remove(self, digest: str) -> bool:
        """Drop the adapter from slot and host (after its running sequences end). False if it
        was not held."""
        self._pin_wanted.discard(digest)
        slot = self._slot_of.get(digest)
        held = slot is not None or digest in self._host
        if slot is not None and self._slots[slot].refs > 0:
            self._drop_when_idle.add(digest)
            self._slots[slot].pinned = False
            return True
        self._drop_when_idle.discard(digest)
        if slot is not None:
            self._evict(digest, "device")
        if digest in self._host:
            self._evict(digest, "host")
            self._start_queued()
        return held

    def shutdown(self) -> None:
        self._loading.shutdown()
        self._queued.clear()
        for waiters in self._landing.values():
            for fut in waiters:
                if not fut.done():
                    fut.set_exception(Unavailable("engine shut down"))
        self._landing.clear()

    # -- internals -------------------------------------------------------------------------
    def _need(self, host: HostAdapter) -> int | None:
        """The smallest rank bucket whose slots hold the adapter (None: none does)."""
        return self.layout.bucket_for_rank(host.max_rank)

    def _spare(self, i: int) -> bool:
        """Slot i could take another adapter at once: empty, or evictable."""
        s = self._slots[i]
        return s.digest is None or (s.refs == 0 and not s.pinned)

    def _free_slot(self, need: int = 0) -> int | None:
        """A slot for an adapter of rank bucket `need`: in the smallest bucket from `need` up
        that has room, an empty slot, else its least recently used evictable one (evicted).
        The scheduler counts spare slots per bucket the same way (`Residency`)."""
        for bucket in self.layout.buckets[need:]:
            for i in bucket.slots:
                if self._slots[i].digest is None:
                    return i
            victims = [i for i in bucket.slots
                       if self._slots[i].refs == 0 and not self._slots[i].pinned]
            if victims:
                victim = min(victims, key=lambda i: self._slots[i].last_used)
                self._evict(self._slots[victim].digest, "device")
                return victim
        return None

    def _check_pin_room(self, digest: str, slot: int | None) -> None:
        """With rank buckets: refuse a pin that would leave the adapters of some rank no
        unpinned slot to go to (each bucket's adapters can use it and every larger one)."""
        buckets = self.layout.buckets
        if len(buckets) == 1:
            return
        if slot is not None:
            k = self.layout.bucket_of_slot(slot)
        else:
            host = self._host.get(digest)
            k = (self._need(host) or 0) if host is not None else 0
        unpinned = [sum(1 for i in b.slots if not self._slots[i].pinned) for b in buckets]
        unpinned[k] -= 1  # this pin (one not in a slot yet lands in bucket k or above)
        for j in range(k + 1):
            if sum(unpinned[j:]) < 1:
                raise ResourceExhausted(
                    f"pinning would leave adapters of rank up to {buckets[j].rank} no "
                    f"unpinned slot ({buckets[j].count} slots hold ranks up to "
                    f"{buckets[j].rank}, {sum(b.count for b in buckets[j + 1:])} larger)",
                    field="ref")

    def _start_queued(self) -> None:
        """Start queued loads in arrival order while the tier has room for the next one."""
        while self._queued:
            d, (version, need) = next(iter(self._queued.items()))
            if not self._make_room(need):
                return  # back-pressure: it waits for a landing, an eviction or a release
            del self._queued[d]
            self._reserved[d] = need
            self._reserved_bytes += need
            self._note_peak()
            self._loading.start(version)

    def _make_room(self, need: int) -> bool:
        """Evict least recently used host copies until `need` more bytes fit the bound;
        False (nothing evicted) if they cannot. A copy that requests wait for and that is
        not in a slot yet, or that is pinned before reaching one, is never evicted."""
        free = self.host_cache_bytes - self._host_bytes - self._reserved_bytes
        if need <= free:
            return True
        victims, gain = [], 0
        for d, host in self._host.items():  # oldest first
            if d not in self._slot_of and (self._wanted.get(d, 0) > 0 or d in self._pin_wanted):
                continue  # requests wait for it: keep it until it reaches a slot
            victims.append(d)
            gain += host.nbytes
            if need <= free + gain:
                for v in victims:
                    self._evict(v, "host")
                return True
        return False

    def _unreserve(self, digest: str) -> int:
        n = self._reserved.pop(digest, 0)
        self._reserved_bytes -= n
        return n

    def _note_peak(self) -> None:
        self.host_peak_bytes = max(self.host_peak_bytes,
                                   self._host_bytes + self._reserved_bytes)

    def _refuse(self, digest: str, error: LoraplexError) -> None:
        self._refused.append(LoadFailure(digest, error))
        self._fail_landing(digest, error)

    def _fail_landing(self, digest: str, error: LoraplexError) -> None:
        for fut in self._landing.pop(digest, []):
            fut.set_exception(error)

    def _evict(self, digest: str, tier: str) -> None:
        """The one eviction hook: clear a device slot, or forget host tensors."""
        if tier == "device":
            slot = self._slot_of.pop(digest)
            self._clear_slot(slot)
            self._device_bytes -= self._slots[slot].nbytes
            self._slots[slot] = _Slot()
        else:
            self._host_bytes -= self._host.pop(digest).nbytes
            self._host_need.pop(digest, None)
        self._observer_cache("evict", tier)

    def _observer_cache(self, event: str, tier: str) -> None:
        self._notify("on_cache", event, tier)

    def _notify(self, hook: str, *args: Any) -> None:
        notify(self._observer, hook, *args)


def too_big(version: AdapterVersion, need: int, limit: int) -> FailedPrecondition:
    return FailedPrecondition(
        f"adapter {version.ref} needs {need / 2**20:.1f} MiB of host memory, more than the "
        f"whole host tier holds (host_cache_bytes = {limit / 2**20:.1f} MiB)", field="adapter")


def _internal(e: Exception) -> LoraplexError:
    err = LoraplexError(f"adapter load failed: {type(e).__name__}: {e}")
    return err
