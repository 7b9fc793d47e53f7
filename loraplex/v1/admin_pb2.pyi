from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

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
    __slots__ = ()
    def __init__(self) -> None: ...

class ResidentResponse(_message.Message):
    __slots__ = ("adapters", "slots_used", "slots_total", "host_bytes")
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    SLOTS_USED_FIELD_NUMBER: _ClassVar[int]
    SLOTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    HOST_BYTES_FIELD_NUMBER: _ClassVar[int]
    adapters: _containers.RepeatedCompositeFieldContainer[ResidentAdapter]
    slots_used: int
    slots_total: int
    host_bytes: int
    def __init__(self, adapters: _Optional[_Iterable[_Union[ResidentAdapter, _Mapping]]] = ..., slots_used: _Optional[int] = ..., slots_total: _Optional[int] = ..., host_bytes: _Optional[int] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("ready", "draining", "running", "waiting", "loading", "slots_used", "slots_total", "host_bytes", "kv_rows_used", "kv_rows_total", "steps", "tokens_generated", "requests_finished", "kv_reserved_bytes", "kv_used_bytes", "kv_limit_bytes", "prefix_hit_tokens", "prefix_lookups", "prefix_hits", "compute_dtype", "compute_reason")
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
    def __init__(self, ready: _Optional[bool] = ..., draining: _Optional[bool] = ..., running: _Optional[int] = ..., waiting: _Optional[int] = ..., loading: _Optional[int] = ..., slots_used: _Optional[int] = ..., slots_total: _Optional[int] = ..., host_bytes: _Optional[int] = ..., kv_rows_used: _Optional[int] = ..., kv_rows_total: _Optional[int] = ..., steps: _Optional[int] = ..., tokens_generated: _Optional[int] = ..., requests_finished: _Optional[int] = ..., kv_reserved_bytes: _Optional[int] = ..., kv_used_bytes: _Optional[int] = ..., kv_limit_bytes: _Optional[int] = ..., prefix_hit_tokens: _Optional[int] = ..., prefix_lookups: _Optional[int] = ..., prefix_hits: _Optional[int] = ..., compute_dtype: _Optional[str] = ..., compute_reason: _Optional[str] = ...) -> None: ...
