"""The engine thread's step: plain data flowing one way.

    inbox → reap (cancel) → plan = scheduler.schedule(...) → pool.activate_for(plan.admitted)
          → runner.run(plan feeds) → commit(outputs) → streams, gauges

`Inbox` is the only state caller threads share with the engine thread: the requests in
flight, new arrivals, cancel flags and admin commands, behind one lock that is held only
for dict/deque operations (and `Scheduler.push`, whose lock is a leaf). `EngineCore` owns
everything else — sequences, pool, runner, KV rows — and touches it only on the engine
thread, so no object calls back into another while holding a lock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from loraplex.errors import AlreadyExists, LoraplexError, Unavailable, quote
from loraplex.runtime.api.observer import EngineObserver, notify
from loraplex.runtime.api.types import Chunk, FinishReason
from loraplex.runtime.decoding.grammar import mask_logits
from loraplex.runtime.decoding.sampling import sample_next
from loraplex.runtime.engine.commit import Seq, result_of, take_token
from loraplex.runtime.engine.plan import StepPlan
from loraplex.runtime.engine.scheduler import Scheduler, Ticket
from loraplex.runtime.model.runner import Forward, StepOutputs

if TYPE_CHECKING:
    from loraplex.runtime.api.types import EngineConfig
    from loraplex.runtime.lora.pool import AdapterPool
    from loraplex.runtime.model.runner import Runner

log = logging.getLogger(__name__)


class Inbox:
    """Requests in flight and work for the engine thread (any thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._live: dict[str, Seq] = {}
        self._arrivals: deque[Seq] = deque()
        self._commands: deque[tuple[Callable[[], Any], Future]] = deque()
        self._closed = False

    def add(self, s: Seq, scheduler: Scheduler) -> None:
        """Queue `s`: AlreadyExists (id in flight), Overloaded / ResourceExhausted (queue),
        Unavailable (engine stopped)."""
        ticket = Ticket(s.id, s.tenant, s.digest, s.prompt, s.t_submit, cost=len(s.prompt),
                        budget=len(s.prompt) + s.params.max_new_tokens,
                        deadline=s.request.deadline)
        with self._lock:
            if self._closed:
                raise Unavailable("engine is stopped")
            if s.id in self._live:
                raise AlreadyExists(f"request {quote(s.id)} is already in flight", field="request_id")
            scheduler.push(ticket)
            self._live[s.id] = s
            self._arrivals.append(s)

    def cancel(self, request_id: str) -> bool:
        with self._lock:
            s = self._live.get(request_id)
            if s is None or s.cancel_requested:
                return False
            s.cancel_requested = True
            return True

    def command(self, fn: Callable[[], Any]) -> Future:
        fut: Future = Future()
        with self._lock:
            if self._closed:
                fut.set_exception(Unavailable("engine is stopped"))
            else:
                self._commands.append((fn, fut))
        return fut

    def take(self) -> tuple[list[Seq], list[tuple[Callable[[], Any], Future]]]:
        with self._lock:
            arrivals, commands = list(self._arrivals), list(self._commands)
            self._arrivals.clear()
            self._commands.clear()
        return arrivals, commands

    def get(self, request_id: str) -> Seq | None:
        with self._lock:
            return self._live.get(request_id)

    def forget(self, request_id: str) -> None:
        with self._lock:
            self._live.pop(request_id, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._live)

    def close(self) -> tuple[list[Seq], list[tuple[Callable[[], Any], Future]]]:
        """Refuse everything from now on; what was still in flight or queued."""
        with self._lock:
            self._closed = True
            late, commands = list(self._live.values()), list(self._commands)
            self._live.clear()
            self._arrivals.clear()
            self._commands.clear()
        return late, commands


class EngineCore:
    """Engine-thread state and the step (see the module docstring)."""

    def __init__(self, config: EngineConfig, runner: Runner, pool: AdapterPool,
                 scheduler: Scheduler, inbox: Inbox, observer: EngineObserver) -> None:
        self.config = config
        self.runner = runner
        self.pool = pool
        self.scheduler = scheduler
        self.inbox = inbox
        self.observer = observer
        self.running: list[Seq] = []  # admission order
        self._waiting: dict[str, Seq] = {}  # taken from the inbox, not admitted yet
        self.steps = 0
        self.tokens = 0
        self.finished = 0
        self._occupancy = (0, 0)

    # -- the step --------------------------------------------------------------------------
    def step(self) -> bool:
        """One step; True when it did work (the caller sleeps otherwise)."""
        now = time.monotonic()
        arrivals, commands = self.inbox.take()
        self._arrive(arrivals)
        for fn, fut in commands:
            _run_command(fn, fut)
        for failure in self.pool.poll():
            self._fail_waiting(failure.digest, failure.error)
        self._reap(now)
        plan = self.scheduler.schedule(now, self.runner.rows.free_rows(), self.pool.residency(),
                                       [s.view() for s in self.running],
                                       self.config.prefill_token_budget)
        plan = self._apply(plan, now)
        self._mark_prefill(plan)
        outputs = self.runner.run(plan.decode, self._slots(plan.decode),
                                  plan.prefill, self._slots(plan.prefill))
        self._commit(outputs)
        self.runner.compact_kv()  # once for every row this step released
        if outputs.rows:
            self.steps += 1
            self._notify("on_step", outputs.rows, len(self.running), len(self.scheduler))
        self.publish_occupancy()
        return not plan.idle

    def _arrive(self, arrivals: list[Seq]) -> None:
        for s in arrivals:
            if s.state != "waiting":
                continue
            self._waiting[s.id] = s
            if s.version is not None:
                d = s.version.digest
                s.adapter_at_hand = self.pool.slot_of(d) is not None or self.pool.on_host(d)
                self.pool.want(s.version)
                s.wanted = True

    def _apply(self, plan: StepPlan, now: float) -> StepPlan:
        """Loads, expiries and admissions of `plan`; returns it minus the rows whose
        adapter failed to activate."""
        for d in plan.load:
            version = next((s.version for s in self._waiting.values() if s.digest == d), None)
            if version is not None:
                self.pool.ensure_loading(version)
        for rid in plan.dropped:
            s = self._seq(rid)
            if s is not None:
                self._finish(s, "deadline")
        activation = self.pool.activate_for(plan.admitted)
        failed_rows: set[int] = set()
        for a in plan.admitted:
            s = self._seq(a.request_id)
            if s is None:  # pragma: no cover - a ticket always has its sequence in the inbox
                log.error("admitted request %s has no sequence", a.request_id)
                failed_rows.add(a.row)
                self.scheduler.finished(a.tenant)
                self.pool.release(activation.slots.get(a.request_id, 0))
                continue
            self._waiting.pop(a.request_id, None)
            self._unwant(s)
            if a.request_id in activation.failed:
                failed_rows.add(a.row)
                self.scheduler.finished(s.tenant)
                self._finish_error(s, activation.failed[a.request_id])
                continue
            self.runner.rows.claim(a.row)
            s.row, s.slot, s.state, s.t_admit = a.row, activation.slots[a.request_id], \
                "running", now
            if s.version is not None and not s.adapter_at_hand:
                s.t_adapter = now
            self.running.append(s)
            self._notify("on_admitted", now - s.t_submit)
            self._notify("on_request_progress", s.id, "admitted", now - s.t_submit)
            s.prefilled = self.runner.reuse_prefix(s.row, s.tenant, s.digest, s.prompt)
            if s.prefilled:
                plan = plan.skip_cached(s.row, s.prompt, s.prefilled)
        return plan.without_rows(failed_rows)

    def _mark_prefill(self, plan: StepPlan) -> None:
        rows = {f.row for f in plan.prefill}
        now = time.monotonic()
        for s in self.running:
            if s.row in rows and not s.t_prefill:
                s.t_prefill = now

    def _seq(self, request_id: str) -> Seq | None:
        """A waiting sequence; one whose ticket the scheduler saw before this thread took
        its arrival from the inbox is taken now."""
        s = self._waiting.get(request_id)
        if s is None:
            s = self.inbox.get(request_id)
            if s is not None:
                self._arrive([s])
        return s

    def _slots(self, feeds: Any) -> list[int]:
        by_row = {s.row: s.slot for s in self.running}
        return [by_row[f.row] for f in feeds]

    # -- commit ----------------------------------------------------------------------------
    def _commit(self, out: StepOutputs) -> None:
        """Sample a token for every decode row and every row whose prompt completed."""
        by_row = {s.row: s for s in self.running}
        self._commit_forward(out.decode, [by_row[f.row] for f in out.decode.feeds], None)
        seqs = [by_row[f.row] for f in out.prefill.feeds]
        self._commit_forward(out.prefill, seqs, [len(f.token_ids) for f in out.prefill.feeds])

    def _commit_forward(self, fwd: Forward, seqs: list[Seq], fed: list[int] | None) -> None:
        if not seqs:
            return
        if fwd.error is not None:
            for s in seqs:
                self._finish_error(s, fwd.error)
            return
        idx = list(range(len(seqs)))
        if fed is not None:  # prefill: only rows whose prompt is now complete sample
            for s, n in zip(seqs, fed, strict=True):
                s.prefilled += n
                self.runner.share_prefix(s.row, s.tenant, s.digest, s.prompt,
                                          s.prefilled)
            idx = [i for i, s in enumerate(seqs) if s.prefilled == len(s.prompt)]
            if not idx:
                return
        done = [seqs[i] for i in idx]
        # the forward's logits are this step's own: masked in place when every row samples
        # (a decode step), copied only for the rows that do (32 x 49152 fp32: ~1 ms)
        own = fwd.logits if len(idx) == len(seqs) else fwd.logits[idx]  # [B, V]
        logits = mask_logits(own, [s.grammar for s in done])  # [B, V]
        tokens = sample_next(logits, [s.params for s in done],
                             [s.generator for s in done])  # logits [B, V]
        now = time.monotonic()
        for s, t in zip(done, tokens, strict=True):
            self._append(s, t, now)

    def _append(self, s: Seq, token: int, now: float) -> None:
        if not s.t_first:
            s.t_first = now
            self._notify("on_first_token", now - s.t_submit)
            self._notify("on_request_progress", s.id, "first_token", now - s.t_submit)
        else:
            self._notify("on_token", now - s.t_last)
            self._notify("on_request_progress", s.id, "token", now - s.t_last)
        s.t_last = now
        out = take_token(s, token, self.runner.eos, self.runner.max_seq_len)
        if out.token_ids:
            self.tokens += 1
            self.scheduler.charge(s.tenant, 1)
        if out.finish is not None:
            self._finish(s, out.finish, out.text, out.token_ids)
        else:
            s.stream.publish(Chunk(out.text, out.token_ids))

    # -- ending sequences ------------------------------------------------------------------
    def _reap(self, now: float) -> None:
        """Finish cancelled requests (running or waiting) and running ones past deadline;
        waiting ones past deadline the scheduler drops."""
        for s in list(self.running):
            if s.cancel_requested:
                self._finish(s, "cancelled")
            elif s.request.deadline is not None and now >= s.request.deadline:
                self._finish(s, "deadline")
        for s in [s for s in self._waiting.values() if s.cancel_requested]:
            if self.scheduler.remove(s.id) is not None:
                self._finish(s, "cancelled")

    def _fail_waiting(self, digest: str, error: LoraplexError) -> None:
        for s in [s for s in self._waiting.values() if s.digest == digest]:
            if self.scheduler.remove(s.id) is not None:
                self._finish_error(s, error)

    def _finish(self, s: Seq, reason: FinishReason, text: str = "",
                token_ids: list[int] | None = None) -> None:
        text += s.detok.finish()
        if text or token_ids:
            s.stream.publish(Chunk(text, list(token_ids or [])))
        self._release(s)
        result = result_of(s, reason, time.monotonic())
        self.finished += 1
        s.stream.publish(result=result)
        self._notify("on_finished", result)

    def _finish_error(self, s: Seq, error: LoraplexError) -> None:
        self._release(s)
        s.stream.publish(error=error)
        self._notify("on_failed", s.id, error.code)

    def _release(self, s: Seq) -> None:
        """Free the sequence's KV row (and its KV blocks) and adapter slot at once."""
        if s.state == "running":
            self.running.remove(s)
            self.runner.release_row(s.row, compact=False)  # compacted at the step's end
            self.pool.release(s.slot)
            self.scheduler.finished(s.tenant)
        self._waiting.pop(s.id, None)
        self._unwant(s)
        s.state, s.row, s.slot = "done", None, 0
        self.inbox.forget(s.id)

    def _unwant(self, s: Seq) -> None:
        if s.wanted:
            s.wanted = False
            self.pool.unwant(s.digest)

    def fail_running(self, error: LoraplexError) -> None:
        for s in list(self.running):
            self._finish_error(s, error)

    def cancel_all(self) -> None:
        """Shutdown: every running and waiting request ends "cancelled"."""
        arrivals, commands = self.inbox.take()
        self._arrive(arrivals)
        for _fn, fut in commands:
            fut.set_exception(Unavailable("engine is stopped"))
        for s in list(self.running):
            self._finish(s, "cancelled")
        for s in list(self._waiting.values()):
            self.scheduler.remove(s.id)
            self._finish(s, "cancelled")
        self.publish_occupancy()

    def publish_occupancy(self) -> None:
        """Tell the observer (gauges) whenever running/waiting changed, forward or not."""
        now = (len(self.running), len(self.scheduler))
        if now != self._occupancy:
            self._occupancy = now
            self._notify("on_occupancy", *now)

    def _notify(self, hook: str, *args: Any) -> None:
        notify(self.observer, hook, *args)


def _run_command(fn: Callable[[], Any], fut: Future) -> None:
    try:
        fut.set_result(fn())
    except BaseException as e:  # noqa: BLE001 - handed to the caller
        fut.set_exception(e)
