"""What a DoRA row costs next to a LoRA row in the same mixed batch.

    python -m bench.dora            # full run (a few minutes on 2 cores)
    python -m bench.dora --quick    # about a minute
    python -m bench.dora --json     # the figures as JSON on stdout

On the `bench` base (~100M params, fp32), 16 rank-16 adapters on all seven projections, batch
32 rows spread over them in a shuffled order; one decode step (1 new token per row over a KV
cache of a 32-token prompt) and one prefill (4 rows x 64 tokens). The same 16 A/B pairs are
served three ways, each by its own injection over one copy of the base weights:
- `lora`:  all 16 as plain LoRA;
- `mixed`: 8 of them as DoRA (a magnitude vector beside the pair), 8 as LoRA;
- `dora`:  all 16 as DoRA.
The figures are each step's time over the `lora` step (target: `dora` <= 1.1x), and the
adapters' own share, (step - base) / (lora step - base). Configurations are timed in
interleaved rounds after a warm-up; figures are medians over rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

from bench.lora_ops import (
    DEFAULT_BASE_DIR,
    PROJECTIONS,
    DecodeStep,
    _load_avg,
    bench_base,
    interleaved_times,
    load_fp32,
    make_adapters,
    prefill_cache,
)
from loraplex.compute import cpu_model

TARGET = 1.10  # dora step / lora step
N_ADAPTERS = 16
KINDS = ("lora", "mixed", "dora")


def _with_magnitudes(model, sd: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """`sd` plus a DoRA magnitude for every module: its norm of W + s·B·A times a random
    0.5..1.5 (peft starts at the norm itself; trained adapters move away from it)."""
    g = torch.Generator().manual_seed(seed)
    out = dict(sd)
    for k in [k for k in sd if k.endswith(".lora_B.weight")]:
        module = k.removeprefix("base_model.model.").removesuffix(".lora_B.weight")
        out[k.removesuffix(".lora_B.weight") + ".lora_magnitude_vector"] = (
            0.5 + torch.rand(sd[k].shape[0], generator=g)) * torch.linalg.norm(
                model.get_submodule(module).weight.float(), dim=1)
    return out


class PrefillStep:
    """A prefill of `rows` x `length` tokens without a cache."""

    clock = time.perf_counter

    def __init__(self, model, rows: int, length: int, before) -> None:
        g = torch.Generator().manual_seed(2)
        self.model, self.before = model, before
        self.ids = torch.randint(0, 256, (rows, length), generator=g)  # [rows, length]

    @torch.no_grad()
    def __call__(self) -> float:
        self.before()
        t0 = self.clock()
        self.model(input_ids=self.ids, use_cache=False)
        return self.clock() - t0


def run(quick: bool, base_dir: Path, batch: int = 32, prompt_len: int = 32, rank: int = 16,
        rounds: int | None = None, prefill_rows: int = 4, prefill_len: int = 64,
        clock: str = "wall") -> dict:
    from loraplex.runtime.lora.layers import inject_lora

    rounds = rounds or (8 if quick else 24)
    # "cpu": this thread's CPU time (run with --threads 1), blind to the time a busy shared
    # machine keeps the process descheduled; "wall": what a user waits
    tick = staticmethod(time.thread_time if clock == "cpu" else time.perf_counter)
    DecodeStep.clock = PrefillStep.clock = tick
    base_dir = bench_base(base_dir)
    _say(f"loading the base and making {N_ADAPTERS} adapters ...")
    plain = load_fp32(base_dir)
    models = [load_fp32(base_dir) for _ in range(len(KINDS) + 1)]
    for other in models:  # one copy of the weights: same memory for every configuration
        other.load_state_dict(plain.state_dict(), assign=True)
    _, dicts = make_adapters(models[0], N_ADAPTERS, rank)
    sds = list(dicts.values())
    dora_sds = [_with_magnitudes(plain, sd, i) for i, sd in enumerate(sds)]
    injections = {}
    setup_s = {}
    for kind, model in zip(KINDS, models[1:], strict=True):
        inj = inject_lora(model, PROJECTIONS, max_slots=N_ADAPTERS, max_rank=rank)
        t0 = time.perf_counter()
        for slot in range(1, N_ADAPTERS + 1):
            dora = kind == "dora" or (kind == "mixed" and slot % 2 == 0)
            inj.load_adapter(slot, (dora_sds if dora else sds)[slot - 1], r=rank,
                             alpha=2 * rank)
        setup_s[kind] = time.perf_counter() - t0
        injections[kind] = (model, inj)

    order = torch.randperm(batch, generator=torch.Generator().manual_seed(1)).tolist()
    slots = [order[i] % N_ADAPTERS + 1 for i in range(batch)]  # [B] shuffled rows
    pslots = [i % N_ADAPTERS + 1 for i in range(prefill_rows)]
    cache = prefill_cache(plain, batch, prompt_len)
    steps = {"decode_base": DecodeStep(plain, cache, batch, prompt_len, lambda: None),
             "prefill_base": PrefillStep(plain, prefill_rows, prefill_len, lambda: None)}
    strategies = {}
    for kind, (model, inj) in injections.items():
        steps[f"decode_{kind}"] = DecodeStep(model, cache, batch, prompt_len,
                                             lambda s=slots, i=inj: i.set_batch(s))
        steps[f"prefill_{kind}"] = PrefillStep(model, prefill_rows, prefill_len,
                                               lambda s=pslots, i=inj: i.set_batch(s))
        inj.set_batch(slots)
        plan = inj.batch.plan_for(batch, batch)
        strategies[kind] = f"{plan.strategy}{'+dora' if plan.dora else ''}"

    times = interleaved_times(steps, rounds, _say)
    med = {k: statistics.median(v) for k, v in times.items()}

    rows = []
    for phase in ("decode", "prefill"):
        base, lora = med[f"{phase}_base"], med[f"{phase}_lora"]
        for kind in KINDS:
            t = med[f"{phase}_{kind}"]
            rows.append({"phase": phase, "kind": kind, "ms": t * 1e3,
                         "vs_lora": t / lora, "vs_base": t / base,
                         "adapter_share_vs_lora": (t - base) / (lora - base)
                         if lora > base else None,
                         "strategy": strategies[kind] if phase == "decode" else None})
    by = {(r["phase"], r["kind"]): r for r in rows}
    value = by[("decode", "dora")]["vs_lora"]
    return {
        "config": {"base": "bench (llama, 8 layers, hidden 1024, ~100M params), fp32",
                   "rank": rank, "adapters": N_ADAPTERS, "batch": batch,
                   "prompt_len": prompt_len, "prefill": [prefill_rows, prefill_len],
                   "projections": PROJECTIONS, "rounds": rounds, "quick": quick,
                   "clock": clock},
        "machine": {"platform": platform.platform(), "cpu": cpu_model(),
                    "capability": torch.backends.cpu.get_cpu_capability(),
                    "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__, "load_avg": _load_avg()},
        "command": "python -m bench.dora " + " ".join(sys.argv[1:]),
        "base_ms": {p: med[f"{p}_base"] * 1e3 for p in ("decode", "prefill")},
        "activation_ms_per_adapter": {k: v * 1e3 / N_ADAPTERS for k, v in setup_s.items()},
        "rows": rows,
        "target": {"value": value, "target": f"<= {TARGET}", "met": value <= TARGET},
    }


def _say(msg: str) -> None:
    print(f"[bench.dora {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def render(result: dict) -> str:
    c, m = result["config"], result["machine"]
    lines = [
        f"bench.dora — {c['adapters']} rank-{c['rank']} adapters on 7 projections, "
        f"{c['base']}; decode: batch {c['batch']}, KV {c['prompt_len']}; prefill: "
        f"{c['prefill'][0]} x {c['prefill'][1]} tokens; {c['rounds']} rounds (medians, "
        f"{c['clock']} clock)",
        f"machine: {m['cpu']} ({m['capability']}), {m['cores']} cores, {m['torch_threads']} "
        f"torch threads, torch {m['torch']}, load avg {m['load_avg']}",
        f"command: {result['command']}",
        f"base-only: decode {result['base_ms']['decode']:.1f} ms, prefill "
        f"{result['base_ms']['prefill']:.1f} ms",
        "activation (load_adapter) per adapter: " + ", ".join(
            f"{k} {v:.1f} ms" for k, v in result["activation_ms_per_adapter"].items()),
        "",
        f"{'phase':>8} {'adapters':>9} {'strategy':>15} {'ms':>8} {'x base':>7} "
        f"{'x lora':>7} {'adapter work x lora':>20}",
    ]
    names = {"lora": "16 LoRA", "mixed": "8+8 DoRA", "dora": "16 DoRA"}
    for r in result["rows"]:
        share = r["adapter_share_vs_lora"]
        lines.append(f"{r['phase']:>8} {names[r['kind']]:>9} {r['strategy'] or '':>15} "
                     f"{r['ms']:>8.1f} {r['vs_base']:>6.2f}x {r['vs_lora']:>6.3f}x "
                     f"{'' if share is None else f'{share:.2f}x':>20}")
    t = result["target"]
    lines += ["", f"target decode step, all DoRA rows vs all LoRA rows {t['target']}: "
                  f"{t['value']:.3f}  {'met' if t['met'] else 'NOT met'}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.dora",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds (about a minute)")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds (24, quick 8)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: thread CPU time with --threads 1, for a busy shared machine")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    ap.add_argument("--base-dir", type=Path, default=DEFAULT_BASE_DIR,
                    help="where the bench base is built/cached")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args.quick, args.base_dir, rounds=args.rounds, clock=args.clock)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2) if args.json else render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
