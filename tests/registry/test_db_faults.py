"""PostgreSQL connections terminated under the registry (`pg_terminate_backend`, for real).

`BackendKiller` (tests/conftest.py) terminates the server process of the registry's own connection at the
start of its next transactions, from a separate admin connection, and waits until that
process is gone: the registry's next statement then meets a dead connection, exactly as
after a database restart or a failover in the middle of traffic.
"""

from __future__ import annotations

import pytest

from loraplex.errors import DatabaseUnavailable, NotFound
from loraplex.registry import Identity, Registry, RegistrySettings

ME = Identity.system()


@pytest.fixture
def pg_world(pg_url, pg_schema, tmp_path, micro_base, make_adapter, tagged_pg_url,
             backend_killer):
    url, app_name = tagged_pg_url(pg_url)
    reg = Registry.open(url, blob_dir=tmp_path / "blobs",
                        settings=RegistrySettings(db_schema=pg_schema))
    reg.register_base(ME, micro_base)
    reg.push(ME, make_adapter(seed=1), "acme/support")
    yield reg, backend_killer(reg), app_name
    reg.close()


def test_a_read_whose_connection_drops_is_retried_once(pg_world):
    reg, killer, _ = pg_world
    killer.arm(1)
    assert reg.resolve(ME, "acme/support").ref == "acme/support:v1"  # retried, transparent
    assert len(killer.killed) == 1
    killer.arm(1)
    listed, _ = reg.list_adapters(ME)
    assert [v.ref for v in listed] == ["acme/support:v1"] and len(killer.killed) == 2
    killer.arm(1)
    assert [c.kind for c in reg.changes()] == ["version_created"]

    killer.arm(2)  # the retry drops too: honest UNAVAILABLE, not a third try
    with pytest.raises(DatabaseUnavailable) as e:
        reg.resolve(ME, "acme/support")
    assert e.value.code == "UNAVAILABLE" and "retry" in e.value.message
    assert "postgres" in e.value.message and killer.left == 0
    assert reg.resolve(ME, "acme/support").version == 1  # and then it works again


def test_a_write_on_a_dropped_connection_is_unavailable_and_changes_nothing(
        pg_world, make_adapter):
    reg, killer, _ = pg_world
    killer.arm(1, writes_only=True)
    with pytest.raises(DatabaseUnavailable):
        reg.set_alias(ME, "acme/support:v1", "prod")
    assert reg.aliases(ME, "acme/support") == {}
    killer.arm(1, writes_only=True)
    with pytest.raises(DatabaseUnavailable):
        reg.push(ME, make_adapter(seed=2), "acme/support")
    assert [v.version for v in reg.list_versions(ME, "acme/support")] == [1]
    with pytest.raises(NotFound):
        reg.resolve(ME, "acme/support:v2")
    assert len(killer.killed) == 2
    # nothing is replayed behind the caller's back; asking again works
    assert reg.set_alias(ME, "acme/support:v1", "prod").to_version == 1
    assert reg.push(ME, make_adapter(seed=2), "acme/support").version == 2


def test_idle_connections_terminated_between_calls_are_replaced_by_pre_ping(pg_world):
    reg, killer, app_name = pg_world
    pids = killer.idle_pids(app_name)
    assert pids, "the registry keeps a pooled connection between calls"
    killer.terminate(pids)
    # a write is never retried, so only the pool's pre-ping can make this one succeed
    assert reg.set_alias(ME, "acme/support:v1", "prod").to_version == 1
    assert set(killer.idle_pids(app_name)).isdisjoint(pids)
