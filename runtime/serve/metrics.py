"""Prometheus metrics of one server: engine events (via `EngineObserver`) and gRPC outcomes.

Each `ServerMetrics` owns its own `CollectorRegistry`, so several servers in one process (the
tests) never collide, and serves it on its own HTTP port (`/metrics`). Every metric is
documented in `docs/metrics.md`.

Tenant and adapter labels are bounded: the first `top_k` distinct values seen keep their own
label, every later one is reported as `other`, so a tenant flood cannot blow up the series
count. Hooks run on the engine thread: each is a few dictionary and counter operations.
"""

from __future__ import annotations

import threading
import urllib.request
from collections.abc import Callable, Iterable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.parser import text_string_to_metric_families

from loraplex.runtime.api.observer import EngineObserver
from loraplex.runtime.serve.router_metrics import RouterMetrics

PREFIX = "loraplex"
OTHER = "other"
BASE = "base"  # adapter label of requests that ran on the base alone

# up to 5 min: on a CPU a big BatchGenerate queues its last items for minutes (the SmolLM2
# demo's TTFT p99 is near 60 s)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5,
                2.0, 3.0, 5.0, 10.0, 20.0, 60.0, 120.0, 300.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15,
               0.2, 0.3, 0.5, 1.0, 2.0)
DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0,
                    120.0, 300.0)
LOAD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                5.0, 10.0)


class BoundedLabel:
    """Maps label values to themselves for the first `k` distinct ones, then to `other`."""

    def __init__(self, k: int) -> None:
        self.k = k
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        with self._lock:
            if value in self._seen or len(self._seen) < self.k:
                self._seen.add(value)
                return value
        return OTHER

    def peek(self, value: str) -> str:
        """The label of `value` without claiming one of the `k` places for it."""
        return value if value in self._seen else OTHER


