"""`make demo`: the whole loraplex story, end to end, on the embedded default base.

    python -m loraplex.demo [--out demo-out] [--quantization nf4]

1. builds the tiny embedded base (deterministic, briefly pre-trained),
2. trains three tenants' adapters (acme routes support tickets to a desk, globex tags
   review sentiment, initech spells numbers as words) with the QLoRA trainer,
3. starts `loraplex serve` and registers the adapters over gRPC with each tenant's token,
4. sends one `BatchGenerate` mixing all three tenants and the base over the held-out
   prompts, plus concurrent streams, and prints held-out exact-match: adapter vs base,
5. trains a second acme version and moves `acme/router@prod` to it in the middle of
   traffic (no restart, no failed request),
6. prints TTFT and inter-token p50/p99 read back from the server's own `/metrics`,
7. stops the server with SIGTERM (it drains and exits 0).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from loraplex.peft_format import QUANTIZATIONS

console = Console(highlight=False, width=110)
TENANTS = {"acme": "acme/router", "globex": "globex/sentiment", "initech": "initech/numwords"}


@dataclass(frozen=True)
class DemoPlan:
    """Data sizes of the demo; the training recipe is the trainer's `DEMO_TRAIN_CONFIG`."""

    n_train: int = 400
    n_test: int = 40
    max_new_tokens: int = 48
    size: str = "tiny"  # `micro` makes a fast smoke run of the whole story (tests use it)
    max_steps: int | None = None  # overrides the recipe's epochs (smoke runs)


# -- steps ------------------------------------------------------------------------------------
def build_base(out: Path, size: str) -> Path:
    from loraplex.basemodel import build_base as build
    from loraplex.trainer.pretrain import default_pretrain

    base = out / "base"
    meta = base / "loraplex_base.json"
    if meta.is_file() and json.loads(meta.read_text()).get("size") == size:
        console.print(f"[1] base: reusing {base}")
        return base
    t0 = time.perf_counter()
    build(base, size=size, arch="llama", seed=0, pretrain=default_pretrain(size))
    console.print(f"[1] base: built the {size} embedded base in {time.perf_counter() - t0:.0f}s")
    return base


