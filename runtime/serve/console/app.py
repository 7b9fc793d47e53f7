"""The console's routes: pages, their forms, and the JSON the Serving page polls.

    /console/signin                    sign in with a loraplex token (POST), sign out
    /console/adapters?q=&after=        adapters, searched and keyset-paged
    /console/adapters/t/n              versions, lineage, evaluations, aliases (promote, roll back)
    /console/adapters/t/n/v/3          one version and its ancestry
    /console/serving                   live state (charts drawn by static/console.js)
    /console/api/adapters[/t/n]        the same data as JSON;  /console/api/serving  the charts'

Every route but sign-in and the static files needs a session (`sessions.py`) whose token
authenticates now; the registry then decides what the caller sees exactly as it does over
gRPC (a foreign adapter is the same 404 as a missing one). Every POST needs the session's
CSRF token and a same-origin `Origin`. Registry and engine calls are blocking: they run in
threads (`asyncio.to_thread`), never on the event loop.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from loraplex.errors import (
    AliasConflict,
    AuthThrottled,
    InvalidArgument,
    LoraplexError,
    Unauthenticated,
)
from loraplex.runtime.serve.console import reads, sessions, views
from loraplex.runtime.serve.console.live import LiveRecorder
from loraplex.runtime.serve.openai.http import STATUS, BodyTooLarge, read_body

log = logging.getLogger(__name__)

PAGE_SIZE = 50
MAX_FORM_BYTES = 16 * 1024
PACKAGE = "loraplex.runtime.serve.console"


@dataclass(frozen=True)
class ConsoleContext:
    """What the console serves from: the server's registry and engine (an `EngineClient`;
    None: no live state), its live recorder, and how callers authenticate
    (`authenticate(token, peer=...) -> Identity`, the registry's, or an admin for all
    under `no_auth`)."""

    registry: Any
    engine: Any | None
    live: LiveRecorder | None
    authenticate: Callable[..., Any]
    secure_cookies: bool
    no_auth: bool = False


@dataclass
class Caller:
    sid: str
    session: sessions.Session
    identity: Any


class Refused(Exception):
    """A request the console turns away before doing anything (bad CSRF, origin, form)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def _peer(request: Any) -> str | None:
    """The caller's address in the gRPC door's form, so failures share one backoff."""
    host = request.client.host if request.client else None
    if not host:
        return None
    return f"ipv6:[{host}]" if ":" in host else f"ipv4:{host}"


