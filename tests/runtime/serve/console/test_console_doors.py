"""The console is a door like the others, checked without a browser over the live server:
CSRF and origin checks on every change, the security headers, no token in a URL, a page
or a log line, and a revoked token ending its sessions at their next request."""

from __future__ import annotations

import logging

from loraplex.client import Client
from loraplex.registry import Identity
from loraplex.runtime.serve.console.sessions import CSP
from tests.runtime.serve.console.conftest import ConsoleWorld, Http


def _prod(console: ConsoleWorld) -> int:
    return console.reg.aliases(Identity.system(), "acme/support")["prod"]


def test_pages_carry_a_strict_content_security_policy_and_are_not_cached(console):
    http = Http(console.bg.http_port)
    assert http.sign_in(console.tokens["acme"]) == 303
    for path in ("/console/signin", "/console/adapters", "/console/adapters/acme/support",
                 "/console/serving", "/console/api/serving", "/console/adapters/acme/nope"):
        status, headers, _ = http.request("GET", path)
        assert status in (200, 303, 404), path
        assert headers["content-security-policy"] == [CSP], path
        assert "'unsafe-inline'" not in CSP and "default-src 'none'" in CSP
        assert headers["x-content-type-options"] == ["nosniff"]
        assert headers["referrer-policy"] == ["no-referrer"]
        assert headers["cache-control"] == ["no-store"], path
    _, headers, js = http.request("GET", "/console/static/console.js")
    assert headers["content-type"][0].startswith("text/javascript")
    assert headers["cache-control"] == ["no-cache"]  # revalidated, so an upgrade shows
    assert headers["x-content-type-options"] == ["nosniff"] and "fetch(" in js
    _, _, page = http.request("GET", "/console/adapters/acme/support")
    assert "<script>" not in page and " style=" not in page and "onclick" not in page
    signin = Http(console.bg.http_port).request("GET", "/console/signin")[1]["set-cookie"]
    cookie = next(c for c in signin if c.startswith("loraplex_console_signin="))
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/console" in cookie


def test_a_change_without_the_sessions_csrf_token_or_from_another_site_is_refused(console):
    http = Http(console.bg.http_port)
    http.sign_in(console.tokens["acme"])
    csrf = http.csrf("/console/adapters/acme/support")
    move = {"alias": "prod", "version": "2", "expected": "1"}
    other = Http(console.bg.http_port)
    other.sign_in(console.tokens["acme"])
    for form, headers in [(move, {}),                                  # no token
                          ({**move, "csrf": "x" * 43}, {}),            # a guessed one
                          ({**move, "csrf": other.csrf()}, {}),         # another session's
                          ({**move, "csrf": csrf}, {"sec-fetch-site": "cross-site"}),
                          ({**move, "csrf": csrf}, {"origin": "http://evil.example"})]:
        status, _, text = http.request("POST", "/console/adapters/acme/support/alias", form,
                                       headers)
        assert status == 403, (form, headers)
        assert _prod(console) == 1
    status, headers, _ = http.request("POST", "/console/adapters/acme/support/alias",
                                      {**move, "csrf": csrf}, {"sec-fetch-site": "same-origin"})
    assert status == 303 and _prod(console) == 2
    console.reg.set_alias(Identity.system(), "acme/support:v1", "prod", expected=2)
    # signing out needs the token too; signing in needs the form's nonce
    assert http.request("POST", "/console/signout", {})[0] == 403
    fresh = Http(console.bg.http_port)
    status, headers, _ = fresh.request("POST", "/console/signin",
                                       {"token": console.tokens["acme"], "csrf": "forged"})
    assert status == 403 and "loraplex_console" not in fresh.cookies


def test_an_inference_token_reads_but_cannot_move_aliases(console):
    http = Http(console.bg.http_port)
    http.sign_in(console.tokens["reader"])
    status, _, page = http.request("GET", "/console/adapters/acme/support")
    assert status == 200 and "Roll back" not in page and "cannot move them" in page
    status, _, text = http.request("POST", "/console/adapters/acme/support/alias", {
        "alias": "prod", "version": "2", "expected": "1", "csrf": http.csrf()})
    assert status == 403 and "scope" in text and _prod(console) == 1


