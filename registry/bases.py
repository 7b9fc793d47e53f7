"""Base models the registry knows, and deciding which base an upload is checked against.

An adapter names its base in `base_model_name_or_path` (a hub id or the local path it was
trained from). `register_base` fingerprints a base directory and records the names it
answers to; a push then finds the base by that name, or takes one explicitly (a directory
or a `BaseFingerprint`). Fingerprints are immutable, so they are cached by digest.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from loraplex.errors import LoraplexError, quote
from loraplex.fingerprint import BaseFingerprint, fingerprint_base
from loraplex.registry import db
from loraplex.registry.db import base_names, bases
from loraplex.registry.records import Identity

BaseArg = str | os.PathLike[str] | BaseFingerprint | None


class BaseCatalog:
    """The `lpx_bases` / `lpx_base_names` tables plus an in-memory fingerprint cache."""

    def __init__(self, engine: Engine, retries: int) -> None:
        self.engine = engine
        self.retries = retries
        self._cache: dict[str, BaseFingerprint] = {}

    def register(self, identity: Identity, base_dir: str | os.PathLike[str],
                 names: list[str] | None) -> BaseFingerprint:
        fp = fingerprint_base(base_dir)
        all_names = _names(base_dir, names)
        db.with_retries(lambda: self._store(identity, fp, all_names), self.retries)
        self._cache[fp.digest] = fp
        return fp

    def registered(self, base_dir: str | os.PathLike[str], names: list[str] | None
                   ) -> BaseFingerprint | None:
        """The base's fingerprint if it is recorded under every name `register` would
        give it (so registering again would change nothing), else None."""
        fp = fingerprint_base(base_dir)
        all_names = _names(base_dir, names)
        with db.read_tx(self.engine) as conn:
            found = dict(conn.execute(sa.select(base_names.c.name, base_names.c.digest)
                                      .where(base_names.c.name.in_(all_names))).all())
        return fp if all(found.get(n) == fp.digest for n in all_names) else None

    def _store(self, identity: Identity, fp: BaseFingerprint, names: list[str]) -> None:
        """Names point at the newest registration: re-registering a rebuilt base under
        the same path moves the name to the new weights."""
        now = datetime.now(UTC)
        with db.write_tx(self.engine) as conn:
            self.ensure(conn, fp, now)
            for name in names:
                conn.execute(sa.delete(base_names).where(base_names.c.name == name))
                conn.execute(sa.insert(base_names).values(
                    name=name, digest=fp.digest, created_at=now, created_by=identity.who))

    def ensure(self, conn: Connection, fp: BaseFingerprint, now: datetime) -> None:
        """Record `fp` (inside the caller's transaction) if it is new."""
        db.insert_ignore(conn, bases, {"digest": fp.digest, "fingerprint": fp.to_dict(),
                                       "created_at": now})
        self._cache.setdefault(fp.digest, fp)

    def list(self) -> list[tuple[list[str], BaseFingerprint]]:
        with db.read_tx(self.engine) as conn:
            rows = conn.execute(sa.select(bases).order_by(bases.c.created_at)).all()
            names = conn.execute(sa.select(base_names.c.name, base_names.c.digest)).all()
        by_digest: dict[str, list[str]] = {}
        for n, d in names:
            by_digest.setdefault(d, []).append(n)
        return [(sorted(by_digest.get(r.digest, [])), BaseFingerprint.from_dict(r.fingerprint))
                for r in rows]

    def by_digest(self, conn: Connection, digest: str) -> BaseFingerprint | None:
        if digest not in self._cache:
            row = conn.execute(sa.select(bases.c.fingerprint)
                               .where(bases.c.digest == digest)).scalar()
            if row is None:
                return None
            self._cache[digest] = BaseFingerprint.from_dict(row)
        return self._cache[digest]

    def by_name(self, name: str) -> BaseFingerprint | None:
        """The base registered under `name` (or under its absolute path)."""
        candidates = [name]
        try:
            candidates.append(str(Path(name).expanduser().resolve()))
        except (OSError, RuntimeError):
            pass
        with db.read_tx(self.engine) as conn:
            for cand in candidates:
                digest = conn.execute(sa.select(base_names.c.digest)
                                      .where(base_names.c.name == cand)).scalar()
                if digest:
                    return self.by_digest(conn, digest)
        return None

    def for_upload(self, base: BaseArg, config: dict[str, Any], lineage: dict[str, Any]
                   ) -> tuple[BaseFingerprint | None, list[str]]:
        """The base to validate an upload against, plus violations (`base: …` lines):
        the explicit `base` if given, else the registered base the config names; and the
        base the adapter declares (by name, or in its lineage) must be that same base."""
        declared = config.get("base_model_name_or_path")
        declared_fp = self.by_name(declared) if isinstance(declared, str) and declared else None
        problems: list[str] = []
        if base is None:
            fp = declared_fp
            if fp is None:
                problems.append(f"base: no registered base is named {quote(declared)} (the "
                                "adapter's base_model_name_or_path); pass base= or register "
                                "the base first")
        else:
            fp = self._explicit(base, problems)
        if fp is not None and declared_fp is not None and declared_fp.digest != fp.digest:
            problems.append(f"base: the adapter declares base {quote(declared)} "
                            f"({declared_fp.digest}) but was pushed against {fp.digest}")
        want = lineage_base_digest(lineage)
        if fp is not None and want is not None and want != fp.digest:
            problems.append(f"base: lineage records base {want} but the base is {fp.digest}")
        return fp, problems

    def _explicit(self, base: str | os.PathLike[str] | BaseFingerprint,
                  problems: list[str]) -> BaseFingerprint | None:
        if not isinstance(base, BaseFingerprint):
            try:
                return fingerprint_base(base)
            except LoraplexError as e:
                problems.append(f"base: {e}")
                return None
        if base.linear_shapes:
            return base
        with db.read_tx(self.engine) as conn:  # shapes stripped (e.g. from the wire)
            known = self.by_digest(conn, base.digest)
        if known is not None and known.linear_shapes:
            return known
        problems.append(f"base: fingerprint {base.digest} carries no layer shapes and is "
                        "not registered; pass the base directory")
        return None


def _names(base_dir: str | os.PathLike[str], names: list[str] | None) -> list[str]:
    """The names a base answers to: the path as given, its absolute form, and `names`."""
    path = Path(base_dir)
    return sorted({str(base_dir), str(path.expanduser().resolve()), *(names or [])})


def lineage_base_digest(lineage: dict[str, Any]) -> str | None:
    """The base digest a trainer recorded: `base_digest` or `base.digest`."""
    want = lineage.get("base_digest")
    if want is None and isinstance(lineage.get("base"), dict):
        want = lineage["base"].get("digest")
    return want if isinstance(want, str) else None
