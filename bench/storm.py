"""A storm of hostile calls against one server while a quiet tenant generates.

    python -m bench.storm                  # 2 rounds of 15 s quiet, then 15 s of storm
    python -m bench.storm --duration 10 --rounds 3 --no-regex
    python -m bench.storm --json

The server runs as a subprocess (`loraplex serve`, default settings except a 64 MiB upload
cap so oversized uploads finish quickly) on a tiny base with random weights. A victim tenant
sends one Generate at a time (16 tokens, held to exactly 16 by a regex constraint) from
this process, while another process (the attacker, at the same priority) runs these loops,
each as fast as the server answers:

- bad tokens: Generate with random bearer tokens, a new connection each;
- huge prompts: 4 MiB prompts (refused by bytes before tokenizing);
- oversized uploads: RegisterAdapter streams of junk past the upload cap, two at a time;
- merges: MergeAdapters of one adapter repeated 64 times with `svd_rank` 4096;
- pathological patterns: an adapter whose `target_modules` is `(a|a)*b` and whose module
  names are `--regex-as` letters `a` (off with `--no-regex`);
- a generation flood: the hostile tenant keeps 4 long Generates in flight.

Quiet and storm windows alternate `--rounds` times (the attacker is paused with SIGSTOP
between storm windows, and the first seconds after each switch are left out), so a shared
machine's changing load falls on both kinds of window alike; the ratio is taken within the
run. The attacker runs in its own process so that its threads do not share the victim's
GIL: the victim's figures are the server's doing (and the CPU the attacker's process takes
from the same cores, which a real attacker's machine would not).

Reported: the victim's latency p50/p99 quiet and in the storm and their ratio (the bar is
p99 within 2x), split into the engine's own time (submit to finish, from the reply's
timings) and the rest (the doors: transport, authentication, admission); the server's CPU
seconds and RSS (start, peak, end, and peak by quarter of the storm windows) and the
attacker's CPU; the machine's load average; what each kind of hostile call got back. RSS is
called bounded when the storm windows' second half peaks within 5% + 32 MiB of their first
half; otherwise the benchmark says UNBOUNDED and exits with status 2. "end" is the RSS a
few seconds after the storm stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import secrets
import signal
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


def rss_parts(pid: int) -> dict[str, float]:
    """RssAnon / RssFile / RssShmem of a process, MiB: what kind of memory it holds."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("RssAnon:", "RssFile:", "RssShmem:")):
            key, value = line.split(":", 1)
            out[key] = round(int(value.split()[0]) / 1024, 1)
    return out


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
def victim_run(target: str, token: str, seconds: float) -> list[tuple[float, float]]:
    """(client seconds, engine seconds) of each Generate sent one after another."""
    from loraplex.client import Client

    out = []
    with Client(target, token=token, timeout=120) as c:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            t0 = time.perf_counter()
            g = c.generate(None, "the quick brown fox", max_new_tokens=16, temperature=0,
                           regex=VICTIM_REGEX)
            out.append((time.perf_counter() - t0, g.timings["total_s"]))
    return out


class Storm:
    """Hostile loops, each recording (kind, status code, seconds) per call."""

    def __init__(self, target: str, token: str, adapter: Path, regex_dir: Path | None,
                 only: set[str] | None = None, copies: int = 1) -> None:
        self.target, self.token, self.adapter, self.regex_dir = target, token, adapter, regex_dir
        self.only, self.copies = only, copies
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
        for kind, fn in loops * self.copies:
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


def storm_worker(spec: str) -> None:
    """The attacker's process: start the loops, say "ready", run until "stop" on stdin,
    then print the summary as one JSON line."""
    a = json.loads(spec)
    storm = Storm(a["target"], a["token"], Path(a["adapter"]),
                  Path(a["regex_dir"]) if a["regex_dir"] else None,
                  set(a["only"]) if a["only"] else None, a["copies"])
    storm.start()
    print("ready", flush=True)
    sys.stdin.readline()
    stuck = storm.finish(30.0)
    print(json.dumps({"hostile": storm.summary(), "still_running_at_stop": stuck}), flush=True)


