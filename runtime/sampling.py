"""Token choice and stopping, one request at a time.

`validate_sampling` checks user values (typed errors naming the field); `sample_next` picks
the next token of every row from the step's last-position logits (greedy rows in one
argmax, sampled rows each with their own `torch.Generator`, so a seeded request gives the
same tokens whatever else shares its batch); `TextTail` turns token ids into text
incrementally and finds stop strings, holding back text that could still become one.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from loraplex.errors import InvalidArgument
from loraplex.runtime.types import SamplingParams

MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256


def validate_sampling(p: SamplingParams, *, max_new_tokens_limit: int) -> None:
    """Raise InvalidArgument (field = `sampling.<name>`) for the first out-of-range value."""

    def bad(name: str, msg: str) -> InvalidArgument:
        return InvalidArgument(f"`{name}` {msg}", field=f"sampling.{name}")

    if isinstance(p.max_new_tokens, bool) or not isinstance(p.max_new_tokens, int):
        raise bad("max_new_tokens", "must be an integer")
    if p.max_new_tokens <= 0:
        raise bad("max_new_tokens", "must be > 0")
    if p.max_new_tokens > max_new_tokens_limit:
        raise bad("max_new_tokens", f"must be <= {max_new_tokens_limit} (server limit)")
    if not isinstance(p.temperature, int | float) or not math.isfinite(p.temperature) \
            or p.temperature < 0 or p.temperature > 100:
        raise bad("temperature", "must be a number in [0, 100]")
    if isinstance(p.top_k, bool) or not isinstance(p.top_k, int) or p.top_k < 0:
        raise bad("top_k", "must be an integer >= 0 (0 = off)")
    if not isinstance(p.top_p, int | float) or not math.isfinite(p.top_p) \
            or not 0 < p.top_p <= 1:
        raise bad("top_p", "must be in (0, 1]")
    if p.seed is not None and (isinstance(p.seed, bool) or not isinstance(p.seed, int)
                               or not 0 <= p.seed < 2**63):
        raise bad("seed", "must be an integer in [0, 2**63)")
    if len(p.stop) > MAX_STOP_STRINGS:
        raise bad("stop", f"allows at most {MAX_STOP_STRINGS} strings")
    for s in p.stop:
        if not isinstance(s, str) or not s:
            raise bad("stop", "entries must be non-empty strings")
        if len(s) > MAX_STOP_CHARS:
            raise bad("stop", f"entries must be at most {MAX_STOP_CHARS} characters")


def make_generator(p: SamplingParams, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A private generator for a sampled request (seeded, or from OS entropy); None if greedy."""
    if p.greedy:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(p.seed if p.seed is not None else secrets.randbits(63))
    return g


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int,
                  top_p: float) -> torch.Tensor:
    """`logits # [V]` → probabilities `[V]` after temperature, top-k, then top-p (nucleus)."""
    scores = logits.float() / temperature  # [V]
    if 0 < top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)  # [V]
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)  # [V], [V]
        before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # mass strictly above each token
        sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)  # keeps at least the top token
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        probs = probs / probs.sum()
    return probs


def sample_next(logits: torch.Tensor, params: Sequence[SamplingParams],
                generators: Sequence[torch.Generator | None]) -> list[int]:
    """`logits # [B, V]` (each row's next-token logits) → one token id per row."""
    out = torch.argmax(logits, dim=-1).tolist()  # [B]: right for every greedy row
    for i, (p, g) in enumerate(zip(params, generators, strict=True)):
        if p.greedy:
            continue
        probs = filter_logits(logits[i], p.temperature, p.top_k, p.top_p)  # [V]
        out[i] = int(torch.multinomial(probs, 1, generator=g).item())
    return out


@dataclass
class TextTail:
    """Incremental detokenization with stop strings.

    `push(ids)` returns the text that became final. Text is held back while it ends in an
    incomplete UTF-8 sequence or in the beginning of a stop string, so the emitted text
    never contains a stop string, even when one spans several tokens or chunks.
    """

    tokenizer: object
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.ids: list[int] = []
        self.text = ""  # decoded so far (complete characters only)
        self.emitted = 0  # characters of `text` already returned
        self.stopped = False
        self._prefix = 0  # TGI-style offsets: decode ids[_prefix:] and diff against
        self._read = 0  # the decode of ids[_prefix:_read]

    def push(self, ids: Sequence[int]) -> str:
        """Append generated ids; return newly final text ("" while holding back)."""
        if self.stopped:
            return ""
        self.ids.extend(ids)
        prefix_text = self.tokenizer.decode(self.ids[self._prefix:self._read])
        new_text = self.tokenizer.decode(self.ids[self._prefix:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self.text += new_text[len(prefix_text):]
            self._prefix, self._read = self._read, len(self.ids)
        if self.stop:
            cut = self._find_stop()
            if cut is not None:
                self.stopped = True
                self.text = self.text[:cut]
                return self._emit(len(self.text))
        return self._emit(max(self.emitted, len(self.text) - self._partial_stop()))

    def flush(self) -> str:
        """At the end (length, EOS, cancel): release whatever is held back."""
        return self._emit(len(self.text))

    def _partial_stop(self) -> int:
        """Length of the longest end of `text` that could still grow into a stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best

    def _find_stop(self) -> int | None:
        # Emitted text holds no stop string, and one ending in it would have been seen then.
        hits = [i for s in self.stop if (i := self.text.find(s, self.emitted)) >= 0]
        return min(hits) if hits else None

    def _emit(self, upto: int) -> str:
        out = self.text[self.emitted:upto]
        self.emitted = max(self.emitted, upto)
        return out
