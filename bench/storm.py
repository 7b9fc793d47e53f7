"""A storm of hostile calls against one server while a quiet tenant generates.

    python -m bench.storm                  # 30 s quiet, then 30 s of storm
    python -m bench.storm --duration 15 --no-regex
    python -m bench.storm --json

The server runs as a subprocess (`loraplex serve`, default settings except a 64 MiB upload
cap so oversized uploads finish quickly) on a tiny base with random weights. A victim tenant
sends one Generate at a time (16 tokens, held to exactly 16 by a regex constraint) for
`--duration` seconds with the server quiet, then again while these run from other threads:

- bad tokens: Generate with random bearer tokens (UNAUTHENTICATED, a registry lookup each);
- huge prompts: 4 MiB prompts (refused by bytes before tokenizing);
- oversized uploads: RegisterAdapter streams of junk past the upload cap, two at a time;
- merges: MergeAdapters of one adapter repeated 64 times with `svd_rank` 4096;
- pathological patterns: an adapter whose `target_modules` is `(a|a)*b` and whose module
  names are `--regex-as` letters `a` (peft_format matches it with Python's backtracking
  `re`; off with `--no-regex`);
- a generation flood: the hostile tenant keeps 4 long Generates in flight.

Reported: the victim's latency p50/p99 quiet and in the storm and their ratio (the bar is
p99 within 2x), the server's peak RSS in each phase, and what each kind of hostile call got
back (status code counts and their p50 latency). On a shared machine every figure carries
the other load on it; the ratio is taken between two phases of the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import secrets
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

from loraplex.compute import cpu_model

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / ".loraplex" / "bench-storm"
UPLOAD_CAP = 64 << 20
VICTIM_REGEX = "[a-z]{16}"
EXTRA_ENV: dict[str, str] = {}


def machine() -> dict:
    import torch

    model = cpu_model()
    return {"cpu": model, "capability": torch.backends.cpu.get_cpu_capability(),
            "cores": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(),
            "command": " ".join([Path(sys.executable).name, "-m", "bench.storm", *sys.argv[1:]])}


# -- fixtures ---------------------------------------------------------------------------------
def prepare() -> tuple[Path, Path]:
    """The tiny base and a small peft adapter for it (cached under .loraplex/bench-storm)."""
    from loraplex.basemodel import build_base

    base, adapter = WORK / "base", WORK / "adapter"
    if not (base / "loraplex_base.json").exists():
        build_base(base, size="tiny", seed=0, pretrain=None)
    if not (adapter / "adapter_model.safetensors").exists():
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                               LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                          init_lora_weights=False))
        model.save_pretrained(adapter)
    return base, adapter


def regex_adapter(root: Path, letters: int) -> Path:
    """A peft-shaped adapter whose config matches module names with `(a|a)*b`."""
    import torch
    from safetensors.torch import save_file

    d = root / f"regex-{letters}"
    d.mkdir(parents=True, exist_ok=True)
    module = "a" * letters
    save_file({f"base_model.model.{module}.lora_A.weight": torch.zeros(4, 64),
               f"base_model.model.{module}.lora_B.weight": torch.zeros(64, 4)},
              str(d / "adapter_model.safetensors"))
    (d / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": "(a|a)*b",
        "task_type": "CAUSAL_LM"}))
    return d


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


# -- the server -------------------------------------------------------------------------------
def start_server(base: Path, reg_dir: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    config = WORK / "server.yaml"
    config.write_text(f"max_register_bytes: {UPLOAD_CAP}\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", **EXTRA_ENV}
    cmd = [sys.executable, "-c", "from loraplex.cli import main; main()", "serve",
           "--base", str(base), "--registry", str(reg_dir), "--host", "127.0.0.1",
           "--port", str(port), "--metrics-port", "0", "--quantization", "none",
           "--device", "cpu", "--config", str(config)]
    log = open(WORK / "server.log", "w")  # noqa: SIM115 - the server's lifetime
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    return proc, f"127.0.0.1:{port}"


# -- load -------------------------------------------------------------------------------------
def victim_run(target: str, token: str, seconds: float) -> list[float]:
    from loraplex.client import Client

    out = []
    with Client(target, token=token, timeout=120) as c:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            t0 = time.perf_counter()
            c.generate(None, "the quick brown fox", max_new_tokens=16, temperature=0,
                       regex=VICTIM_REGEX)
            out.append(time.perf_counter() - t0)
    return out


class Storm:
    """Hostile loops, each recording (kind, status code, seconds) per call."""

    def __init__(self, target: str, token: str, adapter: Path, regex_dir: Path | None,
                 only: set[str] | None = None) -> None:
        self.target, self.token, self.adapter, self.regex_dir = target, token, adapter, regex_dir
        self.only = only
        self.stop = threading.Event()
        self.calls: dict[str, list[tuple[str, float]]] = defaultdict(list)
        self._lock = threading.Lock()
        self.threads: list[tuple[str, threading.Thread]] = []

    def _record(self, kind: str, fn) -> None:
        import grpc

        from loraplex.errors import LoraplexError

        t0 = time.perf_counter()
        try:
            fn()
            code = "OK"
        except LoraplexError as e:
            code = e.code
        except grpc.RpcError as e:  # a raw stub call (the oversized upload)
            code = e.code().name
        except Exception as e:  # noqa: BLE001 - a hostile call may fail any way; count it
            code = type(e).__name__
        with self._lock:
            self.calls[kind].append((code, time.perf_counter() - t0))

    def _loop(self, kind: str, fn) -> None:
        while not self.stop.is_set():
            self._record(kind, fn)

    def start(self) -> None:
        from loraplex.client import Client
        from loraplex.v1 import registry_pb2

        c = Client(self.target, token=self.token, timeout=120)
        c.register_adapter("mallory/base", self.adapter)
        junk = os.urandom(1 << 20)

        def bad_token():
            with Client(self.target, token="lpx_" + secrets.token_hex(16), timeout=30) as b:
                b.generate(None, "hi", max_new_tokens=1)

        def huge_prompt():
            c.generate(None, "z" * (4 << 20), max_new_tokens=1)

        def oversized_upload():
            def messages():
                yield registry_pb2.RegisterAdapterRequest(header=registry_pb2.RegisterAdapterHeader(
                    name="mallory/huge", adapter_config=b'{"peft_type": "LORA", "r": 8}'))
                for _ in range(UPLOAD_CAP // len(junk) + 8):
                    yield registry_pb2.RegisterAdapterRequest(chunk=junk)
            c._stubs["registry"].RegisterAdapter(messages(), metadata=c.metadata("x"),
                                                 timeout=120)

        def merge():
            c.merge_adapters(["mallory/base:v1"] * 64, name="mallory/merged", method="svd",
                             svd_rank=4096)

        def regex():
            c.register_adapter("mallory/regex", self.regex_dir)

        def flood():
            c.generate(None, "flood " * 8, max_new_tokens=64)

        loops = [("bad_token", bad_token)] * 2 + [("huge_prompt", huge_prompt)] + \
            [("oversized_upload", oversized_upload)] * 2 + [("merge", merge)] + \
            [("flood", flood)] * 4
        if self.regex_dir is not None:
            loops.append(("regex", regex))
        for kind, fn in loops:
            if self.only is not None and kind not in self.only:
                continue
            t = threading.Thread(target=self._loop, args=(kind, fn), daemon=True)
            t.start()
            self.threads.append((kind, t))

    def finish(self, wait_s: float) -> list[str]:
        """Stop the loops; the kinds whose call was still running after `wait_s`."""
        self.stop.set()
        end = time.monotonic() + wait_s
        for _, t in self.threads:
            t.join(max(0.0, end - time.monotonic()))
        return sorted({kind for kind, t in self.threads if t.is_alive()})

    def summary(self) -> dict:
        out = {}
        for kind, calls in sorted(self.calls.items()):
            out[kind] = {"calls": len(calls), "codes": dict(Counter(c for c, _ in calls)),
                         "p50_s": round(statistics.median(s for _, s in calls), 4)}
        return out


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def sample_rss(pid: int, stop: threading.Event, into: list[int]) -> None:
    while not stop.is_set():
        try:
            into.append(rss_bytes(pid))
        except OSError:
            return
        stop.wait(0.25)


def phase(pid: int, fn) -> tuple[list[float], list[int]]:
    """The victim's latencies and the server's RSS sampled every 0.25 s meanwhile."""
    stop, rss = threading.Event(), []
    t = threading.Thread(target=sample_rss, args=(pid, stop, rss), daemon=True)
    t.start()
    try:
        lat = fn()
    finally:
        stop.set()
        t.join()
    return lat, rss or [0]


def quarters(rss: list[int]) -> list[float]:
    """Peak RSS (MiB) in each quarter of a phase: flat when memory is bounded."""
    n = max(1, len(rss) // 4)
    return [round(max(rss[i:i + n]) / 2**20, 1) for i in range(0, n * 4, n) if rss[i:i + n]]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of each phase")
    ap.add_argument("--regex-as", type=int, default=24,
                    help="letters of the module name matched by (a|a)*b (the issue's: 30+)")
    ap.add_argument("--no-regex", action="store_true", help="leave the pattern attack out")
    ap.add_argument("--only", default=None, help="comma-separated kinds of hostile call "
                    "(bad_token, huge_prompt, oversized_upload, merge, regex, flood)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    from loraplex.client import Client
    from loraplex.registry import Identity, Registry

    WORK.mkdir(parents=True, exist_ok=True)
    base, adapter = prepare()
    reg_dir = WORK / f"reg-{int(time.time())}"
    reg = Registry.open(reg_dir)
    victim = reg.create_token(Identity.system(), "victim")
    mallory = reg.create_token(Identity.system(), "mallory")
    reg.close()
    regex_dir = None if args.no_regex else regex_adapter(WORK, args.regex_as)
    random.seed(0)

    proc, target = start_server(base, reg_dir)
    try:
        with Client(target, token=victim, timeout=30) as c:
            c.wait_ready(300)
        victim_run(target, victim, 3.0)  # warm-up: grammar compiled, code paths hot
        quiet, quiet_rss = phase(proc.pid, lambda: victim_run(target, victim, args.duration))
        only = set(args.only.split(",")) if args.only else None
        storm = Storm(target, mallory, adapter, regex_dir, only)
        storm.start()
        time.sleep(1.0)
        loud, storm_rss = phase(proc.pid, lambda: victim_run(target, victim, args.duration))
        stuck = storm.finish(30.0)
        alive = proc.poll() is None
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    result = {
        "machine": machine(),
        "victim": {"quiet": {"n": len(quiet), "p50_s": round(pct(quiet, 0.5), 4),
                             "p99_s": round(pct(quiet, 0.99), 4)},
                   "storm": {"n": len(loud), "p50_s": round(pct(loud, 0.5), 4),
                             "p99_s": round(pct(loud, 0.99), 4)}},
        "p99_ratio": round(pct(loud, 0.99) / pct(quiet, 0.99), 2),
        "rss_mib": {"quiet_peak": round(max(quiet_rss) / 2**20, 1),
                    "storm_peak": round(max(storm_rss) / 2**20, 1),
                    "storm_quarters": quarters(storm_rss)},
        "hostile": storm.summary(), "still_running_at_stop": stuck, "server_alive": alive,
        "regex_letters": None if args.no_regex else args.regex_as,
    }
    if args.json:
        print(json.dumps(result))
    else:
        m = result["machine"]
        print(f"# {m['cpu']} · {m['capability']} · {m['cores']} cores · torch {m['torch']}")
        print(f"# {m['command']}")
        v = result["victim"]
        print(f"victim Generate (16 tokens): quiet p50 {v['quiet']['p50_s']}s p99 "
              f"{v['quiet']['p99_s']}s (n={v['quiet']['n']}); storm p50 {v['storm']['p50_s']}s "
              f"p99 {v['storm']['p99_s']}s (n={v['storm']['n']}); p99 ratio "
              f"{result['p99_ratio']}x")
        print(f"server RSS peak: quiet {result['rss_mib']['quiet_peak']} MiB, storm "
              f"{result['rss_mib']['storm_peak']} MiB (storm peak by quarter: "
              f"{result['rss_mib']['storm_quarters']} MiB)")
        for kind, s in result["hostile"].items():
            print(f"  {kind:17s} {s['calls']:5d} calls  p50 {s['p50_s']}s  {s['codes']}")
        if stuck:
            print(f"still running 30 s after the storm stopped: {', '.join(stuck)}")
    return result


if __name__ == "__main__":
    main()
