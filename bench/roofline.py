"""The machine's limits beside SmolLM2's decode step: how much of the peak the step reaches.

    make bench BENCH=roofline ARGS=--quick   # fewer repeats, c=16 and 32, 48-token outputs
    .venv/bin/python -m bench.roofline --json
    .venv/bin/python -m bench.roofline --in-process --threads 1   # the step inside one process

1. Peak matmul GFLOP/s, fp32 and bf16, on all cores and on one (torch threads = cores, then
   1): `torch.mm` on SmolLM2-135M's shapes (hidden 576, intermediate 1536, 9 query / 3 KV
   heads of 64, vocab 49152) at 16, 32 and 512 rows, and one 1024³ square, each through
   `torch.mm` (the BLAS) and through oneDNN on the weight packed once (what
   `EngineConfig.base_gemm` "packed" runs); each figure is the fastest of `--repeats`
   samples of ~2 ms (on a shared machine a preempted sample is only ever slower). "Peak" is
   the best shape and kernel.
2. Memory bandwidth: `dst.copy_(src)` on 8 MiB chunks taken in turn from a 512 MiB buffer
   (from memory, not cache), read + write bytes ÷ the fastest chunk's time; and the read
   bandwidth a decode step lives on: a full streaming read (`sum`) of a 512 MiB buffer.
   Beside them, the step's base matmuls alone (`weight_stream`): SmolLM2's 210 projections
   and its LM head, each weight its own tensor, at 16 and 32 rows, with nothing else,
   through each kernel.
3. SmolLM2's decode step, timed from outside: `loraplex serve` (fp32 base, compute float32,
   the bench.peer adapters: 8 adapters, r8/r16 on every linear layer) under C concurrent
   streamed completions spread round-robin over the adapters, C = 16 and 32. One decode
   step gives every running row one token, so the step time is a stream's inter-token gap;
   achieved GFLOP/s = C × FLOP per token ÷ TPOT p50 (a request's time per output token
   after the first: (last − first token time) ÷ (tokens − 1); the median request's). FLOP per token counts the 7 projections
   of 30 layers and the tied LM head (2 × 134.5 M = 0.269 GFLOP), attention over the mean
   context, and the LoRA pair of every projection at the adapters' mean rank. A step that
   also runs a prefill is longer, so the figure is the decode step as the clients live it,
   prefill interleaving included. Beside it, GFLOP per CPU-second of the server's process
   tree (decode FLOP ÷ the CPU time the server used; on a shared machine this leaves out
   the time the server waited for a core) against one core's fp32 peak.
   With `--in-process`, the step is timed inside one process instead (`bench.decode_step`
   in a process of its own: an `Engine` without server or HTTP, fp32 and nf4, wall and CPU
   time per step), against the same peaks.
4. The memory roof of each fp32 step (the roofline model): a decode step must read every
   base weight once, the LoRA pairs of the adapters in its batch and its rows' keys and
   values (`step_bytes`); at the measured read bandwidth that takes a time no step can beat,
   so the step's FLOP over it bound the GFLOP/s it can reach, below the matmul peak when the
   step is memory-bound. Each cell prints that roof, its share of the peak and the share of
   the roof the step reaches.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import subprocess
import sys
import time

import torch

from bench import peer
from loraplex.runtime.model import packed

HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 576, 1536, 30, 9, 3, 64, 49152
# (in, out) of each linear layer of one decoder layer
PROJ = {"q": (HIDDEN, HEADS * HEAD_DIM), "k": (HIDDEN, KV_HEADS * HEAD_DIM),
        "v": (HIDDEN, KV_HEADS * HEAD_DIM), "o": (HEADS * HEAD_DIM, HIDDEN),
        "gate": (HIDDEN, INTER), "up": (HIDDEN, INTER), "down": (INTER, HIDDEN)}


# weights a token multiplies by: 30 layers' projections and the tied LM head
BASE_WEIGHTS = LAYERS * sum(i * o for i, o in PROJ.values()) + HIDDEN * VOCAB


def flop_per_token(context: float, rank: float) -> dict[str, float]:
    """FLOP of one decode token of SmolLM2-135M: base projections + LM head, attention over
    `context` positions, LoRA at mean `rank` on every projection."""
    base = 2 * BASE_WEIGHTS
    attn = LAYERS * 2 * 2 * context * HEADS * HEAD_DIM  # q·k and p·v over the context
    lora = LAYERS * 2 * rank * sum(i + o for i, o in PROJ.values())
    return {"base": base, "attention": attn, "lora": lora, "total": base + attn + lora}


def step_bytes(rows: int, context: float, rank: float, adapters: int,
               weight_bytes: float = 4.0) -> dict[str, float]:
    """Bytes one decode step of `rows` rows must bring from memory, at the least: every base
    weight once (`weight_bytes` each; the LM head is the tied embedding), the fp32 LoRA pair
    of every projection for each distinct adapter in the batch (`min(rows, adapters)` of
    them, at mean `rank`: CPU stacks are fp32), and every row's keys and values over
    `context` positions (fp32)."""
    base = weight_bytes * BASE_WEIGHTS
    lora = 4 * min(rows, adapters) * LAYERS * rank * sum(i + o for i, o in PROJ.values())
    kv = 4 * rows * context * LAYERS * 2 * KV_HEADS * HEAD_DIM
    return {"base": base, "lora": lora, "kv": kv, "total": base + lora + kv}


def memory_roof(flop: float, nbytes: float, read_gb_s: float, peak_gflop_s: float) -> float:
    """GFLOP/s a step of `flop` that reads `nbytes` can reach at most: the lower of the
    matmul peak and its FLOP over the time reading those bytes takes (the roofline model)."""
    return min(peak_gflop_s, flop / (nbytes / (read_gb_s * 1e9)) / 1e9)


def read_bandwidth(threads: int, repeats: int) -> float:
    """GB/s of a full read of a 512 MiB fp32 buffer (`sum`: a streaming read, nothing
    written back), the fastest of `repeats` passes: what a decode step does to its
    weights, which no cache holds."""
    torch.set_num_threads(threads)
    src = torch.ones(128 << 20)  # [128 Mi] fp32: 512 MiB
    best = float("inf")
    for _ in range(max(3, repeats // 8)):
        t0 = time.perf_counter()
        src.sum()
        best = min(best, time.perf_counter() - t0)
    return src.numel() * 4 / best / 1e9


def weight_stream(rows: int, threads: int, repeats: int, kernel: str = "plain") -> dict:
    """The decode step's base matmuls alone: SmolLM2's 210 projections and the LM head, each
    weight its own fp32 tensor (so each is read from memory, as in a step), over `rows` rows
    of activations; the fastest of a few passes. What any decode step of these matmuls can
    reach here, with nothing else in it. `kernel`: "plain" (`F.linear`, the BLAS) or
    "packed" (oneDNN on weights packed once, as `EngineConfig.base_gemm` runs them)."""
    torch.set_num_threads(threads)
    weights = [torch.randn(o, i) for _ in range(LAYERS) for i, o in PROJ.values()]  # [out, in]
    weights.append(torch.randn(VOCAB, HIDDEN))  # the head [V, hidden]
    xs = {HIDDEN: torch.randn(rows, HIDDEN), INTER: torch.randn(rows, INTER)}  # [rows, in]
    if kernel == "packed":
        calls = [(xs[w.shape[1]], packed.pack_weight(w, rows)) for w in weights]
        weights = []  # the dense copies go: the packed ones are what is read

        def chain() -> None:
            for x, p in calls:
                packed.packed_linear(x, p, None)
    else:
        def chain() -> None:
            for w in weights:
                torch.nn.functional.linear(xs[w.shape[1]], w)

    chain()
    best = float("inf")
    for _ in range(max(3, repeats // 8)):
        t0 = time.perf_counter()
        chain()
        best = min(best, time.perf_counter() - t0)
    flop = rows * 2 * BASE_WEIGHTS
    return {"rows": rows, "threads": threads, "kernel": kernel, "ms": round(best * 1e3, 1),
            "gflop_s": round(flop / best / 1e9, 1)}


def time_best(fn, repeats: int, target_s: float = 2e-3) -> float:
    """Seconds per call: the fastest of `repeats` samples of ~`target_s` each. Short samples
    and the minimum keep a shared machine's preemptions out of a peak (a sample that was
    preempted is slower, never faster)."""
    fn()
    t0 = time.perf_counter()
    fn()
    inner = max(1, int(target_s / max(time.perf_counter() - t0, 1e-7)))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - t0) / inner)
    return best


def matmul_table(threads: int, repeats: int) -> list[dict]:
    """Each shape in each dtype through both kernels a base layer may run on: `torch.mm`
    (the BLAS) and oneDNN on the weight packed once (`runtime/model/packed.py`)."""
    torch.set_num_threads(threads)
    shapes = [(m, HIDDEN, INTER) for m in (16, 32, 512)] + \
             [(m, INTER, HIDDEN) for m in (16, 32, 512)] + \
             [(m, HIDDEN, HIDDEN) for m in (16, 32)] + [(32, HIDDEN, VOCAB), (1024, 1024, 1024)]
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        for m, k, n in shapes:
            a = torch.randn(m, k).to(dtype)  # [M, K]
            b = torch.randn(k, n).to(dtype)  # [K, N]
            c = torch.empty(m, n, dtype=dtype)  # [M, N]
            kernels = {"mm": lambda a=a, b=b, c=c: torch.mm(a, b, out=c)}
            if packed.unpackable(str(dtype).split(".")[1]) is None:
                w = packed.pack_weight(b.t(), m)  # [N, K] packed
                kernels["onednn_packed"] = lambda a=a, w=w: packed.packed_linear(a, w, None)
            flop = 2 * m * k * n
            for kernel, fn in kernels.items():
                s = time_best(fn, repeats)
                out.append({"dtype": str(dtype).split(".")[1], "threads": threads,
                            "kernel": kernel, "m": m, "k": k, "n": n, "us": round(s * 1e6, 1),
                            "gflop_s": round(flop / s / 1e9, 1)})
    return out


def bandwidth(threads: int, repeats: int) -> float:
    """GB/s of `dst.copy_(src)` (read + write bytes) on 8 MiB chunks taken in turn from a
    512 MiB buffer, so each chunk comes from memory, not cache; the fastest chunk."""
    torch.set_num_threads(threads)
    chunk = 2 << 20  # fp32 elements: 8 MiB
    src = torch.ones(64 * chunk)  # [128 Mi] fp32: 512 MiB
    dst = torch.empty_like(src)
    best = float("inf")
    for i in range(max(repeats, 64)):
        lo = (i % 64) * chunk
        t0 = time.perf_counter()
        dst[lo:lo + chunk].copy_(src[lo:lo + chunk])
        best = min(best, time.perf_counter() - t0)
    return 2 * chunk * 4 / best / 1e9


def decode_step(plan: peer.Plan, concurrency: tuple[int, ...], max_tokens: int,
                say) -> list[dict]:
    base = peer.base_dir(say)
    adapters = peer.adapter_dirs(base, plan.adapters, say)
    registry = peer.registry_dir(base, adapters, say)
    ranks = [int(d.name.split("-r")[1]) for d in adapters.values()]
    rank = sum(ranks) / len(ranks)
    srv = peer.loraplex_server("loraplex-fp32", plan, base, registry, adapters, None)
    out = []
    try:
        srv.start(plan.ready_timeout_s)
        asyncio.run(peer.run_cell(srv, plan, "completions-rr", len(adapters), len(adapters), 4))
        for c in concurrency:
            cell = asyncio.run(peer.run_cell(srv, plan, "completions-rr", c, 2 * c,
                                             max_tokens)).summary()
            # prompts are ~20 tokens; a row's context runs from there to prompt + max_tokens
            flop = flop_per_token(context=20 + cell["mean_output_tokens"] / 2, rank=rank)
            step_s = cell["tpot_p50_ms"] / 1e3
            out.append({**cell, "rows": c, "mean_rank": rank,
                        "gflop_per_token": round(flop["total"] / 1e9, 4),
                        "flop_split": {k: round(v / 1e9, 4) for k, v in flop.items()},
                        "achieved_gflop_s": round(c * flop["total"] / step_s / 1e9, 1),
                        **per_cpu_second(cell, flop)})
            say(f"decode c={c}: TPOT p50 {cell['tpot_p50_ms']} ms -> "
                f"{out[-1]['achieved_gflop_s']} GFLOP/s")
    finally:
        srv.stop()
    return out


def decode_from_peer(path: str, adapters: int) -> list[dict]:
    """The same figures from a bench.peer JSON: its loraplex-fp32 `completions-rr` cells."""
    peer_result = json.loads(open(path).read())
    ranks = [8 if i % 2 == 0 else 16 for i in range(adapters)]
    rank = sum(ranks) / len(ranks)
    out = []
    for cell in peer_result["servers"]["loraplex-fp32"]["cells"]:
        if cell["workload"] != "completions-rr" or not cell.get("tpot_p50_ms"):
            continue
        c = cell["concurrency"]
        flop = flop_per_token(context=20 + cell["mean_output_tokens"] / 2, rank=rank)
        out.append({**cell, "rows": c, "mean_rank": rank, "source": path,
                    "gflop_per_token": round(flop["total"] / 1e9, 4),
                    "flop_split": {k: round(v / 1e9, 4) for k, v in flop.items()},
                    "achieved_gflop_s": round(c * flop["total"] / (cell["tpot_p50_ms"] / 1e3)
                                              / 1e9, 1), **per_cpu_second(cell, flop)})
    return out


def decode_in_own_process(max_tokens: int, threads: int | None, say) -> list[dict]:
    """`bench.decode_step`'s fp32 and nf4 cells at 16 and 32 rows, run in a process of its
    own: after the peaks above have set this process's torch threads to one and back, an
    engine thread started here ran its step on about one core (CPU time 1.2× the wall time
    against 2× in a fresh process), so the step is measured where nothing set them."""
    cmd = [sys.executable, "-m", "bench.decode_step", "--dtypes", "fp32,nf4", "--rows",
           "16,32", "--max-new", str(max_tokens), "--json"]
    if threads:
        cmd += ["--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    for line in out.stderr.splitlines():
        if " rows: " in line:
            say(line.strip())
    return json.loads(out.stdout)["cells"]


def per_cpu_second(cell: dict, flop: dict) -> dict:
    """GFLOP per CPU-second the server's process tree used in the cell (a shared machine's
    preemptions do not count; prefill FLOP are left out, so it is a lower bound)."""
    if not cell.get("server_cpu_s"):
        return {}
    tokens = cell["mean_output_tokens"] * cell["requests"]
    return {"gflop_per_cpu_s": round(tokens * flop["total"] / cell["server_cpu_s"] / 1e9, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--no-decode", action="store_true", help="only the machine's peaks")
    ap.add_argument("--in-process", action="store_true", help="time the decode step inside "
                    "one process (bench.decode_step: fp32 and nf4) instead of through a server")
    ap.add_argument("--threads", type=int, default=None, help="torch threads of the "
                    "in-process step (default: the core count)")
    ap.add_argument("--peer-json", default=None, help="take the decode step from this "
                    "bench.peer JSON (its loraplex-fp32 completions-rr cells) instead of "
                    "serving again")
    a = ap.parse_args(argv)
    repeats = a.repeats or (10 if a.quick else 40)
    max_tokens = a.max_tokens or (48 if a.quick else 96)

    def say(msg: str) -> None:
        print(msg, file=sys.stderr if a.json else sys.stdout, flush=True)

    cores = os.cpu_count() or 1
    head = peer.machine()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    mm = matmul_table(cores, repeats) + (matmul_table(1, repeats) if cores > 1 else [])
    bw = {"all_cores": round(bandwidth(cores, repeats), 1), "one_core": round(bandwidth(1, repeats), 1)}
    read_gb_s = round(read_bandwidth(cores, repeats), 1)
    stream = [weight_stream(rows, cores, repeats, kernel) for rows in (16, 32)
              for kernel in ("plain", "packed")]
    torch.set_num_threads(cores)
    peaks = {f"{d}_{'all' if t == cores else 'one'}": max(r["gflop_s"] for r in mm
                                                         if r["dtype"] == d and r["threads"] == t)
             for d in ("float32", "bfloat16") for t in {cores, 1}}
    say(f"peak GFLOP/s {peaks}; copy bandwidth GB/s {bw}; read {read_gb_s} GB/s; base "
        f"matmuls alone {stream}")
    if a.peer_json:
        decode = decode_from_peer(a.peer_json, peer.Plan().adapters)
    elif a.in_process:
        decode = decode_in_own_process(max_tokens, a.threads, say)
    else:
        decode = [] if a.no_decode else decode_step(peer.Plan(), (16, 32), max_tokens, say)
    for d in decode:
        if "achieved_gflop_s" not in d:  # an in-process cell without a full decode step
            continue
        d["fraction_of_fp32_peak"] = round(d["achieved_gflop_s"] / peaks["float32_all"], 3)
        if d.get("dtype", "fp32") == "fp32":  # the memory roof of an fp32 step
            context = d.get("mean_prompt_tokens", 20) + d["mean_output_tokens"] / 2
            flop = d["rows"] * d["gflop_per_token"] * 1e9
            nbytes = step_bytes(d["rows"], context, d.get("mean_rank", 12.0),
                                peer.Plan().adapters)
            roof = memory_roof(flop, nbytes["total"], read_gb_s, peaks["float32_all"])
            d["step_mb"] = {k: round(v / 1e6, 1) for k, v in nbytes.items()}
            d["memory_roof_gflop_s"] = round(roof, 1)
            d["roof_fraction_of_fp32_peak"] = round(roof / peaks["float32_all"], 3)
            d["fraction_of_roof"] = round(d["achieved_gflop_s"] / roof, 3)
        if "gflop_per_cpu_s" in d:  # one busy core's worth of work against one core's peak
            d["cpu_s_fraction_of_one_core_fp32_peak"] = round(
                d["gflop_per_cpu_s"] / peaks["float32_one"], 3)
    at32 = next((d for d in decode if d["rows"] == 32 and d.get("dtype", "fp32") == "fp32"
                 and "fraction_of_fp32_peak" in d), None)
    result = {"bench": "roofline", "started": started, "machine": head,
              "load_avg_end": list(os.getloadavg()),
              "command": shlex.join([os.path.basename(sys.executable), "-m", "bench.roofline",
                                     *sys.argv[1:]]),
              "peak_gflop_s": peaks, "copy_gb_s": bw, "read_gb_s": read_gb_s,
              "base_matmuls_alone": stream, "matmul": mm, "decode": decode,
              "torch_threads": torch.get_num_threads(),
              "target": "decode at 32 rows >= 50% of the fp32 all-core peak: " + (
                  "met" if at32 and at32["fraction_of_fp32_peak"] >= 0.5 else
                  "not met" if at32 else "not measured") + (
                  f"; the memory roof of that step is {at32['roof_fraction_of_fp32_peak']:.0%} "
                  f"of the peak, and the step reaches {at32['fraction_of_roof']:.0%} of its roof"
                  if at32 and "fraction_of_roof" in at32 else "")}
    if a.json:
        print(json.dumps(result, indent=2))
    else:
        for r in mm:
            print(f"{r['dtype']:9s} threads={r['threads']} {r['kernel']:13s} "
                  f"{r['m']:5d}x{r['k']:5d}x{r['n']:6d} "
                  f"{r['us']:10.1f} us {r['gflop_s']:8.1f} GFLOP/s")
        for d in decode:
            if "fraction_of_fp32_peak" not in d:
                continue
            step = (f"step p50 {d['step_ms_p50']} ms, CPU min {d['cpu_ms_min']} ms"
                    if "step_ms_p50" in d else f"TPOT p50 {d['tpot_p50_ms']} ms")
            print(f"decode {d.get('dtype', 'fp32')} {d['rows']} rows: {step}, "
                  f"{d['achieved_gflop_s']} GFLOP/s = {d['fraction_of_fp32_peak']:.0%} of the "
                  f"fp32 peak" + (f"; {d['gflop_per_cpu_s']} GFLOP per CPU-s = "
                                  f"{d['cpu_s_fraction_of_one_core_fp32_peak']:.0%} of one "
                                  "core's" if "gflop_per_cpu_s" in d else "") +
                  (f"; memory roof {d['memory_roof_gflop_s']} GFLOP/s "
                   f"({d['step_mb']['total']} MB a step at {read_gb_s} GB/s), "
                   f"{d['fraction_of_roof']:.0%} of it" if "fraction_of_roof" in d else ""))
        print(result["target"])
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
