"""A thousand adapters on one engine: Zipf and uniform traffic over all of them, from a local
registry and from PostgreSQL + S3.

    python -m bench.scale --quick     # 1,000 adapters, 64 requests per run, both stores
    python -m bench.scale             # 1,000 adapters, 600 requests per run, both stores
    python -m bench.scale --stores local          # SQLite + a local blob directory only
    python -m bench.scale --json      # the figures as JSON on stdout

1,000 distinct adapters (ranks 4/8/12/16, four target sets from q+v to all seven
projections, 8 tenants, bf16 tensors) are registered on the `bench` base (~100M params,
fp32) in each store:

- `local`: SQLite and a local blob directory, kept under bench/results/ and reused by later
  runs (pushed once);
- `pg-s3`: a fresh schema in PostgreSQL (`--pg-url`, default $LORAPLEX_BENCH_PG_URL or the
  local test database) with the blobs in a bucket of a moto S3 server started for the run
  (`python -m moto.server`), pushed through `push_bytes` on `--push-threads` threads each
  run (the push time is a figure too), dropped afterwards. Skipped, with the reason, when
  PostgreSQL does not answer or moto is not installed.

Then the engine serves, on a fresh engine each:

- `ref8`:    the same request stream over 8 of the adapters (the reference row; local store;
             on both stores without `--quick`);
- `zipf`:    adapters drawn Zipf(alpha) over all 1,000 (rank i has weight 1/i^alpha);
- `uniform`: adapters drawn uniformly over all 1,000.

Each run keeps `--concurrency` requests in flight (closed loop: a request is submitted as
soon as another finishes), prompts of `--prompt` tokens, `--output` greedy tokens each; the
engine has `--slots` device slots and a host tier bounded by `--host-mib` MiB. Figures:
generated tokens/s, TTFT and inter-token latency p50/p99, cold loads (registry -> host) per
1,000 requests, load latency p50/p99 by tier (store -> host on the loader threads; host ->
slot on the engine thread), bytes per tier: the host tier's peak of held + in-flight bytes
(the pool's own accounting) against its bound, the most loads ever queued for room, the
adapters' bytes in device slots and the slot stacks' pre-allocated bytes. Every registry
load's thread is recorded: the engine thread must never run one. Each run starts cold (a
fresh engine): its cold loads include filling the cache. Ratios are against `ref8` of the
same store when there is one, else the local store's, measured in the same run. A warm-up
run of the reference stream's first requests comes first and is not reported (the
process's first forwards pay one-time costs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
import warnings
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
TARGET_ZIPF_VS_REF = 0.67
TARGET_COLD_P99_MS = 100.0
RANKS = (4, 8, 12, 16)
TARGET_SETS = (("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "o_proj"),
               ("gate_proj", "up_proj", "down_proj"),
               ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
TENANTS = 8
STORES = ("local", "pg-s3")
PG_URL = os.environ.get("LORAPLEX_BENCH_PG_URL",
                        "postgresql+psycopg://postgres@127.0.0.1:5432/test")
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                  "AWS_DEFAULT_REGION": "us-east-1"}  # moto accepts any


def _say(msg: str) -> None:
    print(f"[bench.scale {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _adapter(i: int, shapes: dict[str, tuple[int, int]]) -> tuple[str, bytes, bytes, int]:
    """Adapter i: (name, config json, safetensors bytes, rank), deterministic in i."""
    from safetensors.torch import save

    rank, targets = RANKS[i % len(RANKS)], TARGET_SETS[(i // len(RANKS)) % len(TARGET_SETS)]
    g = torch.Generator().manual_seed(1000 + i)
    tensors = {}
    for module, (fan_in, fan_out) in shapes.items():
        if module.rsplit(".", 1)[-1] not in targets:
            continue
        key = "base_model.model." + module
        tensors[f"{key}.lora_A.weight"] = (torch.randn(rank, fan_in, generator=g)
                                           / fan_in ** 0.5).to(torch.bfloat16)
        tensors[f"{key}.lora_B.weight"] = (0.01 * torch.randn(fan_out, rank, generator=g)
                                           ).to(torch.bfloat16)
    cfg = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank,
           "target_modules": list(targets), "bias": "none", "task_type": "CAUSAL_LM",
           "lora_dropout": 0.0, "fan_in_fan_out": False, "use_rslora": False}
    name = f"t{i % TENANTS}/a{i:04d}"
    return name, json.dumps(cfg).encode(), save(tensors), rank


def push_all(reg, base_dir: Path, n: int, threads: int, done: int = 0):
    """Register adapters `done`..n-1 (the first `done` are already there); returns (versions
    in index order, seconds spent pushing or None if nothing was pushed)."""
    from loraplex.registry import Identity

    admin = Identity.system()
    fp = reg.register_base(admin, base_dir)

    def one(i: int):
        if i < done:
            return reg.resolve(admin, f"t{i % TENANTS}/a{i:04d}")
        name, cfg, weights, _ = _adapter(i, fp.linear_shapes)
        v = reg.push_bytes(admin, name, cfg, weights, base=fp)
        if (i + 1) % 100 == 0:
            _say(f"pushed {i + 1}/{n} adapters")
        return v

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max(1, threads)) as pool:
        versions = list(pool.map(one, range(n)))
    return versions, (time.perf_counter() - t0 if done < n else None)


@contextmanager
def local_store(base_dir: Path, n: int) -> Iterator[tuple]:
    """SQLite + a local blob directory under bench/results/, pushed once and reused."""
    from loraplex.registry import Registry

    root = ROOT / "results" / f"scale-registry-{n}"
    root.mkdir(parents=True, exist_ok=True)
    marker = root / "pushed.json"
    done = json.loads(marker.read_text()).get("n", 0) if marker.is_file() else 0
    reg = Registry.open(root / "registry")
    try:
        versions, pushed_s = push_all(reg, base_dir, n, threads=1, done=min(done, n))
        marker.write_text(json.dumps({"n": max(n, done)}))
        yield reg, versions, pushed_s, "SQLite + local blob directory"
    finally:
        reg.close()


def pg_s3_unavailable(pg_url: str) -> str | None:
    """Why the pg-s3 store cannot run here, or None."""
    import importlib.util

    import sqlalchemy as sa

    if importlib.util.find_spec("moto") is None or importlib.util.find_spec("boto3") is None:
        return "moto[server] and boto3 are not installed (pip install -e '.[dev]')"
    try:
        eng = sa.create_engine(pg_url)
        with eng.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        eng.dispose()
    except Exception as e:  # noqa: BLE001 - any failure to connect means: skip, say why
        return f"PostgreSQL at {pg_url} does not answer: {type(e).__name__}"
    return None


@contextmanager
def moto_s3() -> Iterator[str]:
    """A moto S3 server on a free local port for the run; its endpoint URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto S3 server did not start") from None
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait(10)


