"""API tokens with a lifecycle: create, authenticate, list, rotate, revoke, expire.

    secret, info = reg.tokens.create(Identity.system(), "acme", scope="inference",
                                     ttl_s=86400, label="ci")
    me = reg.tokens.authenticate(secret, peer="ipv4:10.0.0.7")
    reg.tokens.list(me_admin, "acme")          # TokenInfo: id, times, scope; never a secret
    new_secret, new = reg.tokens.rotate(me_admin, info.id, grace_s=300)
    reg.tokens.revoke(me_admin, new.id)
    reg.tokens.purge(me_admin, "acme", older_than_s=0)   # drop inactive rows (audited)

A token is `lpx_` + 256 random bits; the database keeps only its sha256 (a plain hash is
enough for a key that cannot be guessed) and a public id `tok_<hex>` by which it is listed,
rotated and revoked. Scopes (`records.SCOPES`): `inference` < `publish` < `admin`, each
allowing what the ones before it allow; managing tokens needs `admin` (a tenant-admin token
manages its own tenant's tokens, an admin's every tenant's). Every change is an audit row
in `lpx_token_events`, as alias moves are in `lpx_alias_moves`.

Revoked and expired tokens stay listed (`include_inactive`) for `token_retention_s` (30
days) after they stopped working; then their rows are purged, automatically whenever a token
is created (one statement over the table, which its own creations bound), or at once by
`purge` with a shorter `older_than_s`. Every purged token leaves a `purged` audit row; the
audit log itself is never purged.

Authentication is cheap for a caller that fails over and over, so a flood of bad tokens
costs neither a database query each nor a thread for long:
- a positive cache (`token_cache_s`) answers a known token without the database; a
  revocation in this process drops it at once, one in another process within that time;
- a negative cache remembers hashes the database did not know (or knew as revoked or
  expired) for a minute: the same bad token again costs a dict lookup;
- a peer (the caller's address, which both doors pass) that fails more than
  `auth_failures_free` times is refused, before any database work, for a backoff that
  doubles up to `auth_backoff_max_s` (`AuthThrottled`, RESOURCE_EXHAUSTED); a token this
  process already holds as good still passes, and is still looked up again when its
  cached answer is due (callers sharing the address, behind one proxy, keep working). A success does not clear the backoff (a caller holding one valid
  token could otherwise reset it between guesses): a peer's failures are forgotten once it
  has not failed for `auth_backoff_max_s`;
- at most `_LOOKUPS` database lookups of uncached tokens run at once per process;
- `authenticate_cached` gives every answer that needs no database (a cached good token, a
  backing-off peer, a known bad token) without blocking, so the doors call it on their
  event loop and move to a worker thread only for a real lookup.
Every table is bounded (LRU), so a flood of distinct tokens or peers holds bounded memory.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from loraplex.errors import (
    AuthThrottled,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    quote,
)
from loraplex.registry import db
from loraplex.registry.records import SCOPES, Identity, Scope
from loraplex.registry.refs import check_name
from loraplex.registry.settings import RegistrySettings

TOKEN_PREFIX = "lpx_"
_TOKEN_CHARS = 64  # lpx_ + 43 url-safe characters; anything longer is not ours
_NEGATIVE_TTL_S = 60.0
_LAST_USED_EVERY_S = 60.0  # last_used_at is written at most this often per token
_CACHE_ENTRIES = 65536
_LOOKUPS = 4
_BAD = "invalid, expired or revoked API token"
RETENTION_ACTOR = "system:token-retention"  # `by` of the automatic purge's audit rows


@dataclass(frozen=True)
class TokenInfo:
    """What may be shown about a token: never the secret, nor its hash."""

    id: str
    tenant: str
    role: str
    scope: str
    label: str
    created_at: datetime
    created_by: str
    expires_at: datetime | None
    last_used_at: datetime | None
    revoked_at: datetime | None
    revoked_by: str | None

    def active(self, now: datetime | None = None) -> bool:
        now = now or _now()
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > now)

    def as_dict(self) -> dict[str, Any]:
        return {k: (v.isoformat() if isinstance(v, datetime) else v)
                for k, v in self.__dict__.items()} | {"active": self.active()}


@dataclass(frozen=True)
class TokenEvent:
    """One audit row: a token created, rotated or revoked, when and by whom."""

    token_id: str
    tenant: str
    action: str
    detail: str
    at: datetime
    by: str


@dataclass
class _Peer:
    failures: int = 0
    blocked_until: float = 0.0
    last_failure: float = 0.0


class _Lru(OrderedDict):
    """An OrderedDict that forgets its oldest entry past `limit` (callers hold the lock)."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def put(self, key: Any, value: Any) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.limit:
            self.popitem(last=False)


