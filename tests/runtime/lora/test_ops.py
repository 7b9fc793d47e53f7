"""add_lora against the literal Semantics loop, for every strategy and a table of batches."""

from __future__ import annotations

import pytest
import torch

from loraplex.errors import InvalidArgument
from loraplex.runtime.api.slots import SlotLayout
from loraplex.runtime.lora.ops import (
    STRATEGIES,
    add_lora,
    make_plan,
    reference_add_lora,
    static_decode_table,
)

IN, OUT, R, S = 12, 10, 4, 6  # small dims keep the literal loop quick
RANKS = [0, 4, 2, 3, 1, 4]  # true rank per slot; slot 0 = no adapter


def _stacks(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """a # [S, R, in], b # [S, out, R], scale # [S]: zero-padded past each slot's rank."""
    g = torch.Generator().manual_seed(seed)
    a = torch.zeros(S, R, IN, dtype=torch.float64)
    b = torch.zeros(S, OUT, R, dtype=torch.float64)
    scale = torch.zeros(S, dtype=torch.float64)
    for s in range(1, S):
        r = RANKS[s]
        a[s, :r] = torch.randn(r, IN, generator=g, dtype=torch.float64)
        b[s, :, :r] = torch.randn(OUT, r, generator=g, dtype=torch.float64)
        scale[s] = 0.5 + s
    return a, b, scale


# (case, token slots): a table of literal batches
CASES = [
    ("empty batch", []),
    ("all slot 0", [0, 0, 0, 0]),
    ("one adapter, every token", [2, 2, 2, 2, 2]),
    ("one adapter among base tokens", [0, 3, 0, 3, 3, 0]),
    ("mixed ranks, zero-padded", [1, 2, 3, 4, 5, 1, 2]),
    ("every token a different slot", [5, 3, 1, 4, 2]),
    ("decode: one token per row, sorted", [1, 2, 3, 4, 5]),
    ("grouped runs, equal lengths", [1, 1, 2, 2, 3, 3]),
    ("grouped runs, shuffled", [3, 1, 2, 3, 1, 2]),
    ("unequal groups with base tokens", [4, 4, 4, 0, 2, 0, 5, 4, 2]),
    ("scattered slots, long prefill rows", [1] * 7 + [5] * 9 + [0] * 3 + [1] * 2),
    ("mixed ranks all below R", [2, 3, 2, 3]),
    ("low ranks around a higher-rank idle slot", [2, 4, 4, 2]),
]


@pytest.mark.parametrize("strategy", [None, *STRATEGIES])
@pytest.mark.parametrize(("case", "slots"), CASES, ids=[c for c, _ in CASES])
def test_add_lora_matches_semantics_loop(case, slots, strategy):
    a, b, scale = _stacks()
    g = torch.Generator().manual_seed(len(slots))
    x = torch.randn(len(slots), IN, generator=g, dtype=torch.float64)  # [T, in]
    y0 = torch.randn(len(slots), OUT, generator=g, dtype=torch.float64)  # [T, out]
    slot_t = torch.tensor(slots, dtype=torch.int64)  # [T]

    want = reference_add_lora(y0.clone(), x, a, b, scale, slot_t)
    plan = make_plan(slot_t, slot_ranks=RANKS, strategy=strategy)
    got = add_lora(y0.clone(), x, a, b, scale, plan)

    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    if not any(slots):
        torch.testing.assert_close(got, y0, rtol=0, atol=0)  # base tokens are never touched


@pytest.mark.parametrize(("case", "slots"), CASES, ids=[c for c, _ in CASES])
def test_without_true_ranks_the_zero_padding_is_computed_and_harmless(case, slots):
    a, b, scale = _stacks(1)
    x = torch.randn(len(slots), IN, dtype=torch.float64)
    y0 = torch.zeros(len(slots), OUT, dtype=torch.float64)
    slot_t = torch.tensor(slots, dtype=torch.int64)
    want = reference_add_lora(y0.clone(), x, a, b, scale, slot_t)
    got = add_lora(y0.clone(), x, a, b, scale, make_plan(slots))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("slots", "strategy"),
    [
        ([], "base_only"),
        ([0, 0], "base_only"),
        ([3, 3, 0], "single"),
        ([1, 2, 3, 4], "grouped"),  # decode, distinct adapters: one bmm, no loop
        ([4, 1, 3, 2, 2, 3, 1, 4], "grouped"),
        ([1] * 40 + [5] * 3, "segments"),  # prefill rows of very unequal length
        ([1, 9, 1, 9], "segments"),  # slots 2..8 unused: grouping would read them for nothing
        ([1, 5, 1, 5], "grouped"),  # 2.5x the slots' reads in one bmm beat two mm pairs
        # a Zipf decode batch: 16 rows padded to 36 (2.25x), 6 small segments: one bmm
        ([1] * 4 + [2] * 6 + [3] + [4] * 3 + [5, 6], "grouped"),
        ([1] * 60 + [2, 3, 4], "segments"),  # a long prefill run beside 3 rows: 240 padded rows
    ],
)
def test_plan_picks_the_strategy_for_the_batch_shape(slots, strategy):
    assert make_plan(slots).strategy == strategy


