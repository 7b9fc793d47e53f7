"""Replicas follow the registry: two servers on one PostgreSQL registry, over real gRPC.

A version promoted to `prod` through one replica is resident on both within a second, a
deleted version leaves both pools within a second and stops serving on both, and the rule
table (`actions_for`) is held to literal cases.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest

from loraplex.client import Client
from loraplex.errors import NotFound
from loraplex.fingerprint import fingerprint_base
from loraplex.registry import Change, Registry, RegistrySettings
from loraplex.runtime.engine.follower import Action, actions_for
from loraplex.runtime.serve.server import BackgroundServer
from loraplex.runtime.serve.settings import load_settings
from tests.registry.conftest import adapter_files, write_adapter

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def _change(kind: str, *, version=None, alias=None, digest=None) -> Change:
    return Change(id=1, kind=kind, tenant="acme", name="bot", version=version, alias=alias,
                  digest=digest, at=NOW)


@pytest.mark.parametrize(("change", "watch", "expected"), [
    (_change("alias_moved", version=3, alias="prod"), {"prod"},
     [Action("invalidate", "acme/bot"), Action("prefetch", "acme/bot:v3")]),
    (_change("alias_moved", version=3, alias="canary"), {"prod"},
     [Action("invalidate", "acme/bot")]),
    (_change("alias_moved", version=None, alias="prod"), {"prod"},  # removed by a forced delete
     [Action("invalidate", "acme/bot")]),
    (_change("version_deleted", version=2, digest="sha256:" + "a" * 64), {"prod"},
     [Action("invalidate", "acme/bot"), Action("evict", "sha256:" + "a" * 64)]),
    (_change("version_created", version=4, digest="sha256:" + "b" * 64), {"prod"},
     [Action("invalidate", "acme/bot")]),
    (_change("version_created", version=4, digest="sha256:" + "b" * 64), {"latest"},
     [Action("invalidate", "acme/bot"), Action("prefetch", "acme/bot:v4")]),
])
def test_actions_for_each_kind_of_change(change, watch, expected) -> None:
    assert actions_for(change, frozenset(watch)) == expected


def _until(predicate, timeout: float) -> float:
    """Seconds until `predicate()` held; fails the test after `timeout`."""
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            pytest.fail(f"not seen within {timeout}s")
        time.sleep(0.02)
    return time.monotonic() - t0


def _digests(client: Client) -> set[str]:
    return {a.digest for a in client.resident().adapters}


def test_two_replicas_follow_alias_moves_and_deletes(micro_base, pg_url, tmp_path) -> None:
    import sqlalchemy as sa

    schema = f"lpx_follow_{int(time.time() * 1000) % 10**9}"
    settings = RegistrySettings(db_schema=schema)
    blobs = tmp_path / "blobs"  # shared by both replicas, as S3 would be
    fp = fingerprint_base(micro_base)
    dirs = [write_adapter(tmp_path / f"a{s}", *adapter_files(fp.linear_shapes, seed=s,
                                                               base_name=str(micro_base)))
            for s in (1, 2)]
    servers = []
    try:
        for i in range(2):
            reg = Registry.open(pg_url, blob_dir=blobs, settings=settings)
            servers.append(BackgroundServer(load_settings({
                "base": micro_base, "registry": pg_url, "port": 0, "host": "127.0.0.1",
                "metrics_port": 0, "metrics_host": "127.0.0.1", "quantization": "none", "device": "cpu",
                "max_batch": 4, "no_auth": True, "prefetch_aliases": ["prod"],
                "follow_poll_s": 2.0 if i == 0 else 0.5,
                "engine": {"compute_dtype": "float32"}}), registry=reg).start())
        one, two = (Client(s.target, timeout=30) for s in servers)
        v1 = one.register_adapter("acme/bot", dirs[0]).adapter
        v2 = one.register_adapter("acme/bot", dirs[1]).adapter
        assert (v1.version, v2.version) == (1, 2)
        assert _digests(one) == _digests(two) == set()  # registering loads nothing

        one.set_alias("acme/bot:v1", "prod")
        _until(lambda: v1.digest in _digests(one) and v1.digest in _digests(two), 1.0)
        before = two.generate("acme/bot@prod", "hello", max_new_tokens=4)
        assert before.adapter_ref == "acme/bot:v1"

        two.set_alias("acme/bot:v2", "prod")  # through the other replica this time
        _until(lambda: v2.digest in _digests(one) and v2.digest in _digests(two), 1.0)
        for c in (one, two):
            assert c.generate("acme/bot@prod", "hello", max_new_tokens=4).adapter_ref == \
                "acme/bot:v2"

        one.delete_version("acme/bot:v1")
        _until(lambda: v1.digest not in _digests(one) | _digests(two), 1.0)
        for c in (one, two):
            with pytest.raises(NotFound):
                c.generate("acme/bot:v1", "hello", max_new_tokens=4)
        assert all(s.server.follower.applied >= 4 for s in servers)
        assert servers[0].server.follower.listen, "PostgreSQL: woken by NOTIFY, not polling"
        one.close()
        two.close()
    finally:
        for s in servers:
            s.stop()
        eng = sa.create_engine(pg_url)
        with eng.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        eng.dispose()
