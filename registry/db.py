"""Metadata tables (SQLAlchemy Core) and engines for SQLite and PostgreSQL.

Concurrency design, the same on both databases:
- every write runs in one transaction that first locks its adapter's row (PostgreSQL:
  `SELECT … FOR UPDATE`; SQLite: the transaction starts with `BEGIN IMMEDIATE`, taking the
  file's write lock up front and waiting up to the busy timeout);
- version numbers come from `adapters.last_version` under that lock, and
  UNIQUE(adapter_id, version) / UNIQUE(adapter_id, digest) back it up: a race that slips
  through becomes an IntegrityError, which the caller retries;
- the `changes` table is locked before an event row is inserted (PostgreSQL), so event
  ids become visible in id order and a watcher reading `id > last` never skips one.

A SQLite registry in a directory this process cannot write (a read-only mount, another
user's files) is opened read-only (`mode=ro`, or `immutable=1` when no WAL side files exist
to read through): nothing is written on open (no table creation, no WAL switch), so it can
still be listed, shown, pulled and verified. PostgreSQL connections are pre-pinged on
checkout, so a connection the server dropped while idle is replaced transparently.
"""

from __future__ import annotations

import errno
import os
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from loraplex.registry import faults
from loraplex.registry.settings import RegistrySettings

metadata = sa.MetaData()
_TS = sa.DateTime(timezone=True)
_DIGEST = sa.String(71)  # "sha256:" + 64 hex

adapters = sa.Table(
    "lpx_adapters", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("tenant", sa.String(64), nullable=False),
    sa.Column("name", sa.String(64), nullable=False),
    sa.Column("last_version", sa.Integer, nullable=False, server_default="0"),
    sa.Column("created_at", _TS, nullable=False),
    sa.UniqueConstraint("tenant", "name", name="uq_lpx_adapters_tenant_name"),
)

bases = sa.Table(
    "lpx_bases", metadata,
    sa.Column("digest", _DIGEST, primary_key=True),
    sa.Column("fingerprint", sa.JSON, nullable=False),
    sa.Column("created_at", _TS, nullable=False),
)

base_names = sa.Table(
    "lpx_base_names", metadata,
    sa.Column("name", sa.String(1024), primary_key=True),
    sa.Column("digest", _DIGEST, sa.ForeignKey("lpx_bases.digest"), nullable=False),
    sa.Column("created_at", _TS, nullable=False),
    sa.Column("created_by", sa.String(256), nullable=False),
)

