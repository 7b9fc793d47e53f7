"""Protobuf ↔ domain dataclasses, at the servicer boundary and nowhere else.

Reading a message never raises on a missing optional field (proto3 defaults mean "unset");
values are checked by the engine and the registry, which name the field they reject.
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from typing import Any

from google.protobuf import timestamp_pb2

from loraplex.errors import InvalidArgument
from loraplex.runtime.api.types import GenerationResult, SamplingParams
from loraplex.v1 import admin_pb2, common_pb2, inference_pb2, registry_pb2

FINISH_REASONS = {
    "stop": inference_pb2.FINISH_REASON_STOP,
    "length": inference_pb2.FINISH_REASON_LENGTH,
    "cancelled": inference_pb2.FINISH_REASON_CANCELLED,
    "deadline": inference_pb2.FINISH_REASON_DEADLINE,
    "grammar": inference_pb2.FINISH_REASON_GRAMMAR,
}
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000  # the registry's own cap on one keyset page

CHANGE_KINDS = {
    "version_created": registry_pb2.CHANGE_KIND_VERSION_CREATED,
    "alias_moved": registry_pb2.CHANGE_KIND_ALIAS_MOVED,
    "version_deleted": registry_pb2.CHANGE_KIND_VERSION_DELETED,
}


def page_size(requested: int) -> int:
    """A request's `page_size`: 0 means the default; above the cap is refused."""
    size = requested or DEFAULT_PAGE_SIZE
    if size > MAX_PAGE_SIZE:
        raise InvalidArgument(f"page_size must be <= {MAX_PAGE_SIZE}", field="page_size")
    return size


# -- inference ------------------------------------------------------------------------------
def sampling_from_pb(pb: inference_pb2.SamplingParams) -> SamplingParams:
    defaults = SamplingParams()
    return SamplingParams(
        max_new_tokens=pb.max_new_tokens if pb.HasField("max_new_tokens")
        else defaults.max_new_tokens,
        temperature=pb.temperature,
        top_k=pb.top_k,
        top_p=pb.top_p if pb.HasField("top_p") else defaults.top_p,
        seed=pb.seed if pb.HasField("seed") else None,
        stop=tuple(pb.stop),
        json_schema=pb.json_schema or None,
        regex=pb.regex or None,
        choice=tuple(pb.choice),
    )


def admit_args_from_pb(pb: inference_pb2.GenerateRequest, *,
                       field_prefix: str = "") -> dict[str, Any]:
    """One `GenerateRequest` → keyword arguments of `Intake.admit` (adapter ref, prompt,
    prompt ids or chat messages, sampling); exactly one of prompt/prompt_ids/messages."""
    # Each field is read once: reading a string field decodes it anew (a 4 MiB prompt
    # costs milliseconds on the event loop per read).
    prompt, ids = pb.prompt, list(pb.prompt_ids)
    messages = [{"role": m.role, "content": m.content} for m in pb.messages]
    given = [n for n, v in (("prompt", prompt), ("prompt_ids", ids), ("messages", messages))
             if v]
    if len(given) > 1:
        raise InvalidArgument(f"give exactly one of `prompt`, `prompt_ids` and `messages`, not "
                              f"{' and '.join(given)}", field=f"{field_prefix}{given[-1]}")
    if not given:
        raise InvalidArgument("`prompt` (text), `prompt_ids` or `messages` is required",
                              field=f"{field_prefix}prompt")
    return dict(adapter=pb.adapter or None, prompt=prompt or None, prompt_ids=ids or None,
                messages=messages or None, sampling=sampling_from_pb(pb.sampling))


def deadline_from_remaining(remaining: float | None, margin_s: float = 0.0) -> float | None:
    """grpc's `context.time_remaining()` → the engine's `time.monotonic()` deadline, less
    `margin_s` (at most 10% of the time left) to answer before the caller's deadline."""
    if remaining is None:
        return None
    remaining = max(0.0, remaining)
    return time.monotonic() + remaining - min(margin_s, 0.1 * remaining)


