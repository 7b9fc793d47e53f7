"""Scheduler: bounded queue, fairness on tokens served, skipping unready requests, aging."""

from __future__ import annotations

import pytest

from loraplex.errors import Overloaded, ResourceExhausted
from loraplex.runtime.engine.scheduler import Scheduler, Ticket
from loraplex.runtime.lora.pool import Residency

EMPTY = Residency(spare_slots=4)


def _ticket(rid: str, tenant: str, t: float = 0.0, cost: int = 10, budget: int = 0,
            digest: str | None = None, deadline: float | None = None) -> Ticket:
    return Ticket(rid, tenant, digest, prompt=[1] * cost, enqueued=t, cost=cost, budget=budget,
                  deadline=deadline)


def pick(s: Scheduler, n: int, now: float, residency: Residency = EMPTY) -> list[str]:
    """Request ids `schedule` admits with `n` free rows."""
    return [a.request_id for a in s.schedule(now, range(n), residency).admitted]


def test_full_queue_is_overloaded_and_remove_frees_room():
    s = Scheduler(max_waiting=2, aging_s=100)
    s.push(_ticket("a", "x"))
    s.push(_ticket("b", "x"))
    with pytest.raises(Overloaded):
        s.push(_ticket("c", "x"))
    assert s.remove("a").request_id == "a"
    assert s.remove("a") is None
    s.push(_ticket("c", "x"))
    assert len(s) == 2


def test_per_tenant_caps_on_waiting_requests_and_tokens():
    s = Scheduler(max_waiting=10, aging_s=100, max_waiting_per_tenant=2,
                  max_waiting_tokens_per_tenant=100)
    s.push(_ticket("a", "x", budget=60))
    with pytest.raises(ResourceExhausted, match="too many tokens"):
        s.push(_ticket("b", "x", budget=41))
    s.push(_ticket("b", "x", budget=40))
    with pytest.raises(ResourceExhausted, match="per-tenant limit 2"):
        s.push(_ticket("c", "x", budget=1))
    s.push(_ticket("d", "y", budget=100))  # another tenant is not affected
    assert pick(s, 1, now=1) == ["a"]
    s.push(_ticket("c", "x", budget=1))  # admission made room again
    assert len(s) == 3


def test_fifo_within_a_tenant_and_at_most_free_rows():
    s = Scheduler(max_waiting=10, aging_s=100)
    for i in range(4):
        s.push(_ticket(f"r{i}", "x", t=i))
    assert pick(s, 3, now=5) == ["r0", "r1", "r2"]
    assert pick(s, 3, now=5) == ["r3"]


def test_a_burst_from_one_tenant_alternates_with_a_newcomer():
    """Tenant x queued 10 requests first; y's 3 still get every other row."""
    s = Scheduler(max_waiting=20, aging_s=100)
    for i in range(10):
        s.push(_ticket(f"x{i}", "x", t=i))
    first = pick(s, 2, now=10)
    assert first == ["x0", "x1"]
    s.charge("x", 40)  # x's running requests are served
    for i in range(3):
        s.push(_ticket(f"y{i}", "y", t=20 + i))
    order = []
    for _ in range(8):
        [rid] = pick(s, 1, now=30)
        order.append(rid[0])
        s.charge(rid[0], 10)
    assert order[:6].count("y") == 3, order


def test_returning_tenant_does_not_bank_credit_while_idle():
    s = Scheduler(max_waiting=20, aging_s=100)
    s.push(_ticket("x0", "x"))
    pick(s, 1, now=1)
    s.charge("x", 1000)
    s.push(_ticket("y0", "y", t=2))  # y arrives while x is active: starts at x's counter
    served = s.served()
    assert served["y"] == served["x"]


def test_unready_requests_are_passed_over_without_blocking_others():
    s = Scheduler(max_waiting=10, aging_s=100)
    s.push(_ticket("loading", "x", t=0, digest="d1"))
    s.push(_ticket("ready", "x", t=1))
    s.push(_ticket("other", "y", t=2))
    plan = s.schedule(3, range(3), Residency(loading=frozenset({"d1"}), spare_slots=4))
    assert {a.request_id for a in plan.admitted} == {"ready", "other"}
    assert plan.load == ()  # already loading: nothing to start
    assert [t.request_id for t in s.waiting()] == ["loading"]
    landed = Residency(on_host=frozenset({"d1"}), spare_slots=4)
    plan = s.schedule(4, range(1), landed)
    assert [a.request_id for a in plan.admitted] == ["loading"] and plan.activate == ("d1",)


