"""Aliases: named, movable pointers at versions (`t/n@prod`), with an audit log.

A move is compare-and-set (`expected`: the version the alias must point at now, None =
it must not exist, UNSET = any) and is logged in `lpx_alias_moves` and the change feed in
the same transaction. `latest` is implicit and cannot be moved: it always follows the
newest version.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from loraplex.errors import AliasConflict, InvalidArgument, NotFound, quote
from loraplex.registry import changefeed, db
from loraplex.registry.db import alias_moves, versions
from loraplex.registry.lookup import alias_target
from loraplex.registry.records import UNSET, AdapterVersion, AliasMove, Identity
from loraplex.registry.refs import LATEST, check_name, parse_key
from loraplex.registry.rows import Store, adapter_id, now, utc, visible_adapter


def check_move(alias: str, expected: int | None) -> None:
    """Refuse a bad alias name or `expected` before anything is read."""
    check_name(alias, "alias", field="alias")
    if alias == LATEST:
        raise InvalidArgument("`latest` follows the newest version and cannot be moved",
                              field="alias")
    if expected is not UNSET and expected is not None and (
            isinstance(expected, bool) or not isinstance(expected, int) or expected < 1):
        raise InvalidArgument(f"expected must be a version number >= 1, None or UNSET, "
                              f"got {quote(expected)}", field="expected")


def move(store: Store, identity: Identity, target: AdapterVersion, alias: str,
         expected: int | None) -> AliasMove:
    """Point `alias` at `target` (resolved by the caller), compare-and-set."""
    at = now()
    with db.write_tx(store.engine) as conn:
        aid = adapter_id(conn, target.tenant, target.name)
        db.lock_adapter(conn, aid)
        alive = conn.execute(sa.select(versions.c.id).where(
            versions.c.adapter_id == aid, versions.c.version == target.version)).first()
        if alive is None:
            raise NotFound(f"version {target.ref} not found", field="ref")
        current = alias_target(conn, aid, alias)
        if expected is not UNSET and current != expected:
            raise AliasConflict(
                f"alias {target.key}@{alias} points at {_vname(current)}, expected "
                f"{_vname(expected)}; re-read and retry", field="expected")
        done = AliasMove(target.tenant, target.name, alias, current, target.version, at,
                         identity.who)
        if current == target.version:
            return done  # already there: nothing to log
        if current is None:
            conn.execute(sa.insert(db.aliases).values(
                adapter_id=aid, alias=alias, version=target.version, updated_at=at,
                updated_by=identity.who))
        else:
            conn.execute(sa.update(db.aliases).where(
                db.aliases.c.adapter_id == aid, db.aliases.c.alias == alias)
                .values(version=target.version, updated_at=at, updated_by=identity.who))
        log_move(conn, aid, done)
        changefeed.emit(conn, "alias_moved", target.tenant, target.name, target.version,
                        alias, target.digest, at)
        return done


def aliases_of(store: Store, identity: Identity, key: str) -> dict[str, int]:
    """alias -> version number for `tenant/name` (`latest` is implicit, not listed)."""
    tenant, name = parse_key(key, field="ref")
    with db.read_tx(store.engine) as conn:
        aid = visible_adapter(conn, identity, tenant, name)
        rows = conn.execute(sa.select(db.aliases.c.alias, db.aliases.c.version)
                            .where(db.aliases.c.adapter_id == aid)
                            .order_by(db.aliases.c.alias)).all()
    return {a: v for a, v in rows}


def history(store: Store, identity: Identity, key: str,
            alias: str | None = None) -> list[AliasMove]:
    """The audit log of `tenant/name`'s aliases (one alias, or all), oldest first."""
    tenant, name = parse_key(key, field="ref")
    with db.read_tx(store.engine) as conn:
        aid = visible_adapter(conn, identity, tenant, name)
        q = sa.select(alias_moves).where(alias_moves.c.adapter_id == aid)
        if alias is not None:
            q = q.where(alias_moves.c.alias == alias)
        rows = conn.execute(q.order_by(alias_moves.c.id)).all()
    return [AliasMove(tenant, name, r.alias, r.from_version, r.to_version, utc(r.at), r.by)
            for r in rows]


def log_move(conn: Connection, aid: int, done: AliasMove) -> None:
    conn.execute(sa.insert(alias_moves).values(
        adapter_id=aid, alias=done.alias, from_version=done.from_version,
        to_version=done.to_version, at=done.at, by=done.by))


def _vname(v: int | None) -> str:
    return "nothing" if v is None else f"v{v}"