@pytest.mark.parametrize(("ranks", "strategy"), [
    ([0, 16, 16, 16, 16], "grouped"),
    ([0, 8, 16, 16, 8], "grouped"),  # 64 padded rank columns for 48 of work
    ([0, 2, 2, 2, 64], "segments"),  # one bmm would pad three rank-2 rows to rank 64
])
def test_grouping_counts_the_padding_up_to_the_largest_rank(ranks, strategy):
    assert make_plan([1, 2, 3, 4], slot_ranks=ranks).strategy == strategy


def test_plan_is_reused_for_layers_of_different_widths():
    """One plan per step serves every projection (q: 12->12, up: 12->20, down: 20->12)."""
    plan = make_plan([2, 0, 1, 2])
    slot_t = torch.tensor([2, 0, 1, 2])
    for d_in, d_out in [(12, 12), (12, 20), (20, 12)]:
        a, b = torch.randn(3, 4, d_in), torch.randn(3, d_out, 4)
        a[0], b[0] = 0, 0
        scale = torch.tensor([0.0, 2.0, 0.5])
        x, y = torch.randn(4, d_in), torch.randn(4, d_out)
        want = reference_add_lora(y.clone(), x, a, b, scale, slot_t)
        torch.testing.assert_close(add_lora(y, x, a, b, scale, plan), want)


def test_plan_for_other_token_count_and_bad_input_are_typed_errors():
    a, b, scale = _stacks()
    plan = make_plan([1, 2])
    with pytest.raises(InvalidArgument):
        add_lora(torch.zeros(3, OUT, dtype=torch.float64), torch.zeros(3, IN, dtype=torch.float64),
                 a, b, scale, plan)
    with pytest.raises(InvalidArgument):
        make_plan([1, -1])
    with pytest.raises(InvalidArgument):
        make_plan([1], strategy="fastest")
    with pytest.raises(InvalidArgument) as e:
        make_plan([1], kernel="cutlass")
    assert e.value.field == "kernel"


def test_auto_kernel_keeps_torch_strategies_on_cpu_and_triton_plans_segments():
    """On CPU "auto" never picks the Triton kernels (they would need the interpreter); a
    forced "triton" plan holds the segment table the kernels read: start, length, slot,
    rank per distinct slot, over the tokens sorted by slot."""
    assert make_plan([2, 1, 2, 0], slot_ranks=RANKS).strategy == "grouped"
    plan = make_plan([2, 1, 2, 0], slot_ranks=RANKS, kernel="triton")
    assert plan.strategy == "triton" and plan.num_adapters == 2
    assert plan.seg_table.tolist() == [[0, 1, 1, 4], [1, 2, 2, 2]]
    assert plan.perm.tolist() == [1, 0, 2]


# (case, row slots, row bucket, seg_table rows, perm): the fixed-size layout a decode graph
# replays; ranks from RANKS (slot 5 has rank 4, slot 2 rank 2, ...)
STATIC_CASES = [
    ("one row, one adapter", [2], 1, [[0, 1, 2, 2]], [0]),
    ("one row, base", [0], 2, [[0, 0, 0, 0]] * 2, [0, 1]),
    ("mixed, shuffled, padded to 8", [3, 0, 1, 3, 5], 8,
     [[0, 1, 1, 4], [1, 2, 3, 3], [3, 1, 5, 4]] + [[0, 0, 0, 0]] * 5,
     [2, 0, 3, 4, 1, 5, 6, 7]),
    ("every row the same adapter", [4, 4, 4, 4], 4, [[0, 4, 4, 1]] + [[0, 0, 0, 0]] * 3,
     [0, 1, 2, 3]),
]