versions = sa.Table(
    "lpx_versions", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("adapter_id", sa.Integer, sa.ForeignKey("lpx_adapters.id"), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("digest", _DIGEST, nullable=False, index=True),
    sa.Column("config_blob", _DIGEST, nullable=False, index=True),
    sa.Column("weights_blob", _DIGEST, nullable=False, index=True),
    sa.Column("size_bytes", sa.BigInteger, nullable=False),
    sa.Column("rank", sa.Integer, nullable=False),
    sa.Column("alpha", sa.Float, nullable=False),
    sa.Column("use_rslora", sa.Boolean, nullable=False),
    sa.Column("target_modules", sa.JSON, nullable=False),
    sa.Column("dtype", sa.String(32), nullable=False),
    sa.Column("base_digest", _DIGEST, sa.ForeignKey("lpx_bases.digest"), nullable=False),
    sa.Column("lineage", sa.JSON, nullable=False),
    sa.Column("created_at", _TS, nullable=False),
    sa.Column("created_by", sa.String(256), nullable=False),
    sa.UniqueConstraint("adapter_id", "version", name="uq_lpx_versions_number"),
    sa.UniqueConstraint("adapter_id", "digest", name="uq_lpx_versions_digest"),
)

aliases = sa.Table(
    "lpx_aliases", metadata,
    sa.Column("adapter_id", sa.Integer, sa.ForeignKey("lpx_adapters.id"), primary_key=True),
    sa.Column("alias", sa.String(64), primary_key=True),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("updated_at", _TS, nullable=False),
    sa.Column("updated_by", sa.String(256), nullable=False),
)

alias_moves = sa.Table(
    "lpx_alias_moves", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("adapter_id", sa.Integer, sa.ForeignKey("lpx_adapters.id"), nullable=False),
    sa.Column("alias", sa.String(64), nullable=False),
    sa.Column("from_version", sa.Integer, nullable=True),
    sa.Column("to_version", sa.Integer, nullable=True),
    sa.Column("at", _TS, nullable=False),
    sa.Column("by", sa.String(256), nullable=False),
    sa.Index("ix_lpx_alias_moves_adapter", "adapter_id", "id"),  # alias_history
)

# Evaluation scores recorded against a version (`loraplex eval --record`, derivation gates):
# append-only, each row says who recorded it and when (registry/evaluations.py).
evaluations = sa.Table(
    "lpx_evaluations", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("adapter_id", sa.Integer, sa.ForeignKey("lpx_adapters.id"), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("name", sa.String(64), nullable=False),  # what was measured: eval, gate, ...
    sa.Column("data_digest", sa.String(128), nullable=True),  # the scored data, when known
    sa.Column("metrics", sa.JSON, nullable=False),  # {"loss": 0.41, "exact_match": 0.9}
    sa.Column("detail", sa.JSON, nullable=False),  # passed/reason of a gate, data path, n
    sa.Column("created_at", _TS, nullable=False),
    sa.Column("created_by", sa.String(256), nullable=False),
    sa.Index("ix_lpx_evaluations_adapter", "adapter_id", "version", "id"),
)

# The time a push last used each blob, written in the push's own transaction: gc re-checks
# it (and the versions) under this row's lock before deleting a blob (registry.gc).
blobs = sa.Table(
    "lpx_blobs", metadata,
    sa.Column("digest", _DIGEST, primary_key=True),
    sa.Column("used_at", _TS, nullable=False),
)

tokens = sa.Table(
    "lpx_tokens", metadata,
    sa.Column("token_hash", sa.String(64), primary_key=True),  # sha256 hex; never the token
    sa.Column("id", sa.String(32), nullable=False, unique=True),  # public handle: tok_<hex>
    sa.Column("tenant", sa.String(64), nullable=False, index=True),
    sa.Column("role", sa.String(16), nullable=False),
    sa.Column("scope", sa.String(16), nullable=False),  # inference | publish | admin
    sa.Column("label", sa.String(128), nullable=False, server_default=""),
    sa.Column("created_at", _TS, nullable=False),
    sa.Column("created_by", sa.String(256), nullable=False),
    sa.Column("expires_at", _TS, nullable=True),  # None: never
    sa.Column("last_used_at", _TS, nullable=True),
    sa.Column("revoked_at", _TS, nullable=True),
    sa.Column("revoked_by", sa.String(256), nullable=True),
)

# The audit log of token changes (created, rotated, revoked), like lpx_alias_moves.
token_events = sa.Table(
    "lpx_token_events", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("token_id", sa.String(32), nullable=False, index=True),
    sa.Column("tenant", sa.String(64), nullable=False, index=True),
    sa.Column("action", sa.String(16), nullable=False),  # created | rotated | revoked | purged
    sa.Column("detail", sa.String(256), nullable=False, server_default=""),
    sa.Column("at", _TS, nullable=False),
    sa.Column("by", sa.String(256), nullable=False),
)

changes = sa.Table(
    "lpx_changes", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("tenant", sa.String(64), nullable=False),
    sa.Column("name", sa.String(64), nullable=False),
    sa.Column("version", sa.Integer, nullable=True),
    sa.Column("alias", sa.String(64), nullable=True),
    sa.Column("digest", _DIGEST, nullable=True),
    sa.Column("at", _TS, nullable=False),
)

_WRITE = "loraplex_write"
T = TypeVar("T")


def database_url(location: str | Path) -> tuple[str, Path | None]:
    """(SQLAlchemy URL, directory holding it or None). A plain path is a registry dir.
    The directory is created when missing and possible; a read-only one is left alone."""
    text = str(location)
    if "://" in text:
        path = sqlite_file(text)
        if path is not None:
            _make_dir(path.parent)
        return text, None
    root = Path(text).expanduser()
    _make_dir(root)
    return f"sqlite:///{root.resolve() / 'registry.db'}", root


def sqlite_file(url: str) -> Path | None:
    """The database file of a `sqlite:///path` URL (None for other URLs and `:memory:`)."""
    prefix = "sqlite:///"
    if url.startswith(prefix) and len(url) > len(prefix) and ":memory:" not in url:
        return Path(url[len(prefix):].split("?", 1)[0])
    return None


def sqlite_read_only(url: str) -> bool:
    """Whether a SQLite registry must be opened read-only: its file exists and this
    process may not write it or create journal files beside it. A missing file in an
    unwritable directory cannot be created: that is an error, raised here."""
    path = sqlite_file(url)
    if path is None:
        return False
    if not path.exists():
        if _writable(path.parent):
            return False
        raise faults.os_error(_not_writable(path.parent), "creating registry database in",
                              path.parent)
    return not (_writable(path.parent) and os.access(path, os.R_OK | os.W_OK))


def create_engine(url: str, settings: RegistrySettings, *, read_only: bool = False) -> Engine:
    """An engine with the transaction behaviour the module docstring relies on. Bound
    parameters (token hashes, lineage, tenant names) never appear in its logs or in the
    text of its exceptions (`hide_parameters`)."""
    if url.startswith("sqlite"):
        if read_only:
            url = _read_only_url(url)
        engine = sa.create_engine(url, connect_args={"timeout": settings.sqlite_busy_timeout_s},
                                  hide_parameters=True)
        _sqlite_events(engine, settings, read_only=read_only)
    else:
        engine = sa.create_engine(url, pool_pre_ping=True, hide_parameters=True,
                                  pool_size=settings.db_pool_size,
                                  max_overflow=settings.db_max_overflow,
                                  pool_timeout=settings.db_pool_timeout_s)
        if settings.db_schema:
            _pg_schema_events(engine, settings.db_schema)
    return engine


def _read_only_url(url: str) -> str:
    """`sqlite:///file:PATH?mode=ro&uri=true`, plus `immutable=1` when there is no WAL file:
    reading a WAL database needs its `-shm` file, which an unwritable directory cannot get
    (SQLite's wal.html, "Read-Only Databases"), and with no `-wal` the main file holds
    every commit. With a `-wal` file present, immutable would hide its commits: then plain
    `mode=ro`, which fails loudly rather than reading stale data if it cannot open."""
    path = sqlite_file(url)
    if path is None:
        raise ValueError(f"not a SQLite file URL: {url}")
    flags = "mode=ro" if Path(f"{path}-wal").exists() else "mode=ro&immutable=1"
    return f"sqlite:///file:{path.resolve()}?{flags}&uri=true"


def _writable(directory: Path) -> bool:
    """Root passes mode bits (os.access says yes) but not a read-only mount (EROFS)."""
    return os.access(directory, os.W_OK | os.X_OK)


def _not_writable(path: Path) -> OSError:
    readonly = bool(os.statvfs(path).f_flag & os.ST_RDONLY) if path.exists() else False
    code = errno.EROFS if readonly else errno.EACCES
    return OSError(code, os.strerror(code), str(path))


def _make_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise faults.os_error(e, "creating registry directory", path) from e


def _sqlite_events(engine: Engine, settings: RegistrySettings, *, read_only: bool) -> None:
    busy_ms = int(settings.sqlite_busy_timeout_s * 1000)

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record) -> None:
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (see _on_begin)
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout = {busy_ms}")
        if not read_only:  # switching to WAL writes the file header
            cur.execute("PRAGMA journal_mode = WAL")  # readers never block the writer
        cur.execute("PRAGMA foreign_keys = ON")
        cur.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # IMMEDIATE takes the write lock now, so two writers queue instead of deadlocking
        # when both try to upgrade a read lock.
        write = conn.get_execution_options().get(_WRITE, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


def _pg_schema_events(engine: Engine, schema: str) -> None:
    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record) -> None:
        cur = dbapi_conn.cursor()
        try:
            cur.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
            dbapi_conn.commit()
        except Exception:  # noqa: BLE001 - a concurrent creator won; the schema exists
            dbapi_conn.rollback()
        cur.execute(f'SET search_path TO "{schema}"')
        cur.close()
        dbapi_conn.commit()


def create_tables(engine: Engine) -> None:
    """Create missing tables and indexes; on PostgreSQL under an advisory lock, because
    several processes opening a fresh database at once would otherwise race on CREATE.
    Indexes are created one by one as well: `create_all` adds them only with a new table,
    and a database whose tables predate an index gets it here on its next writable open.
    There are no other schema migrations: columns are never added to existing tables."""
    with write_tx(engine) as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(7431902)"))
        metadata.create_all(conn, checkfirst=True)
        for table in metadata.sorted_tables:
            for index in table.indexes:
                index.create(conn, checkfirst=True)


@contextmanager
def write_tx(engine: Engine) -> Iterator[Connection]:
    """A transaction that intends to write (SQLite: BEGIN IMMEDIATE)."""
    with engine.connect() as conn:
        conn.execution_options(**{_WRITE: True})
        with conn.begin():
            yield conn


@contextmanager
def read_tx(engine: Engine) -> Iterator[Connection]:
    """A read-only transaction: one consistent snapshot."""
    with engine.connect() as conn, conn.begin():
        yield conn


@contextmanager
def statement_read(engine: Engine) -> Iterator[Connection]:
    """For a read that is one statement (each statement sees one consistent snapshot):
    on PostgreSQL an autocommit connection, which saves the BEGIN and COMMIT round trips
    of `read_tx`; on SQLite (no round trips) a `read_tx`."""
    if engine.dialect.name != "postgresql":
        with read_tx(engine) as conn:
            yield conn
        return
    with engine.connect() as conn:
        yield conn.execution_options(isolation_level="AUTOCOMMIT")


def lock_adapter(conn: Connection, adapter_id: int) -> sa.Row:
    """Serialise writers of one adapter (row lock on PostgreSQL; SQLite already holds
    the database write lock from BEGIN IMMEDIATE)."""
    q = sa.select(adapters).where(adapters.c.id == adapter_id)
    if conn.dialect.name == "postgresql":
        q = q.with_for_update()
    return conn.execute(q).one()


def lock_changes(conn: Connection) -> None:
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text("LOCK TABLE lpx_changes IN SHARE ROW EXCLUSIVE MODE"))


