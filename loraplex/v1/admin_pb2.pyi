import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TokenScope(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TOKEN_SCOPE_UNSPECIFIED: _ClassVar[TokenScope]
    TOKEN_SCOPE_INFERENCE: _ClassVar[TokenScope]
    TOKEN_SCOPE_PUBLISH: _ClassVar[TokenScope]
    TOKEN_SCOPE_ADMIN: _ClassVar[TokenScope]
TOKEN_SCOPE_UNSPECIFIED: TokenScope
TOKEN_SCOPE_INFERENCE: TokenScope
TOKEN_SCOPE_PUBLISH: TokenScope
TOKEN_SCOPE_ADMIN: TokenScope

class TokenInfo(_message.Message):
    __slots__ = ("id", "tenant", "scope", "admin", "label", "created_at", "created_by", "expires_at", "last_used_at", "revoked_at", "active")
    ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    ADMIN_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    CREATED_BY_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_USED_AT_FIELD_NUMBER: _ClassVar[int]
    REVOKED_AT_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    id: str
    tenant: str
    scope: TokenScope
    admin: bool
    label: str
    created_at: _timestamp_pb2.Timestamp
    created_by: str
    expires_at: _timestamp_pb2.Timestamp
    last_used_at: _timestamp_pb2.Timestamp
    revoked_at: _timestamp_pb2.Timestamp
    active: bool
    def __init__(self, id: _Optional[str] = ..., tenant: _Optional[str] = ..., scope: _Optional[_Union[TokenScope, str]] = ..., admin: _Optional[bool] = ..., label: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., created_by: _Optional[str] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_used_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., revoked_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., active: _Optional[bool] = ...) -> None: ...

class CreateTokenRequest(_message.Message):
    __slots__ = ("tenant", "scope", "admin", "ttl_s", "label")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    ADMIN_FIELD_NUMBER: _ClassVar[int]
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    scope: TokenScope
    admin: bool
    ttl_s: float
    label: str
    def __init__(self, tenant: _Optional[str] = ..., scope: _Optional[_Union[TokenScope, str]] = ..., admin: _Optional[bool] = ..., ttl_s: _Optional[float] = ..., label: _Optional[str] = ...) -> None: ...

class TokenSecret(_message.Message):
    __slots__ = ("token", "info")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    token: str
    info: TokenInfo
    def __init__(self, token: _Optional[str] = ..., info: _Optional[_Union[TokenInfo, _Mapping]] = ...) -> None: ...

class ListTokensRequest(_message.Message):
    __slots__ = ("tenant", "include_inactive")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_INACTIVE_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    include_inactive: bool
    def __init__(self, tenant: _Optional[str] = ..., include_inactive: _Optional[bool] = ...) -> None: ...

class ListTokensResponse(_message.Message):
    __slots__ = ("tokens",)
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedCompositeFieldContainer[TokenInfo]
    def __init__(self, tokens: _Optional[_Iterable[_Union[TokenInfo, _Mapping]]] = ...) -> None: ...

class TokenIdRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class RotateTokenRequest(_message.Message):
    __slots__ = ("id", "grace_s")
    ID_FIELD_NUMBER: _ClassVar[int]
    GRACE_S_FIELD_NUMBER: _ClassVar[int]
    id: str
    grace_s: float
    def __init__(self, id: _Optional[str] = ..., grace_s: _Optional[float] = ...) -> None: ...

class TokenHistoryRequest(_message.Message):
    __slots__ = ("tenant",)
    TENANT_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    def __init__(self, tenant: _Optional[str] = ...) -> None: ...

class TokenEvent(_message.Message):
    __slots__ = ("token_id", "tenant", "action", "detail", "at", "by")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    BY_FIELD_NUMBER: _ClassVar[int]
    token_id: str
    tenant: str
    action: str
    detail: str
    at: _timestamp_pb2.Timestamp
    by: str
    def __init__(self, token_id: _Optional[str] = ..., tenant: _Optional[str] = ..., action: _Optional[str] = ..., detail: _Optional[str] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., by: _Optional[str] = ...) -> None: ...

class TokenHistoryResponse(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[TokenEvent]
    def __init__(self, events: _Optional[_Iterable[_Union[TokenEvent, _Mapping]]] = ...) -> None: ...

class PurgeTokensRequest(_message.Message):
    __slots__ = ("tenant", "older_than_s")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    OLDER_THAN_S_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    older_than_s: float
    def __init__(self, tenant: _Optional[str] = ..., older_than_s: _Optional[float] = ...) -> None: ...

class PurgeTokensResponse(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, ids: _Optional[_Iterable[str]] = ...) -> None: ...

class AdminAdapterRequest(_message.Message):
    __slots__ = ("ref",)
    REF_FIELD_NUMBER: _ClassVar[int]
    ref: str
    def __init__(self, ref: _Optional[str] = ...) -> None: ...

class AdminAdapterResponse(_message.Message):
    __slots__ = ("ref", "digest", "changed")
    REF_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    ref: str
    digest: str
    changed: bool
    def __init__(self, ref: _Optional[str] = ..., digest: _Optional[str] = ..., changed: _Optional[bool] = ...) -> None: ...

class ResidentAdapter(_message.Message):
    __slots__ = ("ref", "digest", "size_bytes", "slot", "on_host", "pinned", "active_sequences")
    REF_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    ON_HOST_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    ref: str
    digest: str
    size_bytes: int
    slot: int
    on_host: bool
    pinned: bool
    active_sequences: int
    def __init__(self, ref: _Optional[str] = ..., digest: _Optional[str] = ..., size_bytes: _Optional[int] = ..., slot: _Optional[int] = ..., on_host: _Optional[bool] = ..., pinned: _Optional[bool] = ..., active_sequences: _Optional[int] = ...) -> None: ...

class ResidentRequest(_message.Message):
    __slots__ = ("limit",)
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    limit: int
    def __init__(self, limit: _Optional[int] = ...) -> None: ...

class ResidentResponse(_message.Message):
    __slots__ = ("adapters", "slots_used", "slots_total", "host_bytes", "truncated", "host_adapters", "device_bytes", "host_loading_bytes", "host_limit_bytes", "loads_queued")
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    SLOTS_USED_FIELD_NUMBER: _ClassVar[int]
    SLOTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    HOST_BYTES_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    HOST_ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_BYTES_FIELD_NUMBER: _ClassVar[int]
    HOST_LOADING_BYTES_FIELD_NUMBER: _ClassVar[int]
    HOST_LIMIT_BYTES_FIELD_NUMBER: _ClassVar[int]
    LOADS_QUEUED_FIELD_NUMBER: _ClassVar[int]
    adapters: _containers.RepeatedCompositeFieldContainer[ResidentAdapter]
    slots_used: int
    slots_total: int
    host_bytes: int
    truncated: bool
    host_adapters: int
    device_bytes: int
    host_loading_bytes: int
    host_limit_bytes: int
    loads_queued: int
    def __init__(self, adapters: _Optional[_Iterable[_Union[ResidentAdapter, _Mapping]]] = ..., slots_used: _Optional[int] = ..., slots_total: _Optional[int] = ..., host_bytes: _Optional[int] = ..., truncated: _Optional[bool] = ..., host_adapters: _Optional[int] = ..., device_bytes: _Optional[int] = ..., host_loading_bytes: _Optional[int] = ..., host_limit_bytes: _Optional[int] = ..., loads_queued: _Optional[int] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("ready", "draining", "running", "waiting", "loading", "slots_used", "slots_total", "host_bytes", "kv_rows_used", "kv_rows_total", "steps", "tokens_generated", "requests_finished", "kv_reserved_bytes", "kv_used_bytes", "kv_limit_bytes", "prefix_hit_tokens", "prefix_lookups", "prefix_hits", "compute_dtype", "compute_reason", "device_bytes", "host_loading_bytes", "host_limit_bytes", "host_peak_bytes", "host_adapters", "loads_queued", "base_gemm", "base_gemm_reason")
    READY_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    LOADING_FIELD_NUMBER: _ClassVar[int]
    SLOTS_USED_FIELD_NUMBER: _ClassVar[int]
    SLOTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    HOST_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_ROWS_USED_FIELD_NUMBER: _ClassVar[int]
    KV_ROWS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_GENERATED_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FINISHED_FIELD_NUMBER: _ClassVar[int]
    KV_RESERVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_LIMIT_BYTES_FIELD_NUMBER: _ClassVar[int]
    PREFIX_HIT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_LOOKUPS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_HITS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_REASON_FIELD_NUMBER: _ClassVar[int]
    DEVICE_BYTES_FIELD_NUMBER: _ClassVar[int]
    HOST_LOADING_BYTES_FIELD_NUMBER: _ClassVar[int]
    HOST_LIMIT_BYTES_FIELD_NUMBER: _ClassVar[int]
    HOST_PEAK_BYTES_FIELD_NUMBER: _ClassVar[int]
    HOST_ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    LOADS_QUEUED_FIELD_NUMBER: _ClassVar[int]
    BASE_GEMM_FIELD_NUMBER: _ClassVar[int]
    BASE_GEMM_REASON_FIELD_NUMBER: _ClassVar[int]
    ready: bool
    draining: bool
    running: int
    waiting: int
    loading: int
    slots_used: int
    slots_total: int
    host_bytes: int
    kv_rows_used: int
    kv_rows_total: int
    steps: int
    tokens_generated: int
    requests_finished: int
    kv_reserved_bytes: int
    kv_used_bytes: int
    kv_limit_bytes: int
    prefix_hit_tokens: int
    prefix_lookups: int
    prefix_hits: int
    compute_dtype: str
    compute_reason: str
    device_bytes: int
    host_loading_bytes: int
    host_limit_bytes: int
    host_peak_bytes: int
    host_adapters: int
    loads_queued: int
    base_gemm: str
    base_gemm_reason: str
    def __init__(self, ready: _Optional[bool] = ..., draining: _Optional[bool] = ..., running: _Optional[int] = ..., waiting: _Optional[int] = ..., loading: _Optional[int] = ..., slots_used: _Optional[int] = ..., slots_total: _Optional[int] = ..., host_bytes: _Optional[int] = ..., kv_rows_used: _Optional[int] = ..., kv_rows_total: _Optional[int] = ..., steps: _Optional[int] = ..., tokens_generated: _Optional[int] = ..., requests_finished: _Optional[int] = ..., kv_reserved_bytes: _Optional[int] = ..., kv_used_bytes: _Optional[int] = ..., kv_limit_bytes: _Optional[int] = ..., prefix_hit_tokens: _Optional[int] = ..., prefix_lookups: _Optional[int] = ..., prefix_hits: _Optional[int] = ..., compute_dtype: _Optional[str] = ..., compute_reason: _Optional[str] = ..., device_bytes: _Optional[int] = ..., host_loading_bytes: _Optional[int] = ..., host_limit_bytes: _Optional[int] = ..., host_peak_bytes: _Optional[int] = ..., host_adapters: _Optional[int] = ..., loads_queued: _Optional[int] = ..., base_gemm: _Optional[str] = ..., base_gemm_reason: _Optional[str] = ...) -> None: ...
