"""Decode-step time with and without CUDA graphs, through the engine's own runner.

    python -m bench.decode_graphs --device cuda            # eager, padded eager, graphs
    python -m bench.decode_graphs --device cuda --quick    # fewer rounds (bench/gpu_check.sh)
    python -m bench.decode_graphs --device cpu --quick     # eager vs padded eager only
    python -m bench.decode_graphs --json --out FILE

Three `Runner.boot`s over the same base (the `bench` base: nf4 on CUDA with bf16 compute
and bf16 stacks, the engine's CUDA defaults; fp32 on CPU), each with 8 random rank-16
adapters on all seven projections: "eager" (the ordinary decode forward), "static" (the
same step padded to its batch/KV bucket over the fixed input buffers, run eagerly:
`EngineConfig.static_decode`) and "graphs" (`EngineConfig.cuda_graphs`: that padded step
captured once per bucket and replayed; CUDA only). Each prefills 32 rows with a 64-token
prompt, then a timed step is `runner.decode(feeds, slots)` for the first B rows (rows spread
over the 8 adapters and the bare base), the host inputs and the logits' copy included, then
`torch.cuda.synchronize()`. The same feeds every time: a decode step rewrites the same KV
position, so every timed step is the same step. Modes are interleaved in each round after
warm-ups (which include the captures); figures are medians over rounds; the ratios against
"eager" in the same run are what to compare. Also reported: each bucket's first step
(capture included) and, per mode, the device memory reserved by its decode steps (after
the three buckets' warm-ups minus after prefill; for "graphs" that is what the graphs hold). Nothing here has been run on a GPU yet.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

from bench.lora_ops import DEFAULT_BASE_DIR, bench_base

BATCHES = (1, 8, 32)
PROMPT = 64
ADAPTERS = 8
RANK = 16


def boot(base_dir: Path, device: str, mode: str):
    from loraplex.runtime.engine.engine import EngineConfig
    from loraplex.runtime.model.runner import Runner

    cfg = EngineConfig(base_dir=base_dir, quantization="nf4" if device == "cuda" else "none",
                       device=device, max_slots=ADAPTERS, max_rank=RANK, max_batch=max(BATCHES),
                       max_seq_len=256, cuda_graphs=mode == "graphs",
                       static_decode=mode == "static")
    runner = Runner.boot(cfg)
    load_adapters(runner)
    return runner


def load_random_adapter(injection, slot: int, rank: int, b_std: float = 0.01) -> None:
    """Random rank-`rank` factors on every wrapped layer, into `slot`; seeded by the slot,
    so every runner holds the same adapter there (shared with the padded-path tests)."""
    from loraplex import peft_format

    g = torch.Generator().manual_seed(slot)
    tensors = {}
    for path, layer in injection.layers.items():
        tensors[peft_format.weight_key(path, "A")] = torch.randn(
            rank, layer.in_features, generator=g) / layer.in_features ** 0.5
        tensors[peft_format.weight_key(path, "B")] = torch.randn(
            layer.out_features, rank, generator=g) * b_std
    injection.load_adapter(slot, tensors, rank, 2 * rank)


def load_adapters(runner) -> None:
    """The same random adapters in slots 1..8 of every runner."""
    for slot in range(1, ADAPTERS + 1):
        load_random_adapter(runner.injection, slot, RANK)


def prefill(runner) -> list[int]:
    """Prompts into rows 0..31; returns each row's first sampled (greedy) token."""
    from loraplex.runtime.kv.cache import RowFeed

    g = torch.Generator().manual_seed(0)
    vocab = runner.vocab_size
    feeds = [RowFeed(r, 0, torch.randint(0, vocab, (PROMPT,), generator=g).tolist())
             for r in range(max(BATCHES))]
    logits = runner.forward(feeds, slots_for(len(feeds)))  # [32, V]
    return logits.argmax(-1).tolist()


def slots_for(n: int) -> list[int]:
    return [r % (ADAPTERS + 1) for r in range(n)]  # slot 0: the bare base