class Tokens:
    """The token table of one registry database, plus this process's caches."""

    def __init__(self, engine: Engine, settings: RegistrySettings, *,
                 read_only: bool = False) -> None:
        self.engine = engine
        self.settings = settings
        self.read_only = read_only
        self._lock = threading.Lock()
        self._good: _Lru = _Lru(_CACHE_ENTRIES)  # hash -> (Identity, id, expires, until, used)
        self._bad: _Lru = _Lru(_CACHE_ENTRIES)  # hash -> monotonic time it is forgotten
        self._peers: _Lru = _Lru(_CACHE_ENTRIES)  # peer -> _Peer
        self._lookups = threading.BoundedSemaphore(_LOOKUPS)
        self.db_lookups = 0  # database lookups made by authenticate (tests, metrics)

    # ---------------------------------------------------------------- authenticate
    def authenticate(self, token: Any, *, peer: str | None = None) -> Identity:
        """The identity a token stands for. `Unauthenticated` for anything unknown,
        expired or revoked; `AuthThrottled` while `peer` is backing off."""
        mono = time.monotonic()
        h = self._well_formed(token, peer, mono)
        identity = self._cached(h, mono)  # a known token passes even a backing-off peer
        if identity is None:
            if not self._known(h):  # a good token whose check is due is asked again
                self._refuse_early(h, peer, mono)
            with self._lookups:
                identity = self._lookup(h, mono)
            if identity is None:
                self._failed(peer, h, mono)
        return identity

    def authenticate_cached(self, token: Any, *, peer: str | None = None) -> Identity | None:
        """What `authenticate` answers without the database, or None when it needs it
        (an uncached token, or a last-use time due). Never blocks on I/O: an event loop
        may call it."""
        mono = time.monotonic()
        h = self._well_formed(token, peer, mono)
        with self._lock:
            hit = self._good.get(h)
            if hit is not None:
                identity, _, expires, until, used = hit
                fresh = until > mono and (expires is None or expires > _now())
                return identity if fresh and mono - used < _LAST_USED_EVERY_S else None
        self._refuse_early(h, peer, mono)
        return None

    def _known(self, h: str) -> bool:
        """This process has held the token as good (its cached answer may be due for a
        recheck): it is looked up even while its peer backs off, so callers sharing an
        address with an attacker keep working past `token_cache_s`."""
        with self._lock:
            return h in self._good

    def _well_formed(self, token: Any, peer: str | None, mono: float) -> str:
        """The token's hash; a string that cannot be one of ours fails at once."""
        if (not isinstance(token, str) or not token.startswith(TOKEN_PREFIX)
                or len(token) > _TOKEN_CHARS):
            self._throttled(peer, mono)
            self._failed(peer, None, mono)
        return token_hash(token)

    def _refuse_early(self, h: str, peer: str | None, mono: float) -> None:
        """AuthThrottled for a backing-off peer, Unauthenticated for a hash known bad."""
        self._throttled(peer, mono)
        with self._lock:
            known_bad = self._bad.get(h, 0.0) > mono
        if known_bad:
            self._failed(peer, None, mono)

    def _throttled(self, peer: str | None, mono: float) -> None:
        """AuthThrottled while `peer` backs off (before any database work)."""
        if peer is None:
            return
        with self._lock:
            p = self._peers.get(peer)
            wait = 0.0 if p is None else p.blocked_until - mono
        if wait > 0:
            raise AuthThrottled(f"too many failed authentications from this address; retry "
                                f"in {wait:.0f} s", retry_after_s=wait)

    def _cached(self, h: str, mono: float) -> Identity | None:
        with self._lock:
            hit = self._good.get(h)
            if hit is None:
                return None
            identity, token_id, expires, until, used = hit
            if until <= mono or (expires is not None and expires <= _now()):
                return None  # kept (see `_known`) until the database says otherwise
            if mono - used >= _LAST_USED_EVERY_S:
                self._good[h] = (identity, token_id, expires, until, mono)
            else:
                return identity
        self._touch(token_id)
        return identity

    def _lookup(self, h: str, mono: float) -> Identity | None:
        self.db_lookups += 1
        with db.read_tx(self.engine) as conn:
            row = conn.execute(sa.select(db.tokens).where(db.tokens.c.token_hash == h)).first()
        now = _now()
        if row is None or row.revoked_at is not None or (
                row.expires_at is not None and _utc(row.expires_at) <= now):
            return None
        identity = Identity(tenant=row.tenant, role=row.role, scope=row.scope,
                            subject=f"{row.role}:{row.tenant}/token:{row.id}")
        expires = None if row.expires_at is None else _utc(row.expires_at)
        with self._lock:
            self._good.put(h, (identity, row.id, expires,
                               mono + self.settings.token_cache_s, mono))
        last = None if row.last_used_at is None else _utc(row.last_used_at)
        if last is None or (now - last).total_seconds() >= _LAST_USED_EVERY_S:
            self._touch(row.id)
        return identity

    def _failed(self, peer: str | None, h: str | None, mono: float) -> None:
        """Remember the failure (the hash, and the peer's count) and raise."""
        with self._lock:
            if h is not None:
                self._good.pop(h, None)
                self._bad.put(h, mono + _NEGATIVE_TTL_S)
            if peer is not None:
                p = self._peers.get(peer) or _Peer()
                if mono - p.last_failure >= self.settings.auth_backoff_max_s:
                    p.failures = 0  # quiet for a whole backoff: forgiven
                p.failures += 1
                p.last_failure = mono
                over = p.failures - self.settings.auth_failures_free
                if over > 0:
                    p.blocked_until = mono + min(self.settings.auth_backoff_max_s,
                                                 2.0 ** (over - 1))
                self._peers.put(peer, p)
        raise Unauthenticated(_BAD, field="token")

    def _touch(self, token_id: str) -> None:
        """Record last use (at most once a minute per token and process); a registry this
        process cannot write keeps the old time, and a failed write never fails a call."""
        if self.read_only:
            return
        try:
            with db.write_tx(self.engine) as conn:
                conn.execute(sa.update(db.tokens).where(db.tokens.c.id == token_id)
                             .values(last_used_at=_now()))
        except sa.exc.DBAPIError as e:
            from loraplex.registry.faults import log

            log.warning("could not record the last use of token %s: %s", token_id,
                        type(getattr(e, "orig", e)).__name__)

    # ---------------------------------------------------------------- lifecycle
    def create(self, identity: Identity, tenant: str, *, scope: Scope | None = None,
               admin: bool = False, ttl_s: float | None = None,
               label: str = "") -> tuple[str, TokenInfo]:
        """A new token for `tenant` (shown once) and its record. `admin`: an admin token
        (every tenant, scope admin). `ttl_s`: expiry in seconds from now (None: never)."""
        check_name(tenant, "tenant", field="tenant")
        scope = _scope("admin" if admin else (scope or "publish"))
        if admin and scope != "admin":
            raise InvalidArgument("an admin token has scope admin", field="scope")
        if admin and not identity.is_admin:
            raise PermissionDenied("only an admin can create admin tokens", field="admin")
        self._may_manage(identity, tenant)
        if not identity.allows(scope):
            raise PermissionDenied(f"{identity.who} may not create a token of scope {scope}",
                                   field="scope")
        expires = _expiry(ttl_s)
        label = _label(label)
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        token_id = "tok_" + secrets.token_hex(8)
        now = _now()
        with db.write_tx(self.engine) as conn:
            conn.execute(sa.insert(db.tokens).values(
                token_hash=token_hash(token), id=token_id, tenant=tenant,
                role="admin" if admin else "tenant", scope=scope, label=label,
                created_at=now, created_by=identity.who, expires_at=expires))
            _audit(conn, token_id, tenant, "created", f"scope={scope}"
                   + (f" expires={expires.isoformat()}" if expires else ""), now, identity)
            _purge(conn, None, now - timedelta(seconds=self.settings.token_retention_s), now,
                   RETENTION_ACTOR, "retention")
        return token, self.get(identity, token_id)

    def get(self, identity: Identity, token_id: str) -> TokenInfo:
        with db.read_tx(self.engine) as conn:
            row = conn.execute(sa.select(db.tokens).where(db.tokens.c.id == token_id)).first()
        if (row is None or not identity.can_access(row.tenant) or not identity.allows("admin")
                or (row.role == "admin" and not identity.is_admin)):
            raise NotFound(f"token {quote(token_id)} not found", field="token_id")
        return _info(row)

    def list(self, identity: Identity, tenant: str | None = None, *,
             include_inactive: bool = False) -> list[TokenInfo]:
        """Tokens of `tenant` (default: the caller's; an admin's None = every tenant's),
        oldest first. Revoked and expired ones only with `include_inactive`."""
        if tenant is not None:
            check_name(tenant, "tenant", field="tenant")
        self._may_manage(identity, tenant or identity.tenant)
        q = sa.select(db.tokens).order_by(db.tokens.c.created_at, db.tokens.c.id)
        if tenant is not None or not identity.is_admin:
            q = q.where(db.tokens.c.tenant == (tenant or identity.tenant))
        if not identity.is_admin:  # an admin token is managed by admins only
            q = q.where(db.tokens.c.role != "admin")
        with db.read_tx(self.engine) as conn:
            infos = [_info(r) for r in conn.execute(q)]
        return infos if include_inactive else [i for i in infos if i.active()]

    def revoke(self, identity: Identity, token_id: str) -> TokenInfo:
        """Revoke a token now (safe to repeat). This process stops accepting it at once,
        others within `token_cache_s`."""
        info = self.get(identity, token_id)
        self._may_manage(identity, info.tenant)
        now = _now()
        with db.write_tx(self.engine) as conn:
            done = conn.execute(sa.update(db.tokens).where(
                db.tokens.c.id == token_id, db.tokens.c.revoked_at.is_(None))
                .values(revoked_at=now, revoked_by=identity.who))
            if done.rowcount:
                _audit(conn, token_id, info.tenant, "revoked", "", now, identity)
        self._forget(token_id)
        return self.get(identity, token_id)

    def rotate(self, identity: Identity, token_id: str, *, grace_s: float = 0.0,
               ttl_s: float | None = None) -> tuple[str, TokenInfo]:
        """A new token with the old one's tenant, scope and label; the old one stops
        working after `grace_s` seconds (0: now). `ttl_s` for the new one (default: the
        old one's remaining lifetime, or none)."""
        old = self.get(identity, token_id)
        self._may_manage(identity, old.tenant)
        if not old.active():
            raise NotFound(f"token {quote(token_id)} is revoked or expired", field="token_id")
        if grace_s < 0 or grace_s > 7 * 86400:
            raise InvalidArgument("grace_s must be between 0 and 7 days", field="grace_s")
        if ttl_s is None and old.expires_at is not None:
            ttl_s = max(1.0, (old.expires_at - _now()).total_seconds())
        secret, new = self.create(identity, old.tenant, scope=old.scope,  # type: ignore[arg-type]
                                  admin=old.role == "admin", ttl_s=ttl_s, label=old.label)
        now = _now()
        with db.write_tx(self.engine) as conn:
            if grace_s == 0:
                conn.execute(sa.update(db.tokens).where(db.tokens.c.id == token_id)
                             .values(revoked_at=now, revoked_by=identity.who))
            else:
                until = now + timedelta(seconds=grace_s)
                if old.expires_at is None or old.expires_at > until:
                    conn.execute(sa.update(db.tokens).where(db.tokens.c.id == token_id)
                                 .values(expires_at=until))
            _audit(conn, token_id, old.tenant, "rotated", f"to={new.id} grace_s={grace_s:g}",
                   now, identity)
        self._forget(token_id)
        return secret, new

    def purge(self, identity: Identity, tenant: str | None = None, *,
              older_than_s: float | None = None) -> list[str]:
        """Delete the rows of `tenant`'s tokens (default: the caller's; an admin's None =
        every tenant's) revoked or expired at least `older_than_s` ago (default
        `token_retention_s`; 0: every inactive one). Returns their ids, each audited as
        `purged`. Active tokens are never touched."""
        if tenant is not None:
            check_name(tenant, "tenant", field="tenant")
        self._may_manage(identity, tenant or identity.tenant)
        if older_than_s is None:
            older_than_s = self.settings.token_retention_s
        if (isinstance(older_than_s, bool) or not isinstance(older_than_s, int | float)
                or not 0 <= older_than_s <= 10 * 365 * 86400):
            raise InvalidArgument(f"older_than_s must be seconds in [0, 10 years], got "
                                  f"{quote(older_than_s)}", field="older_than_s")
        scope = tenant or (None if identity.is_admin else identity.tenant)
        now = _now()
        with db.write_tx(self.engine) as conn:
            return _purge(conn, scope, now - timedelta(seconds=older_than_s), now,
                          identity.who, f"older_than_s={older_than_s:g}",
                          admins=identity.is_admin)

    def history(self, identity: Identity, tenant: str | None = None) -> list[TokenEvent]:
        """The audit log of `tenant`'s tokens (default: the caller's), oldest first."""
        tenant = tenant or identity.tenant
        check_name(tenant, "tenant", field="tenant")
        self._may_manage(identity, tenant)
        with db.read_tx(self.engine) as conn:
            rows = conn.execute(sa.select(db.token_events).where(
                db.token_events.c.tenant == tenant).order_by(db.token_events.c.id)).all()
        return [TokenEvent(r.token_id, r.tenant, r.action, r.detail, _utc(r.at), r.by)
                for r in rows]

    # ---------------------------------------------------------------- helpers
    @staticmethod
    def _may_manage(identity: Identity, tenant: str) -> None:
        identity.require("admin", "manage API tokens")
        if not identity.can_access(tenant):
            raise PermissionDenied(f"{identity.who} may not manage tokens of tenant {tenant}",
                                   field="tenant")

    def _forget(self, token_id: str) -> None:
        """Drop a token from this process's positive cache and remember it as bad."""
        mono = time.monotonic()
        with self._lock:
            for h, hit in list(self._good.items()):
                if hit[1] == token_id:
                    del self._good[h]
                    self._bad.put(h, mono + _NEGATIVE_TTL_S)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _now() -> datetime:
    return datetime.now(UTC)


