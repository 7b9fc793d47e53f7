"""Domain errors → gRPC status codes with rich details, at one place.

Every `LoraplexError` names its gRPC code (`loraplex/errors.py`); here that name becomes a
`grpc.StatusCode` plus a `google.rpc.Status` in the trailing metadata (grpcio-status), so a
client can read *which* field was wrong (`BadRequest`), why (`ErrorInfo`) and when to retry
(`RetryInfo`). Anything that is not a `LoraplexError` is a bug: it is logged with its
traceback and becomes INTERNAL without leaking internals to the caller.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from loraplex.errors import LoraplexError

log = logging.getLogger("loraplex.runtime.grpc")
DOMAIN = "loraplex.dev"
RETRY_AFTER_S = 1.0
# Codes whose errors carry RetryInfo (RETRY_AFTER_S unless the error names its own
# `retry_after_s`): a full queue, a tenant over a rate or share, a server going away.
RETRYABLE = (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE)
# An error travels three times in the trailing metadata (grpc-message percent-encoded, then
# the base64 Status holding the message and a BadRequest description); a default client
# refuses more than 16 KiB of metadata. Inputs are quoted short (`errors.quote`); this cap
# (UTF-8 bytes) keeps any message, e.g. a long list of violations, within the limit too.
MAX_MESSAGE_BYTES = 1536


@dataclass(frozen=True)
class MappedError:
    """What a caller learns about a failure: code, message and the field at fault."""

    code: grpc.StatusCode
    message: str
    field: str | None
    reason: str  # the error class name, e.g. "AliasConflict"
    retry_after_s: float | None = None  # RetryInfo: when a retry may succeed


def status_code(name: str) -> grpc.StatusCode:
    """`grpc.StatusCode` by name; unknown names are a bug in the error table → INTERNAL."""
    return getattr(grpc.StatusCode, name, grpc.StatusCode.INTERNAL)


def map_error(error: BaseException, request_id: str = "") -> MappedError:
    """Classify any exception; logs the ones that are bugs."""
    if isinstance(error, LoraplexError):
        if error.public_message != error.message:  # the server's own detail stays here
            log.warning("request %s: %s: %s", request_id or "-", type(error).__name__,
                        error.message)
        code = status_code(error.code)
        retry = getattr(error, "retry_after_s", None)
        if retry is None and code in RETRYABLE:
            retry = RETRY_AFTER_S
        return MappedError(code, cap_message(error.public_message), error.field,
                           type(error).__name__, retry)
    log.error("internal error in request %s", request_id or "-", exc_info=error)
    suffix = f" (request id {request_id})" if request_id else ""
    return MappedError(grpc.StatusCode.INTERNAL, "internal error" + suffix, None, "Internal")


def rich_status(mapped: MappedError, request_id: str = "") -> grpc.Status:
    """A `grpc.Status` carrying google.rpc details in its trailing metadata."""
    details = [_pack(error_details_pb2.ErrorInfo(
        reason=mapped.reason, domain=DOMAIN,
        metadata={"request_id": request_id} if request_id else {}))]
    if mapped.field:
        details.append(_pack(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=mapped.field,
                                                        description=mapped.message)])))
    if mapped.retry_after_s is not None:
        delay = max(0.0, mapped.retry_after_s)
        details.append(_pack(error_details_pb2.RetryInfo(
            retry_delay={"seconds": int(delay), "nanos": int((delay % 1) * 1e9)})))
    status = status_pb2.Status(code=_rpc_code(mapped.code), message=mapped.message,
                               details=details)
    return rpc_status.to_status(status)


def set_status(context: grpc.aio.ServicerContext, error: BaseException,
               request_id: str = "") -> None:
    """Give the RPC the status `error` maps to; grpc sends it when the handler returns.

    Why not `context.abort`: it raises grpc's AbortError, which the call's state keeps. That
    exception's traceback holds the handler's frames, with the request (a 4 MiB prompt, an
    upload chunk) among their locals, and those frames hold the context that holds the
    exception: a reference cycle only a full garbage collection frees. With torch loaded,
    full collections are rare, and a storm of refused large requests piled up in memory
    (bench.storm: a server's RSS climbed by hundreds of MiB a minute). A status set before a
    plain return leaves no cycle."""
    status = rich_status(map_error(error, request_id), request_id)
    context.set_code(status.code)
    context.set_details(status.details)
    context.set_trailing_metadata(status.trailing_metadata)


def cap_message(message: str) -> str:
    """`message`, cut at `MAX_MESSAGE_BYTES` of UTF-8 with a note saying so."""
    raw = message.encode()
    if len(raw) <= MAX_MESSAGE_BYTES:
        return message
    head = raw[:MAX_MESSAGE_BYTES].decode(errors="ignore")  # no half character
    return f"{head}... (cut; {len(message)} characters in all)"


def _pack(message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def _rpc_code(code: grpc.StatusCode) -> int:
    return getattr(code_pb2, code.name, code_pb2.INTERNAL)
