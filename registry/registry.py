"""The adapter registry: immutable, content-addressed versions with audited aliases.

    reg = Registry.open("./.loraplex/registry")            # SQLite + ./blobs
    v = reg.push(Identity.system(), "./adapter", "acme/support", base="./base")
    reg.set_alias(me, "acme/support:v1", "prod", expected=None)
    loaded = reg.load_adapter(reg.resolve(me, "acme/support@prod"))

`Registry` is the one object callers hold; each job lives in its own module and this class
only opens the store, checks what every call shares and delegates:

| module | job |
|---|---|
| `bases.py` | base models: register, find by name, fingerprint cache |
| `versions.py` | push: validate, write blobs, commit the version and its event |
| `lookup.py` | resolve refs, list versions, page through adapters (keyset) |
| `aliases.py` | compare-and-set alias moves and their audit log |
| `deletion.py` | delete a version (and, forced, the aliases on it) |
| `pull.py` | a version's tensors or peft files, digest-checked |
| `changefeed.py` | the change feed: events, the head, waiting (LISTEN/NOTIFY or polling) |
| `search.py` | adapters whose name contains a text, keyset-paged (the console's search) |
| `evaluations.py` | the scores each version got (`loraplex eval`, gates), append-only |

Environment failures (disk full, read-only or forbidden storage, a dropped database) come
out as typed errors naming the path or database (`registry/faults.py`): public reads retry
once on a dropped connection, writes never replay. A registry whose SQLite directory is
not writable opens read-only: reads work, writes raise `StorageReadOnly` up front.

Access rule: a tenant identity reads and changes only its own tenant's adapters; asking for
another tenant's adapter raises exactly the `NotFound` that a missing one raises. Admins
act on every tenant; only admins register bases and create admin tokens.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from loraplex.errors import DataCorruption, InvalidArgument, PermissionDenied
from loraplex.fingerprint import BaseFingerprint
from loraplex.registry import (
    aliases,
    changefeed,
    db,
    deletion,
    evaluations,
    faults,
    lookup,
    pull,
    search,
    versions,
)
from loraplex.registry.bases import BaseArg, BaseCatalog
from loraplex.registry.blobstore import BlobStore, LocalBlobStore, open_blob_store
from loraplex.registry.db import adapters
from loraplex.registry.evaluations import Evaluation
from loraplex.registry.records import (
    UNSET,
    AdapterVersion,
    AliasMove,
    Change,
    GcReport,
    Identity,
    LoadedAdapter,
    Scope,
)
from loraplex.registry.refs import AdapterRef
from loraplex.registry.rows import Store, now, utc
from loraplex.registry.settings import RegistrySettings
from loraplex.registry.tokens import TokenEvent, TokenInfo, Tokens

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class Registry:
    """Metadata DB + blob store. Thread-safe; one instance per process is plenty."""

    def __init__(self, engine: Engine, blobs: BlobStore,
                 settings: RegistrySettings | None = None, *, read_only: bool = False) -> None:
        self.engine = engine
        self.blobs = blobs
        self.settings = settings or RegistrySettings()
        self.read_only = read_only
        self.db_where = _where(engine)
        self.base_catalog = BaseCatalog(engine, self.settings.commit_retries)
        self.store = Store(engine, blobs, self.settings, self.base_catalog,
                           after_blobs=lambda: self._on_blobs_written())
        self.feed = changefeed.ChangeFeed(engine, self.settings.change_poll_s)
        self.tokens = Tokens(engine, self.settings, read_only=read_only)
        if not read_only:
            self._create_tables()

    @faults.writes
    def _create_tables(self) -> None:
        db.create_tables(self.engine)

    def _on_blobs_written(self) -> None:
        """Seam between a push's blob writes and its commit; crash tests inject faults."""

    # ---------------------------------------------------------------- lifecycle
    @classmethod
    def open(cls, location: str | os.PathLike[str], *,
             blob_dir: str | os.PathLike[str] | None = None,
             settings: RegistrySettings | None = None) -> Registry:
        """`location`: a registry directory (SQLite `registry.db` + `blobs/`) or a
        SQLAlchemy URL, whose blobs live in `blob_dir` or `$LORAPLEX_BLOB_DIR` (for a
        `sqlite:///` URL, default: `blobs/` beside the database file). A blob location
        `s3://bucket/prefix` keeps blobs in S3-compatible storage (`s3store.py`)."""
        settings = settings or RegistrySettings()
        url, root = db.database_url(location)
        blob_root = blob_dir or (root / "blobs" if root else None) \
            or os.environ.get("LORAPLEX_BLOB_DIR") or _sqlite_blob_dir(url)
        if blob_root is None:
            raise InvalidArgument(f"{url.split('@')[-1]}: a database URL needs blob_dir or "
                                  "$LORAPLEX_BLOB_DIR", field="blob_dir")
        read_only = db.sqlite_read_only(url)
        blobs = open_blob_store(blob_root, **settings.s3_options())
        return cls(db.create_engine(url, settings, read_only=read_only), blobs, settings,
                   read_only=read_only)

    def close(self) -> None:
        self.feed.close()
        self.engine.dispose()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- bases
    def register_base(self, identity: Identity, base_dir: str | os.PathLike[str], *,
                      names: list[str] | None = None) -> BaseFingerprint:
        """Fingerprint a base and make it findable by the names adapters declare in
        `base_model_name_or_path` (the path as given, its absolute form, plus `names`).
        On a read-only registry a base already recorded so is fine (a server starting on
        a read-only replica registers its base): nothing would change."""
        if not identity.is_admin:
            raise PermissionDenied("only an admin can register base models", field="base")
        if self.read_only:
            known = self._registered_base(base_dir, names)
            if known is not None:
                return known
        return self._register_base(identity, base_dir, names)

    @faults.reads
    def _registered_base(self, base_dir: str | os.PathLike[str],
                         names: list[str] | None) -> BaseFingerprint | None:
        return self.base_catalog.registered(base_dir, names)

    @faults.writes
    def _register_base(self, identity: Identity, base_dir: str | os.PathLike[str],
                       names: list[str] | None) -> BaseFingerprint:
        return self.base_catalog.register(identity, base_dir, names)

    @faults.reads
    def list_bases(self) -> list[tuple[list[str], BaseFingerprint]]:
        """Every known base with the names it was registered under."""
        return self.base_catalog.list()

    # ---------------------------------------------------------------- versions
    @faults.writes
    def push(self, identity: Identity, adapter_dir: str | os.PathLike[str], name: str, *,
             base: BaseArg = None, lineage: dict[str, Any] | None = None) -> AdapterVersion:
        """Register the peft adapter in `adapter_dir` as the next version of `name`
        (`versions.read_adapter_dir` says which files are read and which refused)."""
        config, weights, problems = versions.read_adapter_dir(adapter_dir)
        return versions.register(self.store, identity, name, config, weights, base,
                                 lineage, problems)

    @faults.writes
    def push_bytes(self, identity: Identity, name: str, config_json: bytes,
                   safetensors: bytes, *, base: BaseArg = None,
                   lineage: dict[str, Any] | None = None) -> AdapterVersion:
        """`push` for callers holding the two files in memory (gRPC upload, trainer)."""
        return versions.register(self.store, identity, name, config_json, safetensors,
                                 base, lineage, [])

    @faults.reads
    def resolve(self, identity: Identity, ref: str | AdapterRef) -> AdapterVersion:
        """The version a ref names right now (aliases and `latest` are followed)."""
        return lookup.resolve(self.store, identity, ref)

    @faults.reads
    def list_adapters(self, identity: Identity, *, tenant: str | None = None,
                      page_size: int = 100, page_token: str | None = None,
                      after: str | None = None) -> tuple[list[AdapterVersion], str | None]:
        """The newest version of every visible adapter, ordered by `tenant/name`; a page
        starts after `page_token`'s adapter, or after the key `after` (`t/n`)."""
        return lookup.list_adapters(self.store, identity, tenant=tenant,
                                    page_size=page_size, page_token=page_token, after=after)

    @faults.reads
    def search_adapters(self, identity: Identity, query: str, *, page_size: int = 50,
                        page_token: str | None = None
                        ) -> tuple[list[AdapterVersion], str | None]:
        """`list_adapters` of the adapters whose name contains `query` (search.py)."""
        return search.search_adapters(self.store, identity, query, page_size=page_size,
                                      page_token=page_token)

    @faults.reads
    def list_versions(self, identity: Identity, key: str) -> list[AdapterVersion]:
        """Every live version of `tenant/name`, oldest first."""
        return lookup.list_versions(self.store, identity, key)

    # ---------------------------------------------------------------- aliases
    @faults.reads
    def aliases(self, identity: Identity, key: str) -> dict[str, int]:
        """alias -> version number for `tenant/name` (`latest` is implicit, not listed)."""
        return aliases.aliases_of(self.store, identity, key)

    @faults.writes
    def set_alias(self, identity: Identity, ref: str | AdapterRef, alias: str, *,
                  expected: int | None = UNSET) -> AliasMove:
        """Point `alias` at the version `ref` names, compare-and-set: `expected` is the
        version the alias must point at now, None = it must not exist, UNSET = any.
        `latest` cannot be moved: it always follows the newest version."""
        aliases.check_move(alias, expected)
        identity.require("publish", "move aliases")
        target = self.resolve(identity, ref)
        return db.with_retries(lambda: aliases.move(self.store, identity, target, alias,
                                                    expected),
                               self.settings.commit_retries)

    @faults.reads
    def alias_history(self, identity: Identity, key: str,
                      alias: str | None = None) -> list[AliasMove]:
        """The audit log of `tenant/name`'s aliases (one alias, or all), oldest first."""
        return aliases.history(self.store, identity, key, alias)

    # ---------------------------------------------------------------- evaluations
    @faults.writes
    def record_evaluation(self, identity: Identity, ref: str | AdapterRef, name: str,
                          metrics: dict[str, float], *, data_digest: str | None = None,
                          detail: dict[str, Any] | None = None) -> Evaluation:
        """Keep the scores `name` (e.g. "eval", "gate") that the version `ref` got
        (evaluations.py): append-only, audited, scope `publish`."""
        metrics, detail = evaluations.check(name, metrics, data_digest, detail)
        identity.require("publish", "record evaluations")
        target = self.resolve(identity, ref)
        return evaluations.record(self.store, identity, target, name, metrics, data_digest,
                                  detail)

    @faults.reads
    def evaluations(self, identity: Identity, key: str, *,
                    version: int | None = None) -> list[Evaluation]:
        """The evaluation records of `tenant/name` (or one version), oldest first."""
        return evaluations.of_adapter(self.store, identity, key, version)

    # ---------------------------------------------------------------- retiring
    @faults.writes
    def delete_version(self, identity: Identity, ref: str | AdapterRef, *,
                       force: bool = False) -> AdapterVersion:
        """Remove a version (its blobs go at the next `gc`). Refused while an alias points
        at it, unless `force`, which removes those aliases too (logged). The ref must pin
        the version (`t/n:vN` or `sha256:…`)."""
        identity.require("publish", "delete versions")
        target = self.resolve(identity, deletion.pinned(ref))
        return db.with_retries(lambda: deletion.delete(self.store, identity, target, force),
                               self.settings.commit_retries)

    # ---------------------------------------------------------------- content
    def load_adapter(self, version: AdapterVersion) -> LoadedAdapter:
        """Config + torch tensors of a version, every byte digest-checked. Tensor keys are
        base-model module paths (`model.layers.0.self_attn.q_proj.lora_A.weight`)."""
        return pull.load_adapter(self.blobs, version)

    def pull(self, identity: Identity, ref: str | AdapterRef,
             dest: str | os.PathLike[str]) -> Path:
        """Write the version's peft files (plus `loraplex_manifest.json`) into `dest`."""
        return pull.write_files(self.blobs, self.resolve(identity, ref), dest)

    @faults.reads
    def verify(self) -> list[str]:
        """Re-hash every blob; report corrupt blobs and versions whose blobs are gone."""
        users = self._blob_users()
        problems: list[str] = []
        present: set[str] = set()
        for digest, _size, _age in self.blobs.list():
            present.add(digest)
            try:
                self.blobs.get(digest)
            except DataCorruption as e:
                used = ", ".join(sorted(users.get(digest, []))) or "no version"
                problems.append(f"{e} (used by {used})")
        for digest, refs in sorted(users.items()):
            if digest not in present:
                problems.append(f"blob {digest} is missing (used by {', '.join(sorted(refs))})")
        return problems

    @faults.writes
    def gc(self, *, min_age_s: float | None = None) -> GcReport:
        """Delete blobs no version references (and stale temp files), sparing blobs
        younger than `min_age_s`, by file age and by the time a push last used them (as
        recorded in the database): they may belong to a registration still committing.

        The listing and the first reading of the database only nominate candidates; each
        one is decided again in its own write transaction, under the `lpx_blobs` row lock
        that a push takes before it commits a version using the blob, and deleted while
        that lock is held. A push that reuses a blob gc is about to take therefore either
        commits first (gc sees the reference and keeps it) or finds it gone under the lock
        and writes it again."""
        age_limit = self.settings.gc_min_age_s if min_age_s is None else min_age_s
        listing = list(self.blobs.list())
        referenced = set(self._blob_users())
        removed, freed, kept = [], 0, 0
        for digest, size, age in listing:
            if digest in referenced or age < age_limit:
                kept += 1
                continue
            self._on_gc_candidate(digest)
            if db.with_retries(lambda d=digest: self._collect(d, age_limit),
                               self.settings.commit_retries):
                removed.append(digest)
                freed += size
            else:
                kept += 1
        if isinstance(self.blobs, LocalBlobStore):
            for tmp in self.blobs.stale_temp_files(age_limit):
                tmp.unlink(missing_ok=True)
        return GcReport(removed=removed, freed_bytes=freed, kept=kept)

    def _on_gc_candidate(self, digest: str) -> None:
        """Seam between gc's nomination of a blob and its decision; race tests use it."""

    def _collect(self, digest: str, age_limit: float) -> bool:
        """Delete `digest` if, under its `lpx_blobs` row lock, no version uses it and no
        push used it within `age_limit`; True if it was deleted."""
        at = now()
        with db.write_tx(self.engine) as conn:
            db.insert_ignore(conn, db.blobs, {"digest": digest, "used_at": _EPOCH})
            q = sa.select(db.blobs.c.used_at).where(db.blobs.c.digest == digest)
            if conn.dialect.name == "postgresql":
                q = q.with_for_update()
            used_at = utc(conn.execute(q).scalar_one())
            v = db.versions
            in_use = conn.execute(sa.select(v.c.id).where(sa.or_(
                v.c.config_blob == digest, v.c.weights_blob == digest)).limit(1)).first()
            if in_use is not None or (at - used_at).total_seconds() < age_limit:
                return False
            gone = self.blobs.delete(digest, min_age_s=age_limit)
            conn.execute(sa.delete(db.blobs).where(db.blobs.c.digest == digest))
            return gone

    def _blob_users(self) -> dict[str, list[str]]:
        v = db.versions
        q = (sa.select(adapters.c.tenant, adapters.c.name, v.c.version, v.c.config_blob,
                       v.c.weights_blob).select_from(v.join(adapters)))
        users: dict[str, list[str]] = {}
        with db.read_tx(self.engine) as conn:
            for t, n, ver, cb, wb in conn.execute(q):
                for blob in (cb, wb):
                    users.setdefault(blob, []).append(f"{t}/{n}:v{ver}")
        return users

    # ---------------------------------------------------------------- tokens
    # The lifecycle lives in registry/tokens.py (`self.tokens`); these keep the typed
    # database errors of the rest of the registry.
    @faults.writes
    def create_token(self, identity: Identity, tenant: str, *, admin: bool = False,
                     scope: Scope | None = None, ttl_s: float | None = None,
                     label: str = "") -> str:
        """A new API token for `tenant` (scope `publish` unless given); only its sha256
        is stored, so show it once. `Tokens.create` also returns its record."""
        return self.tokens.create(identity, tenant, admin=admin, scope=scope, ttl_s=ttl_s,
                                  label=label)[0]

    @faults.writes
    def issue_token(self, identity: Identity, tenant: str, *, admin: bool = False,
                    scope: Scope | None = None, ttl_s: float | None = None,
                    label: str = "") -> tuple[str, TokenInfo]:
        """`create_token` that also returns the new token's record (CLI, AdminService)."""
        return self.tokens.create(identity, tenant, admin=admin, scope=scope, ttl_s=ttl_s,
                                  label=label)

    @faults.reads
    def authenticate(self, token: str, *, peer: str | None = None) -> Identity:
        """The identity a token stands for; `Unauthenticated` for anything unknown,
        expired or revoked, `AuthThrottled` while `peer` backs off (registry/tokens.py)."""
        return self.tokens.authenticate(token, peer=peer)

    def authenticate_cached(self, token: str, *, peer: str | None = None) -> Identity | None:
        """`authenticate`'s answer when it needs no database (None: it does); never
        blocks, so an event loop may call it (registry/tokens.py)."""
        return self.tokens.authenticate_cached(token, peer=peer)

    @faults.reads
    def list_tokens(self, identity: Identity, tenant: str | None = None, *,
                    include_inactive: bool = False) -> list[TokenInfo]:
        return self.tokens.list(identity, tenant, include_inactive=include_inactive)

    @faults.writes
    def revoke_token(self, identity: Identity, token_id: str) -> TokenInfo:
        return self.tokens.revoke(identity, token_id)

    @faults.writes
    def rotate_token(self, identity: Identity, token_id: str, *, grace_s: float = 0.0,
                     ttl_s: float | None = None) -> tuple[str, TokenInfo]:
        return self.tokens.rotate(identity, token_id, grace_s=grace_s, ttl_s=ttl_s)

    @faults.writes
    def purge_tokens(self, identity: Identity, tenant: str | None = None, *,
                     older_than_s: float | None = None) -> list[str]:
        """Drop revoked or expired tokens' rows past retention (audited); their ids."""
        return self.tokens.purge(identity, tenant, older_than_s=older_than_s)

    @faults.reads
    def token_history(self, identity: Identity, tenant: str | None = None) -> list[TokenEvent]:
        return self.tokens.history(identity, tenant)

    # ---------------------------------------------------------------- change feed
    @faults.reads
    def changes(self, after: int = 0, *, limit: int = 1000) -> list[Change]:
        """Events with id > `after`, oldest first (ids are visible in commit order)."""
        return changefeed.read(self.engine, after, limit)

    @faults.reads
    def latest_change_id(self) -> int:
        """The id of the newest event (0: none yet); a watcher starts there."""
        return changefeed.latest_id(self.engine)

    @faults.reads
    def wait_for_changes(self, after: int, timeout: float, *,
                         limit: int = 1000) -> list[Change]:
        """Events with id > `after` as soon as there is one, or [] after `timeout` s
        (PostgreSQL: woken by NOTIFY within milliseconds; SQLite: polled every
        `settings.change_poll_s`)."""
        return self.feed.wait(after, timeout, limit)

    @property
    def changes_notify(self) -> bool:
        """Whether `wait_for_changes` is woken by the database (PostgreSQL) rather than
        by polling."""
        return self.feed.notified


def _sqlite_blob_dir(url: str) -> Path | None:
    path = db.sqlite_file(url)
    return None if path is None else path.parent / "blobs"


def _where(engine: Engine) -> str:
    """The database as shown in error messages: a SQLite file's path, or the URL without
    its password."""
    if engine.dialect.name == "sqlite":
        return (engine.url.database or ":memory:").removeprefix("file:")
    return engine.url.render_as_string(hide_password=True)


