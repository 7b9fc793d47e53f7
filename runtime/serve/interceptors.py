"""Server interceptors, one job each, composed in `server.py` in this order (outermost first):

1. `RequestIdInterceptor` — binds the request id (`x-request-id` metadata or a fresh one) to
   a contextvar so logs and errors of the whole call can name it. A caller's id is taken
   only when it is at most 128 characters of `[A-Za-z0-9._:-]` (`plain_request_id`): any
   other is replaced by a fresh one before anything logs or echoes it.
2. `ErrorInterceptor` — turns `LoraplexError`s into their precise status code with details
   (`grpc_errors.py`), set on the call for grpc to send when the handler returns (never
   raised through grpc: see `grpc_errors.set_status`); anything else is a bug → INTERNAL,
   logged. A caller whose calls
   keep being refused gets its refusals later (`pacing.py`), keyed by its tenant once
   `AuthInterceptor` knows it, else by its address.
3. `MetricsInterceptor` — counts finished RPCs by method and status code.
4. `AuthInterceptor` — `authorization: Bearer <token>` → `Registry.authenticate` → the
   caller's `Identity` in a contextvar; AdminService requires the admin role.

Each wraps the method handler's behaviour in an async context manager ("scope"), so the
contextvars are set in the task that runs the servicer, for unary and streaming RPCs alike.
Health checks and reflection are never authenticated (load balancers and grpcurl call them).

Streaming responses are written with `context.write` from one coroutine rather than
re-yielded from a wrapping async generator. When a client cancels or its deadline passes,
grpc cancels the RPC's task wherever it waits; a wrapping generator left suspended at a
`yield` would instead be closed later by the event loop's generator finalizer in a task of
its own: its scopes' `finally` then ran in another `Context` (`ContextVar.reset` raised
"created in a different Context", logged as "Task exception was never retrieved") and
counted a `GeneratorExit` as UNKNOWN. Here every scope exits in the RPC's own task, and the
servicer's generator is closed there too (`aclosing`), so its cleanup runs at once.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, aclosing, asynccontextmanager
from typing import Any

import grpc
from grpc._cython.cygrpc import ExecuteBatchError  # private: see `write`

from loraplex.errors import LoraplexError, PermissionDenied, Unauthenticated
from loraplex.runtime.serve import grpc_errors

log = logging.getLogger("loraplex.runtime.grpc")

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
identity_var: contextvars.ContextVar[Any] = contextvars.ContextVar("identity", default=None)
# Who is calling, for pacing refusals: {"peer": …}, plus "tenant" once authenticated. One
# dict per call, set by the outer ErrorInterceptor and filled in by the inner AuthInterceptor.
caller_var: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "caller", default=None)

PUBLIC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
ADMIN_PREFIX = "/loraplex.v1.AdminService/"
# AdminService methods the registry authorizes itself (token scope `admin`: an admin, or a
# tenant-admin token for its own tenant), so the interceptor's admin-role check skips them.
TOKEN_METHODS = frozenset(ADMIN_PREFIX + m for m in (
    "CreateToken", "ListTokens", "RevokeToken", "RotateToken", "TokenHistory",
    "PurgeTokens"))
REQUEST_ID_KEY = "x-request-id"
DEADLINE_SLACK_S = 0.25  # see `ended_by_client`
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def plain_request_id(value: str | None) -> str | None:
    """`value` when it is a request id safe to log and echo, else None."""
    return value if value and REQUEST_ID.fullmatch(value) else None

Scope = Callable[[grpc.aio.ServicerContext], AbstractAsyncContextManager[None]]


def current_request_id() -> str:
    return request_id_var.get()


def current_identity() -> Any:
    """The authenticated caller (`loraplex.registry.Identity`); set by `AuthInterceptor`."""
    identity = identity_var.get()
    if identity is None:  # a servicer ran without the auth interceptor: a wiring bug
        raise RuntimeError("no caller identity bound to this RPC")
    return identity


def metadata_value(context: grpc.aio.ServicerContext, key: str) -> str | None:
    for k, v in context.invocation_metadata() or ():
        if k == key:
            return v if isinstance(v, str) else v.decode()
    return None


def ended_by_client(context: grpc.aio.ServicerContext) -> str:
    """Why grpc cancelled an RPC's task: its deadline passed, or the client cancelled (or
    the server is stopping). The code the client sees, for metrics and logs.

    The server's copy of the deadline starts when the call arrives, a little after the
    client's; the client's own deadline timer often fires first and its cancel reaches us
    a few milliseconds before ours would (seen: 4-9 ms on a busy 2-core machine). So a
    cancel within `DEADLINE_SLACK_S` of the deadline is the deadline.
    """
    remaining = context.time_remaining()
    return ("DEADLINE_EXCEEDED" if remaining is not None and remaining <= DEADLINE_SLACK_S
            else "CANCELLED")


async def write(context: grpc.aio.ServicerContext, item: Any) -> None:
    """`context.write`, where a call that can no longer send counts as cancelled.

    When the client cancels or its deadline passes while a write is in flight, grpc fails
    the write's batch (`ExecuteBatchError`, the error its own streaming loop swallows for a
    closed call) instead of cancelling the task. The call is over either way: raise what a
    cancel raises, so every scope sees one kind of ending and grpc ends the call quietly.
    (`ErrorInterceptor` does the same for an error raised after the call ended, e.g. the
    engine retired a request by its deadline just as the client gave up.)
    """
    try:
        await context.write(item)
    except ExecuteBatchError as e:
        raise asyncio.CancelledError("the call ended while a response was being sent") from e


def wrap_handler(handler: grpc.RpcMethodHandler, scope: Scope) -> grpc.RpcMethodHandler:
    """The same handler with every call of its behaviour running inside `scope(context)`."""

    def unary_response(behavior):
        async def wrapped(request, context):
            async with scope(context):
                return await behavior(request, context)
        return wrapped

    def stream_response(behavior):
        if inspect.iscoroutinefunction(behavior):  # already a writer (an inner wrap)
            return unary_response(behavior)
        if not inspect.isasyncgenfunction(behavior):
            raise TypeError(f"streaming handler {behavior!r} is not async: grpc.aio serves "
                            "async generators (or coroutines that write)")

        async def wrapped(request, context):  # see the module doc: write, don't re-yield
            async with scope(context), aclosing(behavior(request, context)) as items:
                async for item in items:
                    await write(context, item)
        return wrapped

    ser, de = handler.response_serializer, handler.request_deserializer
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary_response(handler.unary_unary), de, ser)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(stream_response(handler.unary_stream), de, ser)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary_response(handler.stream_unary), de, ser)
    return grpc.stream_stream_rpc_method_handler(stream_response(handler.stream_stream), de, ser)


class _ScopeInterceptor(grpc.aio.ServerInterceptor):
    """Base: wrap every non-public handler's behaviour in `self.scope(method, context)`."""

    wraps_public = False

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or (not self.wraps_public and method.startswith(PUBLIC_PREFIXES)):
            return handler
        return wrap_handler(handler, lambda context: self.scope(method, context))

    def scope(self, method: str,
              context: grpc.aio.ServicerContext) -> AbstractAsyncContextManager[None]:
        raise NotImplementedError