def test_the_token_is_in_no_url_page_cookie_or_log_line(console, caplog):
    token = console.tokens["acme"]
    caplog.set_level(logging.DEBUG)
    http = Http(console.bg.http_port)
    nonce = http.csrf("/console/signin")
    status, headers, page = http.request("POST", "/console/signin",
                                         {"csrf": nonce, "token": token + "x"})
    assert status == 401 and token not in page  # a failed sign-in does not echo it back
    status, headers, _ = http.request("POST", "/console/signin",
                                      {"csrf": http.csrf("/console/signin"), "token": token})
    assert status == 303 and token not in headers["location"][0]
    assert token not in "".join(headers["set-cookie"]) and token not in http.cookies.values()
    for path in ("/console/adapters", "/console/adapters/acme/support",
                 "/console/adapters/acme/support/v/1", "/console/serving",
                 "/console/api/serving", "/console/api/adapters/acme/support"):
        status, headers, body = http.request("GET", path)
        assert status == 200 and token not in body, path
    assert "console sign-in" in caplog.text  # the door logs, but never the secret
    assert token not in caplog.text


def test_revoking_the_token_ends_its_sessions_at_once(console):
    admin = Client(console.bg.target, token=console.tokens["admin"], timeout=30)
    made = admin.create_token("acme", scope="publish", label="short-lived")
    secret, token_id = made.token, made.info.id
    http = Http(console.bg.http_port)
    assert http.sign_in(secret) == 303
    assert http.request("GET", "/console/adapters")[0] == 200
    admin.revoke_token(token_id)
    status, headers, _ = http.request("GET", "/console/adapters")
    assert status == 303 and headers["location"] == ["/console/signin?why=revoked"]
    assert http.request("GET", "/console/api/serving")[0] == 401
    status, _, page = http.request("GET", "/console/signin?why=revoked")
    assert "no longer valid" in page
    admin.close()


def test_signing_out_ends_the_session(console):
    http = Http(console.bg.http_port)
    http.sign_in(console.tokens["globex"])
    sid = http.cookies["loraplex_console"]
    status, headers, _ = http.request("POST", "/console/signout", {"csrf": http.csrf()})
    assert status == 303 and "loraplex_console" not in http.cookies
    http.cookies["loraplex_console"] = sid  # the old cookie, replayed
    assert http.request("GET", "/console/adapters")[0] == 303


def test_no_console_leaves_the_port_to_the_openai_routes(micro_base, tmp_path):
    from loraplex.registry import Registry
    from loraplex.runtime.serve.server import BackgroundServer
    from tests.runtime.serve.test_grpc_inference import settings_for

    settings = settings_for(micro_base, tmp_path, http_port=0, http_host="127.0.0.1",
                            console=False)
    with Registry.open(tmp_path / "reg") as reg, BackgroundServer(settings, registry=reg) as bg:
        http = Http(bg.http_port)
        assert http.request("GET", "/console/signin")[0] == 404
        assert http.request("GET", "/")[0] == 404
        assert bg.server.live is None  # and the engine feeds no recorder
        assert http.request("GET", "/v1/models", headers={
            "authorization": "Bearer " + reg.create_token(Identity.system(), "acme")})[0] == 200


def test_sessions_end_when_idle_or_old_and_are_bounded():
    from loraplex.runtime.serve.console import sessions

    now = [0.0]
    store = sessions.SessionStore(clock=lambda: now[0], limit=3)
    sid, s = store.create("lpx_secret", None)
    assert store.get(sid) is s and s.csrf and s.csrf != sid
    now[0] += sessions.IDLE_S - 1
    assert store.get(sid) is s  # used in time: its idle clock restarts
    now[0] += sessions.IDLE_S + 1
    assert store.get(sid) is None  # idle too long
    sid, _ = store.create("lpx_secret", None)
    for _ in range(int(sessions.LIFETIME_S // (sessions.IDLE_S / 2)) + 1):
        now[0] += sessions.IDLE_S / 2
        store.get(sid)
    assert store.get(sid) is None  # busy, but past its lifetime
    ids = [store.create("t", None)[0] for _ in range(5)]
    assert len(store) == 3 and store.get(ids[0]) is None and store.get(ids[-1]) is not None
    assert "Secure" in sessions.cookie("c", "v", secure=True)
    assert "Secure" not in sessions.cookie("c", "v", secure=False)
