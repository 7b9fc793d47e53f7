"""`group_by_slot`: the order a forward takes its rows in (literal cases)."""

from __future__ import annotations

import pytest

from loraplex.runtime.kv.cache import RowFeed
from loraplex.runtime.model.runner import group_by_slot


@pytest.mark.parametrize(("rows", "slots", "want_rows", "want_slots"), [
    ([0, 1, 2, 3, 4, 5], [1, 2, 3, 1, 2, 3], [0, 3, 1, 4, 2, 5], [1, 1, 2, 2, 3, 3]),
    ([0, 1, 2, 3], [2, 0, 2, 1], [1, 3, 0, 2], [0, 1, 2, 2]),  # base rows first
    ([4, 1, 7], [5, 5, 5], [4, 1, 7], [5, 5, 5]),  # one adapter: the order it came in
    ([3], [0], [3], [0]),
    ([], [], [], []),
])
def test_rows_are_grouped_by_slot_in_a_stable_order(rows, slots, want_rows, want_slots):
    feeds = [RowFeed(r, 10 + r, [100 + r]) for r in rows]
    got, got_slots = group_by_slot(feeds, slots)
    assert [f.row for f in got] == want_rows
    assert list(got_slots) == want_slots
    # each row keeps its own feed (position and token)
    assert all(f.start == 10 + f.row and list(f.token_ids) == [100 + f.row] for f in got)
