"""The Triton shrink/expand kernels against the literal Semantics loop of `add_lora`.

On a machine without CUDA they run under Triton's interpreter (see conftest.py) on CPU
tensors: the same kernel code, executed tile by tile in numpy, so shapes stay tiny. On a
GPU (bench/gpu_check.sh) the same tests run the compiled kernels on CUDA tensors.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from loraplex.runtime.lora.ops import (
    add_lora,
    make_plan,
    reference_add_lora,
    static_decode_plan,
    static_decode_table,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.runtime.lora.test_ops import (  # noqa: E402 - the same named cases
    BUCKET_RANKS,
    CASES,
    IN,
    LAYOUT,
    OUT,
    RANKS,
    S,
    _bucket_stacks,
    _stacks,
)

# (y dtype, stack dtype = x dtype, rtol, atol) against the loop in float64 on the same values
DTYPES = [
    ("fp32", torch.float32, torch.float32, 1e-5, 1e-5),
    ("bf16", torch.bfloat16, torch.bfloat16, 1.6e-2, 2e-2),  # y rounded to bf16 once
    ("bf16 stacks, fp32 y", torch.float32, torch.bfloat16, 1e-2, 1e-2),
    ("fp16", torch.float16, torch.float16, 5e-3, 2e-2),  # h rounded to fp16 for the dot
]


def _run(triton_lora, device, slots, stacks, y_dtype, w_dtype, *, slot_ranks=RANKS,
         n_in=IN, seed=0):
    a, b, scale = stacks
    g = torch.Generator().manual_seed(seed + len(slots))
    x = torch.randn(len(slots), n_in, generator=g, dtype=torch.float64).to(w_dtype)  # [T, in]
    y0 = torch.randn(len(slots), b.shape[1], generator=g, dtype=torch.float64).to(y_dtype)
    slot_t = torch.tensor(slots, dtype=torch.int64)  # [T]
    a_w, b_w = a.to(w_dtype), b.to(w_dtype)
    # the loop in float64 on exactly the values the kernel sees
    want = reference_add_lora(y0.double(), x.double(), a_w.double(), b_w.double(),
                              scale.double(), slot_t)
    plan = make_plan(slot_t, slot_ranks=slot_ranks, device=device, strategy="triton")
    got = add_lora(y0.to(device), x.to(device), a_w.to(device), b_w.to(device),
                   scale.float().to(device), plan)
    return plan, got.cpu(), want, y0


# every named case in every dtype, except base-only batches (they launch nothing) past fp32
PARAMS = [pytest.param(case, slots, *d[1:], id=f"{case}-{d[0]}")
          for case, slots in CASES for d in DTYPES if any(slots) or d[0] == "fp32"]


@pytest.mark.parametrize(("case", "slots", "y_dtype", "w_dtype", "rtol", "atol"), PARAMS)
def test_kernels_match_semantics_loop(triton_lora, kernel_device, case, slots, y_dtype,
                                      w_dtype, rtol, atol):
    plan, got, want, y0 = _run(triton_lora, kernel_device, slots, _stacks(), y_dtype, w_dtype)
    assert plan.strategy == ("triton" if any(slots) else "base_only")
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol)
    base_rows = [i for i, s in enumerate(slots) if s == 0]
    torch.testing.assert_close(got[base_rows], y0[base_rows], rtol=0, atol=0)  # untouched


def _wide_stacks(n_in: int, n_out: int, r: int, ranks: list[int], seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    a = torch.zeros(len(ranks), r, n_in, dtype=torch.float64)
    b = torch.zeros(len(ranks), n_out, r, dtype=torch.float64)
    scale = torch.zeros(len(ranks), dtype=torch.float64)
    for s, rk in enumerate(ranks):
        if rk:
            a[s, :rk] = torch.randn(rk, n_in, generator=g, dtype=torch.float64) / n_in ** 0.5
            b[s, :, :rk] = torch.randn(n_out, rk, generator=g, dtype=torch.float64)
            scale[s] = 2.0 / rk ** 0.5
    return a, b, scale


@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_prefill_segments_span_several_blocks_in_every_dim(triton_lora, kernel_device,
                                                           w_dtype):
    """A 70-token prefill row (two 64-row blocks) beside a 3-token one and base tokens, with
    in=150 (two K tiles), out=140 (two N tiles) and ranks 20 and 5 under max_rank 24 (one
    32-wide rank tile, masked per slot)."""
    ranks = [0, 20, 5]
    stacks = _wide_stacks(150, 140, 24, ranks)
    slots = [1] * 70 + [0] * 2 + [2] * 3
    _plan, got, want, _ = _run(triton_lora, kernel_device, slots, stacks, torch.float32,
                               w_dtype, slot_ranks=ranks, n_in=150)
    tol = 1e-5 if w_dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


def test_unknown_ranks_use_the_whole_stack(triton_lora, kernel_device):
    """Without a rank table every slot is computed at the stacks' R (its zero padding)."""
    slots = [3, 1, 0, 5, 3]
    _plan, got, want, _ = _run(triton_lora, kernel_device, slots, _stacks(2), torch.float32,
                               torch.float32, slot_ranks=None)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_decode_batch_matches_the_torch_strategy(triton_lora, kernel_device):
    """A decode step's shape (one token per row, 5 adapters of mixed rank, shuffled rows):
    the kernels and the automatic torch strategy agree on the same fp32 stacks."""
    slots = [3, 1, 4, 1, 5, 2, 0, 2, 3, 5]
    a, b, scale = (t.float() for t in _stacks(4))
    x = torch.randn(len(slots), IN)
    y0 = torch.randn(len(slots), OUT)
    torch_plan = make_plan(slots, slot_ranks=RANKS, kernel="torch")
    want = add_lora(y0.clone(), x, a, b, scale, torch_plan)
    plan = make_plan(slots, slot_ranks=RANKS, device=kernel_device, kernel="triton")
    dev = [t.to(kernel_device) for t in (y0, x, a, b, scale)]
    got = add_lora(*dev, plan).cpu()
    assert (torch_plan.strategy, plan.strategy) == ("grouped", "triton")
    assert plan.seg_table.shape == (len(set(slots) - {0}), 4) and S == 6
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# decode steps as a CUDA graph replays them: the rows padded to a bucket, the plan in the
# fixed-size layout of `static_decode_table` (one segment per distinct slot, empty ones up to
# the bucket), read from one int32 device buffer
STATIC = [(case, slots, bucket) for case, slots in CASES
          if 0 < len(slots) <= 8 for bucket in (len(slots), 8)]


