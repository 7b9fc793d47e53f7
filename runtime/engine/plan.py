"""One engine step as plain data: what the scheduler decided, nothing that calls back.

    plan = scheduler.schedule(now, free_rows, residency, running, prefill_budget)
    activation = pool.activate_for(plan.admitted)  # host -> device slot copies, per digest
    outputs = runner.run(plan.decode, ..., plan.prefill, ...)
    commit(outputs)                            # sampling, stop strings, streams

Every type here is a frozen snapshot: the scheduler reads the pool's `Residency` (what it holds)
and `RunView`s (what the running sequences need next) and answers with a `StepPlan`; it
never asks the pool or the engine anything while it decides (vLLM's `SchedulerOutput`).
A running sequence is named by its KV row, unique among running sequences.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from loraplex.runtime.kv.cache import RowFeed
from loraplex.runtime.lora.pool import Residency

__all__ = ["Admit", "Residency", "RunView", "StepPlan", "compose_batch"]


@dataclass(frozen=True)
class RunView:
    """A running sequence as batch composition needs it."""

    row: int  # KV row
    prompt: Sequence[int]
    prefilled: int  # prompt tokens already in the KV cache
    last_token: int | None  # the newest generated token (None while prefilling)
    length: int  # prompt + generated tokens

    @property
    def prefilling(self) -> bool:
        return self.prefilled < len(self.prompt)


@dataclass(frozen=True)
class Admit:
    """A waiting request that joins the batch this step, on KV row `row`."""

    request_id: str
    tenant: str
    digest: str | None  # adapter to hold in a slot (None: the bare base)
    row: int


@dataclass(frozen=True)
class StepPlan:
    admitted: tuple[Admit, ...] = ()
    decode: tuple[RowFeed, ...] = ()  # one token per decoding row, sorted by row
    prefill: tuple[RowFeed, ...] = ()  # prompt chunks within the prefill budget
    activate: tuple[str, ...] = ()  # digests to copy host -> slot before the forward
    load: tuple[str, ...] = ()  # digests waiting requests need, neither resident nor loading
    dropped: tuple[str, ...] = ()  # request ids whose deadline passed while they waited

    @property
    def idle(self) -> bool:
        return not (self.admitted or self.decode or self.prefill or self.dropped)

    def skip_cached(self, row: int, prompt: Sequence[int], cached: int) -> StepPlan:
        """The plan with `row`'s prefill chunk starting after its `cached` prompt positions
        (taken from the prefix cache), no longer than it was."""
        from dataclasses import replace

        feeds = tuple(RowFeed(row, cached, prompt[cached:cached + len(f.token_ids)])
                      if f.row == row else f for f in self.prefill)
        return replace(self, prefill=feeds)

    def without_rows(self, rows: set[int]) -> StepPlan:
        """The plan minus the feeds of `rows` (requests whose adapter failed to activate)."""
        if not rows:
            return self
        from dataclasses import replace

        return replace(self, decode=tuple(f for f in self.decode if f.row not in rows),
                       prefill=tuple(f for f in self.prefill if f.row not in rows))


def compose_batch(running: Sequence[RunView], prefill_budget: int
                  ) -> tuple[tuple[RowFeed, ...], tuple[RowFeed, ...]]:
    """(decode feeds, prefill feeds) for one step.

    Decode: the last token of every sequence past its prompt, sorted by KV row (consecutive
    rows are read without a gather). Prefill: prompt chunks in `running` order (oldest
    first) within `prefill_budget` padded tokens (B x Q): the oldest takes up to the budget,
    the others at most as many tokens as it; the rest of a prompt comes in later steps, so
    joining sequences never stall the running ones for long.
    """
    decode = tuple(sorted((RowFeed(v.row, v.length - 1, [v.last_token])
                           for v in running if not v.prefilling and v.last_token is not None),
                          key=lambda f: f.row))
    prefill: list[RowFeed] = []
    q = prefill_budget  # tokens per row this step, set by the oldest
    for v in running:
        if not v.prefilling:
            continue
        if prefill and (len(prefill) + 1) * q > prefill_budget:
            break
        n = min(len(v.prompt) - v.prefilled, q)
        q = n if not prefill else q
        prefill.append(RowFeed(v.row, v.prefilled, v.prompt[v.prefilled:v.prefilled + n]))
    return decode, tuple(prefill)