@contextmanager
def pg_s3_store(base_dir: Path, n: int, pg_url: str, threads: int) -> Iterator[tuple]:
    """A fresh PostgreSQL schema + a bucket on moto, pushed now, dropped afterwards."""
    import boto3
    import sqlalchemy as sa

    from loraplex.registry import Registry, RegistrySettings

    for k, v in S3_CREDENTIALS.items():
        os.environ.setdefault(k, v)
    schema = f"lpx_bench_scale_{uuid.uuid4().hex[:8]}"
    with moto_s3() as endpoint:
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="lpx-bench-scale")
        reg = Registry.open(pg_url, blob_dir="s3://lpx-bench-scale/blobs",
                            settings=RegistrySettings(db_schema=schema,
                                                      s3_endpoint_url=endpoint))
        try:
            _say(f"pushing {n} adapters into PostgreSQL + S3 (moto) on {threads} threads ...")
            versions, pushed_s = push_all(reg, base_dir, n, threads=threads)
            yield reg, versions, pushed_s, "PostgreSQL + S3 blob store (moto server)"
        finally:
            reg.close()
            eng = sa.create_engine(pg_url)
            with eng.begin() as conn:
                conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
            eng.dispose()


class Recorder:
    """Engine observer: load latencies by tier, the thread of every registry load, TTFT
    and ITL. Hooks run on the engine and loader threads: appends under one lock."""

    def __init__(self) -> None:
        from loraplex.runtime.api.observer import EngineObserver

        class _Obs(EngineObserver):
            def on_adapter_load(obs, tier, seconds):  # noqa: N805
                with self.lock:
                    self.loads[tier].append(seconds)
                    if tier == "registry":
                        self.load_threads[threading.current_thread().name] += 1

            def on_first_token(obs, ttft_s):  # noqa: N805
                with self.lock:
                    self.ttft.append(ttft_s)

            def on_token(obs, inter_token_s):  # noqa: N805
                with self.lock:
                    self.itl.append(inter_token_s)

            def on_cache(obs, event, tier):  # noqa: N805
                with self.lock:
                    self.cache[f"{tier}_{event}"] += 1

        self.lock = threading.Lock()
        self.loads: dict[str, list[float]] = defaultdict(list)
        self.load_threads: dict[str, int] = defaultdict(int)
        self.ttft: list[float] = []
        self.itl: list[float] = []
        self.cache: dict[str, int] = defaultdict(int)
        self.observer = _Obs()


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def draw(kind: str, n_adapters: int, n_requests: int, alpha: float, seed: int) -> list[int]:
    """Adapter index per request: Zipf(alpha) over a shuffled order of all adapters (so
    popularity is independent of rank and targets), or uniform."""
    g = torch.Generator().manual_seed(seed)
    if kind == "uniform":
        return torch.randint(0, n_adapters, (n_requests,), generator=g).tolist()
    weights = 1.0 / torch.arange(1, n_adapters + 1, dtype=torch.float64) ** alpha
    ranks = torch.multinomial(weights, n_requests, replacement=True, generator=g)
    order = torch.randperm(n_adapters, generator=g)
    return order[ranks].tolist()


