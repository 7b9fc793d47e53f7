"""The model side of a step: boot the base, then run forwards over row feeds.

    runner = Runner.boot(config)                   # engine thread: base, LoRA layers, KV rows
    out = runner.run(plan.decode, decode_slots, plan.prefill, prefill_slots)
    out.decode.logits                              # [B, V], one row per decode feed

A forward takes `RowFeed`s (KV row, start position, token ids) and one adapter slot per row,
lays them out left-padded (`kv.build_layout`), builds the attention mask (with the sliding
window where the model has one) and returns last-position logits. Decode (one token per
running sequence) and prefill (prompt chunks) are separate forwards, so a long prompt never
pads every decode row to its length. A forward that raises fails only its own rows.

With `EngineConfig.cuda_graphs` (or `static_decode`, the same path without capture) the
decode forward goes through `decode_graphs.StaticDecode`: padded to a bucket, fixed input
buffers, a CUDA graph replayed per bucket; prefill stays eager. Otherwise a Llama-
architecture base decodes through `llama_decode` (the same arithmetic without transformers'
module wrappers; `EngineConfig.llama_decode`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from loraplex import compute
from loraplex.errors import InvalidArgument, LoraplexError
from loraplex.runtime.kv.cache import BlockKVCache, RowAllocator, RowFeed, build_layout
from loraplex.runtime.model import llama_decode, packed
from loraplex.runtime.model.decode_graphs import StaticDecode
from loraplex.runtime.model.masks import MaskSpec, mask_spec, step_mask

if TYPE_CHECKING:
    from loraplex.fingerprint import BaseFingerprint
    from loraplex.runtime.api.types import EngineConfig
    from loraplex.runtime.lora.layers import LoraInjection

log = logging.getLogger(__name__)
MAX_CONTEXT = 4096


@dataclass(frozen=True)
class KvUsage:
    """The KV cache's size and the prefix cache's counters, for `EngineStats`."""

    reserved_bytes: int
    used_bytes: int
    limit_bytes: int
    prefix_lookups: int
    prefix_hits: int
    prefix_hit_tokens: int


@dataclass(frozen=True)
class Forward:
    """One forward's outcome: `logits # [B, V]` for `feeds`, or the error that failed them."""

    feeds: tuple[RowFeed, ...]
    logits: torch.Tensor | None = None
    error: LoraplexError | None = None


@dataclass(frozen=True)
class StepOutputs:
    decode: Forward
    prefill: Forward

    @property
    def rows(self) -> int:
        return len(self.decode.feeds) + len(self.prefill.feeds)


def forward(model: Any, kv: BlockKVCache, injection: LoraInjection, mask: MaskSpec,
            feeds: Sequence[RowFeed], slots: Sequence[int], device: torch.device) -> torch.Tensor:
    """One model forward over `feeds`; `slots # [B]` adapter slot per row → logits `[B, V]`."""
    layout = build_layout(feeds, device)
    kv.reserve(feeds)
    kv.set_layout(layout)
    injection.set_batch(list(slots))
    with torch.inference_mode():
        out = model(input_ids=layout.input_ids, position_ids=layout.position_ids,
                    attention_mask=step_mask(layout, mask), cache=kv, use_cache=True,
                    logits_to_keep=1)
    return out.logits[:, -1].float()  # [B, V]


