"""Python client of the loraplex gRPC API, sync (`Client`) and asyncio (`AsyncClient`).

    from loraplex.client import Client
    with Client("localhost:50051", token="lpx_...") as c:
        print(c.generate("acme/support@prod", "Where is my order?").text)
        for chunk in c.stream("acme/support@prod", "Hello"):
            print(chunk.text, end="")

Generation calls return plain dataclasses (`Generation`, `StreamChunk`); registry and admin
calls return the protobuf messages of `loraplex.v1`. Failures raise the typed errors of
`loraplex.errors` (`NotFound`, `InvalidArgument` with `.field`, …), each carrying the
original `grpc.StatusCode` as `.status_code`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from loraplex import errors
from loraplex.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
)

CHUNK_BYTES = 1 << 20
FINISH_REASONS = {inference_pb2.FINISH_REASON_STOP: "stop",
                  inference_pb2.FINISH_REASON_LENGTH: "length",
                  inference_pb2.FINISH_REASON_CANCELLED: "cancelled",
                  inference_pb2.FINISH_REASON_DEADLINE: "deadline"}
_ERRORS: dict[str, type[errors.LoraplexError]] = {
    cls.code: cls for cls in (
        errors.InvalidArgument, errors.NotFound, errors.AlreadyExists,
        errors.FailedPrecondition, errors.Unauthenticated, errors.PermissionDenied,
        errors.ResourceExhausted, errors.DeadlineExceeded, errors.Cancelled,
        errors.Unavailable, errors.DataCorruption)}


class RpcError(errors.LoraplexError):
    """A status with no domain error class (INTERNAL, UNKNOWN, …): a server bug or outage."""


# -- results ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Generation:
    """One finished generation (from Generate, BatchGenerate or a stream's last message)."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str  # stop | length | cancelled | deadline
    prompt_tokens: int
    completion_tokens: int
    timings: dict[str, float]
    adapter_ref: str = ""  # resolved "tenant/name:v3"; empty for the base alone
    adapter_digest: str = ""

    @classmethod
    def from_pb(cls, pb, text: str | None = None,
                token_ids: list[int] | None = None) -> Generation:
        t = pb.timings
        return cls(request_id=pb.request_id, text=pb.text if text is None else text,
                   token_ids=list(pb.token_ids) if token_ids is None else token_ids,
                   finish_reason=FINISH_REASONS.get(pb.finish_reason, "unspecified"),
                   prompt_tokens=pb.usage.prompt_tokens,
                   completion_tokens=pb.usage.completion_tokens,
                   timings={"queue_s": t.queue_s, "adapter_load_s": t.adapter_load_s,
                            "prefill_s": t.prefill_s, "first_token_s": t.first_token_s,
                            "total_s": t.total_s},
                   adapter_ref=pb.adapter.ref, adapter_digest=pb.adapter.digest)


@dataclass(frozen=True)
class StreamChunk:
    """One streamed piece; the last one has `final` set (with the whole text)."""

    text: str
    token_ids: list[int]
    final: Generation | None = None


@dataclass
class _StreamState:
    texts: list[str] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)

    def chunk(self, pb) -> StreamChunk:
        if pb.finish_reason == inference_pb2.FINISH_REASON_UNSPECIFIED:
            self.texts.append(pb.text)
            self.ids.extend(pb.token_ids)
            return StreamChunk(pb.text, list(pb.token_ids))
        final = Generation.from_pb(pb, text="".join(self.texts) + pb.text,
                                   token_ids=self.ids + list(pb.token_ids))
        return StreamChunk(pb.text, list(pb.token_ids), final=final)


