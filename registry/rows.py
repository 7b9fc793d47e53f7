"""What every part of the registry shares: the `Store` it works on and version rows.

`Store` is the registry's state (engine, blobs, settings, base catalog), passed to the
modules that each do one job (`versions`, `lookup`, `aliases`, `deletion`, `pull`,
`changefeed`). The helpers here read adapter and version rows and turn them into
`AdapterVersion` records; they run inside the caller's transaction.

A version's lineage (JSON, up to `max_lineage_bytes` at push; rows written under an older,
larger cap may hold megabytes) is never part of a version query: `to_version` takes it from
`LineageCache`, which reads and parses a version's lineage once, in its own point query (a
listed page's in one query: `prefetch`), and keeps it while it fits the cache's byte budget. Version rows never change, so a cached
lineage is never stale, and resolving a ref (every admitted request does) costs no JSON
parsing.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from loraplex.errors import NotFound
from loraplex.registry.bases import BaseCatalog
from loraplex.registry.blobstore import BlobStore
from loraplex.registry.db import adapters, versions
from loraplex.registry.records import AdapterVersion, Identity
from loraplex.registry.settings import RegistrySettings


@dataclass(frozen=True)
class Store:
    """The metadata database, the blob store and the settings one registry works with.
    `after_blobs` runs between a push's blob writes and its commit (a seam for tests)."""

    engine: Engine
    blobs: BlobStore
    settings: RegistrySettings
    bases: BaseCatalog
    after_blobs: Callable[[], None] = field(default=lambda: None)
    lineages: LineageCache = field(default_factory=lambda: LineageCache())


LINEAGE_CACHE_BYTES = 32 << 20  # JSON text of the lineages kept parsed, all versions


class LineageCache:
    """Parsed lineages of version rows, least recently used first out, bounded by the
    size of their JSON text (a lineage larger than the whole budget is parsed on each
    read, never kept). Keyed by (row id, digest, created_at): SQLite may reuse the id of a
    deleted newest row, never with the same creation time. Thread-safe."""

    def __init__(self, budget_bytes: int = LINEAGE_CACHE_BYTES) -> None:
        self.budget = budget_bytes
        self._lock = threading.Lock()
        self._items: OrderedDict[tuple, tuple[dict[str, Any], int]] = OrderedDict()
        self._bytes = 0
        self.reads = 0  # lineages read and parsed (tests)
        self.queries = 0  # queries that read them

    def get(self, conn: Connection, row: sa.Row) -> dict[str, Any]:
        """`row`'s lineage (a shallow copy: callers may add keys)."""
        key = _key(row)
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
                return dict(hit[0])
        return dict(self._read(conn, [row])[key])

    def prefetch(self, conn: Connection, rows: list[sa.Row]) -> None:
        """Read the lineages of `rows` not cached yet in one query (a page of versions)."""
        with self._lock:
            missing = [r for r in rows if _key(r) not in self._items]
        if missing:
            self._read(conn, missing)

    def _read(self, conn: Connection, rows: list[sa.Row]) -> dict[tuple, dict[str, Any]]:
        """Read, parse and (within the budget) keep the lineages of `rows`."""
        by_id = {r.id: r for r in rows}
        texts = conn.execute(sa.select(versions.c.id, sa.cast(versions.c.lineage, sa.Text))
                             .where(versions.c.id.in_(list(by_id)))).all()
        out = {}
        with self._lock:
            self.queries += 1
            for vid, text in texts:
                key, lineage = _key(by_id[vid]), _parse_lineage(text)
                out[key] = lineage
                self.reads += 1
                size = len(text or "")
                if size <= self.budget and key not in self._items:
                    self._items[key] = (lineage, size)
                    self._bytes += size
            while self._bytes > self.budget:
                _, (_, gone) = self._items.popitem(last=False)
                self._bytes -= gone
        for r in rows:  # a row deleted meanwhile: no lineage to show
            out.setdefault(_key(r), {})
        return out


def _key(row: sa.Row) -> tuple:
    return (row.id, row.digest, row.created_at)


def _parse_lineage(text: str | None) -> dict[str, Any]:
    value = json.loads(text) if text else {}
    return value if isinstance(value, dict) else {}


def now() -> datetime:
    return datetime.now(UTC)


def utc(ts: datetime) -> datetime:
    """SQLite hands timestamps back naive (they were written in UTC), PostgreSQL in the
    session's zone: normalise both to UTC."""
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


def not_found(tenant: str, name: str) -> NotFound:
    """The one message for "missing" and "someone else's": nothing leaks across tenants."""
    return NotFound(f"adapter {tenant}/{name} not found", field="ref")


VERSION_COLUMNS = tuple(c for c in versions.c if c.name != "lineage")


def version_query() -> sa.Select:
    """Version rows (all but the lineage: `LineageCache`) with their adapter's tenant and
    name."""
    return (sa.select(*VERSION_COLUMNS, adapters.c.tenant, adapters.c.name)
            .select_from(versions.join(adapters)))


def to_version(store: Store, conn: Connection, row: sa.Row, *, created: bool = True
               ) -> AdapterVersion:
    fp = store.bases.by_digest(conn, row.base_digest)
    if fp is None:  # FK guarantees the row; a missing one is a bug
        raise NotFound(f"base {row.base_digest} of {row.tenant}/{row.name} is gone")
    return AdapterVersion(
        tenant=row.tenant, name=row.name, version=row.version, digest=row.digest,
        size_bytes=row.size_bytes, rank=row.rank, alpha=row.alpha,
        use_rslora=row.use_rslora, target_modules=tuple(row.target_modules),
        dtype=row.dtype, base=fp, lineage=store.lineages.get(conn, row),
        created_at=utc(row.created_at), created_by=row.created_by,
        config_blob=row.config_blob, weights_blob=row.weights_blob, created=created)


def adapter_id(conn: Connection, tenant: str, name: str) -> int:
    found = conn.execute(sa.select(adapters.c.id).where(
        adapters.c.tenant == tenant, adapters.c.name == name)).scalar()
    if found is None:
        raise not_found(tenant, name)
    return found


def visible_adapter(conn: Connection, identity: Identity, tenant: str, name: str) -> int:
    """The adapter's id, or `NotFound` when it is missing or another tenant's."""
    if not identity.can_access(tenant):
        raise not_found(tenant, name)
    return adapter_id(conn, tenant, name)