def serve(base_dir: Path, reg, versions, picks: list[int], args) -> dict:
    """One cold engine over the request stream `picks` (indices into `versions`)."""
    from loraplex.registry import Identity
    from loraplex.runtime.engine.engine import Engine, EngineConfig, SamplingParams

    rec = Recorder()
    host_cap = args.host_mib << 20
    cfg = EngineConfig(base_dir=base_dir, quantization="none", device="cpu",
                       max_slots=args.slots, max_rank=16, max_batch=args.concurrency,
                       max_waiting=4 * len(picks), host_cache_bytes=host_cap,
                       loader_threads=args.loader_threads, prefill_token_budget=256)
    engine = Engine(cfg, reg, rec.observer).start()
    injection = engine._core.runner.injection  # the bench reads the stacks' sizes
    slot_bytes = sum(t.numel() * t.element_size() for layer in injection.layers.values()
                     for t in (layer.lora_a, layer.lora_b, layer.lora_scale, layer.lora_dora))
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 8000, (args.prompt,), generator=g).tolist() for _ in picks]
    most = {"queued": 0, "device_bytes": 0}
    errors: list[str] = []
    stop = threading.Event()

    def monitor() -> None:  # what the pool's own counters do not keep: maxima over time
        while not stop.is_set():
            st = engine.stats()
            most["queued"] = max(most["queued"], st.loads_queued)
            most["device_bytes"] = max(most["device_bytes"], st.device_bytes)
            time.sleep(0.02)

    next_i = [0]
    lock = threading.Lock()
    tokens = [0]

    def client() -> None:
        while True:
            with lock:
                i = next_i[0]
                next_i[0] += 1
            if i >= len(picks):
                return
            v = versions[picks[i]]
            try:
                req = engine.admit(f"r{i}", Identity(v.tenant), v.ref, prompt_ids=prompts[i],
                                   sampling=SamplingParams(max_new_tokens=args.output))
                res = engine.generate(req, timeout=600)
                with lock:
                    tokens[0] += len(res.token_ids)
            except Exception as e:  # noqa: BLE001 - a bench counts errors, it does not stop
                with lock:
                    errors.append(f"{type(e).__name__}: {str(e)[:200]}")

    mon = threading.Thread(target=monitor, daemon=True)
    mon.start()
    t0 = time.perf_counter()
    clients = [threading.Thread(target=client) for _ in range(args.concurrency)]
    for c in clients:
        c.start()
    for c in clients:
        c.join()
    wall = time.perf_counter() - t0
    stop.set()
    mon.join()
    stats = engine.stats()
    engine.shutdown(5)
    ms = lambda x: None if x is None else round(x * 1e3, 2)  # noqa: E731
    reg_loads, host_loads = rec.loads["registry"], rec.loads["host"]
    return {
        "requests": len(picks), "distinct_adapters": len(set(picks)), "errors": len(errors),
        "error_samples": errors[:3], "wall_s": round(wall, 2),
        "tokens": tokens[0], "tokens_per_s": round(tokens[0] / wall, 2),
        "ttft_ms": {"p50": ms(_pct(rec.ttft, 0.5)), "p99": ms(_pct(rec.ttft, 0.99))},
        "itl_ms": {"p50": ms(_pct(rec.itl, 0.5)), "p99": ms(_pct(rec.itl, 0.99))},
        "cold_loads": len(reg_loads),
        "cold_loads_per_1000_requests": round(1000 * len(reg_loads) / len(picks), 1),
        "load_ms": {"registry_to_host": {"n": len(reg_loads), "p50": ms(_pct(reg_loads, .5)),
                                         "p99": ms(_pct(reg_loads, .99))},
                    "host_to_slot": {"n": len(host_loads), "p50": ms(_pct(host_loads, .5)),
                                     "p99": ms(_pct(host_loads, .99))}},
        "cache": dict(rec.cache),
        "registry_load_threads": dict(rec.load_threads),
        "resident_bytes": {"host_peak": stats.host_peak_bytes, "host_bound": host_cap,
                           "host_within_bound": stats.host_peak_bytes <= host_cap,
                           "host_end": stats.host_bytes, "host_adapters_end": stats.host_adapters,
                           "loads_queued_max": most["queued"],
                           "device_adapters_max": most["device_bytes"],
                           "device_slot_stacks": slot_bytes, "slots": args.slots},
        "steps": stats.steps, "compute_dtype": stats.compute_dtype,
    }


