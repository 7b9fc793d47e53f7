"""The base's linear layers with their weights packed once into oneDNN's blocked layout (CPU).

    gemm = packed.choose(cfg.base_gemm, device, dtype)   # GemmChoice("packed", reason, ...)
    if gemm.kind == "packed":
        packed.pack_linears(model, rows=cfg.max_batch)     # -> layers packed

Why: a decode step multiplies 16–32 rows by every weight of the base. There the GEMM is
bound by how fast it streams the weights, and torch's `F.linear` on a CPU fp32 weight calls
the BLAS (MKL in the PyPI wheels), which re-reads the plain row-major weight at each call.
oneDNN's inner-product kernel on a weight reordered once into its blocked layout
(`torch.ops.mkldnn._reorder_linear_weight`, what torch's own compiler uses when it freezes
weights) streams them near the memory's rate: SmolLM2's 210 projections at 16 rows, one pass,
2 cores of an AMD EPYC (Zen 5, AVX-512): 19–25 ms packed vs 42–70 ms through `F.linear`;
at 320 rows (a prefill chunk) 194 vs 471 ms. The whole decode step (`python -m
bench.decode_step --dtypes fp32 --base-gemm packed|plain`, two alternated runs each, same
tokens): 58 / 50 vs 87 / 134 ms at 16 rows, 81 / 85 vs 114 / 155 ms at 32; with torch, oneDNN
and MKL held to AVX2 (`ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2
MKL_ENABLE_INSTRUCTIONS=AVX2`) 76 / 106 vs 158 / 144 ms at 16 rows. Whether it pays depends
on the CPU and its BLAS, so `auto` measures both on this machine (`measure`, cached per CPU,
dtype and torch version in `gemm-probe.json` beside the compute-dtype probe) and packs only
where the packed GEMM is at least `MIN_SPEEDUP` times faster.

A `PackedLinear` keeps the packed weight only (no second dense copy of the base): `.weight`
reorders it back to a dense `[out, in]` tensor on each read (DoRA's norms at adapter load, HF
code that reads a projection's dtype). Its inference forward is oneDNN's; with autograd on, a
dense `F.linear`. Outputs agree with `F.linear` to rounding (a different summation order), not
bit for bit; the probe checks that agreement before `auto` packs anything.

Packed: every plain `nn.Linear` of the model on the CPU in fp32 or bf16, including those the
LoRA injection wraps (their `base_layer`) and the LM head. A layer whose weight another module
also holds (a tied LM head: the embedding reads it) keeps that dense weight and multiplies it
through oneDNN unpacked (`SharedWeightLinear`). Quantized layers (bitsandbytes' are subclasses,
not plain `nn.Linear`) keep their own kernels, so on an nf4 or int8 base only the layers it
leaves unquantized (the LM head) change; CUDA bases are left as they are.
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F  # noqa: N812

from loraplex import compute
from loraplex.errors import InvalidArgument, quote
from loraplex.runtime.api.types import BASE_GEMMS

log = logging.getLogger("loraplex.runtime.packed")

MIN_SPEEDUP = 1.1
"""`auto` packs only when the probe's packed GEMM is at least this much faster (a tie keeps
`F.linear`, the arithmetic the adapters were trained with)."""
CACHE_FILE = "gemm-probe.json"
PROBE_SHAPES = ((1536, 576), (576, 1536))  # [out, in]: SmolLM2-135M's MLP, up and down
PROBE_ROWS = (16, 256)  # a decode batch and a prefill chunk
STREAM_BYTES = 64 << 20  # the decode part's weights in all: more than a server CPU's caches
PACK_ROWS = 32  # oneDNN's hint of the rows to expect, for a caller without one
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def check_name(name: str) -> str:
    if name not in BASE_GEMMS:
        raise InvalidArgument(f"unknown base_gemm {quote(name)}; choose one of {BASE_GEMMS}",
                              field="base_gemm")
    return name


# ----------------------------------------------------------------------------- the layer
def available() -> bool:
    """This torch can run oneDNN's packed inner product."""
    return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn,
                                                                  "_linear_pointwise")


@functools.cache
def unpackable(dtype: str) -> str | None:
    """Why oneDNN cannot pack a `dtype` weight on this CPU (None: it can). oneDNN packs bf16
    only with AVX-512 (BW/VL/DQ) or AVX-NE-CONVERT: on an AVX2 CPU the reorder raises."""
    if not available():
        return "torch without oneDNN"
    if dtype not in _DTYPES:
        return f"compute dtype {dtype}"
    try:
        pack_weight(torch.zeros(32, 64, dtype=_DTYPES[dtype]), PACK_ROWS)
    except RuntimeError as e:
        return f"oneDNN cannot pack {dtype} weights on this CPU ({str(e).splitlines()[0]})"
    return None