@pytest.mark.parametrize(("case", "slots", "rows", "segs", "perm"), STATIC_CASES,
                         ids=[c[0] for c in STATIC_CASES])
def test_static_decode_table_has_a_fixed_size_whatever_the_batch(case, slots, rows, segs,
                                                                perm):
    flat = static_decode_table(slots, rows, RANKS)
    assert len(flat) == 5 * rows
    assert [flat[i:i + 4] for i in range(0, 4 * rows, 4)] == segs
    assert flat[4 * rows:] == perm


def test_static_decode_table_without_ranks_uses_the_stacks_and_refuses_too_many_rows():
    from loraplex.runtime.lora.ops import _NO_RANK

    assert static_decode_table([1], 1, None)[:4] == [0, 1, 1, _NO_RANK]
    with pytest.raises(InvalidArgument):
        static_decode_table([1, 2, 3], 2, RANKS)


# ------------------------------------------------------------------------------ rank buckets
# slots 1-2 hold ranks <= 2, slot 3 ranks <= 3, slots 4-5 ranks <= 4 (each bucket its own
# stacks); slot 5 holds a rank-2 adapter that did not fit the first bucket
LAYOUT = SlotLayout.of(((2, 2), (3, 1), (4, 2)))
BUCKET_RANKS = [0, 2, 1, 3, 4, 2]


def _bucket_stacks(seed: int = 5):
    """The one-stack tensors of `_stacks` for BUCKET_RANKS, and the same values cut into
    LAYOUT's stacks: `a[k] # [S_k, R_k, in]` whose row i is slot `base_k + i`."""
    g = torch.Generator().manual_seed(seed)
    a = torch.zeros(S, R, IN, dtype=torch.float64)
    b = torch.zeros(S, OUT, R, dtype=torch.float64)
    scale = torch.zeros(S, dtype=torch.float64)
    for s in range(1, S):
        r = BUCKET_RANKS[s]
        a[s, :r] = torch.randn(r, IN, generator=g, dtype=torch.float64)
        b[s, :, :r] = torch.randn(OUT, r, generator=g, dtype=torch.float64)
        scale[s] = 0.25 + s
    cut_a = [a[k.base:k.base + k.rows, :k.rank].clone() for k in LAYOUT.buckets]
    cut_b = [b[k.base:k.base + k.rows, :, :k.rank].clone() for k in LAYOUT.buckets]
    return (a, b, scale), (cut_a, cut_b)


@pytest.mark.parametrize("strategy", [None, *STRATEGIES])
@pytest.mark.parametrize(("case", "slots"), CASES, ids=[c for c, _ in CASES])
def test_rank_buckets_match_the_semantics_loop_over_one_stack(case, slots, strategy):
    (a, b, scale), (cut_a, cut_b) = _bucket_stacks()
    g = torch.Generator().manual_seed(len(slots) + 7)
    x = torch.randn(len(slots), IN, generator=g, dtype=torch.float64)  # [T, in]
    y0 = torch.randn(len(slots), OUT, generator=g, dtype=torch.float64)  # [T, out]
    slot_t = torch.tensor(slots, dtype=torch.int64)
    want = reference_add_lora(y0.clone(), x, a, b, scale, slot_t)
    plan = make_plan(slot_t, slot_ranks=BUCKET_RANKS, strategy=strategy, layout=LAYOUT)
    got = add_lora(y0.clone(), x, cut_a, cut_b, scale, plan)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# (slots, strategy, [(bucket, strategy, rank it computes at)] per bucket present)
BUCKET_PLANS = [
    ([1, 2, 1, 2], "grouped", [(0, "grouped", 2)]),  # one bucket: planned as without buckets
    ([1, 2, 4, 0], "buckets", [(0, "grouped", 2), (2, "single", 4)]),
    ([2, 1, 5, 4, 3], "buckets", [(0, "grouped", 2), (1, "single", 3), (2, "grouped", 4)]),
    ([5, 5], "single", [(2, "single", 2)]),  # a small rank in a large bucket: its own rank
]


