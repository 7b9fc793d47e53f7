"""Finding adapters by part of their name, a page at a time (the console's search box).

    page, token = reg.search_adapters(me, "supp")          # acme/support, acme/support-fr …
    page, token = reg.search_adapters(me, "acme/supp")     # an admin narrows to one tenant

The same keyset walk as `lookup.list_adapters` (the (tenant, name) index from the page
token on, each adapter's newest version by (adapter_id, version)) with one more condition:
the name contains the text. A page stops as soon as it holds `page_size` matches, so a
page costs the adapters scanned up to its last match, not the whole table; the token names
that last match. A tenant's search never leaves its own tenant.
"""

from __future__ import annotations

from loraplex.errors import InvalidArgument
from loraplex.registry import db, lookup
from loraplex.registry.db import adapters
from loraplex.registry.records import AdapterVersion, Identity
from loraplex.registry.rows import Store, to_version

MAX_QUERY_CHARS = 129  # a tenant, "/", and a name


def search_adapters(store: Store, identity: Identity, query: str, *, page_size: int = 50,
                    page_token: str | None = None
                    ) -> tuple[list[AdapterVersion], str | None]:
    """The newest version of every visible adapter whose name contains `query` (`t/part`:
    of tenant `t`), ordered by `tenant/name`; an empty query lists every visible adapter."""
    if not isinstance(query, str) or len(query) > MAX_QUERY_CHARS:
        raise InvalidArgument(f"query must be at most {MAX_QUERY_CHARS} characters",
                              field="query")
    tenant, part = query.split("/", 1) if "/" in query else (None, query)
    if tenant is not None and not identity.can_access(tenant):
        return [], None
    if not identity.is_admin:
        tenant = identity.tenant
    if not 1 <= page_size <= lookup.MAX_PAGE_SIZE:
        raise InvalidArgument(f"page_size must be between 1 and {lookup.MAX_PAGE_SIZE}",
                              field="page_size")
    after = lookup._decode_page_token(page_token) if page_token else None
    q = lookup.page_query(tenant or None, after, page_size + 1)
    if part:
        q = q.where(adapters.c.name.contains(part.lower(), autoescape=True))
    with db.read_tx(store.engine) as conn:
        rows = conn.execute(q).all()
        out = [to_version(store, conn, r) for r in rows[:page_size]]
    token = lookup._encode_page_token(out[-1].key) if len(rows) > page_size else None
    return out, token
