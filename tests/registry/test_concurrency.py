"""Concurrent registration from separate processes, on SQLite and on PostgreSQL.

Workers come from a forkserver that has `loraplex.registry` (no torch) preloaded, so
starting eight costs little; a barrier releases them together so their transactions
really overlap.
"""

from __future__ import annotations

import multiprocessing as mp
from typing import Any

from loraplex.fingerprint import BaseFingerprint
from loraplex.registry import Identity, Registry

WORKERS = 8


def _push_worker(location: str, kwargs: dict[str, Any], files: tuple[bytes, bytes],
                 base: BaseFingerprint, barrier: Any, out: Any) -> None:
    reg = Registry.open(location, **kwargs)
    try:
        barrier.wait(timeout=60)
        v = reg.push_bytes(Identity("acme", subject="worker"), "acme/race", *files, base=base)
        out.put((v.version, v.digest, v.created))
    except BaseException as e:  # report, don't hang the parent
        out.put(("error", repr(e), False))
    finally:
        reg.close()


def _context() -> mp.context.BaseContext:
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["loraplex.registry"])
    return ctx


def _race(db_location, contents: list[tuple[bytes, bytes]], base: BaseFingerprint
          ) -> list[tuple[Any, str, bool]]:
    location, kwargs = db_location
    Registry.open(location, **kwargs).close()  # tables exist before the race starts
    ctx = _context()
    barrier, out = ctx.Barrier(len(contents)), ctx.Queue()
    procs = [ctx.Process(target=_push_worker, args=(location, kwargs, files, base, barrier, out))
             for files in contents]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    errors = [r for r in results if r[0] == "error"]
    assert not errors, errors
    return results


def _files(make_adapter, seed: int) -> tuple[bytes, bytes]:
    d = make_adapter(seed=seed)
    return (d / "adapter_config.json").read_bytes(), (d / "adapter_model.safetensors").read_bytes()


def test_eight_writers_get_eight_consecutive_versions(db_location, make_adapter, micro_fp
                                                      ) -> None:
    contents = [_files(make_adapter, seed) for seed in range(WORKERS)]
    results = _race(db_location, contents, micro_fp)
    assert sorted(r[0] for r in results) == list(range(1, WORKERS + 1))
    assert len({r[1] for r in results}) == WORKERS and all(r[2] for r in results)
    location, kwargs = db_location
    with Registry.open(location, **kwargs) as reg:
        stored = reg.list_versions(Identity.system(), "acme/race")
        assert [v.version for v in stored] == list(range(1, WORKERS + 1))
        assert {v.digest for v in stored} == {r[1] for r in results}
        created = [c for c in reg.changes() if c.kind == "version_created"]
        assert sorted(c.version for c in created) == list(range(1, WORKERS + 1))
        assert reg.verify() == []


def test_identical_pushes_race_to_one_version(db_location, make_adapter, micro_fp) -> None:
    files = _files(make_adapter, 0)
    results = _race(db_location, [files] * 4, micro_fp)
    assert {r[0] for r in results} == {1}
    assert sum(r[2] for r in results) == 1, "exactly one push created the version"


def test_alias_compare_and_set_has_one_winner(registry, make_adapter, micro_base) -> None:
    """Eight callers all create `prod` (expected=None) at once: one wins, seven conflict."""
    from concurrent.futures import ThreadPoolExecutor
    from threading import Barrier

    from loraplex.errors import AliasConflict

    me = Identity.system()
    for seed in range(WORKERS):
        registry.push(me, make_adapter(seed=seed), "acme/race", base=micro_base)
    barrier = Barrier(WORKERS)

    def claim(version: int) -> str:
        barrier.wait(timeout=30)
        try:
            registry.set_alias(me, f"acme/race:v{version}", "prod", expected=None)
            return "won"
        except AliasConflict:
            return "conflict"

    with ThreadPoolExecutor(WORKERS) as pool:
        outcomes = list(pool.map(claim, range(1, WORKERS + 1)))
    assert sorted(outcomes) == ["conflict"] * (WORKERS - 1) + ["won"]
    history = registry.alias_history(me, "acme/race", "prod")
    assert len(history) == 1 and history[0].from_version is None
    assert registry.resolve(me, "acme/race@prod").version == history[0].to_version
