"""Content-addressed blobs in S3-compatible object storage (AWS S3, MinIO, Ceph, moto).

    reg = Registry.open("postgresql+psycopg://…", blob_dir="s3://bucket/loraplex")
    AWS_ENDPOINT_URL=http://minio:9000 loraplex registry push … --blob-dir s3://bucket/lpx

Why this is safe with many writers and no locks: a blob's key is its digest, so two
writers of one key write the same bytes. A write is one `PutObject` (S3 makes an object
visible whole or not at all), sent with `IfNoneMatch: *` so the first writer wins and
every later one learns "already there" instead of rewriting it, and with the sha256 as
`ChecksumSHA256`, so the server refuses bytes damaged on the way. Reads re-hash anyway
(`DataCorruption`): a blob is verified where it is used, whatever stored it.

gc runs on listing ages (`LastModified`), as on disk; a push that finds its blob already
stored and old re-stamps it (a self-copy), so a concurrent gc cannot take it between the
push's blob write and its commit.

Failures of the store itself are typed: no answer (refused, reset, timed out, 5xx) is
`Unavailable` (retry later; the registration wrote no version row), a missing bucket or
refused credentials are `FailedPrecondition` (the operator must fix the configuration).
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from loraplex.errors import (
    DataCorruption,
    FailedPrecondition,
    InvalidArgument,
    LoraplexError,
    NotFound,
    Unavailable,
    quote,
)
from loraplex.registry.content import bytes_digest
from loraplex.registry.refs import check_digest

SCHEME = "s3://"
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]")
_KEY_TAIL = re.compile(r"sha256/([0-9a-f]{2})/([0-9a-f]{62})")
_MISSING = frozenset({"NoSuchKey", "404", "NotFound"})
_EXISTS = frozenset({"PreconditionFailed", "412", "ConditionalRequestConflict", "409"})
_CONFIG = frozenset({"NoSuchBucket", "AccessDenied", "403", "InvalidAccessKeyId",
                     "SignatureDoesNotMatch", "AllAccessDisabled"})


def parse_s3_url(url: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` -> ("bucket", "some/prefix") (prefix may be "")."""
    if not url.startswith(SCHEME):
        raise InvalidArgument(f"{quote(url)} is not an s3://bucket/prefix location",
                              field="blob_dir")
    bucket, _, prefix = url[len(SCHEME):].partition("/")
    if not _BUCKET.fullmatch(bucket):
        raise InvalidArgument(f"{quote(url)}: {quote(bucket)} is not a valid bucket name",
                              field="blob_dir")
    return bucket, prefix.strip("/")


