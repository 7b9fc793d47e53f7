"""SmolLM2's decode step inside one process: wall and CPU time per step at 16 and 32 rows.

    .venv/bin/python -m bench.decode_step                  # fp32 and nf4, 16 and 32 rows
    .venv/bin/python -m bench.decode_step --dtypes fp32 --rows 32 --threads 1 --json
    .venv/bin/python -m bench.decode_step --profile 6      # + torch.profiler over 6 steps
    .venv/bin/python -m bench.roofline --in-process        # the same cells beside the peaks

A real `Engine` (no server, no HTTP) on SmolLM2-135M-Instruct: `bench.peer`'s imported base
and its 8 adapters (r8/r16 on every linear layer), round-robin over the rows, every adapter
resident, C greedy requests submitted at once; fp32 (`quantization none`, compute float32)
and nf4 (compute dtype `auto`, as `loraplex serve` picks it for the machine). An observer on
the engine thread stamps every step; a step counts when all C rows decode (no prefill chunk
in it), so the figure is the decode step alone: forward, sampling, stop checks, streams.

Per cell: the step's wall milliseconds (p50 and min over the counted steps), the process's
CPU milliseconds per step (p50 and min: what the step costs whatever else the machine runs,
since time spent waiting for a core is not counted; with several torch threads it includes
their spinning at OpenMP barriers), the achieved GFLOP/s (C × `bench.roofline.
flop_per_token` at the mean context ÷ wall p50, and ÷ CPU min), and a digest of every token
produced, so two runs (two commits, two settings) can be checked to give the same outputs.
It prints no ratio of its own: `bench.roofline --in-process` sets these beside the machine's
matmul peaks measured in the same run, and comparing commits means running this once per
commit, interleaved, on the same machine (each result carries the machine header and the load
average at its end).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import threading
import time
import warnings
from pathlib import Path

import torch

from bench import peer
from bench.roofline import flop_per_token

PROMPT = "Explain {topic} in a few paragraphs for a curious reader.\n\n"
ADAPTERS = 8


class StepClock:
    """Stamps every engine step on the engine thread: (rows, running, wall s, CPU s) since
    the previous stamp; optionally runs torch.profiler over a few full decode steps."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, int, float, float]] = []
        self._last = (time.perf_counter(), time.process_time())
        self._profile: dict | None = None
        self.profiled = threading.Event()

    def mark(self) -> None:
        self._last = (time.perf_counter(), time.process_time())

    def profile_next(self, rows: int, steps: int, out: Path) -> None:
        """torch.profiler over the next `steps` steps where all `rows` rows decode, started
        and stopped on the engine thread (the profiler records the thread it runs on)."""
        self._profile = {"rows": rows, "left": steps, "out": out, "prof": None}

    def __call__(self, rows: int, running: int) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        self.steps.append((rows, running, wall - self._last[0], cpu - self._last[1]))
        p = self._profile
        if p is not None and rows == running == p["rows"]:
            if p["prof"] is None:
                from torch.profiler import ProfilerActivity, profile

                p["prof"] = profile(activities=[ProfilerActivity.CPU], record_shapes=True)
                p["prof"].__enter__()
            elif p["left"] > 0:
                p["left"] -= 1
            else:
                p["prof"].__exit__(None, None, None)
                p["out"].write_text(p["prof"].key_averages(group_by_input_shape=True).table(
                    sort_by="self_cpu_time_total", row_limit=45))
                self._profile = None
                self.profiled.set()
        self._last = (time.perf_counter(), time.process_time())


def make_observer(clock: StepClock):
    from loraplex.runtime.api.observer import EngineObserver

    class Stamp(EngineObserver):
        def on_step(self, batch_size: int, running: int, waiting: int) -> None:
            clock(batch_size, running)

    return Stamp()


def start(dtype: str, rows: int, observer, max_rank: int, say, llama_decode: bool = True,
          base_gemm: str = "auto"):
    """An engine serving `bench.peer`'s base and adapters in `dtype` ("fp32" | "nf4")."""
    from loraplex.registry import Registry
    from loraplex.runtime.engine.engine import Engine, EngineConfig

    base = peer.base_dir(say)
    adapters = peer.adapter_dirs(base, ADAPTERS, say)
    registry = Registry.open(peer.registry_dir(base, adapters, say))
    quant, compute = ("none", "float32") if dtype == "fp32" else ("nf4", "auto")
    cfg = EngineConfig(base_dir=base, quantization=quant, compute_dtype=compute, device="cpu",
                       max_slots=ADAPTERS, max_rank=max_rank, max_batch=rows, max_seq_len=512,
                       llama_decode=llama_decode, base_gemm=base_gemm)
    engine = Engine(cfg, registry, observer).start()
    return engine, sorted(adapters)


