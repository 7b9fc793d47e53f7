"""Registry limits and knobs, read from the environment (prefix `LORAPLEX_`).

    LORAPLEX_MAX_RANK=32 LORAPLEX_MAX_ADAPTER_BYTES=268435456 loraplex registry push ...
"""

from __future__ import annotations

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from loraplex.limits import MAX_MERGE_INPUTS, MAX_RANK
from loraplex.registry.tensorfile import MAX_HEADER_BYTES, MAX_TENSORS

# Where the registry lives when neither `--registry` nor `$LORAPLEX_REGISTRY` says: the
# one default shared by the registry CLI, the trainer and the server.
DEFAULT_LOCATION = ".loraplex/registry"


class RegistrySettings(BaseSettings):
    """One validated settings object per registry; passed whole, never field by field."""

    model_config = SettingsConfigDict(env_prefix="LORAPLEX_", extra="ignore", frozen=True)

    max_rank: int = Field(MAX_RANK, gt=0, le=MAX_RANK, description="Largest LoRA rank `r` "
                          "accepted at push (at most `loraplex.limits.MAX_RANK`, what the "
                          "engine serves).")
    max_adapter_bytes: int = Field(
        1 << 30, gt=0, description="Cap on config + safetensors bytes of one version.")
    max_header_bytes: int = Field(
        MAX_HEADER_BYTES, gt=0, le=100_000_000, description="Cap on a safetensors "
        "header (its JSON) at push.")
    max_tensors: int = Field(MAX_TENSORS, gt=0, description="Most tensors one upload holds.")
    max_lineage_bytes: int = Field(
        64 << 10, gt=0, description="Cap on a version's lineage (compact JSON) at push.")
    max_merge_inputs: int = Field(MAX_MERGE_INPUTS, gt=0, le=MAX_MERGE_INPUTS,
                                  description="Most adapters one merge combines.")

    quota_bytes: int = Field(
        16 << 30, gt=0, description="Per-tenant cap on the bytes of its live versions "
        "(config + weights, counted per version even where content is shared).")
    quota_versions: int = Field(
        1000, gt=0, description="Per-tenant cap on its live versions (all adapters).")

    token_cache_s: float = Field(
        10.0, ge=0, description="How long a process trusts a token it has checked before "
        "asking the database again: a revocation made by another process takes effect "
        "within this time (at once in the process that revoked).")
    token_retention_s: float = Field(
        30 * 86400.0, ge=0, description="How long a revoked or expired token stays listed "
        "(`token list --all`) before its row is purged (its audit rows stay).")
    auth_failures_free: int = Field(
        5, gt=0, description="Failed authentications a peer may make before backoff.")
    auth_backoff_max_s: float = Field(
        60.0, gt=0, description="Longest a peer is refused after repeated failures.")
    sqlite_busy_timeout_s: float = Field(
        60.0, gt=0, description="How long a SQLite writer waits for the file lock.")
    gc_min_age_s: float = Field(
        600.0, ge=0, description="gc leaves unreferenced blobs younger than this alone, by "
        "file age and by the time the database last saw a push use them: they may belong "
        "to a registration that has written its blobs but not committed yet.")
    db_schema: str | None = Field(
        None, description="PostgreSQL schema to keep the tables in (created if missing).")
    db_pool_size: int = Field(10, gt=0, description="PostgreSQL connections kept open.")
    db_max_overflow: int = Field(10, ge=0, description="PostgreSQL connections opened "
                                 "beyond `db_pool_size` under load, closed when returned.")
    db_pool_timeout_s: float = Field(10.0, gt=0, description="How long a call waits for a "
                                     "free PostgreSQL connection before UNAVAILABLE.")
    change_poll_s: float = Field(
        0.05, gt=0, description="How often `wait_for_changes` re-reads the change feed on "
        "SQLite (PostgreSQL wakes it by NOTIFY instead).")
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
