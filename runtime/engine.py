"""The serving engine: one base model, many adapters, continuous batching on its own thread.

    from loraplex.runtime.engine import Engine, EngineConfig, GenerationRequest, SamplingParams

    engine = Engine(EngineConfig(base_dir="./base", quantization="none"), registry)
    engine.start()                                   # loads the base on the engine thread
    stream = engine.submit(GenerationRequest("r1", identity, "acme/support@prod",
                                             prompt="Hello", sampling=SamplingParams(32)))
    async for chunk in stream: ...                   # Chunk(text, token_ids)
    result = await stream.result()                   # or engine.generate(request) (blocking)

Each engine step (`_step`): run admin commands and cancellations, collect finished adapter
loads, expire deadlines, admit waiting requests (fair scheduler; the pool places adapters
into slots), then one decode forward over every running sequence (one token each) and one
prefill forward over newcomers (at most `prefill_token_budget` prompt tokens, chunked), so
joining sequences never stall the running ones for long. Every row of a forward carries its
adapter's slot (`injection.set_batch`); the KV cache keeps one pre-allocated row per
sequence (see `kv.py`).

Refs are resolved when a request is submitted: new requests see an alias move at once,
running ones finish on the version (digest) they started with.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from loraplex.errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    IncompatibleAdapter,
    InvalidArgument,
    LoraplexError,
    NotFound,
    Unavailable,
)
from loraplex.runtime.kv import Chunk as KVChunk
from loraplex.runtime.kv import RowAllocator, SlotKVCache, build_layout
from loraplex.runtime.observer import EngineObserver
from loraplex.runtime.pool import AdapterPool, HostAdapter
from loraplex.runtime.sampling import TextTail, make_generator, sample_next, validate_sampling
from loraplex.runtime.scheduler import Placement, Scheduler, Ticket
from loraplex.runtime.types import (
    Chunk,
    EngineConfig,
    EngineStats,
    FinishReason,
    GenerationRequest,
    GenerationResult,
    ResidentAdapter,
    SamplingParams,
    Timings,
    Usage,
)

if TYPE_CHECKING:
    from loraplex.fingerprint import BaseFingerprint
    from loraplex.registry import AdapterVersion, Identity, Registry

__all__ = [
    "Chunk", "Engine", "EngineConfig", "EngineObserver", "EngineStats", "GenerationRequest",
    "GenerationResult", "RequestStream", "ResidentAdapter", "SamplingParams", "Timings", "Usage",
]

log = logging.getLogger(__name__)
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_MAX_CONTEXT = 4096


# ------------------------------------------------------------------------------ the stream


class RequestStream:
    """Chunks of one request as they are generated, then its result.

    Async: `async for chunk in stream`, `await stream.result()`. Sync: `for chunk in stream`,
    `stream.wait(timeout)`. The engine thread publishes; asyncio consumers are woken with
    `loop.call_soon_threadsafe`, sync ones with a condition variable. A request that fails
    (e.g. a corrupt adapter blob) raises its typed error from iteration and `result()`.
    """

    def __init__(self, request_id: str, cancel: Callable[[str], bool]) -> None:
        self.request_id = request_id
        self._cancel = cancel
        self._cond = threading.Condition()
        self._chunks: list[Chunk] = []
        self._result: GenerationResult | None = None
        self._error: LoraplexError | None = None
        self._done = False
        self._async_pos = 0
        self._sync_pos = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None

    # -- engine side -------------------------------------------------------------------
    def _publish(self, chunk: Chunk | None = None, *, result: GenerationResult | None = None,
                 error: LoraplexError | None = None) -> None:
        with self._cond:
            if self._done:
                return
            if chunk is not None:
                self._chunks.append(chunk)
            if result is not None or error is not None:
                self._result, self._error, self._done = result, error, True
            self._cond.notify_all()
            loop, event = self._loop, self._event
        if loop is not None and event is not None:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # the consumer's loop is closed: nobody is listening
                pass

    # -- consumer side -----------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self._done

    def cancel(self) -> bool:
        return self._cancel(self.request_id)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> Chunk:
        while True:
            with self._cond:
                if self._async_pos < len(self._chunks):
                    self._async_pos += 1
                    return self._chunks[self._async_pos - 1]
                if self._done:
                    if self._error is not None:
                        raise self._error
                    raise StopAsyncIteration
                event = self._bind_loop()
                event.clear()
            await event.wait()

    async def result(self) -> GenerationResult:
        while True:
            with self._cond:
                if self._done:
                    return self._final()
                event = self._bind_loop()
                event.clear()
            await event.wait()

    def __iter__(self) -> Iterator[Chunk]:
        while True:
            with self._cond:
                while self._sync_pos >= len(self._chunks) and not self._done:
                    self._cond.wait()
                if self._sync_pos < len(self._chunks):
                    self._sync_pos += 1
                    chunk = self._chunks[self._sync_pos - 1]
                elif self._error is not None:
                    raise self._error
                else:
                    return
            yield chunk

    def wait(self, timeout: float | None = None) -> GenerationResult:
        """Block until the request ends; its result, or its typed error raised."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._done, timeout):
                raise TimeoutError(f"request {self.request_id} still running after {timeout}s")
            return self._final()

    def _final(self) -> GenerationResult:
        if self._error is not None:
            raise self._error
        if self._result is None:  # pragma: no cover - _done implies one of the two
            raise LoraplexError("request ended without a result")
        return self._result

    def _bind_loop(self) -> asyncio.Event:
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._event is None:
            self._loop, self._event = loop, asyncio.Event()
        return self._event


