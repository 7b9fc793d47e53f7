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
    __slots__ = ("ref", "digest", "size_bytes", "slot", "pinned")
    REF_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    ref: str
    digest: str
    size_bytes: int
    slot: int
    pinned: bool
    def __init__(self, ref: _Optional[str] = ..., digest: _Optional[str] = ..., size_bytes: _Optional[int] = ..., slot: _Optional[int] = ..., pinned: _Optional[bool] = ...) -> None: ...

class ResidentRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ResidentResponse(_message.Message):
    __slots__ = ("device", "host_cache", "device_slots", "host_cache_bytes", "host_cache_budget_bytes")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    HOST_CACHE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_SLOTS_FIELD_NUMBER: _ClassVar[int]
    HOST_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    HOST_CACHE_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    device: _containers.RepeatedCompositeFieldContainer[ResidentAdapter]
    host_cache: _containers.RepeatedCompositeFieldContainer[ResidentAdapter]
    device_slots: int
    host_cache_bytes: int
    host_cache_budget_bytes: int
    def __init__(self, device: _Optional[_Iterable[_Union[ResidentAdapter, _Mapping]]] = ..., host_cache: _Optional[_Iterable[_Union[ResidentAdapter, _Mapping]]] = ..., device_slots: _Optional[int] = ..., host_cache_bytes: _Optional[int] = ..., host_cache_budget_bytes: _Optional[int] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("running", "waiting", "free_slots", "max_running", "resident_adapters", "requests_total", "tokens_generated", "draining", "values")
    class ValuesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    FREE_SLOTS_FIELD_NUMBER: _ClassVar[int]
    MAX_RUNNING_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    TOKENS_GENERATED_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    running: int
    waiting: int
    free_slots: int
    max_running: int
    resident_adapters: int
    requests_total: int
    tokens_generated: int
    draining: bool
    values: _containers.ScalarMap[str, float]
    def __init__(self, running: _Optional[int] = ..., waiting: _Optional[int] = ..., free_slots: _Optional[int] = ..., max_running: _Optional[int] = ..., resident_adapters: _Optional[int] = ..., requests_total: _Optional[int] = ..., tokens_generated: _Optional[int] = ..., draining: _Optional[bool] = ..., values: _Optional[_Mapping[str, float]] = ...) -> None: ...