def _utc(ts: datetime) -> datetime:
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


def _scope(value: Any) -> Scope:
    if value not in SCOPES:
        raise InvalidArgument(f"scope must be one of {', '.join(SCOPES)}, got {quote(value)}",
                              field="scope")
    return value


def _expiry(ttl_s: float | None) -> datetime | None:
    if ttl_s is None:
        return None
    if isinstance(ttl_s, bool) or not isinstance(ttl_s, int | float) or not 0 < ttl_s <= 10 * 365 * 86400:
        raise InvalidArgument(f"ttl_s must be a number of seconds in (0, 10 years], got "
                              f"{quote(ttl_s)}", field="ttl_s")
    return _now() + timedelta(seconds=float(ttl_s))


def _label(label: Any) -> str:
    if not isinstance(label, str) or len(label) > 128 or not label.isprintable():
        raise InvalidArgument(f"label must be printable text of at most 128 characters, got "
                              f"{quote(label)}", field="label")
    return label


def _info(row: sa.Row) -> TokenInfo:
    def ts(v: datetime | None) -> datetime | None:
        return None if v is None else _utc(v)

    return TokenInfo(id=row.id, tenant=row.tenant, role=row.role, scope=row.scope,
                     label=row.label, created_at=_utc(row.created_at),
                     created_by=row.created_by, expires_at=ts(row.expires_at),
                     last_used_at=ts(row.last_used_at), revoked_at=ts(row.revoked_at),
                     revoked_by=row.revoked_by)