def pack_weight(w: Tensor, rows: int) -> Tensor:
    """`w # [out, in]` (CPU fp32/bf16) reordered into oneDNN's blocked layout for about
    `rows` rows per call: an opaque `[out, in]` mkldnn tensor."""
    return torch.ops.mkldnn._reorder_linear_weight(w.detach().contiguous(), rows)


def packed_linear(x: Tensor, packed: Tensor, bias: Tensor | None) -> Tensor:
    """`x # [..., in]` @ the packed weight (+ bias) -> `[..., out]`."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class PackedLinear(nn.Module):
    """An `nn.Linear`'s inference forward on its weight packed for oneDNN (see the module
    docstring); the dense weight is not kept."""

    def __init__(self, linear: nn.Linear, rows: int = PACK_ROWS) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = pack_weight(linear.weight, rows)  # [out, in] opaque mkldnn tensor
        self.bias = linear.bias  # [out] | None: a Parameter, as in the layer replaced

    @property
    def weight(self) -> Tensor:
        """The dense weight `[out, in]`, reordered from the packed one on each read."""
        return self.packed.to_dense()

    def forward(self, x: Tensor) -> Tensor:  # x # [..., in] -> [..., out]
        if torch.is_grad_enabled() and x.requires_grad:
            return F.linear(x, self.weight, self.bias)
        if x.dtype != self.packed.dtype:  # the same refusal as F.linear's
            raise RuntimeError(f"PackedLinear: input {x.dtype}, weight {self.packed.dtype}")
        return packed_linear(x if x.is_contiguous() else x.contiguous(), self.packed,
                             self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, dtype={self.packed.dtype}"


def packable(module: nn.Module) -> bool:
    """A plain CPU `nn.Linear` in fp32 or bf16 (subclasses, such as the chunked LM head,
    keep their own forward)."""
    if type(module) is not nn.Linear:
        return False
    w = module.weight
    return w.device.type == "cpu" and w.dtype in _DTYPES.values()


class SharedWeightLinear(nn.Linear):
    """An `nn.Linear` whose weight another module also holds (a tied LM head: the embedding
    reads it), multiplied through oneDNN on that dense weight: no reorder, so no second copy,
    at some of the packed layout's speed (SmolLM2's head at 16 rows, 2 cores of an AMD
    EPYC: 7.3 ms vs 4.5 ms packed and 12.6 ms in vocabulary chunks through the BLAS)."""

    def __init__(self, linear: nn.Linear) -> None:
        nn.Module.__init__(self)  # no fresh weight: the wrapped layer's own parameters
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight  # [out, in], shared
        self.bias = linear.bias  # [out] | None

    def forward(self, x: Tensor) -> Tensor:  # x # [..., in] -> [..., out]
        if (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)) \
                or x.dtype != self.weight.dtype:
            return super().forward(x)
        return packed_linear(x if x.is_contiguous() else x.contiguous(), self.weight,
                             self.bias)


def pack_linears(model: nn.Module, rows: int = PACK_ROWS) -> int:
    """Put every packable `nn.Linear` of `model` on oneDNN: a `PackedLinear` where the
    weight is the layer's own, a `SharedWeightLinear` where another module holds it too;
    returns how many layers were replaced."""
    held = Counter(id(p) for m in model.modules() for p in m.parameters(recurse=False))
    done = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if packable(child):
                setattr(parent, name, PackedLinear(child, rows) if held[id(child.weight)] == 1
                        else SharedWeightLinear(child))
                done += 1
    return done


# ---------------------------------------------------------------------------- the choice
@dataclass(frozen=True)
class GemmProbe:
    """Best-of times of the probe's GEMMs, `F.linear` vs packed, one thread."""

    dtype: str
    plain_ms: float
    packed_ms: float
    max_error: float  # the largest |packed - plain| / max|plain| over the probe's outputs

    @property
    def speedup(self) -> float:
        return self.plain_ms / self.packed_ms if self.packed_ms > 0 else 0.0


@dataclass(frozen=True)
class GemmChoice:
    """How the base's linear layers multiply, and why (logged, and in the server's Stats)."""

    kind: str  # "packed" | "plain"
    reason: str
    probe: GemmProbe | None = None

    def line(self) -> str:
        return f"base GEMM {self.kind} ({self.reason})"

    def record(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "reason": self.reason}
        if self.probe is not None:
            out["probe"] = asdict(self.probe)
        return out


def tolerance(dtype: str) -> float:
    """The largest relative disagreement with `F.linear` the probe accepts: rounding of a
    different summation order, far below a wrong kernel's."""
    return 1e-4 if dtype == "float32" else 2e-2


