"""The loraplex gRPC server: inference, registry and admin services on one `grpc.aio` port,
standard health checking and reflection, Prometheus `/metrics` on a second port.

    loraplex serve --base ./base --port 50051 --metrics-port 9090 [--http-port 8000]

`create_server(settings) -> (server, port)` builds and binds without starting, so tests bind
port 0 and talk over a real channel; `serve(settings)` runs until SIGTERM/SIGINT and then
drains: health goes NOT_SERVING, new calls are refused (UNAVAILABLE), in-flight calls get
`grace_s` to finish, the engine shuts down, and the process exits 0.

Readiness and draining are the engine's (`ServingState` reads `engine.ready`/`draining`):
health, the servicers and the OpenAI HTTP door (`--http-port`) see one truth. The engine runs
on its own thread; the event loop here only moves messages.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import signal
import sys
import threading
from typing import Any, NoReturn

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from loraplex.runtime.serve.interceptors import (
    AuthInterceptor,
    ErrorInterceptor,
    MetricsInterceptor,
    RequestIdInterceptor,
)
from loraplex.runtime.serve.memory import MemoryTrimmer, limit_arenas
from loraplex.runtime.serve.metrics import ServerMetrics
from loraplex.runtime.serve.pacing import RefusalPacer
from loraplex.runtime.serve.servicers import (
    AdminServicer,
    InferenceServicer,
    RegistryServicer,
    ServingState,
)
from loraplex.runtime.serve.settings import ServerSettings
from loraplex.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
)

log = logging.getLogger("loraplex.runtime.serve.server")

INFERENCE = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name
REGISTRY = registry_pb2.DESCRIPTOR.services_by_name["RegistryService"].full_name
ADMIN = admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name
ENGINE_SERVICES = ("", INFERENCE, ADMIN)  # "" is the whole server, for plain health probes
READY_POLL_S = 0.05
EXIT_JOIN_S = 5.0  # how long `exit_process` waits for a leftover non-daemon thread


class LoraplexServer:
    """One server: the grpc.aio server plus the engine, registry and metrics it owns."""

    def __init__(self, settings: ServerSettings, registry: Any, engine: Any | None,
                 metrics: ServerMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.state = ServingState(registry=registry, engine=engine, settings=settings,
                                  memory=MemoryTrimmer(settings.memory_trim_s))
        self.health = health.aio.HealthServicer()
        self.metrics_port: int | None = None
        self.pacer = RefusalPacer(settings.refusal_pacing_free, settings.refusal_pacing_delay_s,
                                  settings.refusal_pacing_max_held)
        self.grpc = grpc.aio.server(
            interceptors=self._interceptors(),
            options=[("grpc.max_receive_message_length", settings.max_message_bytes),
                     ("grpc.max_send_message_length", settings.max_message_bytes)],
            maximum_concurrent_rpcs=settings.max_concurrent_rpcs)
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(
            InferenceServicer(self.state), self.grpc)
        registry_pb2_grpc.add_RegistryServiceServicer_to_server(
            RegistryServicer(self.state), self.grpc)
        admin_pb2_grpc.add_AdminServiceServicer_to_server(AdminServicer(self.state), self.grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection(
            (INFERENCE, REGISTRY, ADMIN, health.SERVICE_NAME, reflection.SERVICE_NAME),
            self.grpc)
        self._bring_up: asyncio.Task | None = None
        self.startup_error: BaseException | None = None
        self.follower = None  # RegistryFollower, once the engine is ready
        self.http = None  # the OpenAI HTTP door (openai_binding.HttpThread), with http_port
        self.live = None  # the console's LiveRecorder, fed by the engine it built

    @property
    def engine(self):
        return self.state.engine

    @property
    def registry(self):
        return self.state.registry

    def _interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        if self.settings.no_auth:
            from loraplex.registry import Identity

            log.warning("authentication is OFF (--no-auth): every caller is an admin; "
                        "use this for local experiments only (listeners: %s)",
                        ", ".join(f"{k}={v}" for k, v in self.settings.listeners()))
            auth = AuthInterceptor(None, fallback=Identity.system())
        else:
            registry = self.state.registry
            auth = AuthInterceptor(registry.authenticate,
                                   cached=getattr(registry, "authenticate_cached", None),
                                   pacer=self.pacer)
        # Outermost first: the request id is bound before anything logs; metrics see the
        # final status code the error interceptor chose.
        return [RequestIdInterceptor(), MetricsInterceptor(self.metrics),
                ErrorInterceptor(self.pacer), auth]

    def bind(self) -> int:
        """Bind the configured address; returns the port (the chosen one for port 0)."""
        address = f"{self.settings.host}:{self.settings.port}"
        if self.settings.tls:
            port = self.grpc.add_secure_port(address, server_credentials(self.settings))
        else:
            port = self.grpc.add_insecure_port(address)
        if port == 0:
            raise OSError(f"cannot bind gRPC address {address}")
        return port

    async def start(self) -> None:
        """Start serving: the registry answers at once; inference once the base is loaded."""
        self.state.memory.start()
        await self._set_health((REGISTRY,), health_pb2.HealthCheckResponse.SERVING)
        await self._set_health(ENGINE_SERVICES, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.settings.metrics_port is not None:
            self.metrics_port = self.metrics.serve_http(
                self.settings.metrics_port, self.settings.metrics_host,
                **tls_files(self.settings))
        await self.grpc.start()
        if self.engine is not None and self.settings.http_port is not None:
            self.http = await asyncio.to_thread(self._open_http)
        if self.engine is not None:
            self._bring_up = asyncio.create_task(self._start_engine())

    @property
    def http_port(self) -> int | None:
        return self.http.port if self.http is not None else None

    def _open_http(self):
        """The OpenAI routes over the same engine (an `Engine`, or the Ray ingress's
        `RayEngine`): they admit through it, so readiness, draining and the tenant rules
        are the gRPC door's."""
        from pathlib import Path

        from loraplex.runtime.serve.openai.binding import EngineBackend, HttpThread
        from loraplex.runtime.serve.openai.http import create_app

        name = self.settings.model_name or (Path(self.settings.base).name
                                            if self.settings.base else "base")
        backend = EngineBackend(self.engine, None if self.settings.no_auth else self.registry,
                                base_name=name)
        app = create_app(backend, max_body_bytes=self.settings.http_max_body_bytes,
                         timeout_s=self.settings.http_timeout_s,
                         extra_routes=self._console_routes())
        return HttpThread(app, host=self.settings.http_host, port=self.settings.http_port,
                          **tls_files(self.settings)).__enter__()

    def _console_routes(self) -> list[Any]:
        """The web console's routes on the HTTP door (none with `console: false`)."""
        if not self.settings.console:
            return []
        from loraplex.registry import Identity
        from loraplex.runtime.serve.console.app import ConsoleContext, console_routes

        def everyone_admin(token: str, peer: str | None = None) -> Any:
            return Identity.system()

        return console_routes(ConsoleContext(
            registry=self.registry, engine=self.engine, live=self.live,
            authenticate=everyone_admin if self.settings.no_auth else self.registry.authenticate,
            secure_cookies=self.settings.tls, no_auth=self.settings.no_auth))

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until the base is loaded (raises what the engine raised, if it failed)."""
        if self._bring_up is not None:
            await asyncio.wait_for(asyncio.shield(self._bring_up), timeout)
        if self.startup_error is not None:
            raise self.startup_error

    async def _start_engine(self) -> None:
        engine = self.engine
        try:
            await asyncio.to_thread(engine.start)
            while not engine.ready:
                await asyncio.sleep(READY_POLL_S)
        except Exception as e:  # noqa: BLE001 - reported through health and wait_ready
            log.exception("the engine failed to start; inference stays NOT_SERVING")
            self.startup_error = e
            return
        slots = self.settings.max_slots  # the router gauges read the adapters in slots only
        self.metrics.bind_engine(engine.stats, lambda: engine.resident(slots))
        self._follow()
        await self._set_health(ENGINE_SERVICES, health_pb2.HealthCheckResponse.SERVING)
        log.info("base loaded: serving inference")

    def _follow(self) -> None:
        """Start following the registry's change feed (replicas of one registry)."""
        if not self.settings.follow_registry or not hasattr(self.registry, "changes"):
            return
        from loraplex.runtime.engine.follower import RegistryFollower

        self.follower = RegistryFollower(
            self.registry, engine=self.engine, prefetch_aliases=self.settings.prefetch_aliases,
            poll_s=self.settings.follow_poll_s).start()

    async def drain(self, grace_s: float | None = None, delay_s: float | None = None) -> None:
        """Stop admitting, let in-flight calls finish within `grace_s`, then shut down.

        For `delay_s` first, the listener stays open while health answers NOT_SERVING and
        new generation calls get UNAVAILABLE: probes and load balancers see the drain
        before connections start being refused.
        """
        grace = self.settings.grace_s if grace_s is None else grace_s
        delay = self.settings.drain_delay_s if delay_s is None else delay_s
        log.info("draining: finishing in-flight calls within %.1fs", grace)
        self.state.begin_drain()  # the engine stops admitting; in-flight requests run on
        await self.health.enter_graceful_shutdown()
        if delay > 0:
            await asyncio.sleep(delay)
        await self.grpc.stop(grace)  # refuses new calls, waits up to `grace` for running ones
        await self.close()

    async def close(self) -> None:
        """Release the engine, metrics port and registry (after the gRPC server stopped)."""
        if self._bring_up is not None and not self._bring_up.done():
            self._bring_up.cancel()
        if self.http is not None:
            await asyncio.to_thread(self.http.__exit__, None, None, None)
        if self.follower is not None:
            await asyncio.to_thread(self.follower.stop)
        if self.engine is not None:
            await asyncio.to_thread(self.engine.shutdown, 0.0)
        self.metrics.close()
        self.state.close()
        close_registry = getattr(self.registry, "close", None)
        if callable(close_registry):
            close_registry()

    async def _set_health(self, services, status) -> None:
        for service in services:
            await self.health.set(service, status)


