"""The adapter registry: immutable, content-addressed versions with audited aliases.

    reg = Registry.open("./.loraplex/registry")            # SQLite + ./blobs
    v = reg.push(Identity.system(), "./adapter", "acme/support", base="./base")
    reg.set_alias(me, "acme/support:v1", "prod", expected=None)
    loaded = reg.load_adapter(reg.resolve(me, "acme/support@prod"))

Registration order is what makes crashes harmless: validate, write both blobs (each one
atomically), then insert the version row and its event in one transaction. A crash
before the commit leaves at most unreferenced blobs, which `gc` removes; a crash after it
leaves a complete version. No reader ever sees a version whose blobs are not in place.

Environment failures (disk full, read-only or forbidden storage, a dropped database) come
out as typed errors naming the path or database (`registry/faults.py`): public reads retry
once on a dropped connection, writes never replay. A registry whose SQLite directory is
not writable opens read-only: reads work, writes raise `StorageReadOnly` up front.

Access rule: a tenant identity reads and changes only its own tenant's adapters; asking for
another tenant's adapter raises exactly the `NotFound` that a missing one raises. Admins
act on every tenant; only admins register bases and create admin tokens.
"""

from __future__ import annotations

import base64
import json
import math
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from loraplex.errors import (
    AliasConflict,
    DataCorruption,
    FailedPrecondition,
    IncompatibleAdapter,
    InvalidArgument,
    LoraplexError,
    NotFound,
    PermissionDenied,
    Unavailable,
    ValidationFailed,
    quote,
)
from loraplex.fingerprint import BaseFingerprint
from loraplex.peft_format import PEFT_PREFIX
from loraplex.registry import db, faults, quotas, tensorfile
from loraplex.registry.bases import BaseArg, BaseCatalog
from loraplex.registry.blobstore import BlobStore, LocalBlobStore, open_blob_store
from loraplex.registry.content import adapter_digest
from loraplex.registry.db import adapters, alias_moves, aliases, versions
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
from loraplex.registry.refs import LATEST, AdapterRef, check_name, parse_key, parse_ref
from loraplex.registry.settings import RegistrySettings
from loraplex.registry.tokens import TokenEvent, TokenInfo, Tokens
from loraplex.registry.validation import ValidAdapter, validate

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MANIFEST_FILE = "loraplex_manifest.json"
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"})
CHANGES_CHANNEL = "lpx_changes"  # PostgreSQL NOTIFY channel of new `changes` rows


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class _BlobCollected(Exception):
    """gc deleted a blob between a push's write of it and the push's commit."""


def _now() -> datetime:
    return datetime.now(UTC)


def _utc(ts: datetime) -> datetime:
    """SQLite hands timestamps back naive (they were written in UTC), PostgreSQL in the
    session's zone: normalise both to UTC."""
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