def _purge(conn: sa.Connection, tenant: str | None, cutoff: datetime, now: datetime,
           by: str, detail: str, *, admins: bool = True) -> list[str]:
    """Delete the token rows (of `tenant`; None: all) that stopped working at or before
    `cutoff` (revoked, or expired), with a `purged` audit row each; their ids."""
    t = db.tokens
    q = sa.select(t.c.id, t.c.tenant).where(sa.or_(t.c.revoked_at <= cutoff,
                                                   t.c.expires_at <= cutoff))
    if tenant is not None:
        q = q.where(t.c.tenant == tenant)
    if not admins:  # a tenant-admin token never sees admin tokens, nor purges them
        q = q.where(t.c.role != "admin")
    rows = conn.execute(q.order_by(t.c.id)).all()
    if not rows:
        return []
    ids = [r.id for r in rows]
    conn.execute(sa.delete(t).where(t.c.id.in_(ids)))
    conn.execute(sa.insert(db.token_events), [
        {"token_id": r.id, "tenant": r.tenant, "action": "purged", "detail": detail,
         "at": now, "by": by} for r in rows])
    return ids


def _audit(conn: sa.Connection, token_id: str, tenant: str, action: str, detail: str,
           at: datetime, identity: Identity) -> None:
    conn.execute(sa.insert(db.token_events).values(token_id=token_id, tenant=tenant,
                                                   action=action, detail=detail, at=at,
                                                   by=identity.who))
