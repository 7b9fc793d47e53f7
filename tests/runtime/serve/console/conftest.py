"""One live `loraplex serve` for the console's tests (micro base, fp32, SQLite registry,
the OpenAI HTTP door with the console on), and Debian's Chromium driven by Playwright.

The world: tenants `acme` and `globex`; `acme/support` trained twice (lineage: data digest
and config), compressed from v2 (v3) and merged from v1 and v2 (v4), `@prod` on v1, eval
and gate scores recorded; `globex/sales` with `@prod`; and 1,000 `acme/bulk-NNNN`
adapters (`bulk_adapters`: real registry rows of one real version, copied in one
transaction, so the many share its blobs and cost milliseconds, not a push each).
"""

from __future__ import annotations

import http.client
import re
import shutil
import subprocess
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from loraplex.registry import Identity, Registry, db
from loraplex.registry.derive import compress_version, merge_versions
from loraplex.runtime.serve.server import BackgroundServer
from tests.runtime.serve.test_grpc_inference import make_peft_adapter, settings_for

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
BULK = 1000


def bulk_adapters(reg: Registry, template: Any, tenant: str, names: list[str]) -> None:
    """Adapters `tenant/<name>` whose only version copies `template`'s row (same digest,
    blobs and base), inserted in one transaction."""
    v = db.versions
    with db.write_tx(reg.engine) as conn:
        row = conn.execute(sa.select(v).where(v.c.digest == template.digest)).mappings().first()
        when = row["created_at"]
        conn.execute(sa.insert(db.adapters), [
            {"tenant": tenant, "name": n, "last_version": 1, "created_at": when} for n in names])
        ids = dict(conn.execute(sa.select(db.adapters.c.name, db.adapters.c.id).where(
            db.adapters.c.tenant == tenant, db.adapters.c.name.in_(names))).all())
        copy = {k: val for k, val in row.items() if k not in ("id", "adapter_id", "version")}
        conn.execute(sa.insert(v), [{**copy, "adapter_id": ids[n], "version": 1}
                                    for n in names])


def trained_lineage(data: str, val_loss: float, lr: float) -> dict[str, Any]:
    return {"producer": "loraplex.trainer",
            "dataset": {"path": "data/support.jsonl", "digest": data, "examples": 240,
                        "format": "messages", "train_examples": 216, "val_examples": 24},
            "hyperparameters": {"r": 4, "lora_alpha": 8, "learning_rate": lr, "epochs": 3},
            "metrics": {"val_loss": val_loss, "train_loss": val_loss - 0.1}}


@dataclass
class ConsoleWorld:
    bg: BackgroundServer
    reg: Registry
    tokens: dict[str, str]
    base: Path
    root: Path
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.bg.http_port}"

    def identity(self, who: str) -> Identity:
        return self.reg.authenticate(self.tokens[who])


