"""Closed-loop gRPC serving benchmark: loraplex vs the obvious one-at-a-time peft server.

    python -m bench.serve            # bench base, 32 clients over 32 adapters (CPU: minutes)
    python -m bench.serve --quick    # tiny base, 8 clients over 8 adapters (~1 minute)
    python -m bench.serve --json     # one JSON object on stdout

Both servers run as subprocesses on the same machine, one after the other, under the same
load: C closed-loop clients, each repeatedly streaming a request for an adapter drawn from a
Zipf distribution over M adapters (seeded), with a fixed prompt length and a fixed number of
greedy output tokens. The baseline holds every adapter in one `peft.PeftModel` and answers
one request at a time (`set_adapter`, then a KV-cached decode loop). Reported: generated
tokens/s, TTFT p50/p99, inter-token p50/p99 (client-side), errors, and the ratios. Only
what arrives inside the measurement window (after a warm-up) counts; requests still waiting
for their first token when the window closes count with TTFT = time waited (a lower bound,
reported as `ttft_censored`).
On a shared 2-core machine expect run-to-run noise of ±10-20% or worse; both servers run
with one torch thread by default (`--threads`), see `Load.threads`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent import futures
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / ".loraplex" / "bench-serve"
RESULTS = REPO / "bench" / "results"
TENANT = "bench"


@dataclass(frozen=True)
class Load:
    size: str = "bench"  # base size (loraplex.basemodel.SIZES)
    base: str | None = None  # an existing HF base directory (e.g. imported SmolLM2) instead
    clients: int = 32
    adapters: int = 32
    rank: int = 8
    prompt_chars: int = 48  # byte-level tokenizer: one token per ASCII character
    new_tokens: int = 32
    duration_s: float = 60.0
    warmup_s: float = 15.0
    zipf_s: float = 1.1
    prefill_budget: int | None = None  # EngineConfig.prefill_token_budget; None: its default
    # OMP/torch threads of each server (0: torch's default). 1 by default: on a shared,
    # oversubscribed CPU, OpenMP workers spin at barriers while their partner is descheduled,
    # which slowed the batched engine 5-20x here (the one-row baseline far less).
    threads: int = 1
    seed: int = 0
    device: str = "cpu"  # both servers; "cuda": bf16 engine (its CUDA defaults), bf16 peft


QUICK = Load(size="tiny", clients=8, adapters=8, duration_s=15.0, warmup_s=4.0)


# -- fixtures: base and adapters (cached under .loraplex/bench-serve) -------------------------
def prepare(load: Load) -> tuple[Path, dict[str, Path]]:
    """The base directory and `{ref: adapter dir}`, built once and reused."""
    from loraplex.basemodel import build_base

    if load.base:  # adapters for this base are cached under its directory's name
        base = Path(load.base).resolve()
        root = WORK / f"dir-{base.name}-r{load.rank}"
    else:
        root = WORK / f"{load.size}-r{load.rank}"
        base = root / "base"
        if not (base / "loraplex_base.json").exists():
            build_base(base, size=load.size, seed=0)
    adapters = {f"{TENANT}/a{i:02d}": root / f"a{i:02d}" for i in range(load.adapters)}
    missing = [d for d in adapters.values() if not (d / "adapter_model.safetensors").exists()]
    if missing:
        _write_adapters(base, missing, load.rank)
    return base, adapters


def _write_adapters(base: Path, dirs: list[Path], rank: int) -> None:
    """peft-format adapters with random (non-zero) A and B: one peft model, reseeded."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=rank, lora_alpha=2 * rank,
                                      target_modules=["q_proj", "v_proj"]))
    for d in dirs:
        torch.manual_seed(int(d.name[1:]) + 1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.normal_(0, 0.02)
        model.save_pretrained(d)


# -- the baseline server ----------------------------------------------------------------------
def baseline_server(base: Path, adapters: dict[str, Path], port: int) -> None:
    """One request at a time: set_adapter, then a plain KV-cached greedy decode loop."""
    import grpc
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraplex.v1 import inference_pb2, inference_pb2_grpc

    tok = AutoTokenizer.from_pretrained(base)
    device = os.environ.get("LORAPLEX_BENCH_DEVICE", "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype).to(device)
    names = {ref: ref.split("/")[1] for ref in adapters}
    first, *rest = adapters
    model = PeftModel.from_pretrained(model, adapters[first], adapter_name=names[first])
    for ref in rest:
        model.load_adapter(adapters[ref], adapter_name=names[ref])
    model.eval()
    lock = threading.Lock()

    class Baseline(inference_pb2_grpc.InferenceServiceServicer):
        def GenerateStream(self, request, context):
            t0 = time.monotonic()
            with lock, torch.inference_mode():
                model.set_adapter(names[request.adapter.split("@")[0]])
                ids = torch.tensor([tok(request.prompt).input_ids], device=device)
                past, out = None, []
                for _ in range(request.sampling.max_new_tokens):
                    step = model(input_ids=ids, past_key_values=past, use_cache=True)
                    past = step.past_key_values
                    token = int(step.logits[0, -1].argmax())
                    out.append(token)
                    ids = torch.tensor([[token]], device=device)
                    yield inference_pb2.GenerateStreamResponse(token_ids=[token])
            yield inference_pb2.GenerateStreamResponse(
                finish_reason=inference_pb2.FINISH_REASON_LENGTH,
                usage=inference_pb2.Usage(completion_tokens=len(out)),
                timings=inference_pb2.Timings(total_s=time.monotonic() - t0))

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=64))
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(Baseline(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print(f"serving gRPC on 127.0.0.1:{port}", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    server.stop(0)


# -- load generation --------------------------------------------------------------------------
@dataclass
class Samples:
    """What the clients saw inside the measurement window [begin, end]."""

    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    tokens: int = 0
    requests: int = 0  # completed inside the window
    censored: int = 0  # TTFT samples cut at the window's end (lower bounds)
    errors: dict[str, int] = field(default_factory=dict)


async def _client(stub, refs, weights, load: Load, idx: int, begin: float, end: float,
                  out: Samples) -> None:
    """Closed loop: one request at a time until `end`; the request in flight at `end` is
    cancelled, so a slow server cannot stretch the run."""
    from loraplex.client import generate_request

    rng = random.Random(load.seed * 1000 + idx)
    # Staggered starts: clients that all start (and so all finish) together would keep
    # arriving in one synchronized wave, each wave a prefill of every prompt at once.
    await asyncio.sleep(idx * load.warmup_s / (2 * load.clients))
    while time.monotonic() < end:
        ref = rng.choices(refs, weights)[0]
        prompt = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ")
                         for _ in range(load.prompt_chars))
        req = generate_request(ref, prompt, max_new_tokens=load.new_tokens)
        start = time.monotonic()
        try:
            await asyncio.wait_for(_one(stub, req, start, begin, end, out),
                                   timeout=max(0.0, end - start))
        except TimeoutError:
            pass  # the window closed; _one recorded what it saw
        except Exception as e:  # noqa: BLE001 - counted, the load goes on
            code = getattr(e, "code", lambda: None)()
            name = code.name if code is not None else type(e).__name__
            out.errors[name] = out.errors.get(name, 0) + 1


async def _one(stub, req, start: float, begin: float, end: float, out: Samples) -> None:
    last, first = start, None
    call = stub.GenerateStream(req, timeout=600)
    try:
        async for msg in call:
            now = time.monotonic()
            k = len(msg.token_ids)
            if not k:
                continue
            inside = begin <= now <= end
            if first is None:
                first = now
                if inside:
                    out.ttft.append(now - start)
            elif inside and last >= begin:
                out.itl.extend([(now - last) / k] * k)
            if inside:
                out.tokens += k
            last = now
        if begin <= time.monotonic() <= end:
            out.requests += 1
    except asyncio.CancelledError:
        if first is None and start >= begin:  # still waiting at the end: TTFT > this
            out.ttft.append(end - start)
            out.censored += 1
        call.cancel()
        raise


async def run_load(target: str, refs: list[str], load: Load) -> dict:
    import grpc

    from loraplex.v1 import inference_pb2_grpc

    weights = [1.0 / (k + 1) ** load.zipf_s for k in range(len(refs))]
    samples = Samples()
    async with grpc.aio.insecure_channel(target) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        begin = time.monotonic() + load.warmup_s
        end = begin + load.duration_s
        await asyncio.gather(*(_client(stub, refs, weights, load, i, begin, end, samples)
                               for i in range(load.clients)))
    return summarize(samples, load.duration_s)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def summarize(s: Samples, wall: float) -> dict:
    return {"requests": s.requests, "generated_tokens": s.tokens, "wall_s": round(wall, 2),
            "tokens_per_s": s.tokens / wall if wall > 0 else 0.0,
            "ttft_p50_s": pct(s.ttft, 0.5), "ttft_p99_s": pct(s.ttft, 0.99),
            "itl_p50_s": pct(s.itl, 0.5), "itl_p99_s": pct(s.itl, 0.99),
            "itl_mean_s": statistics.fmean(s.itl) if s.itl else float("nan"),
            "ttft_censored": s.censored, "errors": s.errors}


# -- orchestration ----------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn(cmd: list[str], log_path: Path, threads: int = 0
          ) -> tuple[subprocess.Popen, int]:
    """Start a server and wait for its "serving gRPC on host:port" line."""
    env = {**os.environ}
    if threads:  # same for both servers; 1 is the robust choice on an oversubscribed host
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    log = log_path.open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    end = time.monotonic() + 600
    while time.monotonic() < end:
        text = log_path.read_text()
        m = re.search(r"serving gRPC on \S+:(\d+)", text)
        if m:
            return proc, int(m.group(1))
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[:4]} exited {proc.returncode}:\n{text[-3000:]}")
        time.sleep(0.2)
    proc.kill()
    raise TimeoutError(f"{cmd[:4]} did not start")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def loraplex_phase(base: Path, adapters: dict[str, Path], load: Load) -> dict:
    import yaml

    from loraplex.client import Client
    from loraplex.registry import Identity, Registry

    tag = f"dir-{Path(load.base).name}" if load.base else load.size
    reg_dir = WORK / f"registry-{tag}-r{load.rank}"
    with Registry.open(reg_dir) as reg:
        for ref, d in adapters.items():
            reg.push(Identity.system(), d, ref, base=base)
    config = WORK / "server.yaml"
    config.write_text(yaml.safe_dump({
        "max_slots": max(8, load.adapters), "max_batch": max(8, load.clients),
        "max_waiting": 4 * load.clients, "quantization": "none", "device": load.device,
        "engine": {"max_rank": load.rank, "max_new_tokens_limit": load.new_tokens,
                   **({"prefill_token_budget": load.prefill_budget}
                      if load.prefill_budget else {})}}))
    proc, port = spawn([sys.executable, "-m", "loraplex.cli", "serve", "--base", str(base),
                        "--registry", str(reg_dir), "--host", "127.0.0.1", "--port", "0",
                        "--metrics-port", "0", "--no-auth", "--config", str(config)],
                       WORK / "loraplex-server.log", load.threads)
    try:
        with Client(f"127.0.0.1:{port}", timeout=600) as client:
            client.wait_ready(600)
            for ref in adapters:  # warm, like the baseline that holds every adapter loaded
                client.prefetch(ref)
        return asyncio.run(run_load(f"127.0.0.1:{port}", list(adapters), load))
    finally:
        stop(proc)


