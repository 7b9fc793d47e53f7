"""Opening a registry whose tables predate an index adds the index (no other migrations)."""

from __future__ import annotations

import sqlalchemy as sa

from loraplex.registry import Identity, Registry


def _indexes(reg: Registry, table: str) -> set[str]:
    with reg.engine.connect() as conn:
        return {i["name"] for i in sa.inspect(conn).get_indexes(table)}


def test_a_missing_index_is_created_on_the_next_open(registry, db_location) -> None:
    assert "ix_lpx_alias_moves_adapter" in _indexes(registry, "lpx_alias_moves")
    with registry.engine.begin() as conn:
        conn.execute(sa.text("DROP INDEX ix_lpx_alias_moves_adapter"))
    assert "ix_lpx_alias_moves_adapter" not in _indexes(registry, "lpx_alias_moves")
    location, kwargs = db_location
    with Registry.open(location, **kwargs) as again:
        assert "ix_lpx_alias_moves_adapter" in _indexes(again, "lpx_alias_moves")
        assert again.list_adapters(Identity.system()) == ([], None)
