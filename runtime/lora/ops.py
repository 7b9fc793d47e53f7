"""The batched-LoRA kernel: many adapters, one forward pass, plain torch (CPU and CUDA).

Every token of a batch carries the slot id of its adapter (slot 0 = no adapter). Once per
forward step the caller turns those slot ids into a `LoraBatchPlan` (`make_plan`); every
LoRA layer of the model then calls `add_lora(y, x, a, b, scale, plan)`, which is only the
matmuls. Building the plan is the host-side work (sorting, grouping, choosing a strategy)
that would otherwise be repeated in each of the model's ~200 projections.

Strategies (picked by `make_plan`, measured on a 2-core Xeon, see bench/README.md):
- "base_only": no token uses an adapter; nothing to do.
- "single":    one adapter; two plain matmuls over its tokens, at the adapter's true rank.
- "grouped":   tokens grouped by slot into a zero-padded `[K, L, in]` block, where the K
               slots are the contiguous range lo..hi of the stacks (views, no weight copy);
               two `bmm`s. The decode case: many adapters, few tokens each.
- "segments":  a loop over the distinct slots, two `mm`s per slot on slices of the tokens
               sorted by slot. The prefill case, or slots too scattered to group cheaply.
- "triton":    CUDA only (or CPU under Triton's interpreter, for tests): the "segments"
               layout handed to two fused kernels (runtime/lora/triton_ops.py), a shrink and an
               expand, two launches per layer whatever the number of adapters or ranks.
               Chosen automatically when the plan's device is CUDA and triton imports
               (`kernel="auto"`); `kernel="torch"` keeps the torch strategies on CUDA.
A "gathered bmm" (copy `a[slot[t]]` for every token, then `bmm`) was measured too: it copies
`T * R * (in + out)` weights per layer and lost to "grouped" in every case, so it is not here.

Rank buckets (runtime/api/slots.py): the slots are cut into buckets of increasing rank, each
with its own stacks (`a`, `b` are then one tensor per bucket). A batch whose adapters sit in
several buckets gets a "buckets" plan: one plan per bucket present, over that bucket's
tokens and stacks, each picking its own strategy above at that bucket's ranks. Rank-8 rows
next to a rank-256 row are grouped with the other small ranks and never padded to 256 (a
single "grouped" bmm over all of them would compute 256 columns for every row: 32× the
shrink and expand work of a rank-8 row), and each bucket's Triton launches size their rank
tile for that bucket. A batch within one bucket (the usual case) is planned as with one stack.
The runner feeds rows grouped by slot (`runner.group_by_slot`), so each bucket's tokens, and
the adapter rows after a run of base rows, are consecutive rows: such a plan carries that
`window` and runs on row views of x and y, with no gather before and no scatter after.
Measured with the server's default buckets (max_rank 256: eight rank-8/16 adapters land in
the rank-16, -64 and -256 buckets), `python -m bench.decode_step --dtypes fp32 --max-rank
256`, two alternated runs each on a 2-core Intel Xeon (AVX-512, AMX): SmolLM2's decode step
at 16 / 32 rows 129.9, 128.3 / 161.4, 162.9 ms with windows, 138.3, 150.5 / 162.3, 176.9 ms
with the gathers.
Measured (`bench.lora_ops --part ranks`, a loaded 2-core CPU): the LoRA work of 32 rank-8/16
decode rows beside rank-64 and rank-256 rows is 0.96x their work alone with buckets, 12.3x
padded in one stack of rank 256; one stack looped slot by slot ("segments") keeps their
arithmetic but costs 1.42x what they cost on a rank-16 server, and holds every slot at 256.

DoRA rows (`plan.dora`): after the LoRA delta, `dora.add_dora` rescales each output feature of a
DoRA adapter's rows by its magnitude over the norm of `W + s·B·A` (`dora_gain`, computed once
per adapter, never per step); LoRA and base rows in the same batch are left bit for bit as
they were (their gain is 0).

Stacks in half precision (`a`, `b` in bf16/fp16) are allowed: the torch strategies compute
in the stacks' dtype (the layer casts `x` first), "triton" accumulates in fp32. `scale` may
stay fp32 (it does in BatchedLoraLayer) so alpha/sqrt(r) is not rounded to 8 bits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import Tensor

from loraplex.errors import InvalidArgument, quote
from loraplex.runtime.api.slots import SlotLayout

Strategy = Literal["base_only", "single", "grouped", "segments", "triton", "buckets"]
STRATEGIES: tuple[str, ...] = ("single", "grouped", "segments")  # torch ones a caller may force
Kernel = Literal["auto", "torch", "triton"]
KERNELS: tuple[str, ...] = ("auto", "torch", "triton")
_NO_RANK = 1 << 30  # seg_table rank of a slot whose true rank is unknown: the stacks' R

# "grouped" computes K * L padded rows and reads K slots' weights; it is chosen while that
# stays within these factors of the real work (T_lora rows, U distinct slots). Measured on
# the 2-core CPU (bench base shapes, 4-32 rows, rank 16): one padded bmm beat U small mms up
# to ~3x waste on either axis (e.g. 32 decode rows on 16 of 32 slots: 235 vs 394 us per
# projection), broke even at ~3.5x and lost at 7-16x row waste (long prefill segments).
# With the true ranks known, the padded work is K * L rows at the largest rank against the
# sum of rows x own rank: a rank-8 row grouped with a rank-64 one pads to 64 columns, so
# mixed ranks far apart go to "segments" (each slot at its own rank) under the same factor.
_GROUPED_MAX_ROW_WASTE = 3.0
_GROUPED_MAX_SLOT_WASTE = 3.0
# A padded block of at most this many rows is "grouped" whatever its row waste (not its rank
# waste: padded rank columns are stack rows read for nothing): at decode sizes the padded
# rows cost little arithmetic, while "segments" runs two `mm`s per slot, about three times
# the ops. SmolLM2's fp32 decode step on a Zipf batch (16 rows on 6 slots
# padded to 36 rows; 32 rows on 8 slots padded to 72), in one process, four alternations
# each, 2-core AMD EPYC (Zen 5): 73.8–82.2 vs 75.8–85.5 ms at 16 rows, 99.8–155.8 vs
# 126.4–168.9 ms at 32 rows, grouped against segments.
_GROUPED_ALWAYS_ROWS = 128


@dataclass(frozen=True, eq=False)
class LoraBatchPlan:
    """How one forward step's tokens map onto adapter slots; shared by every LoRA layer.

    Index tensors live on the model's device. Host-side ints (slot numbers, segment lengths)
    drive the Python loop of the "segments" strategy without a device sync.
    """

    num_tokens: int  # T: rows of the flattened [T, in] activations this plan is for
    strategy: Strategy
    slots: Tensor  # [T] int64: slot of each token (kept for reference checks and debugging)
    rank: int | None = None  # rank to compute at ("single"/"grouped"); None = the stacks' R
    # "single": the one slot, and the tokens that use it (None = all T tokens)
    slot: int = 0
    tokens: Tensor | None = None  # [T_lora] int64
    # "grouped": slots lo .. lo+K-1, each with L padded rows
    lo: int = 0
    num_groups: int = 0  # K
    group_len: int = 0  # L
    gather_src: Tensor | None = None  # [K*L] int64 token of each padded row (no padding case)
    pad_pos: Tensor | None = None  # [T_lora] int64 padded row of each lora token (padding case)
    # "segments": lora tokens sorted by slot, cut into runs of one slot
    perm: Tensor | None = None  # [T_lora] int64 token indices sorted by slot (None = identity)
    sorted_slots: Tensor | None = None  # [T_lora] int64 slot of perm[i]
    seg_slots: tuple[int, ...] = ()  # [U] distinct slots, ascending
    seg_lens: tuple[int, ...] = ()  # [U] tokens per slot
    seg_ranks: tuple[int | None, ...] = ()  # [U] rank per slot (None = R)
    # "triton": perm (None = identity) and one int32 table, both copied in one transfer
    seg_table: Tensor | None = None  # [U, 4] int32: start in perm, length, slot, rank
    # > 0: a static decode plan (`static_decode_plan`) for this many rows: seg_table and
    # perm are fixed-size device buffers, so the launches do not depend on the batch
    static_rows: int = 0
    # some token's slot holds a DoRA adapter: layers run `add_dora` after `add_lora`
    dora: bool = False
    # the stacks read: rank bucket `bucket` of a SlotLayout, whose stack row i is global slot
    # `base + i`; every slot number above (slot, lo, seg_slots, sorted_slots, seg_table) is
    # such a row. `slots` alone stays global (add_dora reads it).
    bucket: int = 0
    base: int = 0
    # "buckets": one plan per rank bucket holding some token, smallest rank first
    parts: tuple[LoraBatchPlan, ...] = ()
    # (w0, w1): this plan's tokens are the consecutive rows w0..w1-1 of x and y, and every
    # token index above counts from w0; `add_lora` works on those row views, with no gather
    # of x and no scatter into y (None: the indices count from row 0 of the whole batch)
    window: tuple[int, int] | None = None

    @property
    def num_adapters(self) -> int:
        """Distinct non-zero slots in the batch (0 for a static plan: its segments are
        device data the host does not keep)."""
        if self.strategy == "base_only":
            return 0
        if self.strategy == "single":
            return 1
        if self.parts:
            return sum(p.num_adapters for p in self.parts)
        return len(self.seg_slots)

    @property
    def triton(self) -> bool:
        """The plan runs the Triton kernels (which cast x and y on load and store)."""
        return self.strategy == "triton" or any(p.strategy == "triton" for p in self.parts)


def make_plan(
    slots: Tensor | Sequence[int],
    *,
    slot_ranks: Sequence[int] | None = None,
    device: torch.device | str | None = None,
    strategy: Strategy | None = None,
    kernel: Kernel = "auto",
    slot_dora: Sequence[bool] | None = None,
    layout: SlotLayout | None = None,
) -> LoraBatchPlan:
    """Plan one step. `slots # [T]`: slot per token (0 = no adapter).
    `slot_dora[s]`: slot s holds a DoRA adapter (the plan's `dora`; None = no DoRA slot).

    `slot_ranks[s]`: the true rank of the adapter in slot s (its zero padding up to R is
    skipped when all adapters in the batch share a smaller rank); None = always use R.
    `strategy` forces one of STRATEGIES (tests, benchmarks; "single" falls back to
    "segments" for several adapters); None picks by the rules in the module doc. A batch
    without adapter tokens is always "base_only". `kernel`: "auto" = "triton" on CUDA when
    triton imports, else a torch strategy; "torch" never "triton"; "triton" always (on CPU
    only under TRITON_INTERPRET=1). A forced `strategy` wins over `kernel`.
    `layout`: the rank buckets of the stacks (None: one stack, slot s is its row s); tokens
    in several buckets make a "buckets" plan of one plan per bucket, each planned alone.
    """
    if strategy is not None and strategy not in (*STRATEGIES, "triton"):
        raise InvalidArgument(f"unknown strategy {quote(strategy)}; choose one of "
                              f"{(*STRATEGIES, 'triton')}", field="strategy")
    if kernel not in KERNELS:
        raise InvalidArgument(f"unknown kernel {quote(kernel)}; choose one of {KERNELS}",
                              field="kernel")
    host = torch.as_tensor(slots, dtype=torch.int64, device="cpu").reshape(-1)  # [T]
    if device is None:
        device = slots.device if isinstance(slots, Tensor) else torch.device("cpu")
    device = torch.device(device)
    if host.numel() and int(host.min()) < 0:
        raise InvalidArgument("slot ids must be >= 0", field="slots")
    n = int(host.numel())
    dev_slots = host.to(device)  # [T]

    lora_tok = torch.nonzero(host, as_tuple=True)[0]  # [T_lora] tokens with an adapter
    if lora_tok.numel() == 0:
        return LoraBatchPlan(num_tokens=n, strategy="base_only", slots=dev_slots)

    lora_slots = host[lora_tok]  # [T_lora]
    order = torch.argsort(lora_slots, stable=True)  # [T_lora]
    perm = lora_tok[order]  # [T_lora] tokens sorted by slot
    sorted_slots = lora_slots[order]  # [T_lora]
    uniq, counts = torch.unique_consecutive(sorted_slots, return_counts=True)  # [U], [U]
    seg_slots = tuple(int(s) for s in uniq.tolist())
    seg_lens = tuple(int(c) for c in counts.tolist())
    seg_ranks = tuple((int(slot_ranks[s]) if slot_ranks is not None else None)
                      for s in seg_slots)
    dora = slot_dora is not None and any(slot_dora[s] for s in seg_slots)
    if strategy is None and (kernel == "triton"
                             or (kernel == "auto" and device.type == "cuda" and triton_ready())):
        strategy = "triton"

    parts = []
    for bucket, base, lo, hi in _bucket_runs(seg_slots, layout):
        start, end = sum(seg_lens[:lo]), sum(seg_lens[:hi])
        run = perm[start:end]  # [T_k] the bucket's tokens, sorted by slot
        window = None if strategy == "triton" else _window(run, n)
        w0, w1 = window or (0, n)
        part = _plan_run(
            w1 - w0, dev_slots[w0:w1], run - w0, sorted_slots[start:end] - base,
            tuple(s - base for s in seg_slots[lo:hi]), seg_lens[lo:hi], seg_ranks[lo:hi],
            strategy, device, dora, bucket, base)
        parts.append(part if window is None else
                     replace(part, num_tokens=n, slots=dev_slots, window=window))
    if len(parts) == 1:
        return parts[0]
    return LoraBatchPlan(num_tokens=n, strategy="buckets", slots=dev_slots, parts=tuple(parts),
                         seg_slots=seg_slots, seg_lens=seg_lens, seg_ranks=seg_ranks, dora=dora)


def _window(tokens: Tensor, n: int) -> tuple[int, int] | None:
    """(first, last + 1) when the ascending `tokens # [T_k]` are consecutive rows and not
    all `n` of them, else None. Rows grouped by slot (the runner's `group_by_slot`) make
    every rank bucket's tokens, and the adapter rows after a run of base rows, such a
    window: their LoRA work then runs on row views of the layer's x and y."""
    first, count = int(tokens[0]), int(tokens.numel())
    if count == n or not torch.equal(tokens, torch.arange(first, first + count)):
        return None
    return first, first + count


def _bucket_runs(seg_slots: tuple[int, ...],
                 layout: SlotLayout | None) -> list[tuple[int, int, int, int]]:
    """(bucket, its stacks' base slot, first segment, end segment) for each rank bucket that
    holds some of the ascending `seg_slots`."""
    if layout is None or len(layout.buckets) == 1:
        return [(0, 0, 0, len(seg_slots))]
    runs: list[tuple[int, int, int, int]] = []
    for i, s in enumerate(seg_slots):
        k = layout.bucket_of_slot(s)
        if runs and runs[-1][0] == k:
            runs[-1] = (*runs[-1][:3], i + 1)
        else:
            runs.append((k, layout.buckets[k].base, i, i + 1))
    return runs


def _plan_run(n: int, dev_slots: Tensor, perm: Tensor, sorted_slots: Tensor,
              seg_slots: tuple[int, ...], seg_lens: tuple[int, ...],
              seg_ranks: tuple[int | None, ...], strategy: Strategy | None,
              device: torch.device, dora: bool, bucket: int, base: int) -> LoraBatchPlan:
    """The plan of the tokens of one stack: `perm # [T_k]` sorted by slot, `sorted_slots #
    [T_k]` and `seg_slots` as rows of that stack (all >= 0 and in use: slot-0 tokens are
    in no run)."""
    where = dict(dora=dora, bucket=bucket, base=base)
    shared_rank = seg_ranks[0] if len(set(seg_ranks)) == 1 else None
    # Every slot's stack is zero past its true rank, so a batch of mixed ranks can stop at
    # the largest rank present instead of the stacks' R (a rank-8 + rank-16 batch on
    # stacks of rank 64 computes 16 columns, not 64).
    top_rank = None if None in seg_ranks else max(seg_ranks)
    t_lora = int(perm.numel())
    all_tokens = t_lora == n
    identity = all_tokens and bool(torch.equal(perm, torch.arange(n)))
    if strategy == "triton":
        return _triton_plan(n, dev_slots, perm, identity, seg_slots, seg_lens, seg_ranks,
                            top_rank, device, **where)
    if strategy is None:
        strategy = _choose(seg_slots, seg_lens, t_lora, seg_ranks)

    if strategy == "single" and len(seg_slots) != 1:
        strategy = "segments"  # "single" is only defined for one adapter
    if strategy == "single":
        return LoraBatchPlan(
            num_tokens=n, strategy="single", slots=dev_slots, rank=shared_rank,
            slot=seg_slots[0], tokens=None if all_tokens else perm.to(device),
            seg_slots=seg_slots, seg_lens=seg_lens, seg_ranks=seg_ranks, **where,
        )

    if strategy == "grouped":
        counts = torch.tensor(seg_lens)  # [U]
        lo, hi = seg_slots[0], seg_slots[-1]
        k, length = hi - lo + 1, max(seg_lens)
        starts = torch.cumsum(counts, 0) - counts  # [U] first sorted index of each slot
        within = torch.arange(t_lora) - torch.repeat_interleave(starts, counts)  # [T_lora]
        pos = (sorted_slots - lo) * length + within  # [T_lora] padded row of perm[i]
        if t_lora == k * length:  # no padding: every padded row is a token
            src = torch.empty(t_lora, dtype=torch.int64)
            src[pos] = perm
            gather_src = None if torch.equal(src, torch.arange(n)) and all_tokens else src
            return LoraBatchPlan(
                num_tokens=n, strategy="grouped", slots=dev_slots, rank=top_rank,
                lo=lo, num_groups=k, group_len=length,
                gather_src=None if gather_src is None else gather_src.to(device),
                seg_slots=seg_slots, seg_lens=seg_lens, seg_ranks=seg_ranks, **where,
            )
        return LoraBatchPlan(
            num_tokens=n, strategy="grouped", slots=dev_slots, rank=top_rank,
            lo=lo, num_groups=k, group_len=length, pad_pos=pos.to(device),
            perm=perm.to(device), seg_slots=seg_slots, seg_lens=seg_lens, seg_ranks=seg_ranks,
            **where,
        )

    return LoraBatchPlan(
        num_tokens=n, strategy="segments", slots=dev_slots,
        perm=None if identity else perm.to(device), sorted_slots=sorted_slots.to(device),
        seg_slots=seg_slots, seg_lens=seg_lens, seg_ranks=seg_ranks, **where,
    )


def triton_ready() -> bool:
    """True if the Triton kernels can be used (triton imports); cached after the first call."""
    global _TRITON_READY
    if _TRITON_READY is None:
        try:
            from loraplex.runtime.lora import triton_ops  # noqa: F401
            _TRITON_READY = True
        except ImportError:
            _TRITON_READY = False
    return _TRITON_READY


_TRITON_READY: bool | None = None


def _triton_plan(n: int, dev_slots: Tensor, perm: Tensor, identity: bool,
                 seg_slots: tuple[int, ...], seg_lens: tuple[int, ...],
                 seg_ranks: tuple[int | None, ...], top_rank: int | None,
                 device: torch.device, dora: bool = False, bucket: int = 0,
                 base: int = 0) -> LoraBatchPlan:
    """The segments layout as one int32 host buffer `[U*4 + T_lora]` (seg table, then perm),
    moved to the device in one copy: the kernels find each segment's rows, slot and rank."""
    u = len(seg_slots)
    starts = [0] * u
    for i in range(1, u):
        starts[i] = starts[i - 1] + seg_lens[i - 1]
    ranks = [_NO_RANK if r is None else r for r in seg_ranks]
    table = [v for row in zip(starts, seg_lens, seg_slots, ranks, strict=True) for v in row]
    host = torch.tensor(table, dtype=torch.int32)  # [U*4]
    if not identity:
        host = torch.cat([host, perm.to(torch.int32)])  # [U*4 + T_lora]
    dev = host.to(device, non_blocking=True)
    return LoraBatchPlan(
        num_tokens=n, strategy="triton", slots=dev_slots, rank=top_rank,
        perm=None if identity else dev[4 * u:], seg_table=dev[: 4 * u].view(u, 4),
        seg_slots=seg_slots, seg_lens=seg_lens, seg_ranks=seg_ranks, dora=dora,
        bucket=bucket, base=base,
    )


def static_decode_table(slots: Sequence[int], rows: int,
                        slot_ranks: Sequence[int] | None = None,
                        layout: SlotLayout | None = None) -> list[int]:
    """The "triton" layout of a decode step in a fixed size: `rows` segments and `rows` perm
    entries whatever the batch, so the kernels launch the same grid for any batch of up to
    `rows` rows (what a CUDA graph captured for that row bucket replays). Host ints only.

    Semantics (`slots # [B]`, B <= rows; returns seg_table [rows, 4] then perm [rows], flat):
        perm = rows i with slots[i] != 0, stably sorted by slot; then the others, in order
               (slot-0 rows, then the pad rows B..rows-1: in no segment, never touched)
        segment u < U (U distinct non-zero slots, ascending): (start in perm, length, slot,
               rank = slot_ranks[slot], or the stacks' R when None)
        segment u >= U: (0, 0, 0, 0) -- a program that returns at once
    With a `layout` of several rank buckets: one such table per bucket, bucket after bucket
    (`5 * rows` ints each), over the rows whose slot is in that bucket, each slot written
    as its row in the bucket's stacks (slot - base).
    """
    if len(slots) > rows:
        raise InvalidArgument(f"{len(slots)} rows do not fit a static plan for {rows}",
                              field="slots")
    if layout is None or len(layout.buckets) == 1:
        return _static_table(slots, [i for i, s in enumerate(slots) if s], rows, slot_ranks, 0)
    out: list[int] = []
    for b in layout.buckets:
        members = [i for i, s in enumerate(slots) if s and b.first <= s < b.first + b.count]
        out += _static_table(slots, members, rows, slot_ranks, b.base)
    return out


def _static_table(slots: Sequence[int], members: list[int], rows: int,
                  slot_ranks: Sequence[int] | None, base: int) -> list[int]:
    """`static_decode_table` over the rows `members` of one stack whose row 0 is `base`."""
    order = sorted(members, key=lambda i: slots[i])
    table: list[int] = []
    start = 0
    while start < len(order):
        slot = slots[order[start]]
        end = start
        while end < len(order) and slots[order[end]] == slot:
            end += 1
        rank = _NO_RANK if slot_ranks is None else int(slot_ranks[slot])
        table += (start, end - start, slot - base, rank)
        start = end
    table += [0] * (4 * rows - len(table))
    taken = set(order)
    return table + order + [i for i in range(rows) if i not in taken]


def static_decode_plan(table: Tensor, slots: Tensor, rows: int, *, dora: bool = False,
                       layout: SlotLayout | None = None) -> LoraBatchPlan:
    """The plan over `static_decode_table`'s layout on the device: `table # [rows*5]` int32
    (seg_table then perm, e.g. a view of a static input buffer; `[K*rows*5]` for K rank
    buckets), `slots # [rows]`. Building it reads nothing back, so it can run inside a CUDA
    graph capture. `dora`: run `add_dora` for every row (a gain of 0 leaves LoRA and base
    rows as they are), since the graph cannot look at which slots the batch holds. With
    several buckets every bucket launches, whatever the batch holds (an empty one's
    programs return at once)."""
    buckets = layout.buckets if layout is not None else ()
    if len(buckets) <= 1:
        return LoraBatchPlan(num_tokens=rows, strategy="triton", slots=slots,
                             seg_table=table[:4 * rows].view(rows, 4),
                             perm=table[4 * rows:5 * rows], static_rows=rows, dora=dora)
    parts = []
    for k, b in enumerate(buckets):
        t = table[5 * rows * k:5 * rows * (k + 1)]  # [rows*5] this bucket's table
        parts.append(LoraBatchPlan(num_tokens=rows, strategy="triton", slots=slots,
                                   seg_table=t[:4 * rows].view(rows, 4), perm=t[4 * rows:],
                                   static_rows=rows, dora=dora, bucket=k, base=b.base))
    return LoraBatchPlan(num_tokens=rows, strategy="buckets", slots=slots, parts=tuple(parts),
                         static_rows=rows, dora=dora)


def _choose(seg_slots: tuple[int, ...], seg_lens: tuple[int, ...], t_lora: int,
            seg_ranks: tuple[int | None, ...] = ()) -> Strategy:
    if len(seg_slots) == 1:
        return "single"
    k = seg_slots[-1] - seg_slots[0] + 1
    padded = k * max(seg_lens)  # rows the padded bmm computes
    work = t_lora  # rows there are
    if seg_ranks and None not in seg_ranks:  # in rank columns: padded to the largest rank
        padded *= max(seg_ranks)
        work = sum(n * r for n, r in zip(seg_lens, seg_ranks, strict=True))
    # a small padded block, unless the rank padding (stack rows read for nothing) is wide
    small = k * max(seg_lens) <= _GROUPED_ALWAYS_ROWS and (
        not seg_ranks or None in seg_ranks
        or k * max(seg_ranks) <= _GROUPED_MAX_ROW_WASTE * sum(seg_ranks))
    if ((small or padded <= _GROUPED_MAX_ROW_WASTE * work)
            and k <= _GROUPED_MAX_SLOT_WASTE * len(seg_slots)):
        return "grouped"
    return "segments"


def add_lora(y: Tensor, x: Tensor, a: Tensor | Sequence[Tensor],
             b: Tensor | Sequence[Tensor], scale: Tensor, plan: LoraBatchPlan) -> Tensor:
    """Add every token's own adapter delta to `y`, in place; returns `y`.

    Semantics:
        for t in range(T):
            s = plan.slots[t]
            y[t] += scale[s] * b[s] @ (a[s] @ x[t])

    y     # [T, out]  base-layer output, updated in place
    x     # [T, in]   layer input
    a     # [S, R, in]   stacked A matrices, zero-padded to rank R; a[0] == 0
    b     # [S, out, R]  stacked B matrices, zero-padded to rank R; b[0] == 0
    scale # [S]          alpha / r (or alpha / sqrt(r) for rslora); scale[0] == 0
    With rank buckets (`make_plan(layout=)`), `a` and `b` are one stack per bucket,
    `a[k] # [S_k, R_k, in]`, `b[k] # [S_k, out, R_k]`, and `a[s]` above means
    `a[k][s - base_k]` for the bucket k holding slot s; `scale` stays one `[S]` tensor.
    All tensors share one device. Torch strategies need x, y, a, b in one dtype (scale may
    be fp32); "triton" takes any float x and y with fp32 accumulation. Slot 0 tokens are
    skipped, never computed.
    """
    if x.shape[0] != plan.num_tokens:
        raise InvalidArgument(f"plan is for {plan.num_tokens} tokens, x has {x.shape[0]}",
                              field="plan")
    if plan.strategy == "base_only":
        return y
    for run in plan.parts or (plan,):
        _add_run(y, x, a, b, scale, run)
    return y


def _add_run(y: Tensor, x: Tensor, a: Tensor | Sequence[Tensor], b: Tensor | Sequence[Tensor],
             scale: Tensor, plan: LoraBatchPlan) -> Tensor:
    """One stack's share of `add_lora`: the stack of `plan.bucket`, its slots' scales."""
    if isinstance(a, Tensor):
        if plan.bucket:
            raise InvalidArgument(f"the plan reads rank bucket {plan.bucket}: pass one stack "
                                  "per bucket", field="plan")
    else:
        a, b = a[plan.bucket], b[plan.bucket]
    if plan.base:
        scale = scale[plan.base:plan.base + a.shape[0]]  # [S_k]
    if plan.window is not None:
        w0, w1 = plan.window
        y, x = y[w0:w1], x[w0:w1]  # [T_k, out], [T_k, in] views: writes land in y
    if plan.strategy == "single":
        return _add_single(y, x, a, b, scale, plan)
    if plan.strategy == "grouped":
        return _add_grouped(y, x, a, b, scale, plan)
    if plan.strategy == "triton":
        from loraplex.runtime.lora.triton_ops import add_lora_triton

        # a static plan launches for its row bucket whatever the batch (fixed grid and tile)
        rows = plan.static_rows or sum(plan.seg_lens)
        longest = plan.static_rows or max(plan.seg_lens)
        return add_lora_triton(y, x, a, b, scale, seg_table=plan.seg_table, tokens=plan.perm,
                               num_rows=rows, max_seg_len=longest, rank=plan.rank)
    return _add_segments(y, x, a, b, scale, plan)


def _add_single(y: Tensor, x: Tensor, a: Tensor, b: Tensor, scale: Tensor,
                plan: LoraBatchPlan) -> Tensor:
    r = plan.rank or a.shape[1]
    a_t = a[plan.slot, :r].t()  # [in, r]
    b_t = b[plan.slot, :, :r].t()  # [r, out]
    s = scale[plan.slot : plan.slot + 1]  # [1]
    if plan.tokens is None:
        h = torch.mm(x, a_t).mul_(s)  # [T, r]
        return y.addmm_(h, b_t)
    xs = x.index_select(0, plan.tokens)  # [T_lora, in]
    h = torch.mm(xs, a_t).mul_(s)  # [T_lora, r]
    return y.index_add_(0, plan.tokens, torch.mm(h, b_t))


def _add_grouped(y: Tensor, x: Tensor, a: Tensor, b: Tensor, scale: Tensor,
                 plan: LoraBatchPlan) -> Tensor:
    k, length = plan.num_groups, plan.group_len
    lo, hi = plan.lo, plan.lo + k
    r = plan.rank or a.shape[1]
    a_t = a[lo:hi, :r].transpose(1, 2)  # [K, in, r] view of the stacks
    b_t = b[lo:hi, :, :r].transpose(1, 2)  # [K, r, out] view of the stacks
    s = scale[lo:hi].view(k, 1, 1)  # [K, 1, 1]
    if plan.pad_pos is not None:  # some groups shorter than L: zero rows fill the gaps
        xp = x.new_zeros(k * length, x.shape[1])  # [K*L, in]
        xp.index_copy_(0, plan.pad_pos, x.index_select(0, plan.perm))
        h = torch.bmm(xp.view(k, length, -1), a_t).mul_(s)  # [K, L, r]
        yp = torch.bmm(h, b_t).view(k * length, -1)  # [K*L, out]
        return y.index_add_(0, plan.perm, yp.index_select(0, plan.pad_pos))
    if plan.gather_src is None:  # tokens already in group order: no index ops at all
        h = torch.bmm(x.view(k, length, -1), a_t).mul_(s)  # [K, L, r]
        y.view(k, length, -1).baddbmm_(h, b_t)
        return y
    xp = x.index_select(0, plan.gather_src).view(k, length, -1)  # [K, L, in]
    h = torch.bmm(xp, a_t).mul_(s)  # [K, L, r]
    yp = torch.bmm(h, b_t).view(k * length, -1)  # [K*L, out]
    return y.index_add_(0, plan.gather_src, yp)


def _add_segments(y: Tensor, x: Tensor, a: Tensor, b: Tensor, scale: Tensor,
                  plan: LoraBatchPlan) -> Tensor:
    t_lora = sum(plan.seg_lens)
    r_max = a.shape[1]
    xs = x if plan.perm is None else x.index_select(0, plan.perm)  # [T_lora, in]
    h = x.new_empty(t_lora, r_max)  # [T_lora, R]
    d = y.new_empty(t_lora, y.shape[1])  # [T_lora, out]
    a_t = a.transpose(1, 2).unbind(0)  # S x [in, R] views
    b_t = b.transpose(1, 2).unbind(0)  # S x [R, out] views
    xs_seg, h_seg, d_seg = xs.split(plan.seg_lens), h.split(plan.seg_lens), d.split(plan.seg_lens)
    for i, s in enumerate(plan.seg_slots):
        r = plan.seg_ranks[i] or r_max
        if r == r_max:
            torch.mm(xs_seg[i], a_t[s], out=h_seg[i])
            torch.mm(h_seg[i], b_t[s], out=d_seg[i])
        else:  # skip the zero padding of a low-rank adapter
            hs = torch.mm(xs_seg[i], a_t[s][:, :r])  # [n_s, r]
            torch.mm(hs, b_t[s][:r], out=d_seg[i])
    d.mul_(scale.index_select(0, plan.sorted_slots).unsqueeze(1))  # [T_lora, out]
    if plan.perm is None:
        return y.add_(d)
    return y.index_add_(0, plan.perm, d)


def reference_add_lora(y: Tensor, x: Tensor, a: Tensor, b: Tensor, scale: Tensor,
                       slots: Tensor) -> Tensor:
    """The Semantics loop of `add_lora`, literally; for tests. `slots # [T]`."""
    for t in range(x.shape[0]):
        s = int(slots[t])
        y[t] += scale[s] * (b[s] @ (a[s] @ x[t]))
    return y
