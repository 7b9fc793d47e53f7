"""Binds the OpenAI HTTP front door (`openai_http.Backend`) to the engine and registry.

This is the only file of the HTTP door that knows the engine: `submit` turns an OpenAI call
into an admitted `GenerationRequest` (`Engine.admit`) and `Engine.submit`'s `RequestStream`
into text chunks and an `Outcome`. Chat `messages` go to the intake as they are, exactly as
gRPC's `GenerateRequest.messages` do: rendered there with the base's own chat template
(generation prompt added); the engine stops at EOS and the generation config's end-of-turn ids.

    backend = EngineBackend(engine, registry, base_name="smollm2")
    with HttpThread(create_app(backend), host="127.0.0.1", port=0) as http:
        ...  # http.port
"""

from __future__ import annotations

import socket
import threading
import uuid
from collections.abc import AsyncIterator
from typing import Any

from loraplex import chat
from loraplex.errors import Cancelled, DeadlineExceeded
from loraplex.runtime.api.surface import EngineClient, GenerationStream
from loraplex.runtime.serve.openai.http import Outcome, Sampling

MODEL_PAGE = 1000  # adapters per registry read when listing models


class _EngineText:
    """A `RequestStream` seen as text: chunks, then an Outcome (the engine's finish reason,
    which `openai_http.FINISH_REASONS` names for OpenAI; cancelled and deadline are errors)."""

    def __init__(self, stream: GenerationStream) -> None:
        self._stream = stream

    async def __aiter__(self) -> AsyncIterator[str]:
        async for chunk in self._stream:
            yield chunk.text

    async def result(self) -> Outcome:
        r = await self._stream.result()
        if r.finish_reason == "cancelled":
            raise Cancelled("the request was cancelled")
        if r.finish_reason == "deadline":
            raise DeadlineExceeded("the request ran past its deadline")
        return Outcome(text=r.text, finish_reason=r.finish_reason,
                       prompt_tokens=r.usage.prompt_tokens,
                       completion_tokens=r.usage.completion_tokens)

    def cancel(self) -> None:
        if not self._stream.done:
            self._stream.cancel()


class EngineBackend:
    """`openai_http.Backend` over a started `Engine` and its `Registry` (None: no auth,
    every caller is the local operator)."""

    def __init__(self, engine: EngineClient, registry: Any, *, base_name: str) -> None:
        self.engine, self.registry, self.base_name = engine, registry, base_name

    def authenticate(self, token: str | None, peer: str | None = None) -> Any:
        """The caller's identity; `peer` (its address) backs off repeated failures."""
        from loraplex.registry import Identity

        if self.registry is None:
            return Identity.system()
        return self.registry.authenticate(token or "", peer=peer)

    def models(self, identity: Any, *, limit: int | None = None,
               after: str | None = None) -> list[str]:
        """The base, then the caller's adapters by `tenant/name`, read by the registry's
        keyset pages from `after` on: a page costs the same wherever it starts."""
        names = [self.base_name] if after is None else []
        if after == self.base_name:
            after = None
        if self.registry is None:
            return names[:limit]
        token = None
        while limit is None or len(names) < limit:
            size = MODEL_PAGE if limit is None else min(MODEL_PAGE, limit - len(names))
            page, token = self.registry.list_adapters(identity, page_size=size,
                                                      page_token=token,
                                                      after=None if token else after)
            names += [v.key for v in page]
            if not token:
                break
        return names

    def render(self, messages: list[dict[str, str]]) -> str:
        """The text the intake renders for `messages` (shown for debugging and tests)."""
        return chat.render(self.engine.tokenizer, chat.check_messages(messages))

    def submit(self, identity: Any, model: str, *, prompt: str | None,
               messages: list[dict[str, str]] | None, sampling: Sampling) -> _EngineText:
        from loraplex.runtime.api.types import SamplingParams

        params = SamplingParams(max_new_tokens=sampling.max_tokens,
                                temperature=sampling.temperature, top_p=sampling.top_p,
                                seed=sampling.seed, stop=sampling.stop,
                                json_schema=sampling.json_schema, regex=sampling.regex,
                                choice=sampling.choice)
        # intake (registry read, tokenizer) runs here, off the event loop (the HTTP door
        # calls `submit` through asyncio.to_thread), exactly as the gRPC servicers do
        req = self.engine.admit("http-" + uuid.uuid4().hex, identity,
                                None if model == self.base_name else model,
                                prompt=prompt, messages=messages, sampling=params)
        return _EngineText(self.engine.submit(req))


class HttpThread:
    """uvicorn serving `app` on its own thread (beside the gRPC server's loop); port 0
    picks a free port, read back from `port`. With `certfile`/`keyfile` it speaks HTTPS
    only; with `client_cafile` a client must present a certificate that CA signed."""

    def __init__(self, app: Any, *, host: str = "127.0.0.1", port: int = 0,
                 certfile: str | None = None, keyfile: str | None = None,
                 client_cafile: str | None = None) -> None:
        import ssl

        import uvicorn

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.socket(family)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.port = self._sock.getsockname()[1]
        tls: dict[str, Any] = {}
        if certfile is not None:
            tls = {"ssl_certfile": certfile, "ssl_keyfile": keyfile}
            if client_cafile is not None:
                tls.update(ssl_ca_certs=client_cafile, ssl_cert_reqs=ssl.CERT_REQUIRED)
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off",
                                                    **tls))
        self._thread = threading.Thread(target=self.server.run,
                                        kwargs={"sockets": [self._sock]}, daemon=True,
                                        name="loraplex-http")

    def __enter__(self) -> HttpThread:
        self._thread.start()
        while not self.server.started and self._thread.is_alive():
            threading.Event().wait(0.02)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self._thread.join(10)
        self._sock.close()
