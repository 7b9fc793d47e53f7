"""When the environment fails: disk full, read-only or forbidden storage, a dropped database.

None of these is a bug in loraplex, so none may reach the gRPC edge as INTERNAL or the
command line as a traceback. This module turns them into typed errors (`loraplex.errors`)
whose message names the path or database and what to do, and holds the one retry rule:
an idempotent read that loses its database connection runs once more (the pool's
pre-ping has already replaced dead idle connections; this covers a connection that dies
mid-transaction). A write is never replayed: whether its commit landed is unknown.

    @reads            # resolve, list, show, changes: one retry on a dropped connection
    def resolve(self, ...): ...

    @writes           # push, set_alias, delete: translated, never retried here
    def set_alias(self, ...): ...

Both decorators need `self.db_where` (the database as shown to people, no password);
`writes` also reads `self.read_only`.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import sqlalchemy as sa

from loraplex.errors import (
    DatabaseUnavailable,
    FailedPrecondition,
    LoraplexError,
    StorageAccessDenied,
    StorageFull,
    StorageReadOnly,
    StorageUnavailable,
)

log = logging.getLogger("loraplex.registry")
F = TypeVar("F", bound=Callable[..., Any])

_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
_DENIED = frozenset({errno.EACCES, errno.EPERM})
# PostgreSQL SQLSTATEs: disk_full, insufficient_resources, out_of_memory,
# too_many_connections, read_only_sql_transaction.
_PG_FULL = frozenset({"53100"})
_PG_BUSY = frozenset({"53000", "53200", "53300"})
_PG_READ_ONLY = frozenset({"25006"})


def os_error(e: OSError, doing: str, path: str | os.PathLike[str]) -> LoraplexError:
    """An OSError from the blob store (or a pull) as the typed error a user can act on.
    `doing` reads like "writing blob", `path` is the file or directory involved."""
    what = f"{doing} {path}: {os.strerror(e.errno) if e.errno else e}"
    if e.errno in _FULL:
        return StorageFull(f"{what}: the filesystem holding {path} is full; free space or "
                           "move the registry to a larger volume, then retry",
                           public="the registry's storage is full; retry later")
    if e.errno == errno.EROFS:
        return StorageReadOnly(f"{what}: the storage is mounted read-only; reads work, "
                               "writes need it mounted read-write",
                               public="the registry's storage is read-only; reads work")
    if e.errno in _DENIED:
        return StorageAccessDenied(f"{what}: this process (uid {os.geteuid()}) may not do "
                                   "that; fix the owner or mode of that path",
                                   public="the registry may not access its storage")
    return StorageUnavailable(f"{what} ({errno.errorcode.get(e.errno or 0, 'OSError')}); "
                              "retry, and check the storage if it persists",
                              public="the registry's storage failed; retry shortly")


def is_dropped(e: BaseException) -> bool:
    """A lost or unusable connection (SQLAlchemy invalidated it, or the driver said the
    server went away), or any OperationalError: worth one more try for a read."""
    if isinstance(e, sa.exc.DBAPIError) and e.connection_invalidated:
        return True
    return isinstance(e, sa.exc.OperationalError | sa.exc.InterfaceError)


def db_error(e: sa.exc.DBAPIError, where: str) -> LoraplexError | None:
    """A database failure as a typed error, or None when it is not the environment's
    fault (a syntax error, a constraint we should have checked: those stay bugs)."""
    text = str(getattr(e, "orig", e)).strip()
    first = text.splitlines()[0] if text else type(e).__name__
    low = text.lower()
    code = getattr(getattr(e, "orig", None), "sqlstate", None)
    if code in _PG_FULL or "disk is full" in low or "no space left" in low:
        return StorageFull(f"registry database {where}: {first}: free space where the "
                           "database stores its files, then retry",
                           public="the registry database is full; retry later")
    if code in _PG_READ_ONLY or "readonly database" in low or "read-only" in low:
        return StorageReadOnly(f"registry database {where} is read-only ({first}); reads "
                               "work, writes need write access to it and its directory",
                               public="the registry database is read-only; reads work")
    if code == "42P01" or "no such table" in low:  # undefined_table
        return FailedPrecondition(f"registry database {where} has no loraplex tables ({first}): "
                                  "it is not a registry, or it was only ever opened read-only",
                                  public="the registry database is not set up")
    if "unable to open database file" in low:
        return StorageAccessDenied(f"registry database {where}: {first}: check that it "
                                   "exists and that this process may read it (and write "
                                   "its directory, to change it)",
                                   public="the registry may not open its database")
    if e.connection_invalidated or code in _PG_BUSY or isinstance(
            e, sa.exc.OperationalError | sa.exc.InterfaceError):
        return DatabaseUnavailable(f"registry database {where} is unavailable ({first}); "
                                   "retry shortly",
                                   public="the registry database is unavailable; retry "
                                   "shortly")
    return None


def reads(fn: F) -> F:
    """Typed errors, and one retry when the connection dropped (idempotent reads only)."""

    @functools.wraps(fn)
    @_pool_waits
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(self, *args, **kwargs)
        except sa.exc.DBAPIError as e:
            if not is_dropped(e):
                _raise_typed(e, self.db_where)
            log.warning("%s: database connection lost (%s); retrying once", fn.__name__,
                        type(getattr(e, "orig", e)).__name__)
        try:
            return fn(self, *args, **kwargs)
        except sa.exc.DBAPIError as e:
            _raise_typed(e, self.db_where)

    return wrapper  # type: ignore[return-value]


def writes(fn: F) -> F:
    """Typed errors for a write; never replayed (its commit may or may not have landed).
    A registry opened read-only refuses at once, before any blob is written."""

    @functools.wraps(fn)
    @_pool_waits
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(self, "read_only", False):
            raise StorageReadOnly(
                f"registry {self.db_where} is open read-only (this process cannot write "
                f"it or its directory): {fn.__name__.strip('_')} needs write access",
                public="this registry is read-only: "
                f"{fn.__name__.strip('_')} needs write access")
        try:
            return fn(self, *args, **kwargs)
        except sa.exc.DBAPIError as e:
            _raise_typed(e, self.db_where)

    return wrapper  # type: ignore[return-value]


def _pool_waits(fn: F) -> F:
    """The connection pool stayed full for `db_pool_timeout_s` (SQLAlchemy's TimeoutError,
    not a DBAPIError): the registry is busy, not broken: UNAVAILABLE, retry later."""

    @functools.wraps(fn)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(self, *args, **kwargs)
        except sa.exc.TimeoutError as e:
            raise DatabaseUnavailable(f"registry database {self.db_where}: every connection "
                                      "is busy; retry shortly") from e

    return wrapper  # type: ignore[return-value]


def _raise_typed(e: sa.exc.DBAPIError, where: str) -> NoReturn:
    """Raise the typed form of `e`, or `e` itself when it is a bug (stays INTERNAL)."""
    typed = db_error(e, where)
    if typed is None:
        raise e
    raise typed from e