class RequestIdInterceptor(_ScopeInterceptor):
    """Binds the caller's `x-request-id` (or a fresh id) for logs and error details."""

    @asynccontextmanager
    async def scope(self, method, context) -> AsyncIterator[None]:
        given = plain_request_id(metadata_value(context, REQUEST_ID_KEY))
        token = request_id_var.set(given or uuid.uuid4().hex)
        try:
            yield
        finally:
            request_id_var.reset(token)


class ErrorInterceptor(_ScopeInterceptor):
    """Domain errors → their status code with details; any other exception → INTERNAL.
    With a `pacer`, a refusal of a caller that keeps being refused waits first."""

    def __init__(self, pacer: Any = None) -> None:
        self.pacer = pacer  # pacing.RefusalPacer

    @asynccontextmanager
    async def scope(self, method, context) -> AsyncIterator[None]:
        caller = {"peer": _peer_host(context)}
        token = caller_var.set(caller)
        try:
            yield
        except (grpc.aio.AbortError, asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as e:  # noqa: BLE001 - the one place every failure is classified
            if not isinstance(e, LoraplexError):
                log.error("bug in %s", method)
            elif self.pacer is not None:
                key = f"tenant:{caller['tenant']}" if "tenant" in caller \
                    else f"peer:{caller['peer']}"
                await self.pacer.pace(key, e.code)
            task = asyncio.current_task()
            if task is not None and task.cancelling():  # grpc cancelled the call first
                raise asyncio.CancelledError("the call ended before its status") from None
            grpc_errors.set_status(context, e, current_request_id())  # sent on return
        finally:
            caller_var.reset(token)


class MetricsInterceptor(_ScopeInterceptor):
    """Counts finished RPCs by method and code (`ServerMetrics.observe_rpc`)."""

    wraps_public = True

    def __init__(self, metrics) -> None:
        self.metrics = metrics

    @asynccontextmanager
    async def scope(self, method, context) -> AsyncIterator[None]:
        start = time.perf_counter()
        code = "OK"
        try:
            yield
            code = _code_name(context.code() or grpc.StatusCode.OK)  # a status set, or OK
        except asyncio.CancelledError:
            code = ended_by_client(context)
            raise
        except grpc.aio.AbortError:
            code = _code_name(context.code())
            raise
        except BaseException:
            code = "UNKNOWN"
            raise
        finally:
            self.metrics.observe_rpc(method, code, time.perf_counter() - start)


class AuthInterceptor(_ScopeInterceptor):
    """Bearer token → `Identity` via the registry; admin-only services check the role.

    `authenticate(token, peer=...)` gets the caller's address (`context.peer()`), by
    which the registry backs off repeated failures (registry/tokens.py). `cached(token,
    peer=...)`, when given, answers on the event loop whatever needs no database (a token
    checked before, a peer backing off, a token known bad): most calls, the hostile ones
    included, never take a worker thread; None from it sends the call to `authenticate`
    in one. With a `pacer`, a tenant over its refusal budget waits before its call starts
    (`pacing.py`). With `authenticate=None` (the `--no-auth` flag) every caller is `fallback`
    (an admin).
    """

    def __init__(self, authenticate: Callable[..., Any] | None, fallback: Any = None,
                 cached: Callable[..., Any] | None = None, pacer: Any = None) -> None:
        self.authenticate = authenticate
        self.fallback = fallback
        self.cached = cached
        self.pacer = pacer  # pacing.RefusalPacer: a tenant over its refusal budget waits

    @asynccontextmanager
    async def scope(self, method, context) -> AsyncIterator[None]:
        identity = await self._identify(context)
        caller = caller_var.get()
        if caller is not None and getattr(identity, "tenant", None):
            caller["tenant"] = identity.tenant
            if self.pacer is not None:
                await self.pacer.pace_start(f"tenant:{identity.tenant}")
        if (method.startswith(ADMIN_PREFIX) and method not in TOKEN_METHODS
                and getattr(identity, "role", "") != "admin"):
            raise PermissionDenied(f"{method.rsplit('/', 1)[-1]} needs the admin role")
        token = identity_var.set(identity)
        try:
            yield
        finally:
            identity_var.reset(token)

    async def _identify(self, context) -> Any:
        if self.authenticate is None:
            return self.fallback
        header = metadata_value(context, "authorization")
        if not header:
            raise Unauthenticated("missing `authorization: Bearer <token>` metadata")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("authorization metadata must be `Bearer <token>`")
        token, peer = token.strip(), _peer_host(context)
        if self.cached is not None:
            identity = self.cached(token, peer=peer)
            if identity is not None:
                return identity
        return await asyncio.to_thread(self.authenticate, token, peer=peer)


def _peer_host(context: grpc.aio.ServicerContext) -> str:
    """`ipv4:10.0.0.7` of `ipv4:10.0.0.7:53211`: one backoff per address, not per
    connection (a client opens a new port for each)."""
    peer = context.peer() or ""
    return peer.rsplit(":", 1)[0] if peer.startswith(("ipv4:", "ipv6:")) else peer


def _code_name(code: grpc.StatusCode | None) -> str:
    return code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