@pytest.mark.parametrize(("case", "slots", "bucket"), STATIC,
                         ids=[f"{c}-to{b}" for c, _, b in STATIC])
def test_static_decode_plan_matches_semantics_loop(triton_lora, kernel_device, case, slots,
                                                   bucket):
    a, b, scale = _stacks()
    padded = slots + [0] * (bucket - len(slots))  # pad rows: slot 0, never touched
    g = torch.Generator().manual_seed(len(slots))
    x = torch.randn(bucket, IN, generator=g, dtype=torch.float64)  # [Bp, in]
    y0 = torch.randn(bucket, OUT, generator=g, dtype=torch.float64)  # [Bp, out]
    want = reference_add_lora(y0.clone(), x, a, b, scale, torch.tensor(padded))
    table = torch.tensor(static_decode_table(slots, bucket, RANKS), dtype=torch.int32)
    plan = static_decode_plan(table.to(kernel_device), torch.tensor(padded).to(kernel_device),
                              bucket)
    dev = [t.float().to(kernel_device) for t in (y0, x, a, b, scale)]
    got = add_lora(*dev, plan).cpu().double()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    untouched = [i for i, s in enumerate(padded) if s == 0]
    torch.testing.assert_close(got[untouched], y0[untouched].float().double(), rtol=0, atol=0)


