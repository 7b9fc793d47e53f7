"""PostgreSQL connections terminated under the registry (`pg_terminate_backend`, for real).

`BackendKiller` terminates the server process of the registry's own connection at the
start of its next transactions, from a separate admin connection, and waits until that
process is gone: the registry's next statement then meets a dead connection, exactly as
after a database restart or a failover in the middle of traffic.
"""

from __future__ import annotations

import time
import uuid

import pytest
import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from loraplex.errors import DatabaseUnavailable, NotFound
from loraplex.registry import Identity, Registry, RegistrySettings
from loraplex.registry.db import _WRITE

ME = Identity.system()


class BackendKiller:
    """Terminates the backend of the next `n` transactions `registry` begins (only write
    transactions with `writes_only`). `killed` lists the terminated backend pids."""

    def __init__(self, registry: Registry, admin_url: str) -> None:
        self.admin = sa.create_engine(admin_url, poolclass=NullPool,
                                      isolation_level="AUTOCOMMIT")  # fresh stats each poll
        self.left, self.writes_only, self.killed = 0, False, []
        sa.event.listen(registry.engine, "begin", self._on_begin)

    def arm(self, n: int, *, writes_only: bool = False) -> BackendKiller:
        self.left, self.writes_only = n, writes_only
        return self

    def _on_begin(self, conn: sa.Connection) -> None:
        if self.left <= 0 or (self.writes_only and not conn.get_execution_options().get(_WRITE)):
            return
        self.left -= 1
        pid = conn.connection.dbapi_connection.info.backend_pid
        self.terminate([pid])

    def terminate(self, pids: list[int]) -> None:
        with self.admin.connect() as a:
            for pid in pids:
                a.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": pid})
            end = time.monotonic() + 5
            while a.execute(sa.text("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(:p)"),
                            {"p": pids}).scalar():
                if time.monotonic() > end:
                    raise AssertionError(f"backends {pids} outlived pg_terminate_backend")
                time.sleep(0.01)
        self.killed += pids

    def idle_pids(self, app_name: str) -> list[int]:
        with self.admin.connect() as a:
            return list(a.execute(sa.text(
                "SELECT pid FROM pg_stat_activity WHERE application_name = :n"),
                {"n": app_name}).scalars())


def tagged_url(pg_url: str) -> tuple[str, str]:
    """The test database URL with a unique application_name, so a test can find (and
    terminate) its own connections and never another test's."""
    name = f"lpx_fault_{uuid.uuid4().hex[:10]}"
    sep = "&" if "?" in pg_url else "?"
    return f"{pg_url}{sep}application_name={name}", name


@pytest.fixture
def pg_world(pg_url, pg_schema, tmp_path, micro_base, make_adapter):
    url, app_name = tagged_url(pg_url)
    reg = Registry.open(url, blob_dir=tmp_path / "blobs",
                        settings=RegistrySettings(db_schema=pg_schema))
    reg.register_base(ME, micro_base)
    reg.push(ME, make_adapter(seed=1), "acme/support")
    yield reg, BackendKiller(reg, pg_url), app_name
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
