"""Many engine replicas on Ray Serve, behind our own gRPC front door.

    loraplex serve --ray --replicas 4 --base ./base --registry postgresql+psycopg://… \
        --blob-dir s3://bucket/loraplex          # RAY_ADDRESS=auto joins a running cluster
    serve run loraplex.runtime.ray_serve:app base=./base replicas=4   # or KubeRay RayService

Layout: `EngineReplica` is a Ray Serve deployment; each replica holds the base once and an
`Engine` over the shared registry. `GrpcIngress`, a second deployment, runs the ordinary
loraplex gRPC server (auth, the proto contract, health, metrics) whose `engine` is a
`RayEngine` over the replicas' deployment handle: it resolves the ref
with the caller's identity (so tenant rules are enforced at the edge, as on one server),
then sends the request to the deployment with the adapter's digest as Ray Serve's
*multiplexed model id*. Ray's router sends a request to a replica that already holds that
id when it can and to a less loaded one otherwise, and the replica's `@serve.multiplexed`
loader (a prefetch) brings a new adapter in: adapter affinity, without a router of ours.

Replica failures: Ray restarts a dead replica. A request that loses its replica before any
token reached the caller (any unary Generate) is sent again to another replica (greedy and
seeded sampling give the same tokens again); a stream that had already delivered tokens
ends with UNAVAILABLE instead of repeating them, and the caller retries.

Engine calls used on each replica (the boundary a redesigned engine must keep):
`Engine(config, registry, observer=None)`, `start()`, `ready`, `submit(GenerationRequest)`
(async iteration of `Chunk`s, `await result()`), `cancel(request_id)`, `prefetch(identity,
ref, wait=True)`, `stats()`, `resident()`, `drain(timeout)`, `shutdown(grace_s)`, `evict`
(through the follower). The request a replica gets is the caller's `GenerationRequest` with
`adapter` replaced by `sha256:<digest>` and the deadline made relative (clocks differ
between machines); a replica re-resolves that digest under the caller's identity.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from loraplex import errors
from loraplex.errors import FailedPrecondition, LoraplexError, Unavailable
from loraplex.registry import Identity
from loraplex.runtime.types import Chunk, EngineStats, GenerationRequest, GenerationResult

log = logging.getLogger(__name__)
APP = "loraplex"
DEPLOYMENT = "EngineReplica"
MAX_MODELS_PER_REPLICA = 64  # Ray's per-replica affinity set; the engine's pool does the LRU


# ------------------------------------------------------------------------ on each replica
class EngineReplica:
    """One engine, one base, on one Ray Serve replica (wrapped by `serve.deployment`)."""

    def __init__(self, settings: Any) -> None:
        from loraplex.runtime.engine import Engine
        from loraplex.runtime.follower import RegistryFollower
        from loraplex.runtime.server import open_registry

        self.registry = open_registry(settings)
        self.engine = Engine(settings.engine_config(), self.registry, None).start()
        self.follower = RegistryFollower(self.registry, engine=self.engine,
                                         prefetch_aliases=settings.prefetch_aliases,
                                         poll_s=settings.follow_poll_s).start()

    async def _adapter(self, digest: str) -> str:
        """Ray Serve's multiplexed loader: make the adapter resident on this replica."""
        await asyncio.to_thread(self.engine.prefetch, Identity.system(), digest, wait=True)
        return digest

    async def generate(self, request: GenerationRequest, timeout_s: float | None
                       ) -> AsyncIterator[dict]:
        """Chunks as `{"chunk": Chunk}`, then `{"result": GenerationResult}`; a typed error
        as `{"error": (class name, message, field)}` (Ray would wrap the exception)."""
        from ray import serve

        digest = serve.get_multiplexed_model_id()
        stream = None
        try:
            if digest:
                await self._adapter(digest)
            request = dataclasses.replace(
                request, adapter=digest or None,
                deadline=None if timeout_s is None else time.monotonic() + timeout_s)
            stream = self.engine.submit(request)
            async for chunk in stream:
                yield {"chunk": chunk}
            yield {"result": await stream.result()}
        except LoraplexError as e:
            yield {"error": (type(e).__name__, str(e), e.field)}
        finally:
            if stream is not None and not stream.done:  # the caller went away: free the row
                self.engine.cancel(request.request_id)

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def resident(self) -> list:
        return self.engine.resident()

    def __del__(self) -> None:
        follower = getattr(self, "follower", None)
        if follower is not None:
            follower.stop(1.0)
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown(0.0)


def deployment(settings: Any, replicas: int) -> Any:
    """The bound Serve application: `replicas` copies of `EngineReplica`."""
    from ray import serve

    cls = type(DEPLOYMENT, (EngineReplica,), {})
    # Same attribute name as the function: Ray finds `self` of a multiplexed method by it.
    cls._adapter = serve.multiplexed(max_num_models_per_replica=MAX_MODELS_PER_REPLICA)(
        EngineReplica._adapter)
    dep = serve.deployment(name=DEPLOYMENT, num_replicas=replicas,
                           ray_actor_options={"num_cpus": 0},
                           max_ongoing_requests=settings.max_batch + settings.max_waiting,
                           health_check_period_s=2.0)(cls)
    return dep.bind(settings)


# ------------------------------------------------------------------------ at the ingress
_RETRYABLE_NAMES = ("RayActorError", "ActorDiedError", "ActorUnavailableError",
                    "ReplicaUnavailableError", "DeploymentUnavailableError")


