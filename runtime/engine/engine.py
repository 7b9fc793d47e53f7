"""The serving engine: one base model, many adapters, continuous batching on its own thread.

    from loraplex.runtime.engine.engine import Engine, EngineConfig, SamplingParams

    engine = Engine(EngineConfig(base_dir="./base", quantization="none"), registry).start()
    request = engine.admit("r1", identity, "acme/support@prod", prompt="Hello",
                           sampling=SamplingParams(32))   # resolve + tokenize (caller thread)
    stream = engine.submit(request)
    async for chunk in stream: ...                   # Chunk(text, token_ids)
    result = await stream.result()                   # or engine.generate(request) (blocking)

This module is the lifecycle — the engine thread, readiness and draining, in one place — and
the thread-safe front: `admit` (the edge's intake, `intake.py`), `submit`/`cancel`, admin
commands (`commands.py`), `stats`. The work of a step lives in `core.py`:

    plan = scheduler.schedule(...)   →  pool.activate_for(plan.admitted)  →  runner.run(feeds)
         (scheduler.py, plan.py)          (pool.py)                    (runner.py)
    →  commit(outputs)   (commit.py: sampling, stop strings, results → streams)
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from loraplex.errors import LoraplexError, Unavailable
from loraplex.runtime.api.limits import Limits
from loraplex.runtime.api.observer import EngineObserver, notify
from loraplex.runtime.api.types import (
    Chunk,
    EngineConfig,
    EngineStats,
    GenerationRequest,
    GenerationResult,
    ResidentAdapter,
    SamplingParams,
    Timings,
    Usage,
)
from loraplex.runtime.decoding.detokenize import Detokenizer, TokenTable
from loraplex.runtime.decoding.grammar import GrammarCompiler
from loraplex.runtime.decoding.sampling import make_generator
from loraplex.runtime.engine.commands import AdminCommands
from loraplex.runtime.engine.commit import Seq
from loraplex.runtime.engine.core import EngineCore, Inbox
from loraplex.runtime.engine.intake import Intake, LockedTokenizer, validate_request
from loraplex.runtime.engine.ratelimit import RateLimiter
from loraplex.runtime.engine.scheduler import Scheduler
from loraplex.runtime.engine.stream import RequestStream
from loraplex.runtime.lora.host_loader import HostLoader, write_slot
from loraplex.runtime.lora.pool import AdapterPool
from loraplex.runtime.model.runner import Runner

if TYPE_CHECKING:
    from loraplex.fingerprint import BaseFingerprint
    from loraplex.registry import Identity, Registry

__all__ = [
    "Chunk", "Engine", "EngineConfig", "EngineObserver", "EngineStats",
    "GenerationRequest", "GenerationResult", "RequestStream", "ResidentAdapter",
    "SamplingParams", "Timings", "Usage",
]

log = logging.getLogger(__name__)


class Engine:
    """See the module docstring. Public methods are thread-safe; model work runs only on
    the engine thread."""

    def __init__(self, config: EngineConfig, registry: Registry | None = None,
                 observer: EngineObserver | None = None) -> None:
        self.config = config
        self.registry = registry
        self.observer = observer or EngineObserver()
        self.scheduler = Scheduler(
            config.max_waiting, config.aging_s,
            max_waiting_per_tenant=config.waiting_per_tenant,
            max_waiting_tokens_per_tenant=config.max_waiting_tokens_per_tenant)
        self._inbox = Inbox()
        self._wake = threading.Event()
        self._ready = threading.Event()
        self._boot_error: BaseException | None = None
        self._draining = False
        self._stop = False
        self._thread: threading.Thread | None = None
        self._core: EngineCore | None = None  # set by the engine thread once booted
        self._intake: Intake | None = None
        self._tokens: TokenTable | None = None  # the base's token → bytes table (boot)
        self.loader: HostLoader | None = None  # registry → host reads (tests set `.hook`)
        self._admin = AdminCommands(lambda: self._core.pool if self._core else None,
                                   self._command)

    # -- lifecycle: the one place for the thread, readiness and draining -----------------
    def start(self, *, wait: bool = True, timeout: float | None = None) -> Engine:
        """Start the engine thread, which loads the base; with `wait`, return once ready
        (raising the load error, if any)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._main, name="loraplex-engine",
                                            daemon=True)
            self._thread.start()
        if wait:
            self._ready.wait(timeout)
            if self._boot_error is not None:
                raise self._boot_error
        return self

    @property
    def ready(self) -> bool:
        """Booted, not failed, not stopped (draining engines are still ready)."""
        return self._ready.is_set() and self._boot_error is None and not self._stop

    @property
    def draining(self) -> bool:
        return self._draining

    def drain(self, timeout: float | None = None) -> bool:
        """Stop admitting new requests (submit raises Unavailable) and wait for the ones in
        flight to finish; True when none is left."""
        self._draining = True
        deadline = None if timeout is None else time.monotonic() + timeout
        while len(self._inbox):
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True

    def shutdown(self, grace_s: float = 0.0) -> None:
        """Drain for up to `grace_s`, cancel whatever is left, stop the thread."""
        if self._thread is not None and self.ready:
            self.drain(timeout=grace_s)
        self._draining = True
        self._stop = True  # the engine thread cancels what is left and exits
        self._wake.set()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout=30)
        if self._core is not None:
            self._core.pool.shutdown()

    def _check_admitting(self) -> None:
        if not self.ready:
            raise Unavailable("engine is not ready" if not self._stop else "engine is stopped")
        if self._draining:
            raise Unavailable("engine is draining; not accepting requests")

    # -- requests --------------------------------------------------------------------------
    @property
    def admin(self) -> AdminCommands:
        """Adapter residency commands (prefetch, unload, evict, resident)."""
        return self._admin

    @property
    def intake(self) -> Intake:
        """Ref + prompt → GenerationRequest (resolves in the registry, tokenizes): call it
        off any event loop. Unavailable until the base is loaded."""
        if self._intake is None:
            raise Unavailable("engine is not ready")
        return self._intake

    def admit(self, request_id: str, identity: Identity, adapter: str | None = None,
              prompt: str | None = None, prompt_ids: Sequence[int] | None = None,
              sampling: SamplingParams | None = None, deadline: float | None = None,
              messages: Sequence[dict[str, str]] | None = None) -> GenerationRequest:
        """`intake.admit` (see there), with refusals reported to the observer."""
        try:
            self._check_admitting()
            return self.intake.admit(request_id, identity, adapter, prompt=prompt,
                                     prompt_ids=prompt_ids, sampling=sampling,
                                     deadline=deadline, messages=messages)
        except LoraplexError as e:
            self._notify("on_request_rejected", getattr(identity, "tenant", None) or "",
                         adapter, e.code)
            raise

    def submit(self, request: GenerationRequest) -> RequestStream:
        """Validate and queue an admitted request. Raises at once: Unavailable (not ready,
        draining), InvalidArgument (field named), IncompatibleAdapter / FailedPrecondition
        (adapter), AlreadyExists (request id in flight), Overloaded / ResourceExhausted."""
        try:
            self._check_admitting()
            validate_request(request, self.intake.limits)
            request = self.intake.with_grammar(request)
            s = Seq(request=request, stream=RequestStream(request.request_id, self.cancel),
                    detok=Detokenizer(self._tokens, stop=request.sampling.stop),
                    generator=make_generator(request.sampling, self._core.runner.device),
                    t_submit=time.monotonic(),
                    grammar=request.grammar.start() if request.grammar is not None else None)
            self._inbox.add(s, self.scheduler)
        except LoraplexError as e:
            adapter = request.adapter.ref if request.adapter is not None else None
            self._notify("on_request_rejected", request.tenant, adapter, e.code)
            raise
        self._notify("on_request_queued", request)
        self._wake.set()
        return s.stream

    def generate(self, request: GenerationRequest,
                 timeout: float | None = None) -> GenerationResult:
        """Submit and block until the result (sync callers)."""
        return self.submit(request).wait(timeout)

    def cancel(self, request_id: str) -> bool:
        """Ask to end a request; it finishes with reason "cancelled" at the next step and its
        KV row and adapter slot are freed then. False if no such request is in flight."""
        if not self._inbox.cancel(request_id):
            return False
        self._wake.set()
        return True

    def stats(self) -> EngineStats:
        core, cfg = self._core, self.config
        pool = core.pool if core else None
        kv = core.runner.kv_usage() if core else None
        choice = core.runner.compute if core else None
        gemm = core.runner.gemm if core else None
        tiers = pool.tier_bytes() if pool else None
        return EngineStats(
            ready=self.ready, draining=self._draining,
            running=len(core.running) if core else 0, waiting=len(self.scheduler),
            loading=pool.loading if pool else 0,
            slots_used=pool.slots_used if pool else 0,
            slots_total=cfg.slot_layout.max_slots,
            host_bytes=pool.host_bytes if pool else 0,
            kv_rows_used=cfg.max_batch - (core.runner.rows.free if core else cfg.max_batch),
            kv_rows_total=cfg.max_batch, steps=core.steps if core else 0,
            tokens_generated=core.tokens if core else 0,
            requests_finished=core.finished if core else 0,
            kv_reserved_bytes=kv.reserved_bytes if kv else 0,
            kv_used_bytes=kv.used_bytes if kv else 0,
            kv_limit_bytes=kv.limit_bytes if kv else 0,
            prefix_hit_tokens=kv.prefix_hit_tokens if kv else 0,
            prefix_lookups=kv.prefix_lookups if kv else 0,
            prefix_hits=kv.prefix_hits if kv else 0,
            compute_dtype=choice.dtype if choice else "",
            compute_reason=choice.reason if choice else "",
            base_gemm=gemm.kind if gemm else "",
            base_gemm_reason=gemm.reason if gemm else "",
            device_bytes=tiers.device if tiers else 0,
            host_loading_bytes=tiers.loading if tiers else 0,
            host_limit_bytes=tiers.limit if tiers else cfg.host_cache_bytes,
            host_peak_bytes=tiers.peak if tiers else 0,
            host_adapters=tiers.host_adapters if tiers else 0,
            loads_queued=tiers.queued if tiers else 0)

    @property
    def fingerprint(self) -> BaseFingerprint | None:
        return self._core.runner.fingerprint if self._core else None

    @property
    def tokenizer(self) -> LockedTokenizer | None:
        return self._intake.tokenizer if self._intake else None

    # -- admin (in-process convenience: resolves the ref, then `self.admin`) ---------------
    def prefetch(self, identity: Identity, ref: str, *, wait: bool = True,
                 timeout: float | None = 120.0) -> bool:
        return self.admin.prefetch(self._resolve(identity, ref), wait=wait, timeout=timeout)

    def unload(self, identity: Identity, ref: str) -> bool:
        return self.admin.unload(self._resolve(identity, ref))

    def evict(self, digest: str) -> bool:
        """`unload` by digest, without asking the registry: the version may already be
        deleted there (the registry follower calls this on `version_deleted`)."""
        return self.admin.evict(digest)

    def pin(self, identity: Identity, ref: str) -> bool:
        return self.admin.pin(self._resolve(identity, ref))

    def unpin(self, identity: Identity, ref: str) -> bool:
        return self.admin.unpin(self._resolve(identity, ref))

    def resident(self, limit: int | None = None) -> list[ResidentAdapter]:
        return self.admin.resident(limit)

    def _resolve(self, identity: Identity, ref: str) -> Any:
        if not self.ready:
            raise Unavailable("engine is not ready")
        return self.intake.resolve(identity, ref)

    def _command(self, fn: Callable[[], Any]) -> Future:
        """Run `fn` on the engine thread; its future."""
        if self._thread is None or not self._thread.is_alive() or not self._ready.is_set():
            raise Unavailable("engine is not running")
        fut = self._inbox.command(fn)
        self._wake.set()
        return fut

    # -- the engine thread -----------------------------------------------------------------
    def _main(self) -> None:
        try:
            self._boot()
        except BaseException as e:  # noqa: BLE001 - reported to start() and to callers
            log.exception("engine failed to start")
            self._boot_error = e if isinstance(e, LoraplexError) else Unavailable(
                f"engine failed to start: {type(e).__name__}: {e}")
            self._ready.set()
            return
        self._ready.set()
        core = self._core
        while not self._stop:
            self._wake.clear()
            try:
                busy = core.step()
            except Exception:  # noqa: BLE001 - a bug fails the batch, not the server
                log.exception("engine step failed")
                core.fail_running(LoraplexError("internal error in the engine step"))
                busy = False
            if not busy:
                self._wake.wait(self.config.idle_wait_s)
        core.cancel_all()
        late, commands = self._inbox.close()  # from here on, submit refuses
        for s in late:
            s.stream.publish(error=Unavailable("engine stopped before the request started"))
        for _fn, fut in commands:
            fut.set_exception(Unavailable("engine is stopped"))

    def _boot(self) -> None:
        cfg = self.config
        runner = Runner.boot(cfg)
        limits = Limits(vocab_size=runner.vocab_size, max_seq_len=runner.max_seq_len,
                        max_new_tokens=cfg.max_new_tokens_limit, max_rank=cfg.max_rank,
                        fingerprint=runner.fingerprint, max_prompt_bytes=cfg.max_prompt_bytes)
        tokenizer = LockedTokenizer(runner.tokenizer)
        self._tokens = TokenTable.for_tokenizer(tokenizer)  # streamed text: whole characters
        self.loader = HostLoader(self.registry, runner.injection, limits, runner.lora_dtype,
                                 pin_memory=runner.device.type == "cuda")
        pool = AdapterPool(
            layout=runner.injection.layout, host_cache_bytes=cfg.host_cache_bytes,
            load_fn=self.loader, host_bytes_of=self.loader.host_bytes,
            write_slot=write_slot(runner.injection),
            clear_slot=runner.injection.clear_slot, loader_threads=cfg.loader_threads,
            loader_nice=cfg.loader_nice, observer=self.observer, on_loaded=self._wake.set,
            device=runner.device)
        self._core = EngineCore(cfg, runner, pool, self.scheduler, self._inbox, self.observer)
        grammars = GrammarCompiler(
            runner.tokenizer, sorted(runner.eos), vocab_size=runner.vocab_size,
            on_compile=lambda sec: self._notify("on_grammar_compile", sec),
            on_cache=lambda hit: self._notify("on_grammar_cache", hit))
        self._intake = Intake(self.registry, tokenizer, limits, grammars,
                              rates=RateLimiter(cfg.tenant_requests_per_minute,
                                                cfg.tenant_tokens_per_minute))

    def _notify(self, hook: str, *args: Any) -> None:
        notify(self.observer, hook, *args)
