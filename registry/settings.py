"""Registry limits and knobs, read from the environment (prefix `LORAPLEX_`).

    LORAPLEX_MAX_RANK=64 LORAPLEX_MAX_ADAPTER_BYTES=268435456 loraplex registry push ...
"""

from __future__ import annotations

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Where the registry lives when neither `--registry` nor `$LORAPLEX_REGISTRY` says: the
# one default shared by the registry CLI, the trainer and the server.
DEFAULT_LOCATION = ".loraplex/registry"


class RegistrySettings(BaseSettings):
    """One validated settings object per registry; passed whole, never field by field."""

    model_config = SettingsConfigDict(env_prefix="LORAPLEX_", extra="ignore", frozen=True)

    max_rank: int = Field(256, gt=0, description="Largest LoRA rank `r` accepted at push.")
    max_adapter_bytes: int = Field(
        1 << 30, gt=0, description="Cap on config + safetensors bytes of one version.")
    sqlite_busy_timeout_s: float = Field(
        60.0, gt=0, description="How long a SQLite writer waits for the file lock.")
    gc_min_age_s: float = Field(
        600.0, ge=0, description="gc leaves unreferenced blobs younger than this alone: they "
        "may belong to a registration that has written its blobs but not committed yet.")
    db_schema: str | None = Field(
        None, description="PostgreSQL schema to keep the tables in (created if missing).")
    db_pool_size: int = Field(10, gt=0, description="PostgreSQL connections kept open.")
    db_max_overflow: int = Field(10, ge=0, description="PostgreSQL connections opened "
                                 "beyond `db_pool_size` under load, closed when returned.")
    db_pool_timeout_s: float = Field(10.0, gt=0, description="How long a call waits for a "
                                     "free PostgreSQL connection before UNAVAILABLE.")
    commit_retries: int = Field(20, gt=0, description="Retries of a registration that "
                                "lost a race (unique violation or a locked database).")

    s3_endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint for `s3://` blob locations (default: "
        "$AWS_ENDPOINT_URL, else AWS itself).")
    s3_connect_timeout_s: float = Field(5.0, gt=0, description="S3 connect timeout.")
    s3_max_attempts: int = Field(3, gt=0, description="Attempts per S3 call (transient "
                                 "failures are retried with backoff) before UNAVAILABLE.")

    def s3_options(self) -> dict:
        """Keyword arguments of `S3BlobStore` these settings give."""
        return {"endpoint_url": self.s3_endpoint_url,
                "connect_timeout_s": self.s3_connect_timeout_s,
                "max_attempts": self.s3_max_attempts}

    @field_validator("db_schema")
    @classmethod
    def _schema_is_identifier(cls, v: str | None) -> str | None:
        import re

        if v is not None and not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", v):
            raise ValueError("`db_schema` must be a lower-case SQL identifier")
        return v