def train_adapter(base: Path, data: Path, name: str, run_dir: Path, plan: DemoPlan,
                  quantization: str | None, seed: int = 0) -> tuple[Path, dict]:
    from loraplex.trainer.config import TrainConfig
    from loraplex.trainer.tasks import DEMO_TRAIN_CONFIG
    from loraplex.trainer.train import train

    recipe = {**DEMO_TRAIN_CONFIG, "seed": seed}
    if plan.max_steps:
        recipe["max_steps"] = plan.max_steps
    if quantization:
        recipe["quantization"] = quantization
    cfg = TrainConfig(base=str(base), data=str(data), name=name, output_dir=str(run_dir),
                      publish=False, **recipe)
    result = train(cfg, progress=False)
    return result.adapter_dir, result.metrics


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(base: Path, registry: Path, quantization: str
                 ) -> tuple[subprocess.Popen, str, int]:
    port, mport = free_port(), free_port()
    cmd = [sys.executable, "-m", "loraplex.cli", "serve", "--base", str(base),
           "--registry", str(registry), "--host", "127.0.0.1", "--port", str(port),
           "--metrics-port", str(mport), "--quantization", quantization]
    log = (registry.parent / "server.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    return proc, f"127.0.0.1:{port}", mport


def exact_match(outputs: list[str], tests: list[dict]) -> float:
    hits = sum(o.strip() == t["completion"].strip() for o, t in zip(outputs, tests, strict=True))
    return hits / len(tests)


# -- the story ----------------------------------------------------------------------------------
def run(out: Path, quantization: str, plan: DemoPlan, train_quantization: str | None = None
        ) -> int:
    from transformers import AutoTokenizer

    from loraplex.client import Client, Generation
    from loraplex.registry import Identity, Registry
    from loraplex.trainer.tasks import from_chat, write_tasks

    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    base = build_base(out, plan.size)
    data = write_tasks(out / "data", n_train=plan.n_train, n_test=plan.n_test)
    tok = AutoTokenizer.from_pretrained(base)

    adapters: dict[str, tuple[Path, dict]] = {}
    for tenant, name in TENANTS.items():
        t0 = time.perf_counter()
        adapters[tenant] = train_adapter(base, data[tenant]["train"], name,
                                         out / "runs" / tenant, plan, train_quantization)
        m = adapters[tenant][1]
        console.print(f"[2] trained {name}: {m.get('steps')} steps, val_loss "
                      f"{m.get('val_loss') or float('nan'):.3f}, "
                      f"{time.perf_counter() - t0:.0f}s")

    registry_dir = out / "registry"
    if registry_dir.exists():
        import shutil

        shutil.rmtree(registry_dir)
    reg = Registry.open(registry_dir)
    tokens = {t: reg.create_token(Identity.system(), t) for t in TENANTS}
    admin_token = reg.create_token(Identity.system(), "ops", admin=True)
    reg.close()

    proc, target, mport = start_server(base, registry_dir, quantization)
    try:
        with Client(target, token=admin_token) as admin:
            admin.wait_ready(timeout=300)
        console.print(f"[3] server up at {target} (metrics :{mport}, {quantization} base)")
        for tenant, name in TENANTS.items():
            with Client(target, token=tokens[tenant]) as c:
                resp = c.register_adapter(name, adapters[tenant][0],
                                          lineage={"metrics": adapters[tenant][1]})
                c.set_alias(resp.adapter.ref, "prod", expected=None)
                console.print(f"    registered {resp.adapter.ref} over gRPC "
                              f"({resp.adapter.size_bytes / 1e3:.0f} kB, "
                              f"{resp.adapter.digest[:19]}…) and set @prod")

        tests = {t: [from_chat(json.loads(x)) for x in data[t]["test"].read_text().splitlines()]
                 for t in TENANTS}
        # The adapters were trained on chat rows, so the held-out user turns are rendered
        # with the base's own chat template, as a server renders chat messages.
        prompts = {t: [tok.apply_chat_template([{"role": "user", "content": ex["prompt"]}],
                                               tokenize=False, add_generation_prompt=True)
                       for ex in tests[t]] for t in TENANTS}

        # One BatchGenerate per tenant token mixing its adapter and the base; all tenants'
        # calls run concurrently, so the engine's batches mix every adapter and the base.
        results: dict[str, dict[str, list[Generation]]] = {}

        def batch_for(tenant: str) -> None:
            items = []
            for p in prompts[tenant]:
                items.append({"adapter": TENANTS[tenant] + "@prod", "prompt": p,
                              "max_new_tokens": plan.max_new_tokens, "stop": ["\n"]})
                items.append({"adapter": "", "prompt": p,
                              "max_new_tokens": plan.max_new_tokens, "stop": ["\n"]})
            with Client(target, token=tokens[tenant]) as c:
                res = c.batch_generate(items, timeout=600)
            errs = [r for r in res if not isinstance(r, Generation)]
            if errs:
                raise RuntimeError(f"{tenant}: {errs[0]}")
            results[tenant] = {"adapter": res[0::2], "base": res[1::2]}

        t0 = time.perf_counter()
        threads = [threading.Thread(target=batch_for, args=(t,)) for t in TENANTS]
        streamed: list[str] = []

        def stream_one(tenant: str, i: int) -> None:
            with Client(target, token=tokens[tenant]) as c:
                text = "".join(ch.text for ch in c.stream(TENANTS[tenant] + "@prod",
                                                            prompts[tenant][i],
                                                            max_new_tokens=plan.max_new_tokens,
                                                            stop=["\n"]))
                streamed.append(f"{tenant}: {tests[tenant][i]['prompt']!r} -> {text.strip()!r}")

        threads += [threading.Thread(target=stream_one, args=(t, i))
                    for i in range(2) for t in TENANTS]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        n_items = sum(2 * len(prompts[t]) for t in TENANTS)
        console.print(f"[4] BatchGenerate: {n_items} items over 3 adapters + base, "
                      f"{len(streamed)} concurrent streams, {time.perf_counter() - t0:.0f}s")
        show_accuracy(tests, results)
        for t in TENANTS:
            ex = tests[t][0]
            console.print(f"    {t:8s} {ex['prompt']!r}\n"
                          f"             adapter -> {results[t]['adapter'][0].text.strip()!r}\n"
                          f"             base    -> {results[t]['base'][0].text.strip()!r}")
        for s in streamed[:3]:
            console.print(f"    stream  {s}")
        cross_matrix(target, admin_token, prompts, tests, plan)

        hot_swap(target, tokens["acme"], base, data, out, plan, train_quantization,
                 prompts["acme"])
        print_latency(mport)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = -9
    console.print(f"[7] server drained on SIGTERM and exited {code}; "
                  f"demo took {time.perf_counter() - t_start:.0f}s")
    return 0 if code == 0 else 1


def show_accuracy(tests: dict, results: dict) -> None:
    table = Table(title="held-out exact-match (each tenant's own task)")
    for col in ("tenant", "adapter", "with adapter", "base alone", "n"):
        table.add_column(col)
    for t, name in TENANTS.items():
        a = exact_match([g.text for g in results[t]["adapter"]], tests[t])
        b = exact_match([g.text for g in results[t]["base"]], tests[t])
        table.add_row(t, results[t]["adapter"][0].adapter_ref or name, f"{a:.0%}", f"{b:.0%}",
                      str(len(tests[t])))
    console.print(table)


def cross_matrix(target: str, admin_token: str, prompts: dict, tests: dict,
                 plan: DemoPlan) -> None:
    """Every adapter (and the base) on every tenant's held-out task, in one BatchGenerate
    (an operator's admin token may use every tenant's adapter): specialization means a
    high diagonal and nothing elsewhere."""
    from loraplex.client import Client

    models = [("base", "")] + [(t, TENANTS[t] + "@prod") for t in TENANTS]
    outs: dict[tuple[str, str], list[str]] = {}
    with Client(target, token=admin_token) as c:
        for model, ref in models:  # one call per model keeps each under the per-call cap
            items, index = [], []
            for task in TENANTS:
                for p in prompts[task]:
                    items.append({"adapter": ref, "prompt": p, "stop": ["\n"],
                                  "max_new_tokens": plan.max_new_tokens})
                    index.append((model, task))
            for key, r in zip(index, c.batch_generate(items, timeout=600), strict=True):
                outs.setdefault(key, []).append(getattr(r, "text", "<error>"))
    table = Table(title="held-out exact-match: rows = model, columns = task")
    table.add_column("model")
    for task in TENANTS:
        table.add_column(f"{task} task")
    for model, _ in models:
        table.add_row(model if model == "base" else TENANTS[model],
                      *(f"{exact_match(outs[model, task], tests[task]):.0%}" for task in TENANTS))
    console.print(table)


def hot_swap(target: str, token: str, base: Path, data: dict, out: Path, plan: DemoPlan,
             quantization: str | None, prompts: list[str]) -> None:
    """Train acme v2, then move @prod to it while acme traffic is running."""
    from loraplex.client import Client

    adapter_dir, _ = train_adapter(base, data["acme"]["train"], TENANTS["acme"],
                                   out / "runs" / "acme-v2", plan, quantization, seed=1)
    stop = threading.Event()
    seen: dict[str, int] = {}
    failures: list[str] = []

    def traffic() -> None:
        with Client(target, token=token) as c:
            i = 0
            while not stop.is_set():
                try:
                    g = c.generate(TENANTS["acme"] + "@prod", prompts[i % len(prompts)],
                                   max_new_tokens=plan.max_new_tokens, stop=["\n"])
                    seen[g.adapter_ref] = seen.get(g.adapter_ref, 0) + 1
                except Exception as e:  # noqa: BLE001 - the demo reports every failure
                    failures.append(repr(e))
                i += 1

    workers = [threading.Thread(target=traffic) for _ in range(3)]
    for w in workers:
        w.start()
    time.sleep(3)
    with Client(target, token=token) as c:
        new = c.register_adapter(TENANTS["acme"], adapter_dir).adapter
        moved = c.set_alias(new.ref, "prod", expected=1)
    time.sleep(3)
    stop.set()
    for w in workers:
        w.join()
    console.print(f"[5] hot swap: acme/router@prod v{moved.previous_version} -> v{moved.version} "
                  f"during traffic; requests served per version {dict(sorted(seen.items()))}, "
                  f"failed: {len(failures)}")
    if failures:
        raise RuntimeError(f"requests failed during the alias move: {failures[:3]}")


def print_latency(mport: int) -> None:
    from loraplex.runtime.metrics import histogram_buckets, histogram_quantile, scrape

    text = scrape(f"http://127.0.0.1:{mport}/metrics", timeout=10)
    table = Table(title="latency read back from the server's /metrics")
    for col in ("metric", "p50", "p99", "samples"):
        table.add_column(col)
    for label, metric in (("time to first token", "loraplex_time_to_first_token_seconds"),
                          ("inter-token latency", "loraplex_inter_token_latency_seconds")):
        buckets = histogram_buckets(text, metric)
        p50, p99 = (histogram_quantile(buckets, q) for q in (0.5, 0.99))
        table.add_row(label, f"{(p50 or float('nan')) * 1e3:.1f} ms",
                      f"{(p99 or float('nan')) * 1e3:.1f} ms", f"{buckets[-1][1]:.0f}")
    console.print("[6]", table)


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation chatter
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("demo-out"))
    ap.add_argument("--quantization", default=os.environ.get("LORAPLEX_DEMO_QUANT", "nf4"),
                    choices=QUANTIZATIONS, help="the served base (default nf4)")
    ap.add_argument("--train-quantization", default=None, choices=QUANTIZATIONS,
                    help="training base (default: the trainer's demo recipe)")
    ap.add_argument("--size", default="tiny", choices=["micro", "tiny"],
                    help="base size; micro is a fast smoke run (accuracy meaningless)")
    ap.add_argument("--n-train", type=int, default=DemoPlan.n_train)
    ap.add_argument("--n-test", type=int, default=DemoPlan.n_test)
    ap.add_argument("--max-steps", type=int, default=None)
    a = ap.parse_args(argv)
    plan = DemoPlan(n_train=a.n_train, n_test=a.n_test, size=a.size, max_steps=a.max_steps)
    return run(a.out, a.quantization, plan, a.train_quantization)


if __name__ == "__main__":
    raise SystemExit(main())
