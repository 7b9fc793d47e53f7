"""Bounds of the OpenAI HTTP door (live server, micro base, real engine): body size (413
before the body is read), JSON constants, one choice per request, message count, prompt
bytes before tokenizing (both doors), cancellation of non-streaming calls when the client
goes away or the deadline passes, and `x-request-id`."""

from __future__ import annotations

import http.client
import json
import socket
import time

import pytest

from loraplex.chat import MAX_MESSAGES
from loraplex.client import Client
from loraplex.errors import InvalidArgument
from loraplex.registry import Identity, Registry
from loraplex.runtime.serve.openai.binding import EngineBackend, HttpThread
from loraplex.runtime.serve.openai.http import create_app
from loraplex.runtime.serve.server import BackgroundServer
from tests.runtime.serve.test_grpc_inference import settings_for

CAP = 64 << 10
LONG = {"structured_outputs": {"regex": "a{40}"}, "max_tokens": 40, "temperature": 0}


@pytest.fixture(scope="module")
def world(micro_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("http-bounds")
    reg = Registry.open(root / "reg")
    token = reg.create_token(Identity.system(), "acme")
    with BackgroundServer(settings_for(micro_base, root), registry=reg) as bg:
        backend = EngineBackend(bg.server.state.engine, reg, base_name="micro")
        with HttpThread(create_app(backend, max_body_bytes=CAP)) as http:
            yield {"bg": bg, "port": http.port, "token": token, "backend": backend}


class Reply:
    def __init__(self, resp: http.client.HTTPResponse) -> None:
        self.status_code, self.headers = resp.status, resp.headers
        self.text = resp.read().decode()

    def json(self):
        return json.loads(self.text)


def _post(world, path, body, *, headers=None, timeout=60.0, port=None) -> Reply:
    """POST `body` (a dict, text, bytes, or an iterator of bytes: sent chunked)."""
    raw = body if isinstance(body, bytes | str) or not isinstance(body, dict) \
        else json.dumps(body)
    conn = http.client.HTTPConnection("127.0.0.1", port or world["port"], timeout=timeout)
    try:
        conn.request("POST", "/v1" + path, body=raw, encode_chunked=not isinstance(
            raw, bytes | str), headers={"content-type": "application/json",
                                        "authorization": f"Bearer {world['token']}",
                                        **(headers or {})})
        return Reply(conn.getresponse())
    finally:
        conn.close()


def _status_after_partial_body(world, framing: str, parts) -> int:
    """Send the request head and as much of `parts` as the server takes (it may close the
    connection once it has refused), then read the status line it answered with."""
    sock = socket.create_connection(("127.0.0.1", world["port"]), timeout=30)
    try:
        sock.sendall((f"POST /v1/completions HTTP/1.1\r\nhost: localhost\r\n"
                      f"content-type: application/json\r\n"
                      f"authorization: Bearer {world['token']}\r\n{framing}\r\n").encode())
        for part in parts:
            try:
                sock.sendall(part)
            except (BrokenPipeError, ConnectionResetError):  # refused: stop sending
                break
        head = b""
        while b"\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                break
            head += chunk
        return int(head.split(b" ", 2)[1])
    finally:
        sock.close()


def test_body_over_the_cap_is_413_before_it_is_read(world):
    big = json.dumps({"model": "micro", "prompt": "x" * (2 * CAP)}).encode()
    # Content-Length over the cap, and only the first KiB sent: the answer comes at once
    # (a server that read the body first would wait here until the socket timed out)
    status = _status_after_partial_body(world, f"content-length: {len(big)}\r\n",
                                        [big[:1024]])
    assert status == 413

    def chunks():  # no Content-Length: refused once the cap is passed
        yield b'{"model": "micro", "prompt": "'
        for _ in range(200):
            yield b"y" * 1024
        yield b'"}'
    framed = (b"%x\r\n%s\r\n" % (len(c), c) for c in chunks())
    status = _status_after_partial_body(world, "transfer-encoding: chunked\r\n",
                                        [*framed, b"0\r\n\r\n"])
    assert status == 413

    r = _post(world, "/completions", json.dumps({"model": "micro", "prompt": "x" * 10}))
    assert r.status_code != 413  # a body under the cap is served


@pytest.mark.parametrize("raw", [
    '{"model": "micro", "prompt": "hi", "max_tokens": Infinity}',
    '{"model": "micro", "prompt": "hi", "max_tokens": NaN}',
    '{"model": "micro", "prompt": "hi", "max_tokens": 1e999}',
    '{"model": "micro", "prompt": "hi", "temperature": -Infinity}',
])
def test_non_finite_numbers_are_400_not_500(world, raw):
    r = _post(world, "/completions", raw)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("extra,param", [
    ({"n": 2}, "n"), ({"best_of": 3}, "best_of"), ({"logit_bias": {"17": 5}}, "logit_bias"),
    ({"logprobs": 2}, "logprobs"), ({"n": True}, "n"),
])
def test_unserved_parameters_are_refused_not_ignored(world, extra, param):
    r = _post(world, "/completions", {"model": "micro", "prompt": "hi", "max_tokens": 2,
                                      **extra})
    assert r.status_code == 400 and r.json()["error"]["param"] == param
    chat = _post(world, "/chat/completions", {
        "model": "micro", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
        **({"logprobs": True} if param == "logprobs" else extra)})
    assert chat.status_code == 400


def test_the_one_choice_values_are_served(world):
    r = _post(world, "/completions", {"model": "micro", "prompt": "hi", "max_tokens": 2,
                                      "n": 1, "best_of": 1, "logit_bias": {},
                                      "logprobs": None})
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 1


def test_message_count_is_capped(world):
    msgs = [{"role": "user", "content": "hi"}] * (MAX_MESSAGES + 1)
    r = _post(world, "/chat/completions", {"model": "micro", "messages": msgs})
    assert r.status_code == 400 and str(MAX_MESSAGES) in r.json()["error"]["message"]


def test_prompt_bytes_are_refused_before_tokenizing_on_both_doors(world):
    engine = world["bg"].server.state.engine
    tokenizer = engine.intake.tokenizer
    calls = []
    real = tokenizer.encode_ids
    tokenizer.encode_ids = lambda text: calls.append(len(text)) or real(text)
    try:
        cap = engine.intake.limits.prompt_bytes
        huge = "é" * cap  # 2 bytes a character: over the byte cap, under it in characters
        r = _post(world, "/completions", {"model": "micro", "prompt": huge, "max_tokens": 2})
        assert r.status_code == 400 and "bytes" in r.json()["error"]["message"]
        with Client(world["bg"].target, token=world["token"], timeout=30) as c, \
                pytest.raises(InvalidArgument, match="bytes") as e:
            c.generate(None, "z" * (cap + 1), max_new_tokens=2)
        assert e.value.field == "prompt"
        assert calls == []  # the tokenizer never saw them
    finally:
        del tokenizer.encode_ids


def _running(world) -> int:
    return world["bg"].server.state.engine.stats().running


def _wait_idle(world, within: float) -> float:
    start = time.monotonic()
    while _running(world) and time.monotonic() - start < within:
        time.sleep(0.005)
    return time.monotonic() - start


def test_non_streaming_call_is_cancelled_when_the_client_leaves_or_time_runs_out(world):
    body = {"model": "micro", "prompt": "a", **LONG}
    start = time.monotonic()
    whole = _post(world, "/completions", body)
    full_s = time.monotonic() - start
    assert whole.status_code == 200 and whole.json()["usage"]["completion_tokens"] == 40

    # the client gives up after a fifth of what the request needs: the engine stops it
    with pytest.raises((TimeoutError, socket.timeout)):
        _post(world, "/completions", body, timeout=full_s / 5)
    assert _wait_idle(world, full_s) < full_s * 0.6, f"full request: {full_s:.3f}s"

    # the server's own deadline
    backend = world["backend"]
    with HttpThread(create_app(backend, timeout_s=full_s / 5)) as http:
        r = _post(world, "/completions", body, port=http.port)
    assert r.status_code == 504, r.text
    assert _wait_idle(world, full_s) < full_s * 0.6


def test_request_id_is_echoed_only_when_plain(world):
    body = {"model": "micro", "prompt": "hi", "max_tokens": 1}
    r = _post(world, "/completions", body, headers={"x-request-id": "trace-7:a.b_c"})
    assert r.headers["x-request-id"] == "trace-7:a.b_c"
    for hostile in ("q" * 500, "a b\tc", "id<script>"):
        r = _post(world, "/completions", body, headers={"x-request-id": hostile})
        assert r.status_code == 200 and r.headers["x-request-id"] != hostile
        assert len(r.headers["x-request-id"]) == 32


def test_failed_authentications_back_off_per_address_across_both_doors(world):
    """The HTTP door names the caller's address to the registry as gRPC does: repeated bad
    tokens over HTTP get 429 with Retry-After, and the same address is then refused on
    the gRPC door too; a token the server already holds as good still passes."""
    tokens = world["bg"].server.state.registry.tokens
    tokens._peers.clear()
    free = tokens.settings.auth_failures_free
    try:
        codes = []
        for i in range(free + 2):
            reply = _post(world, "/completions", {"model": "micro", "prompt": "hi"},
                          headers={"authorization": f"Bearer lpx_{i:043d}"})
            codes.append(reply.status_code)
        assert codes[:free] == [401] * free and codes[-1] == 429
        assert float(reply.headers["retry-after"]) > 0
        from loraplex.errors import ResourceExhausted

        with Client(world["bg"].target, token="lpx_" + "9" * 43, timeout=30) as c, \
                pytest.raises(ResourceExhausted, match="failed authentications"):
            c.list_models()
        assert _post(world, "/completions", {"model": "micro", "prompt": "hi",
                                             "max_tokens": 1}).status_code == 200
    finally:
        tokens._peers.clear()  # leave the other tests' address clean
