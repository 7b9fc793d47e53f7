"""Typed errors shared by every layer.

Each error carries a `code` that names the gRPC status it becomes at the edge; the gRPC
servicers are the only place that translates (see `runtime/serve/grpc_errors.py`). Anything that
is not a `LoraplexError` reaching the edge is a bug and becomes INTERNAL.
"""

from __future__ import annotations

ECHO_CHARS = 64  # how much of a caller's input an error message quotes


def quote(value: object, limit: int = ECHO_CHARS) -> str:
    """`repr(value)` for an error message, cut to a short prefix when long.

    Every error that quotes what a caller sent quotes it through here. Errors reach gRPC
    clients in trailing metadata (message plus google.rpc details), which a default client
    refuses beyond 16 KiB: an error that quoted a 10,000-character ref in full reached its
    caller as RESOURCE_EXHAUSTED instead of INVALID_ARGUMENT. The length says how much was
    cut, so the message still tells the caller what was wrong.
    """
    text = repr(value)
    if len(text) <= limit:
        return text
    size = f" ({len(value)} characters)" if isinstance(value, str | bytes) else ""
    return f"{text[:limit]}...{size}"


class LoraplexError(Exception):
    """Base of every error a user can cause. `field` names the offending input, if any.

    `public`: what a remote caller (a tenant over gRPC or HTTP) is told instead of
    `message`, for failures of the server's own environment, whose full message names
    server paths, the database host, the S3 bucket or the process's uid: those belong in
    the server's log and on the operator's command line, not in a tenant's error."""

    code: str = "INTERNAL"

    def __init__(self, message: str, *, field: str | None = None,
                 public: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.public = public

    @property
    def public_message(self) -> str:
        """The message for a remote caller (see the class docstring)."""
        return self.public if self.public is not None else self.message

    def __str__(self) -> str:
        return self.message


class InvalidArgument(LoraplexError):
    """The request itself is malformed (bad ref, bad sampling value, bad adapter file)."""

    code = "INVALID_ARGUMENT"


class ValidationFailed(InvalidArgument):
    """An adapter failed registration checks; `violations` lists every problem at once."""

    def __init__(self, violations: list[str], *, field: str | None = None) -> None:
        self.violations = list(violations)
        super().__init__("adapter rejected: " + "; ".join(self.violations), field=field)


class NotFound(LoraplexError):
    """No such adapter/version/alias visible to the caller (also used for foreign tenants)."""

    code = "NOT_FOUND"


class AlreadyExists(LoraplexError):
    code = "ALREADY_EXISTS"


class FailedPrecondition(LoraplexError):
    """The system is not in a state that allows the call (incompatible base, CAS mismatch,
    deleting a version an alias points at)."""

    code = "FAILED_PRECONDITION"


class IncompatibleAdapter(FailedPrecondition):
    """The adapter was trained for a different base model (fingerprints differ)."""


class AliasConflict(FailedPrecondition):
    """Compare-and-set on an alias failed: it no longer points where the caller expected."""


class Unauthenticated(LoraplexError):
    code = "UNAUTHENTICATED"


class PermissionDenied(LoraplexError):
    code = "PERMISSION_DENIED"


class ResourceExhausted(LoraplexError):
    """Queue full, per-tenant limit, or a request asking for more tokens than allowed."""

    code = "RESOURCE_EXHAUSTED"


class QuotaExceeded(ResourceExhausted):
    """A tenant's registry quota (versions or bytes) would be exceeded: delete versions
    or ask for a larger quota; waiting does not help."""


class AuthThrottled(ResourceExhausted):
    """Too many failed authentications from one peer: refused without looking at the
    token until `retry_after_s` has passed."""

    def __init__(self, message: str, *, retry_after_s: float) -> None:
        super().__init__(message, field="token", public=None)
        self.retry_after_s = retry_after_s


class Overloaded(ResourceExhausted):
    """The waiting queue is full: back off and retry."""


class DeadlineExceeded(LoraplexError):
    code = "DEADLINE_EXCEEDED"


class Cancelled(LoraplexError):
    code = "CANCELLED"


class Unavailable(LoraplexError):
    """The server is draining or not ready yet."""

    code = "UNAVAILABLE"


class DataCorruption(LoraplexError):
    """A stored blob no longer matches its digest."""

    code = "DATA_LOSS"


# ---- the environment failed (disk, permissions, database): never a bug, never INTERNAL


class StorageFull(ResourceExhausted):
    """The registry's disk or quota is full (ENOSPC/EDQUOT, SQLite "disk is full",
    PostgreSQL 53100): free space or move the registry, then retry."""


class StorageReadOnly(FailedPrecondition):
    """The registry's storage is read-only (EROFS, a read-only SQLite file or directory,
    a read-only PostgreSQL transaction): reads work, writes need writable storage."""


class StorageAccessDenied(FailedPrecondition):
    """This process may not read or write a registry path (EACCES/EPERM): fix the
    owner or mode of the path the message names."""


class StorageUnavailable(Unavailable):
    """A registry path failed with an I/O error that may pass (EIO, a stale mount)."""


class DatabaseUnavailable(Unavailable):
    """The registry database dropped the connection or cannot be reached (already
    retried once for reads): retry after the delay in RetryInfo."""