def baseline_phase(base: Path, adapters: dict[str, Path], load: Load) -> dict:
    port = free_port()
    proc, port = spawn([sys.executable, "-m", "bench.serve", "--baseline-server", str(port),
                        "--size", load.size, "--adapters", str(load.adapters),
                        "--rank", str(load.rank),
                        *(["--base", str(load.base)] if load.base else [])],
                       WORK / "baseline-server.log",
                       load.threads)
    try:
        return asyncio.run(run_load(f"127.0.0.1:{port}", list(adapters), load))
    finally:
        stop(proc)


def report(load: Load, base_r: dict, lpx_r: dict) -> dict:
    return {"load": asdict(load), "baseline": base_r, "loraplex": lpx_r,
            "throughput_ratio": lpx_r["tokens_per_s"] / max(base_r["tokens_per_s"], 1e-9),
            "loraplex_ttft_p99_below_baseline_ttft_p50":
                lpx_r["ttft_p99_s"] < base_r["ttft_p50_s"],
            "cpu_count": os.cpu_count(), "torch_threads": _torch_threads()}


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def print_table(r: dict) -> None:
    ld = r["load"]
    print(f"bench/serve: {ld.get('base') or ld['size']} base, {ld['clients']} clients over {ld['adapters']} "
          f"adapters (Zipf s={ld['zipf_s']}, seed {ld['seed']}), prompt {ld['prompt_chars']} "
          f"tokens, {ld['new_tokens']} new tokens, {ld['duration_s']:.0f}s measured per server")
    print(f"{'server':10} {'req':>5} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p99':>9} "
          f"{'ITL p50':>8} {'ITL p99':>8}  errors")
    for name in ("baseline", "loraplex"):
        x = r[name]
        print(f"{name:10} {x['requests']:5d} {x['tokens_per_s']:8.1f} {x['ttft_p50_s']:9.3f} "
              f"{x['ttft_p99_s']:9.3f} {x['itl_p50_s']:8.4f} {x['itl_p99_s']:8.4f}  "
              f"{x['errors'] or 0}")
    print(f"throughput: {r['throughput_ratio']:.1f}x baseline (target >= 5x); loraplex TTFT "
          f"p99 {r['loraplex']['ttft_p99_s']:.3f}s vs baseline TTFT p50 "
          f"{r['baseline']['ttft_p50_s']:.3f}s "
          f"({'below' if r['loraplex_ttft_p99_below_baseline_ttft_p50'] else 'NOT below'})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny base, 8 clients, 15 s")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--clients", type=int)
    p.add_argument("--adapters", type=int)
    p.add_argument("--duration", type=float)
    p.add_argument("--size")
    p.add_argument("--base", metavar="DIR", help="serve this HF base directory (e.g. one "
                   "made by `loraplex base import smollm2-135m-instruct DIR`) instead of "
                   "building one of --size")
    p.add_argument("--rank", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--prefill-budget", type=int)
    p.add_argument("--threads", type=int, help="torch threads of each server (0: default)")
    p.add_argument("--device", help="cpu (default) or cuda, for both servers")
    p.add_argument("--baseline-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    ns = p.parse_args(argv)
    load = QUICK if ns.quick else Load()
    over = {"clients": ns.clients, "adapters": ns.adapters, "duration_s": ns.duration,
            "size": ns.size, "base": ns.base, "rank": ns.rank, "seed": ns.seed,
            "prefill_budget": ns.prefill_budget, "threads": ns.threads, "device": ns.device}
    load = Load(**{**asdict(load), **{k: v for k, v in over.items() if v is not None}})
    WORK.mkdir(parents=True, exist_ok=True)
    os.environ["LORAPLEX_BENCH_DEVICE"] = load.device  # the baseline subprocess reads it
    base, adapters = prepare(load)
    if ns.baseline_server is not None:
        baseline_server(base, adapters, ns.baseline_server)
        return 0
    base_r = baseline_phase(base, adapters, load)
    lpx_r = loraplex_phase(base, adapters, load)
    result = report(load, base_r, lpx_r)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"serve{'-quick' if ns.quick else ''}.json").write_text(
        json.dumps(result, indent=2) + "\n")
    if ns.json:
        print(json.dumps(result))
    else:
        print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
