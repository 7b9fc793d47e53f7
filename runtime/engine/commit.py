"""After a forward: tokens become text, stop strings and limits end sequences, results.

Text comes from the sequence's incremental `Detokenizer`: a chunk carries only whole
characters (never half an emoji split across byte-level tokens, never U+FFFD), the chunks
concatenate to the result's text, and a stop string is cut exactly where it starts, even in
the middle of a token.

`Seq` is one request's state inside the engine (engine thread only). `take_token` applies one
sampled token to it and says whether the sequence ends and with what text; `result_of` builds
the `GenerationResult` a finished sequence reports. Nothing here touches the model, the pool
or a lock: the engine core calls these and publishes to the streams.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from loraplex.runtime.api.types import (
    FinishReason,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
    Timings,
    Usage,
)
from loraplex.runtime.decoding.detokenize import Detokenizer
from loraplex.runtime.decoding.grammar import GrammarState
from loraplex.runtime.engine.plan import RunView
from loraplex.runtime.engine.stream import RequestStream

if TYPE_CHECKING:
    from loraplex.registry import AdapterVersion


@dataclass(eq=False)
class Seq:
    """One request inside the engine."""

    request: GenerationRequest
    stream: RequestStream
    detok: Detokenizer  # generated ids -> whole-character text, stop strings cut
    generator: torch.Generator | None
    t_submit: float
    state: str = "waiting"  # waiting | running | done
    row: int | None = None  # KV row while running
    slot: int = 0  # adapter slot while running (0 = none)
    prefilled: int = 0  # prompt tokens in the KV cache
    generated: list[int] = field(default_factory=list)
    cancel_requested: bool = False
    wanted: bool = False  # counted in the pool's `want` (keeps its adapter on host)
    adapter_at_hand: bool = True  # in a slot or on host at arrival
    t_admit: float = 0.0
    t_adapter: float = 0.0  # when the adapter reached a slot (if it had to be loaded)
    t_prefill: float = 0.0
    t_first: float = 0.0
    t_last: float = 0.0
    grammar: GrammarState | None = None  # the request's constraint, advanced per token

    @property
    def id(self) -> str:
        return self.request.request_id

    @property
    def tenant(self) -> str:
        return self.request.tenant

    @property
    def version(self) -> AdapterVersion | None:
        return self.request.adapter

    @property
    def digest(self) -> str | None:
        return self.version.digest if self.version is not None else None

    @property
    def prompt(self) -> Sequence[int]:
        return self.request.prompt_ids

    @property
    def params(self) -> SamplingParams:
        return self.request.sampling

    @property
    def length(self) -> int:
        """Tokens in the sequence (prompt + generated)."""
        return len(self.prompt) + len(self.generated)

    def view(self) -> RunView:
        return RunView(self.row, self.prompt, self.prefilled,
                       self.generated[-1] if self.generated else None, self.length)


@dataclass(frozen=True)
class TokenOutcome:
    text: str  # newly final text (stop strings cut)
    token_ids: list[int]  # the token, unless it was EOS
    finish: FinishReason | None  # set when the sequence ends with this token


def take_token(s: Seq, token: int, eos: frozenset[int], max_seq_len: int) -> TokenOutcome:
    """Apply one sampled token: EOS ends with "stop" (left out of the output), a completed
    stop string ends with "stop" (cut from the text), the token or context limit with
    "length". Under a grammar (whose mask allowed EOS only where it accepts): a token it
    cannot take ends with "grammar", a complete match that allows nothing more with "stop"."""
    if token in eos:
        return TokenOutcome("", [], "stop")
    s.generated.append(token)
    text = s.detok.feed([token])
    if s.grammar is not None and not s.grammar.advance(token):
        return TokenOutcome(text, [token], "grammar")
    if s.detok.stopped:
        return TokenOutcome(text, [token], "stop")
    if s.grammar is not None and s.grammar.done:
        return TokenOutcome(text, [token], "stop")
    if len(s.generated) >= s.params.max_new_tokens or s.length >= max_seq_len:
        return TokenOutcome(text, [token], "length")
    return TokenOutcome(text, [token], None)


def result_of(s: Seq, reason: FinishReason, now: float) -> GenerationResult:
    timings = Timings(
        queue_s=(s.t_admit or now) - s.t_submit,
        adapter_load_s=max(0.0, s.t_adapter - s.t_submit) if s.t_adapter else 0.0,
        prefill_s=(s.t_first - s.t_prefill) if s.t_first and s.t_prefill else 0.0,
        first_token_s=(s.t_first - s.t_submit) if s.t_first else 0.0,
        total_s=now - s.t_submit)
    return GenerationResult(
        request_id=s.id, text=s.detok.text, token_ids=list(s.generated), finish_reason=reason,
        usage=Usage(prompt_tokens=len(s.prompt), completion_tokens=len(s.generated)),
        timings=timings, adapter=s.version)
