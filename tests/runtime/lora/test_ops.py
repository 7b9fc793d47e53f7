"""add_lora against the literal Semantics loop, for every strategy and a table of batches."""

from __future__ import annotations

import pytest
import torch

from loraplex.errors import InvalidArgument
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
    ],
)
def test_plan_picks_the_strategy_for_the_batch_shape(slots, strategy):
    assert make_plan(slots).strategy == strategy


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
