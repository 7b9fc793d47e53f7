"""Per-replica metrics in the shape LoRA-aware routers already scrape (vLLM's names).

The Gateway API Inference Extension's endpoint picker (and llm-d's, and Ray Serve LLM's
ideas) score a replica by queue depth, KV-cache use and which LoRA adapters it is serving.
They read vLLM's metric names, so each loraplex replica exports those beside its own:

| metric | type | meaning here |
|---|---|---|
| `vllm:num_requests_waiting` | gauge | requests queued, not yet in the batch |
| `vllm:num_requests_running` | gauge | sequences in the running batch |
| `vllm:gpu_cache_usage_perc`, `vllm:kv_cache_usage_perc` | gauge | KV bytes used / KV limit, 0..1 |
| `vllm:lora_requests_info` | gauge | value: unix time of this reading; labels below |

`vllm:lora_requests_info` labels: `max_lora` (device slots: adapters that can serve in one
batch), `running_lora_adapters` (adapters in a device slot with a sequence running,
comma-separated), `waiting_lora_adapters` (adapters of queued requests that none of the
running sequences uses yet). An adapter is named by its key `tenant/name`: the name a
router sees in the request's `model`, whatever alias or version follows it.

Each list names at most `max_listed` adapters (the server's `metrics_top_k`; running ones
are bounded by `max_lora` anyway): many tenants queueing many distinct adapters would
otherwise make one unbounded label value, a new series at every scrape.

Everything is read at scrape time from `engine.stats()`, `engine.resident()` and the
request ids this module is told about (queued / done); the snapshot is a pure function.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

LORA_INFO = "vllm:lora_requests_info"


@dataclass(frozen=True)
class RouterSnapshot:
    running_adapters: tuple[str, ...]
    waiting_adapters: tuple[str, ...]
    max_lora: int
    running: int
    waiting: int
    kv_usage: float  # 0..1


def adapter_key(ref: str) -> str:
    """`t/n:v3`, `t/n@prod`, `t/n` -> `t/n` (a digest ref stays as it is)."""
    if ref.startswith("sha256:"):
        return ref
    return ref.split("@", 1)[0].split(":", 1)[0]


MAX_LISTED = 20


def snapshot(stats: Any, resident: Iterable[Any], queued_refs: Iterable[str],
             max_listed: int = MAX_LISTED) -> RouterSnapshot:
    """What a router sees of one replica (module docstring), from engine readings."""
    running = sorted({adapter_key(a.ref) for a in resident
                      if a.slot is not None and a.active_sequences > 0})
    waiting = sorted({adapter_key(r) for r in queued_refs if r} - set(running))
    return RouterSnapshot(tuple(running[:max_listed]), tuple(waiting[:max_listed]),
                          stats.slots_total, stats.running, stats.waiting, kv_usage(stats))


def kv_usage(stats: Any) -> float:
    """KV bytes live sequences use over the most the block pool may hold (0..1); rows in
    use over rows before the engine has measured its KV (no forward yet)."""
    limit = getattr(stats, "kv_limit_bytes", 0)
    if limit > 0:
        return min(1.0, stats.kv_used_bytes / limit)
    return stats.kv_rows_used / max(1, stats.kv_rows_total)


class RouterMetrics(Collector):
    """A collector in the server's Prometheus registry; fed request ids as they queue/end."""

    def __init__(self, registry: CollectorRegistry, max_listed: int = MAX_LISTED) -> None:
        self.max_listed = max_listed
        self._refs: dict[str, str] = {}  # in-flight request id -> adapter ref as requested
        self._lock = threading.Lock()
        self._stats: Callable[[], Any] | None = None
        self._resident: Callable[[], list] | None = None
        registry.register(self)

    def bind(self, stats: Callable[[], Any], resident: Callable[[], list]) -> None:
        self._stats, self._resident = stats, resident

    def queued(self, request_id: str, adapter: Any) -> None:
        """`adapter`: the ref as requested, or a resolved version (its `ref`), or None."""
        with self._lock:
            self._refs[request_id] = getattr(adapter, "ref", adapter) or ""

    def done(self, request_id: str) -> None:
        with self._lock:
            self._refs.pop(request_id, None)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        if self._stats is None or self._resident is None:
            return
        with self._lock:
            refs = list(self._refs.values())
        # the resident list first (a command the engine thread answers between steps), then
        # the counters: an admission that the list shows is in the counters too
        resident = self._resident()
        snap = snapshot(self._stats(), resident, refs, self.max_listed)
        yield from families(snap, time.time())


def families(snap: RouterSnapshot, now: float) -> list[GaugeMetricFamily]:
    info = GaugeMetricFamily(LORA_INFO, "LoRA adapters running and waiting on this replica "
                             "(value: unix time of the reading).",
                             labels=("running_lora_adapters", "waiting_lora_adapters",
                                     "max_lora"))
    info.add_metric((",".join(snap.running_adapters), ",".join(snap.waiting_adapters),
                     str(snap.max_lora)), now)
    out = [info]
    for name, doc, value in (
            ("vllm:num_requests_waiting", "Requests queued, not yet admitted.", snap.waiting),
            ("vllm:num_requests_running", "Sequences in the running batch.", snap.running),
            ("vllm:gpu_cache_usage_perc", "KV cache in use (0..1).", snap.kv_usage),
            ("vllm:kv_cache_usage_perc", "KV cache in use (0..1).", snap.kv_usage)):
        g = GaugeMetricFamily(name, doc)
        g.add_metric((), value)
        out.append(g)
    return out
