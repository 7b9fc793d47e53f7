"""How calls that end early are told, over a real channel on a real engine (micro base):
8 streams the client cancels and 8 streams its deadline ends. Each cancelled call counts as
CANCELLED / `cancelled`, each deadline call as DEADLINE_EXCEEDED / `deadline` (the status
the client saw), and neither logs a traceback.

The deadline is sized from a full-length run measured first (a fraction of it), and every
deadline call must have streamed a token before it ends: a call whose deadline passes
before the server even starts it (a loaded machine, a fixed short deadline) is never seen
by the server and rightly counted nowhere — that is not what this test is about. Also: an error that quotes a huge input stays
far under gRPC's metadata limit, so a default client sees INVALID_ARGUMENT.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import logging
import threading
import time
import urllib.parse
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from loraplex.client import Client, generate_request
from loraplex.errors import InvalidArgument
from loraplex.runtime.serve.server import BackgroundServer
from loraplex.runtime.serve.settings import load_settings
from loraplex.v1 import inference_pb2_grpc

STREAM = "/loraplex.v1.InferenceService/GenerateStream"
LONG = 200  # tokens per stream; the deadline is a fraction of the time N of them take
N = 8


@pytest.fixture(scope="module")
def server(micro_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("outcomes")
    settings = load_settings({
        "base": micro_base, "registry": str(root / "reg"), "port": 0, "host": "127.0.0.1",
        "metrics_port": 0, "metrics_host": "127.0.0.1", "quantization": "none",
        "device": "cpu", "no_auth": True, "max_batch": 2 * N, "max_waiting": 4 * N,
        # one caller (no auth): the whole queue is its own, not a tenant's share of it
        "engine": {"compute_dtype": "float32", "tenant_waiting_share": 1.0}})
    with BackgroundServer(settings) as bg:
        yield bg


def scrape(bg) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{bg.metrics_port}/metrics",
                                  timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def count(samples, name: str, **labels) -> float:
    """Sum of `name` over the samples whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


def settle(bg, before, expect: dict[tuple, float], timeout: float = 20.0):
    """Poll /metrics until every expected delta is reached (outcomes are counted when the
    engine retires the request, a moment after the client saw its status)."""
    end = time.monotonic() + timeout
    while True:
        now = scrape(bg)
        deltas = {k: count(now, k[0], **dict(k[1])) - count(before, k[0], **dict(k[1]))
                  for k in expect}
        if all(deltas[k] >= v for k, v in expect.items()) or time.monotonic() > end:
            return now, deltas
        time.sleep(0.1)


def key(name: str, **labels) -> tuple:
    return name, tuple(sorted(labels.items()))


def test_cancelled_and_deadline_streams_are_counted_as_such_without_tracebacks(server,
                                                                            caplog):
    stub = inference_pb2_grpc.InferenceServiceStub(grpc.insecure_channel(server.target))
    caplog.set_level(logging.WARNING)

    def cancel_one(i: int, codes: list) -> None:
        call = stub.GenerateStream(generate_request(None, f"cancel {i}", max_new_tokens=LONG),
                                   timeout=60)
        next(call)
        call.cancel()
        try:
            next(call)
        except grpc.RpcError as e:
            codes.append(e.code())

    def full_one(i: int, seconds: list) -> None:
        start = time.monotonic()
        assert sum(1 for _ in stub.GenerateStream(
            generate_request(None, f"full {i}", max_new_tokens=LONG), timeout=60)) > 0
        seconds.append(time.monotonic() - start)

    full: list = []
    run_all([threading.Thread(target=full_one, args=(i, full)) for i in range(2 * N)])
    deadline_s = 0.3 * min(full)  # every stream would still be generating then
    before = scrape(server)

    def deadline_one(i: int, codes: list) -> None:
        call = stub.GenerateStream(generate_request(None, f"late {i}", max_new_tokens=LONG),
                                   timeout=deadline_s)
        streamed = 0
        try:
            for _ in call:
                streamed += 1
        except grpc.RpcError as e:
            codes.append((e.code(), streamed > 0))

    cancelled: list = []
    late: list = []
    threads = [threading.Thread(target=cancel_one, args=(i, cancelled)) for i in range(N)]
    threads += [threading.Thread(target=deadline_one, args=(i, late)) for i in range(N)]
    run_all(threads)
    assert cancelled == [grpc.StatusCode.CANCELLED] * N
    assert late == [(grpc.StatusCode.DEADLINE_EXCEEDED, True)] * N, deadline_s

    expect = {key("loraplex_grpc_requests_total", method=STREAM, code="CANCELLED"): N,
              key("loraplex_grpc_requests_total", method=STREAM, code="DEADLINE_EXCEEDED"): N,
              key("loraplex_requests_total", outcome="cancelled"): N,
              key("loraplex_requests_total", outcome="deadline"): N}
    after, deltas = settle(server, before, expect)
    assert deltas == expect
    assert count(after, "loraplex_grpc_requests_total", code="UNKNOWN") == 0

    # Abandoned generators and failed tasks are reported when collected: collect on the
    # server's loop, then let it run the finalizers.
    server.call(asyncio.sleep(0.2))
    server.call(_collect())
    server.call(asyncio.sleep(0.2))
    problems = [r for r in caplog.records
                if r.levelno >= logging.ERROR or r.exc_info or "never retrieved" in r.message]
    assert not problems, [r.getMessage() for r in problems]


def run_all(threads: list[threading.Thread]) -> None:
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)


async def _collect() -> None:
    gc.collect()


def test_error_quoting_a_huge_ref_stays_invalid_argument(server):
    """A 10,000-character ref: the message and details quote a short prefix of it, so the
    status fits gRPC's default 16 KiB metadata limit and a default client reads it."""
    ref = "acme/" + "x" * 10_000
    with Client(server.target, timeout=30) as client:
        with pytest.raises(InvalidArgument) as info:
            client.generate(ref, "hi", max_new_tokens=1)
    message = str(info.value)
    assert info.value.field and "ref" in info.value.field
    assert len(message) < 400, message
    assert "xxxx" in message and "(10000 characters)" in message


def test_a_ref_with_surrounding_space_is_refused_not_trimmed(server):
    with Client(server.target, timeout=30) as client:
        for ref in (" acme/support", "acme/support@prod "):
            with pytest.raises(InvalidArgument, match="leading or trailing whitespace"):
                client.generate(ref, "hi", max_new_tokens=1)


def test_any_error_status_fits_the_default_metadata_limit():
    """Belt and braces at the edge: even a message no `quote` shortened (here 500 long
    violations) leaves a status whose trailing metadata a default client accepts."""
    from loraplex.errors import ValidationFailed
    from loraplex.runtime.serve import grpc_errors

    error = ValidationFailed([f"tensor {i}: " + "é😀" * 100 for i in range(500)],
                             field="weights")
    status = grpc_errors.rich_status(grpc_errors.map_error(error), "req-1")
    # As sent: grpc-message percent-encodes every non-ASCII byte, `-bin` values are base64,
    # and HTTP/2 counts 32 bytes per entry.
    size = len(urllib.parse.quote(status.details.encode(), safe=" ")) + 32 + sum(
        len(k) + (len(base64.b64encode(v)) if k.endswith("-bin") else len(v)) + 32
        for k, v in status.trailing_metadata)
    assert size < 16 * 1024, size
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "cut; " in status.details