# -- request building (shared by both clients) ------------------------------------------------
def generate_request(adapter: str | None, prompt: str | None = None, *,
                     prompt_ids: Sequence[int] | None = None, max_new_tokens: int | None = None,
                     temperature: float = 0.0, top_k: int = 0, top_p: float | None = None,
                     seed: int | None = None, stop: Iterable[str] = (),
                     request_id: str = "") -> inference_pb2.GenerateRequest:
    sampling = inference_pb2.SamplingParams(temperature=temperature, top_k=top_k,
                                            stop=list(stop))
    if max_new_tokens is not None:
        sampling.max_new_tokens = max_new_tokens
    if top_p is not None:
        sampling.top_p = top_p
    if seed is not None:
        sampling.seed = seed
    return inference_pb2.GenerateRequest(adapter=adapter or "", prompt=prompt or "",
                                         prompt_ids=list(prompt_ids or ()), sampling=sampling,
                                         request_id=request_id)


def register_messages(name: str, adapter_dir: str | Path, *, lineage: dict | None = None,
                      base_digest: str = "",
                      chunk_bytes: int = CHUNK_BYTES) -> Iterator[registry_pb2.RegisterAdapterRequest]:
    """The RegisterAdapter stream for a peft adapter directory: header, then weight chunks."""
    adapter_dir = Path(adapter_dir)
    config = (adapter_dir / "adapter_config.json").read_bytes()
    weights = adapter_dir / "adapter_model.safetensors"
    size = weights.stat().st_size
    yield registry_pb2.RegisterAdapterRequest(header=registry_pb2.RegisterAdapterHeader(
        name=name, adapter_config=config, size_bytes=size, base_digest=base_digest,
        lineage_json=json.dumps(lineage) if lineage else ""))
    with weights.open("rb") as f:
        while block := f.read(chunk_bytes):
            yield registry_pb2.RegisterAdapterRequest(chunk=block)


def set_alias_request(ref: str, alias: str, expected: Any = ...) -> registry_pb2.SetAliasRequest:
    """`expected`: a version number (compare-and-set), None (must not exist), omitted (any)."""
    req = registry_pb2.SetAliasRequest(ref=ref, alias=alias)
    if expected is None:
        req.expect_absent = True
    elif expected is not ...:
        req.expected_version = int(expected)
    return req


