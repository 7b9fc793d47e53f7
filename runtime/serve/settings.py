"""The server's one frozen configuration: command-line flags over `LORAPLEX_*` environment
variables over a YAML/TOML file over defaults.

    loraplex serve --base ./base --config server.yaml --port 50051
    LORAPLEX_METRICS_PORT=9100 loraplex serve --base ./base

Engine capacity knobs the server does not name (`max_rank`, `loader_threads`, …) go in the
file's `engine:` table and are passed to `EngineConfig` whole, which validates them.
"""

from __future__ import annotations

import ipaddress
import tomllib
from pathlib import Path, PurePath
from typing import Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from loraplex.errors import InvalidArgument
from loraplex.peft_format import QUANTIZATIONS
from loraplex.registry.settings import DEFAULT_LOCATION


class ServerSettings(BaseSettings):
    """Everything `create_server` needs; passed whole, never field by field."""

    model_config = SettingsConfigDict(env_prefix="LORAPLEX_", frozen=True, extra="forbid")

    base: Path | None = Field(None, description="Hugging Face model directory of the base.")
    registry: str = Field(DEFAULT_LOCATION, description="Registry directory or SQLAlchemy URL.")
    blob_dir: str | None = Field(None, description="Blob directory or s3://bucket/prefix "
                                 "for a database URL registry.")
    host: str = Field("0.0.0.0", description="gRPC listen address.")  # noqa: S104
    port: int = Field(50051, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    metrics_host: str = Field("127.0.0.1", description="/metrics listen address (loopback "
                              "by default: it has no auth and names tenants and adapters).")
    metrics_port: int | None = Field(
        9090, ge=0, le=65535, description="/metrics port; 0 picks one, None disables.")
    http_host: str = Field("0.0.0.0", description="OpenAI HTTP listen address.")  # noqa: S104
    http_port: int | None = Field(None, ge=0, le=65535, description="OpenAI-compatible HTTP "
                                  "routes (/v1/...) beside gRPC; 0 picks one, None (default) "
                                  "disables.")
    console: bool = Field(True, description="The web console under /console/ on the HTTP "
                          "port (docs/console.md); needs `http_port`.")
    model_name: str | None = Field(None, description="The base's `model` name in the OpenAI "
                                   "routes (default: the base directory's name).")
    no_auth: bool = Field(False, description="Treat every caller as an admin (local use only: "
                          "refused unless every listener binds a loopback address).")
    no_auth_on_public_interfaces_i_understand: bool = Field(
        False, description="Allow `no_auth` with a listener on a non-loopback address: anyone "
        "who reaches it is an admin.")
    tls_cert: Path | None = Field(None, description="PEM certificate chain: gRPC, HTTP and "
                                  "/metrics speak TLS only (needs `tls_key`).")
    tls_key: Path | None = Field(None, description="PEM private key of `tls_cert`.")
    tls_client_ca: Path | None = Field(None, description="PEM CA bundle: every door requires a "
                                       "client certificate signed by it (mutual TLS).")
    quantization: Literal[QUANTIZATIONS] = Field("nf4", description="Base weights.")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    max_slots: int = Field(8, gt=0, description="Adapters resident on the device at once.")
    host_cache_bytes: int = Field(
        1 << 30, ge=0, description="Bound of the host tier of adapters, in bytes: adapters "
        "held in host memory plus loads in flight never exceed it (runtime/lora/pool.py).")
    max_batch: int = Field(32, gt=0, description="Sequences in the running batch.")
    max_waiting: int = Field(256, gt=0, description="Queued requests before RESOURCE_EXHAUSTED.")
    engine: dict[str, Any] = Field(default_factory=dict,
                                   description="More EngineConfig fields, passed through.")
    grace_s: float = Field(30.0, ge=0, description="SIGTERM: time to finish in-flight calls.")
    drain_delay_s: float = Field(
        2.0, ge=0, description="SIGTERM: health says NOT_SERVING and new calls get UNAVAILABLE "
        "for this long before the listener closes, so load balancers notice first.")
    max_register_bytes: int = Field(
        1 << 30, gt=0, description="Cap on one RegisterAdapter stream (config + weights).")
    max_batch_items: int = Field(256, gt=0, description="Items in one BatchGenerate call.")
    watch_poll_s: float = Field(0.5, gt=0, description="How often a WatchAdapters stream "
                                "checks for a drain. Changes reach it as they happen: the "
                                "server's one change-feed reader is woken by NOTIFY on "
                                "PostgreSQL and re-reads SQLite every `change_poll_s`.")
    metrics_top_k: int = Field(20, gt=0, description="Distinct tenant/adapter label values.")
    follow_registry: bool = Field(True, description="Follow the registry's change feed: evict "
                                  "deleted versions, prefetch promoted ones (follower.py).")
    follow_poll_s: float = Field(0.5, gt=0, description="Change-feed poll interval (PostgreSQL "
                                 "also wakes the follower by NOTIFY at once).")
    prefetch_aliases: list[str] = Field(default_factory=list, description="Aliases whose newly "
                                        "promoted versions every replica loads ahead of use.")
    ray: bool = Field(False, description="Run the engines as a Ray Serve deployment behind "
                      "this gRPC ingress (ray_serve.py).")
    replicas: int = Field(2, gt=0, description="--ray: engine replicas, each with the base.")
    ray_address: str | None = Field(None, description="--ray: cluster to join (`auto`, "
                                    "`ray://…`); default: $RAY_ADDRESS or a local Ray.")
    max_message_bytes: int = Field(8 << 20, gt=0, description="gRPC message size limit.")
    max_concurrent_rpcs: int | None = Field(
        1024, gt=0, description="gRPC calls in progress at once; later ones get "
        "RESOURCE_EXHAUSTED (None: unbounded).")
    registry_workers: int = Field(4, gt=0, description="Threads of the pool that runs heavy "
                                  "registry work (uploads, merges, compress, gc), apart from "
                                  "the one that admits inference.")
    registry_nice: int = Field(10, ge=0, le=19, description="Linux nice value of those "
                               "threads: inference keeps the CPU while they work (0: normal).")
    max_concurrent_derivations: int = Field(2, gt=0, description="MergeAdapters and "
                                            "CompressAdapter calls in progress at once.")
    max_derivations_per_tenant: int = Field(1, gt=0, description="MergeAdapters and "
                                            "CompressAdapter calls in progress for one tenant.")
    max_concurrent_uploads: int = Field(4, gt=0, description="RegisterAdapter streams in "
                                        "progress at once, all tenants together.")
    max_uploads_per_tenant: int = Field(2, gt=0, description="RegisterAdapter streams in "
                                        "progress at once for one tenant.")
    upload_spool_dir: Path | None = Field(None, description="Where uploads are spooled while "
                                          "they stream in (default: the system temp dir).")
    refusal_pacing_free: int = Field(20, ge=0, description="Refusals (UNAUTHENTICATED, "
                                     "PERMISSION_DENIED, INVALID_ARGUMENT, RESOURCE_EXHAUSTED) "
                                     "one tenant, or one address before authentication, gets "
                                     "within 10 s before its further refusals, and its calls' "
                                     "starts, are held for `refusal_pacing_delay_s` (0: never).")
    refusal_pacing_delay_s: float = Field(1.0, ge=0, description="How long such a refusal, "
                                          "or call start, is held.")
    refusal_pacing_max_held: int = Field(64, ge=0, description="Calls held at once, all "
                                         "callers together; past it they go on at once.")
    memory_trim_s: float = Field(5.0, ge=0, description="Every this many seconds, give freed "
                                 "heap memory back to the OS (glibc `malloc_trim`) when RSS "
                                 "grew by 32 MiB since the last time; also right after each "
                                 "upload, merge and compression (0: never).")
    malloc_arena_max: int = Field(4, ge=0, description="Cap on glibc's malloc arenas, each of "
                                  "which keeps its own freed memory (0: glibc's default, up "
                                  "to 8 per core).")
    http_max_body_bytes: int = Field(8 << 20, gt=0, description="Largest HTTP request body; "
                                     "a larger one gets 413 before it is read.")
    http_timeout_s: float = Field(600.0, gt=0, description="Deadline of one non-streaming "
                                  "HTTP completion.")

    @field_validator("blob_dir", mode="before")
    @classmethod
    def _blob_dir_text(cls, v: Any) -> Any:
        """A directory may be given as a Path; kept as text because `Path` would fold the
        `//` of `s3://bucket/prefix`."""
        return str(v) if isinstance(v, PurePath) else v

    @field_validator("engine")
    @classmethod
    def _no_shadowing(cls, v: dict[str, Any]) -> dict[str, Any]:
        named = {"base_dir", "quantization", "device", "max_slots", "max_batch", "max_waiting",
                 "host_cache_bytes"}
        clash = sorted(named & set(v))
        if clash:
            raise ValueError(f"set {clash} as top-level settings, not under `engine`")
        return v

    @model_validator(mode="after")
    def _doors(self) -> ServerSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca needs tls_cert and tls_key")
        if self.no_auth and not self.no_auth_on_public_interfaces_i_understand:
            public = [f"{name}={host}" for name, host in self.listeners() if not is_loopback(host)]
            if public:
                raise ValueError(
                    "no_auth makes every caller an admin, so every listener must bind a "
                    f"loopback address; these do not: {', '.join(public)} (bind 127.0.0.1, or "
                    "set no_auth_on_public_interfaces_i_understand)")
        return self

    def listeners(self) -> list[tuple[str, str]]:
        """(setting, address) of every listener these settings open."""
        out = [("host", self.host)]
        if self.metrics_port is not None:
            out.append(("metrics_host", self.metrics_host))
        if self.http_port is not None:
            out.append(("http_host", self.http_host))
        return out

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings,
                                   dotenv_settings, file_secret_settings):
        return init_settings, env_settings, _FileSource(settings_cls)

    def engine_config(self):
        """The `EngineConfig` these settings describe (validated by the engine)."""
        from loraplex.runtime.api.types import EngineConfig

        if self.base is None:
            raise InvalidArgument("`base` is required to serve: pass --base DIR", field="base")
        return EngineConfig(base_dir=self.base, quantization=self.quantization,
                            device=self.device, max_slots=self.max_slots,
                            max_batch=self.max_batch, max_waiting=self.max_waiting,
                            host_cache_bytes=self.host_cache_bytes,
                            **self.engine)