def decide(requested: str, *, device_type: str, dtype: str, why_not: str | None,
           probe: GemmProbe | None = None) -> GemmChoice:
    """The choice from its inputs alone (no clock): an explicit setting wins where packing
    can run at all; `auto` packs where the probe says so."""
    check_name(requested)
    cant = (device_type != "cpu" and f"{device_type} device")
    cant = cant or why_not
    if requested == "plain":
        return GemmChoice("plain", "set explicitly")
    if cant:
        if requested == "packed":
            raise InvalidArgument(f"base_gemm 'packed' needs an fp32 or bf16 compute dtype on "
                                  f"the CPU with oneDNN; here: {cant}", field="base_gemm")
        return GemmChoice("plain", f"{cant}: F.linear")
    if requested == "packed":
        return GemmChoice("packed", "set explicitly")
    if probe is None:
        raise ValueError("decide('auto') on a CPU needs the probe")  # a bug in the caller
    measured = (f"probe: packed {probe.packed_ms:.2f} ms vs F.linear {probe.plain_ms:.2f} ms "
                f"in {dtype}")
    if probe.max_error > tolerance(dtype):
        return GemmChoice("plain", f"{measured}, but packed outputs differ by "
                                   f"{probe.max_error:.1e}: F.linear", probe)
    if probe.speedup >= MIN_SPEEDUP:
        return GemmChoice("packed", f"{measured}, {probe.speedup:.1f}x faster", probe)
    return GemmChoice("plain", f"{measured}: under {MIN_SPEEDUP}x faster, F.linear", probe)


def measure(dtype: str, rounds: int = 5) -> GemmProbe:
    """Time two parts through `F.linear` and packed, one thread, interleaved best-of (the
    module docstring of loraplex.compute says why), and the packed outputs' largest relative
    difference from `F.linear`'s. The decode part multiplies `PROBE_ROWS[0]` rows by a chain
    of distinct `PROBE_SHAPES` weights `STREAM_BYTES` in all, so each weight comes from
    memory as in a decode step; the prefill part multiplies `PROBE_ROWS[1]` rows by one pair.
    It says which kernel is faster, not by how much: with every library held to AVX2 on an
    AMD EPYC it measured packed 1.19× faster, and SmolLM2's two-thread decode step ran in
    0.5–0.7× the time."""
    dt = _DTYPES[dtype]
    gen = torch.Generator().manual_seed(0)
    pair_bytes = sum(o * i for o, i in PROBE_SHAPES) * torch.finfo(dt).bits // 8
    ws = [(torch.randn(o, i, generator=gen) * 0.05).to(dt)  # [out, in]
          for _ in range(-(-STREAM_BYTES // pair_bytes)) for o, i in PROBE_SHAPES]
    packs = [pack_weight(w, PACK_ROWS) for w in ws]
    xs = {(r, i): torch.randn(r, i, generator=gen).to(dt)  # [T, in]
          for r in PROBE_ROWS for _, i in PROBE_SHAPES}
    decode = [(xs[PROBE_ROWS[0], w.shape[1]], w, p) for w, p in zip(ws, packs, strict=True)]
    prefill = [(xs[PROBE_ROWS[1], w.shape[1]], w, p) for w, p in zip(ws[:2], packs[:2],
                                                                    strict=True)]

    def run(calls: list, kernel: str) -> None:
        for x, w, p in calls:
            F.linear(x, w) if kernel == "plain" else packed_linear(x, p, None)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            error = max(float((packed_linear(x, p, None) - F.linear(x, w)).abs().max()
                              / F.linear(x, w).abs().max().clamp_min(1e-30))
                        for x, w, p in prefill + decode[:2])
            ms = compute.best_ms({k: [functools.partial(run, decode, k),
                                      functools.partial(run, prefill, k)]
                                  for k in ("plain", "packed")}, rounds)
    finally:
        torch.set_num_threads(threads)
    return GemmProbe(dtype, round(ms["plain"], 4), round(ms["packed"], 4), error)


def cached_probe(dtype: str, directory: Path | None = None) -> GemmProbe:
    """This machine's probe in `dtype`, measured once and then read from the cache."""
    shapes = "+".join(f"{o}x{i}" for o, i in PROBE_SHAPES)
    rows = "+".join(str(r) for r in PROBE_ROWS)
    key = f"{compute.cpu_facts().tag()}|{dtype}|{shapes}@{rows}|stream={STREAM_BYTES >> 20}MiB"
    hit = compute.cached_measure(CACHE_FILE, key, lambda: asdict(measure(dtype)),
                                 ("plain_ms", "packed_ms", "max_error"), directory)
    return GemmProbe(dtype, float(hit["plain_ms"]), float(hit["packed_ms"]),
                     float(hit["max_error"]))


def choose(requested: str, device: torch.device, dtype: torch.dtype,
           cache: Path | None = None) -> GemmChoice:
    """`decide` on this machine, probing (cached) where `auto` could pack; logged."""
    name = str(dtype).removeprefix("torch.")
    probe = None
    why_not = unpackable(name) if device.type == "cpu" else None
    if requested == "auto" and device.type == "cpu" and why_not is None:
        probe = cached_probe(name, cache)
    choice = decide(requested, device_type=device.type, dtype=name, why_not=why_not,
                    probe=probe)
    log.info("%s", choice.line())
    return choice
