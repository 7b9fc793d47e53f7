"""A version's lineage is read and parsed once per process, not on every resolve: a row
written under an older, larger lineage cap (megabytes of JSON) costs each admitted request
nothing after its first resolve."""

from __future__ import annotations

import json

import sqlalchemy as sa

from loraplex.registry import Identity, db

ADMIN = Identity.system()


def test_a_large_lineage_is_parsed_once_for_any_number_of_resolves(registry, make_adapter):
    v = registry.push(ADMIN, make_adapter(), "acme/a", lineage={"seed": 1})
    big = {"seed": 1, "notes": ["x" * 1000] * 8192}  # ~8 MiB, as an old row may hold
    with registry.engine.begin() as conn:
        conn.execute(sa.update(db.versions).where(db.versions.c.digest == v.digest)
                     .values(lineage=big))
    cache = registry.store.lineages
    cache._items.clear()  # as a fresh process would
    reads = cache.reads
    for ref in ("acme/a", "acme/a:v1", "acme/a@latest", v.digest) * 5:
        assert registry.resolve(ADMIN, ref).digest == v.digest
    [listed] = registry.list_adapters(ADMIN)[0]
    assert registry.list_versions(ADMIN, "acme/a")[0].lineage == big == listed.lineage
    assert cache.reads == reads + 1  # one read and parse for 22 lookups
    assert len(json.dumps(listed.lineage)) > 8_000_000


def test_cached_lineages_stay_within_their_budget(registry, make_adapter):
    from loraplex.registry.rows import LineageCache, version_query

    versions = [registry.push(ADMIN, make_adapter(seed=i), f"acme/a{i}",
                              lineage={"pad": "y" * 1000, "i": i}) for i in range(8)]
    cache = LineageCache(budget_bytes=4096)
    with registry.engine.connect() as conn:
        rows = conn.execute(version_query().order_by(db.versions.c.id)).all()
        assert [cache.get(conn, r)["i"] for r in rows] == list(range(8))
        assert cache._bytes <= 4096 and 0 < len(cache._items) < 8
        # a caller that changes what it was given does not change what others get
        cache.get(conn, rows[-1])["i"] = -1
        assert cache.get(conn, rows[-1])["i"] == 7
    assert [registry.resolve(ADMIN, v.ref).lineage["i"] for v in versions] == list(range(8))


def test_a_page_of_versions_reads_its_lineages_in_one_query(registry, make_adapter):
    for i in range(6):
        registry.push(ADMIN, make_adapter(seed=i), f"acme/a{i}", lineage={"i": i})
        registry.push(ADMIN, make_adapter(seed=10 + i), "acme/many", lineage={"i": 10 + i})
    cache = registry.store.lineages
    cache._items.clear()  # as a fresh process would
    queries = cache.queries
    page, _ = registry.list_adapters(ADMIN)
    assert [v.lineage["i"] for v in page] == [0, 1, 2, 3, 4, 5, 15]
    assert [v.lineage["i"] for v in registry.list_versions(ADMIN, "acme/many")] == \
        list(range(10, 16))
    assert cache.queries == queries + 2  # one per page, not one per version
