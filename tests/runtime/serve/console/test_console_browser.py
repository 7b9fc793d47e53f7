"""The console as a person uses it: Debian's Chromium (Playwright) against a live
`loraplex serve`. Sign in, find one adapter among a thousand, open its lineage, promote and
roll back an alias (and see a move made meanwhile over gRPC refuse the stale page), watch
the serving figures move while traffic runs, and find nothing of another tenant's.

Every page is checked under the console's Content-Security-Policy: the `page` fixture
fails a test on any script error or CSP violation the browser reports."""

from __future__ import annotations

import re
import threading
import time

from loraplex.client import Client
from tests.runtime.serve.console.conftest import BULK, ConsoleWorld, sign_in


def test_sign_in_find_one_adapter_among_many_and_open_its_lineage(page, console: ConsoleWorld):
    sign_in(page, console, "acme")
    assert page.get_by_test_id("who").inner_text().startswith("tenant:acme")
    rows = page.locator("[data-testid=adapters] tbody tr")
    assert rows.count() == 50  # a page of the 1,003 adapters acme holds
    page.get_by_role("link", name="Next page »").click()
    assert page.locator("[data-testid=adapters] tbody tr").first.inner_text().startswith(
        "acme/bulk-0050")

    page.get_by_label("Search adapters").fill("support")
    page.get_by_role("button", name="Search").click()
    assert [r.split("\t")[0] for r in rows.all_inner_texts()] == ["acme/support"]
    assert "merge" in rows.first.inner_text() and "v4" in rows.first.inner_text()

    page.get_by_role("link", name="acme/support").click()
    assert page.get_by_test_id("adapter").inner_text() == "acme/support"
    versions = page.locator("[data-testid=versions] tbody tr")
    assert versions.count() == 4
    v1 = page.locator("tr[data-version='1']").inner_text()
    assert "chat" in v1 and "trained" in v1 and "q_proj, v_proj" in v1 and "@prod" in v1
    assert "compress" in page.locator("tr[data-version='3']").inner_text()
    graph = page.get_by_test_id("lineage")
    for node in ("acme/support:v1", "acme/support:v2", "acme/support:v3", "acme/support:v4",
                 "data 555555555555"):
        assert graph.locator(f"g[data-node='{node}']").count() == 1, node
    assert graph.locator("g.config").count() == 2  # v1 and v2 ran with different rates
    assert "merge ×0.5" in graph.inner_text() and "compress" in graph.inner_text()

    # v4's own page: its ancestry only (v3, compressed from v2, is not among it)
    page.locator("tr[data-version='4'] a").first.click()
    assert page.get_by_test_id("version").inner_text() == "acme/support:v4"
    graph = page.get_by_test_id("lineage")
    assert graph.locator("g.current").get_attribute("data-node") == "acme/support:v4"
    assert graph.locator("g[data-node='acme/support:v3']").count() == 0
    assert graph.locator("g[data-node='acme/support:v1']").count() == 1
    assert "chat" in page.locator("dl.facts").first.inner_text()  # inherited from v1, v2

    # the evaluations of v1 and v2 line up for a comparison
    page.goto(f"{console.url}/console/adapters/acme/support?a=1&b=2")
    compare = page.get_by_test_id("compare").inner_text()
    assert re.search(r"eval@55555555\.exact_match\s+0\.7\s+0\.8\s+\+0\.1", compare), compare
    assert "train.val_loss" in compare
    assert "passed" in page.get_by_test_id("evaluations").inner_text()


def test_promote_and_roll_back_an_alias_and_a_stale_page_is_refused(page, console):
    sign_in(page, console, "acme")
    page.goto(f"{console.url}/console/adapters/acme/support")
    assert page.get_by_test_id("alias-prod").inner_text() == "v1"

    page.get_by_test_id("move-prod-v2").click()
    assert page.get_by_test_id("notice").inner_text() == "Moved prod: v1 → v2."
    assert page.get_by_test_id("alias-prod").inner_text() == "v2"
    page.get_by_test_id("rollback-prod").click()
    assert page.get_by_test_id("alias-prod").inner_text() == "v1"
    assert console.reg.aliases(console.identity("acme"), "acme/support")["prod"] == 1
    history = page.get_by_test_id("history").inner_text()
    assert "v2 → v1" in history and "v1 → v2" in history and "tenant:acme" in history

    # someone moves prod over gRPC while this page still shows v1
    with Client(console.bg.target, token=console.tokens["acme"], timeout=30) as c:
        c.set_alias("acme/support:v3", "prod", expected=1)
    page.get_by_test_id("move-prod-v2").click()
    problem = page.get_by_test_id("problem").inner_text()
    assert "Not moved" in problem and "points at v3 now, not v1" in problem
    assert page.get_by_test_id("alias-prod").inner_text() == "v3"  # the page is current again
    assert console.reg.aliases(console.identity("acme"), "acme/support")["prod"] == 3
    console.reg.set_alias(console.identity("acme"), "acme/support:v1", "prod", expected=3)


