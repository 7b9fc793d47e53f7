"""Prefix cache: time to first token and prefill work with the per-adapter prefix cache off
and on, the same request trace through the engine, in one run.

    python -m bench.prefix            # bench base, 8 tenants x 8 questions, 512-token system prompts
    python -m bench.prefix --quick    # 8 tenants x 3 questions, 8 new tokens
    python -m bench.prefix --json     # the figures as JSON on stdout
    python -m bench.prefix --base DIR --system-tokens 128   # another base (here: a short context)

Workload: 8 tenants, each with its own adapter (random rank-16 peft adapters on all seven
projections, pushed into a real registry: `bench.engine.make_registry`) and its own system
prompt of `--system-tokens` tokens, followed by short questions (8-24 tokens, all distinct).
The trace asks question j of every tenant before question j+1 of any, so each tenant's
first request finds nothing cached and the later ones find its system prompt.

Arrivals: a closed loop of `--concurrency` clients (4) taking the trace in order, each
sending its next request when the previous one has finished (greedy, `--max-new` tokens), as
a few product services calling at once would. So requests meet other requests' prefills
and decodes in the batch, and TTFT (the engine's `first_token_s`: submit to first token)
is mostly prefill: the request's own and that of the requests admitted just before it.
Not an open-loop rate: with the cache off, a rate the cache-on engine sustains can overrun
the engine and TTFT would then measure queueing, not prefill.

Both runs use the same trace on a fresh engine each (off, then on), every adapter resident
before timing (a warm server) and a short warm-up that does not touch the tenants' prompts.
Reported per run: TTFT p50/p99, prompt tokens and prefill tokens computed (prompt tokens
minus those taken from the cache), prefix-cache lookups that hit and the share of prompt
tokens reused; then TTFT p50 off / on (target >= 3x) and whether every output is the same,
token for token, with the cache on as off (greedy).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

TARGET_RATIO = 3.0
TENANT_ID = "bench"  # the registry tenant of the adapters (bench.engine.make_registry)
QUESTION_TOKENS = (8, 24)  # a question's length, drawn per question


@dataclass(frozen=True)
class Request:
    adapter: str  # adapter name in the registry (`bench/<name>`): one per tenant
    prompt_ids: list[int]  # the tenant's system prompt, then the question


def trace(names: list[str], questions: int, system_tokens: int, seed: int = 0
          ) -> list[Request]:
    """Question j of every tenant (shuffled within the round) before question j+1 of any."""
    rng = random.Random(seed)

    def tokens(n: int) -> list[int]:  # ids 32..255: ordinary bytes on the byte-level bases
        return [rng.randrange(32, 256) for _ in range(n)]

    system = {name: tokens(system_tokens) for name in names}
    out = []
    for _ in range(questions):
        for name in rng.sample(names, len(names)):
            out.append(Request(name, system[name] + tokens(rng.randint(*QUESTION_TOKENS))))
    return out


def run(engine, work: list[Request], max_new: int, concurrency: int) -> dict:
    """The trace through `engine` by `concurrency` closed-loop clients; the results in trace
    order and what the engine's prefix-cache counters moved by."""
    from loraplex.registry import Identity
    from loraplex.runtime.engine.engine import SamplingParams

    me = Identity(TENANT_ID)
    sampling = SamplingParams(max_new_tokens=max_new)  # greedy
    tag = time.monotonic_ns()

    def one(i: int):
        req = engine.admit(f"p{tag}-{i}", me, f"{TENANT_ID}/{work[i].adapter}",
                           prompt_ids=work[i].prompt_ids, sampling=sampling)
        return engine.generate(req, 600)

    before = engine.stats()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:  # each worker: next request when done
        results = list(pool.map(one, range(len(work))))
    wall = time.perf_counter() - t0
    after = engine.stats()
    prompt = sum(len(r.prompt_ids) for r in work)
    hit_tokens = after.prefix_hit_tokens - before.prefix_hit_tokens
    return {"results": results, "wall_s": wall, "prompt_tokens": prompt,
            "prefill_tokens": prompt - hit_tokens, "hit_tokens": hit_tokens,
            "lookups": after.prefix_lookups - before.prefix_lookups,
            "hits": after.prefix_hits - before.prefix_hits}


