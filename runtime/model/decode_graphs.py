"""The decode step through fixed-shape buffers, replayed as CUDA graphs with `cuda_graphs`.

    decoder = StaticDecode(model, kv, injection, mask, device, max_batch=32, capture=True)
    logits = decoder.forward(feeds, slots)      # [B, V]; feeds: one token per KV row

Why: an eager decode step launches several kernels per projection, hundreds per step, and on
a GPU a small model's step is bound by those launches, not by the math. A CUDA graph replays
them all in one launch, but only for fixed shapes and fixed addresses. So a decode step is
padded to a bucket — `B` rows up to the next of 1, 2, 4, … (and `max_batch`), `L` keys up
to the next power-of-two number of KV blocks — and its inputs go, in one host→device copy,
into one persistent buffer (token ids, positions, valid flags, adapter slots, KV rows, the
LoRA segment tables of `lora_ops.static_decode_table`, one per rank bucket of the adapter
stacks, the block table). The forward reads
only that buffer, the KV pools, the adapter stacks and the weights; with `capture=True` it is
captured once per (batch bucket, KV bucket), after a warm-up on the capture stream (triton
compiles, cuBLAS handles), and replayed. With `capture=False` the same buffers and the same
forward run eagerly: that is how the padded path is checked on CPU
(tests/runtime/model/test_decode_graphs.py) and how the GPU check separates padding from capture.

What a graph holds: the whole decode forward from the input buffer to the last-position
logits (embedding, every layer's base matmuls — bitsandbytes included — the LoRA
shrink/expand kernels over the static segment table, the KV write and block gather, masked
attention, the head). Not in it: filling the buffer (host lists from the block tables and
the slots, no device reads), sampling and grammar masks, and prefill, which stays eager
(its shapes change with every chunk). Slot copies run on the pool's copy stream and are
ordered before the replay on the GPU, as before an eager step.

Padding: a pad row (slot 0, position 0, not valid) writes only the scratch KV block and
attends only to key 0; a real row's keys past its position are masked. A real row's
logits are the eager step's up to floating-point summation order (more masked keys, more
rows in each matmul); the tests hold the tokens equal.

When graphs are re-captured: a graph holds the addresses of everything it reads. The input
buffer lives as long as the decoder. The adapter stacks are allocated once (`inject_lora`)
and only written in place — a slot copy changes their contents, which the graph reads at
replay — but a guard checks before each replay that every stack is still the tensor the
graphs read (`_drop_if_moved`). The KV pools are replaced when they are first allocated,
grow or compact (`BlockKVCache.generation`). On any change every graph is dropped and each
bucket is re-captured when next used. With `cuda_graphs` the pools are stable (`kv_blocks`:
grow to at least twice, never shrink), so that happens at most ~log2(max_blocks) times, and
reserved KV stays at its peak instead of following use. The prefix cache shares blocks through the block tables, which are inputs: a
hit, a publish or an eviction changes buffer contents, not addresses (its compaction is a
pool reallocation, and stable pools do not compact).

Memory: every graph keeps its output logits `[Bp, V]` fp32; all graphs share one memory
pool for their intermediates (a fresh pool after each drop), which holds about one eager decode step at the largest
captured bucket (dominated by a layer's gathered KV `[Bp, H, Lp, D]` and the logits). At
most len(batch buckets) × len(KV buckets) graphs: 6 × 9 = 54 at max_batch 32, 4,096
positions, 16-position blocks; they are captured lazily, only for the buckets traffic uses.
Sharing one pool across graphs replayed in any order is safe here because nothing a graph
writes is read after another graph runs: its logits are cloned right after its replay; the
KV pools and the input buffer are ordinary allocations outside the pool. Padding costs up to
2× rows and 2× keys of attention work per step.

Limits: a capture needs the "triton" LoRA plan (on CPU the padded path uses the torch
strategies on the padded slots), a model whose decode forward makes no host reads (dynamic
RoPE scaling, and likely LLM.int8's outlier split, would fail the capture: `Runner.boot` captures one
bucket as a probe and refuses such a base with a typed error), and a CUDA device. None of
this has run on a GPU yet: capture, replay and their speed are checked by
bench/gpu_check.sh (tests/runtime/engine/test_engine_cuda.py, bench/decode_graphs.py).
"""

