"""The loraplex API as data: one table of RPCs that both clients (`loraplex.client`) run.

Each entry says which stub and method to call, how the Python arguments become the request
(`build`), how the answer becomes what the caller gets (`convert`, or `each` per streamed
message), and whether the call is safe to repeat (the channel retries those on UNAVAILABLE,
by gRPC's own retry policy in the service config). The sync and async clients only differ
in how they wait; what is sent, with which metadata, and which error comes back, is decided
here once. That is the point: the two clients had drifted (request ids, `wait_ready`, a
streaming upload that the async client read whole into memory).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2
from grpc_status import rpc_status

from loraplex import errors
from loraplex.v1 import admin_pb2, inference_pb2, registry_pb2

CHUNK_BYTES = 1 << 20
REQUEST_ID_KEY = "x-request-id"  # the server binds it for logs and error details
FINISH_REASONS = {inference_pb2.FINISH_REASON_STOP: "stop",
                  inference_pb2.FINISH_REASON_LENGTH: "length",
                  inference_pb2.FINISH_REASON_CANCELLED: "cancelled",
                  inference_pb2.FINISH_REASON_DEADLINE: "deadline",
                  inference_pb2.FINISH_REASON_GRAMMAR: "grammar"}
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
    finish_reason: str  # stop | length | grammar | cancelled | deadline
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
    """Per-stream accumulator: the final chunk carries the whole text and token ids."""

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


# -- request builders -------------------------------------------------------------------------
def generate_request(adapter: str | None, prompt: str | None = None, *,
                     prompt_ids: Sequence[int] | None = None, max_new_tokens: int | None = None,
                     temperature: float = 0.0, top_k: int = 0, top_p: float | None = None,
                     seed: int | None = None, stop: Iterable[str] = (),
                     json_schema: str | dict | None = None, regex: str | None = None,
                     choice: Iterable[str] = (),
                     request_id: str = "", messages: Sequence[dict[str, str]] | None = None
                     ) -> inference_pb2.GenerateRequest:
    """Exactly one of `prompt`, `prompt_ids` and `messages` ([{"role": "user", "content":
    "hi"}], rendered by the server with the base's chat template). Only the sampling fields
    given are set, so the server's defaults apply to the rest. At most one constraint:
    `json_schema` (a dict is sent as its JSON text), `regex` or `choice`."""
    if isinstance(json_schema, dict):
        json_schema = json.dumps(json_schema)
    sampling = inference_pb2.SamplingParams(temperature=temperature, top_k=top_k,
                                            stop=list(stop), json_schema=json_schema or "",
                                            regex=regex or "", choice=list(choice))
    if max_new_tokens is not None:
        sampling.max_new_tokens = max_new_tokens
    if top_p is not None:
        sampling.top_p = top_p
    if seed is not None:
        sampling.seed = seed
    chat = [inference_pb2.ChatMessage(role=m["role"], content=m["content"])
            for m in messages or ()]
    return inference_pb2.GenerateRequest(adapter=adapter or "", prompt=prompt or "",
                                         prompt_ids=list(prompt_ids or ()), sampling=sampling,
                                         request_id=request_id, messages=chat)


def batch_request(items: Sequence[inference_pb2.GenerateRequest | dict]
                  ) -> inference_pb2.BatchGenerateRequest:
    """Each item: a `GenerateRequest` or the kwargs of `generate_request` (incl. `adapter`)."""
    def one(item) -> inference_pb2.GenerateRequest:
        if isinstance(item, inference_pb2.GenerateRequest):
            return item
        kw = dict(item)
        return generate_request(kw.pop("adapter", None), kw.pop("prompt", None), **kw)

    return inference_pb2.BatchGenerateRequest(items=[one(i) for i in items])


def register_messages(name: str, adapter_dir: str | Path, *, lineage: dict | None = None,
                      base_digest: str = "", chunk_bytes: int = CHUNK_BYTES
                      ) -> Iterator[registry_pb2.RegisterAdapterRequest]:
    """The RegisterAdapter stream for a peft adapter directory: header, then weight chunks
    read one at a time as the call sends them (an adapter is never held whole in memory)."""
    adapter_dir = Path(adapter_dir)
    config_path = adapter_dir / "adapter_config.json"
    weights = adapter_dir / "adapter_model.safetensors"
    for path in (config_path, weights):
        if not path.is_file():
            raise errors.InvalidArgument(f"{path} does not exist (expected a peft adapter "
                                         "directory)", field="adapter_dir")
    return _register_stream(name, config_path.read_bytes(), weights, lineage, base_digest,
                            chunk_bytes)


def _register_stream(name: str, config: bytes, weights: Path, lineage: dict | None,
                     base_digest: str, chunk_bytes: int):
    yield registry_pb2.RegisterAdapterRequest(header=registry_pb2.RegisterAdapterHeader(
        name=name, adapter_config=config, size_bytes=weights.stat().st_size,
        base_digest=base_digest, lineage_json=json.dumps(lineage) if lineage else ""))
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


# -- errors -----------------------------------------------------------------------------------
def typed_error(error: grpc.RpcError, request_id: str = "") -> errors.LoraplexError:
    """A grpc failure as the domain error it stands for, with its field and request id (the
    server's, else `request_id`: the one the client sent, so a failure the server never saw,
    such as a refused connection, still names the call)."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    message = (error.details() if hasattr(error, "details") else "") or code.name
    field_name, reason = None, ""
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
            reason = info.reason
            request_id = info.metadata.get("request_id", "") or request_id
    out = make_error(code.name, message, field_name)
    out.reason, out.request_id = reason, request_id
    return out


def make_error(code_name: str, message: str, field_name: str | None) -> errors.LoraplexError:
    """The domain error for a status code name; built without calling the subclass
    __init__ (some take other arguments)."""
    cls = _ERRORS.get(code_name, RpcError)
    out = cls.__new__(cls)
    errors.LoraplexError.__init__(out, message, field=field_name)
    if cls is RpcError:
        out.code = code_name
    out.status_code = getattr(grpc.StatusCode, code_name, grpc.StatusCode.UNKNOWN)
    out.reason, out.request_id = "", ""
    return out


def _batch_outcomes(resp) -> list[Generation | errors.LoraplexError]:
    """Per item: its Generation, or its error as the same typed error a single call raises."""
    out: list[Generation | errors.LoraplexError] = []
    for result in resp.results:
        if result.WhichOneof("outcome") == "response":
            out.append(Generation.from_pb(result.response))
        else:
            e = result.error
            out.append(make_error(e.code_name, e.message, e.field or None))
    return out


# -- the table --------------------------------------------------------------------------------
UNARY, SERVER_STREAM, CLIENT_STREAM = "unary", "server_stream", "client_stream"


def _same(x: Any) -> Any:
    return x


def _each_same() -> Callable[[Any], Any]:
    return _same


def _admin(ref: str) -> admin_pb2.AdminAdapterRequest:
    return admin_pb2.AdminAdapterRequest(ref=ref)


@dataclass(frozen=True)
class Rpc:
    """One RPC as both clients call it."""

    service: str  # stub: "inference" | "registry" | "admin" | "health"
    method: str  # gRPC method name
    build: Callable[..., Any]  # method arguments -> request (CLIENT_STREAM: an iterator)
    convert: Callable[[Any], Any] = _same  # response -> result (UNARY, CLIENT_STREAM)
    shape: str = UNARY
    each: Callable[[], Callable[[Any], Any]] = _each_same  # SERVER_STREAM: per-call converter
    idempotent: bool = False  # safe to repeat: the channel retries it on UNAVAILABLE
    quiet_end: bool = False  # SERVER_STREAM: a deadline the caller set ends it, not an error
    timeout: float | None = None  # default deadline (else the client's)
    doc: str = ""

    @property
    def sends_request_id(self) -> bool:
        """The request carries its own id (the server answers with it)."""
        return self.build is generate_request


_TOKEN_SCOPES = {"inference": admin_pb2.TOKEN_SCOPE_INFERENCE,
                 "publish": admin_pb2.TOKEN_SCOPE_PUBLISH, "admin": admin_pb2.TOKEN_SCOPE_ADMIN}


def _create_token_request(tenant: str, scope: str = "publish", *, admin: bool = False,
                          ttl_s: float = 0.0, label: str = "") -> admin_pb2.CreateTokenRequest:
    if scope not in _TOKEN_SCOPES:
        raise errors.InvalidArgument(f"scope must be one of {', '.join(_TOKEN_SCOPES)}, got "
                                     f"{errors.quote(scope)}", field="scope")
    return admin_pb2.CreateTokenRequest(tenant=tenant, scope=_TOKEN_SCOPES[scope],
                                        admin=admin, ttl_s=ttl_s, label=label)


RPCS: dict[str, Rpc] = {
    "generate": Rpc("inference", "Generate", generate_request, Generation.from_pb,
                    doc="Generate a completion; returns a `Generation`."),
    "stream": Rpc("inference", "GenerateStream", generate_request, shape=SERVER_STREAM,
                  each=lambda: _StreamState().chunk,
                  doc="`StreamChunk`s as they are decoded; close the iterator to cancel."),
    "batch_generate": Rpc("inference", "BatchGenerate", batch_request, _batch_outcomes,
                          doc="Many requests in one call; each result is a `Generation` or "
                              "the typed error that item failed with."),
    "list_models": Rpc("inference", "ListModels",
                       lambda page_size=0, page_token="": inference_pb2.ListModelsRequest(
                           page_size=page_size, page_token=page_token),
                       idempotent=True,
                       doc="One page of the base and the adapters the caller may use on it "
                           "(`page_size`, 0: 100; `page_token`: the previous page's "
                           "`next_page_token`). `iter_models()` walks every page."),
    "register_adapter": Rpc("registry", "RegisterAdapter", register_messages,
                            shape=CLIENT_STREAM,
                            doc="Upload a peft adapter directory, streamed in chunks."),
    "get_adapter": Rpc("registry", "GetAdapter",
                       lambda ref: registry_pb2.GetAdapterRequest(ref=ref), idempotent=True),
    "list_adapters": Rpc("registry", "ListAdapters",
                         lambda tenant="", page_size=0, page_token="":
                         registry_pb2.ListAdaptersRequest(tenant=tenant, page_size=page_size,
                                                          page_token=page_token),
                         idempotent=True,
                         doc="One page of the newest version of each adapter (`tenant`, "
                             "`page_size`, `page_token`). `iter_adapters()` walks every "
                             "page."),
    "list_versions": Rpc("registry", "ListVersions",
                         lambda adapter: registry_pb2.ListVersionsRequest(adapter=adapter),
                         lambda resp: resp.versions, idempotent=True),
    "set_alias": Rpc("registry", "SetAlias", set_alias_request,
                     doc="Move an alias; `expected` makes it compare-and-set."),
    "compress_adapter": Rpc("registry", "CompressAdapter",
                            lambda ref, **fields: registry_pb2.CompressAdapterRequest(
                                ref=ref, **fields),
                            doc="Publish a lower-rank version (`rank=` or `energy=`, `scope=`, "
                                "`name=`); returns the new version."),
    "merge_adapters": Rpc("registry", "MergeAdapters",
                          lambda refs, name, **fields: registry_pb2.MergeAdaptersRequest(
                              refs=refs, name=name, **fields),
                          doc="Publish a merge of several adapters (`method=`, `weights=`, "
                              "`density=`); returns the new version."),
    "delete_version": Rpc("registry", "DeleteVersion",
                          lambda ref, force=False: registry_pb2.DeleteVersionRequest(
                              ref=ref, force=force), lambda _: None),
    "watch": Rpc("registry", "WatchAdapters",
                 lambda after_id=0: registry_pb2.WatchAdaptersRequest(after_id=after_id),
                 shape=SERVER_STREAM, quiet_end=True,
                 doc="Adapter changes as they happen; ends quietly after `timeout`, if given."),
    "prefetch": Rpc("admin", "Prefetch", _admin, idempotent=True),
    "unload": Rpc("admin", "Unload", _admin, idempotent=True),
    "pin": Rpc("admin", "Pin", _admin, idempotent=True),
    "unpin": Rpc("admin", "Unpin", _admin, idempotent=True),
    "resident": Rpc("admin", "Resident",
                    lambda limit=0: admin_pb2.ResidentRequest(limit=limit), idempotent=True,
                    doc="What the adapter tiers hold (slots first, at most `limit`; 0: "
                        "100) and each tier's bytes."),
    "stats": Rpc("admin", "Stats", admin_pb2.StatsRequest, idempotent=True),
    "create_token": Rpc("admin", "CreateToken", _create_token_request,
                        doc="A new API token (`tenant`, `scope=` inference|publish|admin, "
                            "`admin=`, `ttl_s=`, `label=`): a `TokenSecret`, its only "
                            "showing."),
    "list_tokens": Rpc("admin", "ListTokens",
                       lambda tenant="", include_inactive=False: admin_pb2.ListTokensRequest(
                           tenant=tenant, include_inactive=include_inactive),
                       lambda resp: resp.tokens, idempotent=True),
    "revoke_token": Rpc("admin", "RevokeToken",
                        lambda token_id: admin_pb2.TokenIdRequest(id=token_id),
                        idempotent=True),
    "rotate_token": Rpc("admin", "RotateToken",
                        lambda token_id, grace_s=0.0: admin_pb2.RotateTokenRequest(
                            id=token_id, grace_s=grace_s),
                        doc="A new secret for a token's tenant and scope; the old one ends "
                            "after `grace_s`."),
    "purge_tokens": Rpc("admin", "PurgeTokens",
                        lambda tenant="", older_than_s=None: admin_pb2.PurgeTokensRequest(
                            tenant=tenant, older_than_s=older_than_s),
                        lambda resp: list(resp.ids),
                        doc="Delete revoked and expired tokens' rows inactive at least "
                            "`older_than_s` (default: the server's retention); their ids."),
    "token_history": Rpc("admin", "TokenHistory",
                         lambda tenant="": admin_pb2.TokenHistoryRequest(tenant=tenant),
                         lambda resp: resp.events, idempotent=True),
    "health": Rpc("health", "Check",
                  lambda service="": health_pb2.HealthCheckRequest(service=service),
                  lambda r: health_pb2.HealthCheckResponse.ServingStatus.Name(r.status),
                  idempotent=True, timeout=5.0,
                  doc='"SERVING", "NOT_SERVING", … of the whole server ("") or one service.'),
}

_SERVICES = {"inference": "loraplex.v1.InferenceService",
             "registry": "loraplex.v1.RegistryService",
             "admin": "loraplex.v1.AdminService", "health": "grpc.health.v1.Health"}


def service_config() -> str:
    """gRPC service config: the idempotent RPCs are retried on UNAVAILABLE (a restart, a
    draining replica), by the channel's own retry machinery, in both clients alike."""
    names = [{"service": _SERVICES[r.service], "method": r.method}
             for r in RPCS.values() if r.idempotent]
    return json.dumps({"methodConfig": [{"name": names, "retryPolicy": {
        "maxAttempts": 3, "initialBackoff": "0.1s", "maxBackoff": "1s",
        "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}}]})
