"""`registry gc` against a push that reuses an old, unreferenced blob: both interleavings,
forced deterministically, on SQLite, PostgreSQL and S3 (moto).

1. gc nominates the blob (old, unreferenced in its first reading of the database), then a
   push reuses it and commits, then gc acts: gc must keep it.
2. a push writes (touches) the blob, then gc deletes it before the push commits: the push
   must notice under the database and write it again.
Either way the version's blobs must exist afterwards (`verify` is clean, `load_adapter`
works).
"""

from __future__ import annotations

import os
import time

from loraplex.registry import Identity, Registry

ADMIN = Identity.system()
HOUR = 3600


def _age_all_blobs(reg: Registry, seconds: float) -> None:
    """Make every local blob look `seconds` old (as if written long ago)."""
    old = time.time() - seconds
    for f in (reg.blobs.root / "sha256").glob("*/*"):
        os.utime(f, (old, old))


def _orphan(reg: Registry, make_adapter):
    """A pushed-then-deleted version: its blobs are unreferenced; returns the dir."""
    d = make_adapter(seed=7)
    v = reg.push(ADMIN, d, "acme/x")
    reg.delete_version(ADMIN, v.ref)
    return d, v


def test_gc_nominates_then_a_push_reuses_the_blob(registry, make_adapter, monkeypatch):
    d, old = _orphan(registry, make_adapter)
    _age_all_blobs(registry, HOUR)
    pushed = []

    def push_now(digest: str) -> None:  # runs after gc's listing and first DB reading
        if not pushed:
            pushed.append(registry.push(ADMIN, d, "acme/y"))  # dedupe: reuses the blobs
    monkeypatch.setattr(registry, "_on_gc_candidate", push_now)
    report = registry.gc()
    assert pushed and pushed[0].weights_blob == old.weights_blob
    assert old.weights_blob not in report.removed
    assert registry.verify() == []
    assert registry.load_adapter(registry.resolve(ADMIN, "acme/y")).tensors


def test_gc_deletes_between_a_push_write_and_its_commit(registry, make_adapter, monkeypatch):
    d, old = _orphan(registry, make_adapter)
    ran = []

    def gc_now() -> None:  # the push has written its blobs, not committed yet
        if not ran:
            ran.append(registry.gc(min_age_s=0))
    monkeypatch.setattr(registry, "_on_blobs_written", gc_now)
    v = registry.push(ADMIN, d, "acme/y")
    assert old.weights_blob in ran[0].removed  # gc did take it ...
    assert registry.verify() == []  # ... and the push wrote it again before committing
    assert registry.load_adapter(v).tensors


def test_gc_spares_a_blob_a_push_used_within_the_grace_window(registry, make_adapter):
    """The database's record of use counts even where the file looks old."""
    d, old = _orphan(registry, make_adapter)
    registry.push(ADMIN, d, "acme/y")
    registry.delete_version(ADMIN, "acme/y:v1")
    _age_all_blobs(registry, HOUR)
    assert old.weights_blob not in registry.gc(min_age_s=600).removed
    assert old.weights_blob in registry.gc(min_age_s=0).removed


def test_s3_gc_race_and_conditional_delete(moto_server, s3_env, open_registry, make_adapter,
                                           monkeypatch):
    bucket = moto_server.new_bucket()
    reg = open_registry(blob_dir=f"s3://{bucket}/lpx", s3_endpoint_url=moto_server.endpoint)
    d, old = _orphan(reg, make_adapter)
    ran = []

    def gc_now() -> None:
        if not ran:
            ran.append(reg.gc(min_age_s=0))
    monkeypatch.setattr(reg, "_on_blobs_written", gc_now)
    v = reg.push(ADMIN, d, "acme/y")
    assert old.weights_blob in ran[0].removed
    assert reg.verify() == [] and reg.load_adapter(v).tensors
    # a refreshed (young) object is not deleted by a gc that asks for age >= 600 s
    assert reg.blobs.delete(v.weights_blob, min_age_s=600) is False
    assert reg.blobs.exists(v.weights_blob)
