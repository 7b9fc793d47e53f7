"""The local content-addressed blob store."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from loraplex.errors import DataCorruption, InvalidArgument, NotFound
from loraplex.registry import BlobStore, LocalBlobStore


def test_put_get_exists_delete_list(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    assert isinstance(store, BlobStore)
    digest = store.put(b"hello")
    assert digest == "sha256:" + hashlib.sha256(b"hello").hexdigest()
    assert store.put(b"hello") == digest, "idempotent"
    assert store.exists(digest) and store.get(digest) == b"hello"
    [(listed, size, age)] = list(store.list())
    assert (listed, size) == (digest, 5) and age >= 0
    assert store.delete(digest) and not store.delete(digest)
    assert not store.exists(digest) and list(store.list()) == []
    with pytest.raises(NotFound):
        store.get(digest)


def test_corruption_is_detected_on_read_and_healed_by_a_new_put(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    digest = store.put(b"payload")
    store.path(digest).write_bytes(b"paylOad")
    with pytest.raises(DataCorruption, match="corrupt"):
        store.get(digest)
    store.put(b"payload")
    assert store.get(digest) == b"payload"


def test_no_temp_files_are_left_behind(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    for i in range(5):
        store.put(bytes([i]) * 100)
    leftovers = [p for p in tmp_path.rglob("*") if p.name.startswith(".tmp-")]
    assert leftovers == [] and len(list(store.list())) == 5


def test_digests_are_checked_before_touching_paths(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    for bad in ("sha256:../../etc/passwd", "md5:abc", "sha256:" + "z" * 64):
        with pytest.raises(InvalidArgument):
            store.get(bad)
