"""A request's stream: chunks as the engine thread produces them, then the result.

The engine thread publishes; asyncio consumers are woken with `loop.call_soon_threadsafe`,
sync ones with a condition variable, so one stream serves both kinds of caller.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator

from loraplex.errors import LoraplexError
from loraplex.runtime.api.types import Chunk, GenerationResult


class RequestStream:
    """Chunks of one request as they are generated, then its result.

    Async: `async for chunk in stream`, `await stream.result()`. Sync: `for chunk in stream`,
    `stream.wait(timeout)`. The engine thread publishes; asyncio consumers are woken with
    `loop.call_soon_threadsafe`, sync ones with a condition variable. A request that fails
    (e.g. a corrupt adapter blob) raises its typed error from iteration and `result()`.
    """

    def __init__(self, request_id: str, cancel: Callable[[str], bool]) -> None:
        self.request_id = request_id
        self._cancel = cancel
        self._cond = threading.Condition()
        self._chunks: list[Chunk] = []
        self._result: GenerationResult | None = None
        self._error: LoraplexError | None = None
        self._done = False
        self._async_pos = 0
        self._sync_pos = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None

    # -- engine side -------------------------------------------------------------------
    def publish(self, chunk: Chunk | None = None, *, result: GenerationResult | None = None,
                error: LoraplexError | None = None) -> None:
        """Engine thread only: append a chunk, and/or end the stream with its result or
        error (later calls are ignored)."""
        with self._cond:
            if self._done:
                return
            if chunk is not None:
                self._chunks.append(chunk)
            if result is not None or error is not None:
                self._result, self._error, self._done = result, error, True
            self._cond.notify_all()
            loop, event = self._loop, self._event
        if loop is not None and event is not None:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # the consumer's loop is closed: nobody is listening
                pass

    # -- consumer side -----------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self._done

    def cancel(self) -> bool:
        return self._cancel(self.request_id)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> Chunk:
        while True:
            with self._cond:
                if self._async_pos < len(self._chunks):
                    self._async_pos += 1
                    return self._chunks[self._async_pos - 1]
                if self._done:
                    if self._error is not None:
                        raise self._error
                    raise StopAsyncIteration
                event = self._bind_loop()
                event.clear()
            await event.wait()

    async def result(self) -> GenerationResult:
        while True:
            with self._cond:
                if self._done:
                    return self._final()
                event = self._bind_loop()
                event.clear()
            await event.wait()

    def __iter__(self) -> Iterator[Chunk]:
        while True:
            with self._cond:
                while self._sync_pos >= len(self._chunks) and not self._done:
                    self._cond.wait()
                if self._sync_pos < len(self._chunks):
                    self._sync_pos += 1
                    chunk = self._chunks[self._sync_pos - 1]
                elif self._error is not None:
                    raise self._error
                else:
                    return
            yield chunk

    def wait(self, timeout: float | None = None) -> GenerationResult:
        """Block until the request ends; its result, or its typed error raised."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._done, timeout):
                raise TimeoutError(f"request {self.request_id} still running after {timeout}s")
            return self._final()

    def _final(self) -> GenerationResult:
        if self._error is not None:
            raise self._error
        if self._result is None:  # pragma: no cover - _done implies one of the two
            raise LoraplexError("request ended without a result")
        return self._result

    def _bind_loop(self) -> asyncio.Event:
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._event is None:
            self._loop, self._event = loop, asyncio.Event()
        return self._event