def tls_files(settings: ServerSettings) -> dict[str, str | None]:
    """The PEM files of the TLS settings, as the HTTP and /metrics doors take them
    (empty without TLS)."""
    if not settings.tls:
        return {}
    return {"certfile": str(settings.tls_cert), "keyfile": str(settings.tls_key),
            "client_cafile": str(settings.tls_client_ca) if settings.tls_client_ca else None}


def server_credentials(settings: ServerSettings) -> grpc.ServerCredentials:
    """gRPC TLS credentials from the PEM files; with `tls_client_ca`, a client must present
    a certificate that CA signed (mutual TLS)."""
    from loraplex.errors import InvalidArgument

    def read(path, field: str) -> bytes:
        try:
            return path.read_bytes()
        except OSError as e:
            raise InvalidArgument(f"cannot read {field} {path}: {e.strerror}",
                                  field=field) from e

    pair = (read(settings.tls_key, "tls_key"), read(settings.tls_cert, "tls_cert"))
    ca = read(settings.tls_client_ca, "tls_client_ca") if settings.tls_client_ca else None
    return grpc.ssl_server_credentials([pair], root_certificates=ca,
                                       require_client_auth=ca is not None)


def create_server(settings: ServerSettings, *, registry: Any = None, engine: Any = None,
                  metrics: ServerMetrics | None = None,
                  with_engine: bool = True) -> tuple[LoraplexServer, int]:
    """Build and bind a server (not started). Call from inside the event loop.

    `registry`/`engine` may be passed in (tests, the demo); otherwise they are opened from
    the settings. `with_engine=False` makes a registry-only server (no base needed).
    """
    limit_arenas(settings.malloc_arena_max)  # before the engine and pools start threads
    metrics = metrics or ServerMetrics(top_k=settings.metrics_top_k)
    if registry is None:
        registry = open_registry(settings)
    live = None
    if engine is None and with_engine:
        observer: Any = metrics
        if settings.console and settings.http_port is not None:
            from loraplex.runtime.api.observer import Fanout
            from loraplex.runtime.serve.console.live import LiveRecorder

            live = LiveRecorder()
            observer = Fanout(metrics, live)
        engine = build_engine(settings, registry, observer)
    server = LoraplexServer(settings, registry, engine, metrics)
    server.live = live
    server.state.base_fingerprint = register_served_base(settings, registry)
    return server, server.bind()


