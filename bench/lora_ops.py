"""Mixed-batch overhead of the batched LoRA layers, against the base and against peft; and
what small-rank rows cost beside large-rank rows.

    python -m bench.lora_ops            # full run (a few minutes on 2 cores)
    python -m bench.lora_ops --quick    # about a minute
    python -m bench.lora_ops --json     # the figures as JSON on stdout
    python -m bench.lora_ops --stacks float32,bfloat16   # fp32 and bf16 adapter stacks, one run
    python -m bench.lora_ops --device cuda --kernels torch,triton   # on a GPU (bf16 base)
    python -m bench.lora_ops --part ranks --quick   # only the mixed-rank part

On the `bench` base (~100M params, fp32), rank-16 adapters on all seven projections, batch 32,
one decode step (1 new token per row over a KV cache of a 32-token prompt): the step time
with N in {1, 4, 16, 32} distinct adapters (rows assigned to adapters in a shuffled order,
as an engine's rows are) divided by the plain base's step at the same batch; and peft's own
mixed batch (`model(..., adapter_names=[...])`) on the same base and adapters, divided by
the same base step. Each variant (stack dtype x kernel: `--stacks`, `--kernels`) is its own
injection over the same weights, timed in the same rounds; the first is "ours". Every configuration is timed in each round, rounds interleaved, after a
warm-up; figures are medians over rounds. The ratios are what to compare across machines.

Mixed ranks (`run_mixed_ranks`, `--part ranks`): 32 decode rows of ranks 8 and 16 alone and
beside 8 rows of ranks 64 and 256, with the slots in rank buckets (as the engine holds them)
and in one stack of rank 256: the small rows' LoRA cost beside the large rows over their
cost alone (target <= 1.1x with buckets), and the mixed batch's whole decode step by
strategy (bench/README.md, "Mixed ranks").
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
from collections.abc import Callable
from pathlib import Path

import torch

from loraplex.compute import cpu_model

ROOT = Path(__file__).resolve().parent
DEFAULT_BASE_DIR = ROOT / "results" / "base-bench-llama"
TARGETS = {"ours_n1": 1.15, "ours_n32": 1.35, "speedup_vs_peft_n32": 2.5}
NS = (1, 4, 16, 32)
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def bench_base(base_dir: Path) -> Path:
    """The deterministic bench base, built once and reused (bench/results/ is git-ignored)."""
    from loraplex.basemodel import build_base

    meta = base_dir / "loraplex_base.json"
    if meta.is_file() and json.loads(meta.read_text()).get("size") == "bench":
        return base_dir
    print(f"building the bench base in {base_dir} (once) ...", file=sys.stderr)
    return build_base(base_dir, size="bench", arch="llama", seed=0)


def _describe(base_dir: Path) -> str:
    """`name (arch, L layers, hidden H)` of a base directory given with --base."""
    cfg = json.loads((Path(base_dir) / "config.json").read_text())
    return (f"{Path(base_dir).name} ({cfg.get('model_type')}, {cfg.get('num_hidden_layers')} "
            f"layers, hidden {cfg.get('hidden_size')})")


def load_fp32(base_dir: Path, dtype: torch.dtype = torch.float32, device: str = "cpu",
              quantization: str = "none"):
    """The bench base (fp32 by default; `quantization` "nf4"/"int8" through the runtime's
    own loader, bitsandbytes, with `dtype` as compute dtype)."""
    if quantization != "none":
        from loraplex.runtime.model.loading import load_base

        model = load_base(base_dir, quantization=quantization, compute_dtype=dtype,
                          device=device).model
        return model.eval().requires_grad_(False)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype).to(device)
    return model.eval().requires_grad_(False)


def make_adapters(model, n: int, rank: int):
    """peft model holding `n` random rank-`rank` adapters; returns it and their state dicts."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    torch.manual_seed(0)
    peft_model, dicts = None, {}
    for i in range(n):
        cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=PROJECTIONS,
                         init_lora_weights=False, lora_dropout=0.0)
        name = f"ad{i + 1}"
        if peft_model is None:
            peft_model = get_peft_model(model, cfg, adapter_name=name)
        else:
            peft_model.add_adapter(name, cfg)
        with torch.no_grad():  # keep deltas small, like trained adapters, so logits stay sane
            for mod in peft_model.modules():
                if hasattr(mod, "lora_B") and name in mod.lora_B:
                    mod.lora_B[name].weight.mul_(0.01)
        dicts[name] = get_peft_model_state_dict(peft_model, adapter_name=name)
    return peft_model.eval(), dicts


