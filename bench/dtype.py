"""bench.dtype: what bf16 costs against fp32 on this CPU, at SmolLM2-135M's shapes.

    .venv/bin/python -m bench.dtype [--rounds 15] [--json]

For each workload (a plain GEMM x @ W^T at decode and training row counts, both MLP
directions 576 -> 1536 and 1536 -> 576; a training micro-batch's forward + backward through
the MLP; bitsandbytes' nf4 Linear4bit forward at decode batches), on one thread and on all
of them: the best-of-`rounds` time in fp32 and in bf16 (interleaved, so load from other
processes hits both alike) and the ratio bf16 / fp32 (> 1: bf16 is slower). Ends with what
`loraplex.compute` picks here in `auto` for an unquantized and an nf4 base, and why.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

from loraplex import compute

DTYPES = ("float32", "bfloat16")


def header() -> dict[str, Any]:
    facts = compute.cpu_facts()
    return {"cpu": facts.model, "capability": torch.backends.cpu.get_cpu_capability(),
            "avx512_bf16": facts.avx512_bf16, "amx": facts.amx, "cores": os.cpu_count(),
            "torch": torch.__version__,
            "command": "python -m bench.dtype " + " ".join(sys.argv[1:])}


def gemm(rows: int, k: int, n: int) -> Callable[[str], Callable[[], Any]]:
    def make(dtype: str) -> Callable[[], Any]:
        dt = getattr(torch, dtype)
        x = torch.randn(rows, k).to(dt)  # [T, in]
        w = torch.randn(n, k).to(dt)  # [out, in]
        return lambda: torch.nn.functional.linear(x, w)
    return make


def mlp_train(rows: int) -> Callable[[str], Callable[[], Any]]:
    def make(dtype: str) -> Callable[[], Any]:
        dt = getattr(torch, dtype)
        up = torch.randn(1536, 576).to(dt)  # [out, in]
        down = torch.randn(576, 1536).to(dt)  # [out, in]
        x = torch.randn(rows, 576).to(dt).requires_grad_()  # [T, in]

        def step() -> None:
            y = torch.nn.functional.linear(
                torch.nn.functional.silu(torch.nn.functional.linear(x, up)), down)  # [T, 576]
            y.float().square().mean().backward()
            x.grad = None
        return step
    return make


def nf4(rows: int, k: int, n: int) -> Callable[[str], Callable[[], Any]]:
    def make(dtype: str) -> Callable[[], Any]:
        dt = getattr(torch, dtype)
        lin = compute._nf4_linear(torch.randn(n, k), dt)
        x = torch.randn(rows, k).to(dt)  # [T, in]

        def run() -> None:
            with torch.inference_mode():
                lin(x)
        return run
    return make


WORKLOADS: list[tuple[str, Callable[[str], Callable[[], Any]]]] = [
    *[(f"gemm {r}x576 @ 576x1536", gemm(r, 576, 1536)) for r in (1, 16, 64, 256, 1024)],
    *[(f"gemm {r}x1536 @ 1536x576", gemm(r, 1536, 576)) for r in (16, 64, 1024)],
    ("mlp fwd+bwd 1024 rows (8x128)", mlp_train(1024)),
    *[(f"nf4 {r}x576 @ 576x1536", nf4(r, 576, 1536)) for r in (1, 16, 64)],
    *[(f"nf4 {r}x1536 @ 1536x576", nf4(r, 1536, 576)) for r in (16, 64)],
]


def best_ms(fns: dict[str, Callable[[], Any]], rounds: int) -> dict[str, float]:
    best = dict.fromkeys(fns, float("inf"))
    for f in fns.values():
        f()
    for _ in range(rounds):
        for name, f in fns.items():
            t0 = time.perf_counter()
            f()
            best[name] = min(best[name], time.perf_counter() - t0)
    return {k: round(v * 1e3, 4) for k, v in best.items()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    all_threads = torch.get_num_threads()
    out: dict[str, Any] = {"machine": header(), "rows": []}
    if not args.json:
        print(json.dumps(out["machine"]))
        print(f"{'workload':34s} {'threads':>7s} {'fp32 ms':>9s} {'bf16 ms':>9s} {'bf16/fp32':>9s}")
    for threads in sorted({1, all_threads}):
        torch.set_num_threads(threads)
        for name, make in WORKLOADS:
            ms = best_ms({d: make(d) for d in DTYPES}, args.rounds)
            row = {"workload": name, "threads": threads, "fp32_ms": ms["float32"],
                   "bf16_ms": ms["bfloat16"], "bf16_over_fp32": round(ms["bfloat16"]
                                                                     / ms["float32"], 2)}
            out["rows"].append(row)
            if not args.json:
                print(f"{name:34s} {threads:7d} {row['fp32_ms']:9.3f} {row['bf16_ms']:9.3f} "
                      f"{row['bf16_over_fp32']:9.2f}")
    torch.set_num_threads(all_threads)
    for q in ("none", "nf4"):
        choice = compute.choose("auto", "cpu", quantization=q)
        out[f"auto_{q}"] = choice.record()
        if not args.json:
            print(f"auto for a {q} base: {choice.line()}")
    if args.json:
        print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
