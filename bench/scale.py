"""A thousand adapters on one engine: Zipf and uniform traffic over all of them.

    python -m bench.scale --quick     # 1,000 adapters, 160 requests per traffic
    python -m bench.scale             # 1,000 adapters, 600 requests per traffic
    python -m bench.scale --json      # the figures as JSON on stdout
    python -m bench.scale --db postgresql+psycopg://127.0.0.1/test   # a PostgreSQL registry

1,000 distinct adapters (ranks 4/8/12/16, four target sets from q+v to all seven
projections, 8 tenants, bf16 tensors) are pushed into a registry on the `bench` base (~100M
params, fp32): SQLite and a local blob directory by default, kept under bench/results/ and
reused by later runs; `--db URL` puts the metadata in that database (a fresh schema-less
run: the adapters are pushed again). Then the engine serves, on a fresh engine each:

- `ref8`:    the same request stream over 8 of the adapters (the reference row);
- `zipf`:    adapters drawn Zipf(alpha) over all 1,000 (rank i has weight 1/i^alpha);
- `uniform`: adapters drawn uniformly over all 1,000.

Each run keeps `--concurrency` requests in flight (closed loop: a request is submitted as
soon as another finishes), prompts of `--prompt` tokens, `--output` greedy tokens each; the
engine has `--slots` device slots and a host tier of `--host-mib` MiB. Figures: generated
tokens/s, TTFT and inter-token latency p50/p99, cold loads (registry -> host) per 1,000
requests, load latency p50/p99 by tier (registry -> host on the loader threads; host ->
slot on the engine thread), the host tier's largest size against its bound (sampled every
5 ms) and the device slot stacks' bytes. Every registry load's thread is recorded: the
engine thread must never run one. Each run starts cold (a fresh engine): its cold loads
include filling the cache. Ratios are against `ref8`, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
import warnings
from collections import defaultdict
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


def build_registry(base_dir: Path, root: Path, n: int, db: str | None):
    """A registry holding adapters 0..n-1 (pushed once, reused while `root` says so);
    returns (registry, versions in index order, seconds spent pushing or None if reused)."""
    from loraplex.registry import Identity, Registry

    root.mkdir(parents=True, exist_ok=True)
    reg = (Registry.open(db, blob_dir=root / "blobs") if db
           else Registry.open(root / "registry"))
    admin = Identity.system()
    fp = reg.register_base(admin, base_dir)
    marker = root / "pushed.json"
    done = json.loads(marker.read_text()).get("n", 0) if marker.is_file() and not db else 0
    t0 = time.perf_counter()
    versions = []
    for i in range(n):
        name, cfg, weights, _ = _adapter(i, fp.linear_shapes) if i >= done else (
            f"t{i % TENANTS}/a{i:04d}", b"", b"", 0)
        if i < done:
            versions.append(reg.resolve(admin, name))
            continue
        versions.append(reg.push_bytes(admin, name, cfg, weights, base=fp))
        if (i + 1) % 100 == 0:
            _say(f"pushed {i + 1}/{n} adapters")
    pushed_s = time.perf_counter() - t0 if done < n else None
    if not db:
        marker.write_text(json.dumps({"n": max(n, done)}))
    return reg, versions, pushed_s


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
    host_max = [0]
    errors: list[str] = []
    stop = threading.Event()

    def monitor() -> None:
        while not stop.is_set():
            host_max[0] = max(host_max[0], engine.stats().host_bytes)
            time.sleep(0.005)

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
    host_max[0] = max(host_max[0], stats.host_bytes)
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
        "resident_bytes": {"host_max": host_max[0], "host_bound": host_cap,
                           "host_within_bound": host_max[0] <= host_cap,
                           "device_slot_stacks": slot_bytes, "slots": args.slots},
        "steps": stats.steps,
    }


def run(args) -> dict:
    from bench.lora_ops import DEFAULT_BASE_DIR, _load_avg, bench_base
    from loraplex.compute import cpu_model

    base_dir = bench_base(DEFAULT_BASE_DIR)
    root = ROOT / "results" / f"scale-registry-{args.adapters}"
    _say(f"registry with {args.adapters} adapters under {root} ...")
    reg, versions, pushed_s = build_registry(base_dir, root, args.adapters, args.db)
    sizes = [v.size_bytes for v in versions]
    ref_ids = list(range(0, 8))  # ranks 4/8/12/16 on two target sets
    streams = {
        "ref8": [ref_ids[i] for i in draw("uniform", 8, args.requests, args.alpha, 11)],
        "zipf": draw("zipf", args.adapters, args.requests, args.alpha, 12),
        "uniform": draw("uniform", args.adapters, args.requests, args.alpha, 13),
    }
    runs = {}
    for kind, picks in streams.items():
        _say(f"{kind}: {len(picks)} requests over {len(set(picks))} distinct adapters ...")
        runs[kind] = serve(base_dir, reg, versions, picks, args)
        _say(f"{kind}: {runs[kind]['tokens_per_s']} tok/s, {runs[kind]['errors']} errors")
    reg.close()
    ref = runs["ref8"]["tokens_per_s"]
    zipf_ratio = runs["zipf"]["tokens_per_s"] / ref
    cold_p99 = runs["zipf"]["load_ms"]["registry_to_host"]["p99"]
    engine_thread_loads = sum(n for run_ in runs.values()
                              for name, n in run_["registry_load_threads"].items()
                              if not name.startswith("loraplex-loader"))
    return {
        "config": {"base": "bench (llama, 8 layers, hidden 1024, ~100M params), fp32",
                   "adapters": args.adapters, "ranks": RANKS, "tenants": TENANTS,
                   "target_sets": [list(t) for t in TARGET_SETS], "adapter_dtype": "bfloat16",
                   "registry": args.db or "sqlite + local blob directory",
                   "adapter_bytes": {"min": min(sizes), "mean": int(statistics.mean(sizes)),
                                     "max": max(sizes), "total": sum(sizes)},
                   "pushed_s": None if pushed_s is None else round(pushed_s, 1),
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
        "targets": {
            "zipf_tokens_vs_ref8": {"value": round(zipf_ratio, 3),
                                    "target": f">= {TARGET_ZIPF_VS_REF}",
                                    "met": zipf_ratio >= TARGET_ZIPF_VS_REF},
            "zipf_cold_load_p99_ms": {"value": cold_p99, "target": f"<= {TARGET_COLD_P99_MS}",
                                      "met": cold_p99 is not None
                                      and cold_p99 <= TARGET_COLD_P99_MS},
            "uniform_errors": {"value": runs["uniform"]["errors"], "target": "== 0",
                               "met": runs["uniform"]["errors"] == 0},
            "host_tier_within_bound": {
                "value": max(r["resident_bytes"]["host_max"] for r in runs.values()),
                "target": f"<= {args.host_mib << 20}",
                "met": all(r["resident_bytes"]["host_within_bound"] for r in runs.values())},
            "registry_loads_on_engine_thread": {"value": engine_thread_loads,
                                                "target": "== 0",
                                                "met": engine_thread_loads == 0},
        },
    }


def render(result: dict) -> str:
    c, m = result["config"], result["machine"]
    ab = c["adapter_bytes"]
    lines = [
        f"bench.scale — {c['adapters']} adapters (ranks {c['ranks']}, {len(c['target_sets'])} "
        f"target sets, {c['tenants']} tenants, {ab['mean'] / 2**20:.2f} MiB mean, "
        f"{ab['total'] / 2**30:.2f} GiB in all) in {c['registry']}; {c['base']}",
        f"engine: {c['slots']} slots, host tier {c['host_mib']} MiB, {c['loader_threads']} "
        f"loader threads; {c['requests']} requests per run, {c['concurrency']} in flight, "
        f"prompt {c['prompt']}, output {c['output']}"
        + ("" if c["pushed_s"] is None else f"; pushed in {c['pushed_s']} s"),
        f"machine: {m['cpu']} ({m['capability']}), {m['cores']} cores, {m['torch_threads']} "
        f"torch threads, torch {m['torch']}, load avg {m['load_avg']}",
        f"command: {result['command']}",
        "",
        f"{'run':>8} {'distinct':>8} {'tok/s':>7} {'x ref8':>7} {'TTFT p50/p99 ms':>17} "
        f"{'ITL p50/p99 ms':>16} {'cold/1k':>8} {'reg->host p50/p99':>18} "
        f"{'host->slot p50/p99':>19} {'host max MiB':>12} {'errors':>6}",
    ]
    ref = result["runs"]["ref8"]["tokens_per_s"]
    for kind, r in result["runs"].items():
        lr, lh = r["load_ms"]["registry_to_host"], r["load_ms"]["host_to_slot"]
        lines.append(
            f"{kind:>8} {r['distinct_adapters']:>8} {r['tokens_per_s']:>7.1f} "
            f"{r['tokens_per_s'] / ref:>6.2f}x {_pair(r['ttft_ms']):>17} {_pair(r['itl_ms']):>16} "
            f"{r['cold_loads_per_1000_requests']:>8.0f} {_pair(lr):>18} {_pair(lh):>19} "
            f"{r['resident_bytes']['host_max'] / 2**20:>12.1f} {r['errors']:>6}")
    slot_mib = result["runs"]["ref8"]["resident_bytes"]["device_slot_stacks"] / 2**20
    lines += ["", f"device slot stacks: {slot_mib:.1f} MiB for {c['slots']} slots "
                  "(pre-allocated, whatever is resident)", ""]
    for key, t in result["targets"].items():
        lines.append(f"target {key:<34} {t['target']:>14}: {t['value']}  "
                     f"{'met' if t['met'] else 'NOT met'}")
    return "\n".join(lines)


def _pair(d: dict) -> str:
    f = lambda x: "-" if x is None else f"{x:.0f}" if x >= 10 else f"{x:.1f}"  # noqa: E731
    return f"{f(d['p50'])}/{f(d['p99'])}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.scale",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="160 requests per run")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    ap.add_argument("--adapters", type=int, default=1000)
    ap.add_argument("--requests", type=int, default=None, help="per run (600, quick 160)")
    ap.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--output", type=int, default=16)
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--host-mib", type=int, default=256, help="host tier bound")
    ap.add_argument("--loader-threads", type=int, default=2)
    ap.add_argument("--alpha", type=float, default=1.0, help="Zipf exponent")
    ap.add_argument("--db", default=None, help="SQLAlchemy URL of the registry database "
                                              "(default: SQLite under bench/results/)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    args.requests = args.requests or (160 if args.quick else 600)
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