def warm_up(engine, names: list[str], max_new: int) -> None:
    """Kernels and slots warm, tenants' prompts untouched: short prompts no trace shares."""
    from loraplex.registry import Identity
    from loraplex.runtime.engine.engine import SamplingParams

    me = Identity(TENANT_ID)
    for i, name in enumerate(names[:2]):
        prompt = [200 + i] * 40
        engine.generate(engine.admit(f"warm-{i}-{time.monotonic_ns()}", me,
                                     f"{TENANT_ID}/{name}", prompt_ids=prompt,
                                     sampling=SamplingParams(max_new_tokens=max_new)), 600)


def context_of(base_dir: Path) -> int:
    config = json.loads((base_dir / "config.json").read_text())
    return int(config.get("max_position_embeddings") or config.get("n_positions") or 0)


def measure(base_dir: Path, registry, names: list[str], work: list[Request], *,
            cache_blocks: int, max_new: int, concurrency: int, max_seq_len: int) -> dict:
    """One fresh engine (prefix cache of `cache_blocks` blocks; 0 = off) over the trace."""
    from bench.engine import start_engine
    from loraplex.registry import Identity

    engine = start_engine(base_dir, registry, max_slots=len(names), max_batch=concurrency,
                          max_seq_len=max_seq_len, prefix_cache_blocks=cache_blocks)
    try:
        for name in names:  # a warm server: every tenant's adapter resident
            engine.prefetch(Identity(TENANT_ID), f"{TENANT_ID}/{name}")
        warm_up(engine, names, max_new)
        return run(engine, work, max_new, concurrency)
    finally:
        engine.shutdown()


