"""The engine face of the Ray ingress: `RayEngine` admits at the edge and routes admitted
requests to the `EngineReplica` deployment (see `ray_serve.py` for the whole layout).

    engine = RayEngine(handle, registry, base_dir).start()   # a replica answers: ready
    request = engine.admit("r1", identity, "acme/support@prod", prompt="Hi")  # off the loop
    stream = engine.submit(request)     # routed by model_id(request) = the version's digest

It has what the gRPC servicers use of `Engine`: `admit`, `submit` (a stream of `Chunk`s,
then `await result()`), `cancel`, `ready`, `draining`, `drain`, `shutdown`, `intake`,
`admin` (placement refused: FAILED_PRECONDITION), `tokenizer`, `fingerprint`, `stats`,
`resident`. Readiness and draining live here, as in `Engine`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from loraplex import errors
from loraplex.errors import AlreadyExists, FailedPrecondition, LoraplexError, Unavailable, quote
from loraplex.runtime.api.types import (
    Chunk,
    EngineStats,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
)
from loraplex.runtime.engine.intake import Intake, LockedTokenizer, validate_request

log = logging.getLogger(__name__)
BASE_MODEL_ID = ""  # base-only requests: no affinity, any replica (all hold the base)


def model_id(request: GenerationRequest) -> str:
    """The multiplexed model id a request is routed by: its adapter version's digest."""
    return request.adapter.digest if request.adapter is not None else BASE_MODEL_ID


_RETRYABLE_NAMES = ("RayActorError", "ActorDiedError", "ActorUnavailableError",
                    "ReplicaUnavailableError", "DeploymentUnavailableError")
_PLACEMENT = ("adapter placement is per replica; with --ray, Ray Serve places adapters "
              "(multiplexing by digest)")


class RayAdmin:
    """`Engine.admin`'s face at the ingress: placement commands are refused, typed."""

    def __init__(self, engine: RayEngine) -> None:
        self._engine = engine

    def prefetch(self, version: Any, *, wait: bool = True, timeout: float | None = None
                 ) -> bool:
        raise FailedPrecondition(_PLACEMENT, field="ref")

    def unload(self, version: Any) -> bool:
        raise FailedPrecondition(_PLACEMENT, field="ref")

    pin = unpin = unload

    def evict(self, digest: str) -> bool:
        raise FailedPrecondition("each replica follows the registry and evicts by itself",
                                 field="ref")

    def resident(self, limit: int | None = None) -> list:
        return self._engine.resident(limit)


class RayEngine:
    """The engine interface the gRPC servicers use (`admit`, `submit`, `cancel`, `ready`,
    `draining`, `intake`, `admin`, `stats`…), served by the deployment's replicas."""

    def __init__(self, handle: Any, registry: Any, base_dir: Any, *, retries: int = 3) -> None:
        self.handle = handle
        self.registry = registry
        self.base_dir = base_dir
        self.retries = retries
        self._admin = RayAdmin(self)
        self._intake: Intake | None = None
        self._live: dict[str, RayStream] = {}
        self._draining = False
        self._stopped = False

    # -- lifecycle: readiness and draining live here, as in `Engine` --------------------
    def start(self, *, wait: bool = True, timeout: float | None = 300.0) -> RayEngine:
        """Wait for a replica to have its base loaded, then set up the intake here."""
        from transformers import AutoTokenizer

        limits = self.handle.limits.remote().result(timeout_s=timeout)
        try:  # the replicas' tokenizer: `load_base` reads it from the same directory
            tokenizer = AutoTokenizer.from_pretrained(self.base_dir)
        except (OSError, ValueError, KeyError) as e:
            raise errors.InvalidArgument(f"cannot load the tokenizer of {self.base_dir}: {e}",
                                         field="base") from e
        self._intake = Intake(self.registry, LockedTokenizer(tokenizer), limits)
        return self

    @property
    def ready(self) -> bool:
        return self._intake is not None and not self._stopped

    @property
    def draining(self) -> bool:
        return self._draining

    def drain(self, timeout: float | None = None) -> bool:
        """Stop admitting; wait up to `timeout` for the requests in flight; True if none."""
        self._draining = True
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._live and (deadline is None or time.monotonic() < deadline):
            time.sleep(0.01)
        return not self._live

    def shutdown(self, grace_s: float = 0.0) -> None:
        self.drain(grace_s)
        self._stopped = True
        for rid in list(self._live):
            self.cancel(rid)

    def _check_admitting(self) -> None:
        if not self.ready:
            raise Unavailable("the Ray ingress is not ready" if not self._stopped
                              else "the Ray ingress is stopped")
        if self._draining:
            raise Unavailable("the Ray ingress is draining; not accepting requests")

    # -- requests --------------------------------------------------------------------------
    @property
    def admin(self) -> RayAdmin:
        """Adapter residency commands (prefetch, unload, evict, resident)."""
        return self._admin

    @property
    def intake(self) -> Intake:
        if self._intake is None:
            raise Unavailable("the Ray ingress is not ready")
        return self._intake

    @property
    def tokenizer(self) -> LockedTokenizer | None:
        return self._intake.tokenizer if self._intake else None

    @property
    def fingerprint(self) -> Any:
        return self._intake.limits.fingerprint if self._intake else None

    def admit(self, request_id: str, identity: Any, adapter: str | None = None,
              prompt: str | None = None, prompt_ids: Sequence[int] | None = None,
              sampling: SamplingParams | None = None, deadline: float | None = None,
              messages: Sequence[dict[str, str]] | None = None) -> GenerationRequest:
        """`Intake.admit` at the edge (registry read, tokenizer, chat template: call it off
        the loop). This intake compiles no grammars: a constrained request is refused here
        (INVALID_ARGUMENT), since a compiled grammar does not travel to a replica."""
        self._check_admitting()
        return self.intake.admit(request_id, identity, adapter, prompt=prompt,
                                 prompt_ids=prompt_ids, sampling=sampling,
                                 deadline=deadline, messages=messages)

    def submit(self, request: GenerationRequest) -> RayStream:
        """Route an admitted request to a replica (see the module docstring)."""
        self._check_admitting()
        validate_request(request, self.intake.limits)
        if request.request_id in self._live:
            raise AlreadyExists(f"request {quote(request.request_id)} is in flight",
                                field="request_id")
        stream = RayStream(self, request)
        self._live[request.request_id] = stream
        return stream

    def cancel(self, request_id: str) -> bool:
        stream = self._live.pop(request_id, None)
        return stream.cancel() if stream is not None else False

    def stats(self) -> EngineStats:
        """One replica's view (Ray picks which); per-replica numbers are on each replica."""
        return self.handle.stats.remote().result(timeout_s=30)

    def resident(self, limit: int | None = None) -> list:
        return self.handle.resident.remote(limit).result(timeout_s=30)

    def evict(self, digest: str) -> bool:
        return self.admin.evict(digest)