def step_fn(runner, first: list[int], batch: int, device: str):
    from loraplex.runtime.kv.cache import RowFeed

    feeds = [RowFeed(r, PROMPT, [first[r]]) for r in range(batch)]
    slots = slots_for(batch)

    def step() -> float:
        t0 = time.perf_counter()
        runner.decode(feeds, slots)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    return step


def run(base_dir: Path, device: str, rounds: int) -> dict:
    modes = ["eager", "static"] + (["graphs"] if device == "cuda" else [])
    runners, first, steps, first_step_s, decode_bytes = {}, {}, {}, {}, {}
    for mode in modes:
        _say(f"booting {mode} ...")
        runners[mode] = boot(base_dir, device, mode)
        first[mode] = prefill(runners[mode])
        before = torch.cuda.memory_reserved() if device == "cuda" else 0
        for b in BATCHES:
            steps[mode, b] = step_fn(runners[mode], first[mode], b, device)
            first_step_s[f"{mode}_b{b}"] = round(steps[mode, b](), 4)  # captures, for graphs
            for _ in range(3):
                steps[mode, b]()
        if device == "cuda":  # what decoding the three buckets added (graphs: their pools)
            decode_bytes[mode] = torch.cuda.memory_reserved() - before
    samples: dict[tuple[str, int], list[float]] = {k: [] for k in steps}
    for _ in range(rounds):
        for b in BATCHES:
            for mode in modes:
                samples[mode, b].append(steps[mode, b]())
    rows = []
    for b in BATCHES:
        ms = {m: statistics.median(samples[m, b]) * 1e3 for m in modes}
        row = {"batch": b, **{f"{m}_ms": round(v, 3) for m, v in ms.items()},
               "static_vs_eager": round(ms["static"] / ms["eager"], 3)}
        if "graphs" in ms:
            row["graphs_vs_eager"] = round(ms["graphs"] / ms["eager"], 3)
            row["graphs_vs_static"] = round(ms["graphs"] / ms["static"], 3)
        rows.append(row)
    decoder = runners.get("graphs", runners["static"]).static
    return {
        "bench": "decode_graphs", "device": _device_name(device), "rounds": rounds,
        "config": {"base": base_dir.name, "batches": list(BATCHES), "prompt": PROMPT,
                   "adapters": ADAPTERS, "rank": RANK,
                   "quantization": "nf4" if device == "cuda" else "none"},
        "rows": rows, "first_step_s": first_step_s,
        "decode_reserved_bytes": decode_bytes,
        "decoder_stats": vars(decoder.stats),
    }


def render(result: dict) -> str:
    lines = [f"bench.decode_graphs on {result['device']}, {result['rounds']} rounds (medians)",
             f"{'batch':>5} {'eager ms':>9} {'static ms':>9} {'graphs ms':>9} "
             f"{'static/eager':>12} {'graphs/eager':>12}"]
    for r in result["rows"]:
        g = r.get("graphs_ms")
        lines.append(f"{r['batch']:>5} {r['eager_ms']:>9.2f} {r['static_ms']:>9.2f} "
                     f"{g if g is not None else float('nan'):>9.2f} "
                     f"{r['static_vs_eager']:>11.2f}x {r.get('graphs_vs_eager', float('nan')):>11.2f}x")
    lines.append(f"first step per bucket (s, capture included for graphs): "
                 f"{result['first_step_s']}")
    lines.append(f"decoder stats: {result['decoder_stats']}")
    return "\n".join(lines)


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name(0) if device == "cuda" else "cpu"


def _say(msg: str) -> None:
    print(f"[bench.decode_graphs {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr,
          flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.decode_graphs",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (all three modes) or cpu")
    ap.add_argument("--quick", action="store_true", help="fewer rounds")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds (30, quick 10)")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    ap.add_argument("--base-dir", type=Path, default=DEFAULT_BASE_DIR,
                    help="where the bench base is built/cached")
    ap.add_argument("--base", type=Path, default=None, metavar="DIR",
                    help="measure on this HF base directory instead")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench.decode_graphs: no CUDA device; use --device cpu (no graphs there)",
              file=sys.stderr)
        return 2
    base = args.base or bench_base(args.base_dir)
    rounds = args.rounds or (10 if args.quick else 30)
    result = run(Path(base), args.device, rounds)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result) if args.json else render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