# ------------------------------------------------------------------------------ sequences


@dataclass(eq=False)
class _Seq:
    """One request inside the engine."""

    request: GenerationRequest
    stream: RequestStream
    prompt: list[int]
    version: AdapterVersion | None
    tail: TextTail
    generator: torch.Generator | None
    t_submit: float
    state: str = "waiting"  # waiting | prefill | decode | done
    row: int | None = None  # KV row while admitted
    slot: int = 0  # adapter slot while admitted (0 = none)
    prefilled: int = 0  # prompt tokens in the KV cache
    generated: list[int] = field(default_factory=list)
    cancel_requested: bool = False
    adapter_at_hand: bool = True  # in a slot or on host at arrival
    t_admit: float = 0.0
    t_adapter: float = 0.0  # when the adapter reached a slot (if it had to be loaded)
    t_prefill: float = 0.0
    t_first: float = 0.0
    t_last: float = 0.0

    @property
    def id(self) -> str:
        return self.request.request_id

    @property
    def tenant(self) -> str:
        return self.request.identity.tenant

    @property
    def digest(self) -> str | None:
        return self.version.digest if self.version is not None else None

    @property
    def params(self) -> SamplingParams:
        return self.request.sampling

    @property
    def length(self) -> int:
        """Tokens in the sequence (prompt + generated)."""
        return len(self.prompt) + len(self.generated)


# ------------------------------------------------------------------------------ the engine


