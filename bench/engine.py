"""Engine throughput: many requests over many adapters, against one-at-a-time peft.

    python -m bench.engine            # 64 requests over 32 adapters, prompt 32, output 32
    python -m bench.engine --quick    # 16 requests over 8 adapters; peft timed on 4 of them
    python -m bench.engine --json     # the figures as JSON on stdout

On the `bench` base (~100M params, fp32), rank-16 adapters on all seven projections, pushed
into a real registry. Baseline: for each request, `peft_model.set_adapter(name)` then
`generate` (greedy), one request at a time, the way a single-adapter server would serve a
mixed stream. Engine: every request submitted at once, adapters already resident (as on a
warm server), continuous batching with up to `--max-batch` rows. Both sides generate the
same number of tokens per request; the figure is generated tokens per second, and the
ratio (engine ÷ peft, measured in the same run) is what to compare across machines.
Target: >= 5x.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from loraplex.compute import cpu_model

TARGET_SPEEDUP = 5.0
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def bench_base_dir() -> Path:
    """The bench base, built once under bench/results/ (shared with bench.lora_ops)."""
    from bench.lora_ops import DEFAULT_BASE_DIR, bench_base

    return bench_base(DEFAULT_BASE_DIR)


def make_registry(base_dir: Path, root: Path, n_adapters: int, rank: int = 16):
    """A fresh registry under `root` holding `n_adapters` random rank-`rank` peft adapters
    (`bench/ad<i>`); returns (registry, peft model holding them all, adapter names)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from loraplex.registry import Identity, Registry

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    reg = Registry.open(root / "registry")
    fp = reg.register_base(Identity.system(), base_dir)
    torch.manual_seed(0)
    peft_model, names = None, []
    for i in range(n_adapters):
        name = f"ad{i + 1}"
        cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=PROJECTIONS,
                         init_lora_weights=False, lora_dropout=0.0)
        if peft_model is None:
            peft_model = get_peft_model(model, cfg, adapter_name=name)
        else:
            peft_model.add_adapter(name, cfg)
        with torch.no_grad():  # small deltas, like trained adapters
            for mod in peft_model.modules():
                if hasattr(mod, "lora_B") and name in mod.lora_B:
                    mod.lora_B[name].weight.mul_(0.01)
        out = root / "adapters" / name
        peft_model.save_pretrained(out, selected_adapters=[name])
        adir = out / name if (out / name).is_dir() else out
        reg.push(Identity("bench"), adir, f"bench/{name}", base=fp)
        names.append(name)
    return reg, peft_model.eval().requires_grad_(False), names


