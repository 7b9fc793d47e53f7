"""Registering versions: `push` (a peft directory) and `push_bytes` (the two files).

Registration order is what makes crashes harmless: validate, write both blobs (each one
atomically), then insert the version row and its event in one transaction. A crash
before the commit leaves at most unreferenced blobs, which `gc` removes; a crash after it
leaves a complete version. No reader ever sees a version whose blobs are not in place.
Identical content under the same name is the existing version (`created` False).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from loraplex.errors import (
    IncompatibleAdapter,
    InvalidArgument,
    PermissionDenied,
    Unavailable,
    ValidationFailed,
)
from loraplex.fingerprint import BaseFingerprint
from loraplex.registry import changefeed, db, faults, quotas
from loraplex.registry.bases import BaseArg
from loraplex.registry.db import adapters, versions
from loraplex.registry.records import AdapterVersion, Identity
from loraplex.registry.refs import parse_key
from loraplex.registry.rows import Store, adapter_id, now, to_version, version_query
from loraplex.registry.validation import ValidAdapter, validate

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"})


def read_adapter_dir(adapter_dir: str | os.PathLike[str]) -> tuple[bytes, bytes, list[str]]:
    """(config bytes, safetensors bytes, problems) of a peft directory.

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
    missing = [f"files: {fname} is missing from {d}" for fname in (CONFIG_FILE, WEIGHTS_FILE)
               if not (d / fname).is_file()]
    if missing:
        raise ValidationFailed(problems + missing, field="files")
    try:
        return (d / CONFIG_FILE).read_bytes(), (d / WEIGHTS_FILE).read_bytes(), problems
    except OSError as e:
        raise faults.os_error(e, "reading adapter files in", d) from e


def register(store: Store, identity: Identity, name: str, config_bytes: bytes,
             weights_bytes: bytes, base: BaseArg, lineage: dict[str, Any] | None,
             problems: list[str]) -> AdapterVersion:
    """Validate, write the blobs, commit the version row and its event."""
    tenant, aname = parse_key(name)
    identity.require("publish", "push adapters")
    if not identity.can_access(tenant):
        raise PermissionDenied(f"{identity.who} may not push adapters of tenant {tenant}",
                               field="name")
    lineage = json_object(lineage, "lineage", store.settings.max_lineage_bytes)
    fp, base_problems = store.bases.for_upload(base, _loose_json(config_bytes), lineage)
    valid = validate(config_bytes, weights_bytes, fp, store.settings,
                     prior=problems + base_problems)
    if fp is None:  # validate raised already; keeps the type checker honest
        raise ValidationFailed(["base: unknown"], field="base")
    existing = _existing(store, tenant, aname, valid.digest)
    if existing is not None:
        return _same_base(existing, fp)
    size = len(valid.config_bytes) + len(valid.weights_bytes)
    with db.read_tx(store.engine) as conn:  # before any blob is written
        quotas.check(conn, store.settings, tenant, size)
    for _ in range(3):  # gc may collect a reused blob before our commit: write it again
        config_blob = store.blobs.put(valid.config_bytes)
        weights_blob = store.blobs.put(valid.weights_bytes)
        store.after_blobs()
        try:
            return db.with_retries(
                lambda c=config_blob, w=weights_blob: _insert(
                    store, identity, tenant, aname, valid, fp, lineage, c, w),
                store.settings.commit_retries)
        except _BlobCollected:
            continue
    raise Unavailable("the blob store lost this upload's blobs three times while it "
                      "committed (a concurrent gc); retry", field="name")


class _BlobCollected(Exception):
    """gc deleted a blob between a push's write of it and the push's commit."""


def _existing(store: Store, tenant: str, name: str, digest: str) -> AdapterVersion | None:
    with db.read_tx(store.engine) as conn:
        row = conn.execute(version_query().where(
            adapters.c.tenant == tenant, adapters.c.name == name,
            versions.c.digest == digest)).first()
        return to_version(store, conn, row, created=False) if row else None