def resolved_pb(version: Any) -> common_pb2.ResolvedAdapter | None:
    if version is None:
        return None
    return common_pb2.ResolvedAdapter(ref=version.ref, digest=version.digest,
                                      tenant=version.tenant, name=version.name,
                                      version=version.version)


def usage_pb(result: GenerationResult) -> inference_pb2.Usage:
    return inference_pb2.Usage(prompt_tokens=result.usage.prompt_tokens,
                               completion_tokens=result.usage.completion_tokens)


def timings_pb(result: GenerationResult) -> inference_pb2.Timings:
    t = result.timings
    return inference_pb2.Timings(queue_s=t.queue_s, adapter_load_s=t.adapter_load_s,
                                 prefill_s=t.prefill_s, first_token_s=t.first_token_s,
                                 total_s=t.total_s)


def response_pb(result: GenerationResult, client_id: str) -> inference_pb2.GenerateResponse:
    return inference_pb2.GenerateResponse(
        request_id=client_id, text=result.text, token_ids=result.token_ids,
        finish_reason=FINISH_REASONS.get(result.finish_reason, 0), usage=usage_pb(result),
        timings=timings_pb(result), adapter=resolved_pb(result.adapter))


def chunk_pb(chunk: Any, client_id: str) -> inference_pb2.GenerateStreamResponse:
    return inference_pb2.GenerateStreamResponse(request_id=client_id, text=chunk.text,
                                                token_ids=chunk.token_ids)


def final_chunk_pb(result: GenerationResult,
                   client_id: str) -> inference_pb2.GenerateStreamResponse:
    return inference_pb2.GenerateStreamResponse(
        request_id=client_id, finish_reason=FINISH_REASONS.get(result.finish_reason, 0),
        usage=usage_pb(result), timings=timings_pb(result), adapter=resolved_pb(result.adapter))


def base_model_pb(fingerprint: Any, quantization: str) -> common_pb2.BaseModel:
    if fingerprint is None:
        return common_pb2.BaseModel(quantization=quantization)
    return common_pb2.BaseModel(
        architecture=fingerprint.architecture, model_type=fingerprint.model_type,
        num_layers=fingerprint.num_layers, hidden_size=fingerprint.hidden_size,
        vocab_size=fingerprint.vocab_size, digest=fingerprint.digest, quantization=quantization)


# -- registry -------------------------------------------------------------------------------
def timestamp_pb(at: datetime | None) -> timestamp_pb2.Timestamp | None:
    if at is None:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(at)
    return ts


TOKEN_SCOPES = {admin_pb2.TOKEN_SCOPE_UNSPECIFIED: None,
                admin_pb2.TOKEN_SCOPE_INFERENCE: "inference",
                admin_pb2.TOKEN_SCOPE_PUBLISH: "publish", admin_pb2.TOKEN_SCOPE_ADMIN: "admin"}
_SCOPE_PB = {v: k for k, v in TOKEN_SCOPES.items() if v}


def token_info_pb(t: Any) -> admin_pb2.TokenInfo:
    """A `registry.tokens.TokenInfo` (never a secret: it has none)."""
    return admin_pb2.TokenInfo(
        id=t.id, tenant=t.tenant, scope=_SCOPE_PB[t.scope], admin=t.role == "admin",
        label=t.label, created_at=timestamp_pb(t.created_at), created_by=t.created_by,
        expires_at=timestamp_pb(t.expires_at), last_used_at=timestamp_pb(t.last_used_at),
        revoked_at=timestamp_pb(t.revoked_at), active=t.active())


def token_event_pb(e: Any) -> admin_pb2.TokenEvent:
    return admin_pb2.TokenEvent(token_id=e.token_id, tenant=e.tenant, action=e.action,
                                detail=e.detail, at=timestamp_pb(e.at), by=e.by)


