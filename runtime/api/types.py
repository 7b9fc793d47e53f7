"""Plain dataclasses the engine speaks: requests, chunks, results, stats, configuration.

No protobuf here: the gRPC servicers convert at their boundary. Validation of a request
against the engine's limits lives in `intake.validate_request` so that `Engine.submit`
fails at once with a typed error naming the field.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from loraplex import peft_format
from loraplex.errors import InvalidArgument
from loraplex.limits import MAX_RANK
from loraplex.runtime.api.slots import SlotLayout, check_rank_slots, default_rank_slots

if TYPE_CHECKING:
    from loraplex.registry import AdapterVersion

# "grammar": the request can no longer satisfy its constraint (runtime/decoding/grammar.py)
FinishReason = Literal["stop", "length", "cancelled", "deadline", "grammar"]
Quantization = Literal["nf4", "int8", "none"]
_QUANTIZATIONS = peft_format.QUANTIZATIONS
_DTYPES = ("auto", *peft_format.COMPUTE_DTYPES)
BASE_GEMMS = ("auto", "packed", "plain")
"""`EngineConfig.base_gemm`: `packed` = oneDNN on weights packed once, `plain` = `F.linear`."""


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. `temperature == 0` is greedy; `top_k == 0` and `top_p == 1` are off.

    At most one constraint (runtime/decoding/grammar.py): `json_schema` (the schema as a JSON
    string), `regex`, or `choice` (the output is exactly one of these strings). The output
    of a constrained request that ends "stop" matches it; one cut by `max_new_tokens` ends
    "length" with an incomplete match, as any truncated output."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    json_schema: str | None = None
    regex: str | None = None
    choice: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Lists from JSON/protobuf are accepted and frozen into a tuple.
        if not isinstance(self.stop, tuple):
            object.__setattr__(self, "stop", tuple(self.stop))
        if not isinstance(self.choice, tuple):
            object.__setattr__(self, "choice", tuple(self.choice))

    @property
    def constrained(self) -> bool:
        return bool(self.json_schema or self.regex or self.choice)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class GenerationRequest:
    """One generation as the engine takes it: admitted at the edge (`engine/intake.py`), so the
    adapter is already resolved and authorized to an immutable version and the prompt is
    already token ids. `adapter=None` runs the bare base; `tenant` is the fairness key;
    `deadline` is `time.monotonic()` seconds. `grammar` is the compiled constraint of
    `sampling` (`grammar.Grammar`; the intake compiles it, `Engine.submit` if still missing)."""

    request_id: str
    tenant: str
    adapter: AdapterVersion | None
    prompt_ids: Sequence[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    deadline: float | None = None
    grammar: Any = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Chunk:
    """What a `RequestStream` yields: newly final text and the token ids generated since
    the previous chunk. (Not `kv.RowFeed`, the tokens a KV row is fed in one step.)"""

    text: str
    token_ids: list[int]


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Timings:
    """Seconds, all measured from `submit` except `prefill_s` (prefill start → first token)."""

    queue_s: float = 0.0  # submit → admitted into the running batch
    adapter_load_s: float = 0.0  # time spent waiting for the adapter to become resident
    prefill_s: float = 0.0
    first_token_s: float = 0.0  # submit → first token (TTFT)
    total_s: float = 0.0


@dataclass(frozen=True)
class GenerationResult:
    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    usage: Usage
    timings: Timings
    adapter: AdapterVersion | None = None


@dataclass(frozen=True)
class ResidentAdapter:
    """One adapter the pool holds: in a device slot (`slot > 0`) and/or in host memory."""

    digest: str
    ref: str  # `t/n:v3` of the version that brought it in
    slot: int | None  # device slot, None when only host-resident
    on_host: bool
    pinned: bool
    active_sequences: int
    size_bytes: int


@dataclass(frozen=True)
class EngineStats:
    ready: bool
    draining: bool
    running: int  # sequences in the batch (prefilling or decoding)
    waiting: int  # queued, not yet admitted
    loading: int  # adapters being read from the registry
    slots_used: int
    slots_total: int
    host_bytes: int
    kv_rows_used: int
    kv_rows_total: int
    steps: int
    tokens_generated: int
    requests_finished: int
    kv_reserved_bytes: int = 0  # KV pool bytes held (blocks, all layers, scratch included)
    kv_used_bytes: int = 0  # KV bytes of the positions live sequences have written
    kv_limit_bytes: int = 0  # the most the pools may hold: every row at max_seq_len
    prefix_hit_tokens: int = 0  # prompt positions reused from the prefix cache (not computed)
    prefix_lookups: int = 0  # admitted requests looked up in the prefix cache
    prefix_hits: int = 0  # ... that reused at least one block
    compute_dtype: str = ""  # the base's compute dtype ("" before the base is loaded)
    compute_reason: str = ""  # why that dtype (loraplex.compute.ComputeChoice.reason)
    base_gemm: str = ""  # how the base's linear layers multiply: "packed" | "plain"
    base_gemm_reason: str = ""  # why (runtime/model/packed.py GemmChoice.reason)
    # adapter bytes by tier (AdapterPool.tier_bytes): host + host_loading <= host_limit
    device_bytes: int = 0  # tensors of the adapters in device slots
    host_loading_bytes: int = 0  # host bytes reserved for registry loads in flight
    host_limit_bytes: int = 0  # the host tier's bound (`host_cache_bytes`)
    host_peak_bytes: int = 0  # the highest host + host_loading reached since start
    host_adapters: int = 0  # adapters with a copy in host memory
    loads_queued: int = 0  # registry loads waiting for room in the host tier


@dataclass(frozen=True)
class EngineConfig:
    """The engine's one capacity config, validated once (messages name the field).

    `target_modules=None` wraps every linear projection of the decoder (never `lm_head`).
    `max_seq_len=None` takes the model's `max_position_embeddings` (capped at 4096).
    """

    base_dir: str | Path
    quantization: Quantization = "nf4"
    compute_dtype: str = "auto"  # "auto": chosen for the machine (loraplex.compute)
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    # adapters resident on the device at once, in rank buckets (runtime/api/slots.py:
    # 8 → 5 slots of ranks ≤16, 2 ≤64, 1 ≤256), unless `rank_slots` is set
    max_slots: int = 8
    max_rank: int = MAX_RANK  # at most loraplex.limits.MAX_RANK, what the registry accepts
    # the rank buckets as (rank, slots) pairs or {rank: slots}, e.g. {16: 8, 64: 4, 256: 2};
    # the largest rank must be `max_rank`; None: `default_rank_slots(max_slots, max_rank)`
    rank_slots: tuple[tuple[int, int], ...] | None = None
    max_batch: int = 32
    max_waiting: int = 256
    # Per-tenant back-pressure (None: only the global `max_waiting`): one tenant may not
    # hold more than this many waiting requests, nor this many waiting tokens (prompt +
    # max_new_tokens), so a burst from one tenant is refused before it fills the queue.
    max_waiting_per_tenant: int | None = None
    max_waiting_tokens_per_tenant: int | None = None
    # Without `max_waiting_per_tenant`, one tenant may hold this share of `max_waiting`
    # (rounded up); 1.0 lets one tenant fill the whole queue.
    tenant_waiting_share: float = 0.25
    # Per-tenant rates, refused with RESOURCE_EXHAUSTED + RetryInfo (None: off): requests,
    # and tokens (prompt + max_new_tokens), per minute (runtime/engine/ratelimit.py).
    tenant_requests_per_minute: int | None = None
    tenant_tokens_per_minute: int | None = None
    # A prompt (or the messages' contents) longer than this many UTF-8 bytes is refused
    # before it is tokenized; None: 32 bytes per position of the context.
    max_prompt_bytes: int | None = None
    max_new_tokens_limit: int = 1024
    max_seq_len: int | None = None
    prefill_token_budget: int = 512
    kv_block_size: int = 16  # positions per KV block (the paged cache's unit of allocation)
    # prefix cache: idle KV blocks of prompt prefixes kept for later requests with the same
    # adapter digest (or the base) and the same leading tokens; 0 turns it off
    prefix_cache_blocks: int = 0
    # the host tier's bound: adapters held in host memory + loads in flight (pool.py)
    host_cache_bytes: int = 1 << 30
    loader_threads: int = 2
    loader_nice: int = 0  # Linux nice value of loader threads (0 = normal, up to 19)
    target_modules: str | tuple[str, ...] | None = None  # peft's forms, incl. "all-linear"
    # adapter A/B stacks: "auto" = bfloat16 on CUDA, float32 on CPU (layers.resolve_stack_dtype)
    lora_stack_dtype: str = "auto"
    # Decode steps as CUDA graphs, one per (batch bucket, KV bucket), captured lazily and
    # replayed (runtime/model/decode_graphs.py: what is captured, memory, when re-captured). Needs
    # a CUDA device and triton: refused at boot otherwise. The KV pools then grow by
    # doubling and never shrink (a graph holds their addresses). Prefill stays eager.
    cuda_graphs: bool = False
    # The same padded decode path without capture (any device): for tests and the GPU check
    static_decode: bool = False
    # decode steps of a Llama-architecture base as direct torch calls (runtime/model/
    # llama_decode.py: the same arithmetic without transformers' per-layer wrappers); False:
    # always the model's own forward
    llama_decode: bool = True
    # the base's linear layers on the CPU (runtime/model/packed.py): "packed" = weights
    # reordered once for oneDNN, "plain" = F.linear on the dense weights, "auto" = packed
    # where this machine's probe measures it faster (fp32/bf16 layers;
    # a quantized base's own layers keep their kernels)
    base_gemm: str = "auto"
    aging_s: float = 10.0  # a request waiting longer is admitted before anyone else
    idle_wait_s: float = 0.05  # how long the idle engine thread sleeps between checks

    def __post_init__(self) -> None:
        problems: list[tuple[str, str]] = []
        if self.quantization not in _QUANTIZATIONS:
            problems.append(("quantization", f"`quantization` must be one of {_QUANTIZATIONS}"))
        if self.compute_dtype not in _DTYPES:
            problems.append(("compute_dtype", f"`compute_dtype` must be one of {_DTYPES}"))
        if self.base_gemm not in BASE_GEMMS:
            problems.append(("base_gemm", f"`base_gemm` must be one of {BASE_GEMMS}"))
        if self.lora_stack_dtype not in _DTYPES:
            problems.append(("lora_stack_dtype", f"`lora_stack_dtype` must be one of {_DTYPES}"))
        for name in ("max_slots", "max_rank", "max_batch", "max_waiting", "max_new_tokens_limit",
                     "prefill_token_budget", "loader_threads", "kv_block_size"):
            if int(getattr(self, name)) <= 0:
                problems.append((name, f"`{name}` must be > 0"))
        if int(self.max_rank) > MAX_RANK:
            problems.append(("max_rank", f"`max_rank` must be at most {MAX_RANK}, the largest "
                                         "rank the registry accepts (loraplex.limits.MAX_RANK)"))
        if self.rank_slots is not None:
            try:
                pairs = check_rank_slots(self.rank_slots)
            except InvalidArgument as e:
                problems.append(("rank_slots", e.message))
            else:
                object.__setattr__(self, "rank_slots", pairs)
                if pairs[-1][0] != self.max_rank:
                    problems.append(("rank_slots", f"`rank_slots` holds ranks up to "
                                     f"{pairs[-1][0]} and `max_rank` is {self.max_rank}: set "
                                     f"max_rank to {pairs[-1][0]} too"))
        if not 0 < self.tenant_waiting_share <= 1:
            problems.append(("tenant_waiting_share", "`tenant_waiting_share` must be in (0, 1]"))
        for name in ("max_waiting_per_tenant", "max_waiting_tokens_per_tenant",
                     "tenant_requests_per_minute", "tenant_tokens_per_minute",
                     "max_prompt_bytes"):
            if getattr(self, name) is not None and int(getattr(self, name)) <= 0:
                problems.append((name, f"`{name}` must be > 0 (or unset)"))
        if not 0 <= self.loader_nice <= 19:
            problems.append(("loader_nice", "`loader_nice` must be in 0..19"))
        if self.max_seq_len is not None and self.max_seq_len <= 1:
            problems.append(("max_seq_len", "`max_seq_len` must be > 1"))
        if self.cuda_graphs and self.device == "cpu":
            problems.append(("cuda_graphs", "`cuda_graphs` needs a CUDA device, and "
                                            "`device` is cpu"))
        if self.prefix_cache_blocks < 0:
            problems.append(("prefix_cache_blocks", "`prefix_cache_blocks` must be >= 0"))
        if self.host_cache_bytes < 0:
            problems.append(("host_cache_bytes", "`host_cache_bytes` must be >= 0"))
        if not (self.aging_s > 0 and math.isfinite(self.aging_s)):
            problems.append(("aging_s", "`aging_s` must be a positive number"))
        if self.target_modules is not None and not isinstance(self.target_modules, str | tuple):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if problems:
            raise InvalidArgument("; ".join(m for _, m in problems), field=problems[0][0])

    @property
    def slot_layout(self) -> SlotLayout:
        """The adapter slots' rank buckets (runtime/api/slots.py)."""
        return SlotLayout.of(self.rank_slots or default_rank_slots(self.max_slots,
                                                                   self.max_rank))

    @property
    def waiting_per_tenant(self) -> int:
        """The per-tenant waiting cap in force (`max_waiting_per_tenant`, else the share)."""
        if self.max_waiting_per_tenant is not None:
            return self.max_waiting_per_tenant
        return max(1, math.ceil(self.max_waiting * self.tenant_waiting_share))

    def replace(self, **changes: Any) -> EngineConfig:
        from dataclasses import replace

        return replace(self, **changes)