def typed_error(error: grpc.RpcError) -> errors.LoraplexError:
    """A grpc failure as the domain error it stands for, with field and request id."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    message = (error.details() if hasattr(error, "details") else "") or code.name
    field_name, reason, request_id = None, "", ""
    status = None
    try:
        status = rpc_status.from_call(error)
    except Exception:  # noqa: BLE001 - details are a bonus; never mask the real error
        status = None
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            if bad.field_violations:
                field_name = bad.field_violations[0].field
        elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, request_id = info.reason, info.metadata.get("request_id", "")
    out = _make_error(_ERRORS.get(code.name, RpcError), message, field_name, code.name)
    out.reason, out.request_id = reason, request_id
    return out


def _channel_args(max_message_bytes: int) -> list[tuple[str, int]]:
    return [("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes)]


def _item_outcome(result) -> Generation | errors.LoraplexError:
    if result.WhichOneof("outcome") == "response":
        return Generation.from_pb(result.response)
    e = result.error
    return _make_error(_ERRORS.get(e.code_name, RpcError), e.message, e.field or None,
                       e.code_name)


def _make_error(cls, message: str, field_name: str | None, code_name: str):
    """Build without calling the subclass __init__ (some take other arguments)."""
    out = cls.__new__(cls)
    errors.LoraplexError.__init__(out, message, field=field_name)
    if cls is RpcError:
        out.code = code_name
    out.status_code = getattr(grpc.StatusCode, code_name, grpc.StatusCode.UNKNOWN)
    out.reason, out.request_id = "", ""
    return out


class _Base:
    def __init__(self, target: str, token: str | None, timeout: float | None,
                 max_message_bytes: int) -> None:
        self.target = target
        self.token = token
        self.timeout = timeout
        self._options = _channel_args(max_message_bytes)

    def _metadata(self, request_id: str = "") -> list[tuple[str, str]]:
        md = [("authorization", f"Bearer {self.token}")] if self.token else []
        if request_id:
            md.append(("x-request-id", request_id))
        return md

    def _kw(self, timeout: float | None, request_id: str = "") -> dict[str, Any]:
        return {"metadata": self._metadata(request_id),
                "timeout": self.timeout if timeout is None else timeout}

    def _stubs(self, channel) -> None:
        self.inference = inference_pb2_grpc.InferenceServiceStub(channel)
        self.registry = registry_pb2_grpc.RegistryServiceStub(channel)
        self.admin = admin_pb2_grpc.AdminServiceStub(channel)
        self.health_stub = health_pb2_grpc.HealthStub(channel)


# -- sync -------------------------------------------------------------------------------------
class Client(_Base):
    """Blocking client; one channel, thread-safe, reuse it."""

    def __init__(self, target: str = "localhost:50051", token: str | None = None, *,
                 timeout: float | None = None, max_message_bytes: int = 8 << 20) -> None:
        super().__init__(target, token, timeout, max_message_bytes)
        self.channel = grpc.insecure_channel(target, options=self._options)
        self._stubs(self.channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _call(self, method, request, timeout=None, request_id: str = ""):
        try:
            return method(request, **self._kw(timeout, request_id))
        except grpc.RpcError as e:
            raise typed_error(e) from e

    def generate(self, adapter: str | None, prompt: str | None = None, *,
                 timeout: float | None = None, **kw: Any) -> Generation:
        req = generate_request(adapter, prompt, **kw)
        return Generation.from_pb(self._call(self.inference.Generate, req, timeout))

    def stream(self, adapter: str | None, prompt: str | None = None, *,
               timeout: float | None = None, **kw: Any) -> Iterator[StreamChunk]:
        """Chunks as they are decoded; `close()` the iterator (or break) to cancel."""
        call = self.inference.GenerateStream(generate_request(adapter, prompt, **kw),
                                             **self._kw(timeout))
        state = _StreamState()
        try:
            for pb in call:
                yield state.chunk(pb)
        except grpc.RpcError as e:
            raise typed_error(e) from e
        finally:
            call.cancel()  # no-op when finished; frees the server's slot when abandoned

    def batch_generate(self, items: Sequence[inference_pb2.GenerateRequest | dict], *,
                       timeout: float | None = None) -> list[Generation | errors.LoraplexError]:
        """Each item: a `GenerateRequest` or kwargs of `generate_request` (incl. `adapter`)."""
        req = inference_pb2.BatchGenerateRequest(items=[_item(i) for i in items])
        resp = self._call(self.inference.BatchGenerate, req, timeout)
        return [_item_outcome(r) for r in resp.results]

    def list_models(self) -> inference_pb2.ListModelsResponse:
        return self._call(self.inference.ListModels, inference_pb2.ListModelsRequest())

    def register_adapter(self, name: str, adapter_dir: str | Path, *,
                         lineage: dict | None = None, base_digest: str = "",
                         chunk_bytes: int = CHUNK_BYTES,
                         timeout: float | None = None) -> registry_pb2.RegisterAdapterResponse:
        msgs = register_messages(name, adapter_dir, lineage=lineage, base_digest=base_digest,
                                 chunk_bytes=chunk_bytes)
        return self._call(self.registry.RegisterAdapter, msgs, timeout)

    def get_adapter(self, ref: str):
        return self._call(self.registry.GetAdapter, registry_pb2.GetAdapterRequest(ref=ref))

    def list_adapters(self, tenant: str = "", page_size: int = 0, page_token: str = ""):
        return self._call(self.registry.ListAdapters, registry_pb2.ListAdaptersRequest(
            tenant=tenant, page_size=page_size, page_token=page_token))

    def list_versions(self, adapter: str):
        return self._call(self.registry.ListVersions,
                          registry_pb2.ListVersionsRequest(adapter=adapter)).versions

    def set_alias(self, ref: str, alias: str, expected: Any = ...):
        return self._call(self.registry.SetAlias, set_alias_request(ref, alias, expected))

    def compress_adapter(self, ref: str, **fields):  # rank= | energy=, scope=, name=
        return self._call(self.registry.CompressAdapter,
                          registry_pb2.CompressAdapterRequest(ref=ref, **fields))

    def merge_adapters(self, refs: Sequence[str], name: str, **fields):  # method=, weights=…
        return self._call(self.registry.MergeAdapters,
                          registry_pb2.MergeAdaptersRequest(refs=refs, name=name, **fields))

    def delete_version(self, ref: str, force: bool = False) -> None:
        self._call(self.registry.DeleteVersion,
                   registry_pb2.DeleteVersionRequest(ref=ref, force=force))

    def watch(self, after_id: int = 0, timeout: float | None = None):
        """Adapter changes as they happen; ends quietly after `timeout` seconds, if given."""
        call = self.registry.WatchAdapters(registry_pb2.WatchAdaptersRequest(after_id=after_id),
                                           **self._kw(timeout))
        try:
            yield from call
        except grpc.RpcError as e:
            ended = {grpc.StatusCode.CANCELLED} | (
                {grpc.StatusCode.DEADLINE_EXCEEDED} if timeout is not None else set())
            if e.code() not in ended:
                raise typed_error(e) from e
        finally:
            call.cancel()

    def prefetch(self, ref: str):
        return self._call(self.admin.Prefetch, admin_pb2.AdminAdapterRequest(ref=ref))

    def unload(self, ref: str):
        return self._call(self.admin.Unload, admin_pb2.AdminAdapterRequest(ref=ref))

    def pin(self, ref: str):
        return self._call(self.admin.Pin, admin_pb2.AdminAdapterRequest(ref=ref))

    def unpin(self, ref: str):
        return self._call(self.admin.Unpin, admin_pb2.AdminAdapterRequest(ref=ref))

    def resident(self) -> admin_pb2.ResidentResponse:
        return self._call(self.admin.Resident, admin_pb2.ResidentRequest())

    def stats(self) -> admin_pb2.StatsResponse:
        return self._call(self.admin.Stats, admin_pb2.StatsRequest())

    def health(self, service: str = "", timeout: float = 5.0) -> str:
        """"SERVING", "NOT_SERVING", … of the whole server ("") or one service."""
        resp = self._call(self.health_stub.Check,
                          health_pb2.HealthCheckRequest(service=service), timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Block until the server answers SERVING (the base is loaded)."""
        import time

        end = time.monotonic() + timeout
        while True:
            try:
                if self.health(timeout=min(5.0, max(0.1, end - time.monotonic()))) == "SERVING":
                    return
            except errors.LoraplexError:
                pass
            if time.monotonic() > end:
                raise errors.Unavailable(f"{self.target} not SERVING after {timeout:.0f}s")
            time.sleep(0.1)