def adapter_pb(v: Any) -> common_pb2.AdapterVersion:
    return common_pb2.AdapterVersion(
        tenant=v.tenant, name=v.name, version=v.version, digest=v.digest,
        size_bytes=v.size_bytes, rank=v.rank, alpha=v.alpha, use_rslora=v.use_rslora,
        target_modules=list(v.target_modules), dtype=v.dtype,
        base_digest=getattr(v.base, "digest", ""),
        lineage_json=json.dumps(v.lineage or {}, sort_keys=True, default=str),
        created_at=timestamp_pb(v.created_at), created_by=v.created_by, ref=v.ref)


def change_pb(c: Any) -> registry_pb2.AdapterChange:
    return registry_pb2.AdapterChange(
        id=c.id, kind=CHANGE_KINDS.get(c.kind, 0), tenant=c.tenant, name=c.name,
        version=c.version or 0, alias=c.alias or "", digest=c.digest or "",
        at=timestamp_pb(c.at))


def alias_move_pb(m: Any) -> registry_pb2.SetAliasResponse:
    return registry_pb2.SetAliasResponse(tenant=m.tenant, name=m.name, alias=m.alias,
                                         previous_version=m.from_version or 0,
                                         version=m.to_version or 0)


def lineage_from_json(text: str) -> dict[str, Any] | None:
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidArgument(f"lineage_json is not JSON: {e}",
                              field="header.lineage_json") from None
    if not isinstance(value, dict):
        raise InvalidArgument("lineage_json must be a JSON object", field="header.lineage_json")
    return value


# -- admin ----------------------------------------------------------------------------------
def resident_pb(adapters: list[Any], stats: Any, *,
                truncated: bool = False) -> admin_pb2.ResidentResponse:
    return admin_pb2.ResidentResponse(
        adapters=[admin_pb2.ResidentAdapter(
            ref=a.ref, digest=a.digest, size_bytes=a.size_bytes, slot=a.slot or 0,
            on_host=a.on_host, pinned=a.pinned, active_sequences=a.active_sequences)
            for a in adapters],
        slots_used=stats.slots_used, slots_total=stats.slots_total, host_bytes=stats.host_bytes,
        truncated=truncated, **_tier_fields(stats, ("host_adapters", "device_bytes",
                                                    "host_loading_bytes", "host_limit_bytes",
                                                    "loads_queued")))


def _tier_fields(stats: Any, names: tuple[str, ...]) -> dict[str, int]:
    """The adapter-tier counters of `EngineStats` (0 from an engine that has none)."""
    return {n: getattr(stats, n, 0) for n in names}


def stats_pb(s: Any) -> admin_pb2.StatsResponse:
    return admin_pb2.StatsResponse(
        ready=s.ready, draining=s.draining, running=s.running, waiting=s.waiting,
        loading=s.loading, slots_used=s.slots_used, slots_total=s.slots_total,
        host_bytes=s.host_bytes, kv_rows_used=s.kv_rows_used, kv_rows_total=s.kv_rows_total,
        steps=s.steps, tokens_generated=s.tokens_generated,
        requests_finished=s.requests_finished,
        kv_reserved_bytes=getattr(s, "kv_reserved_bytes", 0),
        kv_used_bytes=getattr(s, "kv_used_bytes", 0),
        kv_limit_bytes=getattr(s, "kv_limit_bytes", 0),
        prefix_hit_tokens=getattr(s, "prefix_hit_tokens", 0),
        prefix_lookups=getattr(s, "prefix_lookups", 0),
        prefix_hits=getattr(s, "prefix_hits", 0),
        compute_dtype=getattr(s, "compute_dtype", ""),
        compute_reason=getattr(s, "compute_reason", ""),
        base_gemm=getattr(s, "base_gemm", ""),
        base_gemm_reason=getattr(s, "base_gemm_reason", ""),
        **_tier_fields(s, ("device_bytes", "host_loading_bytes", "host_limit_bytes",
                           "host_peak_bytes", "host_adapters", "loads_queued")))


def admin_ack_pb(changed: bool, version: Any) -> admin_pb2.AdminAdapterResponse:
    return admin_pb2.AdminAdapterResponse(ref=version.ref, digest=version.digest,
                                          changed=bool(changed))
