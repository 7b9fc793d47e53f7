"""Adapter algebra, measured: what compression and merging keep, and what they save.

    python -m bench.algebra                  # both parts (~15 min on 2 busy cores)
    python -m bench.algebra --part quality   # the exact-match tables only
    python -m bench.algebra --part serving   # slot bytes and decode-step time only
    python -m bench.algebra --json           # the figures as JSON on stdout

Quality: on the tiny embedded base (built and pre-trained once, cached in
bench/results/algebra/), the three demo tenants' adapters are trained with the demo recipe
(`trainer.tasks.DEMO_TRAIN_CONFIG`, rank 16), registered, compressed to ranks 8/4/2/1 and to
energy 0.9/0.95/0.99 (per module) with `registry compress`'s own code, and each version is
scored on its task's 50 held-out examples with the trainer's evaluation (greedy exact-match,
fp32). Then acme's and globex's adapters are merged (cat, linear, ties, svd; weights 1, 1)
and every merge is scored on both tasks. The adapters are registered under one tenant
(`bench/…`): the registry refuses cross-tenant merges, so a merge of two tenants' adapters
is something a tenant does with adapters it owns.

Serving: the same adapters at rank 16 and compressed to rank 4, loaded into the runtime's
batched LoRA layers (`runtime.layers.inject_lora`, which computes at the true rank of the
adapters in a batch): bytes per adapter (the host cache / load-copy cost), device bytes of
one slot at max_rank 16 vs 4, and the median time of one decode step of 32 rows spread over
the three adapters (KV cache of a 32-token prompt), and of one 8x64-token prefill chunk,
against the base alone, rounds interleaved. Times are this thread's CPU time with one torch
thread (`time.thread_time`): on a shared 2-core machine wall time mostly measures the
neighbours, CPU time measures the work.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent / "results" / "algebra"
TENANTS = ("acme", "globex", "initech")
RANKS = (8, 4, 2, 1)
ENERGIES = (0.9, 0.95, 0.99)
MERGES = (("cat", {}), ("linear", {}), ("ties", {"density": 0.5}), ("svd", {"svd_rank": 16}))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


SMOKE = {"size": "micro", "max_steps": 4, "n_test": 4}  # a fast run of every code path


def prepare(root: Path, smoke: bool = False):
    """(registry, base_dir, data paths, {tenant: version}); everything cached under root."""
    from loraplex.basemodel import build_base, default_pretrain
    from loraplex.registry import Identity, Registry
    from loraplex.trainer.config import TrainConfig
    from loraplex.trainer.tasks import DEMO_TRAIN_CONFIG, write_tasks
    from loraplex.trainer.train import train

    base = root / "base"
    if not (base / "loraplex_base.json").is_file():
        t0 = time.perf_counter()
        size = SMOKE["size"] if smoke else "tiny"
        build_base(base, size=size, arch="llama", seed=0, pretrain=default_pretrain(size))
        log(f"built the tiny base in {time.perf_counter() - t0:.0f}s")
    data = write_tasks(root / "data", n_test=SMOKE["n_test"] if smoke else 50)
    reg = Registry.open(root / "reg")
    admin = Identity.system()
    reg.register_base(admin, base)
    versions = {}
    for tenant in TENANTS:
        run = root / "runs" / tenant
        adapter = run / "adapter"
        if not (adapter / "adapter_model.safetensors").is_file():
            t0 = time.perf_counter()
            recipe = {**DEMO_TRAIN_CONFIG, **({"max_steps": SMOKE["max_steps"]} if smoke else {})}
            cfg = TrainConfig(base=str(base), data=str(data[tenant]["train"]),
                              name=f"bench/{tenant}", output_dir=str(run), publish=False,
                              **recipe)
            train(cfg, progress=False)
            log(f"trained {tenant} in {time.perf_counter() - t0:.0f}s")
        versions[tenant] = reg.push(admin, adapter, f"bench/{tenant}", base=base)
    return reg, base, data, versions


def quality(root: Path, smoke: bool = False) -> dict:
    from loraplex.registry import Identity
    from loraplex.registry.derive import compress_version, merge_versions
    from loraplex.trainer.data import load_jsonl
    from loraplex.trainer.gate import score

    reg, base, data, versions = prepare(root, smoke)
    me = Identity.system()
    tests = {t: load_jsonl(data[t]["test"]).examples for t in TENANTS}
    rows = []
    for tenant, v in versions.items():
        variants = [("trained", v)]
        variants += [(f"rank {k}", compress_version(reg, me, v.ref, rank=k,
                                                   name=f"bench/{tenant}-r{k}")) for k in RANKS]
        variants += [(f"energy {e}", compress_version(reg, me, v.ref, energy=e,
                                                      name=f"bench/{tenant}-e{e}"))
                     for e in ENERGIES]
        for label, dv in variants:
            em = score(reg, me, dv.ref, base, tests[tenant])["exact_match"]
            ranks = dv.lineage.get("ranks", [dv.rank])
            rows.append({"tenant": tenant, "variant": label, "ref": dv.ref,
                         "ranks": f"{min(ranks)}-{max(ranks)}" if len(set(ranks)) > 1
                         else str(ranks[0]), "size_bytes": dv.size_bytes,
                         "energy_kept": dv.lineage.get("energy_kept", 1.0),
                         "exact_match": em})
            log(f"{tenant:8} {label:12} {em:.2f} {dv.size_bytes} B")
    merges = []
    pair = [versions["acme"].ref, versions["globex"].ref]
    for method, kw in MERGES:
        mv = merge_versions(reg, me, pair, name=f"bench/acme-globex-{method}", method=method,
                            weights=[1.0, 1.0], **kw)
        got = {t: score(reg, me, mv.ref, base, tests[t])["exact_match"]
               for t in ("acme", "globex")}
        merges.append({"method": method, "params": kw, "ref": mv.ref, "rank": mv.rank,
                       "size_bytes": mv.size_bytes, "exact_match": got})
        log(f"merge {method:7} {got}")
    reg.close()
    return {"compress": rows, "merge": merges}


# ------------------------------------------------------------------------------ serving
def serving(root: Path, smoke: bool = False, batch: int = 32, prompt_len: int = 32) -> dict:
    from transformers import AutoModelForCausalLM, DynamicCache

    from loraplex.registry import Identity
    from loraplex.registry.derive import compress_version
    from loraplex.runtime.lora.layers import inject_lora

    reg, base, _, versions = prepare(root, smoke)
    rounds = 2 if smoke else 15
    me = Identity.system()
    small = {t: compress_version(reg, me, v.ref, rank=4, name=f"bench/{t}-r4")
             for t, v in versions.items()}
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    model.requires_grad_(False)
    inj = inject_lora(model, None, max_slots=6, max_rank=16)
    slots = {}
    for i, v in enumerate([*versions.values(), *small.values()], start=1):
        loaded = reg.load_adapter(v)
        cfg = loaded.config
        inj.load_adapter(i, loaded.tensors, cfg["r"], cfg["lora_alpha"],
                         bool(cfg.get("use_rslora")), rank_pattern=cfg.get("rank_pattern"),
                         alpha_pattern=cfg.get("alpha_pattern"))
        slots[v.ref] = i
    reg.close()
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, 250, (batch, prompt_len), generator=g)  # [B, P]
    cache = DynamicCache()
    inj.clear_batch()
    with torch.no_grad():
        model(input_ids=prompt, past_key_values=cache, use_cache=True)
    step_ids = torch.randint(3, 250, (batch, 1), generator=g)  # [B, 1]
    positions = torch.full((batch, 1), prompt_len)  # [B, 1]
    rows = {"base": [0] * batch,
            "rank 16 (trained)": [1 + i % 3 for i in range(batch)],
            "rank 4 (compressed)": [4 + i % 3 for i in range(batch)]}
    times: dict[str, list[float]] = {k: [] for k in rows}

    @torch.no_grad()
    def step(row_slots: list[int]) -> float:
        inj.set_batch(row_slots)
        t0 = time.thread_time()
        model(input_ids=step_ids, past_key_values=cache, use_cache=True,
              position_ids=positions)
        dt = time.thread_time() - t0
        cache.crop(-1)
        return dt

    chunk = torch.randint(3, 250, (8, 64), generator=g)  # [8, 64]: a prefill chunk

    @torch.no_grad()
    def prefill(row_slots: list[int]) -> float:
        inj.set_batch(row_slots[:8])
        t0 = time.thread_time()
        model(input_ids=chunk)
        return time.thread_time() - t0

    pre: dict[str, list[float]] = {k: [] for k in rows}
    for _ in range(3):  # warm-up
        for r in rows.values():
            step(r)
            prefill(r)
    for _ in range(rounds):
        for k, r in rows.items():
            times[k].append(step(r))
            pre[k].append(prefill(r))
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    pre_med = {k: statistics.median(v) * 1e3 for k, v in pre.items()}
    true_bytes = {k: _true_rank_bytes(inj, rng) for k, rng in
                  (("rank 16 (trained)", (1, 2, 3)), ("rank 4 (compressed)", (4, 5, 6)))}
    stack16 = sum(4 * 16 * (lay.in_features + lay.out_features) for lay in inj.layers.values())
    return {
        "batch": batch, "prompt_len": prompt_len, "rounds": rounds,
        "step_ms": {k: round(v, 3) for k, v in med.items()},
        "prefill_8x64_ms": {k: round(v, 3) for k, v in pre_med.items()},
        "lora_overhead_ms": {k: round(med[k] - med["base"], 3) for k in med if k != "base"},
        "adapter_bytes": {"rank 16 (trained)": [v.size_bytes for v in versions.values()],
                          "rank 4 (compressed)": [v.size_bytes for v in small.values()]},
        "true_rank_bytes_per_adapter": true_bytes,
        "slot_stack_bytes": {"max_rank 16": stack16, "max_rank 4": stack16 // 4},
    }


def _true_rank_bytes(inj, slots) -> int:
    """fp32 bytes of one adapter's A and B at its true rank (mean over `slots`)."""
    total = 0
    for s in slots:
        for lay in inj.layers.values():
            r = int(lay.ranks[s])
            total += 4 * r * (lay.in_features + lay.out_features)
    return total // len(slots)