class Runner:
    """Owns the model, its LoRA layers and the KV rows; engine thread only."""

    def __init__(self, model: Any, tokenizer: Any, fingerprint: BaseFingerprint,
                 injection: LoraInjection, kv: BlockKVCache, mask: MaskSpec,
                 max_seq_len: int, max_batch: int, device: torch.device) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.fingerprint = fingerprint
        self.injection = injection
        self.kv = kv
        self.mask = mask
        self.max_seq_len = max_seq_len
        self.rows = RowAllocator(max_batch)
        self.rows_total = max_batch
        self.device = device
        self.compute: compute.ComputeChoice | None = None  # set by `boot`: the dtype and why
        self.gemm: packed.GemmChoice | None = None  # set by `boot`: packed weights or not, why
        self.vocab_size = int(model.config.get_text_config().vocab_size)
        self.eos = eos_ids(model, tokenizer)
        self.lora_dtype = next(iter(injection.layers.values())).lora_a.dtype
        self.static: StaticDecode | None = None  # decode through fixed buffers / CUDA graphs
        # decode steps through llama_decode (set by `boot` when the base is one it runs)
        self.llama_decode = False

    @classmethod
    def boot(cls, cfg: EngineConfig) -> Runner:
        """Load the base, wrap its target modules, allocate the KV pools (by a warm-up
        forward, from the shapes the model produces; they grow and shrink by blocks). With
        `cuda_graphs`, capture one decode step as a probe: a base whose decode step cannot
        be captured is refused here, typed, not at the first request."""
        from loraplex.runtime.lora.layers import inject_lora
        from loraplex.runtime.model.head import chunk_lm_head
        from loraplex.runtime.model.loading import load_base

        device = torch.device(cfg.device if cfg.device != "auto"
                              else ("cuda" if torch.cuda.is_available() else "cpu"))
        check_cuda_graphs(cfg.cuda_graphs, device)
        choice = compute.choose(cfg.compute_dtype, device, quantization=cfg.quantization)
        log.info("serving a %s base: %s", cfg.quantization, choice.line())
        base = load_base(cfg.base_dir, quantization=cfg.quantization,
                         compute_dtype=choice.torch_dtype, device=device)
        model = base.model
        model.eval()
        mcfg = model.config.get_text_config()
        limit = int(getattr(mcfg, "max_position_embeddings", 0) or MAX_CONTEXT)
        max_seq_len = min(cfg.max_seq_len or min(limit, MAX_CONTEXT), limit)
        injection = inject_lora(model, cfg.target_modules, cfg.max_slots, cfg.max_rank,
                                cfg.lora_stack_dtype, rank_slots=cfg.slot_layout.rank_slots)
        gemm = packed.choose(cfg.base_gemm, device, choice.torch_dtype)
        if gemm.kind == "packed":  # the layers the injection wraps, the others, the LM head
            log.info("%d linear layers on oneDNN", packed.pack_linears(model, cfg.max_batch))
        else:
            chunk_lm_head(model)  # CPU fp32: the LM head in cache-sized vocabulary chunks
        kv = BlockKVCache(int(mcfg.num_hidden_layers), cfg.max_batch, max_seq_len,
                          cfg.kv_block_size, cfg.prefix_cache_blocks,
                          stable=cfg.cuda_graphs)  # a graph holds the pools' addresses
        runner = cls(model, base.tokenizer, base.fingerprint, injection, kv,
                     mask_spec(model), max_seq_len, cfg.max_batch, base.device)
        runner.compute, runner.gemm = choice, gemm
        why_not = llama_decode.unsupported(model)
        runner.llama_decode = cfg.llama_decode and why_not is None
        log.info("decode steps: %s", "llama_decode" if runner.llama_decode else
                 f"the model's forward ({why_not or 'llama_decode off'})")
        runner.forward([RowFeed(0, 0, [0])], [0])  # warm-up: allocates the KV pools
        if cfg.cuda_graphs or cfg.static_decode:
            runner.static = runner.static_decode(capture=cfg.cuda_graphs)
            runner.static.forward([RowFeed(0, 0, [0])], [0], strict=True)  # the probe
        runner.release_row(0)
        return runner

    def static_decode(self, *, capture: bool) -> StaticDecode:
        """The padded decode path over this runner's model, KV and LoRA layers; the LoRA
        plan is the static Triton one where the layers would use Triton, else the torch
        strategies on the padded slots (never captured)."""
        from loraplex.runtime.lora.ops import triton_ready

        kernel = self.injection.batch.kernel
        triton = kernel == "triton" or (kernel == "auto" and self.device.type == "cuda"
                                        and triton_ready())
        return StaticDecode(self.model, self.kv, self.injection, self.mask, self.device,
                            max_batch=self.rows_total, capture=capture,
                            lora="static" if triton else "rows")

    def forward(self, feeds: Sequence[RowFeed], slots: Sequence[int]) -> torch.Tensor:
        return forward(self.model, self.kv, self.injection, self.mask, feeds, slots,
                       self.device)

    def release_row(self, row: int, *, compact: bool = True) -> None:
        """A sequence left the batch: its KV row and KV blocks go back (the pools compact
        now, or with `compact=False` at the caller's `compact_kv()`)."""
        self.kv.release(row, compact=compact)
        self.rows.give(row)

    def compact_kv(self) -> None:
        """Shrink the KV pools once for every row released with `compact=False`."""
        self.kv.compact()

    def reuse_prefix(self, row: int, tenant: str, digest: str | None,
                     prompt: Sequence[int]) -> int:
        """Give a new `row` the cached KV blocks of `prompt`'s longest cached prefix of
        this tenant under this adapter (`digest`); returns the prompt positions that need
        no prefill."""
        return self.kv.blocks.match(row, tenant, digest, prompt)

    def share_prefix(self, row: int, tenant: str, digest: str | None, prompt: Sequence[int],
                     upto: int) -> None:
        """`row` has computed positions `0..upto-1` of `prompt`: offer its full blocks to
        the same tenant's later prompts with the same prefix and adapter."""
        self.kv.blocks.publish(row, tenant, digest, prompt, upto)

    def kv_usage(self) -> KvUsage:
        blocks = self.kv.blocks
        return KvUsage(reserved_bytes=self.kv.nbytes(), used_bytes=self.kv.used_bytes(),
                       limit_bytes=self.kv.limit_bytes(),
                       prefix_lookups=blocks.prefix_lookups, prefix_hits=blocks.prefix_hits,
                       prefix_hit_tokens=blocks.prefix_hit_tokens)

    def decode(self, feeds: Sequence[RowFeed], slots: Sequence[int]) -> torch.Tensor:
        """A decode forward (one token per row): the static path when it is on, else
        `llama_decode` where the base allows it, else the model's own forward."""
        if self.static is not None:
            return self.static.forward(feeds, slots)
        if self.llama_decode:
            return llama_decode.forward(self.model, self.kv, self.injection, self.mask, feeds,
                                        slots, self.device)
        return self.forward(feeds, slots)

    def run(self, decode: Sequence[RowFeed], decode_slots: Sequence[int],
            prefill: Sequence[RowFeed], prefill_slots: Sequence[int]) -> StepOutputs:
        """The step's decode forward, then its prefill forward (always eager). Each forward
        takes its rows grouped by adapter slot (`group_by_slot`); its `Forward.feeds` say
        which row each line of the logits belongs to."""
        return StepOutputs(self._safe(self.decode, *group_by_slot(decode, decode_slots)),
                           self._safe(self.forward, *group_by_slot(prefill, prefill_slots)))

    def _safe(self, fn: Any, feeds: Sequence[RowFeed], slots: Sequence[int]) -> Forward:
        if not feeds:
            return Forward(())
        try:
            return Forward(tuple(feeds), logits=fn(feeds, slots))
        except Exception as e:  # noqa: BLE001 - fail these rows, keep serving
            log.exception("forward failed for %d rows", len(feeds))
            err = e if isinstance(e, LoraplexError) else LoraplexError(
                f"internal error in the forward pass: {type(e).__name__}")
            return Forward(tuple(feeds), error=err)