class ServerMetrics(EngineObserver):
    """All metrics of one server, fed by the engine (observer hooks) and the gRPC layer."""

    def __init__(self, top_k: int = 20, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        if registry is None:
            ProcessCollector(registry=self.registry)  # process_cpu_seconds_total, memory, fds
        self.tenant_label = BoundedLabel(top_k)
        self.adapter_label = BoundedLabel(top_k)
        self._tenants: dict[str, str] = {}  # request id → bounded tenant label, while in flight
        self._http = None
        r = self.registry

        def hist(name: str, doc: str, buckets, labels: Iterable[str] = ()) -> Histogram:
            return Histogram(f"{PREFIX}_{name}", doc, tuple(labels), registry=r, buckets=buckets)

        self.request_duration = hist("request_duration_seconds",
                                     "Submit to last token of a generation request.",
                                     DURATION_BUCKETS, ("outcome",))
        self.ttft = hist("time_to_first_token_seconds", "Submit to first generated token.",
                         TTFT_BUCKETS)
        self.inter_token = hist("inter_token_latency_seconds",
                                "Time between consecutive tokens of one request.", ITL_BUCKETS)
        self.queue_time = hist("queue_time_seconds", "Submit to admission into the batch.",
                               TTFT_BUCKETS)
        self.adapter_load = hist("adapter_load_seconds",
                                 "Bringing an adapter up one tier (registry→host, host→device).",
                                 LOAD_BUCKETS, ("tier",))
        self.grammar_compile = hist("grammar_compile_seconds",
                                    "Compiling a constraint (JSON schema, regex, choice).",
                                    LOAD_BUCKETS)
        self.grammar_hits = Counter(f"{PREFIX}_grammar_cache_hits",
                                    "Constrained requests whose grammar was cached.", registry=r)
        self.grammar_misses = Counter(f"{PREFIX}_grammar_cache_misses",
                                      "Constrained requests whose grammar was compiled.",
                                      registry=r)
        self.requests = Counter(f"{PREFIX}_requests", "Generation requests by outcome.",
                                ("outcome", "tenant", "adapter"), registry=r)
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "Prompt tokens processed.",
                                     ("tenant",), registry=r)
        self.generated_tokens = Counter(f"{PREFIX}_generated_tokens", "Tokens generated.",
                                        ("tenant",), registry=r)
        self.cache_hits = Counter(f"{PREFIX}_adapter_cache_hits", "Adapter lookups that hit.",
                                  ("tier",), registry=r)
        self.cache_misses = Counter(f"{PREFIX}_adapter_cache_misses",
                                    "Adapter lookups that missed.", ("tier",), registry=r)
        self.cache_evictions = Counter(f"{PREFIX}_adapter_cache_evictions",
                                       "Adapters evicted.", ("tier",), registry=r)
        self.running = Gauge(f"{PREFIX}_running_requests", "Sequences in the running batch.",
                             registry=r)
        self.waiting = Gauge(f"{PREFIX}_waiting_requests", "Requests queued, not admitted.",
                             registry=r)
        self.batch_size = Gauge(f"{PREFIX}_batch_size", "Rows in the last engine step.",
                                registry=r)
        self.resident = Gauge(f"{PREFIX}_resident_adapters", "Adapters resident, by tier.",
                              ("tier",), registry=r)
        self.host_bytes = Gauge(f"{PREFIX}_adapter_host_bytes",
                                "Bytes of adapters held in host memory.", registry=r)
        self.tier_bytes = Gauge(f"{PREFIX}_adapter_bytes", "Adapter bytes by tier: device "
                                "(in slots), host (held), loading (reserved for loads in "
                                "flight), host_limit (host + loading never exceed it), "
                                "host_peak (the highest host + loading since start).",
                                ("tier",), registry=r)
        self.loads_queued = Gauge(f"{PREFIX}_adapter_loads_queued",
                                  "Registry loads waiting for room in the host tier.",
                                  registry=r)
        self.kv_reserved = Gauge(f"{PREFIX}_kv_reserved_bytes",
                                 "KV cache bytes held (block pools, all layers).", registry=r)
        self.kv_used = Gauge(f"{PREFIX}_kv_used_bytes",
                             "KV cache bytes of positions live sequences have written.",
                             registry=r)
        self.prefix = Gauge(f"{PREFIX}_prefix_cache", "Prefix cache since start (cumulative): "
                            "lookups, hits, and prompt tokens reused (not computed).",
                            ("what",), registry=r)
        self.rpcs = Counter(f"{PREFIX}_grpc_requests", "Finished RPCs by method and status code.",
                            ("method", "code"), registry=r)
        self.rpc_duration = hist("grpc_request_duration_seconds", "RPC duration by method.",
                                 DURATION_BUCKETS, ("method",))
        self.router = RouterMetrics(r, max_listed=top_k)  # vLLM-named gauges for routers

    # -- wiring ---------------------------------------------------------------------------
    def bind_engine(self, stats: Callable[[], object],
                    resident: Callable[[], list] | None = None) -> None:
        """Read the resident-adapter gauges from the engine at scrape time: counters of
        `stats()` only, whatever the number of adapters held. `resident()` (for the router
        gauges) needs to list only the adapters in device slots, which come first."""
        self.resident.labels("device").set_function(lambda: getattr(stats(), "slots_used", 0))
        self.resident.labels("host").set_function(lambda: getattr(stats(), "host_adapters", 0))
        self.host_bytes.set_function(lambda: getattr(stats(), "host_bytes", 0))
        for tier, field in (("device", "device_bytes"), ("host", "host_bytes"),
                            ("loading", "host_loading_bytes"),
                            ("host_limit", "host_limit_bytes"), ("host_peak", "host_peak_bytes")):
            self.tier_bytes.labels(tier).set_function(lambda f=field: getattr(stats(), f, 0))
        self.loads_queued.set_function(lambda: getattr(stats(), "loads_queued", 0))
        self.kv_reserved.set_function(lambda: getattr(stats(), "kv_reserved_bytes", 0))
        self.kv_used.set_function(lambda: getattr(stats(), "kv_used_bytes", 0))
        for what, field in (("lookups", "prefix_lookups"), ("hits", "prefix_hits"),
                            ("hit_tokens", "prefix_hit_tokens")):
            self.prefix.labels(what).set_function(
                lambda f=field: getattr(stats(), f, 0))
        if resident is not None:
            self.router.bind(stats, resident)

    def serve_http(self, port: int, host: str = "127.0.0.1", *, certfile: str | None = None,
                   keyfile: str | None = None, client_cafile: str | None = None) -> int:
        """Start `/metrics` on `host:port` (0: any free port); returns the bound port. With
        `certfile`/`keyfile` it speaks HTTPS; with `client_cafile` a scraper must present a
        certificate that CA signed."""
        tls = {}
        if certfile is not None:
            tls = {"certfile": certfile, "keyfile": keyfile, "client_cafile": client_cafile,
                   "client_auth_required": client_cafile is not None}
        self._http, _thread = start_http_server(port, addr=host, registry=self.registry,
                                                **tls)
        return self._http.server_port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    # -- gRPC layer -----------------------------------------------------------------------
    def observe_rpc(self, method: str, code: str, seconds: float) -> None:
        self.rpcs.labels(method, code).inc()
        self.rpc_duration.labels(method).observe(seconds)

    # -- EngineObserver hooks (engine thread) ---------------------------------------------
    def on_request_queued(self, request) -> None:
        self._tenants[request.request_id] = self.tenant_label(request.tenant)
        self.router.queued(request.request_id, request.adapter)

    def on_request_rejected(self, tenant: str, adapter: str | None, code: str) -> None:
        # A refused ref may be a typo or a probe: it must not take one of the K label places.
        tenant = self.tenant_label(tenant)
        adapter = _key(adapter)
        label = self.adapter_label.peek(adapter) if adapter else BASE
        self.requests.labels(code.lower(), tenant, label).inc()

    def on_admitted(self, queue_s: float) -> None:
        self.queue_time.observe(queue_s)

    def on_first_token(self, ttft_s: float) -> None:
        self.ttft.observe(ttft_s)

    def on_token(self, inter_token_s: float) -> None:
        self.inter_token.observe(inter_token_s)

    def on_finished(self, result) -> None:
        self.router.done(result.request_id)
        tenant = self._tenants.pop(result.request_id, None)
        adapter = result.adapter
        if tenant is None:
            tenant = self.tenant_label(adapter.tenant) if adapter is not None else OTHER
        key = adapter.key if adapter is not None else None
        self.requests.labels(result.finish_reason, tenant, self._adapter(key)).inc()
        self.request_duration.labels(result.finish_reason).observe(result.timings.total_s)
        self.prompt_tokens.labels(tenant).inc(result.usage.prompt_tokens)
        self.generated_tokens.labels(tenant).inc(result.usage.completion_tokens)

    def on_failed(self, request_id: str, code: str) -> None:
        self.router.done(request_id)
        tenant = self._tenants.pop(request_id, OTHER)
        self.requests.labels(code.lower(), tenant, OTHER).inc()

    def on_adapter_load(self, tier: str, seconds: float) -> None:
        self.adapter_load.labels(tier).observe(seconds)

    def on_cache(self, event: str, tier: str) -> None:
        {"hit": self.cache_hits, "miss": self.cache_misses,
         "evict": self.cache_evictions}[event].labels(tier).inc()

    def on_grammar_compile(self, seconds: float) -> None:
        self.grammar_compile.observe(seconds)

    def on_grammar_cache(self, hit: bool) -> None:
        (self.grammar_hits if hit else self.grammar_misses).inc()

    def on_occupancy(self, running: int, waiting: int) -> None:
        self.running.set(running)
        self.waiting.set(waiting)

    def on_step(self, batch_size: int, running: int, waiting: int) -> None:
        self.batch_size.set(batch_size)
        self.running.set(running)
        self.waiting.set(waiting)

    def _adapter(self, ref: str | None) -> str:
        return self.adapter_label(_key(ref)) if ref else BASE


def _key(ref: str | None) -> str:
    """"t/n@prod", "t/n:v3" → "t/n" (labels never carry versions or aliases)."""
    return (ref or "").split("@", 1)[0].split(":", 1)[0]


# -- reading metrics back (demo, bench, tests) ----------------------------------------------
def scrape(url: str, timeout: float = 5.0) -> str:
    """The text exposition at `url` (e.g. http://127.0.0.1:9090/metrics)."""
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - operator URL
        return resp.read().decode()


def histogram_buckets(text: str, name: str) -> list[tuple[float, float]]:
    """Cumulative (upper bound, count) pairs of histogram `name`, summed over its labels."""
    totals: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != name:
            continue
        for sample in family.samples:
            if sample.name == f"{name}_bucket":
                le = float(sample.labels["le"])
                totals[le] = totals.get(le, 0.0) + sample.value
    return sorted(totals.items())


def histogram_quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """Prometheus' `histogram_quantile`: linear interpolation inside the bucket holding q."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if upper == float("inf"):
                return lower_bound
            width = count - lower_count
            frac = (rank - lower_count) / width if width > 0 else 1.0
            return lower_bound + (upper - lower_bound) * frac
        lower_bound, lower_count = upper, count
    return lower_bound
