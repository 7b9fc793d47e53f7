"""What a request and an adapter must fit on this engine, known once the base is loaded.

Shared by the edge's intake (resolve, tokenize, validate), the engine, and the adapter
pool's host loader, which checks every version again before it reads its tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from loraplex.errors import FailedPrecondition, IncompatibleAdapter

if TYPE_CHECKING:
    from loraplex.fingerprint import BaseFingerprint
    from loraplex.registry import AdapterVersion


# A token of ordinary text is a few bytes; this bound on text per context position refuses
# only prompts that could never fit the context, before the tokenizer spends time on them.
PROMPT_BYTES_PER_POSITION = 32


@dataclass(frozen=True)
class Limits:
    """What a request must fit, known once the base is loaded."""

    vocab_size: int
    max_seq_len: int  # prompt + generated tokens
    max_new_tokens: int  # the server's cap on `sampling.max_new_tokens`
    max_rank: int
    fingerprint: BaseFingerprint | None = None  # adapters must be made for this base
    max_prompt_bytes: int | None = None  # None: PROMPT_BYTES_PER_POSITION × max_seq_len

    @property
    def prompt_bytes(self) -> int:
        """The most UTF-8 bytes of prompt text the intake tokenizes."""
        if self.max_prompt_bytes is not None:
            return self.max_prompt_bytes
        return PROMPT_BYTES_PER_POSITION * self.max_seq_len



def check_compatible(version: AdapterVersion, limits: Limits) -> None:
    """An adapter serves only on the base it was made for, within `max_rank`."""
    fp = limits.fingerprint
    if fp is not None and version.base.digest != fp.digest:
        raise IncompatibleAdapter(
            f"adapter {version.ref} was made for base {version.base.summary()}, this "
            f"engine serves {fp.summary()}", field="adapter")
    if version.rank > limits.max_rank:
        raise FailedPrecondition(f"adapter {version.ref} has rank {version.rank}; this "
                                 f"engine serves up to max_rank {limits.max_rank}",
                                 field="adapter")
