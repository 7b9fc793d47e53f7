"""Rank buckets: which adapter slots hold which ranks.

A slot's stacks are allocated once at its bucket's rank (`[slots, R, in]`), so one rank for
every slot makes every slot as large as the largest rank served: at rank 256, eight slots of
a 135M base hold ~2.8 GB of fp32 stacks, and a padded batched matmul over them computes 256
columns for a rank-8 row. The slots are therefore cut into buckets of increasing rank, each
with its own stacks, sized in bytes: of `max_slots` slots, a bucket of 4× the rank gets about
a quarter as many as the one below (at least one; the largest bucket always has one). With
the defaults (8 slots, ranks up to 256):

    bucket ≤16: slots 1..5    bucket ≤64: slots 6..7    bucket ≤256: slot 8

which is less stack memory than 8 slots of rank 64. An adapter takes a slot of the smallest
bucket that holds its largest rank, or of a larger bucket when that one is full (so eight
rank-8 adapters still fit eight slots); the LoRA ops compute each bucket's rows at that
bucket's ranks (runtime/lora/ops.py), so a rank-8 row costs what it costs without a
rank-256 row in the batch.

Slot ids are global (0 = no adapter, then bucket after bucket); slot 0 is row 0 of the first
bucket's stacks. Pure bookkeeping, no tensors: the config validates with it, the layers, the
ops and the pool share one `SlotLayout`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from loraplex.errors import InvalidArgument
from loraplex.limits import MAX_RANK

SMALLEST_BUCKET_RANK = 16  # below this, a bucket of its own saves nothing worth a launch
BUCKET_RANK_STEP = 4  # each bucket holds 4× the rank of the one below


@dataclass(frozen=True)
class RankBucket:
    """Slots `first .. first+count-1`, each holding ranks up to `rank`. Its stacks have
    `rows` rows; stack row `i` is global slot `base + i` (bucket 0 also holds slot 0)."""

    rank: int
    first: int
    count: int

    @property
    def base(self) -> int:
        """Global slot of stack row 0: 0 for the first bucket (its row 0 is slot 0)."""
        return 0 if self.first == 1 else self.first

    @property
    def rows(self) -> int:
        return self.first + self.count - self.base

    @property
    def slots(self) -> range:
        return range(self.first, self.first + self.count)


@dataclass(frozen=True)
class SlotLayout:
    """The rank buckets of one injection, smallest rank first."""

    buckets: tuple[RankBucket, ...]

    @classmethod
    def of(cls, rank_slots: Sequence[tuple[int, int]]) -> SlotLayout:
        """From `(rank, slots)` pairs, ranks ascending (`check_rank_slots` first)."""
        buckets, first = [], 1
        for rank, count in rank_slots:
            buckets.append(RankBucket(int(rank), first, int(count)))
            first += int(count)
        return cls(tuple(buckets))

    @classmethod
    def single(cls, max_slots: int, max_rank: int) -> SlotLayout:
        return cls((RankBucket(max_rank, 1, max_slots),))

    @property
    def max_rank(self) -> int:
        return self.buckets[-1].rank

    @property
    def max_slots(self) -> int:
        """Adapter slots in all buckets (slot 0 aside)."""
        return sum(b.count for b in self.buckets)

    @property
    def rank_slots(self) -> tuple[tuple[int, int], ...]:
        return tuple((b.rank, b.count) for b in self.buckets)

    def bucket_of_slot(self, slot: int) -> int:
        """Index of the bucket holding global `slot` (slot 0: the first)."""
        for k, b in enumerate(self.buckets):
            if slot < b.first + b.count:
                return k
        raise InvalidArgument(f"slot must be in 0..{self.max_slots}, got {slot}", field="slot")

    def bucket_for_rank(self, rank: int) -> int | None:
        """The smallest bucket whose slots hold `rank`; None above the largest."""
        for k, b in enumerate(self.buckets):
            if rank <= b.rank:
                return k
        return None


def default_rank_slots(max_slots: int, max_rank: int) -> tuple[tuple[int, int], ...]:
    """`(rank, slots)` per bucket, `max_slots` slots in all: ranks `max_rank`, `max_rank/4`, …
    down to 16 (one bucket when `max_rank` < 64); from the largest down, a bucket of rank r
    gets `max_slots * 16 / r` slots (at least 1) while slots are left, and the smallest the
    rest, so each larger bucket's stacks weigh about what the smallest one's do. Too few
    slots for every bucket: the smallest go (`max_slots` 1: one slot of rank `max_rank`)."""
    ranks = [max_rank]
    while ranks[0] // BUCKET_RANK_STEP >= SMALLEST_BUCKET_RANK:
        ranks.insert(0, ranks[0] // BUCKET_RANK_STEP)
    pairs: list[tuple[int, int]] = []
    left = max_slots
    for r in reversed(ranks[1:]):
        n = min(left, max(1, max_slots * ranks[0] // r))
        if n:
            pairs.insert(0, (r, n))
            left -= n
    if left:
        pairs.insert(0, (ranks[0], left))
    return tuple(pairs)


def check_rank_slots(value: Mapping[int, int] | Sequence[Sequence[int]],
                     field: str = "rank_slots") -> tuple[tuple[int, int], ...]:
    """`{rank: slots}` or `[(rank, slots), …]` as sorted pairs; InvalidArgument naming
    `field` unless every rank is in 1..MAX_RANK, distinct, and every count >= 1."""
    items = list(value.items()) if isinstance(value, Mapping) else list(value)
    pairs: list[tuple[int, int]] = []
    for item in items:
        try:
            rank, count = (int(v) for v in item)
        except (TypeError, ValueError):
            raise InvalidArgument(f"`{field}` takes (rank, slots) pairs of integers",
                                  field=field) from None
        if not 1 <= rank <= MAX_RANK:
            raise InvalidArgument(f"`{field}`: rank {rank} must be in 1..{MAX_RANK} "
                                  "(loraplex.limits.MAX_RANK)", field=field)
        if count < 1:
            raise InvalidArgument(f"`{field}`: rank {rank} needs at least 1 slot", field=field)
        pairs.append((rank, count))
    pairs.sort()
    if not pairs:
        raise InvalidArgument(f"`{field}` needs at least one (rank, slots) pair", field=field)
    if len({r for r, _ in pairs}) != len(pairs):
        raise InvalidArgument(f"`{field}` names a rank twice", field=field)
    return tuple(pairs)
