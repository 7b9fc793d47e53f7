"""Per-tenant registry quotas: live versions and their bytes.

A push is refused with `QuotaExceeded` (RESOURCE_EXHAUSTED) before any blob is written,
and checked again inside the transaction that commits the version. Bytes are counted per
version (config + weights as uploaded), also where two versions share a blob: that is what
the tenant asked to keep. Deleting versions frees quota at once (their blobs go at gc).
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from loraplex.errors import QuotaExceeded
from loraplex.registry.db import adapters, versions
from loraplex.registry.settings import RegistrySettings


def usage(conn: Connection, tenant: str) -> tuple[int, int]:
    """(live versions, their bytes) of `tenant`."""
    n, used = conn.execute(
        sa.select(sa.func.count(versions.c.id), sa.func.coalesce(sa.func.sum(
            versions.c.size_bytes), 0))
        .select_from(versions.join(adapters)).where(adapters.c.tenant == tenant)).one()
    return int(n), int(used)


def check(conn: Connection, settings: RegistrySettings, tenant: str, size: int) -> None:
    """Refuse a new version of `size` bytes that would take `tenant` past a quota."""
    n, used = usage(conn, tenant)
    if n + 1 > settings.quota_versions:
        raise QuotaExceeded(f"tenant {tenant} holds {n} versions, its quota "
                            f"(LORAPLEX_QUOTA_VERSIONS={settings.quota_versions}); delete "
                            "versions to push more", field="name")
    if used + size > settings.quota_bytes:
        raise QuotaExceeded(f"tenant {tenant} holds {used} bytes of versions; {size} more "
                            f"exceed its quota (LORAPLEX_QUOTA_BYTES={settings.quota_bytes}); "
                            "delete versions to push more", field="name")
