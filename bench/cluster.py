"""Adapter-affine routing vs round-robin over engine replicas, on one trace.

    python -m bench.cluster                  # 2 real engines, 64 adapters, Zipf trace
    python -m bench.cluster --simulate       # + the same policies on 100 replicas / 10k adapters
    python -m bench.cluster --json

Two engine replicas (tiny base, fp32, CPU, one torch thread each) in this process, each
with `max_slots` device slots and a host cache of `host_adapters` adapters, share one
registry of 64 rank-64 adapters. A trace of requests draws adapters from a Zipf
distribution (seeded); `clients` closed-loop clients replay it through a router:

- round-robin: request i goes to replica i mod R (what a plain Service/L4 balancer does);
- affine: the replicas known to hold the adapter (the router's record of where it sent each
  adapter recently, bounded like Ray Serve's multiplexed model ids per replica) take it,
  least loaded first, unless they are `max_load` busy (1.5x the mean load); otherwise the
  rendezvous-hash
  favourite among the replicas under `max_load`, so an adapter keeps landing on the
  same replica.

Reported per policy, after `warmup` requests have filled the caches: cold loads (adapter
reads from the registry, counted by the engines) per 1,000 requests, generated tokens/s,
TTFT p50/p99, and the ratios. `--simulate` replays
the policies against LRU caches at fleet scale (no model), with the cold-load and request
costs measured in the real run, for the paper model in bench/README.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import statistics
import tempfile
import threading
import time
from collections import OrderedDict, deque
from dataclasses import asdict, dataclass
from pathlib import Path

TARGET_COLD_RATIO = 3.0


# ------------------------------------------------------------------------ the two policies
class RoundRobin:
    name = "round-robin"

    def __init__(self, replicas: int, **_kw) -> None:
        self.replicas, self.i = replicas, 0

    def pick(self, adapter: str, loads: list[int]) -> int:
        self.i += 1
        return (self.i - 1) % self.replicas


class Affine:
    """Holders first, least loaded; else the rendezvous favourite under `max_load`."""

    name = "affine"

    def __init__(self, replicas: int, *, capacity: int, max_load: int) -> None:
        self.replicas, self.capacity, self.max_load = replicas, capacity, max_load
        self.held = [OrderedDict() for _ in range(replicas)]  # LRU of adapters sent there

    def pick(self, adapter: str, loads: list[int]) -> int:
        holders = [r for r in range(self.replicas)
                   if adapter in self.held[r] and loads[r] < self.max_load]
        if holders:
            r = min(holders, key=lambda h: loads[h])
        else:
            free = [r for r in range(self.replicas) if loads[r] < self.max_load]
            r = max(free or range(self.replicas), key=lambda c: _score(adapter, c))
        held = self.held[r]
        held[adapter] = None
        held.move_to_end(adapter)
        while len(held) > self.capacity:
            held.popitem(last=False)
        return r


def _score(adapter: str, replica: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{adapter}|{replica}".encode(), digest_size=8)
                          .digest(), "big")


def zipf_trace(n: int, adapters: int, s: float, seed: int) -> list[int]:
    rng = random.Random(seed)
    weights = [1.0 / (k + 1) ** s for k in range(adapters)]
    return rng.choices(range(adapters), weights=weights, k=n)


# ------------------------------------------------------------------------ the real run
@dataclass
class Load:
    replicas: int = 2
    adapters: int = 64
    requests: int = 512
    warmup: int = 192  # the first requests fill the caches; they are not counted
    clients: int = 8
    zipf_s: float = 1.1
    rank: int = 64
    max_slots: int = 8
    host_adapters: int = 32  # the pair holds all 64; one replica holds half
    max_new_tokens: int = 12
    prompt_len: int = 24
    seed: int = 0


def _adapter_bytes(shapes: dict[str, tuple[int, int]], rank: int, seed: int) -> tuple[bytes, bytes]:
    import torch
    from safetensors.torch import save

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, (fan_in, fan_out) in shapes.items():
        key = f"base_model.model.{module}"
        tensors[f"{key}.lora_A.weight"] = torch.randn(rank, fan_in, generator=g) * 0.05
        tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, rank, generator=g) * 0.05
    cfg = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules":
           "all-linear", "task_type": "CAUSAL_LM", "bias": "none", "use_rslora": False,
           "lora_dropout": 0.0, "fan_in_fan_out": False, "base_model_name_or_path": ""}
    return json.dumps(cfg).encode(), save(tensors)


def _world(root: Path, load: Load):
    from loraplex.basemodel import build_base
    from loraplex.fingerprint import fingerprint_base
    from loraplex.registry import Identity, Registry

    base = build_base(root / "base", size="tiny", seed=0)
    fp = fingerprint_base(base)
    shapes = {m: s for m, s in fp.linear_shapes.items() if not m.endswith("lm_head")}
    reg = Registry.open(root / "registry")
    reg.register_base(Identity.system(), base)
    size = 0
    for i in range(load.adapters):
        cfg, weights = _adapter_bytes(shapes, load.rank, seed=i)
        size = len(weights)
        reg.push_bytes(Identity.system(), f"bench/a{i}", cfg, weights, base=fp)
    return base, reg, size


def _engines(base: Path, reg, load: Load, adapter_size: int):
    from loraplex.runtime.api.observer import EngineObserver
    from loraplex.runtime.engine.engine import Engine, EngineConfig

    class ColdLoads(EngineObserver):
        def __init__(self) -> None:
            self.count, self.seconds = 0, 0.0

        def on_adapter_load(self, tier, seconds) -> None:
            if tier == "registry":
                self.count += 1
                self.seconds += seconds

    out = []
    for _ in range(load.replicas):
        obs = ColdLoads()
        cfg = EngineConfig(base_dir=base, quantization="none", compute_dtype="float32",
                           device="cpu", max_slots=load.max_slots, max_rank=load.rank,
                           max_batch=load.clients, max_seq_len=128,
                           host_cache_bytes=int(adapter_size * load.host_adapters * 1.05))
        out.append((Engine(cfg, reg, obs).start(), obs))
    return out


def run_policy(policy, engines, trace: list[int], load: Load) -> dict:
    from loraplex.registry import Identity
    from loraplex.runtime.engine.engine import SamplingParams

    cold0 = [obs.count for _, obs in engines]
    loads = [0] * len(engines)
    lock = threading.Lock()
    next_i = iter(range(len(trace)))
    ttfts: list[float] = []
    tokens = [0]
    rng = random.Random(load.seed)
    prompts = [[rng.randrange(3, 256) for _ in range(load.prompt_len)] for _ in trace]

    def client() -> None:
        while True:
            with lock:
                i = next(next_i, None)
                if i is None:
                    return
                if i == load.warmup:  # steady state from here on
                    cold0[:] = [obs.count for _, obs in engines]
                    t_start[0] = time.perf_counter()
                r = policy.pick(f"a{trace[i]}", loads)
                loads[r] += 1
            engine = engines[r][0]
            res = engine.submit(engine.admit(
                f"{policy.name}-{i}", Identity("bench"), f"bench/a{trace[i]}",
                prompt_ids=prompts[i],
                sampling=SamplingParams(max_new_tokens=load.max_new_tokens))).wait(600)
            with lock:
                loads[r] -= 1
                if i >= load.warmup:
                    ttfts.append(res.timings.first_token_s)
                    tokens[0] += len(res.token_ids)

    t_start = [time.perf_counter()]
    threads = [threading.Thread(target=client) for _ in range(load.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t_start[0]
    cold = sum(obs.count for _, obs in engines) - sum(cold0)
    measured = len(trace) - load.warmup
    ttfts.sort()
    return {"policy": policy.name, "cold_loads_per_1k": 1000 * cold / measured,
            "tokens_per_s": tokens[0] / wall, "ttft_p50_s": statistics.median(ttfts),
            "ttft_p99_s": ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))],
            "seconds": wall}


def real_run(load: Load) -> dict:
    import torch

    torch.set_num_threads(1)  # one core per replica on a 2-core machine
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp:
        base, reg, size = _world(Path(tmp), load)
        trace = zipf_trace(load.requests, load.adapters, load.zipf_s, load.seed)
        rows = []
        for make in (RoundRobin, Affine):  # fresh replicas per policy: both start cold
            engines = _engines(base, reg, load, size)
            try:
                policy = make(load.replicas, capacity=load.host_adapters,
                              max_load=math.ceil(1.5 * load.clients / load.replicas))
                rows.append(run_policy(policy, engines, trace, load))
            finally:
                for engine, _ in engines:
                    engine.shutdown(0.0)
            loads = [obs for _, obs in engines]
            rows[-1]["cold_load_s_mean"] = (sum(o.seconds for o in loads) /
                                           max(1, sum(o.count for o in loads)))
        reg.close()
    rr, af = rows
    return {"load": asdict(load), "adapter_bytes": size, "rows": rows,
            "cold_ratio": rr["cold_loads_per_1k"] / max(af["cold_loads_per_1k"], 1e-9),
            "tokens_ratio": af["tokens_per_s"] / rr["tokens_per_s"],
            "ttft_p99_ratio": rr["ttft_p99_s"] / af["ttft_p99_s"]}


# ------------------------------------------------------------------------ fleet simulation
def simulate(replicas: int, adapters: int, *, cache: int, requests: int, zipf_s: float,
             concurrency: int, seed: int = 0) -> list[dict]:
    """Each replica: an LRU of `cache` adapters; load = its share of the last
    `replicas * concurrency` arrivals (Little's law at a steady rate). The first half of
    the trace warms the caches; the second half is counted."""
    trace = zipf_trace(requests, adapters, zipf_s, seed)
    out = []
    for make in (RoundRobin, Affine):
        policy = make(replicas, capacity=cache, max_load=math.ceil(1.5 * concurrency))
        caches = [OrderedDict() for _ in range(replicas)]
        loads, window = [0] * replicas, deque()
        cold, served = 0, [0] * replicas
        for i, a in enumerate(trace):
            if i == requests // 2:
                cold, served = 0, [0] * replicas
            key = f"a{a}"
            r = policy.pick(key, loads)
            window.append(r)
            loads[r] += 1
            if len(window) > replicas * concurrency:
                loads[window.popleft()] -= 1
            served[r] += 1
            lru = caches[r]
            if key in lru:
                lru.move_to_end(key)
            else:
                cold += 1
                lru[key] = None
                if len(lru) > cache:
                    lru.popitem(last=False)
        counted = requests - requests // 2
        out.append({"policy": policy.name, "cold_per_1k": 1000 * cold / counted,
                    "busiest_share_x_mean": max(served) * replicas / counted})
    return out


def paper_model(sim: list[dict], cold_s: float, request_s: float) -> list[dict]:
    """Throughput relative to a fleet with no cold loads: each request costs `request_s`,
    plus `cold_s` when its adapter is cold (the busiest replica sets the pace)."""
    rows = []
    for row in sim:
        cost = request_s + row["cold_per_1k"] / 1000 * cold_s
        rows.append({**row, "relative_throughput": request_s / cost
                     / max(1.0, row["busiest_share_x_mean"])})
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=Load.requests)
    p.add_argument("--simulate", action="store_true")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    report = real_run(Load(requests=args.requests))
    if args.simulate:
        rr = report["rows"][0]
        request_s = rr["seconds"] * Load.clients / (Load.requests - Load.warmup) / Load.replicas
        report["simulation"] = {
            f"{c}/replica": paper_model(simulate(100, 10_000, cache=c, requests=200_000,
                                                 zipf_s=Load.zipf_s, concurrency=8),
                                        rr["cold_load_s_mean"], request_s)
            for c in (64, 256)}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        rr = report["rows"][0]
        print(f"{Load.replicas} replicas, {Load.adapters} adapters of "
              f"{report['adapter_bytes'] / 1e6:.1f} MB, Zipf s={Load.zipf_s}, "
              f"{report['load']['requests']} requests ({Load.warmup} warm-up), mean cold load "
              f"{rr['cold_load_s_mean'] * 1000:.0f} ms")
        print(f"{'policy':<12} {'cold/1k':>8} {'tok/s':>8} {'ttft p50':>9} {'ttft p99':>9}")
        for r in report["rows"]:
            print(f"{r['policy']:<12} {r['cold_loads_per_1k']:8.1f} {r['tokens_per_s']:8.1f} "
                  f"{r['ttft_p50_s']:9.3f} {r['ttft_p99_s']:9.3f}")
        print(f"affine vs round-robin: {report['cold_ratio']:.1f}x fewer cold loads (target "
              f">= {TARGET_COLD_RATIO}x), tokens/s x{report['tokens_ratio']:.2f}, TTFT p99 "
              f"round-robin/affine = {report['ttft_p99_ratio']:.2f} (> 1: affine lower)")
        for cache, rows in report.get("simulation", {}).items():
            for r in rows:
                print(f"sim 100 replicas / 10k adapters, cache {cache}: {r['policy']:<12} "
                      f"cold/1k {r['cold_per_1k']:7.1f}  busiest x{r['busiest_share_x_mean']:.2f}"
                      f"  relative throughput {r['relative_throughput']:.2f}")
    return report


if __name__ == "__main__":
    main()