def create_console(ctx: ConsoleContext):
    """The console as a Starlette app, to be mounted at `/console`."""
    import jinja2
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    env = jinja2.Environment(loader=jinja2.PackageLoader(PACKAGE, "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    store = sessions.SessionStore()
    reg = ctx.registry

    # -- responses -----------------------------------------------------------------------
    def render(name: str, caller: Caller | None, status: int = 200, **values: Any
               ) -> HTMLResponse:
        me = caller.identity if caller else None
        html = env.get_template(name).render(me=me, csrf=caller.session.csrf if caller else "",
                                             no_auth=ctx.no_auth, **values)
        return HTMLResponse(html, status_code=status)

    def failed(e: LoraplexError, caller: Caller | None, api: bool) -> Response:
        status = STATUS.get(e.code, 500)
        headers = {}
        retry = getattr(e, "retry_after_s", None)
        if retry is not None:
            headers["retry-after"] = str(max(1, int(retry + 0.999)))
        if api:
            return JSONResponse({"error": {"code": e.code.lower(), "message": e.public_message}},
                                status_code=status, headers=headers)
        page = render("error.html", caller, status, title=_TITLES.get(status, "Error"),
                      message=e.public_message)
        page.headers.update(headers)
        return page

    def to_signin(why: str = "") -> Response:
        where = "/console/signin" + (f"?{urllib.parse.urlencode({'why': why})}" if why else "")
        resp = RedirectResponse(where, status_code=303)
        resp.headers.append("set-cookie", sessions.clear_cookie(sessions.COOKIE,
                                                                secure=ctx.secure_cookies))
        return resp

    # -- who is calling ------------------------------------------------------------------
    async def caller_of(request: Any) -> Caller | str:
        """The signed-in caller, authenticated again now; else why not ("" = no session)."""
        sid = request.cookies.get(sessions.COOKIE)
        s = store.get(sid)
        if s is None:
            return "expired" if sid else ""
        try:
            ident = await asyncio.to_thread(ctx.authenticate, s.token, peer=_peer(request))
        except Unauthenticated:
            store.drop(sid)
            return "revoked"
        s.identity = ident
        return Caller(sid, s, ident)

    def guarded(api: bool = False):
        def wrap(handler: Callable[..., Awaitable[Response]]):
            @functools.wraps(handler)
            async def run(request: Any) -> Response:
                try:
                    who = await caller_of(request)
                except AuthThrottled as e:
                    return failed(e, None, api)
                if not isinstance(who, Caller):
                    if api:
                        return JSONResponse({"error": {"code": "unauthenticated",
                                                       "message": "sign in first"}},
                                            status_code=401)
                    return to_signin(who)
                try:
                    return await handler(request, who)
                except Refused as e:
                    if api:
                        return JSONResponse({"error": {"message": e.message}},
                                            status_code=e.status)
                    return render("error.html", who, e.status, title=_TITLES.get(
                        e.status, "Refused"), message=e.message)
                except LoraplexError as e:
                    return failed(e, who, api)
            return run
        return wrap

    async def form_of(request: Any, caller: Caller | None = None,
                      nonce: str | None = None) -> dict[str, str]:
        """The POSTed form, after the origin and CSRF checks (a session's token, or the
        sign-in nonce); Refused otherwise."""
        if not sessions.origin_ok(request.headers, request.url.scheme):
            raise Refused(403, "this form was sent from another site")
        try:
            raw = await read_body(request, MAX_FORM_BYTES)
        except BodyTooLarge:
            raise Refused(413, "form too large") from None
        try:
            form = dict(urllib.parse.parse_qsl(raw.decode("utf-8", "replace"),
                                               keep_blank_values=True, max_num_fields=32))
        except ValueError:
            raise Refused(400, "malformed form") from None
        expected = caller.session.csrf if caller is not None else nonce
        if not sessions.same(form.get("csrf"), expected):
            raise Refused(403, "this form has expired or did not come from this console: "
                               "reload the page and try again")
        return form

    # -- sign in and out -----------------------------------------------------------------
    def signin_form(why: str = "", status: int = 200, error: str = "") -> Response:
        nonce = _nonce()
        messages = {"revoked": "Your token is no longer valid (revoked or expired): sign "
                               "in again.", "expired": "Your session ended: sign in again.",
                    "out": "Signed out."}
        resp = render("signin.html", None, status, nonce=nonce, error=error,
                      note=messages.get(why, ""))
        resp.headers.append("set-cookie", sessions.cookie(
            sessions.SIGNIN_COOKIE, nonce, secure=ctx.secure_cookies,
            max_age=sessions.SIGNIN_S))
        return resp

    async def signin_page(request: Any) -> Response:
        if isinstance(await _quiet(caller_of(request)), Caller):
            return RedirectResponse("/console/adapters", status_code=303)
        return signin_form(request.query_params.get("why", ""))

    async def signin(request: Any) -> Response:
        try:
            form = await form_of(request, nonce=request.cookies.get(sessions.SIGNIN_COOKIE))
        except Refused as e:
            return signin_form(status=e.status, error=e.message)
        token = form.get("token", "").strip()
        if not token and not ctx.no_auth:
            return signin_form(status=400, error="Paste a loraplex API token.")
        try:
            ident = await asyncio.to_thread(ctx.authenticate, token, peer=_peer(request))
        except AuthThrottled as e:
            return signin_form(status=429, error=e.public_message)
        except Unauthenticated:
            log.info("console sign-in refused from %s", _peer(request) or "?")
            return signin_form(status=401, error="That token is invalid, expired or revoked.")
        sid, _s = store.create(token, ident)
        log.info("console sign-in: %s", ident.who)
        resp = RedirectResponse("/console/adapters", status_code=303)
        resp.headers.append("set-cookie", sessions.cookie(sessions.COOKIE, sid,
                                                          secure=ctx.secure_cookies))
        resp.headers.append("set-cookie", sessions.clear_cookie(sessions.SIGNIN_COOKIE,
                                                                secure=ctx.secure_cookies))
        return resp

    @guarded()
    async def signout(request: Any, caller: Caller) -> Response:
        await form_of(request, caller)
        store.drop(caller.sid)
        return to_signin("out")

    # -- adapters ------------------------------------------------------------------------
    @guarded()
    async def adapters_page(request: Any, caller: Caller) -> Response:
        q, after = _query(request)
        page, token = await asyncio.to_thread(reg.search_adapters, caller.identity, q,
                                              page_size=PAGE_SIZE, page_token=after or None)
        rows = [views.version_dict(v) for v in page]
        next_url = (f"/console/adapters?{urllib.parse.urlencode({'q': q, 'after': token})}"
                    if token else None)
        return render("adapters.html", caller, rows=rows, q=q, next_url=next_url,
                      paged=bool(after))

    async def adapter_view(request: Any, caller: Caller, *, status: int = 200,
                           notice: str = "", problem: str = "") -> Response:
        key = _key(request)
        data = await asyncio.to_thread(reads.adapter_page, reg, caller.identity, key)
        numbers = [r["version"] for r in data["versions"]]
        a, b = _pair(request, numbers)
        compare = views.compare(data["card"], a, b) if a and b else []
        data.pop("version_objs")
        if not notice:
            notice = _moved_notice(request)
        return render("adapter.html", caller, status, **data, a=a, b=b, compare=compare,
                      notice=notice, problem=problem,
                      can_publish=caller.identity.allows("publish"))

    @guarded()
    async def adapter_page(request: Any, caller: Caller) -> Response:
        return await adapter_view(request, caller)

    @guarded()
    async def version_page(request: Any, caller: Caller) -> Response:
        key, n = _key(request), request.path_params["version"]
        data = await asyncio.to_thread(reads.adapter_page, reg, caller.identity, key, n)
        obj = next(o for o in data["version_objs"] if o.version == n)
        row = next((r for r in data["versions"] if r["version"] == n), None)
        return render("version.html", caller, key=key,
                      v=row or views.version_dict(obj, {a["alias"]: a["version"]
                                                        for a in data["aliases"]}),
                      drawing=data["drawing"], lineage_json=_pretty(obj.lineage),
                      evaluations=[e for e in data["evaluations"] if e["version"] == n],
                      metrics=data["card"].get(n, {}))

    @guarded()
    async def move_alias(request: Any, caller: Caller) -> Response:
        form = await form_of(request, caller)
        key = _key(request)
        alias = form.get("alias", "")
        version = _int(form.get("version"), "version")
        expected_text = form.get("expected", "")
        expected = None if expected_text in ("", "none") else _int(expected_text, "expected")
        try:
            move = await asyncio.to_thread(reg.set_alias, caller.identity,
                                           f"{key}:v{version}", alias, expected=expected)
        except AliasConflict:
            now = await asyncio.to_thread(reg.aliases, caller.identity, key)
            current = now.get(alias)
            shown = "nothing" if expected is None else f"v{expected}"
            return await adapter_view(
                request, caller, status=409, problem=(
                    f"Not moved: {alias} points at "
                    f"{'nothing' if current is None else f'v{current}'} now, not {shown} as "
                    "the page you acted on showed — someone moved it since. Nothing was "
                    "changed; the page below is current: check it and choose again."))
        log.info("console: %s moved %s@%s v%s -> v%s", caller.identity.who, key, alias,
                 move.from_version, move.to_version)
        query = urllib.parse.urlencode({"moved": alias, "from": move.from_version or 0,
                                        "to": move.to_version})
        return RedirectResponse(f"/console/adapters/{key}?{query}#aliases", status_code=303)

    # -- serving -------------------------------------------------------------------------
    @guarded()
    async def serving_page(request: Any, caller: Caller) -> Response:
        return render("serving.html", caller, live=ctx.live is not None,
                      engine=ctx.engine is not None)

    @guarded(api=True)
    async def serving_api(request: Any, caller: Caller) -> Response:
        return JSONResponse(await asyncio.to_thread(reads.serving, ctx.engine, ctx.live,
                                                       caller.identity))

    # -- JSON ----------------------------------------------------------------------------
    @guarded(api=True)
    async def adapters_api(request: Any, caller: Caller) -> Response:
        q, after = _query(request)
        page, token = await asyncio.to_thread(reg.search_adapters, caller.identity, q,
                                              page_size=PAGE_SIZE, page_token=after or None)
        return JSONResponse({"adapters": [views.version_dict(v) for v in page],
                             "next": token})

    @guarded(api=True)
    async def adapter_api(request: Any, caller: Caller) -> Response:
        key = _key(request)

        def read() -> dict[str, Any]:
            aliases = reg.aliases(caller.identity, key)
            return {"key": key, "aliases": aliases,
                    "versions": [views.version_dict(v, aliases)
                                 for v in reg.list_versions(caller.identity, key)],
                    "evaluations": [views.evaluation_dict(e)
                                    for e in reg.evaluations(caller.identity, key)]}
        return JSONResponse(await asyncio.to_thread(read))

    async def home(request: Any) -> Response:
        return RedirectResponse("/console/adapters", status_code=303)

    routes = [
        Route("/", home, methods=["GET"]),
        Route("/signin", signin_page, methods=["GET"]),
        Route("/signin", signin, methods=["POST"]),
        Route("/signout", signout, methods=["POST"]),
        Route("/adapters", adapters_page, methods=["GET"]),
        Route("/adapters/{tenant}/{name}", adapter_page, methods=["GET"]),
        Route("/adapters/{tenant}/{name}/v/{version:int}", version_page, methods=["GET"]),
        Route("/adapters/{tenant}/{name}/alias", move_alias, methods=["POST"]),
        Route("/serving", serving_page, methods=["GET"]),
        Route("/api/adapters", adapters_api, methods=["GET"]),
        Route("/api/adapters/{tenant}/{name}", adapter_api, methods=["GET"]),
        Route("/api/serving", serving_api, methods=["GET"]),
        Mount("/static", StaticFiles(packages=[(PACKAGE, "static")]), name="static"),
    ]
    app = Starlette(routes=routes, middleware=[Middleware(sessions.SecurityHeaders)])
    app.state.sessions = store  # tests and operators can count them
    return app


def console_routes(ctx: ConsoleContext) -> list[Any]:
    """Routes to add to the HTTP door: the console under `/console`, and `/` sending a
    browser there."""
    from starlette.responses import RedirectResponse
    from starlette.routing import Mount, Route

    async def root(request: Any):
        return RedirectResponse("/console/", status_code=307)

    return [Mount("/console", app=create_console(ctx)), Route("/", root, methods=["GET"])]


# -- small pure helpers ----------------------------------------------------------------------
_TITLES = {400: "Bad request", 401: "Sign in", 403: "Not allowed", 404: "Not found",
           409: "Conflict", 413: "Too large", 429: "Slow down", 503: "Unavailable"}


async def _quiet(coro: Awaitable[Any]) -> Any:
    """`coro`'s result, or None if it raised a LoraplexError (the sign-in page's check)."""
    try:
        return await coro
    except LoraplexError:
        return None


def _nonce() -> str:
    import secrets

    return secrets.token_urlsafe(24)


def _key(request: Any) -> str:
    return f"{request.path_params['tenant']}/{request.path_params['name']}"


def _query(request: Any) -> tuple[str, str]:
    q = request.query_params.get("q", "").strip().lower()
    return q, request.query_params.get("after", "")


def _int(text: str | None, field: str) -> int:
    try:
        return int(text or "")
    except ValueError:
        raise InvalidArgument(f"{field} must be a version number", field=field) from None


def _pair(request: Any, numbers: list[int]) -> tuple[int | None, int | None]:
    """The two versions to compare (`?a=3&b=4`), default the two newest."""
    def pick(name: str, default: int | None) -> int | None:
        text = request.query_params.get(name, "")
        return int(text) if text.isdigit() and int(text) in numbers else default
    return (pick("a", numbers[1] if len(numbers) > 1 else None),
            pick("b", numbers[0] if numbers else None))


def _moved_notice(request: Any) -> str:
    qp = request.query_params
    alias, a, b = qp.get("moved", ""), qp.get("from", ""), qp.get("to", "")
    if not alias or not a.isdigit() or not b.isdigit():
        return ""
    was = "nothing" if a == "0" else f"v{a}"
    return f"Moved {alias}: {was} → v{b}."


def _pretty(lineage: dict[str, Any]) -> str:
    import json

    return json.dumps(lineage, indent=2, sort_keys=True, default=str)