def summary(side: dict) -> dict:
    from bench.serve import pct

    ttft = [r.timings.first_token_s for r in side["results"]]
    return {"ttft_p50_ms": round(pct(ttft, 0.5) * 1e3, 1),
            "ttft_p99_ms": round(pct(ttft, 0.99) * 1e3, 1),
            "prompt_tokens": side["prompt_tokens"], "prefill_tokens": side["prefill_tokens"],
            "prefix_lookups": side["lookups"], "prefix_hits": side["hits"],
            "hit_ratio": round(side["hits"] / side["lookups"], 3) if side["lookups"] else 0.0,
            "token_hit_ratio": round(side["hit_tokens"] / side["prompt_tokens"], 3),
            "wall_s": round(side["wall_s"], 2),
            "generated_tokens": sum(len(r.token_ids) for r in side["results"])}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 questions per tenant, 8 new tokens")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    ap.add_argument("--base", type=Path, default=None, metavar="DIR",
                    help="a base directory (default: the bench base, built once)")
    ap.add_argument("--tenants", type=int, default=8)
    ap.add_argument("--questions", type=int, default=None, help="per tenant (default 8)")
    ap.add_argument("--system-tokens", type=int, default=512)
    ap.add_argument("--max-new", type=int, default=None, help="default 16 (8 with --quick)")
    ap.add_argument("--concurrency", type=int, default=4, help="closed-loop clients")
    args = ap.parse_args(argv)
    questions = args.questions or (3 if args.quick else 8)
    max_new = args.max_new or (8 if args.quick else 16)
    warnings.filterwarnings("ignore")

    from bench.engine import bench_base_dir, machine, make_registry

    base_dir = args.base.resolve() if args.base else bench_base_dir()
    max_seq_len = args.system_tokens + QUESTION_TOKENS[1] + max_new + 1
    if max_seq_len > context_of(base_dir):
        raise SystemExit(f"bench.prefix: {args.system_tokens}-token system prompts do not fit "
                         f"the base's {context_of(base_dir)}-token context; pass a smaller "
                         "--system-tokens")
    block = 16  # EngineConfig.kv_block_size's default, which the engines keep
    # room for every tenant's prompt blocks, so the figure is the cache's, not its eviction's
    cache_blocks = args.tenants * -(-max_seq_len // block)
    with tempfile.TemporaryDirectory(prefix="loraplex-bench-prefix-") as tmp:
        t0 = time.perf_counter()
        registry, peft_model, names = make_registry(base_dir, Path(tmp), args.tenants)
        del peft_model  # only the registry's copies are served
        setup_s = time.perf_counter() - t0
        work = trace(names, questions, args.system_tokens)
        common = dict(max_new=max_new, concurrency=args.concurrency, max_seq_len=max_seq_len)
        off = measure(base_dir, registry, names, work, cache_blocks=0, **common)
        on = measure(base_dir, registry, names, work, cache_blocks=cache_blocks, **common)

    same = sum(a.token_ids == b.token_ids for a, b in zip(off["results"], on["results"],
                                                           strict=True))
    s_off, s_on = summary(off), summary(on)
    ratio = s_off["ttft_p50_ms"] / s_on["ttft_p50_ms"] if s_on["ttft_p50_ms"] else float("inf")
    figures = {
        "bench": "prefix", "quick": args.quick, "base": str(args.base or "bench"),
        "tenants": args.tenants, "questions_per_tenant": questions,
        "requests": len(work), "system_tokens": args.system_tokens,
        "question_tokens": list(QUESTION_TOKENS), "max_new_tokens": max_new,
        "concurrency": args.concurrency, "prefix_cache_blocks": cache_blocks,
        "kv_block_size": block, "off": s_off, "on": s_on,
        "ttft_p50_ratio": round(ratio, 2), "target_ratio": TARGET_RATIO,
        "met": ratio >= TARGET_RATIO,
        "prefill_tokens_ratio": round(s_on["prefill_tokens"] / s_off["prefill_tokens"], 3),
        "identical_outputs": same, "outputs_identical": same == len(work),
        "setup_s": round(setup_s, 1), "machine": machine(),
    }
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        print_table(figures)
    return figures


def print_table(f: dict) -> None:
    print(f"bench.prefix  base={f['base']}  {f['tenants']} tenants x {f['questions_per_tenant']} "
          f"questions ({f['requests']} requests)  system prompt {f['system_tokens']} tokens, "
          f"questions {f['question_tokens'][0]}-{f['question_tokens'][1]}, "
          f"{f['max_new_tokens']} new tokens, {f['concurrency']} closed-loop clients")
    print(f"{'prefix cache':<14}{'TTFT p50 ms':>12}{'TTFT p99 ms':>13}{'prompt tok':>12}"
          f"{'prefilled':>11}{'hits/lookups':>14}{'tok reused':>12}{'wall s':>9}")
    for name in ("off", "on"):
        s = f[name]
        hits = f"{s['prefix_hits']}/{s['prefix_lookups']}" if name == "on" else "-"
        reused = f"{100 * s['token_hit_ratio']:.1f}%" if name == "on" else "-"
        print(f"{name:<14}{s['ttft_p50_ms']:>12.1f}{s['ttft_p99_ms']:>13.1f}"
              f"{s['prompt_tokens']:>12,}{s['prefill_tokens']:>11,}{hits:>14}{reused:>12}"
              f"{s['wall_s']:>9.2f}")
    verdict = "met" if f["met"] else "NOT met"
    print(f"TTFT p50 off/on: {f['ttft_p50_ratio']:.2f}x (target >= {f['target_ratio']}x: "
          f"{verdict})   prefill tokens on/off: {f['prefill_tokens_ratio']:.3f}   "
          f"outputs identical: {f['identical_outputs']}/{f['requests']}")


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)