def _traffic(console: ConsoleWorld, tenant: str, ref: str, stop: threading.Event,
             seconds: float) -> threading.Thread:
    """Greedy requests over gRPC until `stop` or `seconds` pass."""
    def run() -> None:
        end = time.monotonic() + seconds
        with Client(console.bg.target, token=console.tokens[tenant], timeout=60) as c:
            while not stop.is_set() and time.monotonic() < end:
                c.generate(ref, "the red box is", max_new_tokens=24)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _number(text: str) -> float:
    return float(text) if re.fullmatch(r"[0-9.]+", text) else -1.0


def test_the_serving_figures_move_while_traffic_runs(page, console):
    sign_in(page, console, "acme")
    page.goto(f"{console.url}/console/serving")
    stop = threading.Event()
    threads = [_traffic(console, "acme", "acme/support@prod", stop, 40),
               _traffic(console, "globex", "globex/sales@prod", stop, 40)]
    try:
        row = page.locator("#adapters-body tr[data-adapter='acme/support']")
        row.wait_for(timeout=30_000)
        rate = page.get_by_test_id("tokens-per-s")
        page.wait_for_function("Number(document.getElementById('tokens-per-s').textContent) > 0",
                               timeout=30_000)
        seen = {rate.inner_text()}
        deadline = time.monotonic() + 20
        while len(seen) < 3 and time.monotonic() < deadline:  # it keeps moving, untouched
            page.wait_for_timeout(500)
            seen.add(rate.inner_text())
        assert len(seen) >= 3, f"tokens/s did not move: {seen}"
        assert max(_number(s) for s in seen) > 0
        cells = row.locator("td").all_inner_texts()
        assert _number(cells[3]) > 0 and "ms" in cells[5] and "ms" in cells[6], cells
        assert int(cells[7]) > 0  # requests finished in the window
        assert page.locator("#chart-tokens polyline").count() == 1
        tiers = page.locator("#tiers-body").inner_text()
        assert "acme/support:v1" in tiers and "device slot" in tiers
        # acme's page shows only acme: globex's traffic runs meanwhile, unseen
        assert "globex" not in page.locator("#serving").inner_text()
        assert page.get_by_test_id("slots").count() == 0  # engine-wide figures: admins only
    finally:
        stop.set()
        for t in threads:
            t.join(60)


def _text(page) -> str:
    return page.locator("main").inner_text()


def test_another_tenants_adapters_are_invisible(page, console):
    stop = threading.Event()
    traffic = _traffic(console, "acme", "acme/support@prod", stop, 20)
    try:
        sign_in(page, console, "globex")
        listed = page.locator("[data-testid=adapters] tbody tr").all_inner_texts()
        assert [r.split("\t")[0] for r in listed] == ["globex/sales"]
        page.get_by_label("Search adapters").fill("support")
        page.get_by_role("button", name="Search").click()
        assert page.get_by_test_id("no-adapters").is_visible()
        page.goto(f"{console.url}/console/adapters?q=acme/support")
        assert page.get_by_test_id("no-adapters").is_visible()

        # someone else's adapter and one that does not exist look exactly alike
        for real, missing in [("acme/support", "acme/nothing-here"),
                              ("acme/support/v/1", "acme/nothing-here/v/1")]:
            got = page.goto(f"{console.url}/console/adapters/{real}")
            text = _text(page).replace("acme/support", "X")
            assert got.status == 404
            gone = page.goto(f"{console.url}/console/adapters/{missing}")
            assert gone.status == 404
            assert _text(page).replace("acme/nothing-here", "X") == text
        for real, missing in [("/console/api/adapters/acme/support",
                               "/console/api/adapters/acme/nothing-here")]:
            a, b = page.request.get(console.url + real), page.request.get(console.url + missing)
            assert a.status == b.status == 404
            assert a.text().replace("acme/support", "X") == \
                b.text().replace("acme/nothing-here", "X")
        found = page.request.get(f"{console.url}/console/api/adapters?q=support").json()
        assert found == {"adapters": [], "next": None}
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:  # acme's traffic is running: never shown
            serving = page.request.get(f"{console.url}/console/api/serving").json()
            assert "acme" not in str(serving)
            page.wait_for_timeout(1000)
        # the admin sees it all
        admin = page.context.browser.new_context()
        p2 = admin.new_page()
        sign_in(p2, console, "admin")
        p2.get_by_label("Search adapters").fill("support")
        p2.get_by_role("button", name="Search").click()
        assert "acme/support" in p2.locator("[data-testid=adapters]").inner_text()
        assert "acme" in str(p2.request.get(f"{console.url}/console/api/serving").json())
        admin.close()
    finally:
        stop.set()
        traffic.join(60)


def test_paging_walks_every_adapter_once(page, console):
    sign_in(page, console, "acme")
    names: list[str] = []
    while True:
        names += [r.split("\t")[0] for r in
                  page.locator("[data-testid=adapters] tbody tr").all_inner_texts()]
        nxt = page.get_by_role("link", name="Next page »")
        if nxt.count() == 0:
            break
        nxt.click()
    assert len(names) == BULK + 1 == len(set(names)) and names == sorted(names)
