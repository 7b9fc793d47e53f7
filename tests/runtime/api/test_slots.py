"""Rank buckets of the adapter slots: the default sizing, and the setting's checks."""

from __future__ import annotations

import pytest

from loraplex.errors import InvalidArgument
from loraplex.runtime.api.slots import SlotLayout, default_rank_slots
from loraplex.runtime.api.types import EngineConfig

# (max_slots, max_rank, buckets): `max_slots` in all; 4× the rank, about a quarter of the
# slots (at least one, the largest bucket first)
DEFAULTS = [
    (8, 256, ((16, 5), (64, 2), (256, 1))),  # the engine's defaults
    (32, 256, ((16, 22), (64, 8), (256, 2))),
    (3, 256, ((16, 1), (64, 1), (256, 1))),
    (2, 256, ((64, 1), (256, 1))),  # too few slots: the smallest bucket goes
    (1, 256, ((256, 1),)),
    (8, 64, ((16, 6), (64, 2))),
    (8, 32, ((32, 8),)),  # below 64: one bucket
    (3, 16, ((16, 3),)),
    (4, 8, ((8, 4),)),
]


@pytest.mark.parametrize(("max_slots", "max_rank", "buckets"), DEFAULTS)
def test_default_buckets_share_max_slots_by_bytes(max_slots, max_rank, buckets):
    assert default_rank_slots(max_slots, max_rank) == buckets
    assert sum(n for _, n in buckets) == max_slots and buckets[-1][0] == max_rank


def test_slots_are_numbered_bucket_after_bucket():
    layout = EngineConfig(base_dir="x").slot_layout
    assert layout.max_slots == 8 and layout.max_rank == 256
    assert [list(b.slots) for b in layout.buckets] == [[1, 2, 3, 4, 5], [6, 7], [8]]
    assert [layout.bucket_of_slot(s) for s in (0, 1, 5, 6, 8)] == [0, 0, 0, 1, 2]
    assert [layout.bucket_for_rank(r) for r in (1, 16, 17, 64, 256, 257)] == [0, 0, 1, 1, 2,
                                                                              None]
    # stack rows: the first bucket's row 0 is slot 0, the others start at their first slot
    assert [(b.base, b.rows) for b in layout.buckets] == [(0, 6), (6, 2), (8, 1)]
    assert SlotLayout.single(3, 8).rank_slots == ((8, 3),)


def test_rank_slots_setting_takes_a_mapping_and_must_end_at_max_rank():
    cfg = EngineConfig(base_dir="x", rank_slots={256: 2, 16: 8, 64: 4})
    assert cfg.rank_slots == ((16, 8), (64, 4), (256, 2))
    assert cfg.slot_layout.max_slots == 14
    with pytest.raises(InvalidArgument, match="set max_rank to 64 too") as e:
        EngineConfig(base_dir="x", rank_slots={16: 8, 64: 4})
    assert e.value.field == "rank_slots"
    assert EngineConfig(base_dir="x", rank_slots={16: 8, 64: 4}, max_rank=64).slot_layout \
        .rank_slots == ((16, 8), (64, 4))


@pytest.mark.parametrize(("value", "why"), [
    ({16: 0, 256: 1}, "at least 1 slot"),
    ({512: 1}, "must be in 1..256"),
    ([(16, 2), (16, 3), (256, 1)], "names a rank twice"),
    ([("a", 2)], "pairs of integers"),
    ({}, "at least one"),
])
def test_bad_rank_slots_are_refused_naming_the_field(value, why):
    with pytest.raises(InvalidArgument, match=why) as e:
        EngineConfig(base_dir="x", rank_slots=value)
    assert e.value.field == "rank_slots"