def streams_for(args) -> dict[str, list[int]]:
    """The request streams (adapter index per request), the same for every store."""
    ref_ids = list(range(0, 8))  # ranks 4/8/12/16 on two target sets
    return {
        "ref8": [ref_ids[i] for i in draw("uniform", 8, args.requests, args.alpha, 11)],
        "zipf": draw("zipf", args.adapters, args.requests, args.alpha, 12),
        "uniform": draw("uniform", args.adapters, args.requests, args.alpha, 13),
    }


def open_store(store: str, base_dir: Path, args):
    if store == "local":
        return local_store(base_dir, args.adapters)
    return pg_s3_store(base_dir, args.adapters, args.pg_url, args.push_threads)


def run(args) -> dict:
    from bench.lora_ops import DEFAULT_BASE_DIR, _load_avg, bench_base
    from loraplex.compute import cpu_model

    base_dir = bench_base(DEFAULT_BASE_DIR)
    streams = streams_for(args)
    stores, runs, skipped = {}, {}, {}
    for store in args.stores:
        why = pg_s3_unavailable(args.pg_url) if store == "pg-s3" else None
        if why:
            skipped[store] = why
            _say(f"{store}: skipped: {why}")
            continue
        with open_store(store, base_dir, args) as (reg, versions, pushed_s, label):
            sizes = [v.size_bytes for v in versions]
            stores[store] = {"registry": label,
                             "pushed_s": None if pushed_s is None else round(pushed_s, 1),
                             "adapter_bytes": {"min": min(sizes),
                                               "mean": int(statistics.mean(sizes)),
                                               "max": max(sizes), "total": sum(sizes)}}
            if not runs:  # the process's first forwards pay one-time costs: not in a row
                _say("warm-up: the reference stream's first requests, not measured ...")
                serve(base_dir, reg, versions, streams["ref8"][:args.concurrency], args)
            for kind, picks in streams.items():
                if kind == "ref8" and args.quick and runs:  # quick: one reference row
                    continue
                name = f"{store}/{kind}"
                _say(f"{name}: {len(picks)} requests over {len(set(picks))} adapters ...")
                runs[name] = serve(base_dir, reg, versions, picks, args)
                _say(f"{name}: {runs[name]['tokens_per_s']} tok/s, "
                     f"{runs[name]['errors']} errors")
    return {
        "config": {"base": "bench (llama, 8 layers, hidden 1024, ~100M params)",
                   "compute_dtype": next(iter(runs.values()))["compute_dtype"] if runs else "",
                   "adapters": args.adapters, "ranks": RANKS, "tenants": TENANTS,
                   "target_sets": [list(t) for t in TARGET_SETS], "adapter_dtype": "bfloat16",
                   "stores": stores, "skipped": skipped,
                   "requests": args.requests, "concurrency": args.concurrency,
                   "prompt": args.prompt, "output": args.output, "slots": args.slots,
                   "host_mib": args.host_mib, "loader_threads": args.loader_threads,
                   "zipf_alpha": args.alpha, "quick": args.quick},
        "machine": {"platform": platform.platform(), "cpu": cpu_model(),
                    "capability": torch.backends.cpu.get_cpu_capability(),
                    "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__, "load_avg": _load_avg()},
        "command": "python -m bench.scale " + " ".join(sys.argv[1:]),
        "runs": runs,
        "targets": targets(runs, args.host_mib << 20),
    }


def ref_of(runs: dict, name: str) -> float | None:
    """tokens/s of the reference row for run `name`: its own store's ref8, else the first."""
    store = name.split("/")[0]
    ref = runs.get(f"{store}/ref8") or next((r for n, r in runs.items()
                                             if n.endswith("/ref8")), None)
    return ref["tokens_per_s"] if ref else None


def targets(runs: dict, host_cap: int) -> dict:
    out: dict[str, dict] = {}
    for name, r in runs.items():
        store, kind = name.split("/")
        ref = ref_of(runs, name)
        if kind == "zipf" and ref:
            ratio = r["tokens_per_s"] / ref
            out[f"{store}_zipf_tokens_vs_ref8"] = {
                "value": round(ratio, 3), "target": f">= {TARGET_ZIPF_VS_REF}",
                "met": ratio >= TARGET_ZIPF_VS_REF}
            p99 = r["load_ms"]["registry_to_host"]["p99"]
            out[f"{store}_zipf_cold_load_p99_ms"] = {
                "value": p99, "target": f"<= {TARGET_COLD_P99_MS}",
                "met": p99 is not None and p99 <= TARGET_COLD_P99_MS}
        if kind == "uniform":
            out[f"{store}_uniform_errors"] = {"value": r["errors"], "target": "== 0",
                                              "met": r["errors"] == 0}
    peaks = [r["resident_bytes"]["host_peak"] for r in runs.values()]
    out["host_tier_within_bound"] = {"value": max(peaks, default=0), "target": f"<= {host_cap}",
                                     "met": all(p <= host_cap for p in peaks)}
    engine_thread = sum(n for r in runs.values() for t, n in r["registry_load_threads"].items()
                        if not t.startswith("loraplex-loader"))
    out["registry_loads_on_engine_thread"] = {"value": engine_thread, "target": "== 0",
                                              "met": engine_thread == 0}
    return out


def render(result: dict) -> str:
    c, m = result["config"], result["machine"]
    lines = [
        f"bench.scale — {c['adapters']} adapters (ranks {c['ranks']}, {len(c['target_sets'])} "
        f"target sets, {c['tenants']} tenants, bf16); {c['base']}, {c['compute_dtype']}",
    ]
    for store, st in c["stores"].items():
        ab = st["adapter_bytes"]
        lines.append(f"store {store}: {st['registry']}, {ab['mean'] / 2**20:.2f} MiB mean, "
                     f"{ab['total'] / 2**30:.2f} GiB in all"
                     + ("" if st["pushed_s"] is None else f", pushed in {st['pushed_s']} s"))
    for store, why in c["skipped"].items():
        lines.append(f"store {store}: skipped: {why}")
    lines += [
        f"engine: {c['slots']} slots, host tier {c['host_mib']} MiB, {c['loader_threads']} "
        f"loader threads; {c['requests']} requests per run, {c['concurrency']} in flight, "
        f"prompt {c['prompt']}, output {c['output']}",
        f"machine: {m['cpu']} ({m['capability']}), {m['cores']} cores, {m['torch_threads']} "
        f"torch threads, torch {m['torch']}, load avg {m['load_avg']}",
        f"command: {result['command']}",
        "",
        f"{'run':>14} {'distinct':>8} {'tok/s':>7} {'x ref8':>7} {'TTFT p50/p99 ms':>17} "
        f"{'ITL p50/p99 ms':>16} {'cold/1k':>8} {'store->host p50/p99':>19} "
        f"{'host->slot p50/p99':>19} {'host peak MiB':>13} {'queued':>6} {'errors':>6}",
    ]
    for name, r in result["runs"].items():
        lr, lh = r["load_ms"]["registry_to_host"], r["load_ms"]["host_to_slot"]
        ref = ref_of(result["runs"], name)
        rb = r["resident_bytes"]
        lines.append(
            f"{name:>14} {r['distinct_adapters']:>8} {r['tokens_per_s']:>7.1f} "
            + (f"{r['tokens_per_s'] / ref:>6.2f}x " if ref else f"{'-':>7} ")
            + f"{_pair(r['ttft_ms']):>17} {_pair(r['itl_ms']):>16} "
            f"{r['cold_loads_per_1000_requests']:>8.0f} {_pair(lr):>19} {_pair(lh):>19} "
            f"{rb['host_peak'] / 2**20:>13.1f} {rb['loads_queued_max']:>6} {r['errors']:>6}")
    if result["runs"]:
        rb = next(iter(result["runs"].values()))["resident_bytes"]
        dev = max(r["resident_bytes"]["device_adapters_max"] for r in result["runs"].values())
        lines += ["", f"bytes per tier: device slot stacks {rb['device_slot_stacks'] / 2**20:.1f} "
                      f"MiB for {c['slots']} slots (pre-allocated), adapters in slots at most "
                      f"{dev / 2**20:.1f} MiB; host tier bound {c['host_mib']} MiB (peak "
                      "= held + loads in flight, the pool's own accounting)"]
    lines.append("")
    for key, t in result["targets"].items():
        lines.append(f"target {key:<34} {t['target']:>14}: {t['value']}  "
                     f"{'met' if t['met'] else 'NOT met'}")
    return "\n".join(lines)


def _pair(d: dict) -> str:
    f = lambda x: "-" if x is None else f"{x:.0f}" if x >= 10 else f"{x:.1f}"  # noqa: E731
    return f"{f(d['p50'])}/{f(d['p99'])}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.scale",
                                 description="A thousand adapters on one engine.")
    ap.add_argument("--quick", action="store_true",
                    help="64 requests per run, one reference row (< 15 min on 2 cores)")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    ap.add_argument("--adapters", type=int, default=1000)
    ap.add_argument("--requests", type=int, default=None, help="per run (600, quick 64)")
    ap.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--output", type=int, default=16)
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--host-mib", type=int, default=256, help="host tier bound")
    ap.add_argument("--loader-threads", type=int, default=2)
    ap.add_argument("--alpha", type=float, default=1.0, help="Zipf exponent")
    ap.add_argument("--stores", default=",".join(STORES),
                    help="comma-separated: local (SQLite + blob dir), pg-s3 (PostgreSQL + S3 "
                         "on moto)")
    ap.add_argument("--pg-url", default=PG_URL, help="PostgreSQL for the pg-s3 store")
    ap.add_argument("--push-threads", type=int, default=4,
                    help="threads pushing into the pg-s3 store")
    ap.add_argument("--threads", type=int, default=None, help="torch threads")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    args.requests = args.requests or (64 if args.quick else 600)
    args.stores = [x for x in args.stores.split(",") if x]
    bad = [x for x in args.stores if x not in STORES]
    if bad:
        ap.error(f"unknown store(s) {bad}: choose from {', '.join(STORES)}")
    warnings.filterwarnings("ignore", category=FutureWarning)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2) if args.json else render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