def _insert(store: Store, identity: Identity, tenant: str, name: str, valid: ValidAdapter,
            fp: BaseFingerprint, lineage: dict[str, Any], config_blob: str,
            weights_blob: str) -> AdapterVersion:
    at = now()
    with db.write_tx(store.engine) as conn:
        db.insert_ignore(conn, adapters, {"tenant": tenant, "name": name,
                                          "last_version": 0, "created_at": at})
        aid = adapter_id(conn, tenant, name)
        row = db.lock_adapter(conn, aid)
        same = conn.execute(version_query().where(
            versions.c.adapter_id == aid, versions.c.digest == valid.digest)).first()
        if same is not None:  # an identical push won the race
            return _same_base(to_version(store, conn, same, created=False), fp)
        quotas.check(conn, store.settings, tenant,
                     len(valid.config_bytes) + len(valid.weights_bytes))
        for blob in (config_blob, weights_blob):
            # Under this row's lock gc cannot decide about the blob; if it already took
            # it, write it again rather than commit a version without it (registry.gc).
            db.upsert(conn, db.blobs, {"digest": blob, "used_at": at}, {"used_at": at})
            if not store.blobs.exists(blob):
                raise _BlobCollected(blob)
        number = row.last_version + 1
        conn.execute(sa.update(adapters).where(adapters.c.id == aid)
                     .values(last_version=number))
        store.bases.ensure(conn, fp, at)
        values = version_values(valid, fp, lineage, config_blob, weights_blob, at,
                                identity.who)
        conn.execute(sa.insert(versions).values(adapter_id=aid, version=number, **values))
        changefeed.emit(conn, "version_created", tenant, name, number, None, valid.digest, at)
    return _record(tenant, name, number, values, fp)


def version_values(valid: ValidAdapter, fp: BaseFingerprint, lineage: dict[str, Any],
                   config_blob: str, weights_blob: str, at: Any, by: str) -> dict[str, Any]:
    """The `lpx_versions` columns of a validated adapter, except adapter_id and version."""
    return dict(digest=valid.digest, config_blob=config_blob, weights_blob=weights_blob,
                size_bytes=len(valid.config_bytes) + len(valid.weights_bytes),
                rank=valid.rank, alpha=valid.alpha, use_rslora=valid.use_rslora,
                target_modules=list(valid.target_modules), dtype=valid.dtype,
                base_digest=fp.digest, lineage=lineage, created_at=at, created_by=by)


def _record(tenant: str, name: str, number: int, v: dict[str, Any],
            fp: BaseFingerprint) -> AdapterVersion:
    return AdapterVersion(
        tenant=tenant, name=name, version=number, digest=v["digest"],
        size_bytes=v["size_bytes"], rank=v["rank"], alpha=v["alpha"],
        use_rslora=v["use_rslora"], target_modules=tuple(v["target_modules"]),
        dtype=v["dtype"], base=fp, lineage=v["lineage"], created_at=v["created_at"],
        created_by=v["created_by"], config_blob=v["config_blob"],
        weights_blob=v["weights_blob"])


def _same_base(existing: AdapterVersion, fp: BaseFingerprint) -> AdapterVersion:
    """Identical content is the existing version, but only for the base it was registered
    for: returning it for another base would silently record the wrong base."""
    if existing.base.digest != fp.digest:
        raise IncompatibleAdapter(
            f"this content is already registered as {existing.ref} for base "
            f"{existing.base.digest}; it cannot also be registered for base {fp.digest} "
            "under the same name", field="base")
    return existing


def _loose_json(raw: bytes) -> dict[str, Any]:
    """Best-effort config read for base lookup; validation reports a broken config."""
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def json_object(value: dict[str, Any] | None, field: str, max_bytes: int) -> dict[str, Any]:
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
