"""Per-tenant registry quotas, the lineage cap, and what error texts may show a tenant."""

from __future__ import annotations

import logging

import pytest
import sqlalchemy as sa

from loraplex.errors import InvalidArgument, QuotaExceeded
from loraplex.registry import Identity

ADMIN = Identity.system()


def _blob_count(reg) -> int:
    return sum(1 for _ in reg.blobs.list())


def test_version_quota_refuses_before_any_blob_is_written(open_registry, make_adapter):
    if True:
        reg = open_registry(quota_versions=2)
        reg.push(ADMIN, make_adapter(seed=1), "acme/a")
        reg.push(ADMIN, make_adapter(seed=2), "acme/b")
        blobs = _blob_count(reg)
        with pytest.raises(QuotaExceeded) as e:
            reg.push(ADMIN, make_adapter(seed=3), "acme/a")
        assert e.value.code == "RESOURCE_EXHAUSTED" and "2 versions" in str(e.value)
        assert _blob_count(reg) == blobs  # nothing written for the refused push
        reg.push(ADMIN, make_adapter(seed=3), "globex/a")  # another tenant is unaffected
        reg.delete_version(ADMIN, "acme/a:v1")
        assert reg.push(ADMIN, make_adapter(seed=3), "acme/a").version == 2


def test_byte_quota_counts_every_live_version(open_registry, make_adapter):
    size = open_registry("probe").push(ADMIN, make_adapter(seed=1), "acme/a").size_bytes
    if True:
        reg = open_registry("q", quota_bytes=2 * size + size // 2)
        reg.push(ADMIN, make_adapter(seed=1), "acme/a")
        reg.push(ADMIN, make_adapter(seed=2), "acme/a")
        with pytest.raises(QuotaExceeded, match="LORAPLEX_QUOTA_BYTES"):
            reg.push(ADMIN, make_adapter(seed=3), "acme/b")


def test_lineage_is_capped_at_push(open_registry, make_adapter):
    if True:
        reg = open_registry(max_lineage_bytes=1024)
        with pytest.raises(InvalidArgument, match="above the cap of 1024") as e:
            reg.push(ADMIN, make_adapter(), "acme/a", lineage={"notes": "x" * 2000})
        assert e.value.field == "lineage"
        assert reg.push(ADMIN, make_adapter(), "acme/a", lineage={"notes": "x" * 100})
    with pytest.raises(InvalidArgument, match="above the cap of 65536"):
        open_registry("d").push(ADMIN, make_adapter(), "acme/a", lineage={"n": "x" * (64 << 10)})


def test_database_errors_and_logs_hide_bound_parameters(sqlite_reg, caplog):
    secret = "sha256-of-someone-elses-token"
    with caplog.at_level(logging.INFO, logger="sqlalchemy.engine"), \
            pytest.raises(sa.exc.DBAPIError) as e:
        with sqlite_reg.engine.begin() as conn:
            conn.execute(sa.text("SELECT * FROM no_such_table WHERE x = :x"), {"x": secret})
    assert secret not in str(e.value) and secret not in caplog.text
    assert "hidden due to hide_parameters" in str(e.value)


def test_environment_errors_tell_a_tenant_nothing_about_the_deployment(tmp_path):
    import errno
    import os

    from loraplex.registry import faults

    path = tmp_path / "srv" / "blobs"
    for code in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EIO):
        e = faults.os_error(OSError(code, os.strerror(code)), "writing blob into", path)
        assert str(path) in e.message  # the operator's CLI and the server log
        assert str(tmp_path) not in e.public_message
        assert str(os.geteuid()) not in e.public_message.replace("storage", "")
    where = "postgresql+psycopg://lpx@db.internal:5432/prod"
    dropped = sa.exc.OperationalError("SELECT 1", {}, Exception("server closed the connection"))
    e = faults.db_error(dropped, where)
    assert where in e.message and "db.internal" not in e.public_message


def test_s3_errors_do_not_name_the_bucket(moto_server, s3_env):
    from loraplex.errors import NotFound
    from loraplex.registry.s3store import S3BlobStore

    bucket = moto_server.new_bucket()
    store = S3BlobStore(f"s3://{bucket}/lpx", endpoint_url=moto_server.endpoint)
    with pytest.raises(NotFound) as e:
        store.get("sha256:" + "0" * 64)
    assert bucket in e.value.message and bucket not in e.value.public_message
