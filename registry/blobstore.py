"""Content-addressed blob storage behind a small interface (local files here, S3 in s3store).

Blobs are addressed by `sha256:<hex>` of their bytes. Writes go to a temp file, are
fsynced and renamed into place, so a reader never sees half a blob, whatever crashes.
Reads re-hash and raise `DataCorruption` on mismatch: a flipped bit on disk is reported,
never served. A full disk, a read-only mount or a forbidden path becomes a typed error
naming the path (`registry/faults.py`); a failed write leaves nothing under the final name.
A read-only blob directory serves every read: nothing is written to open or read it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable

from loraplex.errors import DataCorruption, NotFound
from loraplex.registry.content import bytes_digest
from loraplex.registry.faults import os_error
from loraplex.registry.refs import check_digest

_TMP_PREFIX = ".tmp-"


@runtime_checkable
class BlobStore(Protocol):
    """What the registry needs from any blob backend."""

    def put(self, data: bytes) -> str:
        """Store `data`, return its digest. Idempotent; refreshes an existing blob's age."""
        ...

    def get(self, digest: str) -> bytes:
        """The bytes, digest-checked (`DataCorruption`); `NotFound` if absent."""
        ...

    def exists(self, digest: str) -> bool: ...

    def delete(self, digest: str, *, min_age_s: float = 0.0) -> bool:
        """Remove, unless written or refreshed (`put` of existing bytes) within the last
        `min_age_s` seconds, checked as close to the delete as the backend allows; True if
        something was removed. Safe to repeat."""
        ...

    def list(self) -> Iterator[tuple[str, int, float]]:
        """(digest, size in bytes, age in seconds) of every blob."""
        ...


class LocalBlobStore:
    """Blobs as files `<root>/sha256/<2 hex>/<62 hex>`."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        try:
            (self.root / "sha256").mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise os_error(e, "creating blob directory", self.root / "sha256") from e

    def path(self, digest: str) -> Path:
        hexpart = check_digest(digest, field="digest").split(":", 1)[1]
        return self.root / "sha256" / hexpart[:2] / hexpart[2:]

    def put(self, data: bytes) -> str:
        digest = bytes_digest(data)
        target = self.path(digest)
        try:
            if target.exists() and self._intact(target, digest):
                os.utime(target)  # young again: gc must not take it before our commit
                return digest
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=target.parent)
        except OSError as e:
            raise os_error(e, "writing blob into", target.parent) from e
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except BaseException as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if isinstance(e, OSError):
                raise os_error(e, f"writing blob {digest} ({len(data)} bytes) into",
                               target.parent) from e
            raise
        _fsync_dir(target.parent)
        return digest

    def get(self, digest: str) -> bytes:
        target = self.path(digest)
        try:
            data = target.read_bytes()
        except FileNotFoundError:
            raise NotFound(f"blob {digest} is missing from the blob store") from None
        except OSError as e:
            raise os_error(e, "reading blob", target) from e
        if bytes_digest(data) != digest:
            raise DataCorruption(f"blob {digest} is corrupt: its bytes hash to "
                                 f"{bytes_digest(data)}", field="digest")
        return data

    def exists(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def delete(self, digest: str, *, min_age_s: float = 0.0) -> bool:
        path = self.path(digest)
        try:
            if min_age_s > 0 and time.time() - path.stat().st_mtime < min_age_s:
                return False
            path.unlink()
            return True
        except FileNotFoundError:
            return False
        except OSError as e:
            raise os_error(e, "deleting blob", self.path(digest)) from e

    def list(self) -> Iterator[tuple[str, int, float]]:
        now = time.time()
        for sub in sorted(_listdir(self.root / "sha256")):
            if not sub.is_dir():
                continue
            for f in sorted(_listdir(sub)):
                if f.name.startswith(_TMP_PREFIX):
                    continue
                with contextlib.suppress(FileNotFoundError):
                    st = f.stat()
                    yield f"sha256:{sub.name}{f.name}", st.st_size, now - st.st_mtime

    def stale_temp_files(self, min_age_s: float) -> Iterator[Path]:
        """Temp files a crashed writer left behind (older than `min_age_s`)."""
        now = time.time()
        for f in (self.root / "sha256").glob(f"*/{_TMP_PREFIX}*"):
            with contextlib.suppress(FileNotFoundError):
                if now - f.stat().st_mtime >= min_age_s:
                    yield f

    @staticmethod
    def _intact(path: Path, digest: str) -> bool:
        h = hashlib.sha256()
        with path.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
        return "sha256:" + h.hexdigest() == digest


def _listdir(path: Path) -> list[Path]:
    try:
        return list(path.iterdir())
    except OSError as e:
        raise os_error(e, "listing blob directory", path) from e


def _fsync_dir(path: Path) -> None:
    """Make the rename itself durable (POSIX: the directory entry lives in the parent)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def open_blob_store(location: str | Path, **s3: object) -> BlobStore:
    """The store a location names: `s3://bucket/prefix` (see s3store.py) or a directory."""
    if str(location).startswith("s3://"):
        from loraplex.registry.s3store import S3BlobStore

        return S3BlobStore(str(location), **s3)  # type: ignore[arg-type]
    return LocalBlobStore(location)
