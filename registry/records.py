"""Plain immutable records the registry hands out (no SQLAlchemy, no protobuf).

The runtime, the trainer and the gRPC servicers all speak these dataclasses; converting
them to wire types happens only at the servicer boundary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

from loraplex.fingerprint import BaseFingerprint
from loraplex.peft_format import lora_scale, pair_tensors
from loraplex.registry.refs import check_name

if TYPE_CHECKING:
    import torch

Role = Literal["tenant", "admin"]
Scope = Literal["inference", "publish", "admin"]
SCOPES: tuple[Scope, ...] = ("inference", "publish", "admin")
"""Token scopes, each allowing everything the ones before it allow: `inference` generates
and reads its tenant's adapters; `publish` also pushes, moves aliases, deletes, derives;
`admin` also manages tokens and acts on every tenant."""
ChangeKind = Literal["version_created", "alias_moved", "version_deleted"]


class _Unset:
    """Sentinel type for `set_alias(expected=UNSET)`: no compare, move unconditionally."""

    _instance: _Unset | None = None

    def __new__(cls) -> _Unset:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()


@dataclass(frozen=True)
class Identity:
    """Who is calling. Tenants act on their own adapters; admins on every tenant's.
    `scope` (see `SCOPES`) limits what a tenant may do: None means `publish` for a tenant
    and `admin` for an admin; an admin is always scope `admin`. A tenant of scope `admin`
    manages its own tenant's tokens; only an admin acts on other tenants."""

    tenant: str
    role: Role = "tenant"
    subject: str = ""
    scope: Scope | None = None

    def __post_init__(self) -> None:
        from loraplex.errors import InvalidArgument, quote

        check_name(self.tenant, "tenant", field="identity")
        if self.role not in ("tenant", "admin"):
            raise InvalidArgument(f"role must be 'tenant' or 'admin', got {quote(self.role)}",
                                  field="identity")
        scope = self.scope or ("admin" if self.role == "admin" else "publish")
        if scope not in SCOPES or (self.role == "admin" and scope != "admin"):
            raise InvalidArgument(f"scope {quote(self.scope)} does not fit role {self.role}",
                                  field="scope")
        object.__setattr__(self, "scope", scope)

    def allows(self, scope: Scope) -> bool:
        return SCOPES.index(self.scope) >= SCOPES.index(scope)  # type: ignore[arg-type]

    def require(self, scope: Scope, action: str) -> None:
        """PermissionDenied unless this identity's scope covers `scope`."""
        if not self.allows(scope):
            from loraplex.errors import PermissionDenied

            raise PermissionDenied(f"{self.who} (scope {self.scope}) may not {action}: "
                                   f"that needs a token of scope {scope}", field="token")

    @classmethod
    def system(cls) -> Identity:
        """The operator acting locally (CLI without a token, tests, the demo)."""
        return cls(tenant="system", role="admin", subject="system")

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def can_access(self, tenant: str) -> bool:
        return self.is_admin or self.tenant == tenant

    @property
    def who(self) -> str:
        """What audit rows record as the actor."""
        return self.subject or f"{self.role}:{self.tenant}"


@dataclass(frozen=True)
class AdapterVersion:
    """One immutable version. `created` is False when a push matched existing content."""

    tenant: str
    name: str
    version: int
    digest: str  # "sha256:<hex>" over canonical config + tensors (see content.py)
    size_bytes: int
    rank: int  # the config's `r` (its `rank_pattern` may override it per module)
    alpha: float  # the config's `lora_alpha` (likewise `alpha_pattern`)
    use_rslora: bool
    target_modules: tuple[str, ...]  # leaf module names, e.g. ("q_proj", "v_proj")
    dtype: str  # "float32" | "float16" | "bfloat16" | ...
    base: BaseFingerprint
    lineage: dict[str, Any]
    created_at: datetime
    created_by: str
    config_blob: str = ""  # blob digest of adapter_config.json
    weights_blob: str = ""  # blob digest of adapter_model.safetensors
    created: bool = True

    def __hash__(self) -> int:
        """Hashable although `lineage` is a dict: identity is the ref plus the content."""
        return hash((self.tenant, self.name, self.version, self.digest))

    @property
    def key(self) -> str:
        return f"{self.tenant}/{self.name}"

    @property
    def ref(self) -> str:
        return f"{self.tenant}/{self.name}:v{self.version}"

    @property
    def scale(self) -> float:
        """The factor peft multiplies B·A·x by: alpha/r, or alpha/sqrt(r) with rsLoRA.
        Modules matched by the config's `rank_pattern`/`alpha_pattern` use their own."""
        return lora_scale(self.rank, self.alpha, self.use_rslora)

    def manifest(self) -> dict[str, Any]:
        """The JSON manifest written beside the peft files on `pull`."""
        return {
            "ref": self.ref, "tenant": self.tenant, "name": self.name,
            "version": self.version, "digest": self.digest, "size_bytes": self.size_bytes,
            "rank": self.rank, "alpha": self.alpha, "use_rslora": self.use_rslora,
            "target_modules": list(self.target_modules), "dtype": self.dtype,
            "base": {k: v for k, v in self.base.to_dict().items() if k != "linear_shapes"},
            "lineage": self.lineage, "created_at": self.created_at.isoformat(),
            "created_by": self.created_by,
            "blobs": {"adapter_config.json": self.config_blob,
                      "adapter_model.safetensors": self.weights_blob},
        }


@dataclass(frozen=True)
class AliasMove:
    """One line of an alias's audit log. `from_version` None: the alias was created;
    `to_version` None: it was removed (a forced delete of the version it pointed at)."""

    tenant: str
    name: str
    alias: str
    from_version: int | None
    to_version: int | None
    at: datetime
    by: str


@dataclass(frozen=True)
class Change:
    """An event for watchers (runtime replicas polling `changes(after=last_id)`)."""

    id: int
    kind: ChangeKind
    tenant: str
    name: str
    version: int | None
    alias: str | None
    digest: str | None
    at: datetime


@dataclass(frozen=True)
class GcReport:
    removed: list[str] = field(default_factory=list)  # blob digests deleted
    freed_bytes: int = 0
    kept: int = 0  # blobs still referenced (or too young to judge)


@dataclass(frozen=True)
class LoadedAdapter:
    """An adapter's weights, digest-checked, ready for the runtime.

    `tensors` keys are module paths of the base model plus `.lora_A.weight` /
    `.lora_B.weight` (peft's `base_model.model.` prefix stripped), e.g.
    `model.layers.0.self_attn.q_proj.lora_A.weight`.
    """

    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]  # A: [r, in], B: [out, r]
    version: AdapterVersion | None = None

    def pairs(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """module path -> (A # [r, in], B # [out, r])."""
        return pair_tensors(self.tensors).pairs
