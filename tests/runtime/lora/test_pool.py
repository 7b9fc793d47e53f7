"""Adapter pool bookkeeping: slots, LRU, pinning, the host tier's byte bound, loads
off-thread, failures.

The pool is driven with its own callbacks (a dict standing in for the layers' slots and a
loader that builds tensors); the engine tests run it against the real registry and layers.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import pytest
import torch

from loraplex.errors import DataCorruption, FailedPrecondition, ResourceExhausted
from loraplex.runtime.api.slots import SlotLayout
from loraplex.runtime.lora.loading import HostAdapter
from loraplex.runtime.lora.pool import AdapterPool


@dataclass(frozen=True)
class V:  # the fields of AdapterVersion the pool reads
    digest: str
    ref: str = "t/n:v1"
    size_bytes: int = 4000  # what the pool reserves for its load (host_bytes_of's default)


class Rig:
    """Loads give 4000-byte adapters (or `sizes[digest]` bytes)."""

    def __init__(self, max_slots=2, host_cache_bytes=100_000, fail=(), delay=0.0, sizes=None):
        self.slots: dict[int, str] = {}
        self.loads: list[str] = []
        self.fail, self.delay, self.sizes = set(fail), delay, sizes or {}
        self.gate = threading.Event()
        self.gate.set()
        self.pool = AdapterPool(max_slots=max_slots, host_cache_bytes=host_cache_bytes,
                                load_fn=self.load, write_slot=self.write,
                                clear_slot=self.slots.pop)

    def load(self, v):
        self.gate.wait(5)
        time.sleep(self.delay)
        self.loads.append(v.digest)
        if v.digest in self.fail:
            raise DataCorruption("bad blob")
        n = self.sizes.get(v.digest, 4000) // 16  # A [2, n] + B [n, 2], fp32
        return HostAdapter(digest=v.digest, ref=v.ref, rank=2, alpha=4.0,
                           tensors={"m.lora_A.weight": torch.zeros(2, n),
                                    "m.lora_B.weight": torch.zeros(n, 2)})

    def pump(self, until, timeout=5.0):
        """Poll (as the engine thread does every step) until `until()`; the failures."""
        failures = []
        end = time.monotonic() + timeout
        while not until():
            failures += self.pool.poll()
            if time.monotonic() > end:
                raise TimeoutError
            time.sleep(0.001)
        return failures

    def write(self, slot, host):
        self.slots[slot] = host.digest

    def land(self, *versions, timeout=5.0):
        """Wait for loads of `versions` and collect them."""
        failures = []
        end = time.monotonic() + timeout
        while any(self.pool.is_loading(v.digest) for v in versions):
            failures += self.pool.poll()
            if time.monotonic() > end:
                raise TimeoutError
            time.sleep(0.001)
        return failures + self.pool.poll()


def test_load_runs_off_thread_then_activate_copies_into_a_free_slot():
    rig = Rig()
    rig.gate.clear()
    v = V("sha256:a")
    assert rig.pool.ensure_loading(v) is True
    assert rig.pool.ensure_loading(v) is False  # safe to repeat: one load
    assert rig.pool.acquire(v.digest) is None  # still loading: not placeable
    rig.gate.set()
    rig.land(v)
    assert rig.loads == ["sha256:a"]
    slot = rig.pool.acquire(v.digest)
    assert slot == 1 and rig.slots == {1: "sha256:a"}
    assert rig.pool.acquire(v.digest) == 1  # already there: no second copy


def test_slots_in_use_are_never_evicted_lru_otherwise():
    rig = Rig(max_slots=2)
    a, b, c = V("sha256:a"), V("sha256:b"), V("sha256:c")
    for v in (a, b, c):
        rig.pool.ensure_loading(v)
    rig.land(a, b, c)
    sa = rig.pool.acquire(a.digest)  # in use
    sb = rig.pool.acquire(b.digest)
    assert rig.pool.acquire(c.digest) is None  # both slots in use
    rig.pool.release(sb)
    assert rig.pool.acquire(c.digest) == sb  # b (unused) made room, a stayed
    assert rig.pool.slot_of(a.digest) == sa and rig.pool.slot_of(b.digest) is None
    rig.pool.release(sa)
    rig.pool.release(sb)
    rig.pool.activate(a.digest)  # a used more recently than c
    assert rig.pool.acquire(b.digest) == rig.pool.slot_of(b.digest)
    assert rig.pool.slot_of(a.digest) is not None and rig.pool.slot_of(c.digest) is None


def test_pinning_keeps_a_slot_and_cannot_take_the_last_one():
    rig = Rig(max_slots=2)
    a, b, c = V("sha256:a"), V("sha256:b"), V("sha256:c")
    for v in (a, b, c):
        rig.pool.ensure_loading(v)
    rig.land(a, b, c)
    assert rig.pool.pin(a.digest) is True and rig.pool.pin(a.digest) is False
    with pytest.raises(ResourceExhausted):
        rig.pool.pin(b.digest)
    for v in (b, c, b, c):
        rig.pool.release(rig.pool.acquire(v.digest))
    assert rig.pool.slot_of(a.digest) is not None
    assert rig.pool.unpin(a.digest) is True and rig.pool.unpin(a.digest) is False


def test_pin_before_load_activates_when_it_lands():
    rig = Rig()
    a = V("sha256:a")
    rig.pool.ensure_loading(a)
    assert rig.pool.pin(a.digest) is True
    rig.land(a)
    assert rig.pool.slot_of(a.digest) is not None
    assert [r["pinned"] for r in rig.pool.resident()] == [True]


def test_host_tier_evicts_lru_copies_to_make_room_but_never_what_requests_wait_for():
    rig = Rig(max_slots=1, host_cache_bytes=9_000)  # room for two 4000-byte adapters
    old, waited, new = V("sha256:old"), V("sha256:waited"), V("sha256:new")
    rig.pool.ensure_loading(old)
    rig.land(old)
    rig.pool.want(waited)  # a request waits for it
    rig.land(waited)
    rig.pool.ensure_loading(new)  # no room: the oldest copy nothing waits for goes
    rig.land(new)
    assert not rig.pool.on_host(old.digest)
    assert rig.pool.on_host(waited.digest) and rig.pool.on_host(new.digest)
    assert rig.pool.host_peak_bytes <= 9_000


def test_host_bound_counts_loads_in_flight_and_holds_the_rest_back():
    """Eight adapters wanted at once under a bound of two: held + reserved bytes never pass
    the bound (the pool's own peak), the others wait in the queue, and every one of them
    lands once the earlier ones reach a slot."""
    rig = Rig(max_slots=1, host_cache_bytes=9_000)
    rig.gate.clear()  # loads block: everything started is in flight
    vs = [V(f"sha256:{i}") for i in range(8)]
    for v in vs:
        rig.pool.want(v)
    tiers = rig.pool.tier_bytes()
    assert (tiers.loading, tiers.host, tiers.queued) == (8_000, 0, 6)
    assert all(rig.pool.is_loading(v.digest) for v in vs)
    assert rig.pool.residency().loading == {v.digest for v in vs}  # the scheduler waits
    rig.gate.set()
    served = []
    for v in vs:  # the engine's order: a landed adapter reaches the slot, its request ends
        rig.pump(lambda v=v: rig.pool.on_host(v.digest))
        assert rig.pool.tier_bytes().host + rig.pool.tier_bytes().loading <= 9_000
        slot = rig.pool.acquire(v.digest)
        served.append(rig.slots[slot])
        rig.pool.unwant(v.digest)
        rig.pool.release(slot)
    assert served == [v.digest for v in vs] and sorted(rig.loads) == sorted(served)
    assert 8_000 <= rig.pool.host_peak_bytes <= 9_000


def test_an_adapter_larger_than_the_whole_host_tier_is_refused():
    rig = Rig(host_cache_bytes=9_000)
    huge = V("sha256:huge", ref="t/huge:v1", size_bytes=10_000)
    rig.pool.want(huge)
    [failure] = rig.pool.poll()
    assert failure.digest == huge.digest and isinstance(failure.error, FailedPrecondition)
    assert "t/huge:v1" in failure.error.message and failure.error.field == "adapter"
    assert rig.loads == [] and not rig.pool.is_loading(huge.digest)
    with pytest.raises(FailedPrecondition):
        rig.pool.when_resident(huge)  # prefetch and pin say so at once


def test_a_load_bigger_than_its_reservation_waits_for_room_with_its_real_size():
    """A DoRA adapter's factors make it land bigger than its record says: it takes the
    difference from the tier, or goes back to the queue with its real size."""
    rig = Rig(max_slots=1, host_cache_bytes=7_000)  # each lands with 4000 bytes
    a, b = V("sha256:a", size_bytes=1000), V("sha256:b", size_bytes=1000)
    rig.gate.clear()
    rig.pool.want(a)
    rig.pool.want(b)
    assert rig.pool.tier_bytes().loading == 2_000  # both fit their reservations
    rig.gate.set()
    rig.pump(lambda: len(rig.loads) == 2 and rig.pool.tier_bytes().loading == 0)
    first = a if rig.pool.on_host(a.digest) else b
    second = b if first is a else a
    tiers = rig.pool.tier_bytes()
    assert (tiers.host, tiers.queued) == (4_000, 1)  # no room for both: one waits again
    assert rig.pool.is_loading(second.digest)
    rig.pool.release(rig.pool.acquire(first.digest))  # in a slot: its host copy may go
    rig.pool.unwant(first.digest)
    rig.pump(lambda: rig.pool.on_host(second.digest))
    assert rig.pool.tier_bytes().queued == 0 and len(rig.loads) == 3
    assert rig.pool.host_peak_bytes <= 7_000


def test_failed_load_is_reported_once_and_can_be_retried():
    rig = Rig(fail={"sha256:bad"})
    bad = V("sha256:bad")
    rig.pool.ensure_loading(bad)
    [failure] = rig.land(bad)
    assert failure.digest == bad.digest and isinstance(failure.error, DataCorruption)
    assert rig.pool.slot_of(bad.digest) is None and not rig.pool.on_host(bad.digest)
    assert rig.pool.ensure_loading(bad) is True  # a later request tries again


def test_when_resident_future_and_remove_while_in_use():
    rig = Rig()
    a = V("sha256:a")
    fut = rig.pool.when_resident(a)
    rig.land(a)
    assert fut.result(1) is True and rig.pool.slot_of(a.digest) is not None
    slot = rig.pool.acquire(a.digest)
    assert rig.pool.remove(a.digest) is True  # in use: removed once the sequence ends
    assert rig.pool.slot_of(a.digest) == slot
    rig.pool.release(slot)
    assert rig.pool.slot_of(a.digest) is None and not rig.pool.on_host(a.digest)
    assert rig.pool.remove(a.digest) is False
    bad = Rig(fail={"sha256:x"})
    fut = bad.pool.when_resident(V("sha256:x"))
    bad.land(V("sha256:x"))
    with pytest.raises(DataCorruption):
        fut.result(1)


def test_loader_threads_can_run_at_background_priority():
    import os

    seen = []

    def load(v):
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return HostAdapter(digest=v.digest, ref=v.ref, rank=1, alpha=1.0, tensors={})

    pool = AdapterPool(max_slots=1, host_cache_bytes=0, load_fn=load, write_slot=print,
                       clear_slot=print, loader_nice=7)
    pool.ensure_loading(V("sha256:n", size_bytes=0))
    end = time.monotonic() + 5
    while pool.is_loading("sha256:n") and time.monotonic() < end:
        pool.poll()
        time.sleep(0.001)
    pool.shutdown()
    assert seen and seen[0] >= 7  # never below the asked niceness (it may start higher)


def test_a_slot_write_that_fails_leaves_no_half_written_slot_or_host_copy():
    rig = Rig()
    a = V("sha256:a")
    rig.pool.ensure_loading(a)
    rig.land(a)

    def broken(slot, host):
        rig.slots[slot] = "half"
        raise RuntimeError("copy failed")

    rig.pool._write_slot = broken
    with pytest.raises(RuntimeError):
        rig.pool.acquire(a.digest)
    assert rig.slots == {} and not rig.pool.on_host(a.digest)
    assert rig.pool.slot_of(a.digest) is None and rig.pool.slots_used == 0


# ------------------------------------------------------------------------------ rank buckets
# slots 1-2 hold ranks <= 4, slot 3 ranks <= 16 (runtime/api/slots.py)
LAYOUT = SlotLayout.of(((4, 2), (16, 1)))


class BucketRig(Rig):
    """A pool over LAYOUT whose adapters' ranks are `ranks[digest]` (read from lora_A)."""

    def __init__(self, ranks: dict[str, int]):
        self.ranks = ranks
        super().__init__()
        self.pool = AdapterPool(layout=LAYOUT, host_cache_bytes=10**7, load_fn=self.load,
                                write_slot=self.write, clear_slot=self.slots.pop)

    def load(self, v):
        r = self.ranks[v.digest]
        return HostAdapter(digest=v.digest, ref=v.ref, rank=1, alpha=1.0,
                           tensors={"m.lora_A.weight": torch.zeros(r, 8),
                                    "m.lora_B.weight": torch.zeros(8, r)})


def _landed(rig, *digests):
    vs = [V(d) for d in digests]
    for v in vs:
        rig.pool.ensure_loading(v)
    rig.land(*vs)


def test_adapters_take_the_smallest_bucket_that_holds_them_and_spill_upward():
    rig = BucketRig({"a": 2, "b": 4, "c": 1, "big": 16})
    _landed(rig, "a", "b", "c", "big")
    res = rig.pool.residency()
    assert (res.bucket_spare, dict(res.bucket_of)) == ((2, 1), {"a": 0, "b": 0, "c": 0,
                                                               "big": 1})
    assert [rig.pool.acquire(d) for d in ("a", "b", "c")] == [1, 2, 3]  # c: into the big slot
    assert rig.pool.acquire("big") is None  # its only slot is in use, small ones do not fit
    rig.pool.release(3)
    assert rig.pool.acquire("big") == 3  # c (idle) made room
    assert rig.pool.slot_of("c") is None
    assert rig.pool.residency().bucket_spare == (0, 0)


def test_a_small_adapter_evicts_in_its_own_bucket_before_taking_a_larger_one():
    rig = BucketRig({"a": 2, "b": 2, "c": 3, "big": 16})
    _landed(rig, "a", "b", "c", "big")
    rig.pool.release(rig.pool.acquire("a"))
    rig.pool.release(rig.pool.acquire("b"))
    assert rig.pool.acquire("c") == 1  # a (least recently used, idle) went; slot 3 kept free
    assert rig.pool.acquire("big") == 3


def test_pinning_keeps_a_slot_for_every_rank():
    rig = BucketRig({"a": 2, "b": 2, "big": 16, "big2": 9})
    _landed(rig, "a", "b", "big", "big2")
    rig.pool.acquire("big")
    with pytest.raises(ResourceExhausted) as e:
        rig.pool.pin("big")  # the only slot for ranks above 4
    assert "rank up to 16" in str(e.value)
    assert rig.pool.pin("a") is True  # slot 2 and slot 3 remain for small ranks


def test_an_adapter_above_every_bucket_fails_only_its_requests():
    from loraplex.errors import FailedPrecondition

    @dataclass(frozen=True)
    class Req:  # the fields of a SlotRequest
        request_id: str
        digest: str

    rig = BucketRig({"wide": 32, "a": 2})
    _landed(rig, "wide", "a")
    act = rig.pool.activate_for([Req("r1", "wide"), Req("r2", "a")])
    assert act.slots == {"r2": 1}
    assert isinstance(act.failed["r1"], FailedPrecondition)
    assert "max_rank 16" in str(act.failed["r1"])
