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


@dataclass(frozen=True)
class Limits:
    """What a request must fit, known once the base is loaded."""

    vocab_size: int
    max_seq_len: int  # prompt + generated tokens
    max_new_tokens: int  # the server's cap on `sampling.max_new_tokens`
    max_rank: int
    fingerprint: BaseFingerprint | None = None  # adapters must be made for this base



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
