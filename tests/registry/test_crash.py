"""A registration that dies part-way leaves no visible version; gc removes what it left."""

from __future__ import annotations

import multiprocessing as mp
import os
from pathlib import Path
from typing import Any

import pytest

from loraplex.fingerprint import BaseFingerprint
from loraplex.registry import Identity, Registry, changefeed

ADMIN = Identity.system()


def _die_between_blobs_and_commit(location: str, kwargs: dict[str, Any], adapter_dir: str,
                                  base: BaseFingerprint) -> None:
    """Runs in a child process: a real crash (no cleanup, no exception handlers)."""
    Registry._on_blobs_written = lambda self: os._exit(17)  # type: ignore[method-assign]
    reg = Registry.open(location, **kwargs)
    reg.push(ADMIN, adapter_dir, "acme/support", base=base)
    os._exit(0)  # not reached if the fault fired


def test_crash_between_blob_write_and_commit(db_location, make_adapter, micro_fp) -> None:
    location, kwargs = db_location
    d = make_adapter(seed=1)
    ctx = mp.get_context("forkserver")  # a fresh interpreter, not a fork of pytest
    ctx.set_forkserver_preload(["loraplex.registry"])
    proc = ctx.Process(
        target=_die_between_blobs_and_commit, args=(location, kwargs, str(d), micro_fp))
    proc.start()
    proc.join(timeout=120)
    assert proc.exitcode == 17, "the fault must fire after the blobs are written"
    with Registry.open(location, **kwargs) as reg:
        assert reg.list_adapters(ADMIN) == ([], None)
        assert reg.changes() == []
        orphans = sorted(digest for digest, _, _ in reg.blobs.list())
        assert len(orphans) == 2, "both blobs were written before the crash"
        assert reg.verify() == [], "orphans are not corruption"
        report = reg.gc(min_age_s=0)
        assert sorted(report.removed) == orphans
        assert list(reg.blobs.list()) == []
        v = reg.push(ADMIN, d, "acme/support", base=micro_fp)
        assert (v.version, v.created) == (1, True)
        assert reg.load_adapter(v).config["r"] == 4


def test_failure_inside_the_transaction_rolls_everything_back(
        sqlite_reg: Registry, make_adapter, micro_base: Path, monkeypatch) -> None:
    def boom(*_a: object, **_k: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(changefeed, "emit", boom)  # inside the push transaction
    with pytest.raises(RuntimeError, match="disk full"):
        sqlite_reg.push(ADMIN, make_adapter(seed=1), "acme/support", base=micro_base)
    monkeypatch.undo()
    assert sqlite_reg.list_adapters(ADMIN) == ([], None)
    v = sqlite_reg.push(ADMIN, make_adapter(seed=2), "acme/support", base=micro_base)
    assert v.version == 1, "the failed attempt consumed no version number"


def test_stale_temp_files_from_a_crashed_write_are_collected(sqlite_reg: Registry) -> None:
    tmp = sqlite_reg.blobs.root / "sha256" / "ab" / ".tmp-crashed"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_bytes(b"half a blob")
    assert list(sqlite_reg.blobs.list()) == [], "temp files are never listed as blobs"
    sqlite_reg.gc()
    assert tmp.exists(), "a young temp file may belong to a write in progress"
    sqlite_reg.gc(min_age_s=0)
    assert not tmp.exists()
