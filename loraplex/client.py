"""Python client of the loraplex gRPC API, sync (`Client`) and asyncio (`AsyncClient`).

    from loraplex.client import Client
    with Client("localhost:50051", token="lpx_...") as c:
        c.wait_ready()
        print(c.generate("acme/support@prod", "Where is my order?").text)
        for chunk in c.stream("acme/support@prod", "Hello"):
            print(chunk.text, end="")

    async with AsyncClient("localhost:50051", token="lpx_...") as c:
        await c.wait_ready()
        print((await c.generate("acme/support@prod", "Hi")).text)

Both clients have the same methods, generated from one table (`loraplex.client_rpcs.RPCS`):
the same requests, metadata, retries and errors; the async one returns awaitables and async
iterators where the sync one returns values and iterators. Every method takes `timeout=`
(seconds) and `request_id=` (default: a fresh id); the id goes out as `x-request-id`, comes
back in `Generation.request_id`, and is on every error raised (`.request_id`).

TLS: `tls=True` verifies the server against the system's roots; `tls_ca="ca.pem"` against
that CA bundle (a self-signed or private CA), and `tls_cert`/`tls_key` present a client
certificate to a server that requires one (mutual TLS). Without any of them the channel is
plaintext, which a TLS server refuses.

    Client("serve.example:50051", token, tls_ca="ca.pem")

Generation calls return plain dataclasses (`Generation`, `StreamChunk`); registry and admin
calls return the protobuf messages of `loraplex.v1`. Failures raise the typed errors of
`loraplex.errors` (`NotFound`, `InvalidArgument` with `.field`, …), each carrying the
original `grpc.StatusCode` as `.status_code`.
"""

from __future__ import annotations

import asyncio
import inspect
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from os import PathLike
from typing import Any

import grpc
from grpc_health.v1 import health_pb2_grpc

from loraplex import errors
from loraplex.client_rpcs import (
    CHUNK_BYTES,
    CLIENT_STREAM,
    REQUEST_ID_KEY,
    RPCS,
    SERVER_STREAM,
    Generation,
    Rpc,
    RpcError,
    StreamChunk,
    generate_request,
    register_messages,
    service_config,
    set_alias_request,
    typed_error,
)
from loraplex.v1 import admin_pb2_grpc, inference_pb2_grpc, registry_pb2_grpc

__all__ = ["CHUNK_BYTES", "AsyncClient", "Client", "Generation", "RpcError", "StreamChunk",
           "channel_credentials", "generate_request", "register_messages", "set_alias_request", "typed_error"]

READY_POLL_S = 0.1  # between health checks in wait_ready


class _Prepared:
    """One call, ready to send: the stub method, the request and the call options."""

    def __init__(self, client: _Base, name: str, args: tuple, kw: dict[str, Any]) -> None:
        rpc = RPCS[name]
        timeout = kw.pop("timeout", None)
        self.request_id = kw.pop("request_id", None) or uuid.uuid4().hex
        if rpc.sends_request_id:
            kw["request_id"] = self.request_id
        self.rpc = rpc
        self.request = rpc.build(*args, **kw)
        self.fn = getattr(client._stubs[rpc.service], rpc.method)
        md = client.metadata(self.request_id)
        if timeout is None:
            timeout = rpc.timeout if rpc.timeout is not None else client.timeout
        self.timeout = timeout
        self.options = {"metadata": md, "timeout": timeout}

    def error(self, e: grpc.RpcError) -> errors.LoraplexError:
        return typed_error(e, self.request_id)

    def ended_quietly(self, e: grpc.RpcError) -> bool:
        """A stream like `watch` that the caller bounded by `timeout` just ends."""
        ended = {grpc.StatusCode.CANCELLED}
        if self.timeout is not None:
            ended.add(grpc.StatusCode.DEADLINE_EXCEEDED)
        return self.rpc.quiet_end and e.code() in ended


def channel_credentials(tls: bool | None = None, tls_ca: str | PathLike | None = None,
                        tls_cert: str | PathLike | None = None,
                        tls_key: str | PathLike | None = None) -> grpc.ChannelCredentials | None:
    """TLS credentials for a channel, or None for plaintext (nothing asked for TLS).
    `tls_ca`: PEM roots to verify the server (default: the system's); `tls_cert` and
    `tls_key`: this client's certificate, for servers that require one."""
    if (tls_cert is None) != (tls_key is None):
        raise errors.InvalidArgument("tls_cert and tls_key go together", field="tls_cert")
    if tls is False and (tls_ca or tls_cert):
        raise errors.InvalidArgument("tls=False with TLS files", field="tls")
    if not (tls or tls_ca or tls_cert):
        return None

    def read(path, field: str) -> bytes | None:
        if path is None:
            return None
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as e:
            raise errors.InvalidArgument(f"cannot read {field} {errors.quote(str(path))}: "
                                         f"{e.strerror}", field=field) from e

    return grpc.ssl_channel_credentials(root_certificates=read(tls_ca, "tls_ca"),
                                        private_key=read(tls_key, "tls_key"),
                                        certificate_chain=read(tls_cert, "tls_cert"))