def open_registry(settings: ServerSettings):
    from loraplex.registry import Registry

    return Registry.open(settings.registry, blob_dir=settings.blob_dir)


def build_engine(settings: ServerSettings, registry: Any, observer: Any):
    from loraplex.runtime.engine.engine import Engine

    return Engine(settings.engine_config(), registry, observer)


def register_served_base(settings: ServerSettings, registry: Any):
    """Record the served base in the registry so adapters can be registered against it."""
    if settings.base is None:
        return None
    from loraplex.registry import Identity

    return registry.register_base(Identity.system(), settings.base)


async def run(settings: ServerSettings) -> int:
    """Serve until SIGTERM/SIGINT, then drain; the exit status (0 after a clean drain)."""
    server, port = create_server(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    log.info("loraplex serving gRPC on %s:%d, metrics on %s, OpenAI HTTP on %s",
             settings.host, port,
             server.metrics_port if server.metrics_port is not None else "(off)",
             server.http_port if server.http_port is not None else "(off)")
    if server.http_port is not None and settings.console:
        log.info("console on %s://%s:%d/console/", "https" if settings.tls else "http",
                 settings.http_host, server.http_port)
    ready = asyncio.ensure_future(server.wait_ready())
    stopped = asyncio.ensure_future(stop.wait())
    done, _ = await asyncio.wait({ready, stopped}, return_when=asyncio.FIRST_COMPLETED)
    if ready in done and ready.exception() is not None:
        stopped.cancel()
        await server.drain(0, 0)
        return 1
    await stopped
    ready.cancel()
    await server.drain()
    log.info("drained; exiting")
    return 0


def serve(settings: ServerSettings) -> int:
    """One process: this engine behind gRPC (and HTTP), until SIGTERM/SIGINT."""
    return asyncio.run(run(settings))


def exit_process(code: int) -> NoReturn:
    """End the process now that `serve` has drained: atexit handlers run and output is
    flushed, but the interpreter's module teardown is skipped.

    Why: with torch and transformers imported, CPython's final garbage collection clears
    tens of thousands of classes, and every `type_clear` walks its subclasses
    (`PyType_Modified`): seen as 2 s on a quiet 2-core machine and 7-10 s on a busy one, at
    full CPU, between "drained; exiting" and the exit — time taken from a pod's termination
    grace for nothing. `drain()` already released everything the server owns (engine,
    listener, metrics port, registry); freeing the remaining memory is the kernel's job.
    A non-daemon thread still running here would be a bug: it gets `EXIT_JOIN_S` to end and
    is named in the log if it does not.
    """
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join(EXIT_JOIN_S)
            if thread.is_alive():
                log.warning("thread %r still running at exit", thread.name)
    atexit._run_exitfuncs()  # what a normal exit runs (logging.shutdown among them)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken pipe: nothing left to say
            pass
    os._exit(code)


class BackgroundServer:
    """A server on its own event-loop thread, for tests, the demo and the benchmark.

        with BackgroundServer(settings, registry=reg) as bg:
            Client(f"127.0.0.1:{bg.port}").generate(...)
    """

    def __init__(self, settings: ServerSettings, *, ready_timeout: float = 300.0,
                 **create_kw: Any) -> None:
        import threading

        self.settings = settings
        self._create_kw = create_kw
        self._ready_timeout = ready_timeout
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="loraplex-grpc",
                                        daemon=True)
        self.server: LoraplexServer | None = None
        self.port = 0

    def start(self) -> BackgroundServer:
        self._thread.start()
        self.server, self.port = self.call(self._start())
        return self

    async def _start(self):
        server, port = create_server(self.settings, **self._create_kw)
        await server.start()
        await server.wait_ready(self._ready_timeout)
        return server, port

    @property
    def metrics_port(self) -> int | None:
        return self.server.metrics_port if self.server else None

    @property
    def http_port(self) -> int | None:
        return self.server.http_port if self.server else None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def call(self, coro, timeout: float | None = None):
        """Run `coro` on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, grace_s: float = 0.0) -> None:
        if self.server is not None:
            self.call(self.server.drain(grace_s, 0.0))
            self.server = None
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
        if not self.loop.is_running():
            self.loop.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
