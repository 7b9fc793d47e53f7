"""Scheduler: bounded queue, fairness on tokens served, skipping unready requests, aging."""

from __future__ import annotations

import pytest

from loraplex.errors import Overloaded, ResourceExhausted
from loraplex.runtime.scheduler import Placement, Scheduler, Ticket


def _ticket(rid: str, tenant: str, t: float = 0.0, cost: int = 10, budget: int = 0) -> Ticket:
    return Ticket(rid, tenant, payload=None, enqueued=t, cost=cost, budget=budget)


def admit_all(_t: Ticket) -> Placement:
    return Placement.ADMITTED


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
    assert [t.request_id for t in s.pick(1, admit_all, now=1)] == ["a"]
    s.push(_ticket("c", "x", budget=1))  # admission made room again
    assert len(s) == 3


def test_fifo_within_a_tenant_and_at_most_free_rows():
    s = Scheduler(max_waiting=10, aging_s=100)
    for i in range(4):
        s.push(_ticket(f"r{i}", "x", t=i))
    assert [t.request_id for t in s.pick(3, admit_all, now=5)] == ["r0", "r1", "r2"]
    assert [t.request_id for t in s.pick(3, admit_all, now=5)] == ["r3"]


def test_a_burst_from_one_tenant_alternates_with_a_newcomer():
    """Tenant x queued 10 requests first; y's 3 still get every other row."""
    s = Scheduler(max_waiting=20, aging_s=100)
    for i in range(10):
        s.push(_ticket(f"x{i}", "x", t=i))
    first = s.pick(2, admit_all, now=10)
    assert [t.tenant for t in first] == ["x", "x"]
    s.charge("x", 40)  # x's running requests are served
    for i in range(3):
        s.push(_ticket(f"y{i}", "y", t=20 + i))
    order = []
    for _ in range(8):
        [t] = s.pick(1, admit_all, now=30)
        order.append(t.tenant)
        s.charge(t.tenant, 10)
    assert order[:6].count("y") == 3, order


def test_returning_tenant_does_not_bank_credit_while_idle():
    s = Scheduler(max_waiting=20, aging_s=100)
    s.push(_ticket("x0", "x"))
    s.pick(1, admit_all, now=1)
    s.charge("x", 1000)
    s.push(_ticket("y0", "y", t=2))  # y arrives while x is active: starts at x's counter
    served = s.served()
    assert served["y"] == served["x"]


def test_unready_requests_are_passed_over_without_blocking_others():
    s = Scheduler(max_waiting=10, aging_s=100)
    s.push(_ticket("loading", "x", t=0))
    s.push(_ticket("ready", "x", t=1))
    s.push(_ticket("other", "y", t=2))

    def place(t):
        return Placement.NOT_READY if t.request_id == "loading" else Placement.ADMITTED

    got = {t.request_id for t in s.pick(3, place, now=3)}
    assert got == {"ready", "other"}
    assert [t.request_id for t in s.waiting()] == ["loading"]
    assert [t.request_id for t in s.pick(1, admit_all, now=4)] == ["loading"]


def test_dropped_tickets_leave_the_queue():
    s = Scheduler(max_waiting=10, aging_s=100)
    s.push(_ticket("gone", "x"))
    assert s.pick(1, lambda t: Placement.DROPPED, now=1) == []
    assert len(s) == 0


def test_an_aged_request_goes_first_and_holds_others_back_until_it_fits():
    s = Scheduler(max_waiting=10, aging_s=5)
    s.push(_ticket("old", "x", t=0))
    s.push(_ticket("young", "y", t=9))
    capacity = {"old": Placement.NO_CAPACITY, "young": Placement.ADMITTED}
    # at t=10 "old" has waited 10 s > aging_s: it cannot fit, so nobody is admitted
    assert s.pick(2, lambda t: capacity[t.request_id], now=10) == []
    capacity["old"] = Placement.ADMITTED
    assert [t.request_id for t in s.pick(1, lambda t: capacity[t.request_id], now=11)] == ["old"]
    # before aging, a request that does not fit is simply skipped
    s.push(_ticket("big", "x", t=12))
    capacity["big"] = Placement.NO_CAPACITY
    assert [t.request_id for t in s.pick(2, lambda t: capacity[t.request_id], now=13)] == [
        "young"]


def test_finished_tracks_running_per_tenant():
    s = Scheduler(max_waiting=10, aging_s=100)
    s.push(_ticket("a", "x"))
    s.pick(1, admit_all, now=1)
    s.charge("x", 500)
    s.finished("x")
    # x is idle now: a newcomer z does not inherit x's counter
    s.push(_ticket("b", "z", t=2))
    assert s.served()["z"] == 0
