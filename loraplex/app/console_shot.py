"""Screenshots of the web console for the README, taken by Debian's Chromium (Playwright)
from a live `loraplex serve` holding a few adapters with lineage, scores and aliases.

    python -m loraplex.app.console_shot docs/console.png [--serving docs/console-serving.png]

Everything is built here, in a temporary directory: the micro base, adapters written by
peft, a compressed and a merged version, evaluation records, alias moves; traffic runs
over gRPC while the Serving page is captured. Needs the `dev` extra (playwright) and
`/usr/bin/chromium` (`make chromium`); no browser is downloaded.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run",
        "--hide-scrollbars", "--force-color-profile=srgb"]


def peft_adapter(base: Path, out: Path, seed: int, r: int = 8) -> Path:
    """A small adapter written by peft itself (random non-zero factors)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=r, lora_alpha=2 * r, init_lora_weights=False,
                                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    model.save_pretrained(out)
    return out


def trained(path: str, data: str, lr: float, val_loss: float, fmt: str) -> dict[str, Any]:
    return {"producer": "loraplex.trainer",
            "dataset": {"path": path, "digest": data, "examples": 1200, "format": fmt},
            "hyperparameters": {"r": 8, "lora_alpha": 16, "learning_rate": lr, "epochs": 3},
            "metrics": {"val_loss": val_loss}}


def populate(reg: Any, base: Path, work: Path) -> dict[str, str]:
    """Tenants acme and globex with a history worth looking at; returns their tokens."""
    from loraplex.registry import Identity
    from loraplex.registry.derive import compress_version, merge_versions

    system = Identity.system()
    reg.register_base(system, base)
    tokens = {"acme": reg.create_token(system, "acme", label="acme release"),
              "globex": reg.create_token(system, "globex"),
              "admin": reg.create_token(system, "ops", admin=True, label="operator")}
    acme = reg.authenticate(tokens["acme"])
    d1, d2, d3 = ("sha256:" + c * 64 for c in "3a7")
    reg.push(acme, peft_adapter(base, work / "s1", 1), "acme/support", base=base,
             lineage=trained("data/support-2026-10.jsonl", d1, 2e-4, 0.71, "messages"))
    reg.push(acme, peft_adapter(base, work / "s2", 2), "acme/support", base=base,
             lineage=trained("data/support-2026-11.jsonl", d2, 3e-4, 0.58, "messages"))
    reg.push(acme, peft_adapter(base, work / "f1", 3), "acme/faq", base=base,
             lineage=trained("data/faq.jsonl", d3, 2e-4, 0.49, "messages"))
    compress_version(reg, acme, "acme/support:v2", rank=4)
    merge_versions(reg, acme, ["acme/support:v2", "acme/faq:v1"], name="acme/support",
                   method="linear", weights=[0.7, 0.3])
    reg.set_alias(acme, "acme/support:v1", "prod", expected=None)
    reg.set_alias(acme, "acme/support:v2", "prod", expected=1)
    reg.set_alias(acme, "acme/support:v4", "staging", expected=None)
    scores = {1: (0.69, 0.71), 2: (0.57, 0.83), 3: (0.58, 0.82), 4: (0.55, 0.86)}
    for v, (loss, em) in scores.items():
        reg.record_evaluation(acme, f"acme/support:v{v}", "eval",
                              {"loss": loss, "exact_match": em}, data_digest=d2,
                              detail={"data": "data/support-test.jsonl", "n": 200})
    reg.record_evaluation(acme, "acme/support:v3", "gate", {"exact_match": 0.82},
                          data_digest=d2, detail={
                              "passed": True, "gate": "exact_match>=0.95*source",
                              "reason": "exact_match=0.82 meets exact_match>=0.95*0.83"})
    globex = reg.authenticate(tokens["globex"])
    reg.push(globex, peft_adapter(base, work / "g1", 5), "globex/sales", base=base)
    for i in range(6):
        reg.push(acme, peft_adapter(base, work / f"x{i}", 10 + i, r=4),
                 f"acme/{['billing', 'returns', 'shipping', 'warranty', 'onboarding', 'tone'][i]}",
                 base=base)
    return tokens


def traffic(target: str, token: str, refs: list[str], stop: threading.Event) -> None:
    from loraplex.client import Client

    with Client(target, token=token, timeout=60) as c:
        i = 0
        while not stop.is_set():
            c.generate(refs[i % len(refs)], "Where is my order?", max_new_tokens=32)
            i += 1


def shoot(out: Path, serving_out: Path | None) -> None:
    from playwright.sync_api import sync_playwright

    from loraplex.basemodel import build_base
    from loraplex.registry import Registry
    from loraplex.runtime.serve.server import BackgroundServer
    from loraplex.runtime.serve.settings import load_settings

    with tempfile.TemporaryDirectory(prefix="loraplex-shot-") as tmp:
        work = Path(tmp)
        base = build_base(work / "base", size="micro", arch="llama", seed=0)
        reg = Registry.open(work / "reg")
        tokens = populate(reg, base, work)
        settings = load_settings({
            "base": base, "registry": str(work / "reg"), "host": "127.0.0.1", "port": 0,
            "metrics_port": None, "http_host": "127.0.0.1", "http_port": 0,
            "quantization": "none", "device": "cpu", "engine": {"compute_dtype": "float32"}})
        with BackgroundServer(settings, registry=reg) as bg, sync_playwright() as pw:
            url = f"http://127.0.0.1:{bg.http_port}"
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page(viewport={"width": 1360, "height": 900},
                                    device_scale_factor=1)
            page.goto(f"{url}/console/signin")
            page.fill("#token", tokens["acme"])
            page.click("button[type=submit]")
            page.wait_for_url(f"{url}/console/adapters")
            page.goto(f"{url}/console/adapters/acme/support?a=2&b=4")
            page.screenshot(path=str(out), full_page=True)
            print(f"wrote {out}")
            if serving_out is not None:
                stop = threading.Event()
                workers = [threading.Thread(target=traffic, args=(
                    bg.target, tokens["acme"], refs, stop), daemon=True) for refs in (
                    ["acme/support@prod", "acme/faq"], ["acme/billing", "acme/support@staging"])]
                for w in workers:
                    w.start()
                page.goto(f"{url}/console/serving")
                time.sleep(24)
                page.screenshot(path=str(serving_out), full_page=True)
                stop.set()
                for w in workers:
                    w.join(60)
                print(f"wrote {serving_out}")
            browser.close()
        reg.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="PNG of an adapter's page")
    parser.add_argument("--serving", type=Path, default=None, help="PNG of the Serving page")
    args = parser.parse_args(argv)
    shoot(args.out, args.serving)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