class Attacker:
    """The storm's process, paused (SIGSTOP) between storm windows."""

    def __init__(self, spec: dict) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.storm", "--storm-worker",
                                      json.dumps(spec)], cwd=REPO, env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"the storm process did not start: {line!r}")
        self.pause()

    def pause(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def finish(self) -> dict:
        self.resume()
        cpu = cpu_seconds(self.proc.pid)
        out, _ = self.proc.communicate("stop\n", timeout=120)
        result = json.loads(out.strip().splitlines()[-1])
        result["cpu_s"] = round(cpu, 1)
        return result


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (its threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class RssLog:
    """The server's RSS every 0.25 s, tagged with the window it was taken in."""

    def __init__(self, pid: int) -> None:
        self.pid, self.tag = pid, "start"
        self.samples: list[tuple[str, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append((self.tag, rss_bytes(self.pid)))
            except OSError:
                return
            self._stop.wait(0.25)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def of(self, tag: str) -> list[int]:
        return [b for t, b in self.samples if t == tag]


def quarters(rss: list[int]) -> list[float]:
    """Peak RSS (MiB) in each quarter of a series: flat when memory is bounded."""
    n = max(1, len(rss) // 4)
    return [round(max(rss[i:i + n]) / 2**20, 1) for i in range(0, n * 4, n) if rss[i:i + n]]


def rss_verdict(storm: list[int]) -> tuple[bool, str]:
    """Bounded: the storm's second half peaks within 5% + 32 MiB of its first half."""
    half = len(storm) // 2
    first, second = max(storm[:half] or storm), max(storm[half:] or storm)
    if second > first * 1.05 + (32 << 20):
        return False, (f"the storm's second half peaked at {second / 2**20:.0f} MiB against "
                       f"{first / 2**20:.0f} MiB in its first")
    return True, ""


def summarize(calls: list[tuple[float, float]]) -> dict:
    client = [c for c, _ in calls]
    engine = [e for _, e in calls]
    doors = [c - e for c, e in calls]
    return {"n": len(calls), "p50_s": round(pct(client, 0.5), 4),
            "p99_s": round(pct(client, 0.99), 4),
            "engine_p50_s": round(pct(engine, 0.5), 4),
            "engine_p99_s": round(pct(engine, 0.99), 4),
            "doors_p50_s": round(pct(doors, 0.5), 4), "doors_p99_s": round(pct(doors, 0.99), 4)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=15.0,
                    help="seconds of each quiet and each storm window")
    ap.add_argument("--rounds", type=int, default=2, help="quiet/storm window pairs")
    ap.add_argument("--settle", type=float, default=3.0, help="seconds left out after each "
                    "switch (calls in flight finish; the attacker ramps up)")
    ap.add_argument("--regex-as", type=int, default=30,
                    help="letters of the module name matched by (a|a)*b")
    ap.add_argument("--no-regex", action="store_true", help="leave the pattern attack out")
    ap.add_argument("--only", default=None, help="comma-separated kinds of hostile call "
                    "(bad_token, huge_prompt, oversized_upload, merge, regex, flood)")
    ap.add_argument("--attackers", type=int, default=1, help="copies of the hostile loops "
                    "(each copy: 11 calls in flight)")
    ap.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                    help="environment of the server (e.g. LORAPLEX_REFUSAL_PACING_FREE=0)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--storm-worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.storm_worker:
        storm_worker(args.storm_worker)
        return {}

    from loraplex.client import Client
    from loraplex.registry import Identity, Registry

    EXTRA_ENV.update(kv.split("=", 1) for kv in args.server_env)
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
    quiet: list[tuple[float, float]] = []
    loud: list[tuple[float, float]] = []
    cpu = {"quiet": 0.0, "storm": 0.0}
    load = {"quiet": [], "storm": []}
    try:
        with Client(target, token=victim, timeout=30) as c:
            c.wait_ready(300)
        victim_run(target, victim, 3.0)  # warm-up: grammar compiled, code paths hot
        rss = RssLog(proc.pid)
        parts = {"start": rss_parts(proc.pid)}
        attacker = Attacker({"target": target, "token": mallory, "adapter": str(adapter),
                             "regex_dir": str(regex_dir) if regex_dir else None,
                             "only": args.only.split(",") if args.only else None,
                             "copies": args.attackers})
        for _ in range(args.rounds):
            for tag, into in (("quiet", quiet), ("storm", loud)):
                if tag == "storm":
                    attacker.resume()
                rss.tag = "settle"
                victim_run(target, victim, args.settle)
                rss.tag = tag
                load[tag].append(os.getloadavg()[0])
                c0 = cpu_seconds(proc.pid)
                into += victim_run(target, victim, args.duration)
                cpu[tag] += cpu_seconds(proc.pid) - c0
                if tag == "storm":
                    attacker.pause()
        hostile = attacker.finish()
        rss.tag = "after"
        time.sleep(max(6.0, 2 * args.settle))
        rss.stop()
        parts["end"] = rss_parts(proc.pid)
        alive = proc.poll() is None
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    storm_rss, after_rss = rss.of("storm"), rss.of("after")
    bounded, why = rss_verdict(storm_rss)
    all_rss = [b for _, b in rss.samples]
    q, s_ = summarize(quiet), summarize(loud)
    result = {
        "machine": machine(),
        "victim": {"quiet": q, "storm": s_},
        "p99_ratio": round(s_["p99_s"] / q["p99_s"], 2),
        "p50_ratio": round(s_["p50_s"] / q["p50_s"], 2),
        "server_cpu_s": {k: round(v, 1) for k, v in cpu.items()},
        "load_avg_1m": {k: [round(x, 1) for x in v] for k, v in load.items()},
        "rss_mib": {"start": round(all_rss[0] / 2**20, 1),
                    "peak": round(max(all_rss) / 2**20, 1),
                    "end": round(after_rss[-1] / 2**20, 1) if after_rss else None,
                    "quiet_peak": round(max(rss.of("quiet")) / 2**20, 1),
                    "storm_peak": round(max(storm_rss) / 2**20, 1),
                    "storm_quarters": quarters(storm_rss)},
        "rss_parts_mib": parts, "rss_bounded": bounded, "rss_why": why,
        "attacker_cpu_s": hostile.get("cpu_s"),
        "hostile": hostile["hostile"], "still_running_at_stop": hostile["still_running_at_stop"],
        "server_alive": alive, "rounds": args.rounds, "window_s": args.duration,
        "attackers": args.attackers, "server_env": args.server_env,
        "regex_letters": None if args.no_regex else args.regex_as,
    }
    if args.json:
        print(json.dumps(result))
    else:
        report(result)
    if not bounded:
        sys.exit(2)
    return result


def report(r: dict) -> None:
    m = r["machine"]
    print(f"# {m['cpu']} · {m['capability']} · {m['cores']} cores · torch {m['torch']}")
    print(f"# {m['command']}")
    if r["server_env"]:
        print(f"# server environment: {' '.join(r['server_env'])}")
    print(f"# load average (1 min) at each window: quiet {r['load_avg_1m']['quiet']}, "
          f"storm {r['load_avg_1m']['storm']}")
    for tag in ("quiet", "storm"):
        v = r["victim"][tag]
        print(f"victim {tag:5s} (n={v['n']:3d}): p50 {v['p50_s']:.3f}s p99 {v['p99_s']:.3f}s  "
              f"| engine p50 {v['engine_p50_s']:.3f}s p99 {v['engine_p99_s']:.3f}s "
              f"| doors p50 {v['doors_p50_s']:.3f}s p99 {v['doors_p99_s']:.3f}s")
    met = "met" if r["p99_ratio"] <= 2 else "NOT met"
    print(f"p99 ratio storm/quiet {r['p99_ratio']}x (target <=2x: {met}); p50 ratio "
          f"{r['p50_ratio']}x")
    print(f"server CPU s: quiet {r['server_cpu_s']['quiet']}, storm "
          f"{r['server_cpu_s']['storm']}; attacker process CPU s {r['attacker_cpu_s']}")
    x = r["rss_mib"]
    print(f"server RSS MiB: start {x['start']}, peak {x['peak']}, end {x['end']} (quiet peak "
          f"{x['quiet_peak']}, storm peak {x['storm_peak']}, storm by quarter "
          f"{x['storm_quarters']}): {'bounded' if r['rss_bounded'] else 'UNBOUNDED: ' + r['rss_why']}")
    print("  kinds of memory, start → end: " + ", ".join(
        f"{k} {r['rss_parts_mib']['start'].get(k)} → {r['rss_parts_mib']['end'].get(k)}"
        for k in ("RssAnon", "RssFile", "RssShmem")))
    for kind, s in r["hostile"].items():
        print(f"  {kind:17s} {s['calls']:5d} calls  p50 {s['p50_s']}s  {s['codes']}")
    if r["still_running_at_stop"]:
        print(f"still running 30 s after the storm stopped: "
              f"{', '.join(r['still_running_at_stop'])}")


if __name__ == "__main__":
    main()