def workload(n_requests: int, names: list[str], prompt_len: int, seed: int = 0):
    """(adapter name, prompt ids) per request, adapters round-robin, shuffled order."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(n_requests, generator=g).tolist()
    return [(names[i % len(names)], torch.randint(0, 256, (prompt_len,), generator=g).tolist())
            for i in order]


@torch.inference_mode()
def run_peft(peft_model, work, max_new: int) -> tuple[float, int]:
    """One request at a time: set_adapter, greedy generate. Returns (seconds, tokens)."""
    from loraplex.basemodel import PAD_ID

    t0 = time.perf_counter()
    tokens = 0
    for name, prompt in work:
        peft_model.set_adapter(name)
        ids = torch.tensor([prompt])
        out = peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                  max_new_tokens=max_new, min_new_tokens=max_new,
                                  do_sample=False, pad_token_id=PAD_ID)
        tokens += out.shape[1] - ids.shape[1]
    return time.perf_counter() - t0, tokens


def start_engine(base_dir: Path, registry, *, max_slots: int, max_batch: int, max_seq_len: int,
                 observer=None, **extra):
    from loraplex.runtime.engine.engine import Engine, EngineConfig

    cfg = EngineConfig(base_dir=base_dir, quantization="none", compute_dtype="float32",
                       device="cpu", max_slots=max_slots, max_rank=16, max_batch=max_batch,
                       max_seq_len=max_seq_len, prefill_token_budget=512, **extra)
    return Engine(cfg, registry, observer).start()


def run_engine(engine, work, max_new: int) -> tuple[float, int]:
    """Everything submitted at once. Returns (seconds, tokens)."""
    from loraplex.registry import Identity
    from loraplex.runtime.engine.engine import SamplingParams

    me = Identity("bench")
    t0 = time.perf_counter()
    streams = [engine.submit(engine.admit(f"b{i}-{time.time_ns()}", me, f"bench/{name}",
                                          prompt_ids=prompt,
                                          sampling=SamplingParams(max_new_tokens=max_new)))
               for i, (name, prompt) in enumerate(work)]
    results = [s.wait(3600) for s in streams]
    return time.perf_counter() - t0, sum(len(r.token_ids) for r in results)


def machine() -> dict:
    return {"cpu": cpu_model(), "capability": torch.backends.cpu.get_cpu_capability(),
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="16 requests over 8 adapters")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    ap.add_argument("--requests", type=int, default=None)
    ap.add_argument("--adapters", type=int, default=None)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--output", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--peft-requests", type=int, default=None,
                    help="time peft on the first N requests only (same shape, so tokens/s is "
                         "a rate); default all, 4 with --quick")
    args = ap.parse_args(argv)
    n_req = args.requests or (16 if args.quick else 64)
    n_ad = args.adapters or (8 if args.quick else 32)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)

    base_dir = bench_base_dir()
    with tempfile.TemporaryDirectory(prefix="loraplex-bench-engine-") as tmp:
        t0 = time.perf_counter()
        registry, peft_model, names = make_registry(base_dir, Path(tmp), n_ad)
        setup_s = time.perf_counter() - t0
        work = workload(n_req, names, args.prompt)

        engine = start_engine(base_dir, registry, max_slots=n_ad, max_batch=args.max_batch,
                              max_seq_len=args.prompt + args.output + 8)
        try:
            from loraplex.registry import Identity

            for name in names:  # a warm server: every adapter resident
                engine.prefetch(Identity("bench"), f"bench/{name}")
            run_engine(engine, work[:2], 4)  # warm-up
            eng_s, eng_tokens = run_engine(engine, work, args.output)
        finally:
            engine.shutdown()
        n_peft = min(n_req, args.peft_requests or (4 if args.quick else n_req))
        run_peft(peft_model, work[:1], 4)  # warm-up
        peft_s, peft_tokens = run_peft(peft_model, work[:n_peft], args.output)

    eng_tps, peft_tps = eng_tokens / eng_s, peft_tokens / peft_s
    figures = {
        "bench": "engine", "quick": args.quick, "requests": n_req, "adapters": n_ad,
        "prompt_tokens": args.prompt, "output_tokens": args.output,
        "max_batch": args.max_batch, "rank": 16,
        "engine_s": round(eng_s, 3), "engine_tokens": eng_tokens,
        "engine_tokens_per_s": round(eng_tps, 1),
        "peft_requests_timed": n_peft, "peft_s": round(peft_s, 3), "peft_tokens": peft_tokens,
        "peft_tokens_per_s": round(peft_tps, 1),
        "speedup": round(eng_tps / peft_tps, 2), "target_speedup": TARGET_SPEEDUP,
        "met": eng_tps / peft_tps >= TARGET_SPEEDUP, "setup_s": round(setup_s, 1),
        "machine": machine(),
    }
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        print(f"engine throughput, bench base fp32, {n_req} requests over {n_ad} rank-16 "
              f"adapters, prompt {args.prompt}, output {args.output}")
        print(f"  engine (max_batch {args.max_batch}): {eng_tps:8.1f} tokens/s "
              f"({eng_tokens} tokens in {eng_s:.2f}s)")
        print(f"  peft one at a time:   {peft_tps:8.1f} tokens/s "
              f"({peft_tokens} tokens in {peft_s:.2f}s, first {n_peft} requests)")
        verdict = "met" if figures["met"] else "NOT met"
        print(f"  speedup: {figures['speedup']:.2f}x (target >= {TARGET_SPEEDUP}x: {verdict})")
    return figures


if __name__ == "__main__":
    main()
    sys.exit(0)
