"""The fused mixed-LoRA op for CUDA: two Triton kernels, shrink then expand, SGMV-style.

`lora_ops.add_lora` calls `add_lora_triton` for plans with strategy "triton" (picked
automatically when the plan's device is CUDA and triton imports). It computes the same
Semantics as every other strategy:

    for t in range(T):
        s = slots[t]
        y[t] += scale[s] * b[s] @ (a[s] @ x[t])

The plan sorts the tokens that use an adapter by slot and cuts them into segments of one
slot each (`seg_table`); one program handles BLOCK_M rows of one segment:

- shrink:  h[i, :rank] = scale[s] * x[tok[i]] @ a[s, :rank].T      h # [T_lora, BLOCK_R] fp32
- expand:  y[tok[i], n-block] += h[i] @ b[s, n-block, :rank].T     (in place, y's dtype)

so a decode step (one row per sequence, U segments of a few rows) and a prefill step (few,
long segments) are both two launches per layer, whatever the number of adapters, instead of
the torch strategies' index/bmm/loop sequence. The ideas are those of Punica's SGMV and
S-LoRA's kernels (segments of rows sharing an adapter; the adapter's weights read once per
segment block); the code is ours.

Mixed ranks: each segment masks its slot's true rank (`seg_table[:, 3]`) inside one
BLOCK_R-wide tile (the largest rank of the launch, rounded up to a power of two, at least
16), so a rank-8 adapter next to a rank-64 one costs the masked lanes only. Slots in rank
buckets (runtime/api/slots.py) get one launch pair per bucket present, over that bucket's
stacks: a rank-8 segment never runs in a rank-256 tile. Slot 0 tokens are not in
any segment: never read, never written. Stacks may be fp32, fp16 or bf16; `x` and `y` may
be any float dtype (cast on load/store); products accumulate in fp32, `h` stays fp32.

Checked without a GPU: under `TRITON_INTERPRET=1` (set before this module is imported: the
`triton.jit` decorator reads it) the same kernels run on CPU tensors
(tests/runtime/lora/kernels/). The interpreter's `tl.dot` mis-reads bfloat16 operands, so under
the interpreter bf16 tiles are upcast to fp32 before the dot (`UPCAST`); on a GPU they go to
the tensor cores as bf16 with fp32 accumulation. The kernels call only triton.language
builtins (`tl.full`, not the `@jit` helper `tl.zeros`): torch and bitsandbytes import triton
before the tests can set TRITON_INTERPRET, and a helper jitted then is not interpretable. Speed is only known from a GPU run
(`bench/gpu_check.sh`).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

try:  # triton >= 3.4 reads its settings through `knobs`; older ones read the variable
    from triton import knobs

    INTERPRETED: bool = bool(knobs.runtime.interpret)
except ImportError:
    INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# (decided when this module was imported: that is when `triton.jit` wraps the kernels)


@triton.jit
def _shrink_kernel(
    x_ptr, a_ptr, scale_ptr, h_ptr, tok_ptr, seg_ptr,
    n_in, n_rank, stride_x, stride_as, stride_ar, stride_h,
    HAS_TOK: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # x # [T, in]; a # [S, R, in]; scale # [S]; h # [T_lora, BLOCK_R] fp32
    # tok # [T_lora] token of each sorted row; seg # [U, 4] (start, len, slot, rank) int32
    seg = tl.program_id(0)
    start = tl.load(seg_ptr + seg * 4)
    length = tl.load(seg_ptr + seg * 4 + 1)
    if tl.program_id(1) * BLOCK_M >= length:
        return
    slot = tl.load(seg_ptr + seg * 4 + 2).to(tl.int64)
    rank = tl.minimum(tl.load(seg_ptr + seg * 4 + 3), n_rank)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < length
    rows = start + offs_m  # sorted-row index
    if HAS_TOK:
        tok = tl.load(tok_ptr + rows, mask=m_mask, other=0).to(tl.int64)
    else:
        tok = rows.to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    acc = tl.full((BLOCK_M, BLOCK_R), 0.0, tl.float32)  # not tl.zeros: see module doc
    a_base = a_ptr + slot * stride_as
    for k0 in range(0, n_in, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < n_in
        xt = tl.load(x_ptr + tok[:, None] * stride_x + offs_k[None, :],
                     mask=m_mask[:, None] & k_mask[None, :], other=0.0)  # [BM, BK]
        at = tl.load(a_base + offs_r[:, None] * stride_ar + offs_k[None, :],
                     mask=r_mask[:, None] & k_mask[None, :], other=0.0)  # [BR, BK]
        if UPCAST:
            xt = xt.to(tl.float32)
            at = at.to(tl.float32)
        else:
            xt = xt.to(at.dtype)
        if IEEE:
            acc += tl.dot(xt, tl.trans(at), input_precision="ieee")
        else:
            acc += tl.dot(xt, tl.trans(at))
    acc = acc * tl.load(scale_ptr + slot).to(tl.float32)
    tl.store(h_ptr + rows[:, None] * stride_h + offs_r[None, :], acc,
             mask=m_mask[:, None] & r_mask[None, :])


@triton.jit
def _expand_kernel(
    h_ptr, b_ptr, y_ptr, tok_ptr, seg_ptr,
    n_out, n_rank, stride_h, stride_bs, stride_bn, stride_y,
    HAS_TOK: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # h # [T_lora, BLOCK_R] fp32; b # [S, out, R]; y # [T, out] updated in place
    seg = tl.program_id(0)
    start = tl.load(seg_ptr + seg * 4)
    length = tl.load(seg_ptr + seg * 4 + 1)
    if tl.program_id(1) * BLOCK_M >= length:
        return
    slot = tl.load(seg_ptr + seg * 4 + 2).to(tl.int64)
    rank = tl.minimum(tl.load(seg_ptr + seg * 4 + 3), n_rank)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < length
    rows = start + offs_m
    if HAS_TOK:
        tok = tl.load(tok_ptr + rows, mask=m_mask, other=0).to(tl.int64)
    else:
        tok = rows.to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < n_out
    h = tl.load(h_ptr + rows[:, None] * stride_h + offs_r[None, :],
                mask=m_mask[:, None] & r_mask[None, :], other=0.0)  # [BM, BR] fp32
    bt = tl.load(b_ptr + slot * stride_bs + offs_n[:, None] * stride_bn + offs_r[None, :],
                 mask=n_mask[:, None] & r_mask[None, :], other=0.0)  # [BN, BR]
    if UPCAST:
        bt = bt.to(tl.float32)
    else:
        h = h.to(bt.dtype)
    if IEEE:
        d = tl.dot(h, tl.trans(bt), input_precision="ieee")  # [BM, BN] fp32
    else:
        d = tl.dot(h, tl.trans(bt))
    y_ptrs = y_ptr + tok[:, None] * stride_y + offs_n[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    y = tl.load(y_ptrs, mask=mask, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + d).to(y.dtype), mask=mask)


def block_m_for(max_seg_len: int) -> int:
    """Rows per program: 16 (tl.dot's minimum) for decode-sized segments, up to 64 for
    prefill segments (fewer programs re-reading the same adapter's weights)."""
    return 16 if max_seg_len <= 16 else (32 if max_seg_len <= 32 else 64)


def block_r_for(rank: int) -> int:
    return max(16, triton.next_power_of_2(rank))


def add_lora_triton(y: Tensor, x: Tensor, a: Tensor, b: Tensor, scale: Tensor, *,
                    seg_table: Tensor, tokens: Tensor | None, num_rows: int, max_seg_len: int,
                    rank: int | None) -> Tensor:
    """`y[tok] += scale[s] * (x[tok] @ a[s].T) @ b[s].T` per segment; returns `y`.

    y # [T, out] (any float dtype, updated in place); x # [T, in]; a # [S, R, in];
    b # [S, out, R]; scale # [S]; seg_table # [U, 4] int32 (start, len, slot, rank) over the
    sorted rows; tokens # [T_lora] token of each sorted row (None: row i is token i);
    num_rows: T_lora; max_seg_len: longest segment (host int); rank: the batch's largest
    true rank (None: the stacks' R).
    """
    if x.stride(-1) != 1:
        x = x.contiguous()
    n_in, n_out, r_stack = x.shape[1], y.shape[1], a.shape[1]
    if y.stride(-1) != 1 or a.stride(-1) != 1 or b.stride(-1) != 1:
        raise ValueError("add_lora_triton needs y, a and b contiguous in their last dim")
    block_r = block_r_for(min(rank or r_stack, r_stack))
    block_m = block_m_for(max_seg_len)
    upcast = INTERPRETED and torch.bfloat16 in (a.dtype, b.dtype, x.dtype)
    ieee = a.dtype == torch.float32  # fp32 stacks: no tf32 rounding, match torch's fp32 mm
    h = torch.empty(num_rows, block_r, dtype=torch.float32, device=x.device)  # [T_lora, BR]
    u = seg_table.shape[0]
    m_blocks = triton.cdiv(max_seg_len, block_m)
    tok = tokens if tokens is not None else seg_table  # any pointer; unread when HAS_TOK=False
    _shrink_kernel[(u, m_blocks)](
        x, a, scale, h, tok, seg_table,
        n_in, r_stack, x.stride(0), a.stride(0), a.stride(1), h.stride(0),
        HAS_TOK=tokens is not None, UPCAST=upcast, IEEE=ieee,
        BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=min(128, _pow2_at_least16(n_in)),
    )
    block_n = min(128, _pow2_at_least16(n_out))
    _expand_kernel[(u, m_blocks, triton.cdiv(n_out, block_n))](
        h, b, y, tok, seg_table,
        n_out, r_stack, h.stride(0), b.stride(0), b.stride(1), y.stride(0),
        HAS_TOK=tokens is not None, UPCAST=upcast, IEEE=ieee,
        BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_N=block_n,
    )
    return y


def _pow2_at_least16(n: int) -> int:
    return max(16, triton.next_power_of_2(n))

