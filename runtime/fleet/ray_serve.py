"""Many engine replicas on Ray Serve, behind our own gRPC front door.

    loraplex serve --ray --replicas 4 --base ./base --registry postgresql+psycopg://… \
        --blob-dir s3://bucket/loraplex          # RAY_ADDRESS=auto joins a running cluster
    serve run loraplex.runtime.fleet.ray_serve:app base=./base replicas=4   # or KubeRay RayService

Layout: `EngineReplica` is a Ray Serve deployment; each replica holds the base once and an
`Engine` over the shared registry. `GrpcIngress`, a second deployment, runs the ordinary
loraplex gRPC server (auth, the proto contract, health, metrics) whose `engine` is a
`RayEngine` over the replicas' deployment handle. Intake happens once, at the edge, as on
one server: `RayEngine.admit` is `Intake.admit` (the ref resolved with the caller's
identity in the shared registry, so tenant rules hold; the prompt tokenized with the base's
tokenizer; the replicas' limits checked). `RayEngine.submit` sends the admitted
`GenerationRequest` — resolved `AdapterVersion` and token ids — to the deployment with the
version's digest as Ray Serve's *multiplexed model id*, and the replica hands it to its
engine's `submit` as is: nothing is resolved again there, the replica's pool loads that
version from the shared registry. Ray's router sends a request to a replica that already
holds that id when it can and to a less loaded one otherwise: adapter affinity, without a
router of ours. Base-model requests carry no id (every replica holds the base).

Replica failures: Ray restarts a dead replica. A request that loses its replica before any
token reached the caller (any unary Generate) is sent again to another replica (greedy and
seeded sampling give the same tokens again); a stream that had already delivered tokens
ends with UNAVAILABLE instead of repeating them, and the caller retries.

What the ingress does not do: adapter placement (AdminService Prefetch/Unload/Pin/Unpin)
is per replica, so those answer FAILED_PRECONDITION (Ray Serve places adapters); `Resident`
and `Stats` show one replica's view; each replica follows the registry's change feed itself.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from loraplex.errors import FailedPrecondition, LoraplexError, Unavailable, quote
from loraplex.runtime.api.limits import Limits
from loraplex.runtime.api.types import EngineStats, GenerationRequest
from loraplex.runtime.fleet.ray_ingress import RayEngine, model_id

log = logging.getLogger(__name__)
APP = "loraplex"
DEPLOYMENT = "EngineReplica"
MAX_MODELS_PER_REPLICA = 64  # Ray's per-replica affinity set; the engine's pool does the LRU


# ------------------------------------------------------------------------ on each replica
class EngineReplica:
    """One engine, one base, on one Ray Serve replica (wrapped by `serve.deployment`)."""

    def __init__(self, settings: Any) -> None:
        from loraplex.runtime.engine.engine import Engine
        from loraplex.runtime.engine.follower import RegistryFollower
        from loraplex.runtime.serve.server import open_registry

        self.registry = open_registry(settings)
        self.engine = Engine(settings.engine_config(), self.registry, None).start()
        self.follower = RegistryFollower(self.registry, engine=self.engine,
                                         prefetch_aliases=settings.prefetch_aliases,
                                         poll_s=settings.follow_poll_s).start()

    async def _adapter(self, digest: str) -> str:
        """Ray Serve's multiplexed loader: records that this replica serves `digest`, so Ray
        routes its next requests here. The load itself is the engine's: the pool brings the
        version in when the request is scheduled (and keeps its own LRU)."""
        return digest

    async def generate(self, request: GenerationRequest, timeout_s: float | None
                       ) -> AsyncIterator[dict]:
        """Chunks as `{"chunk": Chunk}`, then `{"result": GenerationResult}`; a typed error
        as `{"error": (class name, message, field)}` (Ray would wrap the exception)."""
        from ray import serve

        stream = None
        try:
            digest = serve.get_multiplexed_model_id()
            if digest != model_id(request):
                raise FailedPrecondition(f"routed as {quote(digest)}, the request's adapter is "
                                         f"{quote(model_id(request))}", field="adapter")
            if digest:
                await self._adapter(digest)
            request = dataclasses.replace(
                request, deadline=None if timeout_s is None else time.monotonic() + timeout_s)
            stream = self.engine.submit(request)
            async for chunk in stream:
                yield {"chunk": chunk}
            yield {"result": await stream.result()}
        except LoraplexError as e:
            yield {"error": (type(e).__name__, str(e), e.field)}
        finally:
            if stream is not None and not stream.done:  # the caller went away: free the row
                self.engine.cancel(request.request_id)

    def limits(self) -> Limits:
        """What the intake checks at the ingress (vocab, context, caps, the base's
        fingerprint); answered once this replica's base is loaded."""
        return self.engine.intake.limits

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def resident(self, limit: int | None = None) -> list:
        return self.engine.resident(limit)

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


# ------------------------------------------------------------------------ the application
class GrpcIngress:
    """Our gRPC server (auth, contract, health, /metrics) in front of the engine replicas,
    itself a Serve deployment, so Ray restarts it like any replica."""

    def __init__(self, engines: Any, settings: Any) -> None:
        from loraplex.runtime.serve.server import BackgroundServer, open_registry

        registry = open_registry(settings)
        ingress = settings.model_copy(update={"follow_registry": False})  # replicas follow
        self.server = BackgroundServer(ingress, registry=registry,
                                       engine=RayEngine(engines, registry,
                                                         settings.base)).start()

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
    """Application builder for `serve run loraplex.runtime.fleet.ray_serve:app` and KubeRay's
    RayService (`import_path` + `args`): the args are server settings (`base`, `replicas`,
    `port`, …) over `LORAPLEX_*` variables."""
    from loraplex.runtime.serve.settings import load_settings

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