class RayStream:
    """`RequestStream`'s async face over a Ray Serve streaming call, with retries."""

    def __init__(self, engine: RayEngine, request: GenerationRequest) -> None:
        self.engine, self.request = engine, request
        self._result: GenerationResult | None = None
        self._call: Any = None
        self._cancelled = False
        self._outward = False  # True once the caller iterates: chunks reached someone
        self._iter = self._run()
        self.done = False

    def cancel(self) -> bool:
        self._cancelled = True
        self.engine._live.pop(self.request.request_id, None)
        if self._call is not None:
            self._call.cancel()
        return True

    def __aiter__(self) -> RayStream:
        return self

    async def __anext__(self) -> Chunk:
        self._outward = True
        return await self._iter.__anext__()

    async def result(self) -> GenerationResult:
        async for _ in self._iter:
            pass
        if self._result is None:
            raise errors.Cancelled("the request was cancelled")
        return self._result

    async def _run(self) -> AsyncIterator[Chunk]:
        req = self.request
        # Clocks differ between machines: the replica gets the time left, not a deadline.
        wire = dataclasses.replace(req, deadline=None)
        try:
            for attempt in range(self.engine.retries + 1):
                sent = False
                timeout_s = (None if req.deadline is None
                             else max(0.0, req.deadline - time.monotonic()))
                self._call = self.engine.handle.options(
                    multiplexed_model_id=model_id(req), stream=True).generate.remote(
                        wire, timeout_s)
                try:
                    async for item in self._call:
                        if "error" in item:
                            raise _typed(*item["error"])
                        if "result" in item:
                            self._result = item["result"]
                            return
                        sent = sent or self._outward
                        yield item["chunk"]
                    return
                except Exception as e:  # noqa: BLE001 - only a lost replica is retried
                    if isinstance(e, LoraplexError) or not _replica_lost(e) or self._cancelled:
                        raise
                    if sent or attempt == self.engine.retries:
                        raise Unavailable(f"the replica serving this request was lost: "
                                          f"{type(e).__name__}; retry") from None
                    log.warning("replica lost before the first token; resending (%d)", attempt)
                    await asyncio.sleep(0.5 * (attempt + 1))
        finally:
            self.done = True
            self.engine._live.pop(req.request_id, None)


def _replica_lost(e: BaseException) -> bool:
    """Ray's errors for a replica that died or became unreachable (by name: Ray wraps them)."""
    return any(c.__name__ in _RETRYABLE_NAMES for c in type(e).__mro__)


def _typed(name: str, message: str, field: str | None) -> LoraplexError:
    cls = getattr(errors, name, None)
    if not (isinstance(cls, type) and issubclass(cls, LoraplexError)):
        cls = errors.LoraplexError
    try:
        return cls(message, field=field)
    except TypeError:  # an error class with its own constructor
        return Unavailable(message)