def group_by_slot(feeds: Sequence[RowFeed], slots: Sequence[int]
                  ) -> tuple[tuple[RowFeed, ...], tuple[int, ...]]:
    """`feeds` and their `slots # [B]` reordered so rows of one adapter slot are adjacent
    (ascending slot; within a slot, the order they came in).

    The LoRA layers then find each adapter's rows as one contiguous run: with every row on
    an adapter and equal runs, the "grouped" strategy multiplies views of the activations
    with no gather before and no scatter after, and "segments" needs no permutation
    (`runtime/lora/ops.py`): -22% of the LoRA time over SmolLM2's 210 projections at 16
    and 32 decode rows of 8 adapters (bench/results/peer.md), a few percent of the whole
    step (bench/results/roofline.md). Every row keeps its own KV row, positions and logits
    line, so the order changes no row's output."""
    order = sorted(range(len(feeds)), key=slots.__getitem__)
    return tuple(feeds[i] for i in order), tuple(slots[i] for i in order)


def check_cuda_graphs(wanted: bool, device: torch.device) -> None:
    """`cuda_graphs` on a machine that cannot capture is a configuration error, said at
    boot (never a silent fallback to eager decoding)."""
    if not wanted:
        return
    if device.type != "cuda":
        raise InvalidArgument(f"`cuda_graphs` needs a CUDA device; this engine runs on "
                              f"{device.type} (torch sees no CUDA device, or `device` says "
                              "cpu): turn cuda_graphs off", field="cuda_graphs")
    from loraplex.runtime.lora.ops import triton_ready

    if not triton_ready():
        raise InvalidArgument("`cuda_graphs` needs the Triton LoRA kernels (a capturable, "
                              "fixed-grid LoRA op) and triton does not import: install "
                              "loraplex[gpu] or turn cuda_graphs off", field="cuda_graphs")


def eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    for src in (getattr(model, "generation_config", None), model.config, tokenizer):
        v = getattr(src, "eos_token_id", None) if src is not None else None
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, list | tuple):
            ids.update(int(x) for x in v)
    return frozenset(ids)