@pytest.mark.parametrize("rank_slots", [None, ((2, 1), (8, 2))], ids=["one", "buckets"])
def test_static_decode_path_with_the_triton_plan_gives_the_eager_tokens(triton_lora,
                                                                         kernel_device,
                                                                         micro_base,
                                                                         rank_slots):
    """The forward a CUDA graph captures, run as is without capture: padded rows, the input
    buffer and the static segment table(s) read by the kernels (under the interpreter on
    CPU), inside the micro base, against the eager engine step while rows join (on CPU the
    torch strategies; on a GPU the per-step Triton plan). With rank buckets (slot 1 of rank 2
    in the first, slots 2-3 of ranks 8 and 4 in the second) every bucket has its table."""
    from loraplex.runtime.lora.batched import stack_names
    from tests.runtime.model.test_decode_graphs import _drive, _pair

    eager, static = _pair(micro_base, device=kernel_device.type, rank_slots=rank_slots)
    for layer in static.injection.layers.values():  # CPU B stacks are transposed views;
        for k in range(len(layer.layout.buckets)):  # the kernels read CUDA's layout
            name = stack_names(k)[1]
            setattr(layer, name, getattr(layer, name).contiguous())
    static.injection.batch.kernel = "triton"
    static.static = static.static_decode(capture=False)
    static.injection.batch.kernel = "auto"  # prefill stays on the usual strategy
    assert static.static.lora == "static"

    def check(step, a, b):
        assert a.argmax(-1).tolist() == b.argmax(-1).tolist(), f"step {step}"
        # the kernels sum in fp32 in another order than torch's matmuls
        torch.testing.assert_close(b, a, rtol=0, atol=1e-4)

    used = _drive(eager, static, check, steps=10, exact_prefill=False)  # B layouts differ
    assert {b.rows for b in used} == {4, 8, 9}


# rank buckets (runtime/api/slots.py): one pair of launches per bucket in the batch, each
# over its own stacks at its own rank tile
BUCKETED = [(case, slots) for case, slots in CASES if len(set(slots) - {0}) > 1]


@pytest.mark.parametrize(("case", "slots"), BUCKETED, ids=[c for c, _ in BUCKETED])
def test_kernels_over_rank_buckets_match_semantics_loop(triton_lora, kernel_device, case,
                                                        slots):
    (a, b, scale), (cut_a, cut_b) = _bucket_stacks()
    g = torch.Generator().manual_seed(len(slots))
    x = torch.randn(len(slots), IN, generator=g, dtype=torch.float64)  # [T, in]
    y0 = torch.randn(len(slots), OUT, generator=g, dtype=torch.float64)  # [T, out]
    want = reference_add_lora(y0.clone(), x, a, b, scale, torch.tensor(slots))
    plan = make_plan(slots, slot_ranks=BUCKET_RANKS, device=kernel_device, kernel="triton",
                     layout=LAYOUT)
    assert plan.triton and all(p.strategy == "triton" for p in plan.parts or (plan,))
    dev = [t.float().to(kernel_device) for t in (y0, x)]
    got = add_lora(*dev, [t.float().to(kernel_device) for t in cut_a],
                   [t.float().to(kernel_device) for t in cut_b],
                   scale.float().to(kernel_device), plan).cpu().double()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("slots", [[3, 0, 1, 5], [4, 4, 2], [0, 0]])
def test_static_decode_plan_over_rank_buckets_matches_semantics_loop(triton_lora,
                                                                     kernel_device, slots):
    """Every bucket launches on its fixed table, whatever the batch holds (an empty one's
    programs return at once)."""
    (a, b, scale), (cut_a, cut_b) = _bucket_stacks()
    rows = 4
    padded = slots + [0] * (rows - len(slots))
    g = torch.Generator().manual_seed(11)
    x = torch.randn(rows, IN, generator=g, dtype=torch.float64)  # [Bp, in]
    y0 = torch.randn(rows, OUT, generator=g, dtype=torch.float64)  # [Bp, out]
    want = reference_add_lora(y0.clone(), x, a, b, scale, torch.tensor(padded))
    table = torch.tensor(static_decode_table(slots, rows, BUCKET_RANKS, LAYOUT),
                         dtype=torch.int32)
    plan = static_decode_plan(table.to(kernel_device), torch.tensor(padded).to(kernel_device),
                              rows, layout=LAYOUT)
    assert [p.bucket for p in plan.parts] == [0, 1, 2]
    got = add_lora(y0.float().to(kernel_device), x.float().to(kernel_device),
                   [t.float().to(kernel_device) for t in cut_a],
                   [t.float().to(kernel_device) for t in cut_b],
                   scale.float().to(kernel_device), plan).cpu().double()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