def _not_found(tenant: str, name: str) -> NotFound:
    """The one message for "missing" and "someone else's": nothing leaks across tenants."""
    return NotFound(f"adapter {tenant}/{name} not found", field="ref")


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
        self.tokens = Tokens(engine, self.settings, read_only=read_only)
        if not read_only:
            self._create_tables()

    @faults.writes
    def _create_tables(self) -> None:
        db.create_tables(self.engine)

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

    # ---------------------------------------------------------------- registration
    @faults.writes
    def push(self, identity: Identity, adapter_dir: str | os.PathLike[str], name: str, *,
             base: BaseArg = None, lineage: dict[str, Any] | None = None) -> AdapterVersion:
        """Register the peft adapter in `adapter_dir` as the next version of `name`.

        Only `adapter_config.json` and `adapter_model.safetensors` are read. Pickled adapter
        weights (`adapter_model.bin`, `.pt`, …) are refused even beside a safetensors file,
        since they may differ from it; other files of a training run (`training_args.bin`,
        `optimizer.pt`) are neither read nor stored, so they are left alone."""
        d = Path(adapter_dir)
        if not d.is_dir():
            raise InvalidArgument(f"{d} is not a directory", field="adapter_dir")
        problems = []
        pickles = sorted(p.name for p in d.iterdir()
                         if p.suffix.lower() in PICKLE_SUFFIXES and p.stem.startswith("adapter"))
        if pickles:
            problems.append(f"files: pickle weight files are refused ({', '.join(pickles)}); "
                            "save with safetensors (save_pretrained(safe_serialization=True))")
        for fname in (CONFIG_FILE, WEIGHTS_FILE):
            if not (d / fname).is_file():
                problems.append(f"files: {fname} is missing from {d}")
        if any(p.startswith("files: ") and "missing" in p for p in problems):
            raise ValidationFailed(problems, field="files")
        try:
            config_bytes = (d / CONFIG_FILE).read_bytes()
            weights_bytes = (d / WEIGHTS_FILE).read_bytes()
        except OSError as e:
            raise faults.os_error(e, "reading adapter files in", d) from e
        return self._register(identity, name, config_bytes, weights_bytes, base, lineage,
                              problems)

    @faults.writes
    def push_bytes(self, identity: Identity, name: str, config_json: bytes,
                   safetensors: bytes, *, base: BaseArg = None,
                   lineage: dict[str, Any] | None = None) -> AdapterVersion:
        """`push` for callers holding the two files in memory (gRPC upload, trainer)."""
        return self._register(identity, name, config_json, safetensors, base, lineage, [])

    def _register(self, identity: Identity, name: str, config_bytes: bytes,
                  weights_bytes: bytes, base: BaseArg, lineage: dict[str, Any] | None,
                  problems: list[str]) -> AdapterVersion:
        tenant, aname = parse_key(name)
        identity.require("publish", "push adapters")
        if not identity.can_access(tenant):
            raise PermissionDenied(f"{identity.who} may not push adapters of tenant {tenant}",
                                   field="name")
        lineage = _json_object(lineage, "lineage", self.settings.max_lineage_bytes)
        fp, base_problems = self.base_catalog.for_upload(base, _loose_json(config_bytes),
                                                             lineage)
        valid = validate(config_bytes, weights_bytes, fp, self.settings,
                         prior=problems + base_problems)
        if fp is None:  # validate raised already; keeps the type checker honest
            raise ValidationFailed(["base: unknown"], field="base")
        existing = self._existing(tenant, aname, valid.digest)
        if existing is not None:
            return _same_base(existing, fp)
        size = len(valid.config_bytes) + len(valid.weights_bytes)
        with db.read_tx(self.engine) as conn:  # before any blob is written
            quotas.check(conn, self.settings, tenant, size)
        for _ in range(3):  # gc may collect a reused blob before our commit: write it again
            config_blob = self.blobs.put(valid.config_bytes)
            weights_blob = self.blobs.put(valid.weights_bytes)
            self._on_blobs_written()
            try:
                return db.with_retries(
                    lambda c=config_blob, w=weights_blob: self._insert_version(
                        identity, tenant, aname, valid, fp, lineage, c, w),
                    self.settings.commit_retries)
            except _BlobCollected:
                continue
        raise Unavailable("the blob store lost this upload's blobs three times while it "
                          "committed (a concurrent gc); retry", field="name")

    def _on_blobs_written(self) -> None:
        """Seam between the blob writes and the commit; crash tests inject faults here."""

    def _existing(self, tenant: str, name: str, digest: str) -> AdapterVersion | None:
        with db.read_tx(self.engine) as conn:
            row = conn.execute(self._version_query().where(
                adapters.c.tenant == tenant, adapters.c.name == name,
                versions.c.digest == digest)).first()
            return self._to_version(conn, row, created=False) if row else None

    def _insert_version(self, identity: Identity, tenant: str, name: str, valid: ValidAdapter,
                        fp: BaseFingerprint, lineage: dict[str, Any], config_blob: str,
                        weights_blob: str) -> AdapterVersion:
        now = _now()
        with db.write_tx(self.engine) as conn:
            db.insert_ignore(conn, adapters, {"tenant": tenant, "name": name,
                                              "last_version": 0, "created_at": now})
            adapter_id = self._adapter_id(conn, tenant, name)
            row = db.lock_adapter(conn, adapter_id)
            same = conn.execute(self._version_query().where(
                versions.c.adapter_id == adapter_id, versions.c.digest == valid.digest)).first()
            if same is not None:  # an identical push won the race
                return _same_base(self._to_version(conn, same, created=False), fp)
            quotas.check(conn, self.settings, tenant,
                         len(valid.config_bytes) + len(valid.weights_bytes))
            for blob in (config_blob, weights_blob):
                # Under this row's lock gc cannot decide about the blob; if it already
                # took it, write it again rather than commit a version without it.
                db.upsert(conn, db.blobs, {"digest": blob, "used_at": now}, {"used_at": now})
                if not self.blobs.exists(blob):
                    raise _BlobCollected(blob)
            number = row.last_version + 1
            conn.execute(sa.update(adapters).where(adapters.c.id == adapter_id)
                         .values(last_version=number))
            self.base_catalog.ensure(conn, fp, now)
            conn.execute(sa.insert(versions).values(
                adapter_id=adapter_id, version=number, digest=valid.digest,
                config_blob=config_blob, weights_blob=weights_blob,
                size_bytes=len(valid.config_bytes) + len(valid.weights_bytes),
                rank=valid.rank, alpha=valid.alpha, use_rslora=valid.use_rslora,
                target_modules=list(valid.target_modules), dtype=valid.dtype,
                base_digest=fp.digest, lineage=lineage, created_at=now,
                created_by=identity.who))
            self._emit(conn, "version_created", tenant, name, number, None, valid.digest, now)
        return AdapterVersion(
            tenant=tenant, name=name, version=number, digest=valid.digest,
            size_bytes=len(valid.config_bytes) + len(valid.weights_bytes), rank=valid.rank,
            alpha=valid.alpha, use_rslora=valid.use_rslora, target_modules=valid.target_modules,
            dtype=valid.dtype, base=fp, lineage=lineage, created_at=now,
            created_by=identity.who, config_blob=config_blob, weights_blob=weights_blob)

    # ---------------------------------------------------------------- reading
    @faults.reads
    def resolve(self, identity: Identity, ref: str | AdapterRef) -> AdapterVersion:
        """The version a ref names right now (aliases and `latest` are followed)."""
        r = parse_ref(ref)
        with db.read_tx(self.engine) as conn:
            if r.digest is not None:
                return self._resolve_digest(conn, identity, r.digest)
            tenant, name = r.tenant or "", r.name or ""
            adapter_id = self._visible_adapter(conn, identity, tenant, name)
            q = self._version_query().where(versions.c.adapter_id == adapter_id)
            if r.version is not None:
                row = conn.execute(q.where(versions.c.version == r.version)).first()
                if row is None:
                    raise NotFound(f"version {r} not found", field="ref")
            elif r.alias is not None and r.alias != LATEST:
                number = self._alias_target(conn, adapter_id, r.alias)
                if number is None:
                    raise NotFound(f"alias {r} not found", field="ref")
                row = conn.execute(q.where(versions.c.version == number)).first()
                if row is None:  # cannot happen: deleting a version drops its aliases
                    raise NotFound(f"alias {r} points at a deleted version", field="ref")
            else:
                row = conn.execute(q.order_by(versions.c.version.desc()).limit(1)).first()
                if row is None:
                    raise _not_found(tenant, name)
            return self._to_version(conn, row)

    def _resolve_digest(self, conn: Connection, identity: Identity,
                        digest: str) -> AdapterVersion:
        q = self._version_query().where(versions.c.digest == digest)
        if not identity.is_admin:
            q = q.where(adapters.c.tenant == identity.tenant)
        row = conn.execute(q.order_by(versions.c.id).limit(1)).first()
        if row is None:
            raise NotFound(f"adapter {digest} not found", field="ref")
        return self._to_version(conn, row)

    @faults.reads
    def list_adapters(self, identity: Identity, *, tenant: str | None = None,
                      page_size: int = 100, page_token: str | None = None
                      ) -> tuple[list[AdapterVersion], str | None]:
        """The newest version of every visible adapter, ordered by `tenant/name`."""
        if not 1 <= page_size <= 1000:
            raise InvalidArgument("page_size must be between 1 and 1000", field="page_size")
        if tenant is not None:
            check_name(tenant, "tenant", field="tenant")
            if not identity.can_access(tenant):
                return [], None
        elif not identity.is_admin:
            tenant = identity.tenant
        newest = (sa.select(versions.c.adapter_id, sa.func.max(versions.c.version).label("v"))
                  .group_by(versions.c.adapter_id).subquery())
        q = self._version_query().join(newest, sa.and_(
            versions.c.adapter_id == newest.c.adapter_id, versions.c.version == newest.c.v))
        if tenant is not None:
            q = q.where(adapters.c.tenant == tenant)
        if page_token:
            t, n = _decode_page_token(page_token)
            q = q.where(sa.or_(adapters.c.tenant > t,
                               sa.and_(adapters.c.tenant == t, adapters.c.name > n)))
        q = q.order_by(adapters.c.tenant, adapters.c.name).limit(page_size + 1)
        with db.read_tx(self.engine) as conn:
            rows = conn.execute(q).all()
            out = [self._to_version(conn, r) for r in rows[:page_size]]
        token = _encode_page_token(out[-1].key) if len(rows) > page_size else None
        return out, token

    @faults.reads
    def list_versions(self, identity: Identity, key: str) -> list[AdapterVersion]:
        """Every live version of `tenant/name`, oldest first."""
        tenant, name = parse_key(key, field="ref")
        with db.read_tx(self.engine) as conn:
            adapter_id = self._visible_adapter(conn, identity, tenant, name)
            rows = conn.execute(self._version_query().where(versions.c.adapter_id == adapter_id)
                                .order_by(versions.c.version)).all()
            if not rows:
                raise _not_found(tenant, name)
            return [self._to_version(conn, r) for r in rows]

    @faults.reads
    def aliases(self, identity: Identity, key: str) -> dict[str, int]:
        """alias -> version number for `tenant/name` (`latest` is implicit, not listed)."""
        tenant, name = parse_key(key, field="ref")
        with db.read_tx(self.engine) as conn:
            adapter_id = self._visible_adapter(conn, identity, tenant, name)
            rows = conn.execute(sa.select(aliases.c.alias, aliases.c.version)
                                .where(aliases.c.adapter_id == adapter_id)
                                .order_by(aliases.c.alias)).all()
        return {a: v for a, v in rows}

    # ---------------------------------------------------------------- aliases
    @faults.writes
    def set_alias(self, identity: Identity, ref: str | AdapterRef, alias: str, *,
                  expected: int | None = UNSET) -> AliasMove:
        """Point `alias` at the version `ref` names, compare-and-set: `expected` is the
        version the alias must point at now, None = it must not exist, UNSET = any.
        `latest` cannot be moved: it always follows the newest version."""
        check_name(alias, "alias", field="alias")
        identity.require("publish", "move aliases")
        if alias == LATEST:
            raise InvalidArgument("`latest` follows the newest version and cannot be moved",
                                  field="alias")
        if expected is not UNSET and expected is not None and (
                isinstance(expected, bool) or not isinstance(expected, int) or expected < 1):
            raise InvalidArgument(f"expected must be a version number >= 1, None or UNSET, "
                                  f"got {quote(expected)}", field="expected")
        target = self.resolve(identity, ref)
        return db.with_retries(lambda: self._move_alias(identity, target, alias, expected),
                               self.settings.commit_retries)

    def _move_alias(self, identity: Identity, target: AdapterVersion, alias: str,
                    expected: int | None) -> AliasMove:
        now = _now()
        with db.write_tx(self.engine) as conn:
            adapter_id = self._adapter_id(conn, target.tenant, target.name)
            db.lock_adapter(conn, adapter_id)
            alive = conn.execute(sa.select(versions.c.id).where(
                versions.c.adapter_id == adapter_id,
                versions.c.version == target.version)).first()
            if alive is None:
                raise NotFound(f"version {target.ref} not found", field="ref")
            current = self._alias_target(conn, adapter_id, alias)
            if expected is not UNSET and current != expected:
                raise AliasConflict(
                    f"alias {target.key}@{alias} points at {_vname(current)}, expected "
                    f"{_vname(expected)}; re-read and retry", field="expected")
            move = AliasMove(target.tenant, target.name, alias, current, target.version,
                             now, identity.who)
            if current == target.version:
                return move  # already there: nothing to log
            if current is None:
                conn.execute(sa.insert(aliases).values(
                    adapter_id=adapter_id, alias=alias, version=target.version,
                    updated_at=now, updated_by=identity.who))
            else:
                conn.execute(sa.update(aliases).where(
                    aliases.c.adapter_id == adapter_id, aliases.c.alias == alias)
                    .values(version=target.version, updated_at=now, updated_by=identity.who))
            self._log_move(conn, adapter_id, move)
            self._emit(conn, "alias_moved", target.tenant, target.name, target.version, alias,
                       target.digest, now)
            return move

    @faults.reads
    def alias_history(self, identity: Identity, key: str,
                      alias: str | None = None) -> list[AliasMove]:
        """The audit log of `tenant/name`'s aliases (one alias, or all), oldest first."""
        tenant, name = parse_key(key, field="ref")
        with db.read_tx(self.engine) as conn:
            adapter_id = self._visible_adapter(conn, identity, tenant, name)
            q = sa.select(alias_moves).where(alias_moves.c.adapter_id == adapter_id)
            if alias is not None:
                q = q.where(alias_moves.c.alias == alias)
            rows = conn.execute(q.order_by(alias_moves.c.id)).all()
        return [AliasMove(tenant, name, r.alias, r.from_version, r.to_version, _utc(r.at), r.by)
                for r in rows]

    # ---------------------------------------------------------------- retiring
    @faults.writes
    def delete_version(self, identity: Identity, ref: str | AdapterRef, *,
                       force: bool = False) -> AdapterVersion:
        """Remove a version (its blobs go at the next `gc`). Refused while an alias points
        at it, unless `force`, which removes those aliases too (logged). The ref must pin
        the version (`t/n:vN` or `sha256:…`): `rm t/n` deleting whatever is newest at that
        moment is too easy a mistake."""
        identity.require("publish", "delete versions")
        r = parse_ref(ref)
        if r.version is None and r.digest is None:
            raise InvalidArgument(f"delete needs a pinned version (t/n:vN or sha256:…), got "
                                  f"{r!s}", field="ref")
        target = self.resolve(identity, r)
        return db.with_retries(lambda: self._delete(identity, target, force),
                               self.settings.commit_retries)

    def _delete(self, identity: Identity, target: AdapterVersion, force: bool) -> AdapterVersion:
        now = _now()
        with db.write_tx(self.engine) as conn:
            adapter_id = self._adapter_id(conn, target.tenant, target.name)
            db.lock_adapter(conn, adapter_id)
            pointing = conn.execute(sa.select(aliases.c.alias).where(
                aliases.c.adapter_id == adapter_id, aliases.c.version == target.version)
                .order_by(aliases.c.alias)).scalars().all()
            if pointing and not force:
                raise FailedPrecondition(
                    f"{target.ref} is the target of alias {', '.join(pointing)}: move the "
                    "alias first, or force the delete", field="ref")
            gone = conn.execute(sa.delete(versions).where(
                versions.c.adapter_id == adapter_id, versions.c.version == target.version))
            if gone.rowcount == 0:
                raise NotFound(f"version {target.ref} not found", field="ref")
            for alias in pointing:
                conn.execute(sa.delete(aliases).where(aliases.c.adapter_id == adapter_id,
                                                      aliases.c.alias == alias))
                self._log_move(conn, adapter_id, AliasMove(
                    target.tenant, target.name, alias, target.version, None, now, identity.who))
                self._emit(conn, "alias_moved", target.tenant, target.name, None, alias, None,
                           now)
            self._emit(conn, "version_deleted", target.tenant, target.name, target.version,
                       None, target.digest, now)
        return target

    # ---------------------------------------------------------------- content
    def load_adapter(self, version: AdapterVersion) -> LoadedAdapter:
        """Config + torch tensors of a version, every byte digest-checked. Tensor keys are
        base-model module paths (`model.layers.0.self_attn.q_proj.lora_A.weight`)."""
        from safetensors.torch import load as load_safetensors

        config_bytes = self.blobs.get(version.config_blob)
        weights = self.blobs.get(version.weights_blob)
        config = json.loads(config_bytes)
        tf = tensorfile.parse(weights)
        names = {k: k.removeprefix(PEFT_PREFIX) for k in tf.tensors}
        if adapter_digest(config, tf, names) != version.digest:
            raise DataCorruption(f"{version.ref}: stored content does not hash to "
                                 f"{version.digest}", field="digest")
        tensors = {names[k]: t for k, t in load_safetensors(weights).items()}
        return LoadedAdapter(config=config, tensors=tensors, version=version)

    def pull(self, identity: Identity, ref: str | AdapterRef,
             dest: str | os.PathLike[str]) -> Path:
        """Write the version's peft files (plus `loraplex_manifest.json`) into `dest`."""
        v = self.resolve(identity, ref)
        config_bytes = self.blobs.get(v.config_blob)
        weights = self.blobs.get(v.weights_blob)
        out = Path(dest)
        try:
            out.mkdir(parents=True, exist_ok=True)
            (out / CONFIG_FILE).write_bytes(config_bytes)
            (out / WEIGHTS_FILE).write_bytes(weights)
            (out / MANIFEST_FILE).write_text(json.dumps(v.manifest(), indent=2, sort_keys=True))
        except OSError as e:
            raise faults.os_error(e, f"pulling {v.ref} into", out) from e
        return out

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
        now = _now()
        with db.write_tx(self.engine) as conn:
            db.insert_ignore(conn, db.blobs, {"digest": digest, "used_at": _EPOCH})
            q = sa.select(db.blobs.c.used_at).where(db.blobs.c.digest == digest)
            if conn.dialect.name == "postgresql":
                q = q.with_for_update()
            used_at = _utc(conn.execute(q).scalar_one())
            in_use = conn.execute(sa.select(versions.c.id).where(sa.or_(
                versions.c.config_blob == digest, versions.c.weights_blob == digest))
                .limit(1)).first()
            if in_use is not None or (now - used_at).total_seconds() < age_limit:
                return False
            gone = self.blobs.delete(digest, min_age_s=age_limit)
            conn.execute(sa.delete(db.blobs).where(db.blobs.c.digest == digest))
            return gone

    def _blob_users(self) -> dict[str, list[str]]:
        q = (sa.select(adapters.c.tenant, adapters.c.name, versions.c.version,
                       versions.c.config_blob, versions.c.weights_blob)
             .select_from(versions.join(adapters)))
        users: dict[str, list[str]] = {}
        with db.read_tx(self.engine) as conn:
            for t, n, v, cb, wb in conn.execute(q):
                for blob in (cb, wb):
                    users.setdefault(blob, []).append(f"{t}/{n}:v{v}")
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

    @faults.reads
    def token_history(self, identity: Identity, tenant: str | None = None) -> list[TokenEvent]:
        return self.tokens.history(identity, tenant)

    # ---------------------------------------------------------------- watchers
    @faults.reads
    def changes(self, after: int = 0, *, limit: int = 1000) -> list[Change]:
        """Events with id > `after`, oldest first (ids are visible in commit order)."""
        with db.read_tx(self.engine) as conn:
            rows = conn.execute(sa.select(db.changes).where(db.changes.c.id > after)
                                .order_by(db.changes.c.id).limit(limit)).all()
        return [Change(id=r.id, kind=r.kind, tenant=r.tenant, name=r.name, version=r.version,
                       alias=r.alias, digest=r.digest, at=_utc(r.at)) for r in rows]

    # ---------------------------------------------------------------- helpers
    @staticmethod
    def _version_query() -> sa.Select:
        return (sa.select(versions, adapters.c.tenant, adapters.c.name)
                .select_from(versions.join(adapters)))

    def _to_version(self, conn: Connection, row: sa.Row, *, created: bool = True
                    ) -> AdapterVersion:
        fp = self.base_catalog.by_digest(conn, row.base_digest)
        if fp is None:  # FK guarantees the row; a missing one is a bug
            raise NotFound(f"base {row.base_digest} of {row.tenant}/{row.name} is gone")
        return AdapterVersion(
            tenant=row.tenant, name=row.name, version=row.version, digest=row.digest,
            size_bytes=row.size_bytes, rank=row.rank, alpha=row.alpha,
            use_rslora=row.use_rslora, target_modules=tuple(row.target_modules),
            dtype=row.dtype, base=fp, lineage=dict(row.lineage or {}),
            created_at=_utc(row.created_at), created_by=row.created_by,
            config_blob=row.config_blob, weights_blob=row.weights_blob, created=created)

    @staticmethod
    def _adapter_id(conn: Connection, tenant: str, name: str) -> int:
        adapter_id = conn.execute(sa.select(adapters.c.id).where(
            adapters.c.tenant == tenant, adapters.c.name == name)).scalar()
        if adapter_id is None:
            raise _not_found(tenant, name)
        return adapter_id

    def _visible_adapter(self, conn: Connection, identity: Identity, tenant: str,
                         name: str) -> int:
        if not identity.can_access(tenant):
            raise _not_found(tenant, name)
        return self._adapter_id(conn, tenant, name)

    @staticmethod
    def _alias_target(conn: Connection, adapter_id: int, alias: str) -> int | None:
        return conn.execute(sa.select(aliases.c.version).where(
            aliases.c.adapter_id == adapter_id, aliases.c.alias == alias)).scalar()

    @staticmethod
    def _log_move(conn: Connection, adapter_id: int, move: AliasMove) -> None:
        conn.execute(sa.insert(alias_moves).values(
            adapter_id=adapter_id, alias=move.alias, from_version=move.from_version,
            to_version=move.to_version, at=move.at, by=move.by))

    @staticmethod
    def _emit(conn: Connection, kind: str, tenant: str, name: str, version: int | None,
              alias: str | None, digest: str | None, at: datetime) -> None:
        db.lock_changes(conn)
        conn.execute(sa.insert(db.changes).values(kind=kind, tenant=tenant, name=name,
                                                  version=version, alias=alias, digest=digest,
                                                  at=at))
        if conn.dialect.name == "postgresql":  # delivered at commit; followers wake at once
            conn.execute(sa.text("SELECT pg_notify(:channel, '')"), {"channel": CHANGES_CHANNEL})