def test_a_request_whose_adapter_is_nowhere_asks_for_a_load():
    s = Scheduler(max_waiting=10, aging_s=100)
    s.push(_ticket("cold", "x", digest="d9"))
    plan = s.schedule(1, range(2), EMPTY)
    assert plan.admitted == () and plan.load == ("d9",)


def test_distinct_adapters_are_capped_by_spare_slots_and_shared_slots_are_free():
    s = Scheduler(max_waiting=10, aging_s=100)
    for i, d in enumerate(["a", "a", "b", "c"]):
        s.push(_ticket(f"r{i}", "x", t=i, digest=d))
    res = Residency(in_slot=frozenset({"a"}), busy=frozenset({"a"}),
                    on_host=frozenset({"b", "c"}), spare_slots=1)
    plan = s.schedule(5, range(8), res)
    assert [a.request_id for a in plan.admitted] == ["r0", "r1", "r2"]
    assert plan.activate == ("b",)  # "c" waits for a slot
    assert [a.row for a in plan.admitted] == [0, 1, 2]
    assert [f.row for f in plan.prefill] == [0, 1, 2]  # newcomers are prefilled at once


# (order of waiting adapters, admitted): one spare slot up to rank 16 (bucket 0), one up to
# rank 256 (bucket 1); "s*" need bucket 0, "big" bucket 1, "idle" sits in bucket 0's slot
BUCKET_CASES = [
    (["s1", "s2", "big"], ["s1", "s2"]),  # s2 takes the large slot: nothing left for big
    (["big", "s1", "s2"], ["big", "s1"]),  # big first: s2 waits
    (["s1", "idle"], ["s1"]),  # s1 was counted on idle's slot, which it will evict
    (["idle", "s1"], ["idle", "s1"]),  # idle keeps its slot, s1 spills upward
]


@pytest.mark.parametrize(("order", "admitted"), BUCKET_CASES)
def test_spare_slots_are_counted_per_rank_bucket(order, admitted):
    """As the pool places them: the smallest bucket that holds the adapter and has a spare
    slot, else a larger one; an adapter in a slot uses that slot."""
    s = Scheduler(max_waiting=10, aging_s=100)
    for i, d in enumerate(order):
        s.push(_ticket(d, "x", t=i, digest=d))
    res = Residency(in_slot=frozenset({"idle"}), on_host=frozenset({"s1", "s2", "big"}),
                    spare_slots=2, bucket_spare=(1, 1),
                    bucket_of={"s1": 0, "s2": 0, "big": 1, "idle": 0})
    assert pick(s, 4, now=5, residency=res) == admitted


def test_requests_past_their_deadline_leave_the_queue():
    s = Scheduler(max_waiting=10, aging_s=100)
    s.push(_ticket("gone", "x", deadline=1.0))
    s.push(_ticket("kept", "x", deadline=9.0))
    plan = s.schedule(2, [], EMPTY)
    assert plan.dropped == ("gone",) and plan.admitted == ()
    assert len(s) == 1


def test_an_aged_request_goes_first_and_holds_others_back_until_it_fits():
    s = Scheduler(max_waiting=10, aging_s=5)
    s.push(_ticket("old", "x", t=0, digest="big-old"))
    s.push(_ticket("young", "y", t=9))
    full = Residency(on_host=frozenset({"big-old", "big"}), spare_slots=0)
    # at t=10 "old" has waited 10 s > aging_s: it cannot fit, so nobody is admitted
    assert pick(s, 2, now=10, residency=full) == []
    room = Residency(on_host=frozenset({"big-old", "big"}), spare_slots=1)
    assert pick(s, 1, now=11, residency=room) == ["old"]
    # before aging, a request that does not fit is simply skipped
    s.push(_ticket("big", "x", t=12, digest="big"))
    assert pick(s, 2, now=13, residency=full) == ["young"]


def test_finished_tracks_running_per_tenant():
    s = Scheduler(max_waiting=10, aging_s=100)
    s.push(_ticket("a", "x"))
    pick(s, 1, now=1)
    s.charge("x", 500)
    s.finished("x")
    # x is idle now: a newcomer z does not inherit x's counter
    s.push(_ticket("b", "z", t=2))
    assert s.served()["z"] == 0
