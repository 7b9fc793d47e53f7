"""The registry at scale: resolve and list_adapters over 1,000 adapters, at 1k and 100k versions.

    python -m bench.registry_scale              # 1,000 adapters x 100 versions, SQLite + PostgreSQL
    python -m bench.registry_scale --quick      # the same sizes, fewer timed calls (< 3 min)
    python -m bench.registry_scale --db sqlite  # one backend (sqlite | postgres | both)
    python -m bench.registry_scale --json       # the figures as JSON on stdout too

Each backend starts empty. Adapters get their first version through the real push path
(`Registry.push_bytes`: validation, both blobs, the version row and its change event, one
transaction each) and `prod` set on it through `set_alias`; with `--pushed N` (`--quick`:
100) only the first N do, and `clone` copies their rows for the others (adapter, version,
alias, alias move, change events, under a synthetic digest). That is the 1k-version
registry, measured first. `grow` then writes versions 2..100 of every adapter by
INSERT … SELECT in the database: the rows a push writes (an `lpx_versions` row under the
next number with its own digest, `lpx_adapters.last_version`, one `version_created` row in
`lpx_changes`), reusing v1's blobs. Copied versions resolve and list exactly like pushed
ones; their tensors are not loadable (the digest is synthetic), which neither measured
call touches. PostgreSQL gets `ANALYZE` after the bulk insert, as autovacuum would give it
after that many rows.

Measured at 1k and at 100k versions, over the same 1,000 adapters (10 tenants x 100):
- `resolve` latency p50/p99 over a mix of refs: `t/n` (newest), `t/n:vK`, `t/n@prod`,
  `sha256:…` (each a random adapter and an existing version);
- `list_adapters(page_size=100)` latency of the first page and of the last page
  (page 10, from its token), median and p99 of repeated calls;
- the floor: `SELECT 1` through the same pool and connection setup (`db.statement_read`,
  which resolve uses), i.e. what one database round trip costs on this machine;
- the ratio 100k / 1k of each (keyset paging: ≈ 1), and, as the reference measured in the
  same run, the page query this registry does not use: newest versions by GROUP BY over
  every version (it grows with the total).

Timings are wall-clock per call on the machine printed in the header; other work on the
machine shows up in the p99 columns first.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import torch

from loraplex.compute import cpu_model
from loraplex.registry import Identity, Registry, RegistrySettings, db

ADMIN = Identity.system()
TENANTS = 10
PAGE = 100
PG_URL = os.environ.get("LORAPLEX_BENCH_PG_URL",
                        "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def machine(argv: list[str]) -> dict[str, Any]:
    cpu = cpu_model()
    return {"cpu": cpu, "capability": torch.backends.cpu.get_cpu_capability(),
            "cores": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "sqlite": sqlite3.sqlite_version,
            "command": " ".join(["python -m bench.registry_scale", *argv])}


# ----------------------------------------------------------------------------- building
def _adapter_bytes(shapes: dict[str, tuple[int, int]], base_name: str
                   ) -> Callable[[int], tuple[bytes, bytes]]:
    """make(i) -> (config, safetensors) of a valid rank-4 q/v adapter, distinct per i."""
    from safetensors.torch import save

    g = torch.Generator().manual_seed(0)
    tensors = {}
    for module, (fan_in, fan_out) in shapes.items():
        if module.rsplit(".", 1)[-1] in ("q_proj", "v_proj"):
            key = f"base_model.model.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(4, fan_in, generator=g)
            tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, 4, generator=g)
    config = json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                         "target_modules": ["q_proj", "v_proj"], "bias": "none",
                         "base_model_name_or_path": base_name, "use_rslora": False,
                         "task_type": "CAUSAL_LM", "lora_dropout": 0.0}).encode()
    first = next(iter(tensors))

    def make(i: int) -> tuple[bytes, bytes]:
        tensors[first][0, 0] = float(i)  # one value differs: another digest
        return config, save(tensors)

    return make


def _key(i: int) -> str:
    return f"t{i % TENANTS:02d}/a{i:05d}"


def populate(reg: Registry, base: Path, adapters: int, pushed: int) -> list[str]:
    """`adapters` adapters with one version each and `prod` on it: the first `pushed`
    through `push_bytes` + `set_alias`, the rest as copies of those rows (`clone`)."""
    fp = reg.register_base(ADMIN, base)
    make = _adapter_bytes(fp.linear_shapes, str(base))
    for i in range(pushed):
        config, weights = make(i)
        v = reg.push_bytes(ADMIN, _key(i), config, weights, base=fp)
        reg.set_alias(ADMIN, v.ref, "prod")
    clone(reg, [_key(i) for i in range(pushed, adapters)])
    return [_key(i) for i in range(adapters)]


def clone(reg: Registry, keys: list[str]) -> None:
    """Adapters `keys`, each with a v1 and `prod` on it: the rows push and set_alias write
    (adapter, version, alias, alias move, two change events), copied from the first pushed
    version, under a synthetic digest per adapter."""
    if not keys:
        return
    with db.write_tx(reg.engine) as conn:
        one = dict(conn.execute(sa.select(db.versions).limit(1)).mappings().one())
        at, by = one["created_at"], one["created_by"]
        conn.execute(sa.insert(db.adapters), [
            {"tenant": k.split("/")[0], "name": k.split("/")[1], "last_version": 1,
             "created_at": at} for k in keys])
        ids = dict(conn.execute(sa.select(db.adapters.c.name, db.adapters.c.id)).all())
        versions, aliases, moves, changes = [], [], [], []
        for k in keys:
            tenant, name = k.split("/")
            aid, digest = ids[name], f"sha256:{ids[name]:032x}{1:032x}"
            versions.append(one | {"id": None, "adapter_id": aid, "digest": digest})
            aliases.append({"adapter_id": aid, "alias": "prod", "version": 1,
                            "updated_at": at, "updated_by": by})
            moves.append({"adapter_id": aid, "alias": "prod", "from_version": None,
                          "to_version": 1, "at": at, "by": by})
            changes += [{"kind": "version_created", "tenant": tenant, "name": name,
                         "version": 1, "alias": None, "digest": digest, "at": at},
                        {"kind": "alias_moved", "tenant": tenant, "name": name,
                         "version": 1, "alias": "prod", "digest": digest, "at": at}]
        for v in versions:
            del v["id"]
        for table, rows in ((db.versions, versions), (db.aliases, aliases),
                            (db.alias_moves, moves), (db.changes, changes)):
            conn.execute(sa.insert(table), rows)


def grow(reg: Registry, per_adapter: int) -> None:
    """Versions 2..per_adapter of every adapter, as the rows a push writes (module doc),
    by INSERT … SELECT in the database (one statement per table)."""
    if reg.engine.dialect.name == "postgresql":
        digest = ("'sha256:' || md5(v.adapter_id || ':' || n.k) || md5(n.k || ':' || "
                  "v.adapter_id)")
    else:
        digest = "'sha256:' || printf('%032x%032x', v.adapter_id, n.k)"
    cols = [c for c in db.versions.c.keys() if c not in ("id", "adapter_id", "version",
                                                          "digest")]
    numbers = ("WITH RECURSIVE n(k) AS (SELECT 2 UNION ALL SELECT k + 1 FROM n "
               "WHERE k < :top) ")
    with db.write_tx(reg.engine) as conn:
        conn.execute(sa.text(
            numbers + f"INSERT INTO lpx_versions (adapter_id, version, digest, {', '.join(cols)}) "
            f"SELECT v.adapter_id, n.k, {digest}, {', '.join('v.' + c for c in cols)} "
            "FROM lpx_versions v CROSS JOIN n WHERE v.version = 1"), {"top": per_adapter})
        conn.execute(sa.text(
            "INSERT INTO lpx_changes (kind, tenant, name, version, alias, digest, at) "
            "SELECT 'version_created', a.tenant, a.name, v.version, NULL, v.digest, "
            "v.created_at FROM lpx_versions v JOIN lpx_adapters a ON a.id = v.adapter_id "
            "WHERE v.version > 1 ORDER BY v.adapter_id, v.version"))
        conn.execute(sa.update(db.adapters).values(last_version=per_adapter))
    if reg.engine.dialect.name == "postgresql":
        with reg.engine.connect() as conn:
            conn.execute(sa.text("ANALYZE"))
            conn.commit()


# ----------------------------------------------------------------------------- measuring
def _ms(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    return {"p50": round(1e3 * statistics.median(s), 3),
            "p99": round(1e3 * s[min(len(s) - 1, int(0.99 * len(s)))], 3)}


def _timed(fn: Callable[[], Any], n: int) -> list[float]:
    fn()  # warm: connection, statement cache
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _refs(reg: Registry, keys: list[str], per_adapter: int, n: int,
          rng: random.Random) -> list[str]:
    digests = {k: [v.digest for v in reg.list_versions(ADMIN, k)] for k in rng.sample(keys, 20)}
    refs = []
    for i in range(n):
        key = rng.choice(keys)
        kind = i % 4
        if kind == 0:
            refs.append(key)
        elif kind == 1:
            refs.append(f"{key}:v{rng.randint(1, per_adapter)}")
        elif kind == 2:
            refs.append(f"{key}@prod")
        else:
            refs.append(rng.choice(digests[rng.choice(list(digests))]))
    return refs


def _group_by_page(tenant_name: tuple[str, str] | None) -> sa.Select:
    """The reference: newest version of each adapter by GROUP BY over every version."""
    v, a = db.versions, db.adapters
    newest = (sa.select(v.c.adapter_id, sa.func.max(v.c.version).label("n"))
              .group_by(v.c.adapter_id).subquery())
    q = (sa.select(v, a.c.tenant, a.c.name).select_from(v.join(a))
         .join(newest, sa.and_(v.c.adapter_id == newest.c.adapter_id,
                               v.c.version == newest.c.n)))
    if tenant_name is not None:
        t, n = tenant_name
        q = q.where(sa.or_(a.c.tenant > t, sa.and_(a.c.tenant == t, a.c.name > n)))
    return q.order_by(a.c.tenant, a.c.name).limit(PAGE + 1)


def _select1(reg: Registry) -> None:
    with db.statement_read(reg.engine) as conn:
        conn.execute(sa.text("SELECT 1")).all()


def measure(reg: Registry, keys: list[str], per_adapter: int, calls: int, pages: int
            ) -> dict[str, Any]:
    rng = random.Random(per_adapter)
    refs = iter(_refs(reg, keys, per_adapter, calls + 1, rng))
    resolve = _timed(lambda: reg.resolve(ADMIN, next(refs)), calls)
    floor = _timed(lambda: _select1(reg), calls)
    token, last_key = None, None
    while True:  # walk to the last page, keeping the token that reaches it
        page, nxt = reg.list_adapters(ADMIN, page_size=PAGE, page_token=token)
        if nxt is None:
            break
        token, last_key = nxt, (page[-1].tenant, page[-1].name)
    first = _timed(lambda: reg.list_adapters(ADMIN, page_size=PAGE), pages)
    late = _timed(lambda: reg.list_adapters(ADMIN, page_size=PAGE, page_token=token), pages)
    with reg.engine.connect() as conn:
        ref_first = _timed(lambda: conn.execute(_group_by_page(None)).all(), pages)
        ref_late = _timed(lambda: conn.execute(_group_by_page(last_key)).all(), pages)
        total = conn.execute(sa.select(sa.func.count()).select_from(db.versions)).scalar()
    return {"versions": total, "resolve_ms": _ms(resolve), "select1_ms": _ms(floor), "first_page_ms": _ms(first),
            "late_page_ms": _ms(late), "group_by_first_ms": _ms(ref_first),
            "group_by_late_ms": _ms(ref_late)}


def run_backend(name: str, base: Path, work: Path, a: argparse.Namespace) -> dict[str, Any]:
    schema = None
    if name == "sqlite":
        reg = Registry.open(work / "sqlite-registry")
        where = f"SQLite {sqlite3.sqlite_version} (WAL) on {work}"
    else:
        schema = f"lpx_bench_{uuid.uuid4().hex[:10]}"
        reg = Registry.open(PG_URL, blob_dir=work / "pg-blobs",
                            settings=RegistrySettings(db_schema=schema))
        with reg.engine.connect() as conn:
            version = conn.execute(sa.text("SHOW server_version")).scalar()
        where = f"PostgreSQL {version} at {reg.db_where}"
    try:
        t0 = time.perf_counter()
        keys = populate(reg, base, a.adapters, a.pushed)
        push_s = time.perf_counter() - t0
        small = measure(reg, keys, 1, a.calls, a.pages)
        t0 = time.perf_counter()
        grow(reg, a.versions)
        grow_s = time.perf_counter() - t0
        large = measure(reg, keys, a.versions, a.calls, a.pages)
    finally:
        reg.close()
        if schema is not None:
            eng = sa.create_engine(PG_URL)
            with eng.begin() as conn:
                conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
            eng.dispose()
    ratio = {k: round(large[k]["p50"] / small[k]["p50"], 2)
             for k in ("resolve_ms", "select1_ms", "first_page_ms", "late_page_ms", "group_by_first_ms",
                       "group_by_late_ms")}
    return {"db": where, "adapters": a.adapters, "pushed": a.pushed,
            "populate_s": round(push_s, 1), "grow_s": round(grow_s, 1),
            "small": small, "large": large, "ratio_p50_large_over_small": ratio}


def _pg_reachable() -> str | None:
    try:
        eng = sa.create_engine(PG_URL)
        with eng.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        eng.dispose()
        return None
    except Exception as e:  # noqa: BLE001 - any failure means "no server here"
        return f"{type(e).__name__}: {str(e).splitlines()[0]}"


def report(r: dict[str, Any]) -> str:
    s, g = r["small"], r["large"]
    lines = [f"== {r['db']}",
             f"   {r['adapters']} adapters ({r['pushed']} through push_bytes + set_alias, the "
             f"rest cloned): {r['populate_s']} s; bulk grow to {g['versions']} versions: "
             f"{r['grow_s']} s",
             f"   {'ms (p50 / p99)':<34}{s['versions']:>10} versions{g['versions']:>12} versions"
             f"{'ratio p50':>12}"]
    for k, label in (("resolve_ms", "resolve (mixed refs)"),
                     ("select1_ms", "floor: SELECT 1 round trip"),
                     ("first_page_ms", "list_adapters, first page"),
                     ("late_page_ms", "list_adapters, last page (10th)"),
                     ("group_by_first_ms", "reference GROUP BY, first page"),
                     ("group_by_late_ms", "reference GROUP BY, last page")):
        lines.append(f"   {label:<34}{s[k]['p50']:>8.3f} / {s[k]['p99']:<8.3f}"
                     f"{g[k]['p50']:>10.3f} / {g[k]['p99']:<8.3f}"
                     f"{r['ratio_p50_large_over_small'][k]:>8.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer timed calls, same sizes")
    ap.add_argument("--db", choices=("sqlite", "postgres", "both"), default="both")
    ap.add_argument("--adapters", type=int, default=1000)
    ap.add_argument("--versions", type=int, default=100, help="versions per adapter at the end")
    ap.add_argument("--pushed", type=int, default=None,
                    help="adapters pushed for real (default all; --quick 100), the rest cloned")
    ap.add_argument("--calls", type=int, default=None, help="timed resolve calls per size")
    ap.add_argument("--pages", type=int, default=None, help="timed calls per page kind")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    a.pushed = min(a.adapters, a.pushed if a.pushed is not None else
                   (100 if a.quick else a.adapters))
    a.calls = a.calls or (400 if a.quick else 4000)
    a.pages = a.pages or (20 if a.quick else 200)
    head = machine(argv)
    print(f"machine: {head['cpu']}, cpu capability {head['capability']}, {head['cores']} cores, torch "
          f"{head['torch']}, python {head['python']}\ncommand: {head['command']}", flush=True)
    backends = ["sqlite", "postgres"] if a.db == "both" else [a.db]
    out: dict[str, Any] = {"machine": head, "results": []}
    work = Path(tempfile.mkdtemp(prefix="lpx-registry-scale-"))
    try:
        from loraplex.basemodel import build_base

        base = build_base(work / "base", size="micro", pretrain=None)
        for name in backends:
            if name == "postgres" and (why := _pg_reachable()) is not None:
                print(f"== PostgreSQL at {PG_URL.split('@')[-1]}: not reachable ({why}); "
                      "skipped", flush=True)
                continue
            r = run_backend(name, base, work, a)
            out["results"].append(r)
            print(report(r), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if a.json:
        buf = io.StringIO()
        json.dump(out, buf, indent=2)
        print(buf.getvalue())
    return out


if __name__ == "__main__":
    main()
