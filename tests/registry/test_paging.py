"""`list_adapters` pages by keyset: complete and in order while versions are pushed between
pages, and its query reads a page's worth of rows however many versions there are."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from loraplex.errors import InvalidArgument
from loraplex.registry import Identity, Registry, db
from loraplex.registry.lookup import page_query

ADMIN = Identity.system()


def _all_pages(registry: Registry, between=lambda page_no: None, size: int = 2
               ) -> list[list[tuple[str, int]]]:
    pages, token = [], None
    while True:
        page, token = registry.list_adapters(ADMIN, page_size=size, page_token=token)
        pages.append([(v.key, v.version) for v in page])
        if token is None:
            return pages
        between(len(pages))


def test_pages_stay_complete_and_ordered_while_versions_are_pushed(
        registry, make_adapter, micro_base: Path) -> None:
    seed = iter(range(100, 200))

    def push(name: str):
        return registry.push(ADMIN, make_adapter(seed=next(seed)), name, base=micro_base)

    start = [f"acme/a{i}" for i in range(1, 8)]
    for name in start:
        push(name)

    def between(page_no: int) -> None:
        if page_no == 1:  # page 1 held a1, a2
            push("acme/a1")      # a new version of a listed adapter: not listed again
            push("acme/a5")      # of one not listed yet: listed with its new version
            push("acme/a0")      # sorts before the cursor: not this listing's business
            push("acme/a3b")     # sorts after the cursor: listed in its place
        if page_no == 2:
            registry.delete_version(ADMIN, "acme/a6:v1")  # gone before its page is read

    pages = _all_pages(registry, between)
    keys = [k for page in pages for k, _ in page]
    assert keys == sorted(keys) and len(keys) == len(set(keys)), "in order, each once"
    assert keys == ["acme/a1", "acme/a2", "acme/a3", "acme/a3b", "acme/a4", "acme/a5",
                    "acme/a7"]
    got = dict(k for page in pages for k in page)
    assert got["acme/a5"] == 2 and got["acme/a1"] == 1
    assert all(len(page) <= 2 for page in pages)
    # a fresh listing sees everything, each adapter at its newest version
    assert dict(k for page in _all_pages(registry, size=3) for k in page) == {
        **{k: 1 for k in start if k != "acme/a6"}, "acme/a0": 1, "acme/a1": 2,
        "acme/a3b": 1, "acme/a5": 2}


def _many_versions(registry: Registry, adapters: int, per_adapter: int) -> None:
    """`per_adapter` version rows for each of `adapters` adapters, written directly: copies
    of one pushed version's row under new numbers and digests (metadata only)."""
    with db.write_tx(registry.engine) as conn:
        one = conn.execute(sa.select(db.versions)).mappings().one()
        template = {k: v for k, v in one.items() if k not in ("id", "adapter_id", "version")}
        now = template["created_at"]
        conn.execute(sa.insert(db.adapters), [
            {"tenant": "bulk", "name": f"n{i:04d}", "last_version": per_adapter,
             "created_at": now} for i in range(adapters)])
        ids = conn.execute(sa.select(db.adapters.c.id)
                           .where(db.adapters.c.tenant == "bulk")).scalars().all()
        conn.execute(sa.insert(db.versions), [
            template | {"adapter_id": a, "version": v, "digest": f"sha256:{a:032x}{v:032x}"}
            for a in ids for v in range(1, per_adapter + 1)])
        if conn.dialect.name == "postgresql":
            conn.execute(sa.text("ANALYZE"))


def _version_rows_read(conn: sa.Connection, q: sa.Select) -> int:
    """PostgreSQL: rows the executed plan read from lpx_versions (every loop counted)."""
    sql = str(q.compile(conn, compile_kwargs={"literal_binds": True}))
    plan = conn.execute(sa.text("EXPLAIN (ANALYZE, FORMAT JSON) " + sql)).scalar()

    def walk(node: dict[str, Any]) -> int:
        own = 0
        if node.get("Relation Name") == "lpx_versions":
            own = (node["Actual Rows"] + node.get("Rows Removed by Filter", 0)
                   + node.get("Rows Removed by Index Recheck", 0)) * node["Actual Loops"]
        return own + sum(walk(child) for child in node.get("Plans", []))

    if isinstance(plan, str):  # the driver may hand the JSON back as text
        plan = json.loads(plan)
    return walk(plan[0]["Plan"])


def test_a_page_reads_a_page_of_rows_not_every_version(registry, make_adapter,
                                                       micro_base: Path) -> None:
    registry.push(ADMIN, make_adapter(seed=1), "acme/seed", base=micro_base)
    _many_versions(registry, adapters=60, per_adapter=100)  # 6,000 versions
    size = 10
    first, token = registry.list_adapters(ADMIN, tenant="bulk", page_size=size)
    assert [v.version for v in first] == [100] * size
    late = None
    for _ in range(5):
        late, token = registry.list_adapters(ADMIN, tenant="bulk", page_size=size,
                                             page_token=token)
    assert late is not None and late[0].name == "n0050" and token is None  # the last page
    for tenant, after in ((None, None), (None, ("bulk", "n0049")), ("bulk", ("bulk", "n0049"))):
        q = page_query(tenant, after, size + 1)
        with registry.engine.connect() as conn:
            if conn.dialect.name == "sqlite":
                plan = [r[-1] for r in conn.execute(sa.text("EXPLAIN QUERY PLAN " + str(
                    q.compile(conn, compile_kwargs={"literal_binds": True}))))]
                assert not any(p.startswith("SCAN lpx_versions") or "TEMP B-TREE" in p
                               for p in plan), plan
                assert any("lpx_adapters USING COVERING INDEX" in p for p in plan), plan
            else:
                read = _version_rows_read(conn, q)
                assert read <= 3 * (size + 1), \
                    f"{read} version rows read for a page of {size}"


def test_a_page_can_start_after_a_key(registry, make_adapter, micro_base: Path) -> None:
    """`after="t/n"` (OpenAI's cursor: the last id a client saw) starts the page where a
    token naming that adapter would, whether or not the key exists."""
    for i, name in enumerate(("acme/a", "acme/b", "acme/c", "beta/d")):
        registry.push(ADMIN, make_adapter(seed=i), name, base=micro_base)
    page, token = registry.list_adapters(ADMIN, page_size=1, after="acme/a")
    assert [v.key for v in page] == ["acme/b"] and token is not None
    page, token = registry.list_adapters(ADMIN, page_size=5, after="acme/bb")
    assert [v.key for v in page] == ["acme/c", "beta/d"] and token is None
    page, _ = registry.list_adapters(Identity("acme"), after="acme/b")
    assert [v.key for v in page] == ["acme/c"]  # a tenant's own adapters only
    for bad in ("no-slash", "acme/a@prod"):
        with pytest.raises(InvalidArgument) as e:
            registry.list_adapters(ADMIN, after=bad)
        assert e.value.field == "after"
    with pytest.raises(InvalidArgument):
        registry.list_adapters(ADMIN, after="acme/a", page_token=token or "x")
