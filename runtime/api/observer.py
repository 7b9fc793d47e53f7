"""Engine events for metrics. `EngineObserver` does nothing; the metrics module subclasses it.

Every hook is called from the engine thread (or a loader thread, for `on_adapter_load` and
`on_cache` with tier "registry"; or the caller's thread for `on_request_queued` and
`on_request_rejected`), so implementations must be cheap and thread-safe and must
not block. An exception raised by a hook is logged and swallowed: metrics never take the
engine down. Durations are seconds (float), measured with `time.monotonic()`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from loraplex.runtime.api.types import GenerationRequest, GenerationResult

log = logging.getLogger(__name__)

CacheEvent = Literal["hit", "miss", "evict"]
Progress = Literal["admitted", "first_token", "token"]
Tier = Literal["device", "host", "registry"]


class EngineObserver:
    """No-op base class. Override what you need; the engine calls each hook as documented."""

    def on_request_queued(self, request: GenerationRequest) -> None:
        """A request passed validation and entered the waiting queue (from `submit`)."""

    def on_request_rejected(self, tenant: str, adapter: str | None, code: str) -> None:
        """`admit` or `submit` refused a request of `tenant` for `adapter` (the ref as the
        caller wrote it, or the resolved `t/n:vN`; None: the bare base); `code` is the
        error's gRPC code name (e.g. "RESOURCE_EXHAUSTED" for a full queue, "NOT_FOUND" for
        an unknown adapter). Called on the caller's thread."""

    def on_admitted(self, queue_s: float) -> None:
        """A request left the queue for the running batch after `queue_s` seconds."""

    def on_first_token(self, ttft_s: float) -> None:
        """A request produced its first token `ttft_s` seconds after `submit` (TTFT)."""

    def on_token(self, inter_token_s: float) -> None:
        """A request produced a further token, `inter_token_s` after its previous one."""

    def on_request_progress(self, request_id: str, event: Progress, seconds: float) -> None:
        """The moments of `on_admitted`, `on_first_token` and `on_token` again, naming the
        request, for views kept per adapter (the console's live recorder); called right
        after each of them, with the same `seconds`."""

    def on_finished(self, result: GenerationResult) -> None:
        """A request ended (any finish reason); `result` carries usage and timings."""

    def on_failed(self, request_id: str, code: str) -> None:
        """A request accepted by `submit` ended in an error (e.g. "DATA_LOSS" for a corrupt
        adapter blob found at load time, "UNAVAILABLE" at shutdown)."""

    def on_adapter_load(self, tier: Tier, seconds: float) -> None:
        """An adapter was brought up one tier: tier "registry" = read + verified from the
        registry into host memory (loader thread); tier "host" = copied from host memory into
        a device slot (engine thread)."""

    def on_cache(self, event: CacheEvent, tier: Tier) -> None:
        """Pool cache traffic: a lookup in `tier` ("device" slots or "host" memory) hit or
        missed, or an adapter was evicted from `tier`."""

    def on_occupancy(self, running: int, waiting: int) -> None:
        """The number of running sequences or waiting requests changed (admission, finish,
        cancel, deadline — with or without a forward); called after the step that changed it."""

    def on_step(self, batch_size: int, running: int, waiting: int) -> None:
        """One engine step ran a forward over `batch_size` rows (prefill + decode); `running`
        sequences are in the batch and `waiting` requests are queued after the step."""

    def on_grammar_compile(self, seconds: float) -> None:
        """A constraint (JSON schema, regex, choice) was compiled in `seconds`, on the
        admitting caller's thread (a cache miss that compiled)."""

    def on_grammar_cache(self, hit: bool) -> None:
        """A constrained request looked up its compiled grammar: `hit` or a miss (caller's
        thread)."""


class Fanout(EngineObserver):
    """Several observers where the engine takes one: each hook calls every observer in
    turn, each through `notify` (one failing observer never hides an event from the
    others)."""

    def __init__(self, *observers: EngineObserver) -> None:
        self.observers = observers


def _fan(hook: str):
    def call(self: Fanout, *args: Any) -> None:
        for observer in self.observers:
            notify(observer, hook, *args)
    call.__name__ = hook
    return call


for _hook in [n for n in vars(EngineObserver) if n.startswith("on_")]:
    setattr(Fanout, _hook, _fan(_hook))


def notify(observer: EngineObserver, hook: str, *args: Any) -> None:
    """Call `observer.<hook>(*args)`; a failing hook is logged, never raised (the engine,
    the pool and the intake all report through this)."""
    try:
        getattr(observer, hook)(*args)
    except Exception:  # noqa: BLE001 - metrics never take the engine down
        log.exception("observer.%s failed", hook)