class S3BlobStore:
    """Blobs as objects `<prefix>/sha256/<2 hex>/<62 hex>` in one bucket.

    `client` is a boto3 S3 client; by default one is made from the environment (standard
    AWS variables, `AWS_ENDPOINT_URL` for a non-AWS server) with `endpoint_url` over it."""

    def __init__(self, url: str, *, endpoint_url: str | None = None, client: Any = None,
                 connect_timeout_s: float = 5.0, max_attempts: int = 3,
                 refresh_after_s: float = 60.0) -> None:
        self.url = url
        self.bucket, self.prefix = parse_s3_url(url)
        self.refresh_after_s = refresh_after_s
        self.client = client or make_client(endpoint_url, connect_timeout_s, max_attempts)

    def __repr__(self) -> str:
        return f"S3BlobStore({self.url!r})"

    def key(self, digest: str) -> str:
        hexpart = check_digest(digest, field="digest").split(":", 1)[1]
        tail = f"sha256/{hexpart[:2]}/{hexpart[2:]}"
        return f"{self.prefix}/{tail}" if self.prefix else tail

    # -- the BlobStore interface -----------------------------------------------------------
    def put(self, data: bytes) -> str:
        digest = bytes_digest(data)
        key = self.key(digest)
        checksum = base64.b64encode(hashlib.sha256(data).digest()).decode()
        try:
            self._call("PutObject", key, Key=key, Body=data, IfNoneMatch="*",
                       ChecksumSHA256=checksum)
        except _AlreadyThere:
            self._refresh(key)
        return digest

    def get(self, digest: str) -> bytes:
        key = self.key(digest)
        try:
            body = self._call("GetObject", key, Key=key)["Body"]
            data = body.read()
        except _Missing:
            raise NotFound(f"blob {digest} is missing from {self.url}",
                           public=f"blob {digest} is missing from the blob store") from None
        except Exception as e:  # noqa: BLE001 - a stream cut mid-body; typed below
            raise _typed(e, "GetObject", key) from e
        if bytes_digest(data) != digest:
            raise DataCorruption(f"blob {digest} in {self.url} is corrupt: its bytes hash to "
                                 f"{bytes_digest(data)}", field="digest",
                                 public=f"blob {digest} is corrupt in the blob store")
        return data

    def exists(self, digest: str) -> bool:
        key = self.key(digest)
        try:
            self._call("HeadObject", key, Key=key)
            return True
        except _Missing:
            return False

    def delete(self, digest: str, *, min_age_s: float = 0.0) -> bool:
        """Conditional: the object is deleted only if it is still the one just examined
        (`If-Match` its ETag) and was not refreshed within `min_age_s`; a server that
        answers 412 (someone wrote or refreshed it meanwhile) keeps it."""
        key = self.key(digest)
        try:
            head = self._call("HeadObject", key, Key=key)
        except _Missing:
            return False
        age = (datetime.now(UTC) - head["LastModified"]).total_seconds()
        if age < min_age_s:
            return False
        try:
            self._call("DeleteObject", key, Key=key, IfMatch=head["ETag"])
        except _Changed:
            return False
        except _Missing:
            return False
        return True

    def list(self) -> Iterator[tuple[str, int, float]]:
        now = datetime.now(UTC)
        root = f"{self.prefix}/sha256/" if self.prefix else "sha256/"
        paginator = self.client.get_paginator("list_objects_v2")
        pages = paginator.paginate(Bucket=self.bucket, Prefix=root)
        try:
            for page in pages:
                for obj in page.get("Contents", []):
                    m = _KEY_TAIL.fullmatch(obj["Key"][len(root) - len("sha256/"):])
                    if m is None:
                        continue
                    age = (now - obj["LastModified"]).total_seconds()
                    yield f"sha256:{m.group(1)}{m.group(2)}", int(obj["Size"]), max(0.0, age)
        except LoraplexError:
            raise
        except Exception as e:  # noqa: BLE001 - typed below
            raise _typed(e, "ListObjectsV2", root) from e

    # -- helpers ---------------------------------------------------------------------------
    def _refresh(self, key: str) -> None:
        """An existing blob becomes young again if gc could soon take it (module doc)."""
        try:
            head = self._call("HeadObject", key, Key=key)
        except _Missing:  # gc took it between our write attempt and now: write it again
            raise Unavailable(f"blob {key} vanished while being stored; retry",
                              public="a blob vanished while being stored; retry") from None
        age = (datetime.now(UTC) - head["LastModified"]).total_seconds()
        if age >= self.refresh_after_s:
            self._call("CopyObject", key, Key=key, MetadataDirective="REPLACE",
                       CopySource={"Bucket": self.bucket, "Key": key},
                       Metadata={"refreshed": datetime.now(UTC).isoformat()})

    def _call(self, op: str, key: str, **kw: Any) -> dict:
        """One S3 operation with every failure typed (`_Missing`/`_AlreadyThere` are ours)."""
        from botocore.exceptions import ClientError

        method = getattr(self.client, _snake(op))
        try:
            return method(Bucket=self.bucket, **kw)
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code in _MISSING:
                raise _Missing() from None
            if code in _EXISTS and op == "DeleteObject":
                raise _Changed() from None
            if code in _EXISTS:
                raise _AlreadyThere() from None
            raise _typed(e, op, key) from e
        except Exception as e:  # noqa: BLE001 - connection-level failures; typed below
            raise _typed(e, op, key) from e


class _Missing(Exception):
    pass


class _AlreadyThere(Exception):
    pass


class _Changed(Exception):
    """412 Precondition Failed on a conditional delete."""


def _typed(e: BaseException, op: str, key: str) -> LoraplexError:
    """The loraplex error for a failure of the store (module doc)."""
    from botocore.exceptions import ClientError

    if isinstance(e, LoraplexError):
        return e
    if isinstance(e, ClientError):
        err = e.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code in _CONFIG:
            return FailedPrecondition(f"object store refused {op} {key}: {code}: "
                                      f"{err.get('Message', '')}", field="blob_dir",
                                      public=f"the blob store refused {op} ({code})")
        if code == "BadDigest" or code == "XAmzContentChecksumMismatch":
            return DataCorruption(f"object store refused {op} {key}: the bytes arrived "
                                  "damaged", field="digest",
                                  public=f"the blob store refused {op}: damaged bytes")
        if status >= 500 or code in ("SlowDown", "ServiceUnavailable", "InternalError"):
            return Unavailable(f"object store failed {op} {key}: {code}; retry later",
                               public=f"the blob store failed {op} ({code}); retry later")
        return FailedPrecondition(f"object store refused {op} {key}: {code}: "
                                  f"{err.get('Message', '')}", field="blob_dir",
                                  public=f"the blob store refused {op} ({code})")
    return Unavailable(f"object store did not answer {op} {key}: {type(e).__name__}: {e}",
                       public=f"the blob store did not answer {op}; retry later")


def _snake(op: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", op).lower().replace("v2", "_v2")


def make_client(endpoint_url: str | None = None, connect_timeout_s: float = 5.0,
                max_attempts: int = 3) -> Any:
    """A boto3 S3 client; the endpoint from the argument, else the AWS environment."""
    import boto3
    from botocore.config import Config

    config = Config(connect_timeout=connect_timeout_s, read_timeout=60,
                    retries={"max_attempts": max_attempts, "mode": "standard"},
                    s3={"addressing_style": "path"},
                    request_checksum_calculation="when_required",
                    response_checksum_validation="when_required")
    return boto3.client("s3", endpoint_url=endpoint_url or os.environ.get("AWS_ENDPOINT_URL"),
                        config=config)
