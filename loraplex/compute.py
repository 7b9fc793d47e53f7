"""The compute dtype: one decision for training and serving, made for the machine at hand.

    choice = choose("auto", "cpu", quantization="nf4")   # ComputeChoice(dtype="bfloat16", ...)
    choice.torch_dtype, choice.reason, choice.record()

Precedence: an explicit setting (a config field or flag naming a dtype) wins; then
`$LORAPLEX_COMPUTE_DTYPE`; then `auto`:

- CUDA: bfloat16 where the device supports it, float32 otherwise.
- CPU without a native bf16 multiply (no AVX-512 BF16, no AMX; e.g. `get_cpu_capability()`
  AVX2): float32, unmeasured. There a bf16 matmul is emulated and dozens of times slower.
- CPU that reports one: a short measured probe of the workload decides, since what the CPU
  reports and what a bf16 matmul costs can disagree (a hypervisor may hide AMX while the
  AVX-512 BF16 flag stays; a plain bf16 GEMM is then slower than fp32, yet bitsandbytes'
  packed nf4 kernel, which needs only AVX-512 BF16, is faster in bf16 at decode sizes; and
  on an AMX CPU that kernel is faster in bf16 at 32 rows and slower at 256). bfloat16 is chosen
  only when it is at least `BF16_MIN_SPEEDUP` times faster than float32 there: a tie goes
  to float32, the more exact of the two.

The probe runs on one thread (the bf16/fp32 ratio is a property of the core's instructions,
and one thread is what a machine loaded by other processes still measures steadily), takes
well under a second (plus bitsandbytes' import for `nf4`), and is cached per machine in
`$LORAPLEX_CACHE_DIR` (default `~/.cache/loraplex`) under `compute-probe.json`, keyed by the
CPU model, its reported capability and the torch version.

float16 is never chosen automatically (it needs loss scaling in training and overflows in
some bases' activations); name it explicitly to use it.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loraplex.errors import InvalidArgument, quote

log = logging.getLogger("loraplex.compute")

ENV = "LORAPLEX_COMPUTE_DTYPE"
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
"""Names accepted for a compute dtype ("auto" besides)."""
BF16_MIN_SPEEDUP = 1.25
"""bfloat16 is chosen on a CPU only when its probe runs at least this much faster."""
CACHE_FILE = "compute-probe.json"
WORKLOADS = ("matmul", "nf4")
"""What a probe measures: `matmul` is a plain GEMM (unquantized and int8 bases, whose
non-quantized layers are plain GEMMs); `nf4` is a bitsandbytes Linear4bit forward; each at
the row counts of `PROBE_ROWS`."""
# Rows per probed forward, per workload: a decode batch and a prefill chunk or training
# micro-batch. Both matter: bitsandbytes' CPU nf4 kernel is faster in bf16 at decode sizes
# and slower at prefill sizes on some CPUs, so a decode-only probe picks the wrong dtype
# for a server whose requests carry prompts. Part of the cache key.
PROBE_ROWS = {"matmul": (64, 256), "nf4": (32, 256)}


@dataclass(frozen=True)
class CpuFacts:
    """What this CPU and torch say about it (the probe's cache key)."""

    model: str  # "Intel(R) Xeon(R) Processor"
    capability: str  # torch.backends.cpu.get_cpu_capability(): "AVX2", "AVX512", ...
    avx512_bf16: bool
    amx: bool
    torch_version: str

    @property
    def native_bf16(self) -> bool:
        return self.avx512_bf16 or self.amx

    def describe(self) -> str:
        extras = [n for n, on in (("AVX512_BF16", self.avx512_bf16), ("AMX", self.amx)) if on]
        return f"{self.capability}{' + ' + ' + '.join(extras) if extras else ''}"

    def tag(self) -> str:
        """What every probe cached for this machine is keyed by, before its own details."""
        return f"{self.model}|{self.describe()}|torch={self.torch_version}"

    def key(self, workload: str) -> str:
        rows = "+".join(str(r) for r in PROBE_ROWS.get(workload, ()))
        return f"{self.tag()}|{workload}@{rows}"


@dataclass(frozen=True)
class Probe:
    """Best-of timings of one workload in each dtype, on this machine."""

    workload: str  # one of WORKLOADS
    fp32_ms: float
    bf16_ms: float

    @property
    def bf16_speedup(self) -> float:
        """fp32 time / bf16 time: > 1 when bf16 is faster."""
        return self.fp32_ms / self.bf16_ms if self.bf16_ms > 0 else float("inf")


@dataclass(frozen=True)
class ComputeChoice:
    """The dtype chosen, why, and what it was chosen from (what logs and lineage record)."""

    dtype: str  # one of COMPUTE_DTYPES
    reason: str
    requested: str  # what the setting said: "auto" or a dtype name
    device: str  # "cpu" | "cuda"
    source: str  # "setting" | "env" | "auto"
    cpu: str = ""  # CpuFacts.describe() where a CPU decided
    probe: Probe | None = None

    @property
    def torch_dtype(self) -> Any:
        import torch

        return getattr(torch, self.dtype)

    def record(self) -> dict[str, Any]:
        """A JSON-able record (adapter lineage, server stats)."""
        out = {k: v for k, v in asdict(self).items() if k != "probe"}
        if self.probe is not None:
            out["probe"] = asdict(self.probe)
        return out

    def line(self) -> str:
        return f"compute dtype {self.dtype} ({self.reason})"


def check_name(name: str, field: str = "compute_dtype") -> str:
    if name != "auto" and name not in COMPUTE_DTYPES:
        raise InvalidArgument(f"unknown compute dtype {quote(name)}; choose one of "
                              f"{('auto', *COMPUTE_DTYPES)}", field=field)
    return name


def workload_for(quantization: str) -> str:
    return "nf4" if quantization == "nf4" else "matmul"


def decide(requested: str, *, device_type: str, env: str | None = None,
           cuda_bf16: bool = False, cpu: CpuFacts | None = None,
           probe: Probe | None = None) -> ComputeChoice:
    """The choice from its inputs alone (no torch, no clock): see the module docstring.

    `requested`: the setting ("auto" or a dtype name); `env`: `$LORAPLEX_COMPUTE_DTYPE`
    or None; `cuda_bf16`: the CUDA device supports bf16; `cpu`: this CPU's facts (CPU
    only); `probe`: the measured workload (CPU with native bf16 only; None = unmeasured).
    """
    check_name(requested)
    if env is not None:
        check_name(env, field=ENV)
    if requested != "auto":
        return ComputeChoice(requested, "set explicitly", requested, device_type, "setting")
    if env not in (None, "auto"):
        return ComputeChoice(env, f"set by ${ENV}", requested, device_type, "env")
    if device_type == "cuda":
        if cuda_bf16:
            return ComputeChoice("bfloat16", "CUDA device with bf16 support", requested,
                                 device_type, "auto")
        return ComputeChoice("float32", "CUDA device without bf16 support", requested,
                             device_type, "auto")
    if device_type != "cpu":
        return ComputeChoice("float32", f"{device_type} device: float32 by default", requested,
                             device_type, "auto")
    if cpu is None:
        raise ValueError("decide() on a CPU needs the CPU's facts")  # a bug in the caller
    what = cpu.describe()
    if not cpu.native_bf16:
        return ComputeChoice("float32", f"CPU {what}: no native bf16 multiply", requested,
                             "cpu", "auto", what)
    if probe is None:
        return ComputeChoice("bfloat16", f"CPU {what}: native bf16 (not measured)", requested,
                             "cpu", "auto", what)
    measured = (f"{probe.workload} probe: bf16 {probe.bf16_ms:.2f} ms vs fp32 "
                f"{probe.fp32_ms:.2f} ms")
    if probe.bf16_speedup >= BF16_MIN_SPEEDUP:
        return ComputeChoice("bfloat16", f"CPU {what}; {measured}, {probe.bf16_speedup:.1f}x "
                             "faster in bf16", requested, "cpu", "auto", what, probe)
    return ComputeChoice("float32", f"CPU {what} reports bf16, but the {measured} "
                         f"({1 / probe.bf16_speedup:.1f}x the fp32 time)", requested, "cpu",
                         "auto", what, probe)


# ------------------------------------------------------------------------------ the machine
def cpu_facts() -> CpuFacts:
    import torch

    return CpuFacts(model=cpu_model(), capability=torch.backends.cpu.get_cpu_capability(),
                    avx512_bf16=bool(torch.cpu._is_avx512_bf16_supported()),
                    amx=bool(torch.cpu._is_amx_tile_supported()),
                    torch_version=torch.__version__)


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo; platform's answer elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass  # not Linux: platform's answer below
    return platform.processor() or platform.machine()


def best_ms(fns: dict[str, list[Any]], rounds: int) -> dict[str, float]:
    """For each name, the sum over its parts of each part's best-of-`rounds` wall time.
    Parts are short (a few ms at most) and interleaved across names, so that on a machine
    loaded by other processes some runs of each fit between preemptions and a burst of
    load hits both dtypes alike; the minimum is the least disturbed run."""
    best = {name: [float("inf")] * len(parts) for name, parts in fns.items()}
    for parts in fns.values():
        for f in parts:
            f()  # warm-up: kernel selection, weight packing, allocator
    for _ in range(rounds):
        for name, parts in fns.items():
            for i, f in enumerate(parts):
                t0 = time.perf_counter()
                f()
                best[name][i] = min(best[name][i], time.perf_counter() - t0)
    return {name: sum(times) * 1e3 for name, times in best.items()}


def workload_fns(workload: str) -> dict[str, list[Any]]:
    """{"float32": [parts], "bfloat16": [parts]} for `workload` (each part runs once), at SmolLM2-135M's MLP
    shape (576 -> 1536), one part per `PROBE_ROWS` entry: GEMMs (`matmul`) or nf4
    Linear4bit forwards (bitsandbytes' CPU path, packed in bf16 where it can be)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(1536, 576, generator=gen)  # [out, in]
    fns: dict[str, list[Any]] = {}
    for name in ("float32", "bfloat16"):
        dt = getattr(torch, name)
        if workload == "matmul":
            def forward(x: Any, wd: Any = w.to(dt)) -> None:
                torch.nn.functional.linear(x, wd)
        elif workload == "nf4":
            def forward(x: Any, lin: Any = _nf4_linear(w, dt)) -> None:
                with torch.inference_mode():
                    lin(x)
        else:
            raise ValueError(f"unknown probe workload {workload!r}")  # a bug in the caller
        xs = [torch.randn(rows, 576, generator=gen).to(dt) for rows in PROBE_ROWS[workload]]
        fns[name] = [functools.partial(forward, x) for x in xs]  # x: [T, in]
    return fns


def _nf4_linear(w: Any, dtype: Any) -> Any:
    import bitsandbytes.nn as bnb_nn  # a declared dependency: missing is a broken install
    import torch

    from loraplex.quantization import keep_cpu_4bit_in_compute_dtype

    lin = bnb_nn.Linear4bit(w.shape[1], w.shape[0], bias=False, compute_dtype=dtype,
                            quant_type="nf4", compress_statistics=True)
    lin.weight = bnb_nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4",
                                   compress_statistics=True)
    lin = lin.to("cpu").eval()
    holder = torch.nn.Sequential(lin)
    keep_cpu_4bit_in_compute_dtype(holder, dtype)  # the same kernel choice a loaded base gets
    return lin


def measure(workload: str, rounds: int = 15) -> Probe:
    """Time `workload` in fp32 and bf16 here, on one thread (best of `rounds`,
    interleaved)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ms = best_ms(workload_fns(workload), rounds)
    finally:
        torch.set_num_threads(threads)
    return Probe(workload, round(ms["float32"], 4), round(ms["bfloat16"], 4))


def cache_dir() -> Path:
    env = os.environ.get("LORAPLEX_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "loraplex"


def cached_measure(file: str, key: str, measure: Any, fields: tuple[str, ...],
                   directory: Path | None = None) -> dict[str, Any]:
    """The record `measure()` returns (a JSON-able dict with numeric `fields`), measured
    once per `key` and then read from `file` in the cache directory. The cache is an
    optimization only: an unreadable or unwritable one, or an entry without its numeric
    `fields`, costs a re-measure."""
    path = (directory or cache_dir()) / file
    table: dict[str, Any] = {}
    try:
        table = json.loads(path.read_text())
        hit = table.get(key)
        if isinstance(hit, dict) and all(isinstance(hit.get(f), int | float) for f in fields):
            return hit
    except (OSError, ValueError, AttributeError):
        pass  # no cache yet, or a damaged one: measured again and rewritten below
    table = table if isinstance(table, dict) else {}
    record = {**measure(), "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    table[key] = record
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(table, indent=1, sort_keys=True))
        tmp.replace(path)
    except OSError as e:
        log.info("probe not cached (%s: %s)", path, e.strerror)
    return record


def cached_probe(facts: CpuFacts, workload: str, directory: Path | None = None) -> Probe:
    """This machine's probe of `workload`, measured once and then read from the cache."""
    def fresh() -> dict[str, Any]:
        probe = measure(workload)
        return {"fp32_ms": probe.fp32_ms, "bf16_ms": probe.bf16_ms}

    hit = cached_measure(CACHE_FILE, facts.key(workload), fresh, ("fp32_ms", "bf16_ms"),
                         directory)
    return Probe(workload, float(hit["fp32_ms"]), float(hit["bf16_ms"]))


def choose(requested: Any = "auto", device: Any = "cpu", *, quantization: str = "none",
           cache: Path | None = None) -> ComputeChoice:
    """The compute dtype for work on `device` with a `quantization` base ("none", "nf4",
    "int8"): `decide` on this machine's facts, probing (cached) where a CPU reports bf16.
    `requested` may be a torch dtype. Logs the choice and its reason."""
    import torch

    if isinstance(requested, torch.dtype):
        requested = str(requested).removeprefix("torch.")
    if not isinstance(requested, str):
        raise InvalidArgument(f"compute dtype must be a name, got {quote(requested)}",
                              field="compute_dtype")
    env = os.environ.get(ENV) or None
    dev = torch.device(device)
    cpu = probe = None
    if requested == "auto" and env in (None, "auto") and dev.type == "cpu":
        cpu = cpu_facts()
        if cpu.native_bf16:
            probe = cached_probe(cpu, workload_for(quantization), cache)
    cuda_bf16 = (dev.type == "cuda" and torch.cuda.is_available()
                 and torch.cuda.is_bf16_supported())
    choice = decide(requested, device_type=dev.type, env=env, cuda_bf16=cuda_bf16, cpu=cpu,
                    probe=probe)
    log.info("%s for a %s base", choice.line(), quantization)
    return choice
