import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from loraplex.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ChangeKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CHANGE_KIND_UNSPECIFIED: _ClassVar[ChangeKind]
    CHANGE_KIND_VERSION_CREATED: _ClassVar[ChangeKind]
    CHANGE_KIND_ALIAS_MOVED: _ClassVar[ChangeKind]
    CHANGE_KIND_VERSION_DELETED: _ClassVar[ChangeKind]

class EnergyScope(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENERGY_SCOPE_UNSPECIFIED: _ClassVar[EnergyScope]
    ENERGY_SCOPE_MODULE: _ClassVar[EnergyScope]
    ENERGY_SCOPE_GLOBAL: _ClassVar[EnergyScope]
CHANGE_KIND_UNSPECIFIED: ChangeKind
CHANGE_KIND_VERSION_CREATED: ChangeKind
CHANGE_KIND_ALIAS_MOVED: ChangeKind
CHANGE_KIND_VERSION_DELETED: ChangeKind
ENERGY_SCOPE_UNSPECIFIED: EnergyScope
ENERGY_SCOPE_MODULE: EnergyScope
ENERGY_SCOPE_GLOBAL: EnergyScope

class RegisterAdapterHeader(_message.Message):
    __slots__ = ("name", "adapter_config", "lineage_json", "size_bytes", "base_digest")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_CONFIG_FIELD_NUMBER: _ClassVar[int]
    LINEAGE_JSON_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    BASE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    name: str
    adapter_config: bytes
    lineage_json: str
    size_bytes: int
    base_digest: str
    def __init__(self, name: _Optional[str] = ..., adapter_config: _Optional[bytes] = ..., lineage_json: _Optional[str] = ..., size_bytes: _Optional[int] = ..., base_digest: _Optional[str] = ...) -> None: ...

class RegisterAdapterRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: RegisterAdapterHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[RegisterAdapterHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class RegisterAdapterResponse(_message.Message):
    __slots__ = ("adapter", "created")
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    adapter: _common_pb2.AdapterVersion
    created: bool
    def __init__(self, adapter: _Optional[_Union[_common_pb2.AdapterVersion, _Mapping]] = ..., created: _Optional[bool] = ...) -> None: ...

class GetAdapterRequest(_message.Message):
    __slots__ = ("ref",)
    REF_FIELD_NUMBER: _ClassVar[int]
    ref: str
    def __init__(self, ref: _Optional[str] = ...) -> None: ...

class ListAdaptersRequest(_message.Message):
    __slots__ = ("tenant", "page_size", "page_token")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    page_size: int
    page_token: str
    def __init__(self, tenant: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListAdaptersResponse(_message.Message):
    __slots__ = ("adapters", "next_page_token")
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    adapters: _containers.RepeatedCompositeFieldContainer[_common_pb2.AdapterVersion]
    next_page_token: str
    def __init__(self, adapters: _Optional[_Iterable[_Union[_common_pb2.AdapterVersion, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ListVersionsRequest(_message.Message):
    __slots__ = ("adapter",)
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    adapter: str
    def __init__(self, adapter: _Optional[str] = ...) -> None: ...

class ListVersionsResponse(_message.Message):
    __slots__ = ("versions",)
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    versions: _containers.RepeatedCompositeFieldContainer[_common_pb2.AdapterVersion]
    def __init__(self, versions: _Optional[_Iterable[_Union[_common_pb2.AdapterVersion, _Mapping]]] = ...) -> None: ...

class SetAliasRequest(_message.Message):
    __slots__ = ("ref", "alias", "expected_version", "expect_absent")
    REF_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    EXPECT_ABSENT_FIELD_NUMBER: _ClassVar[int]
    ref: str
    alias: str
    expected_version: int
    expect_absent: bool
    def __init__(self, ref: _Optional[str] = ..., alias: _Optional[str] = ..., expected_version: _Optional[int] = ..., expect_absent: _Optional[bool] = ...) -> None: ...

class SetAliasResponse(_message.Message):
    __slots__ = ("tenant", "name", "alias", "previous_version", "version")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    name: str
    alias: str
    previous_version: int
    version: int
    def __init__(self, tenant: _Optional[str] = ..., name: _Optional[str] = ..., alias: _Optional[str] = ..., previous_version: _Optional[int] = ..., version: _Optional[int] = ...) -> None: ...

class DeleteVersionRequest(_message.Message):
    __slots__ = ("ref", "force")
    REF_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    ref: str
    force: bool
    def __init__(self, ref: _Optional[str] = ..., force: _Optional[bool] = ...) -> None: ...

class DeleteVersionResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WatchAdaptersRequest(_message.Message):
    __slots__ = ("after_id",)
    AFTER_ID_FIELD_NUMBER: _ClassVar[int]
    after_id: int
    def __init__(self, after_id: _Optional[int] = ...) -> None: ...

class AdapterChange(_message.Message):
    __slots__ = ("id", "kind", "tenant", "name", "version", "alias", "digest", "at")
    ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    id: int
    kind: ChangeKind
    tenant: str
    name: str
    version: int
    alias: str
    digest: str
    at: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[int] = ..., kind: _Optional[_Union[ChangeKind, str]] = ..., tenant: _Optional[str] = ..., name: _Optional[str] = ..., version: _Optional[int] = ..., alias: _Optional[str] = ..., digest: _Optional[str] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class CompressAdapterRequest(_message.Message):
    __slots__ = ("ref", "rank", "energy", "scope", "name")
    REF_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    ENERGY_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ref: str
    rank: int
    energy: float
    scope: EnergyScope
    name: str
    def __init__(self, ref: _Optional[str] = ..., rank: _Optional[int] = ..., energy: _Optional[float] = ..., scope: _Optional[_Union[EnergyScope, str]] = ..., name: _Optional[str] = ...) -> None: ...

class MergeAdaptersRequest(_message.Message):
    __slots__ = ("refs", "method", "weights", "density", "svd_rank", "seed", "name")
    REFS_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    DENSITY_FIELD_NUMBER: _ClassVar[int]
    SVD_RANK_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    refs: _containers.RepeatedScalarFieldContainer[str]
    method: str
    weights: _containers.RepeatedScalarFieldContainer[float]
    density: float
    svd_rank: int
    seed: int
    name: str
    def __init__(self, refs: _Optional[_Iterable[str]] = ..., method: _Optional[str] = ..., weights: _Optional[_Iterable[float]] = ..., density: _Optional[float] = ..., svd_rank: _Optional[int] = ..., seed: _Optional[int] = ..., name: _Optional[str] = ...) -> None: ...

class DerivedAdapterResponse(_message.Message):
    __slots__ = ("adapter", "created")
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    adapter: _common_pb2.AdapterVersion
    created: bool
    def __init__(self, adapter: _Optional[_Union[_common_pb2.AdapterVersion, _Mapping]] = ..., created: _Optional[bool] = ...) -> None: ...
