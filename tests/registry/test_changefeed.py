"""The change feed through the registry's API: its head, reading after an id, and waiting
for the next change (NOTIFY on PostgreSQL, polling on SQLite), from another connection pool
as a second replica would."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from loraplex.registry import Identity, Registry

ADMIN = Identity.system()


def _open_again(registry: Registry, db_location) -> Registry:
    """A second Registry on the same database: its own engine and connections."""
    location, kwargs = db_location
    return Registry.open(location, **kwargs)


def test_head_and_reading_after_an_id(registry, make_adapter, micro_base: Path) -> None:
    assert registry.latest_change_id() == 0 and registry.changes() == []
    v1 = registry.push(ADMIN, make_adapter(seed=1), "acme/bot", base=micro_base)
    registry.set_alias(ADMIN, v1.ref, "prod")
    head = registry.latest_change_id()
    got = registry.changes()
    assert [c.kind for c in got] == ["version_created", "alias_moved"]
    assert got[-1].id == head and got[0].id < head
    assert (got[1].alias, got[1].version, got[1].digest) == ("prod", 1, v1.digest)
    assert registry.changes(head) == []
    assert registry.wait_for_changes(got[0].id, timeout=5.0) == got[1:], \
        "changes already there come back at once"


def test_a_wait_returns_nothing_after_its_timeout(registry) -> None:
    t0 = time.monotonic()
    assert registry.wait_for_changes(registry.latest_change_id(), timeout=0.3) == []
    assert time.monotonic() - t0 >= 0.3


def test_a_waiter_wakes_for_a_push_from_another_registry(registry, db_location, make_adapter,
                                                         micro_base: Path) -> None:
    writer = _open_again(registry, db_location)
    adapter = make_adapter(seed=3)
    head = registry.latest_change_id()
    pushed: dict[str, float] = {}

    def push_later() -> None:
        time.sleep(0.5)  # the waiter is blocked by then
        pushed["v"] = writer.push(ADMIN, adapter, "acme/late", base=micro_base).version
        pushed["at"] = time.monotonic()

    t = threading.Thread(target=push_later)
    t.start()
    try:
        got = registry.wait_for_changes(head, timeout=30.0)
        woke = time.monotonic()
    finally:
        t.join()
        writer.close()
    assert [(c.kind, c.tenant, c.name, c.version) for c in got] == [
        ("version_created", "acme", "late", pushed["v"])]
    # well before the 30 s timeout: NOTIFY (PostgreSQL) or the 50 ms poll (SQLite) woke it
    assert woke - pushed["at"] < 2.0
    assert registry.changes_notify == (registry.engine.dialect.name == "postgresql")


def test_concurrent_waiters_each_see_the_change(registry, db_location, make_adapter,
                                                micro_base: Path) -> None:
    """Only one caller holds the LISTEN connection; the others poll, and all wake."""
    head = registry.latest_change_id()
    results: list[list] = []

    def wait() -> None:
        results.append(registry.wait_for_changes(head, timeout=30.0))

    waiters = [threading.Thread(target=wait) for _ in range(3)]
    for w in waiters:
        w.start()
    time.sleep(0.3)
    writer = _open_again(registry, db_location)
    try:
        writer.push(ADMIN, make_adapter(seed=4), "acme/many", base=micro_base)
    finally:
        writer.close()
    for w in waiters:
        w.join(10.0)
    assert len(results) == 3
    assert all([c.name for c in r] == ["many"] for r in results)


def test_postgresql_waiters_are_woken_by_notify_not_by_polling(pg_url, pg_schema, tmp_path,
                                                               make_adapter,
                                                               micro_base: Path) -> None:
    """With a one-minute poll interval, only the NOTIFY can wake the waiter in time."""
    from loraplex.registry import RegistrySettings

    kwargs = {"blob_dir": tmp_path / "blobs",
              "settings": RegistrySettings(db_schema=pg_schema, change_poll_s=60.0)}
    with Registry.open(pg_url, **kwargs) as waiter, Registry.open(pg_url, **kwargs) as writer:
        head = waiter.latest_change_id()
        timer = threading.Timer(0.5, lambda: writer.push(ADMIN, make_adapter(seed=5),
                                                         "acme/pg", base=micro_base))
        timer.start()
        t0 = time.monotonic()
        got = waiter.wait_for_changes(head, timeout=50.0)
        took = time.monotonic() - t0
        timer.join()
    assert [c.name for c in got] == ["pg"]
    assert took < 5.0, f"woke after {took:.1f}s: the NOTIFY did not arrive"