class _FileSource(PydanticBaseSettingsSource):
    """The lowest-priority source: the file named by `config_file` (set per load)."""

    path: Path | None = None

    def get_field_value(self, field, field_name):  # required by the ABC; unused
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        return read_config_file(self.path) if self.path else {}


def is_loopback(host: str) -> bool:
    """`localhost`, or an address in 127.0.0.0/8 or ::1; a name or wildcard is not."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def read_config_file(path: Path) -> dict[str, Any]:
    """A YAML (`.yaml`/`.yml`) or TOML (`.toml`) mapping of settings."""
    if not path.is_file():
        raise InvalidArgument(f"config file {path} does not exist", field="config")
    text = path.read_text()
    data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InvalidArgument(f"config file {path} must hold a mapping", field="config")
    return {k.replace("-", "_"): v for k, v in data.items()}


def load_settings(flags: dict[str, Any] | None = None,
                  config_file: Path | None = None) -> ServerSettings:
    """Flags (None values dropped) over env over `config_file` over defaults."""
    given = {k: v for k, v in (flags or {}).items() if v is not None}
    _FileSource.path = config_file
    try:
        return ServerSettings(**given)
    except ValueError as e:  # pydantic's ValidationError: name the first bad field
        raise _invalid(e) from None
    finally:
        _FileSource.path = None


def _invalid(error: ValueError) -> InvalidArgument:
    errors = getattr(error, "errors", lambda: [])()
    field = ".".join(str(p) for p in errors[0]["loc"]) if errors else None
    text = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors) or str(error)
    return InvalidArgument(f"bad server settings: {text}", field=field)