def _same_base(existing: AdapterVersion, fp: BaseFingerprint) -> AdapterVersion:
    """Identical content is the existing version, but only for the base it was registered
    for: returning it for another base would silently record the wrong base."""
    if existing.base.digest != fp.digest:
        raise IncompatibleAdapter(
            f"this content is already registered as {existing.ref} for base "
            f"{existing.base.digest}; it cannot also be registered for base {fp.digest} "
            "under the same name", field="base")
    return existing


def _sqlite_blob_dir(url: str) -> Path | None:
    path = db.sqlite_file(url)
    return None if path is None else path.parent / "blobs"


def _where(engine: Engine) -> str:
    """The database as shown in error messages: a SQLite file's path, or the URL without
    its password."""
    if engine.dialect.name == "sqlite":
        return (engine.url.database or ":memory:").removeprefix("file:")
    return engine.url.render_as_string(hide_password=True)


def _vname(v: int | None) -> str:
    return "nothing" if v is None else f"v{v}"


def _loose_json(raw: bytes) -> dict[str, Any]:
    """Best-effort config read for base lookup; validation reports a broken config."""
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def _json_object(value: dict[str, Any] | None, field: str, max_bytes: int) -> dict[str, Any]:
    """A plain-JSON copy of `value`, at most `max_bytes` as compact JSON (it is read back
    on every resolve). Non-finite floats (a diverged loss) become the strings
    "nan"/"inf"/"-inf": PostgreSQL's JSON has no NaN, and the record should survive."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidArgument(f"{field} must be a JSON object", field=field)
    try:
        text = json.dumps(_finite(value), allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError) as e:
        raise InvalidArgument(f"{field} is not JSON-serialisable: {e}", field=field) from e
    if len(text.encode()) > max_bytes:
        raise InvalidArgument(f"{field} is {len(text.encode())} bytes of JSON, above the cap "
                              f"of {max_bytes} (LORAPLEX_MAX_LINEAGE_BYTES)", field=field)
    return json.loads(text)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _encode_page_token(key: str) -> str:
    return base64.urlsafe_b64encode(key.encode()).decode().rstrip("=")


def _decode_page_token(token: str) -> tuple[str, str]:
    try:
        text = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        return parse_key(text, field="page_token")
    except (ValueError, LoraplexError):
        raise InvalidArgument("page_token is not one this registry issued",
                              field="page_token") from None
