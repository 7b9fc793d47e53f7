"""Deleting a version: its row goes at once, its blobs at the next `gc`.

Refused while an alias points at the version, unless forced, which removes those aliases
too (each removal logged like any move). Everything happens in one transaction, with one
change-feed event per removed alias and one for the version.
"""

from __future__ import annotations

import sqlalchemy as sa

from loraplex.errors import FailedPrecondition, InvalidArgument, NotFound
from loraplex.registry import changefeed, db
from loraplex.registry.aliases import log_move
from loraplex.registry.db import versions
from loraplex.registry.records import AdapterVersion, AliasMove, Identity
from loraplex.registry.refs import AdapterRef, parse_ref
from loraplex.registry.rows import Store, adapter_id, now


def pinned(ref: str | AdapterRef) -> AdapterRef:
    """The ref of a delete, which must pin the version (`t/n:vN` or `sha256:…`): `rm t/n`
    deleting whatever is newest at that moment is too easy a mistake."""
    r = parse_ref(ref)
    if r.version is None and r.digest is None:
        raise InvalidArgument(f"delete needs a pinned version (t/n:vN or sha256:…), got "
                              f"{r!s}", field="ref")
    return r


def delete(store: Store, identity: Identity, target: AdapterVersion,
           force: bool) -> AdapterVersion:
    at = now()
    with db.write_tx(store.engine) as conn:
        aid = adapter_id(conn, target.tenant, target.name)
        db.lock_adapter(conn, aid)
        pointing = conn.execute(sa.select(db.aliases.c.alias).where(
            db.aliases.c.adapter_id == aid, db.aliases.c.version == target.version)
            .order_by(db.aliases.c.alias)).scalars().all()
        if pointing and not force:
            raise FailedPrecondition(
                f"{target.ref} is the target of alias {', '.join(pointing)}: move the "
                "alias first, or force the delete", field="ref")
        gone = conn.execute(sa.delete(versions).where(
            versions.c.adapter_id == aid, versions.c.version == target.version))
        if gone.rowcount == 0:
            raise NotFound(f"version {target.ref} not found", field="ref")
        for alias in pointing:
            conn.execute(sa.delete(db.aliases).where(db.aliases.c.adapter_id == aid,
                                                     db.aliases.c.alias == alias))
            log_move(conn, aid, AliasMove(target.tenant, target.name, alias, target.version,
                                          None, at, identity.who))
            changefeed.emit(conn, "alias_moved", target.tenant, target.name, None, alias,
                            None, at)
        changefeed.emit(conn, "version_deleted", target.tenant, target.name, target.version,
                        None, target.digest, at)
    return target