@pytest.mark.parametrize(("slots", "strategy", "runs"), BUCKET_PLANS)
def test_each_bucket_computes_at_its_own_ranks(slots, strategy, runs):
    """Small-rank rows are never padded to a large rank sharing the batch: each bucket is
    planned alone, at the largest rank present in it (one stack would pad all to 4)."""
    plan = make_plan(slots, slot_ranks=BUCKET_RANKS, layout=LAYOUT)
    assert plan.strategy == strategy
    parts = plan.parts or (plan,)
    assert [(p.bucket, p.strategy, p.rank) for p in parts] == runs
    assert plan.num_adapters == len(set(slots) - {0})
    assert make_plan([1, 2, 4, 0], slot_ranks=BUCKET_RANKS).rank == 4  # one stack: padded


@pytest.mark.parametrize("strategy", [None, *STRATEGIES])
def test_rows_grouped_by_slot_give_each_bucket_a_window_of_rows_and_no_gather(strategy):
    """Rows sorted by slot (as the runner feeds them): each bucket's tokens, and the adapter
    rows after the base rows, are consecutive, so their LoRA work runs on row views of x
    and y with no gather or scatter, and still equals the semantics loop."""
    slots = [0, 1, 1, 2, 2, 3, 4, 5]
    (a, b, scale), (cut_a, cut_b) = _bucket_stacks()
    g = torch.Generator().manual_seed(11)
    x = torch.randn(len(slots), IN, generator=g, dtype=torch.float64)  # [T, in]
    y0 = torch.randn(len(slots), OUT, generator=g, dtype=torch.float64)  # [T, out]
    slot_t = torch.tensor(slots, dtype=torch.int64)
    plan = make_plan(slot_t, slot_ranks=BUCKET_RANKS, strategy=strategy, layout=LAYOUT)
    assert [p.window for p in plan.parts] == [(1, 5), (5, 6), (6, 8)]
    assert all(p.num_tokens == len(slots) for p in plan.parts)
    if strategy in (None, "grouped"):
        assert plan.parts[0].strategy == "grouped" and plan.parts[0].gather_src is None
    want = reference_add_lora(y0.clone(), x, a, b, scale, slot_t)
    got = add_lora(y0.clone(), x, cut_a, cut_b, scale, plan)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[0], y0[0], rtol=0, atol=0)  # the base row is untouched


def test_one_stack_after_base_rows_is_a_window_and_a_shuffled_batch_is_not():
    one = make_plan([0, 0, 2, 2, 3, 3], slot_ranks=RANKS)
    assert one.window == (2, 6) and one.num_tokens == 6
    assert one.strategy == "grouped" and one.gather_src is None
    assert make_plan([2, 0, 3, 2, 0, 3], slot_ranks=RANKS).window is None
    assert make_plan([2, 2, 3, 3], slot_ranks=RANKS).window is None  # every row: no window


def test_a_bucket_plan_needs_one_stack_per_bucket():
    _, (cut_a, cut_b) = _bucket_stacks()
    plan = make_plan([4, 4], slot_ranks=BUCKET_RANKS, layout=LAYOUT)
    with pytest.raises(InvalidArgument) as e:
        add_lora(torch.zeros(2, OUT, dtype=torch.float64),
                 torch.zeros(2, IN, dtype=torch.float64), cut_a[2], cut_b[2],
                 torch.zeros(S, dtype=torch.float64), plan)
    assert e.value.field == "plan"


def test_static_decode_table_has_one_fixed_table_per_rank_bucket():
    """Rows of slot 1 (bucket 0), slot 3 (bucket 1: its stack row 0) and slot 5 (bucket 2:
    its stack row 1), padded to 4 rows: three tables of 4 segments and 4 perm entries."""
    flat = static_decode_table([3, 0, 1, 5], 4, BUCKET_RANKS, LAYOUT)
    tables = [flat[i:i + 20] for i in range(0, 60, 20)]
    assert len(flat) == 60
    assert [t[:4] for t in tables] == [[0, 1, 1, 2], [0, 1, 0, 3], [0, 1, 1, 2]]
    assert all(t[4:16] == [0] * 12 for t in tables)  # empty segments: nothing runs
    assert [t[16:] for t in tables] == [[2, 0, 1, 3], [0, 1, 2, 3], [3, 0, 1, 2]]
    assert static_decode_table([3, 0, 1, 5], 4, BUCKET_RANKS) == static_decode_table(
        [3, 0, 1, 5], 4, BUCKET_RANKS, SlotLayout.single(5, 4))  # one bucket: as before