def upsert(conn: Connection, table: sa.Table, values: dict, update: dict) -> None:
    """INSERT … ON CONFLICT (primary key) DO UPDATE on either dialect; on PostgreSQL the
    row stays locked until the transaction ends."""
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    keys = [c.name for c in table.primary_key.columns]
    conn.execute(insert(table).values(**values).on_conflict_do_update(index_elements=keys,
                                                                      set_=update))


def insert_ignore(conn: Connection, table: sa.Table, values: dict) -> None:
    """INSERT … ON CONFLICT DO NOTHING on either dialect (waits for a concurrent inserter
    of the same key on PostgreSQL instead of failing)."""
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    conn.execute(insert(table).values(**values).on_conflict_do_nothing())


def is_retryable(exc: BaseException) -> bool:
    """A lost race: unique violation, SQLite lock timeout, PostgreSQL deadlock or
    serialization failure."""
    if isinstance(exc, sa.exc.IntegrityError):
        return True
    if isinstance(exc, sa.exc.OperationalError):
        text = str(exc.orig).lower()
        return ("locked" in text or "deadlock" in text or "serializ" in text
                or "busy" in text)
    return False


def with_retries(fn: Callable[[], T], attempts: int) -> T:
    """Run `fn` again (jittered backoff) when it loses a race; re-raise anything else."""
    for attempt in range(attempts):
        try:
            return fn()
        except sa.exc.DBAPIError as e:
            if attempt == attempts - 1 or not is_retryable(e):
                raise
            time.sleep(min(0.5, 0.01 * 2 ** attempt) * (0.5 + random.random()))
    raise AssertionError("unreachable: the loop returns or raises")