@pytest.fixture(scope="package")
def console(micro_base: Path, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[ConsoleWorld]:
    root = tmp_path_factory.mktemp("console")
    reg = Registry.open(root / "reg")
    system = Identity.system()
    reg.register_base(system, micro_base)
    tokens = {"acme": reg.create_token(system, "acme", label="acme ci"),
              "globex": reg.create_token(system, "globex"),
              "reader": reg.create_token(system, "acme", scope="inference"),
              "admin": reg.create_token(system, "ops", admin=True)}
    acme, globex = reg.authenticate(tokens["acme"]), reg.authenticate(tokens["globex"])
    data = "sha256:" + "5" * 64
    for seed, (loss, lr) in enumerate([(0.62, 2e-4), (0.55, 3e-4)], start=1):
        reg.push(acme, make_peft_adapter(micro_base, root / f"a{seed}", seed=seed),
                 "acme/support", base=micro_base, lineage=trained_lineage(data, loss, lr))
    compress_version(reg, acme, "acme/support:v2", rank=2)
    merge_versions(reg, acme, ["acme/support:v1", "acme/support:v2"], name="acme/support",
                   method="linear", weights=[0.5, 0.5])
    reg.set_alias(acme, "acme/support:v1", "prod", expected=None)
    for version, (loss, em) in {1: (0.61, 0.70), 2: (0.52, 0.80)}.items():
        reg.record_evaluation(acme, f"acme/support:v{version}", "eval",
                              {"loss": loss, "exact_match": em}, data_digest=data,
                              detail={"data": "test.jsonl", "n": 50})
    reg.record_evaluation(acme, "acme/support:v3", "gate", {"exact_match": 0.78},
                          data_digest=data, detail={
                              "passed": True, "gate": "exact_match>=0.9*source",
                              "reason": "acme/support:v3: exact_match=0.78 meets "
                                        "exact_match>=0.9*0.8 of acme/support:v2"})
    sales = reg.push(globex, make_peft_adapter(micro_base, root / "g", seed=9), "globex/sales",
                     base=micro_base)
    reg.set_alias(globex, sales.ref, "prod", expected=None)
    bulk_adapters(reg, reg.resolve(acme, "acme/support:v1"), "acme",
                  [f"bulk-{i:04d}" for i in range(BULK)])
    settings = settings_for(micro_base, root, http_port=0, http_host="127.0.0.1")
    with BackgroundServer(settings, registry=reg) as bg:
        yield ConsoleWorld(bg, reg, tokens, micro_base, root)
    reg.close()


# -- a plain HTTP client for the tests that need no browser ---------------------------------
class Http:
    """Requests to the console with a cookie jar of one: no redirects followed."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.cookies: dict[str, str] = {}

    def request(self, method: str, path: str, form: dict[str, str] | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, list[str]], str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        hdrs = dict(headers or {})
        if self.cookies:
            hdrs["cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        body = None
        if form is not None:
            body = urllib.parse.urlencode(form)
            hdrs["content-type"] = "application/x-www-form-urlencoded"
        conn.request(method, path, body=body, headers=hdrs)
        resp = conn.getresponse()
        text = resp.read().decode()
        got: dict[str, list[str]] = {}
        for k, v in resp.getheaders():
            got.setdefault(k.lower(), []).append(v)
        for c in got.get("set-cookie", []):
            name, _, rest = c.partition("=")
            value = rest.split(";", 1)[0]
            if value:
                self.cookies[name] = value
            else:
                self.cookies.pop(name, None)
        conn.close()
        return resp.status, got, text

    def csrf(self, path: str = "/console/adapters") -> str:
        status, _, text = self.request("GET", path)
        match = re.search(r'name="csrf" value="([^"]+)"', text)
        assert match, f"no form on {path} ({status})"
        return match.group(1)

    def sign_in(self, token: str) -> int:
        nonce = self.csrf("/console/signin")
        status, _, _ = self.request("POST", "/console/signin", {"csrf": nonce, "token": token})
        return status


# -- Chromium -----------------------------------------------------------------------------------
def _chromium_missing() -> str | None:
    if shutil.which(CHROMIUM) is None:
        return (f"{CHROMIUM} is not installed (`make chromium` installs Debian's package; "
                "it could not be installed here)")
    done = subprocess.run([CHROMIUM, "--version"], capture_output=True, text=True, timeout=60)
    return None if done.returncode == 0 else f"{CHROMIUM} does not run: {done.stderr[:200]}"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's Chromium under Playwright (never a downloaded browser build).

    Module scope: Playwright's sync API keeps an event loop running on the main thread
    while it is open, so later tests that call `asyncio.run` need it closed first."""
    why = _chromium_missing()
    if why:
        pytest.skip(why)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A fresh browser context (its own cookies) and page; CSP violations and script
    errors on it fail the test (an HTTP error status is the test's own business)."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = context.new_page()
    problems: list[str] = []
    pg.on("console", lambda m: problems.append(m.text) if m.type == "error"
          and not m.text.startswith("Failed to load resource") else None)
    pg.on("pageerror", lambda e: problems.append(str(e)))
    pg.set_default_timeout(15_000)
    yield pg
    context.close()
    assert not problems, f"the browser reported errors: {problems}"


def sign_in(page: Any, world: ConsoleWorld, who: str) -> None:
    page.goto(f"{world.url}/console/")
    page.fill("#token", world.tokens[who])
    page.click("button[type=submit]")
    page.wait_for_url(re.compile(r".*/console/adapters$"))
