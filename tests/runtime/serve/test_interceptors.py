"""The interceptor chain on a real grpc.aio server and channel, with a streaming method whose
writes block on flow control (1 MiB messages the client does not read): a client cancel or
deadline then lands while the RPC waits to send, not inside the servicer. Each call must be
counted with the code its client saw, leave no task failing in the background, and run the
servicer's cleanup at once. Also a method that raises its error only after the client left.
"""

from __future__ import annotations

import asyncio
import gc
import logging

import grpc
import pytest

from loraplex.errors import DeadlineExceeded
from loraplex.registry import Identity
from loraplex.runtime.serve.interceptors import (
    AuthInterceptor,
    ErrorInterceptor,
    MetricsInterceptor,
    RequestIdInterceptor,
    current_identity,
    current_request_id,
)
from loraplex.runtime.serve.metrics import ServerMetrics

METHOD = "/test.Flood/Stream"
LATE = "/test.Flood/Late"
MESSAGE = b"x" * (1 << 20)  # far over HTTP/2's initial 64 KiB window: the second write waits
N = 8


def flood_server(cleaned: list[str]):
    metrics = ServerMetrics()
    server = grpc.aio.server(interceptors=[
        RequestIdInterceptor(), MetricsInterceptor(metrics), ErrorInterceptor(),
        AuthInterceptor(None, fallback=Identity.system())])

    async def stream(request, context):
        assert current_identity() is not None and current_request_id()
        try:
            while True:
                yield MESSAGE
        finally:
            cleaned.append(current_request_id())

    async def late(request, context):
        """Raises its error only once the call is over, as a servicer does when the engine
        retires a request by its deadline just as the client gives up."""
        try:
            await asyncio.sleep(0.6)  # the client cancels after 0.2 s
        except asyncio.CancelledError:
            pass
        raise DeadlineExceeded("too late")

    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Flood", {
        "Stream": grpc.unary_stream_rpc_method_handler(stream, lambda b: b, lambda b: b),
        "Late": grpc.unary_unary_rpc_method_handler(late, lambda b: b, lambda b: b)})])
    return server, server.add_insecure_port("127.0.0.1:0"), metrics


async def cut_short(port: int, cleaned: list[str]) -> list[grpc.StatusCode]:
    codes = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        flood = channel.unary_stream(METHOD, lambda b: b, lambda b: b)

        async def cancel_one(i: int) -> None:
            call = flood(b"", timeout=60, metadata=[("x-request-id", f"cancel-{i}")])
            await call.read()
            await asyncio.sleep(0.2)  # the server is now blocked writing
            call.cancel()
            codes.append(await call.code())

        async def deadline_one(i: int) -> None:
            call = flood(b"", timeout=0.5, metadata=[("x-request-id", f"late-{i}")])
            try:
                await call.read()  # then stop reading until the deadline
            except grpc.aio.AioRpcError:  # a busy machine: the deadline came first
                pass
            codes.append(await call.code())

        async def late_one(i: int) -> None:
            call = channel.unary_unary(LATE, lambda b: b, lambda b: b)(
                b"", timeout=60, metadata=[("x-request-id", f"gone-{i}")])
            await asyncio.sleep(0.2)
            call.cancel()
            codes.append(await call.code())

        await asyncio.gather(*(cancel_one(i) for i in range(N)),
                             *(deadline_one(i) for i in range(N)),
                             *(late_one(i) for i in range(N)))
    for _ in range(20):  # let grpc retire the calls, then collect what they left behind
        await asyncio.sleep(0.05)
    gc.collect()
    await asyncio.sleep(0.2)
    return codes


def test_cut_short_streams_are_counted_right_and_cleaned_up_in_their_own_task(caplog):
    caplog.set_level(logging.WARNING)
    cleaned: list[str] = []

    async def main():
        server, port, metrics = flood_server(cleaned)
        await server.start()
        try:
            return await cut_short(port, cleaned), metrics
        finally:
            await server.stop(0)

    codes, metrics = asyncio.run(main())
    assert sorted(c.name for c in codes) == (["CANCELLED"] * 2 * N
                                             + ["DEADLINE_EXCEEDED"] * N)

    def rpcs(code: str, method: str = METHOD) -> float:
        return metrics.registry.get_sample_value(
            "loraplex_grpc_requests_total", {"method": method, "code": code}) or 0.0

    assert (rpcs("CANCELLED"), rpcs("DEADLINE_EXCEEDED"), rpcs("UNKNOWN")) == (N, N, 0)
    # An error raised after its call ended is not a bug and not UNKNOWN: the call was cut.
    assert (rpcs("CANCELLED", LATE), rpcs("UNKNOWN", LATE)) == (N, 0)
    # The servicer's `finally` ran for every call, still seeing that call's request id.
    assert sorted(cleaned) == sorted([f"cancel-{i}" for i in range(N)]
                                     + [f"late-{i}" for i in range(N)])
    problems = [r.getMessage() for r in caplog.records
                if r.levelno >= logging.ERROR or r.exc_info]
    assert not problems, problems


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__, "-q"])
