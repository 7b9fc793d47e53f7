"""OpenAI-compatible HTTP front door: `/v1/models`, `/v1/completions`, `/v1/chat/completions`.

    app = create_app(EngineBackend(engine, registry, base_name="smollm2"))
    uvicorn.run(app, port=8000)            # or serve_in_thread(app, port) beside gRPC

    client = openai.OpenAI(base_url="http://host:8000/v1", api_key=<loraplex token>)
    client.chat.completions.create(model="acme/support@prod", messages=[...])

The HTTP layer only speaks to a `Backend` (four methods, below), never to the engine's
internals: `EngineBackend` binds it to `Engine.submit` (a `GenerationRequest` in, a
`RequestStream` of `Chunk`s and a `GenerationResult` out). `model` is an adapter ref
(`tenant/name`, `@alias`, `:v3`, `sha256:`) or the base's name; the Bearer token is the same
registry token gRPC takes, and the tenant rules are the registry's, so a foreign adapter is
404 exactly as it is NOT_FOUND over gRPC. Errors carry OpenAI's error body with the HTTP
status of the gRPC code (`STATUS`). Streaming is server-sent events, ending in `[DONE]`.
A finished choice's `finish_reason` is always one of OpenAI's names (`FINISH_REASONS`), and
`loraplex_finish_reason` beside it is the engine's own (`stop`, `length`, `grammar`).

Bounds: a body larger than `max_body_bytes` is refused with 413 before it is read past the
cap (by its Content-Length when it has one); JSON with `NaN`/`Infinity` is 400; a chat call
holds at most `chat.MAX_MESSAGES` messages; one choice per call (`n`/`best_of` of 1, no
`logit_bias`, no `logprobs`: anything else is 400, never silently ignored). A non-streaming
call is cancelled when its client disconnects and after `timeout_s`. `x-request-id` is
echoed (and logged) only when it is at most 128 characters of `[A-Za-z0-9._:-]`;
otherwise the response carries a fresh one.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from loraplex.chat import MAX_MESSAGES, ROLES  # what chat intake accepts
from loraplex.errors import (
    Cancelled,
    DeadlineExceeded,
    InvalidArgument,
    LoraplexError,
    Unauthenticated,
)

MAX_BODY_BYTES = 8 << 20
TIMEOUT_S = 600.0
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# OpenAI parameters this server has one answer for: (name, the values it serves, why)
SINGLE_CHOICE = (
    ("n", (None, 1), "one choice per request: send `n` requests"),
    ("best_of", (None, 1), "one choice per request: `best_of` is not served"),
    ("logit_bias", (None, {}), "`logit_bias` is not served"),
    ("logprobs", (None, False), "`logprobs` are not served"),
    ("top_logprobs", (None, 0), "`logprobs` are not served"),
)

# gRPC code -> HTTP status, as the OpenAI API and grpc-gateway use them.
STATUS = {
    "INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400, "OUT_OF_RANGE": 400,
    "UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403, "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409, "RESOURCE_EXHAUSTED": 429, "CANCELLED": 499,
    "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504, "DATA_LOSS": 500, "INTERNAL": 500,
}

# The engine's finish reason -> OpenAI's (stop | length | content_filter | tool_calls |
# function_call; clients and SDKs switch on these). "grammar" (the output can no longer
# satisfy its constraint, runtime/decoding/grammar.py) becomes "stop": the server ended the output
# before `max_tokens`, so "length" would tell a client that a larger budget helps, and
# "content_filter" would claim a policy block. A client that must tell it from a natural
# stop reads `loraplex_finish_reason`. Cancelled and past-deadline requests are errors,
# never choices (openai_binding.py).
FINISH_REASONS = {"stop": "stop", "length": "length", "grammar": "stop"}

# vLLM's `structured_outputs` keys -> (Sampling field, what the value must be)
STRUCTURED = {"json": ("json_schema", "a JSON schema (object or text)"),
              "regex": ("regex", "a string"), "choice": ("choice", "a list of strings")}


@dataclass(frozen=True)
class Sampling:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    json_schema: str | None = None  # `response_format` or `structured_outputs.json` (JSON text)
    regex: str | None = None  # `structured_outputs.regex`
    choice: tuple[str, ...] = ()  # `structured_outputs.choice`


@dataclass(frozen=True)
class Outcome:
    text: str
    finish_reason: str  # the engine's: "stop" | "length" | "grammar" (FINISH_REASONS maps it)
    prompt_tokens: int
    completion_tokens: int


class TextStream(Protocol):
    """Text chunks as generated (`async for`), then `await result()`."""

    def __aiter__(self) -> AsyncIterator[str]: ...

    async def result(self) -> Outcome: ...

    def cancel(self) -> None: ...


class Backend(Protocol):
    """All the HTTP layer needs from a serving process. Blocking methods are called off the
    event loop (`asyncio.to_thread`); typed `LoraplexError`s become OpenAI error bodies."""

    def authenticate(self, token: str | None, peer: str | None = None) -> Any: ...

    def models(self, identity: Any, *, limit: int | None = None,
               after: str | None = None) -> list[str]:
        """Model ids in order: the base first, then adapters by `tenant/name`; at most
        `limit` (None: all) of those after the id `after` (None: from the start)."""
        ...

    def submit(self, identity: Any, model: str, *, prompt: str | None,
               messages: list[dict[str, str]] | None, sampling: Sampling) -> TextStream: ...


# -- request parsing ----------------------------------------------------------------------------
MODELS_PAGE_MAX = 1000


def _page_limit(text: str | None) -> int | None:
    """`/v1/models?limit=`: None when absent; an integer 1..MODELS_PAGE_MAX or 400."""
    if text is None:
        return None
    if not text.isdigit() or not 1 <= int(text) <= MODELS_PAGE_MAX:
        raise InvalidArgument(f"`limit` must be an integer from 1 to {MODELS_PAGE_MAX}",
                              field="limit")
    return int(text)


class BodyTooLarge(Exception):
    """The body passed the cap (413)."""


def _refuse_unserved(body: dict[str, Any]) -> None:
    """400 for OpenAI parameters asking for more than one plain choice."""
    for name, served, why in SINGLE_CHOICE:
        value = body.get(name)
        if isinstance(value, bool) and name != "logprobs":
            raise InvalidArgument(f"`{name}` must be a number", field=name)
        if not any(value == ok and type(value) is type(ok) or value is ok for ok in served):
            raise InvalidArgument(f"`{name}`={json.dumps(value)[:40]}: {why}", field=name)


def _finite(name: str, value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidArgument(f"`{name}` must be a finite number", field=name)
    return value


def _sampling(body: dict[str, Any], default_max: int) -> Sampling:
    _refuse_unserved(body)
    for name in ("max_completion_tokens", "max_tokens", "temperature", "top_p", "seed"):
        _finite(name, body.get(name))
    stop = body.get("stop") or ()
    stop = (stop,) if isinstance(stop, str) else stop
    if not isinstance(stop, list | tuple) or not all(isinstance(s, str) for s in stop):
        raise InvalidArgument("`stop` must be a string or a list of strings", field="stop")
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or default_max
    constraint = _constraint(body)
    try:
        return Sampling(max_tokens=int(max_tokens),
                        temperature=float(body.get("temperature", 1.0)),
                        top_p=float(body.get("top_p", 1.0)),
                        seed=None if body.get("seed") is None else int(body["seed"]),
                        stop=tuple(stop), **constraint)
    except (TypeError, ValueError, OverflowError) as e:
        raise InvalidArgument(f"bad sampling value: {e}", field="sampling") from e


def _constraint(body: dict[str, Any]) -> dict[str, Any]:
    """`Sampling`'s constraint field from OpenAI's `response_format` (JSON schemas only) or
    vLLM's `structured_outputs` extra ({"json": schema} | {"regex": r} | {"choice": [...]},
    `extra_body` in the official client), so clients written for vLLM work unchanged."""
    schema = _response_format(body)
    so = body.get("structured_outputs")
    if so is None:
        return {"json_schema": schema}
    if schema is not None:
        raise InvalidArgument("give `response_format` or `structured_outputs`, not both",
                              field="structured_outputs")
    if not isinstance(so, dict) or len(so) != 1 or next(iter(so)) not in STRUCTURED:
        raise InvalidArgument("`structured_outputs` must hold exactly one of "
                              f"{', '.join(STRUCTURED)}", field="structured_outputs")
    (key, value), = so.items()
    if key == "json" and isinstance(value, dict):
        value = json.dumps(value)
    field, what = STRUCTURED[key]
    ok = isinstance(value, str) if key != "choice" else (
        isinstance(value, list) and all(isinstance(c, str) for c in value))
    if not ok:
        raise InvalidArgument(f"`structured_outputs.{key}` must be {what}",
                              field=f"structured_outputs.{key}")
    return {field: tuple(value) if key == "choice" else value}


def _response_format(body: dict[str, Any]) -> str | None:
    """OpenAI's `response_format` → a JSON schema (text) for constrained decoding:
    {"type": "json_schema", "json_schema": {"schema": {...}}} that schema, {"type":
    "json_object"} any JSON object, {"type": "text"} or absent none."""
    rf = body.get("response_format")
    if rf is None:
        return None
    kind = rf.get("type") if isinstance(rf, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return json.dumps({"type": "object"})
    if kind == "json_schema":
        spec = rf.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise InvalidArgument("`response_format.json_schema.schema` must be a JSON object",
                                  field="response_format.json_schema.schema")
        return json.dumps(schema)
    raise InvalidArgument("`response_format.type` must be one of text, json_object, "
                          "json_schema", field="response_format.type")


def _messages(body: dict[str, Any]) -> list[dict[str, str]]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise InvalidArgument("`messages` must be a non-empty list", field="messages")
    if len(msgs) > MAX_MESSAGES:
        raise InvalidArgument(f"`messages` holds {len(msgs)} messages; at most {MAX_MESSAGES}",
                              field="messages")
    out = []
    for i, m in enumerate(msgs):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):  # content parts: only text is served
            content = "".join(p.get("text", "") for p in content
                              if isinstance(p, dict) and p.get("type") == "text")
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(content, str):
            raise InvalidArgument(f"messages[{i}]: role must be one of {', '.join(ROLES)} and "
                                  "content a string", field=f"messages[{i}]")
        out.append({"role": m["role"], "content": content})
    return out


def _prompt(body: dict[str, Any]) -> str:
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
        p = p[0]
    if not isinstance(p, str):
        raise InvalidArgument("`prompt` must be one string", field="prompt")
    return p


def _model(body: dict[str, Any]) -> str:
    m = body.get("model")
    if not isinstance(m, str) or not m:
        raise InvalidArgument("`model` is required: an adapter ref or the base's name",
                              field="model")
    return m


def _no_constant(name: str) -> Any:
    raise InvalidArgument(f"body: `{name}` is not JSON (numbers must be finite)", field="body")


def parse_body(raw: bytes) -> dict[str, Any]:
    """The JSON object of a request body; InvalidArgument for anything else (`NaN` and
    `Infinity` included: Python's json would take them)."""
    try:
        body = json.loads(raw, parse_constant=_no_constant)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise InvalidArgument(f"body is not JSON: {str(e)[:200]}", field="body") from e
    if not isinstance(body, dict):
        raise InvalidArgument("body must be a JSON object", field="body")
    return body


async def read_body(request: Any, cap: int) -> bytes:
    """The body, at most `cap` bytes: refused by its Content-Length before any of it is
    read, and as soon as a chunked body passes the cap."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > cap:
        raise BodyTooLarge
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > cap:
            raise BodyTooLarge
        parts.append(part)
    return b"".join(parts)


def request_id_of(headers: Any) -> str:
    """The caller's `x-request-id` when it is short and plain, else a fresh one."""
    given = headers.get("x-request-id") or ""
    return given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex


def _bearer(headers: Any) -> str | None:
    auth = headers.get("authorization") or ""
    return auth[7:].strip() if auth.lower().startswith("bearer ") else None


# -- response shapes ----------------------------------------------------------------------------
def error_body(e: LoraplexError) -> tuple[int, dict[str, Any]]:
    status = STATUS.get(e.code, 500)
    kind = "invalid_request_error" if status < 500 else "server_error"
    return status, {"error": {"message": e.public_message, "type": kind, "param": e.field,
                              "code": e.code.lower()}}


def _usage(o: Outcome) -> dict[str, int]:
    return {"prompt_tokens": o.prompt_tokens, "completion_tokens": o.completion_tokens,
            "total_tokens": o.prompt_tokens + o.completion_tokens}


def _choice(chat: bool, text: str, finish: str | None, *, delta: bool = False) -> dict[str, Any]:
    """One choice; `finish` is the engine's reason (None: not finished yet)."""
    choice: dict[str, Any] = {"index": 0}
    if chat:
        choice["delta" if delta else "message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    choice.update(finish_reason=None if finish is None else FINISH_REASONS.get(finish, "stop"),
                  logprobs=None)
    if finish is not None:
        choice["loraplex_finish_reason"] = finish
    return choice


def peer_of(request: Any) -> str | None:
    """The caller's address as the gRPC door names it (`ipv4:10.0.0.7`, `ipv6:[::1]`), so
    failed authentications from one address back off together on both doors. The TCP
    peer, never a forwarded-for header a client could write."""
    client = request.client
    if client is None or not client.host:
        return None
    host = client.host
    return f"ipv6:[{host}]" if ":" in host else f"ipv4:{host}"


# -- the app ------------------------------------------------------------------------------------
def create_app(backend: Backend, *, default_max_tokens: int = 256,
               max_body_bytes: int = MAX_BODY_BYTES, timeout_s: float = TIMEOUT_S,
               extra_routes: list[Any] | tuple[Any, ...] = ()):
    """A Starlette app serving the three routes over `backend`, plus `extra_routes` (the
    console's, `runtime/serve/console/`, when the server has it on)."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    async def identity_of(request: Request) -> Any:
        token = _bearer(request.headers)
        if token is None:
            raise Unauthenticated("missing `Authorization: Bearer <token>` header")
        return await asyncio.to_thread(backend.authenticate, token, peer_of(request))

    async def models(request: Request) -> JSONResponse:
        """Every model, or one page of them with `?limit=N` (1..MODELS_PAGE_MAX) and
        `after=<id>` (OpenAI's cursor: the `last_id` of the previous page); the page says
        `has_more`. A plain GET lists all, as `openai`'s `models.list()` reads one page."""
        try:
            ident = await identity_of(request)
            query = request.query_params
            limit = _page_limit(query.get("limit"))
            names = await asyncio.to_thread(backend.models, ident,
                                            limit=None if limit is None else limit + 1,
                                            after=query.get("after") or None)
        except LoraplexError as e:
            return JSONResponse(error_body(e)[1], status_code=error_body(e)[0])
        more = limit is not None and len(names) > limit
        names = names[:limit] if more else names
        return JSONResponse({"object": "list", "data": [
            {"id": n, "object": "model", "created": 0, "owned_by": n.split("/")[0]}
            for n in names], "has_more": more, "first_id": names[0] if names else None,
            "last_id": names[-1] if names else None})

    def failed(e: LoraplexError, rid: str) -> JSONResponse:
        status, err = error_body(e)
        headers = {"x-request-id": rid}
        retry = getattr(e, "retry_after_s", None)
        if status == 429 and retry is not None:
            headers["retry-after"] = str(max(1, math.ceil(retry)))
        return JSONResponse(err, status_code=status, headers=headers)

    async def generate(request: Request, chat: bool):
        rid_header = request_id_of(request.headers)
        try:
            ident = await identity_of(request)
            try:
                raw = await read_body(request, max_body_bytes)
            except BodyTooLarge:
                return JSONResponse({"error": {
                    "message": f"request body larger than {max_body_bytes} bytes",
                    "type": "invalid_request_error", "param": "body",
                    "code": "request_too_large"}}, status_code=413,
                    headers={"x-request-id": rid_header, "connection": "close"})
            body = parse_body(raw)
            model = _model(body)
            sampling = _sampling(body, default_max_tokens)
            prompt, msgs = (None, _messages(body)) if chat else (_prompt(body), None)
            stream = await asyncio.to_thread(backend.submit, ident, model, prompt=prompt,
                                             messages=msgs, sampling=sampling)
        except LoraplexError as e:
            return failed(e, rid_header)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        head = {"id": rid, "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": model}
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(_sse(stream, head, chat, include_usage),
                                     media_type="text/event-stream",
                                     headers={"x-request-id": rid_header})
        try:
            out = await _until_done_or_gone(request, stream, timeout_s)
        except LoraplexError as e:
            return failed(e, rid_header)
        return JSONResponse({**head, "choices": [_choice(chat, out.text, out.finish_reason)],
                             "usage": _usage(out)}, headers={"x-request-id": rid_header})

    async def completions(request: Request):
        return await generate(request, chat=False)

    async def chat_completions(request: Request):
        return await generate(request, chat=True)

    return Starlette(routes=[
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        *extra_routes,
    ])


async def _until_done_or_gone(request: Any, stream: TextStream, timeout_s: float) -> Outcome:
    """The outcome of a non-streaming call; its engine request is cancelled when the client
    disconnects (Cancelled) or `timeout_s` passes (DeadlineExceeded)."""

    async def drain() -> Outcome:
        async for _ in stream:
            pass
        return await stream.result()

    async def gone() -> None:
        while True:  # the body is read: the next message is the disconnect
            if (await request.receive())["type"] == "http.disconnect":
                return

    work, watch = asyncio.ensure_future(drain()), asyncio.ensure_future(gone())
    try:
        done, _ = await asyncio.wait({work, watch}, timeout=timeout_s,
                                     return_when=asyncio.FIRST_COMPLETED)
        if work in done:
            return work.result()
        if watch in done:
            raise Cancelled("the client disconnected")
        raise DeadlineExceeded(f"the request ran past the server's {timeout_s:g}s limit")
    finally:
        for task in (work, watch):
            task.cancel()
        stream.cancel()  # frees the engine's row (a no-op once the request finished)


async def _sse(stream: TextStream, head: dict[str, Any], chat: bool, include_usage: bool
               ) -> AsyncIterator[str]:
    """Server-sent events: one event per text chunk, a last one with `finish_reason`
    (and `usage` when asked), then `[DONE]`. A failure mid-stream is an error event."""
    obj = "chat.completion.chunk" if chat else "text_completion"

    def event(payload: dict[str, Any]) -> str:
        return f"data: {json.dumps({**head, 'object': obj, **payload})}\n\n"

    try:
        async for text in stream:
            if text:
                yield event({"choices": [_choice(chat, text, None, delta=True)]})
        out = await stream.result()
    except LoraplexError as e:
        yield f"data: {json.dumps(error_body(e)[1])}\n\n"
        return
    finally:
        stream.cancel()  # a client that hung up frees its engine slot (no-op once done)
    last: dict[str, Any] = {"choices": [_choice(chat, "", out.finish_reason, delta=True)]}
    if include_usage:
        last["usage"] = _usage(out)
    yield event(last)
    yield "data: [DONE]\n\n"
