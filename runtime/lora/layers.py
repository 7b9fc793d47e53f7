"""Batched LoRA layers put into a model: `inject_lora` and the `LoraInjection` the engine drives.

    inj = inject_lora(model, default_target_modules(model), max_slots=32, max_rank=16)
    inj.load_adapter(3, loaded.tensors, r=8, alpha=16, use_rslora=False)  # peft tensors -> slot 3
    inj.set_batch([3, 0, 3, 7])        # row_slots # [B]: every token of row i uses slot row_slots[i]
    logits = model(input_ids).logits   # rows 0 and 2 see adapter 3, row 1 the plain base

The layers themselves (`BatchedLoraLayer`, its slot stacks, and the `LoraBatch` all layers of
one injection share) are in `batched_layer.py`; which base layers can be wrapped, in
`layer_dispatch.py`.

Notes for callers (the engine):
- Call `set_batch(row_slots)` before every forward whose rows or slots changed; the plan is
  cached per input shape until the next `set_batch`/`set_token_slots`/`load_adapter`/
  `clear_slot`. Inputs are `[B, S, in]` (row-major: row i owns tokens i*S .. i*S+S-1); for
  ragged/packed batches use `set_token_slots(token_slots # [T])`. `clear_batch()` = base only.
- Keep active slots dense (hand out the lowest free slot): the fast decode strategy reads the
  contiguous slot range lo..hi, and falls back to a per-slot loop when that range holds more
  than 1.5x as many slots as the batch uses.
- `injection.load_adapter` validates everything before copying (a rejected adapter leaves the
  slot as it was) and keeps the per-slot rank table exact; calling `layer.set_slot` directly
  also works (the table keeps the max rank seen; `injection.clear_slot` resets it).
- Copy into a slot between forward steps, never while a step using that slot runs.
- Errors: `RankTooLarge` / `IncompatibleShapes` (FAILED_PRECONDITION), `InvalidArgument`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from loraplex import peft_format
from loraplex.errors import InvalidArgument, quote
from loraplex.runtime.api.slots import SlotLayout, check_rank_slots, default_rank_slots
from loraplex.runtime.lora.batched import (
    BatchedLoraLayer,
    IncompatibleShapes,
    LoraBatch,
    RankTooLarge,
)
from loraplex.runtime.lora.dispatch import dispatch
from loraplex.runtime.lora.ops import KERNELS, Kernel

# --------------------------------------------------------------------------- targets


def _wrappable(model: nn.Module) -> dict[str, nn.Module]:
    """Module path -> module for every layer `all-linear` means (peft_format.linear_modules:
    linear layers but the output head; a BatchedLoraLayer counts as the layer it wraps)."""
    return {n: model.get_submodule(n)
            for n in peft_format.linear_modules(model, wrappers=(BatchedLoraLayer,))}


def default_target_modules(model: nn.Module) -> list[str]:
    """Leaf names of every layer `all-linear` means (not lm_head/embeddings), e.g.
    ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]."""
    return peft_format.leaf_names(_wrappable(model))


class LoraInjection:
    """The BatchedLoraLayers put into one model, and the shared per-step batch state."""

    def __init__(self, model: nn.Module, layers: dict[str, BatchedLoraLayer], batch: LoraBatch,
                 slot_ranks: list[int], layout: SlotLayout) -> None:
        self.model = model
        self.layers = layers  # module path -> layer, e.g. "model.layers.0.self_attn.q_proj"
        self.batch = batch
        self.slot_ranks = slot_ranks  # [max_slots+1] max true rank over layers, 0 = empty
        self.slot_dora = batch.slot_dora  # [max_slots+1] the slot holds a DoRA adapter
        self.layout = layout  # the rank buckets every layer's stacks are cut into
        self.max_slots = layout.max_slots  # in all buckets
        self.max_rank = layout.max_rank

    # ---- per step
    def set_batch(self, row_slots: Tensor | Sequence[int]) -> None:
        """`row_slots # [B]` for the next forward(s); all tokens of a row share its slot."""
        self.batch.set_rows(self._slots(row_slots, "row_slots"))

    def set_token_slots(self, token_slots: Tensor | Sequence[int]) -> None:
        """`token_slots # [T]` for packed inputs whose layers see `[T, in]` (or `[1, T, in]`)."""
        self.batch.set_tokens(self._slots(token_slots, "token_slots"))

    def clear_batch(self) -> None:
        """No adapter for any token until the next set_batch."""
        self.batch.clear()

    def _slots(self, slots: Tensor | Sequence[int], field: str) -> Tensor:
        t = torch.as_tensor(slots, dtype=torch.int64, device="cpu").reshape(-1)  # [B] or [T]
        if t.numel() and (int(t.min()) < 0 or int(t.max()) > self.max_slots):
            raise InvalidArgument(f"{field} must be in 0..{self.max_slots}", field=field)
        return t

    # ---- adapters
    def load_adapter(self, slot: int, tensors: Mapping[str, Tensor], r: int, alpha: float,
                     use_rslora: bool = False, *, rank_pattern: Mapping[str, int] | None = None,
                     alpha_pattern: Mapping[str, float] | None = None,
                     dora_gains: Mapping[str, Tensor] | None = None) -> list[str]:
        """Copy a peft adapter's lora_A/lora_B tensors into `slot` of every layer it targets;
        layers it does not target are cleared in that slot. Checks everything before the
        first copy, so a rejected adapter leaves the slot as it was. Returns the layer paths.

        `r`, `alpha`, `use_rslora`, `rank_pattern`, `alpha_pattern`: the adapter config's
        fields; the patterns override r/alpha per module (peft's matching), so each layer
        gets peft's own scale. A DoRA adapter (`lora_magnitude_vector` tensors beside every
        pair) is served with its per-feature factor: `dora_gains` (module -> `# [out]`, from
        `dora_gains` on a loader thread) or, when None, computed here from the base weights.
        """
        if not 1 <= slot <= self.max_slots:
            raise InvalidArgument(f"slot must be in 1..{self.max_slots}, got {slot}",
                                  field="slot")
        scaling = peft_format.LoraScaling(r, alpha, use_rslora, rank_pattern or (),
                                          alpha_pattern or ())  # refuses a bad r
        grouped = peft_format.pair_tensors(tensors)
        problems = [f"unsupported tensor {quote(k)} (only lora_A/lora_B weights and DoRA "
                    "magnitudes)" for k in grouped.unparsed]
        if grouped.dora:
            problems += [f"{quote(m)}: a DoRA adapter needs a lora_magnitude_vector for "
                         "every module" for m in grouped.pairs if m not in grouped.magnitudes]
        problems += [f"{quote(m)}: lora_A and lora_B must both be present"
                     for m, _ in grouped.incomplete]
        problems += [f"{quote(m)} is not an injected layer"
                     for m in grouped.pairs if m not in self.layers]
        pairs = {m: ab for m, ab in grouped.pairs.items() if m in self.layers}
        if not grouped.pairs and not problems:
            problems.append("no lora_A/lora_B tensors")
        if problems:
            raise IncompatibleShapes("adapter does not fit this base: " + "; ".join(problems),
                                     field="tensors")
        ranks = {p: self.layers[p].check_shapes(a, b)
                 for p, (a, b) in pairs.items()}  # raises RankTooLarge / IncompatibleShapes
        fits = self.layout.buckets[self.layout.bucket_of_slot(slot)].rank
        if max(ranks.values()) > fits:
            raise RankTooLarge(f"adapter rank {max(ranks.values())} does not fit slot {slot}, "
                               f"whose stacks hold ranks up to {fits}", field="r")
        gains: Mapping[str, Tensor] = {}
        if grouped.dora:
            gains = dora_gains if dora_gains is not None else self.dora_gains(
                tensors, r, alpha, use_rslora, rank_pattern=rank_pattern,
                alpha_pattern=alpha_pattern)
            if missing := sorted(set(pairs) - set(gains)):
                raise IncompatibleShapes(f"no DoRA factor for {quote(missing[0])}",
                                         field="lora_magnitude_vector")
        for path, layer in self.layers.items():
            if path in pairs:
                layer.set_slot(slot, *pairs[path], scaling.scale(path), gains.get(path))
            elif layer.ranks[slot]:
                layer.clear_slot(slot)
        self.slot_ranks[slot] = max(ranks.values())  # exact now: every layer was written
        self.slot_dora[slot] = grouped.dora
        self.batch.invalidate()
        return sorted(pairs)

    def dora_gains(self, tensors: Mapping[str, Tensor], r: int, alpha: float,
                   use_rslora: bool = False, *, rank_pattern: Mapping[str, int] | None = None,
                   alpha_pattern: Mapping[str, float] | None = None) -> dict[str, Tensor]:
        """A DoRA adapter's factors, module -> `# [out]` fp32 on the host ({} for plain
        LoRA): magnitude / ‖W + s·B·A‖ − 1 per output feature (`BatchedLoraLayer.dora_gain`).
        Reads the base weights and writes nothing, so loader threads run it once per load
        and an activation is only copies. Raises IncompatibleShapes, InvalidArgument."""
        grouped = peft_format.pair_tensors(tensors)
        scaling = peft_format.LoraScaling(r, alpha, use_rslora, rank_pattern or (),
                                          alpha_pattern or ())
        gains: dict[str, Tensor] = {}
        for path, m in grouped.magnitudes.items():
            layer = self.layers.get(path)
            if layer is None or path not in grouped.pairs:
                raise IncompatibleShapes(f"DoRA magnitude {quote(path)} has no LoRA layer "
                                         "and pair to go with", field="lora_magnitude_vector")
            a, b = grouped.pairs[path]
            gains[path] = layer.dora_gain(a, b, scaling.scale(path), m)
        return gains

    def clear_slot(self, slot: int) -> None:
        for layer in self.layers.values():
            layer.clear_slot(slot)
        self.slot_ranks[slot] = 0
        self.slot_dora[slot] = False
        self.batch.invalidate()

    def remove(self) -> nn.Module:
        """Put the original base layers back; returns the model."""
        for path, layer in self.layers.items():
            parent, _, leaf = path.rpartition(".")
            setattr(self.model.get_submodule(parent) if parent else self.model, leaf,
                    layer.base_layer)
        self.layers = {}
        return self.model


STACK_DTYPES: dict[str, torch.dtype | None] = {
    "auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
}


def resolve_stack_dtype(stack_dtype: torch.dtype | str | None,
                        device: torch.device) -> torch.dtype:
    """The adapter stacks' dtype: None/"auto" = bfloat16 on CUDA (half the slot memory and
    copy bytes, tensor-core matmuls), float32 on CPU (exact peft equality in fp32)."""
    if isinstance(stack_dtype, torch.dtype):
        if stack_dtype not in STACK_DTYPES.values():
            raise InvalidArgument(f"stack_dtype must be one of {tuple(STACK_DTYPES)}",
                                  field="stack_dtype")
        return stack_dtype
    if stack_dtype is not None and stack_dtype not in STACK_DTYPES:
        raise InvalidArgument(f"stack_dtype must be one of {tuple(STACK_DTYPES)}, "
                              f"got {quote(stack_dtype)}", field="stack_dtype")
    chosen = STACK_DTYPES.get(stack_dtype or "auto")
    if chosen is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return chosen


def inject_lora(model: nn.Module, target_modules: str | Sequence[str] | None, max_slots: int,
                max_rank: int, stack_dtype: torch.dtype | str | None = None, *,
                kernel: Kernel = "auto",
                rank_slots: Sequence[tuple[int, int]] | None = None) -> LoraInjection:
    """Replace every module matching `target_modules` (peft's rules, `peft_format`: a list of
    names, a full-match regex, or "all-linear"; None = "all-linear") with a BatchedLoraLayer
    holding adapter slots (plus slot 0) of rank up to `max_rank`, in rank buckets
    (runtime/api/slots.py): `rank_slots` `(rank, slots)` pairs, whose largest rank must be
    `max_rank`, or None = `default_rank_slots(max_slots, max_rank)` (`max_slots` slots up to
    rank 16, fewer of larger ranks; one bucket of `max_slots` when `max_rank` < 64).

    `stack_dtype`: of the A/B stacks (`resolve_stack_dtype`: "auto" = bf16 on CUDA, fp32 on
    CPU; the scales stay fp32). Against fp32 stacks, bf16 stacks moved the micro base's
    logits by up to 6e-3 and flipped 0.8% of greedy picks, at near-ties (docs/gpu.md,
    "Adapter stacks in half precision"). `kernel`: "auto" = the Triton kernels on CUDA, torch on CPU."""
    if max_slots < 1:
        raise InvalidArgument("`max_slots` must be >= 1", field="max_slots")
    if max_rank < 1:
        raise InvalidArgument("`max_rank` must be >= 1", field="max_rank")
    targets = peft_format.parse_targets(peft_format.ALL_LINEAR if target_modules is None
                                        else target_modules)
    candidates = {n: m for n, m in _wrappable(model).items()
                  if not isinstance(m, BatchedLoraLayer) and dispatch(m) is not None}
    found = [(n, candidates[n]) for n in targets.select(candidates)]
    if not found:
        raise InvalidArgument("no module of the model matches target_modules "
                              f"{quote(target_modules)}", field="target_modules")
    if kernel not in KERNELS:
        raise InvalidArgument(f"kernel must be one of {KERNELS}", field="kernel")
    layout = slot_layout(max_slots, max_rank, rank_slots)
    slot_ranks = [0] * (layout.max_slots + 1)
    device = dispatch(found[0][1]).device
    dtype = resolve_stack_dtype(stack_dtype, device)
    batch = LoraBatch(slot_ranks, device, kernel, layout=layout)
    layers: dict[str, BatchedLoraLayer] = {}
    for name, mod in found:
        layer = BatchedLoraLayer(mod, dispatch(mod), layout=layout, batch=batch, dtype=dtype)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, layer)
        layers[name] = layer
    return LoraInjection(model, layers, batch, slot_ranks, layout)


def slot_layout(max_slots: int, max_rank: int,
                rank_slots: Sequence[tuple[int, int]] | None = None) -> SlotLayout:
    """The rank buckets `inject_lora` cuts the slots into (InvalidArgument naming
    `rank_slots` if its largest rank is not `max_rank`)."""
    if rank_slots is None:
        return SlotLayout.of(default_rank_slots(max_slots, max_rank))
    pairs = check_rank_slots(rank_slots)
    if pairs[-1][0] != max_rank:
        raise InvalidArgument(f"`rank_slots` holds ranks up to {pairs[-1][0]} and `max_rank` is "
                              f"{max_rank}: set max_rank to {pairs[-1][0]} too",
                              field="rank_slots")
    return SlotLayout.of(pairs)