def prefill_cache(model, batch: int, prompt_len: int):
    """A KV cache holding a random `prompt_len`-token prompt for each of `batch` rows. One
    cache serves every configuration: a step's cost does not depend on the cached values."""
    from transformers import DynamicCache

    prompt = torch.randint(0, 256, (batch, prompt_len),
                           generator=torch.Generator().manual_seed(0))  # [B, P]
    prompt = prompt.to(model.device)
    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=prompt, past_key_values=cache, use_cache=True)
    return cache


class DecodeStep:
    """One decode step of batch B over `cache` (a prompt of `prompt_len`), repeatable: the
    step's token is cropped off the cache afterwards."""

    def __init__(self, model, cache, batch: int, prompt_len: int, before: Callable[[], None],
                 kwargs: dict | None = None) -> None:
        g = torch.Generator().manual_seed(1)
        self.model, self.cache, self.before, self.kwargs = model, cache, before, kwargs or {}
        dev = model.device
        self.next_ids = torch.randint(0, 256, (batch, 1), generator=g).to(dev)  # [B, 1]
        self.positions = torch.full((batch, 1), prompt_len, device=dev)  # [B, 1]
        self.cuda = dev.type == "cuda"  # time the GPU's work, not only the launches

    clock: Callable[[], float] = time.perf_counter

    @torch.no_grad()
    def __call__(self) -> float:
        self.before()
        if self.cuda:
            torch.cuda.synchronize()
        t0 = self.clock()
        self.model(input_ids=self.next_ids, past_key_values=self.cache, use_cache=True,
                   position_ids=self.positions, **self.kwargs)
        if self.cuda:
            torch.cuda.synchronize()
        dt = self.clock() - t0
        self.cache.crop(-1)  # drop the step's token: back to the prompt
        return dt


