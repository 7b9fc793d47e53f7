"""The registry with its blobs in S3: against moto's standalone S3 server on 127.0.0.1.

Write-once content addressing, corruption caught on read, concurrent pushes from several
processes (PostgreSQL metadata + S3 blobs, as replicas share them), an object store that
vanishes in the middle of a push, and verify/gc over S3.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import uuid
from typing import Any

import pytest

from loraplex.errors import DataCorruption, Unavailable
from loraplex.fingerprint import BaseFingerprint
from loraplex.registry import Identity, Registry, RegistrySettings
from loraplex.registry.s3store import S3BlobStore
from tests.registry.s3server import S3_ENV, MotoServer

ADMIN = Identity.system()


def _files(d) -> tuple[bytes, bytes]:
    return (d / "adapter_config.json").read_bytes(), (d / "adapter_model.safetensors").read_bytes()


def _open(moto: MotoServer, tmp_path, bucket: str, **settings: Any) -> Registry:
    settings.setdefault("s3_endpoint_url", moto.endpoint)
    return Registry.open(tmp_path / "reg", blob_dir=f"s3://{bucket}/lpx",
                         settings=RegistrySettings(**settings))


def test_push_load_pull_with_blobs_in_s3(moto_server, s3_env, tmp_path, make_adapter,
                                         micro_fp) -> None:
    bucket = moto_server.new_bucket()
    d = make_adapter(seed=1)
    with _open(moto_server, tmp_path, bucket) as reg:
        assert isinstance(reg.blobs, S3BlobStore)
        v = reg.push(ADMIN, d, "acme/support", base=micro_fp)
        again = reg.push(ADMIN, d, "acme/support", base=micro_fp)
        assert (v.version, again.version, again.created) == (1, 1, False)
        keys = sorted(o["Key"] for o in moto_server.client().list_objects_v2(
            Bucket=bucket)["Contents"])
        hexes = sorted(b.split(":")[1] for b in (v.config_blob, v.weights_blob))
        assert keys == sorted(f"lpx/sha256/{h[:2]}/{h[2:]}" for h in hexes)
        loaded = reg.load_adapter(reg.resolve(ADMIN, "acme/support"))
        assert loaded.config["r"] == 4 and loaded.tensors
        out = reg.pull(ADMIN, "acme/support:v1", tmp_path / "pulled")
        assert (out / "adapter_model.safetensors").read_bytes() == _files(d)[1]


def test_a_blob_is_written_once_and_checked_on_read(moto_server, s3_env, tmp_path,
                                                     make_adapter, micro_fp) -> None:
    bucket = moto_server.new_bucket()
    client = moto_server.client()  # a versioned bucket shows every write, even identical ones
    client.put_bucket_versioning(Bucket=bucket,
                                 VersioningConfiguration={"Status": "Enabled"})
    store = S3BlobStore(f"s3://{bucket}/p", endpoint_url=moto_server.endpoint,
                        refresh_after_s=3600)
    digest = store.put(b"hello")
    key = store.key(digest)
    assert store.put(b"hello") == digest  # idempotent, and not written a second time:
    assert len(client.list_object_versions(Bucket=bucket, Prefix=key)["Versions"]) == 1
    assert store.get(digest) == b"hello" and store.exists(digest)
    client.put_object(Bucket=bucket, Key=key, Body=b"jello")  # a bad write from outside
    with pytest.raises(DataCorruption):
        store.get(digest)
    assert store.delete(digest) and not store.delete(digest) and not store.exists(digest)


def _push_worker(location: str, blob_url: str, endpoint: str, schema: str,
                 files: tuple[bytes, bytes], base: BaseFingerprint, barrier: Any,
                 out: Any) -> None:
    os.environ.update(S3_ENV)
    reg = Registry.open(location, blob_dir=blob_url, settings=RegistrySettings(
        db_schema=schema, s3_endpoint_url=endpoint))
    try:
        barrier.wait(timeout=60)
        v = reg.push_bytes(Identity("acme", subject="worker"), "acme/race", *files, base=base)
        out.put((v.version, v.digest, v.created))
    except BaseException as e:  # report, don't hang the parent
        out.put(("error", repr(e), False))
    finally:
        reg.close()


def test_concurrent_pushes_from_processes_share_postgres_and_s3(
        moto_server, s3_env, pg_url, pg_schema, make_adapter, micro_fp) -> None:
    bucket = moto_server.new_bucket()
    blob_url = f"s3://{bucket}/shared"
    same, other1, other2 = (_files(make_adapter(seed=s)) for s in (1, 2, 3))
    contents = [same, same, other1, other2, same]
    settings = RegistrySettings(db_schema=pg_schema, s3_endpoint_url=moto_server.endpoint)
    Registry.open(pg_url, blob_dir=blob_url, settings=settings).close()
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["loraplex.registry", "loraplex.registry.s3store", "boto3"])
    barrier, out = ctx.Barrier(len(contents)), ctx.Queue()
    procs = [ctx.Process(target=_push_worker, args=(pg_url, blob_url, moto_server.endpoint,
                                                    pg_schema, f, micro_fp, barrier, out))
             for f in contents]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert not [r for r in results if r[0] == "error"], results
    by_digest: dict[str, set[int]] = {}
    for version, digest, _created in results:
        by_digest.setdefault(digest, set()).add(version)
    assert all(len(vs) == 1 for vs in by_digest.values()), "one content, one version"
    assert sorted(v for vs in by_digest.values() for v in vs) == [1, 2, 3]
    assert sum(created for _, _, created in results) == 3
    with Registry.open(pg_url, blob_dir=blob_url, settings=settings) as reg:
        assert reg.verify() == []
        versions = reg.list_versions(ADMIN, "acme/race")
        used = {b for v in versions for b in (v.config_blob, v.weights_blob)}
        assert sorted(d for d, _, _ in reg.blobs.list()) == sorted(used), "no stray objects"
        for v in versions:
            assert reg.load_adapter(v).tensors


def test_store_vanishing_mid_push_is_unavailable_and_leaves_no_version(
        s3_env, tmp_path, make_adapter, micro_fp) -> None:
    server = MotoServer()
    try:
        bucket = server.new_bucket()
        reg = _open(server, tmp_path, bucket, s3_max_attempts=2, s3_connect_timeout_s=1)
        puts: list[str] = []

        def kill_before_second_put(request, **_kw) -> None:
            puts.append(request.url)
            if len(puts) == 2:  # the config blob is stored; the server dies before weights
                server.kill()

        reg.blobs.client.meta.events.register("before-send.s3.PutObject",
                                              kill_before_second_put)
        with pytest.raises(Unavailable) as err:
            reg.push(ADMIN, make_adapter(seed=5), "acme/support", base=micro_fp)
        assert "object store did not answer PutObject" in str(err.value)
        assert len(puts) >= 2, "the first blob was written before the server vanished"
        assert reg.list_adapters(ADMIN) == ([], None)
        assert reg.changes() == []
        with pytest.raises(Unavailable):
            reg.verify()  # the store is still gone: a typed error, not a traceback
        reg.close()
    finally:
        server.kill()


def test_verify_and_gc_over_s3(moto_server, s3_env, tmp_path, make_adapter,
                               micro_fp) -> None:
    bucket = moto_server.new_bucket()
    with _open(moto_server, tmp_path, bucket) as reg:
        v = reg.push(ADMIN, make_adapter(seed=1), "acme/keep", base=micro_fp)
        orphan = reg.blobs.put(b"left behind by a push that never committed " +
                               uuid.uuid4().bytes)
        assert reg.verify() == []
        young = reg.gc()  # default min age: the orphan may belong to a committing push
        assert young.removed == [] and young.kept == 3
        report = reg.gc(min_age_s=0)
        assert report.removed == [orphan] and report.kept == 2
        assert reg.load_adapter(v).tensors
        moto_server.client().delete_object(Bucket=bucket, Key=reg.blobs.key(v.weights_blob))
        problems = reg.verify()
        assert len(problems) == 1 and "missing" in problems[0] and "acme/keep:v1" in problems[0]