class _Base:
    def __init__(self, target: str, token: str | None, timeout: float | None,
                 max_message_bytes: int, tls: dict[str, Any]) -> None:
        self.target = target
        self.token = token
        self.timeout = timeout
        self._credentials = channel_credentials(**tls)
        self._options = [("grpc.max_receive_message_length", max_message_bytes),
                         ("grpc.max_send_message_length", max_message_bytes),
                         ("grpc.enable_retries", 1),
                         ("grpc.service_config", service_config())]

    def metadata(self, request_id: str = "") -> list[tuple[str, str]]:
        """What every call sends: the bearer token and the request id (for raw stub calls)."""
        md = [("authorization", f"Bearer {self.token}")] if self.token else []
        return md + [(REQUEST_ID_KEY, request_id)] if request_id else md

    def _set_channel(self, channel) -> None:
        self.channel = channel
        self._stubs = {"inference": inference_pb2_grpc.InferenceServiceStub(channel),
                       "registry": registry_pb2_grpc.RegistryServiceStub(channel),
                       "admin": admin_pb2_grpc.AdminServiceStub(channel),
                       "health": health_pb2_grpc.HealthStub(channel)}

    def _invoke(self, name: str, args: tuple, kw: dict[str, Any]) -> Any:
        raise NotImplementedError

    @staticmethod
    def _not_ready(target: str, timeout: float, last: str) -> errors.Unavailable:
        return errors.Unavailable(f"{target} not SERVING after {timeout:.0f}s ({last})")


def _ready_checks(timeout: float) -> Iterator[float]:
    """Per-check deadlines for `wait_ready` until `timeout` has passed (one check at least)."""
    end = time.monotonic() + timeout
    while True:
        yield min(5.0, max(0.1, end - time.monotonic()))
        if time.monotonic() >= end:
            return


def _method(name: str, rpc: Rpc):
    def call(self, *args: Any, **kw: Any):
        return self._invoke(name, args, kw)

    try:
        params = list(inspect.signature(rpc.build).parameters.values())
    except (TypeError, ValueError):  # a protobuf class as the builder: no arguments worth naming
        params = []
    params = [p for p in params if p.name != "request_id"]
    kw_only = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None)
               for n in ("timeout", "request_id")]
    if params and params[-1].kind is inspect.Parameter.VAR_KEYWORD:
        params = params[:-1]
    params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) if p.kind is p.VAR_POSITIONAL
              else p for p in params]
    call.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)] + params + [
            p for p in kw_only if p.name not in {q.name for q in params}])
    call.__name__ = call.__qualname__ = name
    call.__doc__ = rpc.doc or f"The {rpc.method} RPC."
    return call


for _name, _rpc in RPCS.items():
    setattr(_Base, _name, _method(_name, _rpc))


# -- sync -------------------------------------------------------------------------------------
class Client(_Base):
    """Blocking client; one channel, thread-safe, reuse it."""

    def __init__(self, target: str = "localhost:50051", token: str | None = None, *,
                 timeout: float | None = None, max_message_bytes: int = 8 << 20,
                 tls: bool | None = None, tls_ca: str | PathLike | None = None,
                 tls_cert: str | PathLike | None = None,
                 tls_key: str | PathLike | None = None) -> None:
        super().__init__(target, token, timeout, max_message_bytes,
                         dict(tls=tls, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key))
        creds = self._credentials
        self._set_channel(grpc.secure_channel(target, creds, options=self._options) if creds
                          else grpc.insecure_channel(target, options=self._options))

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _invoke(self, name: str, args: tuple, kw: dict[str, Any]) -> Any:
        call = _Prepared(self, name, args, kw)
        if call.rpc.shape == SERVER_STREAM:
            return self._iterate(call)
        try:
            return call.rpc.convert(call.fn(call.request, **call.options))
        except grpc.RpcError as e:
            raise call.error(e) from e

    @staticmethod
    def _iterate(call: _Prepared) -> Iterator[Any]:
        convert = call.rpc.each()
        stream = call.fn(call.request, **call.options)
        try:
            for pb in stream:
                yield convert(pb)
        except grpc.RpcError as e:
            if not call.ended_quietly(e):
                raise call.error(e) from e
        finally:
            stream.cancel()  # no-op when finished; frees the server's slot when abandoned

    def iter_models(self, page_size: int = 0, **kw: Any) -> Iterator[Any]:
        """Every adapter `list_models` lists, page after page (`AdapterVersion` messages)."""
        return _walk(lambda token: self.list_models(page_size, token, **kw))

    def iter_adapters(self, tenant: str = "", page_size: int = 0, **kw: Any) -> Iterator[Any]:
        """Every adapter `list_adapters` lists, page after page."""
        return _walk(lambda token: self.list_adapters(tenant, page_size, token, **kw))

    def wait_ready(self, timeout: float = 60.0, service: str = "") -> None:
        """Block until the server (or one service) answers SERVING (the base is loaded)."""
        last = "no answer"
        for check in _ready_checks(timeout):
            try:
                last = self.health(service, timeout=check)
                if last == "SERVING":
                    return
            except errors.LoraplexError as e:
                last = f"{e.code}: {e.message}"
            time.sleep(READY_POLL_S)
        raise self._not_ready(self.target, timeout, last)


