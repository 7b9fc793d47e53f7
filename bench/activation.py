"""Adapter activation: host→slot copy, registry→slot cold load, and what cold loads cost the
sequences that are decoding meanwhile.

    python -m bench.activation            # 16 adapters, 20 s decode windows
    python -m bench.activation --quick    # 8 adapters, 8 s windows
    python -m bench.activation --json     # the figures as JSON on stdout

On the `bench` base (~100M params, fp32) with rank-16 adapters on all seven projections in
a real registry, an engine with 4 adapter slots:
1. host→slot: an adapter already in host memory is copied into a slot (evicting the least
   recently used one): the pool's `on_adapter_load("host", s)` timings, p50/p99.
2. registry→slot: `unload` then `prefetch` (registry read, digest check, tensor checks, slot
   copy), wall time p50/p99; plus the registry→host part alone.
3. decode inter-token time p99 of 8 running sequences while a background client cold-loads
   one adapter after another (unload + prefetch, in a loop), divided by the same p99 over an
   equally long window without loads, in the same run. Target: <= 1.5x.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import torch

from bench.engine import bench_base_dir, machine, make_registry, start_engine
from loraplex.runtime.api.observer import EngineObserver

TARGET_RATIO = 1.5


class Timings(EngineObserver):
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.loads: dict[str, list[float]] = {"host": [], "registry": []}
        self.tokens: list[tuple[float, float]] = []  # (when, inter-token seconds)

    def on_adapter_load(self, tier, seconds):
        with self.lock:
            self.loads[tier].append(seconds)

    def on_token(self, inter_token_s):
        with self.lock:
            self.tokens.append((time.monotonic(), inter_token_s))


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


def ms(x: float) -> float:
    return round(x * 1000, 2)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--adapters", type=int, default=None)
    ap.add_argument("--window", type=float, default=None, help="seconds per decode window")
    ap.add_argument("--running", type=int, default=8, help="sequences decoding meanwhile")
    args = ap.parse_args(argv)
    n_ad = args.adapters or (8 if args.quick else 16)
    window = args.window or (8.0 if args.quick else 20.0)
    warnings.filterwarnings("ignore")

    from loraplex.registry import Identity
    from loraplex.runtime.engine.engine import SamplingParams

    me = Identity("bench")
    base_dir = bench_base_dir()
    obs = Timings()
    with tempfile.TemporaryDirectory(prefix="loraplex-bench-activation-") as tmp:
        registry, peft_model, names = make_registry(base_dir, Path(tmp), n_ad)
        del peft_model
        engine = start_engine(base_dir, registry, max_slots=4, max_batch=args.running,
                              max_seq_len=1024, observer=obs, host_cache_bytes=8 << 30)
        try:
            # 1. host→slot: everything on host, then cycle through more adapters than slots
            for name in names:
                engine.prefetch(me, f"bench/{name}")
            obs.loads["host"].clear()
            for _ in range(3):
                for name in names:
                    engine.prefetch(me, f"bench/{name}")
            host_copy = list(obs.loads["host"])

            # 2. registry→slot, cold
            obs.loads["registry"].clear()
            cold = []
            for name in names:
                engine.unload(me, f"bench/{name}")
                t0 = time.perf_counter()
                engine.prefetch(me, f"bench/{name}")
                cold.append(time.perf_counter() - t0)
            reg_to_host = list(obs.loads["registry"])

            # 3. decode while cold-loading: running sequences on 2 pinned adapters,
            #    background loads cycle through the others (2 free slots).
            running_on = names[:2]
            for name in running_on:
                engine.pin(me, f"bench/{name}")
            g = torch.Generator().manual_seed(0)
            streams = [engine.submit(engine.admit(
                f"run{i}", me, f"bench/{running_on[i % 2]}",
                prompt_ids=torch.randint(0, 256, (32,), generator=g).tolist(),
                sampling=SamplingParams(max_new_tokens=900)))
                for i in range(args.running)]
            it = iter(streams[0])
            for _ in range(3):
                next(it)  # all are decoding now
            t_quiet = time.monotonic()
            time.sleep(window)
            t_loads = time.monotonic()
            stop = threading.Event()
            n_cold = [0]

            def churn():
                others = names[2:]
                i = 0
                while not stop.is_set():
                    ref = f"bench/{others[i % len(others)]}"
                    engine.unload(me, ref)
                    engine.prefetch(me, ref)
                    n_cold[0] += 1
                    i += 1

            th = threading.Thread(target=churn, daemon=True)
            th.start()
            time.sleep(window)
            stop.set()
            th.join()
            t_end = time.monotonic()
            for s in streams:
                s.cancel()
            for s in streams:
                s.wait(60)
        finally:
            engine.shutdown()

    with obs.lock:
        quiet = [d for t, d in obs.tokens if t_quiet <= t < t_loads]
        loaded = [d for t, d in obs.tokens if t_loads <= t < t_end]
    ratio = pct(loaded, 99) / pct(quiet, 99)
    figures = {
        "bench": "activation", "quick": args.quick, "adapters": n_ad, "rank": 16,
        "slots": 4, "running": args.running, "window_s": window,
        "host_to_slot_ms": {"p50": ms(pct(host_copy, 50)), "p99": ms(pct(host_copy, 99)),
                            "n": len(host_copy)},
        "registry_to_slot_ms": {"p50": ms(pct(cold, 50)), "p99": ms(pct(cold, 99)),
                                "n": len(cold)},
        "registry_to_host_ms": {"p50": ms(pct(reg_to_host, 50)),
                                "p99": ms(pct(reg_to_host, 99)), "n": len(reg_to_host)},
        "inter_token_ms_without_loads": {"p50": ms(pct(quiet, 50)), "p99": ms(pct(quiet, 99)),
                                         "n": len(quiet)},
        "inter_token_ms_with_loads": {"p50": ms(pct(loaded, 50)), "p99": ms(pct(loaded, 99)),
                                      "n": len(loaded)},
        "cold_loads_during_window": n_cold[0],
        "p99_ratio": round(ratio, 3), "target_ratio": TARGET_RATIO,
        "met": ratio <= TARGET_RATIO,
        "mean_inter_token_ratio": round(statistics.fmean(loaded) / statistics.fmean(quiet), 3)
        if quiet and loaded else None,
        "machine": machine(),
    }
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        f = figures
        print(f"adapter activation, bench base fp32, {n_ad} rank-16 adapters, 4 slots")
        print(f"  host→slot copy:      p50 {f['host_to_slot_ms']['p50']:8.2f} ms   "
              f"p99 {f['host_to_slot_ms']['p99']:8.2f} ms  (n={len(host_copy)})")
        print(f"  registry→slot cold:  p50 {f['registry_to_slot_ms']['p50']:8.2f} ms   "
              f"p99 {f['registry_to_slot_ms']['p99']:8.2f} ms  (n={len(cold)})")
        print(f"    of which registry→host (loader thread): p50 "
              f"{f['registry_to_host_ms']['p50']:.2f} ms")
        print(f"  decode inter-token p99, {args.running} running: "
              f"{f['inter_token_ms_without_loads']['p99']:.1f} ms without loads, "
              f"{f['inter_token_ms_with_loads']['p99']:.1f} ms with {n_cold[0]} cold loads")
        verdict = "met" if f["met"] else "NOT met"
        print(f"  ratio: {f['p99_ratio']:.2f}x (target <= {TARGET_RATIO}x: {verdict})")
    return figures


if __name__ == "__main__":
    main()
    sys.exit(0)