class RayEngine:
    """The engine interface the gRPC servicers use, served by the deployment's replicas."""

    def __init__(self, handle: Any, registry: Any, *, retries: int = 3) -> None:
        self.handle = handle
        self.registry = registry
        self.retries = retries
        self.ready = False
        self._live: dict[str, RayStream] = {}
        self._draining = False

    def start(self, *, wait: bool = True, timeout: float | None = 300.0) -> RayEngine:
        self.handle.stats.remote().result(timeout_s=timeout)  # a replica answers: ready
        self.ready = True
        return self

    def submit(self, request: GenerationRequest) -> RayStream:
        if not self.ready or self._draining:
            raise Unavailable("the Ray ingress is not accepting requests")
        version = None
        if request.adapter:  # authorization at the edge: NotFound for foreign adapters
            version = self.registry.resolve(request.identity, request.adapter)
        stream = RayStream(self, request, version)
        self._live[request.request_id] = stream
        return stream

    def cancel(self, request_id: str) -> bool:
        stream = self._live.pop(request_id, None)
        return stream.cancel() if stream is not None else False

    def stats(self) -> EngineStats:
        """One replica's view (Ray picks which); per-replica numbers are on each replica."""
        return self.handle.stats.remote().result(timeout_s=30)

    def resident(self) -> list:
        return self.handle.resident.remote().result(timeout_s=30)

    def prefetch(self, *_a: Any, **_k: Any) -> bool:
        raise FailedPrecondition("admin adapter placement is per replica; with --ray, Ray "
                                 "Serve places adapters (multiplexing)", field="ref")

    unload = pin = unpin = prefetch

    def drain(self, timeout: float | None = None) -> bool:
        self._draining = True
        return not self._live

    def shutdown(self, grace_s: float = 0.0) -> None:
        self._draining = True
        for rid in list(self._live):
            self.cancel(rid)


class RayStream:
    """`RequestStream`'s async face over a Ray Serve streaming call, with retries."""

    def __init__(self, engine: RayEngine, request: GenerationRequest, version: Any) -> None:
        self.engine, self.request, self.version = engine, request, version
        self._result: GenerationResult | None = None
        self._call: Any = None
        self._cancelled = False
        self._outward = False  # True once the caller iterates: chunks reached someone
        self._iter = self._run()
        self.done = False

    def cancel(self) -> bool:
        self._cancelled = True
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
        req, digest = self.request, self.version.digest if self.version else ""
        timeout_s = None if req.deadline is None else max(0.0, req.deadline - time.monotonic())
        try:
            for attempt in range(self.engine.retries + 1):
                sent = False
                self._call = self.engine.handle.options(
                    multiplexed_model_id=digest, stream=True).generate.remote(
                        dataclasses.replace(req, deadline=None), timeout_s)
                try:
                    async for item in self._call:
                        if "error" in item:
                            raise _typed(*item["error"])
                        if "result" in item:
                            self._result = dataclasses.replace(item["result"],
                                                               adapter=self.version)
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


# ------------------------------------------------------------------------ the application
class GrpcIngress:
    """Our gRPC server (auth, contract, health, /metrics) in front of the engine replicas,
    itself a Serve deployment, so Ray restarts it like any replica."""

    def __init__(self, engines: Any, settings: Any) -> None:
        from loraplex.runtime.server import BackgroundServer, open_registry

        registry = open_registry(settings)
        ingress = settings.model_copy(update={"follow_registry": False})  # replicas follow
        self.server = BackgroundServer(ingress, registry=registry,
                                       engine=RayEngine(engines, registry)).start()

    def check_health(self) -> None:
        """Ray Serve's health hook: a failed ingress is replaced."""
        if self.server.server is None or self.server.server.startup_error is not None:
            raise Unavailable("the gRPC ingress is not serving")

    def __del__(self) -> None:
        server = getattr(self, "server", None)
        if server is not None:
            server.stop()


def build(settings: Any) -> Any:
    """The Serve application: `settings.replicas` engine replicas behind one gRPC ingress."""
    from ray import serve

    ingress = serve.deployment(name="GrpcIngress", num_replicas=1,
                               ray_actor_options={"num_cpus": 0})(GrpcIngress)
    return ingress.bind(deployment(settings, settings.replicas), settings)


def app(args: dict[str, Any]) -> Any:
    """Application builder for `serve run loraplex.runtime.ray_serve:app` and KubeRay's
    RayService (`import_path` + `args`): the args are server settings (`base`, `replicas`,
    `port`, …) over `LORAPLEX_*` variables."""
    from loraplex.runtime.settings import load_settings

    return build(load_settings(dict(args)))


# ------------------------------------------------------------------------ running it
def start(settings: Any, *, address: str | None = None) -> None:
    """Connect to (or start) Ray and deploy the application (returns once it is up)."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    serve.start(proxy_location="Disabled")
    serve.run(build(settings), name=APP, route_prefix=None)


def run(settings: Any) -> int:
    """`loraplex serve --ray`: deploy, serve until SIGTERM/SIGINT, then take the app down
    (the ingress drains: health NOT_SERVING, in-flight calls finish within `grace_s`)."""
    import signal
    import threading

    from ray import serve

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    start(settings, address=settings.ray_address)
    log.info("loraplex on Ray Serve: %d engine replicas, gRPC on %s:%d", settings.replicas,
             settings.host, settings.port)
    stop.wait()
    serve.delete(APP)
    return 0
