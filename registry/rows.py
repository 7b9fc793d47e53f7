"""What every part of the registry shares: the `Store` it works on and version rows.

`Store` is the registry's state (engine, blobs, settings, base catalog), passed to the
modules that each do one job (`versions`, `lookup`, `aliases`, `deletion`, `pull`,
`changefeed`). The helpers here read adapter and version rows and turn them into
`AdapterVersion` records; they run inside the caller's transaction.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

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


def now() -> datetime:
    return datetime.now(UTC)


def utc(ts: datetime) -> datetime:
    """SQLite hands timestamps back naive (they were written in UTC), PostgreSQL in the
    session's zone: normalise both to UTC."""
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


def not_found(tenant: str, name: str) -> NotFound:
    """The one message for "missing" and "someone else's": nothing leaks across tenants."""
    return NotFound(f"adapter {tenant}/{name} not found", field="ref")


def version_query() -> sa.Select:
    """Version rows with their adapter's tenant and name."""
    return (sa.select(versions, adapters.c.tenant, adapters.c.name)
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
        dtype=row.dtype, base=fp, lineage=dict(row.lineage or {}),
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
