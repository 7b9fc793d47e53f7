"""The engine as its doors see it: the one surface the gRPC servicers, the OpenAI binding
and the Ray ingress are typed against.

Two classes implement it: `engine.engine.Engine` (this process's engine thread) and
`fleet.ray_ingress.RayEngine` (the same calls served by Ray Serve replicas). A door holds an
`EngineClient` and never reaches past it; anything a door needs that is not here is a gap in
this Protocol, not a reason to import the engine's internals.

    engine: EngineClient
    request = await asyncio.to_thread(engine.admit, "r1", identity, "acme/bot@prod",
                                      prompt="Hi", sampling=SamplingParams(32))
    stream = engine.submit(request)          # raises at once on a refusal
    async for chunk in stream: ...           # Chunk(text, token_ids, ...)
    result = await stream.result()           # GenerationResult
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from loraplex.fingerprint import BaseFingerprint
    from loraplex.registry import AdapterVersion, Identity
    from loraplex.runtime.api.limits import Limits
    from loraplex.runtime.api.types import (
        Chunk,
        EngineStats,
        GenerationRequest,
        GenerationResult,
        ResidentAdapter,
        SamplingParams,
    )


class GenerationStream(Protocol):
    """One submitted request's output: chunks as they are produced, then the result."""

    def __aiter__(self) -> AsyncIterator[Chunk]: ...

    async def result(self) -> GenerationResult: ...

    def cancel(self) -> bool: ...


class IntakePort(Protocol):
    """The edge's resolve-and-tokenize step (`engine.intake.Intake`)."""

    @property
    def limits(self) -> Limits: ...

    def resolve(self, identity: Identity, ref: str) -> AdapterVersion: ...


class AdminPort(Protocol):
    """Adapter residency commands (`engine.commands.AdminCommands`)."""

    def prefetch(self, version: AdapterVersion, *, wait: bool = True,
                 timeout: float | None = None) -> bool: ...

    def unload(self, version: AdapterVersion) -> bool: ...

    def evict(self, digest: str) -> bool: ...

    def resident(self, limit: int | None = None) -> list[ResidentAdapter]: ...


@runtime_checkable
class EngineClient(Protocol):
    """What every door may call. Blocking calls (`admit`, `intake.resolve`, `admin.*`)
    read the registry or take the tokenizer lock: doors run them off their event loop."""

    @property
    def ready(self) -> bool: ...  # the base is loaded and the engine admits work

    @property
    def draining(self) -> bool: ...

    @property
    def intake(self) -> IntakePort: ...

    @property
    def admin(self) -> AdminPort: ...

    @property
    def tokenizer(self) -> Any: ...  # intake.LockedTokenizer, None until ready

    @property
    def fingerprint(self) -> BaseFingerprint | None: ...

    def start(self, *, wait: bool = True, timeout: float | None = None) -> Any: ...

    def admit(self, request_id: str, identity: Identity, adapter: str | None = None,
              prompt: str | None = None, prompt_ids: Sequence[int] | None = None,
              sampling: SamplingParams | None = None, deadline: float | None = None,
              messages: Sequence[dict[str, str]] | None = None) -> GenerationRequest: ...

    def submit(self, request: GenerationRequest) -> GenerationStream: ...

    def cancel(self, request_id: str) -> bool: ...

    def stats(self) -> EngineStats: ...

    def resident(self, limit: int | None = None) -> list[ResidentAdapter]: ...

    def drain(self, timeout: float | None = None) -> bool: ...

    def shutdown(self, grace_s: float = 0.0) -> None: ...
