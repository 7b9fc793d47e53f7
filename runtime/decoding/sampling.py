"""Token choice and stopping, one request at a time.

`validate_sampling` checks user values (typed errors naming the field); `sample_next` picks
the next token of every row from the step's last-position logits (greedy rows in one
argmax, sampled rows each with their own `torch.Generator`, so a seeded request gives the
same tokens whatever else shares its batch). Token ids become text in
`runtime/decoding/detokenize.py` (whole characters only, stop strings held back and cut).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence

import torch

from loraplex.errors import InvalidArgument
from loraplex.runtime.api.types import SamplingParams

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