def run(quick: bool, base_dir: Path, batch: int = 32, prompt_len: int = 32, rank: int = 16,
        rounds: int | None = None, clock: str = "wall", device: str = "cpu",
        stacks: tuple[str, ...] = ("float32",), kernels: tuple[str, ...] = ("auto",),
        quantization: str = "none", base: Path | None = None) -> dict:
    from loraplex.runtime.lora.layers import inject_lora

    rounds = rounds or (6 if quick else 20)
    # "cpu": this thread's CPU time (with 1 torch thread), blind to time spent descheduled by
    # other processes on a shared machine; "wall": what a user waits (the default)
    DecodeStep.clock = staticmethod(time.thread_time if clock == "cpu" else time.perf_counter)
    base_dir = Path(base) if base else bench_base(base_dir)
    _say(f"loading the base and making {max(NS)} peft adapters ...")
    base_dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    plain = load_fp32(base_dir, base_dtype, device, quantization)
    variants = [(st, k) for st in stacks for k in kernels]
    models = [load_fp32(base_dir, base_dtype, device, quantization)
              for _ in range(len(variants) + 1)]
    if quantization == "none":  # one copy of the weights: same memory for every config
        for other in models:
            other.load_state_dict(plain.state_dict(), assign=True)
    peft_base, ours_models = models[0], models[1:]
    peft_model, dicts = make_adapters(peft_base, max(NS), rank)
    injections = {}
    for (st, k), model in zip(variants, ours_models, strict=True):
        inj = inject_lora(model, PROJECTIONS, max_slots=max(NS), max_rank=rank,
                          stack_dtype=st, kernel=k)
        for slot, (_name, sd) in enumerate(dicts.items(), start=1):
            inj.load_adapter(slot, sd, r=rank, alpha=2 * rank)
        injections[_variant_name(st, k)] = (model, inj)

    order = torch.randperm(batch, generator=torch.Generator().manual_seed(1)).tolist()
    row_slots = {n: [order[i] % n + 1 for i in range(batch)] for n in NS}  # shuffled rows

    def noop() -> None:
        return None

    cache = prefill_cache(plain, batch, prompt_len)
    steps: dict[str, DecodeStep] = {"base": DecodeStep(plain, cache, batch, prompt_len, noop)}
    strategies = {}
    for n in NS:
        slots = row_slots[n]
        for vname, (model, inj) in injections.items():
            steps[f"{vname}_n{n}"] = DecodeStep(model, cache, batch, prompt_len,
                                                lambda s=slots, i=inj: i.set_batch(s))
            inj.set_batch(slots)
            strategies[(vname, n)] = inj.batch.plan_for(batch, batch).strategy
        names = [f"ad{s}" for s in slots]
        steps[f"peft_n{n}"] = DecodeStep(peft_model, cache, batch, prompt_len, noop,
                                         {"adapter_names": names})

    times = interleaved_times(steps, rounds, _say)
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["base"]
    first = next(iter(injections))
    result = {
        "config": {"base": _describe(base_dir) if base else
                   "bench (llama, 8 layers, hidden 1024, ~100M params)",
                   "dtype": str(base_dtype).removeprefix("torch."), "rank": rank,
                   "batch": batch, "prompt_len": prompt_len, "device": device,
                   "quantization": quantization,
                   "variants": list(injections), "ours": first,
                   "projections": PROJECTIONS, "rounds": rounds, "quick": quick,
                   "clock": clock},
        "machine": machine(),
        "base_ms": base * 1e3,
        "min_ms": {k: min(v) * 1e3 for k, v in times.items()},  # for noisy machines
        "rows": [],
    }
    for n in NS:
        o, p = med[f"{first}_n{n}"], med[f"peft_n{n}"]
        result["rows"].append({
            "n_adapters": n, "strategy": strategies[(first, n)],
            "ours_ms": o * 1e3, "ours_ratio": o / base,
            "peft_ms": p * 1e3, "peft_ratio": p / base, "speedup_vs_peft": p / o,
            "variants": {v: {"strategy": strategies[(v, n)], "ms": med[f"{v}_n{n}"] * 1e3,
                             "ratio": med[f"{v}_n{n}"] / base,
                             "speedup_vs_peft": p / med[f"{v}_n{n}"]}
                         for v in injections},
        })
    by_n = {r["n_adapters"]: r for r in result["rows"]}
    result["targets"] = {
        "ours_n1": {"value": by_n[1]["ours_ratio"], "target": f"<= {TARGETS['ours_n1']}",
                    "met": by_n[1]["ours_ratio"] <= TARGETS["ours_n1"]},
        "ours_n32": {"value": by_n[32]["ours_ratio"], "target": f"<= {TARGETS['ours_n32']}",
                     "met": by_n[32]["ours_ratio"] <= TARGETS["ours_n32"]},
        "speedup_vs_peft_n32": {"value": by_n[32]["speedup_vs_peft"],
                                "target": f">= {TARGETS['speedup_vs_peft_n32']}",
                                "met": by_n[32]["speedup_vs_peft"]
                                >= TARGETS["speedup_vs_peft_n32"]},
    }
    return result


def _variant_name(stack_dtype: str, kernel: str) -> str:
    short = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(stack_dtype,
                                                                           stack_dtype)
    return f"ours_{short}" + ("" if kernel == "auto" else f"_{kernel}")


def interleaved_times(steps: dict[str, Callable[[], float]], rounds: int,
                      say: Callable[[str], None]) -> dict[str, list[float]]:
    """Seconds of each step in each of `rounds`, after two warm-up calls each; the steps run
    interleaved within a round, so drift on the machine hits every configuration alike."""
    say("warm-up ...")
    for step in steps.values():
        for _ in range(2):
            step()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for i in range(rounds):
        say(f"round {i + 1}/{rounds}")
        for key, step in steps.items():
            times[key].append(step())
    return times