# ------------------------------------------------------------------------------ output
def print_quality(q: dict) -> None:
    print("\n| tenant | adapter | ranks | energy kept | size | held-out exact-match | vs trained |")
    print("|---|---|---|---|---|---|---|")
    trained = {r["tenant"]: r["exact_match"] for r in q["compress"] if r["variant"] == "trained"}
    for r in q["compress"]:
        rel = r["exact_match"] / trained[r["tenant"]] if trained[r["tenant"]] else float("nan")
        print(f"| {r['tenant']} | {r['variant']} | {r['ranks']} | {r['energy_kept']:.3f} | "
              f"{r['size_bytes'] / 1024:.0f} KiB | {r['exact_match']:.0%} | {rel:.0%} |")
    print("\n| merge of acme + globex (weights 1, 1) | rank | size | acme exact-match | "
          "globex exact-match |")
    print("|---|---|---|---|---|")
    for m in q["merge"]:
        p = ", ".join(f"{k} {v}" for k, v in m["params"].items())
        print(f"| {m['method']}{f' ({p})' if p else ''} | {m['rank']} | "
              f"{m['size_bytes'] / 1024:.0f} KiB | {m['exact_match']['acme']:.0%} | "
              f"{m['exact_match']['globex']:.0%} |")


def print_serving(s: dict) -> None:
    print(f"\ndecode step, batch {s['batch']} over 3 adapters, KV cache of {s['prompt_len']} "
          f"tokens, median of {s['rounds']} rounds (fp32, CPU)")
    print("| | decode step ms | LoRA overhead ms | prefill 8x64 ms | bytes per adapter "
          "(true rank, fp32) |")
    print("|---|---|---|---|---|")
    for k, ms in s["step_ms"].items():
        over = s["lora_overhead_ms"].get(k)
        b = s["true_rank_bytes_per_adapter"].get(k)
        print(f"| {k} | {ms:.2f} | {'-' if over is None else f'{over:.2f}'} | "
              f"{s['prefill_8x64_ms'][k]:.1f} | {'-' if b is None else f'{b / 1024:.0f} KiB'} |")
    print(f"device bytes of one slot: {s['slot_stack_bytes']['max_rank 16'] / 1024:.0f} KiB "
          f"at max_rank 16, {s['slot_stack_bytes']['max_rank 4'] / 1024:.0f} KiB at max_rank 4")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("all", "quality", "serving"), default="all")
    ap.add_argument("--root", type=Path, default=ROOT, help="cache and registry directory")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--smoke", action="store_true",
                    help="micro base, 4 training steps: checks the code paths, not the figures")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(1)  # see the docstring: shared cores
    out: dict = {}
    root = a.root.with_name(a.root.name + "-smoke") if a.smoke else a.root
    if a.part in ("all", "quality"):
        out["quality"] = quality(root, a.smoke)
    if a.part in ("all", "serving"):
        out["serving"] = serving(root, a.smoke)
    if a.json:
        print(json.dumps(out, indent=2))
        return 0
    if "quality" in out:
        print_quality(out["quality"])
    if "serving" in out:
        print_serving(out["serving"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
