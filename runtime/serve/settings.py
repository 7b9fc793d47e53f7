"""The server's one frozen configuration: command-line flags over `LORAPLEX_*` environment
variables over a YAML/TOML file over defaults.

    loraplex serve --base ./base --config server.yaml --port 50051
    LORAPLEX_METRICS_PORT=9100 loraplex serve --base ./base

Engine capacity knobs the server does not name (`max_rank`, `host_cache_bytes`, …) go in the
file's `engine:` table and are passed to `EngineConfig` whole, which validates them.
"""

from __future__ import annotations

import tomllib
from pathlib import Path, PurePath
from typing import Any, Literal

import yaml
from pydantic import Field, field_validator
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
    metrics_host: str = Field("0.0.0.0", description="/metrics listen address.")  # noqa: S104
    metrics_port: int | None = Field(
        9090, ge=0, le=65535, description="/metrics port; 0 picks one, None disables.")
    http_host: str = Field("0.0.0.0", description="OpenAI HTTP listen address.")  # noqa: S104
    http_port: int | None = Field(None, ge=0, le=65535, description="OpenAI-compatible HTTP "
                                  "routes (/v1/...) beside gRPC; 0 picks one, None (default) "
                                  "disables.")
    model_name: str | None = Field(None, description="The base's `model` name in the OpenAI "
                                   "routes (default: the base directory's name).")
    no_auth: bool = Field(False, description="Treat every caller as an admin (local use only).")
    quantization: Literal[QUANTIZATIONS] = Field("nf4", description="Base weights.")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    max_slots: int = Field(8, gt=0, description="Adapters resident on the device at once.")
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
    watch_poll_s: float = Field(0.5, gt=0, description="WatchAdapters polls the registry this often.")
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

    @field_validator("blob_dir", mode="before")
    @classmethod
    def _blob_dir_text(cls, v: Any) -> Any:
        """A directory may be given as a Path; kept as text because `Path` would fold the
        `//` of `s3://bucket/prefix`."""
        return str(v) if isinstance(v, PurePath) else v

    @field_validator("engine")
    @classmethod
    def _no_shadowing(cls, v: dict[str, Any]) -> dict[str, Any]:
        named = {"base_dir", "quantization", "device", "max_slots", "max_batch", "max_waiting"}
        clash = sorted(named & set(v))
        if clash:
            raise ValueError(f"set {clash} as top-level settings, not under `engine`")
        return v

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
                            **self.engine)


class _FileSource(PydanticBaseSettingsSource):
    """The lowest-priority source: the file named by `config_file` (set per load)."""

    path: Path | None = None

    def get_field_value(self, field, field_name):  # required by the ABC; unused
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        return read_config_file(self.path) if self.path else {}


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

