"""The batched LoRA layer: one forward of a base layer serves many adapters, per token.

Each `BatchedLoraLayer` owns pre-allocated stacks, one pair per rank bucket of its
`SlotLayout` (runtime/api/slots.py): `a # [S_k, R_k, in]` and `b # [S_k, out, R_k]` for the
S_k slots of bucket k, which hold ranks up to R_k (buffers `lora_a`/`lora_b` for the first
bucket, `lora_a1`/`lora_b1`, … for the next); and over every slot `scale # [max_slots+1]` and,
for DoRA adapters, `dora # [max_slots+1, out]` (magnitude / ‖W + s·B·A‖ − 1, 0 for a LoRA
slot); slot 0 is zeros and never written. Activating an adapter is a `copy_` into its slot,
in its bucket's stacks. All layers of one injection share
one `LoraBatch`: `set_rows`/`set_tokens` store the slots of the step, the first layer of a
forward builds the `LoraBatchPlan` (`lora_ops.make_plan`) and every other layer reuses it.
`layers.inject_lora` puts these layers into a model; `layer_dispatch` says which base layers
they can wrap.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from loraplex.errors import FailedPrecondition, InvalidArgument
from loraplex.runtime.api.slots import SlotLayout
from loraplex.runtime.lora.dispatch import WrapSpec, base_weight
from loraplex.runtime.lora.dora import add_dora, dora_gain
from loraplex.runtime.lora.ops import (
    Kernel,
    LoraBatchPlan,
    add_lora,
    make_plan,
)

# --------------------------------------------------------------------------- batch state


class LoraBatch:
    """Slots of the current step, shared by all layers of one injection.

    `row_slots # [B]`: every token of row i uses slot row_slots[i]; a layer input
    `[B, S, in]` (or `[B*S, in]`, rows contiguous) gets token slots `repeat_interleave(S)`.
    `token_slots # [T]` (set_tokens) serves packed/ragged inputs `[T, in]` directly.
    The plan is built on the first layer call of a step and cached per token count.
    """

    def __init__(self, slot_ranks: list[int], device: torch.device,
                 kernel: Kernel = "auto", slot_dora: list[bool] | None = None,
                 layout: SlotLayout | None = None) -> None:
        self._slot_ranks = slot_ranks  # [max_slots+1], owned by the injection, read live
        self.layout = layout  # the stacks' rank buckets (None: one stack)
        # [max_slots+1]: the slot holds a DoRA adapter; owned by the injection, read live
        self.slot_dora = slot_dora if slot_dora is not None else [False] * len(slot_ranks)
        self._device = device
        self.kernel = kernel  # lora_ops.make_plan's choice: "auto" | "torch" | "triton"
        self._row_slots: Tensor | None = None  # [B] int64 on cpu
        self._token_slots: Tensor | None = None  # [T] int64 on cpu
        self._plans: dict[tuple[int, int | None], LoraBatchPlan | None] = {}

    def set_rows(self, row_slots: Tensor) -> None:
        self._row_slots, self._token_slots, self._plans = row_slots, None, {}

    def set_tokens(self, token_slots: Tensor) -> None:
        self._row_slots, self._token_slots, self._plans = None, token_slots, {}

    def clear(self) -> None:
        self._row_slots, self._token_slots, self._plans = None, None, {}

    def set_plan(self, plan: LoraBatchPlan) -> None:
        """Use `plan` (one token per row) until the next `set_*`: the static decode path
        builds it over its fixed buffers, so no layer plans or copies inside a CUDA graph."""
        n = plan.num_tokens
        self._row_slots, self._token_slots, self._plans = None, None, {(n, n): plan,
                                                                       (n, None): plan}

    def invalidate(self) -> None:
        """Slot contents (ranks) changed: rebuild plans on the next call."""
        self._plans = {}

    def note_rank(self, slot: int, rank: int) -> None:
        """A layer loaded rank `rank` into `slot`. The shared table keeps the max over layers
        (a rank too high for some layer only costs its zero padding; too low would be wrong)."""
        if rank > self._slot_ranks[slot]:
            self._slot_ranks[slot] = rank
            self._plans = {}

    def note_dora(self, slot: int, dora: bool) -> None:
        """A layer loaded a DoRA (or a plain LoRA) adapter into `slot`."""
        if self.slot_dora[slot] != dora:
            self.slot_dora[slot] = dora
            self._plans = {}

    def plan_for(self, num_tokens: int, rows: int | None = None) -> LoraBatchPlan | None:
        """The plan for a layer input of `num_tokens` rows (`rows`: its batch dim if it has
        one, checked against row_slots); None = no adapter in the batch."""
        key = (num_tokens, rows)
        if key in self._plans:
            return self._plans[key]
        slots = self._token_slots_for(num_tokens, rows)
        plan = None
        if slots is not None and bool(slots.any()):
            plan = make_plan(slots, slot_ranks=self._slot_ranks, device=self._device,
                             kernel=self.kernel, slot_dora=self.slot_dora, layout=self.layout)
        self._plans[key] = plan
        return plan

    def _token_slots_for(self, num_tokens: int, rows: int | None) -> Tensor | None:
        if self._token_slots is not None:
            if self._token_slots.numel() != num_tokens:
                raise InvalidArgument(f"token_slots has {self._token_slots.numel()} entries, "
                                      f"the layer input {num_tokens} tokens", field="token_slots")
            return self._token_slots
        if self._row_slots is None:
            return None
        n = self._row_slots.numel()
        if n == 0 or num_tokens % n or (rows is not None and rows != n):
            raise InvalidArgument(f"row_slots has {n} rows, the layer input "
                                  f"{rows if rows is not None else '?'} rows / {num_tokens} "
                                  "tokens", field="row_slots")
        return self._row_slots.repeat_interleave(num_tokens // n)  # [T]


# --------------------------------------------------------------------------- the layer


def b_stack(slots: int, out: int, rank: int, dtype: torch.dtype,
            device: torch.device) -> Tensor:
    """A zeroed B stack `[slots, out, rank]`. On CPU its memory is laid out `[slots, rank,
    out]` (the tensor is a transposed view): the expand `h @ B[s]ᵀ` has an inner size of
    only `rank`, and CPU BLAS runs it about 3x faster when each of `B[s]ᵀ`'s rank rows is
    contiguous (measured: 3.5 vs 11 µs for one decode row, out 2816, rank 8); every torch
    strategy reads `B[s]ᵀ`, so they all get the fast layout. The Triton kernels (CUDA) read
    stacks whose last dim is contiguous, so CUDA keeps `[slots, out, rank]` memory."""
    if device.type == "cpu":
        return torch.zeros(slots, rank, out, dtype=dtype, device=device).transpose(1, 2)
    return torch.zeros(slots, out, rank, dtype=dtype, device=device)


class BatchedLoraLayer(nn.Module):
    """`base(x) + scale[s] * B[s] @ (A[s] @ x)` per token, `s` from the shared LoraBatch; for
    a DoRA slot, each output feature (bias aside) then times magnitude / ‖W + s·B·A‖."""

    def __init__(self, base_layer: nn.Module, spec: WrapSpec, *, layout: SlotLayout,
                 batch: LoraBatch, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.kind = spec.kind
        self.in_features = spec.in_features
        self.out_features = spec.out_features
        self.layout = layout
        self.max_slots = max_slots = layout.max_slots
        self.max_rank = layout.max_rank
        dt, dev = dtype or spec.dtype, spec.device
        self._stack_names = [stack_names(k) for k in range(len(layout.buckets))]
        for (a_name, b_name), bucket in zip(self._stack_names, layout.buckets, strict=True):
            self.register_buffer(a_name, torch.zeros(bucket.rows, bucket.rank,
                                                     spec.in_features, dtype=dt, device=dev),
                                 persistent=False)
            self.register_buffer(b_name, b_stack(bucket.rows, spec.out_features, bucket.rank,
                                                 dt, torch.device(dev)), persistent=False)
        # fp32 whatever the stacks: alpha/sqrt(r) is not rounded to a half's 8-11 bits
        self.register_buffer("lora_scale", torch.zeros(max_slots + 1, dtype=torch.float32,
                                                       device=dev), persistent=False)
        # fp32: DoRA's per-feature factor − 1, written once per activation (`dora_gain`)
        self.register_buffer("lora_dora", torch.zeros(max_slots + 1, spec.out_features,
                                                      dtype=torch.float32, device=dev),
                             persistent=False)
        self.lora_a: Tensor  # [S_0, R_0, in] the first bucket's A stack (slot 0 is its row 0)
        self.lora_b: Tensor  # [S_0, out, R_0]
        self.lora_scale: Tensor  # [max_slots+1]
        self.lora_dora: Tensor  # [max_slots+1, out]
        self.ranks = [0] * (max_slots + 1)  # true rank loaded in each slot (0 = empty)
        self._batch = batch

    @property
    def a_stacks(self) -> tuple[Tensor, ...]:
        """A stack per rank bucket, `[S_k, R_k, in]` (read each call: `.to()` replaces them)."""
        return tuple(self._buffers[a] for a, _ in self._stack_names)

    @property
    def b_stacks(self) -> tuple[Tensor, ...]:
        """B stack per rank bucket, `[S_k, out, R_k]`."""
        return tuple(self._buffers[b] for _, b in self._stack_names)

    # the base layer's tensors stay reachable as HF code sometimes reads `proj.weight`
    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base_layer.bias

    def _check_slot(self, slot: int) -> None:
        if not 1 <= slot <= self.max_slots:
            raise InvalidArgument(f"slot must be in 1..{self.max_slots}, got {slot}",
                                  field="slot")

    @torch.no_grad()
    def set_slot(self, slot: int, a: Tensor, b: Tensor, scale: float,
                 dora: Tensor | None = None) -> None:
        """Copy one adapter's `a # [r, in]`, `b # [out, r]` into `slot`, zero-padded to the
        rank of the slot's bucket (RankTooLarge if r is above it).
        `dora # [out]`: a DoRA adapter's `dora_gain` row (`self.dora_gain`); None = LoRA."""
        self._check_slot(slot)
        r = self.check_shapes(a, b)
        k, row = self._stack_row(slot, r)
        stack_a, stack_b = self.a_stacks[k], self.b_stacks[k]
        if dora is not None and tuple(dora.shape) != (self.out_features,):
            raise IncompatibleShapes(f"DoRA factor of shape {tuple(dora.shape)} does not fit "
                                     f"a layer with {self.out_features} outputs",
                                     field="lora_magnitude_vector")
        # non_blocking: from pinned host memory (the engine pins on CUDA) the copies queue on
        # the current stream (the pool's copy stream) without stalling the host
        stack_a[row, :r].copy_(a, non_blocking=True)
        stack_a[row, r:].zero_()
        stack_b[row, :, :r].copy_(b, non_blocking=True)
        stack_b[row, :, r:].zero_()
        self.lora_scale[slot].fill_(float(scale))
        if dora is None:
            self.lora_dora[slot].zero_()
        else:
            self.lora_dora[slot].copy_(dora, non_blocking=True)
        self.ranks[slot] = r
        self._batch.note_rank(slot, r)
        if dora is not None:
            self._batch.note_dora(slot, True)

    @torch.no_grad()
    def dora_gain(self, a: Tensor, b: Tensor, scale: float, magnitude: Tensor) -> Tensor:
        """A DoRA adapter's factor for this layer, `# [out]` fp32 on the host: magnitude over
        the norm of each output feature's row of `W + scale·b@a`, minus one, with `W` this
        layer's base weight (dequantized, as peft reads it). Pure: the slot is not touched,
        so loader threads compute it once and `set_slot` only copies it."""
        self.check_shapes(a, b)
        if tuple(magnitude.shape) != (self.out_features,):
            raise IncompatibleShapes(f"DoRA magnitude of shape {tuple(magnitude.shape)} does "
                                     f"not fit a layer with {self.out_features} outputs",
                                     field="lora_magnitude_vector")
        w = base_weight(self.base_layer, self.kind)  # [out, in]
        return dora_gain(w, a.to(w.device), b.to(w.device), scale,
                         magnitude.to(w.device)).cpu()

    def check_shapes(self, a: Tensor, b: Tensor) -> int:
        """The rank of (a, b), or a typed error if they cannot go into this layer."""
        if a.dim() != 2 or b.dim() != 2:
            raise InvalidArgument(f"lora_A/lora_B must be 2-D, got {tuple(a.shape)} and "
                                  f"{tuple(b.shape)}", field="tensors")
        r = int(a.shape[0])
        if tuple(a.shape) != (r, self.in_features) or tuple(b.shape) != (self.out_features, r):
            raise IncompatibleShapes(
                f"adapter shapes A{tuple(a.shape)} B{tuple(b.shape)} do not fit a layer "
                f"{self.in_features}->{self.out_features}", field="tensors")
        if r < 1:
            raise InvalidArgument("adapter rank must be >= 1 (lora_A has no rows)", field="r")
        if r > self.max_rank:
            raise RankTooLarge(f"adapter rank {r} exceeds this engine's max_rank "
                               f"{self.max_rank}", field="r")
        return r

    def _stack_row(self, slot: int, rank: int = 0) -> tuple[int, int]:
        """(bucket, row of its stacks) of `slot`; RankTooLarge if `rank` is above the
        bucket's (the pool puts an adapter only where it fits: this is the last check)."""
        k = self.layout.bucket_of_slot(slot)
        bucket = self.layout.buckets[k]
        if rank > bucket.rank:
            raise RankTooLarge(f"adapter rank {rank} does not fit slot {slot}, whose stacks "
                               f"hold ranks up to {bucket.rank}", field="r")
        return k, slot - bucket.base

    @torch.no_grad()
    def clear_slot(self, slot: int) -> None:
        self._check_slot(slot)
        k, row = self._stack_row(slot)
        self.a_stacks[k][row].zero_()
        self.b_stacks[k][row].zero_()
        self.lora_scale[slot].zero_()
        self.lora_dora[slot].zero_()
        self.ranks[slot] = 0

    def forward(self, x: Tensor) -> Tensor:  # x # [..., in]
        y = self.base_layer(x)  # [..., out]
        plan = self._batch.plan_for(x.numel() // self.in_features,
                                    x.shape[0] if x.dim() == 3 else None)
        if plan is None:
            return y
        if torch.is_grad_enabled() or not y.is_contiguous():
            y = y.clone(memory_format=torch.contiguous_format)  # never edit autograd outputs
        x2 = x.reshape(-1, self.in_features)  # [T, in]
        y2 = y.view(-1, self.out_features)  # [T, out]
        a, b = self.a_stacks, self.b_stacks
        if plan.triton:  # casts on load/store, accumulates in fp32
            add_lora(y2, x2, a, b, self.lora_scale, plan)
        else:
            if x2.dtype != self.lora_a.dtype:
                x2 = x2.to(self.lora_a.dtype)
            if y2.dtype == self.lora_a.dtype:
                add_lora(y2, x2, a, b, self.lora_scale, plan)
            else:
                d = x2.new_zeros(x2.shape[0], self.out_features)  # [T, out] in the LoRA dtype
                y2.add_(add_lora(d, x2, a, b, self.lora_scale, plan).to(y2.dtype))
        if plan.dora:
            add_dora(y2, self.base_layer.bias, self.lora_dora, plan)
        return y

    def extra_repr(self) -> str:
        return (f"kind={self.kind}, in={self.in_features}, out={self.out_features}, "
                f"rank_slots={self.layout.rank_slots}")


def stack_names(bucket: int) -> tuple[str, str]:
    """Buffer names of a rank bucket's A and B stacks: `lora_a`/`lora_b` for the first."""
    suffix = str(bucket) if bucket else ""
    return f"lora_a{suffix}", f"lora_b{suffix}"


class RankTooLarge(FailedPrecondition):
    """An adapter's rank exceeds the runtime's configured max_rank (or its slot's bucket)."""


class IncompatibleShapes(FailedPrecondition):
    """An adapter's tensors do not fit the base model's layers."""