from __future__ import annotations

import bisect
import logging
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

from loraplex.errors import FailedPrecondition, InvalidArgument
from loraplex.runtime.kv.cache import BlockKVCache, RowFeed, StepLayout
from loraplex.runtime.lora.ops import static_decode_plan, static_decode_table
from loraplex.runtime.model.masks import MaskSpec, step_mask

if TYPE_CHECKING:
    from loraplex.runtime.lora.layers import LoraInjection

log = logging.getLogger(__name__)
LoraMode = Literal["static", "rows"]  # static segment table (triton) | padded row slots (torch)
WARMUP = 2  # eager forwards on the capture stream before a capture (PyTorch's advice)
def buckets_up_to(limit: int) -> tuple[int, ...]:
    """1, 2, 4, … below `limit`, then `limit`: each size is padded to the next of these."""
    out, n = [], 1
    while n < limit:
        out.append(n)
        n *= 2
    return (*out, limit)


def bucket_of(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds `n`."""
    i = bisect.bisect_left(buckets, n)
    if i == len(buckets):
        raise InvalidArgument(f"{n} exceeds the largest decode bucket {buckets[-1]}",
                              field="decode")
    return buckets[i]


@dataclass(frozen=True)
class Bucket:
    rows: int  # Bp: batch rows, padded
    blocks: int  # Wp: KV blocks each row reads (Lp = Wp * block_size keys)


@dataclass(frozen=True)
class Views:
    """One bucket's tensors: views of the decoder's input buffer, same addresses each step."""

    ids: torch.Tensor  # [Bp, 1] token id (0 for pads)
    pos: torch.Tensor  # [Bp, 1] absolute position (0 for pads)
    valid: torch.Tensor  # [Bp, 1] 1 for a real row, 0 for a pad
    slots: torch.Tensor  # [Bp] adapter slot (0 for pads)
    rows: torch.Tensor  # [Bp] KV row (-1 for pads)
    lora: torch.Tensor  # [Bp*5*K] static_decode_table: per rank bucket (K), seg_table
    #                     [Bp, 4] then perm [Bp]
    table: torch.Tensor  # [Bp, Wp] KV block ids (0 = scratch)


def buffer_size(rows: int, blocks: int, rank_buckets: int = 1) -> int:
    """int64 elements of one bucket's inputs (`host_inputs`), for adapter stacks in
    `rank_buckets` rank buckets (one LoRA segment table each)."""
    return (5 + 5 * rank_buckets) * rows + rows * blocks


def views(buf: torch.Tensor, bucket: Bucket, rank_buckets: int = 1) -> Views:
    bp, wp = bucket.rows, bucket.blocks
    end = (5 + 5 * rank_buckets) * bp  # after the LoRA tables
    return Views(ids=buf[0:bp].view(bp, 1), pos=buf[bp:2 * bp].view(bp, 1),
                 valid=buf[2 * bp:3 * bp].view(bp, 1), slots=buf[3 * bp:4 * bp],
                 rows=buf[4 * bp:5 * bp], lora=buf[5 * bp:end],
                 table=buf[end:end + bp * wp].view(bp, wp))


def host_inputs(feeds: Sequence[RowFeed], slots: Sequence[int], bucket: Bucket,
                kv: BlockKVCache, lora: list[int] | None, rank_buckets: int = 1) -> list[int]:
    """The bucket's buffer contents as one host list (`Views` order), pads included."""
    pad = bucket.rows - len(feeds)
    rows = [f.row for f in feeds] + [-1] * pad
    return ([f.token_ids[0] for f in feeds] + [0] * pad
            + [f.start for f in feeds] + [0] * pad
            + [1] * len(feeds) + [0] * pad
            + list(slots) + [0] * pad
            + rows
            + (lora if lora is not None else [0] * (5 * rank_buckets * bucket.rows))
            + kv.block_ids(rows, bucket.blocks))


@dataclass
class DecodeGraphStats:
    """Counters (engine thread writes, anyone reads)."""

    captures: int = 0  # graphs captured (capture=False: buckets first run since a drop)
    replays: int = 0  # decode steps served by a graph replay
    eager_steps: int = 0  # decode steps run eagerly on the static buffers
    invalidations: int = 0  # times every graph was dropped (KV pools or stacks moved)
    failures: int = 0  # captures that raised (graphs are then off for this decoder)


@dataclass
class _Captured:
    graph: Any  # torch.cuda.CUDAGraph, or None when capture is off
    out: torch.Tensor | None  # [Bp, V] the graph's output logits


class StaticDecode:
    """Decode forwards padded to buckets over one input buffer; graphs when `capture`.

    Engine thread only (like the runner that owns it)."""

    def __init__(self, model: Any, kv: BlockKVCache, injection: LoraInjection,
                 mask: MaskSpec, device: torch.device, *, max_batch: int, capture: bool,
                 lora: LoraMode) -> None:
        if capture and (device.type != "cuda" or lora != "static"):
            raise InvalidArgument("CUDA graphs need a CUDA device and the Triton LoRA "
                                  "kernels", field="cuda_graphs")
        self.model, self.kv, self.injection, self.mask = model, kv, injection, mask
        self.device, self.capture, self.lora = device, capture, lora
        self.batch_buckets = buckets_up_to(max_batch)
        self.rank_buckets = len(injection.layout.buckets)  # one LoRA segment table each
        self.kv_buckets = buckets_up_to(-(-kv.max_len // kv.block_size))  # in blocks
        self.stats = DecodeGraphStats()
        with torch.inference_mode():  # written and read only under inference mode
            self._buf = torch.zeros(buffer_size(max_batch, self.kv_buckets[-1],
                                                self.rank_buckets),
                                    dtype=torch.long, device=device)
        self._graphs: dict[Bucket, _Captured] = {}
        # what the graphs were captured against: the KV pools' generation, the stacks
        self._kv_generation = -1
        self._stack_owners = [layer._buffers for layer in injection.layers.values()]
        self._stacks: list[torch.Tensor] = []
        self._dora = False  # a DoRA adapter is in some slot: the graphs run `add_dora`
        self._pool = torch.cuda.graph_pool_handle() if capture else None
        self._stream = torch.cuda.Stream(device) if capture else None

    def bucket_for(self, feeds: Sequence[RowFeed]) -> Bucket:
        kv_len = max(f.start for f in feeds) + 1
        return Bucket(bucket_of(len(feeds), self.batch_buckets),
                      bucket_of(-(-kv_len // self.kv.block_size), self.kv_buckets))

    def forward(self, feeds: Sequence[RowFeed], slots: Sequence[int], *,
                strict: bool = False) -> torch.Tensor:
        """Logits `[B, V]` of a decode step (`slots # [B]`). `strict`: a failed capture
        raises (boot's probe) instead of turning graphs off and running eagerly."""
        if any(len(f.token_ids) != 1 for f in feeds):
            raise InvalidArgument("the static decode path takes one token per row",
                                  field="feeds")
        bucket = self.bucket_for(feeds)
        self.kv.reserve(feeds)  # may grow the pools: `_drop_if_moved` notices
        self._drop_if_moved()
        lora = None
        if self.lora == "static":
            lora = static_decode_table(slots, bucket.rows, self.injection.slot_ranks,
                                       self.injection.layout)
        else:  # the torch strategies, planned per step on the host (never captured)
            self.injection.set_batch(list(slots) + [0] * (bucket.rows - len(feeds)))
        host = host_inputs(feeds, slots, bucket, self.kv, lora, self.rank_buckets)
        with torch.inference_mode():
            self._buf[:len(host)].copy_(torch.tensor(host, dtype=torch.long),
                                        non_blocking=True)
            return self._run(bucket, len(feeds), strict)  # [B, V]

    # -- graphs ----------------------------------------------------------------------------
    def _run(self, bucket: Bucket, n: int, strict: bool) -> torch.Tensor:
        """Logits of the first `n` rows `[n, V]`: a replay (captured first if need be) or,
        with capture off, the same forward run eagerly."""
        known = self._graphs.get(bucket)
        if not self.capture:
            if known is None:
                self._graphs[bucket] = _Captured(None, None)
                self.stats.captures += 1
            self.stats.eager_steps += 1
            return self._body(bucket)[:n]
        if known is None:
            try:
                known = self._capture(bucket)
            except Exception as e:
                self.stats.failures += 1
                if strict:
                    raise FailedPrecondition(
                        f"`cuda_graphs`: capturing the decode step failed on this base "
                        f"({type(e).__name__}: {str(e)[:300]}); serve it without "
                        "cuda_graphs", field="cuda_graphs") from e
                log.exception("capturing the decode step failed; CUDA graphs are off "
                              "from now on (decode stays on the padded eager path)")
                self.capture = False
                self._graphs.clear()
                return self._run(bucket, n, strict)
        known.graph.replay()
        self.stats.replays += 1
        return known.out[:n].clone()  # another graph may reuse the output's memory

    def _capture(self, bucket: Bucket) -> _Captured:
        """Warm up on the capture stream, then capture `_body` (PyTorch's recipe). The
        warm-ups write the same keys/values the replay writes: a decode step is idempotent."""
        compute = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(compute)
        with torch.cuda.stream(self._stream):
            for _ in range(WARMUP):
                self._body(bucket)
        compute.wait_stream(self._stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: loader threads pin host memory while the engine thread captures
        with torch.cuda.graph(graph, pool=self._pool, stream=self._stream,
                              capture_error_mode="thread_local"):
            out = self._body(bucket)
        captured = _Captured(graph, out)
        self._graphs[bucket] = captured
        self.stats.captures += 1
        log.info("captured the decode step for %d rows × %d KV blocks (%d graphs)",
                 bucket.rows, bucket.blocks, len(self._graphs))
        return captured

    def _drop_if_moved(self) -> None:
        """Drop every graph if the KV pools were replaced, any adapter stack is no longer
        the tensor the graphs read (an identity check over every LoRA layer: ~0.07 ms a
        step for 210 layers on the 2-core host here, cheaper than one stale replay), or the
        first DoRA adapter came into a slot or the last one left (the graphs then gain or
        lose the per-feature DoRA rescale, which LoRA-only batches do not pay for)."""
        stacks = [t for bufs in self._stack_owners for t in bufs.values()]  # every stack
        dora = any(self.injection.slot_dora)
        if (self.kv.generation == self._kv_generation and len(stacks) == len(self._stacks)
                and all(map(operator.is_, stacks, self._stacks)) and dora == self._dora):
            return
        if self._graphs:
            self.stats.invalidations += 1
            log.info("KV pools or adapter stacks reallocated: dropping %d decode graphs",
                     len(self._graphs))
        self._graphs.clear()
        if self.capture:  # a pool no graph uses any more may not be joined again (the
            self._pool = torch.cuda.graph_pool_handle()  # allocator asserts): a new one
        self._kv_generation, self._stacks, self._dora = self.kv.generation, stacks, dora

    # -- the forward a graph holds ---------------------------------------------------------
    def _body(self, bucket: Bucket) -> torch.Tensor:
        """The decode forward over the input buffer: device ops only, so it can be captured
        as is. Returns the last-position logits `[Bp, V]`."""
        v = views(self._buf, bucket, self.rank_buckets)
        valid = v.valid != 0  # [Bp, 1]
        kv_len = bucket.blocks * self.kv.block_size  # Lp
        self.kv.bind(v.table, v.pos, valid, kv_len)
        if self.lora == "static":
            self.injection.batch.set_plan(
                static_decode_plan(v.lora.to(torch.int32), v.slots, bucket.rows,
                                   dora=self._dora, layout=self.injection.layout))
        layout = StepLayout(rows=v.rows, input_ids=v.ids, position_ids=v.pos, valid=valid,
                            kv_len=kv_len)
        out = self.model(input_ids=v.ids, position_ids=v.pos,
                         attention_mask=step_mask(layout, self.mask), cache=self.kv,
                         use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].float()  # [Bp, V]