class Engine:
    """See the module docstring. Public methods are thread-safe; model work runs only on
    the engine thread."""

    def __init__(self, config: EngineConfig, registry: Registry | None = None,
                 observer: EngineObserver | None = None) -> None:
        self.config = config
        self.registry = registry
        self.observer = observer or EngineObserver()
        self._scheduler = Scheduler(
            config.max_waiting, config.aging_s,
            max_waiting_per_tenant=config.max_waiting_per_tenant,
            max_waiting_tokens_per_tenant=config.max_waiting_tokens_per_tenant)
        self._lock = threading.Lock()
        self._live: dict[str, _Seq] = {}
        self._arrivals: deque[_Seq] = deque()
        self._commands: deque[tuple[Callable[[], Any], Future]] = deque()
        self._wake = threading.Event()
        self._ready = threading.Event()
        self._boot_error: BaseException | None = None
        self._draining = False
        self._stop = False
        self._closed = False
        self._thread: threading.Thread | None = None
        self._running: list[_Seq] = []
        self._steps = 0
        self._tokens = 0
        self._finished = 0
        # Set by start(): model, tokenizer, injection, cache, pool, fingerprint, limits.
        self.model: Any = None
        self.tokenizer: Any = None
        self.fingerprint: BaseFingerprint | None = None
        self.max_seq_len = 0
        self._injection: Any = None
        self._kv: SlotKVCache | None = None
        self._rows: RowAllocator | None = None
        self._pool: AdapterPool | None = None
        self._eos: frozenset[int] = frozenset()
        self._vocab = 0
        self._device = torch.device("cpu")
        self._bool_mask = True
        self._sliding_window: int | None = None
        self._mask_per_type = False  # the model takes {"full_attention": .., "sliding_attention": ..}
        self._lora_dtype = torch.float32
        self._load_hook: Callable[[AdapterVersion], None] | None = None  # tests: slow loads

    # -- lifecycle ---------------------------------------------------------------------
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
        return self._ready.is_set() and self._boot_error is None and not self._stop

    def drain(self, timeout: float | None = None) -> bool:
        """Stop admitting new requests (submit raises Unavailable) and wait for the ones in
        flight to finish; True when none is left."""
        self._draining = True
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                if not self._live:
                    return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.01)

    def shutdown(self, grace_s: float = 0.0) -> None:
        """Drain for up to `grace_s`, cancel whatever is left, stop the thread."""
        if self._thread is not None and self.ready:
            self.drain(timeout=grace_s)
        self._draining = True
        self._stop = True  # the engine thread cancels what is left and exits
        self._wake.set()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout=30)
        if self._pool is not None:
            self._pool.shutdown()

    # -- requests ----------------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> RequestStream:
        """Validate and queue a request. Raises at once: Unavailable (not ready/draining),
        InvalidArgument (field named), NotFound / IncompatibleAdapter / FailedPrecondition
        (adapter), AlreadyExists (request id in flight), Overloaded (queue full)."""
        try:
            seq = self._admit_request(request)
        except LoraplexError as e:
            self._notify("on_request_rejected", request, e.code)
            raise
        self._notify("on_request_queued", request)
        self._wake.set()
        return seq.stream

    def generate(self, request: GenerationRequest, timeout: float | None = None) -> GenerationResult:
        """Submit and block until the result (sync callers)."""
        return self.submit(request).wait(timeout)

    def cancel(self, request_id: str) -> bool:
        """Ask to end a request; it finishes with reason "cancelled" at the next step and its
        KV row and adapter slot are freed then. False if no such request is in flight."""
        with self._lock:
            seq = self._live.get(request_id)
            if seq is None or seq.cancel_requested:
                return False
            seq.cancel_requested = True
        self._wake.set()
        return True

    def stats(self) -> EngineStats:
        pool, rows = self._pool, self._rows
        return EngineStats(
            ready=self.ready, draining=self._draining,
            running=len(self._running), waiting=len(self._scheduler),
            loading=pool.loading if pool else 0,
            slots_used=pool.slots_used if pool else 0, slots_total=self.config.max_slots,
            host_bytes=pool.host_bytes if pool else 0,
            kv_rows_used=self.config.max_batch - (rows.free if rows else self.config.max_batch),
            kv_rows_total=self.config.max_batch, steps=self._steps,
            tokens_generated=self._tokens, requests_finished=self._finished)

    # -- admin -------------------------------------------------------------------------
    def prefetch(self, identity: Identity, ref: str, *, wait: bool = True,
                 timeout: float | None = 120.0) -> bool:
        """Bring an adapter into host memory and, if a slot is free or evictable, into a
        slot. True if it was not in a slot before. With `wait`, returns once it is resident
        (raising its load error, e.g. DataCorruption)."""
        version = self._resolve(identity, ref)

        def do() -> tuple[bool, Future]:
            return (self._pool.slot_of(version.digest) is not None,
                    self._pool.when_resident(version))

        was_in_slot, landed = self._call(do)
        if wait:
            try:
                landed.result(timeout)
            except FutureTimeout:
                raise DeadlineExceeded(f"adapter {version.ref} is still loading after "
                                       f"{timeout}s", field="ref") from None
        return not was_in_slot

    def unload(self, identity: Identity, ref: str) -> bool:
        """Drop an adapter from slot and host memory (after its running sequences end)."""
        version = self._resolve(identity, ref)
        return self._call(lambda: self._pool.remove(version.digest))

    def evict(self, digest: str) -> bool:
        """`unload` by digest, without asking the registry: the version may already be
        deleted there (the registry follower calls this on `version_deleted`)."""
        return self._call(lambda: self._pool.remove(digest))

    def pin(self, identity: Identity, ref: str) -> bool:
        """Keep an adapter in a device slot until `unpin` (loads it if needed)."""
        version = self._resolve(identity, ref)

        def do() -> bool:
            self._pool.ensure_loading(version)
            return self._pool.pin(version.digest)

        return self._call(do)

    def unpin(self, identity: Identity, ref: str) -> bool:
        version = self._resolve(identity, ref)
        return self._call(lambda: self._pool.unpin(version.digest))

    def resident(self) -> list[ResidentAdapter]:
        """Adapters in a device slot or host memory (empty once the engine has stopped)."""
        if self._closed or self._pool is None:
            return []
        return [ResidentAdapter(**d) for d in self._call(self._pool.resident)]

    # ================================================================ engine thread only
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
        while not self._stop:
            self._wake.clear()
            try:
                busy = self._step()
            except Exception:  # noqa: BLE001 - a bug fails the batch, not the server
                log.exception("engine step failed")
                self._fail_running(LoraplexError("internal error in the engine step"))
                busy = False
            if not busy:
                self._wake.wait(self.config.idle_wait_s)
        self._cancel_all()
        with self._lock:  # from here on, submit refuses under this lock
            self._closed = True
            late = list(self._live.values())
            self._live.clear()
        for s in late:
            s.stream._publish(error=Unavailable("engine stopped before the request started"))
        while self._commands:  # admin calls that arrived too late
            self._commands.popleft()[1].set_exception(Unavailable("engine is stopped"))

    def _boot(self) -> None:
        from loraplex.runtime.layers import inject_lora

        cfg = self.config
        self.model, tokenizer, self.fingerprint, self._device = _load_model(cfg)
        self.tokenizer = _LockedTokenizer(tokenizer)
        mcfg = self.model.config.get_text_config()
        self._vocab = int(mcfg.vocab_size)
        limit = int(getattr(mcfg, "max_position_embeddings", 0) or _MAX_CONTEXT)
        self.max_seq_len = min(cfg.max_seq_len or min(limit, _MAX_CONTEXT), limit)
        self._eos = _eos_ids(self.model, tokenizer)
        self._bool_mask = mcfg._attn_implementation == "sdpa"
        # Sliding-window attention: models with `layer_types` take a mask per layer type;
        # older ones (Mistral, Phi-3) one mask that must already carry the window.
        types = getattr(mcfg, "layer_types", None)
        window = getattr(mcfg, "sliding_window", None)
        if types is not None:
            self._mask_per_type = True
            self._sliding_window = int(window) if "sliding_attention" in types else None
        elif window and getattr(mcfg, "use_sliding_window", True):
            self._sliding_window = int(window)
        self._injection = inject_lora(self.model, cfg.target_modules, cfg.max_slots,
                                      cfg.max_rank)
        self._lora_dtype = next(iter(self._injection.layers.values())).lora_a.dtype
        self._kv = SlotKVCache(int(mcfg.num_hidden_layers), cfg.max_batch, self.max_seq_len)
        self._rows = RowAllocator(cfg.max_batch)
        self._pool = AdapterPool(
            max_slots=cfg.max_slots, host_cache_bytes=cfg.host_cache_bytes,
            load_fn=self._load_adapter, write_slot=self._write_slot,
            clear_slot=self._injection.clear_slot, loader_threads=cfg.loader_threads,
            loader_nice=cfg.loader_nice,
            observer=self.observer, on_loaded=self._wake.set)
        # Warm-up: allocates the KV buffers (and lets kernels pick their paths) before the
        # first request, so nothing is allocated on the request path but per-step tensors.
        self._forward([KVChunk(0, 0, [0])], [0])

    def _step(self) -> bool:
        now = time.monotonic()
        self._run_commands()
        self._take_arrivals()
        for failure in self._pool.poll():
            self._fail_waiting(failure.digest, failure.error)
        self._reap(now)
        admitted = self._scheduler.pick(self._rows.free, self._place, now)
        decoded = self._decode()
        prefilled = self._prefill()
        if decoded or prefilled:
            self._steps += 1
            self._notify("on_step", decoded + prefilled, len(self._running),
                         len(self._scheduler))
        return bool(admitted or decoded or prefilled)

    # -- the hot path ----------------------------------------------------------------------
    def _decode(self) -> int:
        """One token for every sequence past its prompt; returns the rows run."""
        seqs = sorted((s for s in self._running if s.state == "decode"), key=lambda s: s.row)
        if not seqs:
            return 0  # (sorted by KV row: consecutive rows are read without a gather)
        chunks = [KVChunk(s.row, s.length - 1, [s.generated[-1]]) for s in seqs]
        logits = self._forward_or_fail(chunks, seqs)  # [B, V]
        if logits is not None:
            self._emit(seqs, logits)
        return len(seqs)

    def _prefill(self) -> int:
        """Prompt chunks of admitted sequences, oldest first, within `prefill_token_budget`
        padded tokens (B x Q): the oldest takes up to the budget, the others at most as
        many tokens as it (the rest of a prompt comes in later steps). A sequence whose
        prompt completes gets its first token."""
        budget = self.config.prefill_token_budget
        seqs: list[_Seq] = []
        chunks: list[KVChunk] = []
        q = budget  # tokens per row this step, set by the oldest
        for s in self._running:
            if s.state != "prefill":
                continue
            if seqs and (len(seqs) + 1) * q > budget:
                break
            n = min(len(s.prompt) - s.prefilled, q)
            q = n if not seqs else q
            chunks.append(KVChunk(s.row, s.prefilled, s.prompt[s.prefilled:s.prefilled + n]))
            seqs.append(s)
            if not s.t_prefill:
                s.t_prefill = time.monotonic()
        if not seqs:
            return 0
        logits = self._forward_or_fail(chunks, seqs)  # [B, V]
        if logits is None:
            return len(seqs)
        done_rows = []
        for i, (s, c) in enumerate(zip(seqs, chunks, strict=True)):
            s.prefilled += len(c.token_ids)
            if s.prefilled == len(s.prompt):
                s.state = "decode"
                done_rows.append(i)
        if done_rows:
            self._emit([seqs[i] for i in done_rows], logits[done_rows])
        return len(seqs)

    def _forward(self, chunks: list[KVChunk], slots: list[int]) -> torch.Tensor:
        """One model forward over `chunks`; `slots # [B]` adapter slot per row → `[B, V]`."""
        layout = build_layout(chunks, self.max_seq_len, self._device)
        self._kv.set_layout(layout.rows, layout.cache_pos, layout.kv_len, layout.first_row)
        self._injection.set_batch(slots)
        mask = self._mask(layout)
        with torch.inference_mode():
            out = self.model(input_ids=layout.input_ids, position_ids=layout.position_ids,
                             attention_mask=mask, cache=self._kv, use_cache=True,
                             logits_to_keep=1)
        return out.logits[:, -1].float()  # [B, V]

    def _mask(self, layout: Any) -> torch.Tensor | dict[str, torch.Tensor]:
        dtype = self.model.get_input_embeddings().weight.dtype
        full = layout.mask(boolean=self._bool_mask, dtype=dtype)  # [B, 1, Q, L]
        if self._sliding_window is None:
            return full
        keys = torch.arange(layout.kv_len, device=self._device)  # [L]
        # key k is within the window of position p iff k > p - window (p itself always is)
        near = keys[None, None, None, :] > layout.position_ids[:, None, :, None] \
            - self._sliding_window  # [B, 1, Q, L]
        if self._bool_mask:
            sliding = full & near
        else:
            sliding = full.masked_fill(~near, torch.finfo(dtype).min)
        if self._mask_per_type:
            return {"full_attention": full, "sliding_attention": sliding}
        return sliding

    def _forward_or_fail(self, chunks: list[KVChunk], seqs: list[_Seq]) -> torch.Tensor | None:
        try:
            return self._forward(chunks, [s.slot for s in seqs])
        except Exception as e:  # noqa: BLE001 - fail these sequences, keep serving
            log.exception("forward failed for %d sequences", len(seqs))
            err = e if isinstance(e, LoraplexError) else LoraplexError(
                f"internal error in the forward pass: {type(e).__name__}")
            for s in seqs:
                self._finish_error(s, err)
            return None

    def _emit(self, seqs: list[_Seq], logits: torch.Tensor) -> None:
        """Sample one token per row of `logits # [B, V]` and hand it to its sequence."""
        tokens = sample_next(logits, [s.params for s in seqs], [s.generator for s in seqs])
        now = time.monotonic()
        for s, t in zip(seqs, tokens, strict=True):
            self._append(s, t, now)

    def _append(self, s: _Seq, token: int, now: float) -> None:
        if not s.t_first:
            s.t_first = now
            self._notify("on_first_token", now - s.t_submit)
        else:
            self._notify("on_token", now - s.t_last)
        s.t_last = now
        if token in self._eos:
            self._finish(s, "stop")
            return
        s.generated.append(token)
        self._tokens += 1
        self._scheduler.charge(s.tenant, 1)
        text = s.tail.push([token])
        if s.tail.stopped:
            self._finish(s, "stop", text, [token])
        elif len(s.generated) >= s.params.max_new_tokens or s.length >= self.max_seq_len:
            self._finish(s, "length", text, [token])
        else:
            s.stream._publish(Chunk(text, [token]))

    # -- admission -------------------------------------------------------------------------
    def _place(self, ticket: Ticket) -> Placement:
        """Scheduler callback: start `ticket` if its adapter can be in a slot now."""
        s: _Seq = ticket.payload
        if s.state == "done":
            return Placement.DROPPED
        if self._rows.free == 0:
            return Placement.NO_CAPACITY
        slot = 0
        if s.version is not None:
            try:
                slot = self._pool.acquire(s.version.digest)
            except Exception as e:  # noqa: BLE001 - this adapter cannot go in: fail its request
                log.exception("activating adapter %s failed", s.version.ref)
                self._finish_error(s, e if isinstance(e, LoraplexError) else LoraplexError(
                    f"adapter {s.version.ref} could not be activated: {type(e).__name__}"))
                return Placement.DROPPED
            if slot is None:
                if self._pool.on_host(s.version.digest):
                    return Placement.NO_CAPACITY
                self._pool.ensure_loading(s.version)  # evicted from host before it got in
                return Placement.NOT_READY
            self._pool.unwant(s.version.digest)
        now = time.monotonic()
        s.row, s.slot, s.state, s.t_admit = self._rows.take(), slot, "prefill", now
        if s.version is not None and not s.adapter_at_hand:
            s.t_adapter = now
        self._running.append(s)
        self._notify("on_admitted", now - s.t_submit)
        return Placement.ADMITTED

    def _take_arrivals(self) -> None:
        while self._arrivals:
            s = self._arrivals.popleft()
            if s.version is not None and s.state == "waiting":
                d = s.version.digest
                s.adapter_at_hand = self._pool.slot_of(d) is not None or self._pool.on_host(d)
                self._pool.want(s.version)

    def _reap(self, now: float) -> None:
        """Finish cancelled and expired requests, running or waiting."""
        for s in list(self._running):
            if s.cancel_requested:
                self._finish(s, "cancelled")
            elif s.request.deadline is not None and now >= s.request.deadline:
                self._finish(s, "deadline")
        for ticket in self._scheduler.waiting():
            s = ticket.payload
            if s.cancel_requested:
                reason: FinishReason | None = "cancelled"
            elif s.request.deadline is not None and now >= s.request.deadline:
                reason = "deadline"
            else:
                reason = None
            if reason and self._scheduler.remove(s.id) is not None:
                self._finish(s, reason)

    def _fail_waiting(self, digest: str, error: LoraplexError) -> None:
        for ticket in self._scheduler.waiting():
            s = ticket.payload
            if s.digest == digest and self._scheduler.remove(s.id) is not None:
                self._finish_error(s, error)

    # -- finishing -------------------------------------------------------------------------
    def _finish(self, s: _Seq, reason: FinishReason, text: str = "",
                token_ids: list[int] | None = None) -> None:
        text += s.tail.flush()
        if text or token_ids:
            s.stream._publish(Chunk(text, list(token_ids or [])))
        self._release(s)
        now = time.monotonic()
        timings = Timings(
            queue_s=(s.t_admit or now) - s.t_submit,
            adapter_load_s=max(0.0, s.t_adapter - s.t_submit) if s.t_adapter else 0.0,
            prefill_s=(s.t_first - s.t_prefill) if s.t_first and s.t_prefill else 0.0,
            first_token_s=(s.t_first - s.t_submit) if s.t_first else 0.0,
            total_s=now - s.t_submit)
        result = GenerationResult(
            request_id=s.id, text=s.tail.text, token_ids=list(s.generated),
            finish_reason=reason,
            usage=Usage(prompt_tokens=len(s.prompt), completion_tokens=len(s.generated)),
            timings=timings, adapter=s.version)
        self._finished += 1
        s.stream._publish(result=result)
        self._notify("on_finished", result)

    def _finish_error(self, s: _Seq, error: LoraplexError) -> None:
        self._release(s)
        s.stream._publish(error=error)
        self._notify("on_failed", s.id, error.code)

    def _release(self, s: _Seq) -> None:
        """Free the sequence's KV row and adapter slot at once."""
        if s.state in ("prefill", "decode"):
            self._running.remove(s)
            self._rows.give(s.row)
            self._pool.release(s.slot)
            self._scheduler.finished(s.tenant)
        elif s.state == "waiting" and s.version is not None:
            self._pool.unwant(s.version.digest)
        s.state, s.row, s.slot = "done", None, 0
        with self._lock:
            self._live.pop(s.id, None)

    def _fail_running(self, error: LoraplexError) -> None:
        for s in list(self._running):
            self._finish_error(s, error)

    def _cancel_all(self) -> None:
        for s in list(self._running):
            self._finish(s, "cancelled")
        for ticket in self._scheduler.waiting():
            if self._scheduler.remove(ticket.request_id) is not None:
                self._finish(ticket.payload, "cancelled")
        while self._arrivals:
            self._arrivals.popleft()

    # -- adapters --------------------------------------------------------------------------
    def _load_adapter(self, version: AdapterVersion) -> HostAdapter:
        """Loader thread: registry read (digest-checked) → host tensors checked against the
        layers. Raises DataCorruption, IncompatibleAdapter, FailedPrecondition subclasses."""
        from loraplex.runtime.layers import parse_peft_key

        if self._load_hook is not None:
            self._load_hook(version)
        self._check_compatible(version)
        loaded = self.registry.load_adapter(version)
        tensors = {k: t.to(dtype=self._lora_dtype).contiguous()
                   for k, t in loaded.tensors.items()}
        if self._device.type == "cuda":
            tensors = {k: t.pin_memory() for k, t in tensors.items()}
        problems = []
        for key, t in tensors.items():
            parsed = parse_peft_key(key)
            layer = self._injection.layers.get(parsed[0]) if parsed else None
            if layer is None:
                problems.append(f"{key!r} targets no LoRA layer of this engine")
            elif parsed[1] == "lora_A":
                layer.check_shapes(t, tensors[key.replace("lora_A", "lora_B")])
        if problems:
            raise FailedPrecondition(f"adapter {version.ref} does not fit this engine: "
                                     + "; ".join(problems[:5]), field="adapter")
        return HostAdapter(digest=version.digest, ref=version.ref, tensors=tensors,
                           rank=version.rank, alpha=version.alpha,
                           use_rslora=version.use_rslora,
                           rank_pattern=loaded.config.get("rank_pattern") or None,
                           alpha_pattern=loaded.config.get("alpha_pattern") or None)

    def _write_slot(self, slot: int, host: HostAdapter) -> None:
        self._injection.load_adapter(slot, host.tensors, host.rank, host.alpha,
                                     host.use_rslora, rank_pattern=host.rank_pattern,
                                     alpha_pattern=host.alpha_pattern)

    # -- validation (caller thread) ----------------------------------------------------------
    def _admit_request(self, request: GenerationRequest) -> _Seq:
        if not self.ready:
            raise Unavailable("engine is not ready" if not self._stop else "engine is stopped")
        if self._draining:
            raise Unavailable("engine is draining; not accepting requests")
        rid = request.request_id
        if not isinstance(rid, str) or not rid or len(rid) > 256:
            raise InvalidArgument("`request_id` must be a non-empty string of at most 256 "
                                  "characters", field="request_id")
        if getattr(request.identity, "tenant", None) is None:
            raise InvalidArgument("`identity` is required", field="identity")
        prompt = self._prompt_ids(request)
        validate_sampling(request.sampling, max_new_tokens_limit=self.config.max_new_tokens_limit)
        if request.deadline is not None and not isinstance(request.deadline, int | float):
            raise InvalidArgument("`deadline` must be time.monotonic() seconds", field="deadline")
        version = None
        if request.adapter:
            version = self._resolve(request.identity, request.adapter)
        s = _Seq(request=request, stream=RequestStream(rid, self.cancel), prompt=prompt,
                 version=version, tail=TextTail(self.tokenizer, request.sampling.stop),
                 generator=make_generator(request.sampling, self._device),
                 t_submit=time.monotonic())
        with self._lock:
            if self._closed:
                raise Unavailable("engine is stopped")
            if rid in self._live:
                raise AlreadyExists(f"request {rid!r} is already in flight", field="request_id")
            self._scheduler.push(Ticket(rid, s.tenant, s, s.t_submit, cost=len(prompt),
                                        budget=len(prompt) + request.sampling.max_new_tokens))
            self._live[rid] = s
            self._arrivals.append(s)
        return s

    def _prompt_ids(self, request: GenerationRequest) -> list[int]:
        if (request.prompt is None) == (request.prompt_ids is None):
            raise InvalidArgument("give exactly one of `prompt` and `prompt_ids`",
                                  field="prompt")
        if request.prompt is not None:
            if not isinstance(request.prompt, str):
                raise InvalidArgument("`prompt` must be a string", field="prompt")
            ids = list(self.tokenizer(request.prompt)["input_ids"]) if request.prompt else []
            name = "prompt"
        else:
            ids, name = list(request.prompt_ids), "prompt_ids"
            if any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self._vocab
                   for i in ids):
                raise InvalidArgument(f"`prompt_ids` must be token ids in [0, {self._vocab})",
                                      field="prompt_ids")
        if not ids:
            raise InvalidArgument(f"`{name}` is empty", field=name)
        if len(ids) >= self.max_seq_len:
            raise InvalidArgument(f"`{name}` has {len(ids)} tokens; the context holds "
                                  f"{self.max_seq_len} including at least one generated token",
                                  field=name)
        return ids

    def _resolve(self, identity: Identity, ref: str) -> AdapterVersion:
        if not self.ready:
            raise Unavailable("engine is not ready")
        if self.registry is None:
            raise NotFound(f"adapter {ref!r}: this engine has no registry", field="adapter")
        version = self.registry.resolve(identity, ref)  # NotFound, InvalidArgument
        self._check_compatible(version)
        return version

    def _check_compatible(self, version: AdapterVersion) -> None:
        if self.fingerprint is not None and version.base.digest != self.fingerprint.digest:
            raise IncompatibleAdapter(
                f"adapter {version.ref} was made for base {version.base.summary()}, this "
                f"engine serves {self.fingerprint.summary()}", field="adapter")
        if version.rank > self.config.max_rank:
            raise FailedPrecondition(f"adapter {version.ref} has rank {version.rank}; this "
                                     f"engine serves up to max_rank {self.config.max_rank}",
                                     field="adapter")

    # -- plumbing ----------------------------------------------------------------------------
    def _call(self, fn: Callable[[], Any], timeout: float | None = 60.0) -> Any:
        """Run `fn` on the engine thread and return its result (admin calls)."""
        if self._thread is None or not self._thread.is_alive() or not self._ready.is_set():
            raise Unavailable("engine is not running")
        fut: Future = Future()
        self._commands.append((fn, fut))
        self._wake.set()
        return fut.result(timeout)

    def _run_commands(self) -> None:
        for _ in range(len(self._commands)):
            fn, fut = self._commands.popleft()
            try:
                fut.set_result(fn())
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                fut.set_exception(e)

    def _notify(self, hook: str, *args: Any) -> None:
        try:
            getattr(self.observer, hook)(*args)
        except Exception:  # noqa: BLE001 - metrics never take the engine down
            log.exception("observer.%s failed", hook)