# -- asyncio ----------------------------------------------------------------------------------
class AsyncClient(_Base):
    """asyncio client (`grpc.aio`); create it inside the running event loop."""

    def __init__(self, target: str = "localhost:50051", token: str | None = None, *,
                 timeout: float | None = None, max_message_bytes: int = 8 << 20,
                 tls: bool | None = None, tls_ca: str | PathLike | None = None,
                 tls_cert: str | PathLike | None = None,
                 tls_key: str | PathLike | None = None) -> None:
        super().__init__(target, token, timeout, max_message_bytes,
                         dict(tls=tls, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key))
        creds, opts = self._credentials, self._options
        self._set_channel(grpc.aio.secure_channel(target, creds, options=opts) if creds
                          else grpc.aio.insecure_channel(target, options=opts))

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    def _invoke(self, name: str, args: tuple, kw: dict[str, Any]) -> Any:
        call = _Prepared(self, name, args, kw)
        if call.rpc.shape == SERVER_STREAM:
            return self._iterate(call)
        return self._unary(call)

    @staticmethod
    async def _unary(call: _Prepared) -> Any:
        request = call.request
        if call.rpc.shape == CLIENT_STREAM:
            request = _read_in_thread(request)
        try:
            return call.rpc.convert(await call.fn(request, **call.options))
        except grpc.RpcError as e:
            raise call.error(e) from e

    @staticmethod
    async def _iterate(call: _Prepared) -> AsyncIterator[Any]:
        convert = call.rpc.each()
        stream = call.fn(call.request, **call.options)
        try:
            async for pb in stream:
                yield convert(pb)
        except grpc.RpcError as e:
            if not call.ended_quietly(e):
                raise call.error(e) from e
        finally:
            stream.cancel()

    async def iter_models(self, page_size: int = 0, **kw: Any) -> AsyncIterator[Any]:
        """Every adapter `list_models` lists, page after page (`AdapterVersion` messages)."""
        token = ""
        while True:
            page = await self.list_models(page_size, token, **kw)
            for a in page.adapters:
                yield a
            if not (token := page.next_page_token):
                return

    async def iter_adapters(self, tenant: str = "", page_size: int = 0,
                            **kw: Any) -> AsyncIterator[Any]:
        """Every adapter `list_adapters` lists, page after page."""
        token = ""
        while True:
            page = await self.list_adapters(tenant, page_size, token, **kw)
            for a in page.adapters:
                yield a
            if not (token := page.next_page_token):
                return

    async def wait_ready(self, timeout: float = 60.0, service: str = "") -> None:
        """Wait until the server (or one service) answers SERVING (the base is loaded)."""
        last = "no answer"
        for check in _ready_checks(timeout):
            try:
                last = await self.health(service, timeout=check)
                if last == "SERVING":
                    return
            except errors.LoraplexError as e:
                last = f"{e.code}: {e.message}"
            await asyncio.sleep(READY_POLL_S)
        raise self._not_ready(self.target, timeout, last)


def _walk(page: Any) -> Iterator[Any]:
    """The `adapters` of `page(token)` for each page, following `next_page_token`."""
    token = ""
    while True:
        resp = page(token)
        yield from resp.adapters
        if not (token := resp.next_page_token):
            return


async def _read_in_thread(messages: Iterator[Any]) -> AsyncIterator[Any]:
    """A request stream whose messages are produced (files read) off the event loop, one
    at a time as the call sends them."""
    done = object()
    while (msg := await asyncio.to_thread(next, messages, done)) is not done:
        yield msg