def _say(msg: str) -> None:
    print(f"[bench.lora_ops {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _load_avg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def render(result: dict) -> str:
    c = result["config"]
    lines = [
        f"bench.lora_ops — decode step, batch {c['batch']}, KV {c['prompt_len']}, rank "
        f"{c['rank']} on 7 projections, {c['dtype']} {c['quantization']} base on {c['device']}, {c['rounds']} rounds "
        f"(medians, {c['clock']} clock); ours = {c['ours']}",
        machine_line(result["machine"]),
        f"base-only step: {result['base_ms']:.1f} ms",
        "",
        f"{'N adapters':>10} {'strategy':>9} {'ours ms':>8} {'ours/base':>9} "
        f"{'peft ms':>8} {'peft/base':>9} {'peft/ours':>9}",
    ]
    for r in result["rows"]:
        lines.append(f"{r['n_adapters']:>10} {r['strategy']:>9} {r['ours_ms']:>8.1f} "
                     f"{r['ours_ratio']:>8.2f}x {r['peft_ms']:>8.1f} {r['peft_ratio']:>8.2f}x "
                     f"{r['speedup_vs_peft']:>8.2f}x")
    if len(c["variants"]) > 1:
        lines += ["", f"{'N adapters':>10} {'variant':>18} {'strategy':>9} {'ms':>8} "
                      f"{'x base':>7} {'peft/it':>8}"]
        for r in result["rows"]:
            for v, f in r["variants"].items():
                lines.append(f"{r['n_adapters']:>10} {v:>18} {f['strategy']:>9} {f['ms']:>8.1f} "
                             f"{f['ratio']:>6.2f}x {f['speedup_vs_peft']:>7.2f}x")
    lines.append("")
    labels = {"ours_n1": "ours/base at N=1", "ours_n32": "ours/base at N=32",
              "speedup_vs_peft_n32": "peft/ours at N=32"}
    for key, t in result["targets"].items():
        verdict = "met" if t["met"] else "NOT met"
        if not t["met"]:
            want = float(t["target"].split()[-1])
            verdict += f" (gap: {t['value'] - want:+.3f})"
        lines.append(f"target {labels[key]:<20} {t['target']:>7}: {t['value']:.3f}  {verdict}")
    return "\n".join(lines)


# ------------------------------------------------------------------------ mixed ranks
# rank -> (adapters, decode rows): the small rows whose cost is watched, and the large rows
# that join them
MIXED = {8: (4, 16), 16: (4, 16), 64: (1, 4), 256: (1, 4)}
SMALL_RANKS = (8, 16)
MIXED_TARGET = 1.10  # small rows' LoRA cost beside rank-64/256 rows ÷ their cost alone
# the slots of one injection each: rank buckets of their own for 64 and 256, or every slot
# in one stack of rank 256 (a server whose max LoRA rank is 256), or, for the small rows
# alone, one stack of rank 16 (a server that serves no large rank)
LAYOUTS = {"buckets": ((16, 8), (64, 1), (256, 1)), "one_stack_256": ((256, 10),),
           "one_stack_16": ((16, 8),)}
MIXED_STRATEGIES = ("auto", "grouped", "segments")
# the LoRA work alone, per (layout, strategy): what the engine does; one stack of rank 256
# padding every row to rank 256 (one padded bmm per layer), and looping over its slots, each
# at its own rank (what `make_plan` picks there for the mixed batch; forced, so that the
# large rows alone run the same way and the difference is the small rows')
LORA_RUNS = (("buckets", None), ("one_stack_256", "grouped"), ("one_stack_256", "segments"))
OP_ROUNDS = 5  # LoRA-only steps are short: this many times the rounds, for a steadier ratio


def random_adapter(model, rank: int, seed: int) -> dict[str, torch.Tensor]:
    """peft-named A/B tensors of rank `rank` on every PROJECTIONS layer of `model`, with the
    small deltas of trained adapters (B scaled by 0.01)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, mod in model.named_modules():
        if name.rsplit(".", 1)[-1] in PROJECTIONS and hasattr(mod, "in_features"):
            n_in, n_out = mod.in_features, mod.out_features
            out[f"{name}.lora_A.weight"] = torch.randn(rank, n_in, generator=g) / n_in ** 0.5
            out[f"{name}.lora_B.weight"] = 0.01 * torch.randn(n_out, rank, generator=g)
    return out


def mixed_rows(seed: int = 2) -> tuple[list[int], list[int], list[int]]:
    """Slots of the small rows, the large rows, and both in one batch, each in a shuffled
    order (as an engine's rows are). Adapters of MIXED take slots 1, 2, … rank by rank."""
    small, large, slot = [], [], 1
    for rank, (adapters, rows) in MIXED.items():
        mine = [slot + i % adapters for i in range(rows)]
        (small if rank in SMALL_RANKS else large).extend(mine)
        slot += adapters
    g = torch.Generator().manual_seed(seed)

    def shuffled(xs: list[int]) -> list[int]:
        return [xs[i] for i in torch.randperm(len(xs), generator=g).tolist()]

    return shuffled(small), shuffled(large), shuffled(small + large)


class LoraStep:
    """The LoRA work of one decode step alone, without the base model: the plan (once per
    step, as the engine makes it) and `add_lora` in every LoRA layer, on fixed random rows.
    What rows of some ranks cost is then a difference of these, free of the base's noise."""

    clock: Callable[[], float] = time.perf_counter

    def __init__(self, inj, slots: list[int], strategy: str | None = None) -> None:
        from loraplex.runtime.lora.ops import add_lora, make_plan

        self.inj, self.slots, self.strategy = inj, slots, strategy
        self.add_lora, self.make_plan = add_lora, make_plan
        g = torch.Generator().manual_seed(3)
        self.io = []
        for layer in inj.layers.values():
            dt, dev = layer.lora_a.dtype, layer.lora_a.device
            x = torch.randn(len(slots), layer.in_features, generator=g).to(dev, dt)  # [B, in]
            y = torch.zeros(len(slots), layer.out_features, dtype=dt, device=dev)  # [B, out]
            self.io.append((layer, x, y))
        self.cuda = inj.batch._device.type == "cuda"

    @torch.no_grad()
    def __call__(self) -> float:
        for _, _, y in self.io:
            y.zero_()
        if self.cuda:
            torch.cuda.synchronize()
        t0 = self.clock()
        plan = self.make_plan(self.slots, slot_ranks=self.inj.slot_ranks,
                              device=self.inj.batch._device, strategy=self.strategy,
                              kernel=self.inj.batch.kernel, layout=self.inj.layout)
        for layer, x, y in self.io:
            self.add_lora(y, x, layer.a_stacks, layer.b_stacks, layer.lora_scale, plan)
        if self.cuda:
            torch.cuda.synchronize()
        return self.clock() - t0


def run_mixed_ranks(quick: bool, base_dir: Path, prompt_len: int = 32, rounds: int | None = None,
                    clock: str = "wall", device: str = "cpu", quantization: str = "none",
                    base: Path | None = None) -> dict:
    """The cost of rank-8 and rank-16 rows alone and beside rank-64 and rank-256 rows, per
    slot layout (LAYOUTS), and the whole decode step of the mixed batch by strategy."""
    from loraplex.runtime.lora.layers import inject_lora

    rounds = rounds or (6 if quick else 20)
    tick = time.thread_time if clock == "cpu" else time.perf_counter
    DecodeStep.clock = LoraStep.clock = staticmethod(tick)
    base_dir = Path(base) if base else bench_base(base_dir)
    base_dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    _say("mixed ranks: loading the base and making adapters of ranks "
         f"{', '.join(map(str, MIXED))} ...")
    plain = load_fp32(base_dir, base_dtype, device, quantization)
    adapters = []  # (slot, rank, tensors)
    slot = 1
    for rank, (n, _rows) in MIXED.items():
        for i in range(n):
            adapters.append((slot, rank, random_adapter(plain, rank, seed=100 * rank + i)))
            slot += 1
    injections = {}
    for name, rank_slots in LAYOUTS.items():
        model = load_fp32(base_dir, base_dtype, device, quantization)
        if quantization == "none":  # one copy of the weights: same memory for every layout
            model.load_state_dict(plain.state_dict(), assign=True)
        inj = inject_lora(model, PROJECTIONS, max_slots=rank_slots[0][1],
                          max_rank=rank_slots[-1][0], rank_slots=rank_slots)
        for s, rank, tensors in adapters:
            if s <= inj.max_slots and rank <= inj.max_rank:
                inj.load_adapter(s, tensors, r=rank, alpha=2 * rank)
        injections[name] = (model, inj)

    small, large, mixed = mixed_rows()
    ops: dict[str, Callable[[], float]] = {
        "one_stack_16/small": LoraStep(injections["one_stack_16"][1], small)}
    for name, strategy in LORA_RUNS:
        inj = injections[name][1]
        for rows, slots in (("small", small), ("large", large), ("mixed", mixed)):
            ops[f"{_run_name(name, strategy)}/{rows}"] = LoraStep(inj, slots, strategy)
    times = interleaved_times(ops, OP_ROUNDS * rounds, _say)
    op_ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}

    cache = prefill_cache(plain, len(mixed), prompt_len)
    steps: dict[str, Callable[[], float]] = {
        "base": DecodeStep(plain, cache, len(mixed), prompt_len, lambda: None)}
    plan_names = {}
    for name in ("buckets", "one_stack_256"):
        model, inj = injections[name]
        for strategy in MIXED_STRATEGIES:
            def before(i=inj, s=None if strategy == "auto" else strategy) -> None:
                if s is None:
                    i.set_batch(mixed)
                else:  # a forced strategy, planned before the clock starts
                    from loraplex.runtime.lora.ops import make_plan

                    i.batch.set_plan(make_plan(mixed, slot_ranks=i.slot_ranks,
                                               device=i.batch._device, strategy=s,
                                               kernel="torch", layout=i.layout))
            steps[f"{name}/{strategy}"] = DecodeStep(model, cache, len(mixed), prompt_len,
                                                     before)
            before()
            plan = inj.batch.plan_for(len(mixed), len(mixed))
            plan_names[f"{name}/{strategy}"] = "+".join(p.strategy for p in plan.parts) \
                if plan.parts else plan.strategy
    step_times = interleaved_times(steps, rounds, _say)
    step_ms = {k: statistics.median(v) * 1e3 for k, v in step_times.items()}

    layouts = {}
    for name, strategy in LORA_RUNS:
        run = _run_name(name, strategy)
        s, lg, mx = (op_ms[f"{run}/{k}"] for k in ("small", "large", "mixed"))
        # per round (the three were timed side by side), then the median: steadier than a
        # ratio of medians on a busy machine
        per_round = [(m - g) / a for a, g, m in zip(
            *(times[f"{run}/{k}"] for k in ("small", "large", "mixed")), strict=True)]
        lows = {k: min(times[f"{run}/{k}"]) for k in ("small", "large", "mixed")}
        layouts[run] = {"rank_slots": LAYOUTS[name], "strategy": strategy or "auto",
                        "small_ms": s, "large_ms": lg, "mixed_ms": mx,
                        "small_in_mixed_ms": mx - lg,
                        "small_ratio": statistics.median(per_round),
                        # the same from each step's fastest round, a check on a busy machine
                        "small_ratio_of_minima": (lows["mixed"] - lows["large"]) / lows["small"]}
    reference = op_ms["one_stack_16/small"]
    result = {
        "config": {"base": _describe(base_dir) if base else
                   "bench (llama, 8 layers, hidden 1024, ~100M params)",
                   "dtype": str(base_dtype).removeprefix("torch."), "device": device,
                   "quantization": quantization,
                   "rows": {str(r): {"adapters": n, "rows": rows}
                            for r, (n, rows) in MIXED.items()},
                   "prompt_len": prompt_len, "rounds": rounds,
                   "lora_rounds": OP_ROUNDS * rounds, "quick": quick,
                   "clock": clock, "projections": PROJECTIONS},
        "machine": machine(),
        "lora_ms": op_ms,
        "small_rows_ms_one_stack_16": reference,
        "layouts": layouts,
        "step_ms": step_ms,
        "step_plans": plan_names,
        "target": {"value": layouts["buckets"]["small_ratio"], "target": f"<= {MIXED_TARGET}",
                   "met": layouts["buckets"]["small_ratio"] <= MIXED_TARGET},
    }
    return result


def _run_name(layout: str, strategy: str | None) -> str:
    return layout if strategy is None else f"{layout}/{strategy}"


def machine() -> dict:
    """The machine every figure names: CPU model and capability, cores, torch, load."""
    return {"platform": platform.platform(), "cpu": cpu_model(),
            "capability": torch.backends.cpu.get_cpu_capability(),
            "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "load_avg": _load_avg(),
            "command": "python -m bench.lora_ops " + " ".join(sys.argv[1:])}


def machine_line(m: dict) -> str:
    return (f"machine: {m['cpu']} ({m['capability']}), {m['cores']} cores, "
            f"{m['torch_threads']} torch threads, torch {m['torch']}, load avg {m['load_avg']}"
            f"\ncommand: {m['command']}")


def render_mixed_ranks(result: dict) -> str:
    c, m = result["config"], result["machine"]
    rows = ", ".join(f"{v['rows']} rows of rank {r} ({v['adapters']} adapters)"
                     for r, v in c["rows"].items())
    lines = [
        f"bench.lora_ops mixed ranks — decode step, {rows}; {c['dtype']} base on "
        f"{c['device']}, {c['rounds']} rounds (medians, {c['clock']} clock)",
        machine_line(m),
        "",
        f"LoRA work of one step alone (plan + add_lora in every LoRA layer, no base model), "
        f"{c['lora_rounds']} rounds; the small rows' cost beside the large ones is mixed − "
        "large, ÷ alone per round:",
        f"{'layout':>22} {'small ms':>9} {'large ms':>9} {'mixed ms':>9} "
        f"{'small in mix':>13} {'÷ alone':>8} {'(minima)':>9} {'÷ r16 server':>13}",
    ]
    r16 = result["small_rows_ms_one_stack_16"]
    for name, f in result["layouts"].items():
        lines.append(f"{name:>22} {f['small_ms']:>9.2f} {f['large_ms']:>9.2f} "
                     f"{f['mixed_ms']:>9.2f} {f['small_in_mixed_ms']:>13.2f} "
                     f"{f['small_ratio']:>7.2f}x {f['small_ratio_of_minima']:>8.2f}x "
                     f"{f['small_in_mixed_ms'] / r16:>12.2f}x")
    lines.append(f"{'one_stack_16':>22} {r16:>9.2f}   (the small rows alone on a server of "
                 "max rank 16: the last column's reference)")
    base = result["step_ms"]["base"]
    lines += ["", f"whole decode step of the mixed batch, base-only {base:.1f} ms:",
              f"{'layout/strategy':>24} {'plan':>26} {'ms':>8} {'x base':>7}"]
    for key, ms in result["step_ms"].items():
        if key != "base":
            lines.append(f"{key:>24} {result['step_plans'][key]:>26} {ms:>8.1f} "
                         f"{ms / base:>6.2f}x")
    t = result["target"]
    verdict = "met" if t["met"] else f"NOT met (gap: {t['value'] - MIXED_TARGET:+.3f})"
    lines += ["", f"target small-rank rows beside rank 64/256, ÷ alone (buckets) "
                  f"{t['target']}: {t['value']:.3f}  {verdict}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.lora_ops", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds (about a minute)")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds (default 20, quick 6)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: thread CPU time with 1 torch thread, for a busy shared machine")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (bf16 base on cuda)")
    ap.add_argument("--stacks", default="float32",
                    help="comma list of adapter stack dtypes (float32,bfloat16,float16)")
    ap.add_argument("--kernels", default="auto",
                    help="comma list of lora_ops kernels (auto,torch,triton)")
    ap.add_argument("--quantization", default="none", choices=("none", "nf4", "int8"),
                    help="the base's quantization (bitsandbytes; nf4 is the GPU target)")
    ap.add_argument("--part", choices=("all", "adapters", "ranks"), default="all",
                    help="adapters: N distinct adapters vs base and peft; ranks: rank-8/16 "
                         "rows alone and beside rank-64/256 rows; all: both (default)")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    ap.add_argument("--base-dir", type=Path, default=DEFAULT_BASE_DIR,
                    help="where the bench base is built/cached")
    ap.add_argument("--base", type=Path, default=None, metavar="DIR",
                    help="measure on this HF base directory instead (e.g. one made by "
                         "`loraplex base import smollm2-135m-instruct DIR`)")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)  # past_key_values rename in 5.x
    if args.clock == "cpu":
        args.threads = 1  # thread CPU time only accounts for a single-threaded forward
    if args.threads:
        torch.set_num_threads(args.threads)
    result: dict = {}
    if args.part in ("all", "adapters"):
        result = run(args.quick, args.base_dir, rounds=args.rounds, clock=args.clock,
                     device=args.device, stacks=tuple(args.stacks.split(",")),
                     kernels=tuple(args.kernels.split(",")), quantization=args.quantization,
                     base=args.base)
    if args.part in ("all", "ranks"):
        result["mixed_ranks"] = run_mixed_ranks(args.quick, args.base_dir, rounds=args.rounds,
                                                clock=args.clock, device=args.device,
                                                quantization=args.quantization, base=args.base)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        parts = [render(result)] if "rows" in result else []
        if "mixed_ranks" in result:
            parts.append(render_mixed_ranks(result["mixed_ranks"]))
        print("\n\n".join(parts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