# ------------------------------------------------------------------------------ helpers


def _load_model(cfg: EngineConfig) -> tuple[Any, Any, BaseFingerprint, torch.device]:
    """(model, tokenizer, fingerprint, device) for the configured base."""
    from transformers import AutoTokenizer

    from loraplex.fingerprint import fingerprint_base

    device = torch.device(cfg.device if cfg.device != "auto"
                          else ("cuda" if torch.cuda.is_available() else "cpu"))
    if cfg.compute_dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = _DTYPES[cfg.compute_dtype]
    try:
        from loraplex.runtime.base import load_base
    except ImportError:
        load_base = None
    if load_base is not None:
        loaded = load_base(cfg.base_dir, quantization=cfg.quantization, compute_dtype=dtype,
                           device=device)
        model = loaded.model
        tokenizer = getattr(loaded, "tokenizer", None) or AutoTokenizer.from_pretrained(
            cfg.base_dir)
        fp = getattr(loaded, "fingerprint", None) or fingerprint_base(cfg.base_dir)
    else:  # until runtime/base.py lands: unquantized only
        if cfg.quantization != "none":
            raise FailedPrecondition("quantized bases need loraplex.runtime.base",
                                     field="quantization")
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(cfg.base_dir, dtype=dtype,
                                                     attn_implementation="sdpa").to(device)
        tokenizer = AutoTokenizer.from_pretrained(cfg.base_dir)
        fp = fingerprint_base(cfg.base_dir)
    model.eval()
    return model, tokenizer, fp, device


class _LockedTokenizer:
    """The tokenizer behind one lock: `submit` encodes on callers' threads while the engine
    thread decodes, and a fast tokenizer must not be borrowed mutably meanwhile."""

    def __init__(self, tokenizer: Any) -> None:
        self.inner = tokenizer
        self._lock = threading.Lock()

    def __call__(self, text: str) -> Any:
        with self._lock:
            return self.inner(text)

    def decode(self, ids: list[int]) -> str:
        with self._lock:
            return self.inner.decode(ids)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    for src in (getattr(model, "generation_config", None), model.config, tokenizer):
        v = getattr(src, "eos_token_id", None) if src is not None else None
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, list | tuple):
            ids.update(int(x) for x in v)
    return frozenset(ids)