def run_rows(engine, names: list[str], rows: int, max_new: int, clock: StepClock) -> dict:
    """`rows` requests at once, round-robin over the adapters; figures of the steps in which
    all of them decode."""
    from loraplex.registry import Identity
    from loraplex.runtime.engine.engine import SamplingParams

    me = Identity(peer.TENANT)
    reqs = [engine.admit(f"d{rows}-{i}-{time.time_ns()}", me,
                         f"{peer.TENANT}/{names[i % len(names)]}",
                         prompt=PROMPT.format(topic=peer.TOPICS[i % len(peer.TOPICS)]),
                         sampling=SamplingParams(max_new_tokens=max_new))
            for i in range(rows)]
    prompt_len = sum(len(r.prompt_ids) for r in reqs) / rows
    first = len(clock.steps)
    clock.mark()
    streams = [engine.submit(r) for r in reqs]
    results = [s.wait(3600) for s in streams]
    # every row decodes; the first such step also carries the last prefill's commit
    full = [s for s in clock.steps[first:] if s[0] == s[1] == rows][1:]
    wall, cpu = [s[2] for s in full], [s[3] for s in full]
    out_tokens = sum(len(r.token_ids) for r in results) / rows
    flop = flop_per_token(context=prompt_len + out_tokens / 2, rank=12.0)["total"]
    digest = hashlib.sha256(json.dumps([r.token_ids for r in results]).encode()).hexdigest()
    if not wall:
        return {"rows": rows, "steps_counted": 0, "tokens_sha256": digest[:16]}
    step_s, cpu_min = statistics.median(wall), min(cpu)
    return {"rows": rows, "steps_counted": len(full), "mean_prompt_tokens": prompt_len,
            "mean_output_tokens": out_tokens, "gflop_per_token": round(flop / 1e9, 4),
            "step_ms_p50": round(step_s * 1e3, 1), "step_ms_min": round(min(wall) * 1e3, 1),
            "cpu_ms_p50": round(statistics.median(cpu) * 1e3, 1),
            "cpu_ms_min": round(cpu_min * 1e3, 1),
            "achieved_gflop_s": round(rows * flop / step_s / 1e9, 1),
            "gflop_per_cpu_s": round(rows * flop / cpu_min / 1e9, 1),
            "tokens_sha256": digest[:16]}


def measure(dtypes: list[str], rows: list[int], *, max_new: int = 40, max_rank: int = 16,
            llama_decode: bool = True, base_gemm: str = "auto",
            profile: int = 0, label: str = "", say=print) -> list[dict]:
    """One cell per (dtype, rows); `profile` > 0 also writes a torch.profiler table per cell
    under `.loraplex/`."""
    warnings.filterwarnings("ignore")
    cells = []
    for dtype in dtypes:
        clock = StepClock()
        engine, names = start(dtype, max(rows), make_observer(clock), max_rank, say,
                              llama_decode, base_gemm)
        try:
            run_rows(engine, names, ADAPTERS, 4, clock)  # warm-up: every adapter, a step or two
            for n in rows:
                cell = {"dtype": dtype, **run_rows(engine, names, n, max_new, clock)}
                cells.append(cell)
                say(f"{label} {dtype} {n} rows: step p50 {cell.get('step_ms_p50')} ms (min "
                    f"{cell.get('step_ms_min')}), CPU {cell.get('cpu_ms_p50')} ms/step (min "
                    f"{cell.get('cpu_ms_min')}), {cell.get('achieved_gflop_s')} GFLOP/s wall, "
                    f"{cell.get('gflop_per_cpu_s')} per CPU-s, {cell['steps_counted']} steps, "
                    f"tokens {cell['tokens_sha256']}")
                if profile:
                    out = peer.WORK.parent / f"profile-{label or 'run'}-{dtype}-{n}.txt"
                    clock.profile_next(n, profile, out)
                    run_rows(engine, names, n, profile + 6, clock)
                    clock.profiled.wait(120)
                    clock.profiled.clear()
                    say(f"profile: {out}")
        finally:
            engine.shutdown()
    return cells


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", default="fp32,nf4", help="comma-separated: fp32, nf4")
    ap.add_argument("--rows", default="16,32", help="comma-separated decode batch sizes")
    ap.add_argument("--max-new", type=int, default=40, help="tokens per request")
    ap.add_argument("--max-rank", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's own, the core count)")
    ap.add_argument("--profile", type=int, default=0,
                    help="also run torch.profiler over this many decode steps per cell")
    ap.add_argument("--model-forward", action="store_true", help="decode through the model's "
                    "own forward (EngineConfig.llama_decode off), to compare with llama_decode")
    ap.add_argument("--base-gemm", default="auto", choices=("auto", "packed", "plain"),
                    help="EngineConfig.base_gemm: the base's linear layers on packed oneDNN "
                    "weights or through F.linear (runtime/model/packed.py)")
    ap.add_argument("--label", default="", help="a name for this run in the output")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)

    def say(msg: str) -> None:
        print(msg, file=sys.stderr if a.json else sys.stdout, flush=True)

    cells = measure(a.dtypes.split(","), [int(r) for r in a.rows.split(",")],
                    max_new=a.max_new, max_rank=a.max_rank, llama_decode=not a.model_forward,
                    base_gemm=a.base_gemm,
                    profile=a.profile, label=a.label, say=say)
    result = {"bench": "decode_step", "label": a.label, "machine": peer.machine(),
              "torch_threads": torch.get_num_threads(), "load_avg_end": list(os.getloadavg()),
              "command": " ".join([os.path.basename(sys.executable), "-m", "bench.decode_step",
                                   *(argv if argv is not None else sys.argv[1:])]),
              "cells": cells}
    if a.json:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
