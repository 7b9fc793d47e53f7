"""Reading versions: `resolve` a ref, list one adapter's versions, page through adapters.

Every query here is an index lookup whose cost does not grow with the number of versions:
`resolve` seeks (adapter_id, version) or the digest index; `list_adapters` walks the
(tenant, name) index from the page token on (keyset pagination) and, per adapter on the
page, seeks its newest version in (adapter_id, version). A late page costs what the first
does, and ten thousand versions of one adapter cost what one does.
"""

from __future__ import annotations

import base64

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from loraplex.errors import InvalidArgument, LoraplexError, NotFound
from loraplex.registry import db
from loraplex.registry.db import adapters, versions
from loraplex.registry.records import AdapterVersion, Identity
from loraplex.registry.refs import LATEST, AdapterRef, check_name, parse_key, parse_ref
from loraplex.registry.rows import (
    VERSION_COLUMNS,
    Store,
    not_found,
    to_version,
    version_query,
    visible_adapter,
)

MAX_PAGE_SIZE = 1000


def resolve(store: Store, identity: Identity, ref: str | AdapterRef) -> AdapterVersion:
    """The version a ref names right now (aliases and `latest` are followed): one
    statement, and a second one only to say what is missing."""
    r = parse_ref(ref)
    with db.statement_read(store.engine) as conn:
        if r.digest is not None:
            return _resolve_digest(store, conn, identity, r.digest)
        tenant, name = r.tenant or "", r.name or ""
        if not identity.can_access(tenant):
            raise not_found(tenant, name)
        q = version_query().where(adapters.c.tenant == tenant, adapters.c.name == name)
        if r.version is not None:
            q = q.where(versions.c.version == r.version)
        elif r.alias is not None and r.alias != LATEST:
            target = (sa.select(db.aliases.c.version)
                      .where(db.aliases.c.adapter_id == adapters.c.id,
                             db.aliases.c.alias == r.alias)
                      .correlate(adapters).scalar_subquery())
            q = q.where(versions.c.version == target)
        else:
            q = q.order_by(versions.c.version.desc()).limit(1)
        row = conn.execute(q).first()
        if row is None:
            raise _missing(conn, r, tenant, name)
        return to_version(store, conn, row)


def _missing(conn: Connection, r: AdapterRef, tenant: str, name: str) -> NotFound:
    """Why `r` resolved to nothing: no such adapter (or no live version), version, alias."""
    aid = conn.execute(sa.select(adapters.c.id).where(
        adapters.c.tenant == tenant, adapters.c.name == name)).scalar()
    if aid is None or (r.version is None and (r.alias is None or r.alias == LATEST)):
        return not_found(tenant, name)
    if r.version is not None:
        return NotFound(f"version {r} not found", field="ref")
    return NotFound(f"alias {r} not found", field="ref")


def _resolve_digest(store: Store, conn: Connection, identity: Identity,
                    digest: str) -> AdapterVersion:
    q = version_query().where(versions.c.digest == digest)
    if not identity.is_admin:
        q = q.where(adapters.c.tenant == identity.tenant)
    row = conn.execute(q.order_by(versions.c.id).limit(1)).first()
    if row is None:
        raise NotFound(f"adapter {digest} not found", field="ref")
    return to_version(store, conn, row)


def alias_target(conn: Connection, aid: int, alias: str) -> int | None:
    return conn.execute(sa.select(db.aliases.c.version).where(
        db.aliases.c.adapter_id == aid, db.aliases.c.alias == alias)).scalar()


def list_versions(store: Store, identity: Identity, key: str) -> list[AdapterVersion]:
    """Every live version of `tenant/name`, oldest first."""
    tenant, name = parse_key(key, field="ref")
    with db.read_tx(store.engine) as conn:
        aid = visible_adapter(conn, identity, tenant, name)
        rows = conn.execute(version_query().where(versions.c.adapter_id == aid)
                            .order_by(versions.c.version)).all()
        if not rows:
            raise not_found(tenant, name)
        store.lineages.prefetch(conn, rows)
        return [to_version(store, conn, r) for r in rows]


def list_adapters(store: Store, identity: Identity, *, tenant: str | None = None,
                  page_size: int = 100, page_token: str | None = None,
                  after: str | None = None) -> tuple[list[AdapterVersion], str | None]:
    """The newest version of every visible adapter, ordered by `tenant/name`; the token
    names the last adapter of the page, and the next page starts after it. `after` (a
    `tenant/name`, which need not exist) starts the page after that key instead of a
    token: the cursor of OpenAI's `after=<model id>`."""
    if not 1 <= page_size <= MAX_PAGE_SIZE:
        raise InvalidArgument(f"page_size must be between 1 and {MAX_PAGE_SIZE}",
                              field="page_size")
    if after is not None and page_token is not None:
        raise InvalidArgument("give `page_token` or `after`, not both", field="after")
    if after is not None:
        page_token = _encode_page_token("/".join(parse_key(after, field="after")))
    if tenant is not None:
        check_name(tenant, "tenant", field="tenant")
        if not identity.can_access(tenant):
            return [], None
    elif not identity.is_admin:
        tenant = identity.tenant
    after = _decode_page_token(page_token) if page_token else None
    with db.read_tx(store.engine) as conn:
        rows = conn.execute(page_query(tenant, after, page_size + 1)).all()
        store.lineages.prefetch(conn, rows[:page_size])
        out = [to_version(store, conn, r) for r in rows[:page_size]]
    token = _encode_page_token(out[-1].key) if len(rows) > page_size else None
    return out, token


def page_query(tenant: str | None, after: tuple[str, str] | None, limit: int) -> sa.Select:
    """Newest versions of the adapters after `after` in (tenant, name) order: the
    (tenant, name) index from `after` on, joined to each adapter's highest version."""
    newest = (sa.select(versions.c.version).where(versions.c.adapter_id == adapters.c.id)
              .order_by(versions.c.version.desc()).limit(1)
              .correlate(adapters).scalar_subquery())
    q = (sa.select(*VERSION_COLUMNS, adapters.c.tenant, adapters.c.name)
         .select_from(adapters.join(versions, sa.and_(versions.c.adapter_id == adapters.c.id,
                                                      versions.c.version == newest))))
    if tenant is not None:
        q = q.where(adapters.c.tenant == tenant)
    if after is not None and after[0] == tenant:  # within one tenant: a range of names
        q = q.where(adapters.c.name > after[1])
    elif after is not None:
        q = q.where(sa.tuple_(adapters.c.tenant, adapters.c.name) > sa.tuple_(*after))
    return q.order_by(adapters.c.tenant, adapters.c.name).limit(limit)


def _encode_page_token(key: str) -> str:
    return base64.urlsafe_b64encode(key.encode()).decode().rstrip("=")


def _decode_page_token(token: str) -> tuple[str, str]:
    try:
        text = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        return parse_key(text, field="page_token")
    except (ValueError, LoraplexError):
        raise InvalidArgument("page_token is not one this registry issued",
                              field="page_token") from None