def _item(item) -> inference_pb2.GenerateRequest:
    if isinstance(item, inference_pb2.GenerateRequest):
        return item
    kw = dict(item)
    return generate_request(kw.pop("adapter", None), kw.pop("prompt", None), **kw)


# -- asyncio ----------------------------------------------------------------------------------
class AsyncClient(_Base):
    """asyncio client (`grpc.aio`); create it inside the running event loop."""

    def __init__(self, target: str = "localhost:50051", token: str | None = None, *,
                 timeout: float | None = None, max_message_bytes: int = 8 << 20) -> None:
        super().__init__(target, token, timeout, max_message_bytes)
        self.channel = grpc.aio.insecure_channel(target, options=self._options)
        self._stubs(self.channel)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def _call(self, method, request, timeout=None):
        try:
            return await method(request, **self._kw(timeout))
        except grpc.RpcError as e:
            raise typed_error(e) from e

    async def generate(self, adapter: str | None, prompt: str | None = None, *,
                       timeout: float | None = None, **kw: Any) -> Generation:
        req = generate_request(adapter, prompt, **kw)
        return Generation.from_pb(await self._call(self.inference.Generate, req, timeout))

    async def stream(self, adapter: str | None, prompt: str | None = None, *,
                     timeout: float | None = None, **kw: Any) -> AsyncIterator[StreamChunk]:
        call = self.inference.GenerateStream(generate_request(adapter, prompt, **kw),
                                             **self._kw(timeout))
        state = _StreamState()
        try:
            async for pb in call:
                yield state.chunk(pb)
        except grpc.RpcError as e:
            raise typed_error(e) from e
        finally:
            call.cancel()

    async def batch_generate(self, items, *, timeout: float | None = None):
        req = inference_pb2.BatchGenerateRequest(items=[_item(i) for i in items])
        resp = await self._call(self.inference.BatchGenerate, req, timeout)
        return [_item_outcome(r) for r in resp.results]

    async def list_models(self) -> inference_pb2.ListModelsResponse:
        return await self._call(self.inference.ListModels, inference_pb2.ListModelsRequest())

    async def register_adapter(self, name: str, adapter_dir: str | Path, *,
                               lineage: dict | None = None, base_digest: str = "",
                               chunk_bytes: int = CHUNK_BYTES, timeout: float | None = None):
        msgs = list(register_messages(name, adapter_dir, lineage=lineage,
                                      base_digest=base_digest, chunk_bytes=chunk_bytes))
        return await self._call(self.registry.RegisterAdapter, iter(msgs), timeout)

    async def get_adapter(self, ref: str):
        return await self._call(self.registry.GetAdapter, registry_pb2.GetAdapterRequest(ref=ref))

    async def list_adapters(self, tenant: str = "", page_size: int = 0, page_token: str = ""):
        return await self._call(self.registry.ListAdapters, registry_pb2.ListAdaptersRequest(
            tenant=tenant, page_size=page_size, page_token=page_token))

    async def list_versions(self, adapter: str):
        resp = await self._call(self.registry.ListVersions,
                                registry_pb2.ListVersionsRequest(adapter=adapter))
        return resp.versions

    async def set_alias(self, ref: str, alias: str, expected: Any = ...):
        return await self._call(self.registry.SetAlias, set_alias_request(ref, alias, expected))

    async def compress_adapter(self, ref: str, **fields):
        return await self._call(self.registry.CompressAdapter,
                                registry_pb2.CompressAdapterRequest(ref=ref, **fields))

    async def merge_adapters(self, refs: Sequence[str], name: str, **fields):
        return await self._call(self.registry.MergeAdapters,
                                registry_pb2.MergeAdaptersRequest(refs=refs, name=name, **fields))

    async def delete_version(self, ref: str, force: bool = False) -> None:
        await self._call(self.registry.DeleteVersion,
                         registry_pb2.DeleteVersionRequest(ref=ref, force=force))

    async def watch(self, after_id: int = 0, timeout: float | None = None):
        """Adapter changes as they happen; ends quietly after `timeout` seconds, if given."""
        call = self.registry.WatchAdapters(registry_pb2.WatchAdaptersRequest(after_id=after_id),
                                           **self._kw(timeout))
        try:
            async for change in call:
                yield change
        except grpc.RpcError as e:
            ended = {grpc.StatusCode.CANCELLED} | (
                {grpc.StatusCode.DEADLINE_EXCEEDED} if timeout is not None else set())
            if e.code() not in ended:
                raise typed_error(e) from e
        finally:
            call.cancel()

    async def prefetch(self, ref: str):
        return await self._call(self.admin.Prefetch, admin_pb2.AdminAdapterRequest(ref=ref))

    async def unload(self, ref: str):
        return await self._call(self.admin.Unload, admin_pb2.AdminAdapterRequest(ref=ref))

    async def pin(self, ref: str):
        return await self._call(self.admin.Pin, admin_pb2.AdminAdapterRequest(ref=ref))

    async def unpin(self, ref: str):
        return await self._call(self.admin.Unpin, admin_pb2.AdminAdapterRequest(ref=ref))

    async def resident(self) -> admin_pb2.ResidentResponse:
        return await self._call(self.admin.Resident, admin_pb2.ResidentRequest())

    async def stats(self) -> admin_pb2.StatsResponse:
        return await self._call(self.admin.Stats, admin_pb2.StatsRequest())

    async def health(self, service: str = "", timeout: float = 5.0) -> str:
        resp = await self._call(self.health_stub.Check,
                                health_pb2.HealthCheckRequest(service=service), timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
