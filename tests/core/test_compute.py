"""The compute dtype: the rule for every kind of machine (a pure function of what the machine
reports and measures), the cache, and, on the machine running the suite, that both dtypes
run and that the demo's recipe does not pick the slower one."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import pytest
import torch

from loraplex import compute
from loraplex.compute import CpuFacts, Probe, decide
from loraplex.errors import InvalidArgument

AVX2 = CpuFacts("AMD EPYC 7B13", "AVX2", avx512_bf16=False, amx=False, torch_version="2.13.0")
AVX512_BF16 = CpuFacts("Intel(R) Xeon(R) Processor", "AVX512", avx512_bf16=True, amx=False,
                       torch_version="2.13.0")
AMX = CpuFacts("Intel(R) Xeon(R) Platinum 8480+", "AVX512", avx512_bf16=True, amx=True,
               torch_version="2.13.0")
NO_SIMD = CpuFacts("some arm board", "DEFAULT", avx512_bf16=False, amx=False,
                   torch_version="2.13.0")


@pytest.fixture(autouse=True)
def _no_env_override(monkeypatch, tmp_path):
    monkeypatch.delenv(compute.ENV, raising=False)
    monkeypatch.setenv("LORAPLEX_CACHE_DIR", str(tmp_path / "cache"))


# ------------------------------------------------------------------------------ the rule
@pytest.mark.parametrize("cpu", [AVX2, NO_SIMD])
def test_a_cpu_without_native_bf16_computes_in_fp32_without_measuring(cpu):
    c = decide("auto", device_type="cpu", cpu=cpu)
    assert c.dtype == "float32" and c.source == "auto" and c.probe is None
    assert "no native bf16" in c.reason and cpu.capability in c.reason


def test_avx512_bf16_measured_slower_than_fp32_computes_in_fp32():
    # this machine's case: the flag is there, AMX is not, a plain bf16 GEMM loses
    slow = Probe("matmul", fp32_ms=8.3, bf16_ms=13.3)
    c = decide("auto", device_type="cpu", cpu=AVX512_BF16, probe=slow)
    assert c.dtype == "float32" and c.probe == slow
    assert "AVX512_BF16" in c.reason and "1.6x the fp32 time" in c.reason


def test_a_measured_bf16_win_computes_in_bf16():
    # bitsandbytes' packed nf4 kernel on AVX-512 BF16; a GEMM on AMX
    for cpu, probe in ((AVX512_BF16, Probe("nf4", 0.48, 0.23)), (AMX, Probe("matmul", 8.0, 1.5))):
        c = decide("auto", device_type="cpu", cpu=cpu, probe=probe)
        assert c.dtype == "bfloat16" and f"{probe.bf16_speedup:.1f}x faster" in c.reason


def test_a_near_tie_goes_to_fp32():
    c = decide("auto", device_type="cpu", cpu=AMX, probe=Probe("matmul", 10.0, 9.0))
    assert c.dtype == "float32"
    c = decide("auto", device_type="cpu", cpu=AMX, probe=Probe("matmul", 10.0, 10.0 / 1.25))
    assert c.dtype == "bfloat16"


def test_native_bf16_without_a_probe_trusts_the_report():
    c = decide("auto", device_type="cpu", cpu=AMX)
    assert c.dtype == "bfloat16" and "not measured" in c.reason and "AMX" in c.cpu


def test_cuda_follows_the_device_bf16_support():
    assert decide("auto", device_type="cuda", cuda_bf16=True).dtype == "bfloat16"
    assert decide("auto", device_type="cuda", cuda_bf16=False).dtype == "float32"


def test_an_explicit_setting_wins_over_the_machine_and_the_environment():
    for name in compute.COMPUTE_DTYPES:
        c = decide(name, device_type="cpu", env="float32", cpu=AVX2)
        assert (c.dtype, c.source, c.reason) == (name, "setting", "set explicitly")
    c = decide("float32", device_type="cpu", cpu=AMX, probe=Probe("matmul", 8.0, 1.0))
    assert c.dtype == "float32"


def test_the_environment_sets_what_auto_means():
    c = decide("auto", device_type="cpu", env="float32", cpu=AMX, probe=Probe("matmul", 8, 1))
    assert (c.dtype, c.source) == ("float32", "env") and compute.ENV in c.reason
    c = decide("auto", device_type="cpu", env="bfloat16", cpu=AVX2)
    assert c.dtype == "bfloat16"
    assert decide("auto", device_type="cpu", env="auto", cpu=AVX2).dtype == "float32"


def test_unknown_names_are_refused_with_the_field():
    with pytest.raises(InvalidArgument) as e:
        decide("fp16", device_type="cpu", cpu=AVX2)
    assert e.value.field == "compute_dtype"
    with pytest.raises(InvalidArgument) as e:
        decide("auto", device_type="cpu", env="half", cpu=AVX2)
    assert e.value.field == compute.ENV
    with pytest.raises(InvalidArgument):
        compute.choose(torch.float64)


def test_the_record_is_json_and_says_why():
    c = decide("auto", device_type="cpu", cpu=AVX512_BF16, probe=Probe("matmul", 8.3, 13.3))
    rec = json.loads(json.dumps(c.record()))
    assert rec["dtype"] == "float32" and rec["requested"] == "auto"
    assert rec["probe"] == {"workload": "matmul", "fp32_ms": 8.3, "bf16_ms": 13.3}
    assert rec["cpu"] == "AVX512 + AVX512_BF16"


# ------------------------------------------------------------------------------ this machine
def test_choose_on_this_machine_measures_once_and_caches(tmp_path):
    facts = compute.cpu_facts()
    assert facts.capability == torch.backends.cpu.get_cpu_capability()
    c = compute.choose("auto", "cpu", cache=tmp_path)
    if not facts.native_bf16:
        assert c.dtype == "float32" and c.probe is None
        return
    assert c.probe is not None and c.probe.fp32_ms > 0 and c.probe.bf16_ms > 0
    table = json.loads((tmp_path / compute.CACHE_FILE).read_text())
    assert set(table) == {facts.key("matmul")}
    # a cached verdict is read back, not re-measured: plant one each way
    for fp32_ms, bf16_ms, want in ((1.0, 100.0, "float32"), (100.0, 1.0, "bfloat16")):
        table[facts.key("matmul")] = {"fp32_ms": fp32_ms, "bf16_ms": bf16_ms}
        (tmp_path / compute.CACHE_FILE).write_text(json.dumps(table))
        c = compute.choose("auto", "cpu", cache=tmp_path)
        assert c.dtype == want and c.probe == Probe("matmul", fp32_ms, bf16_ms)


def test_a_corrupt_cache_is_measured_again(tmp_path):
    (tmp_path / compute.CACHE_FILE).write_text("{not json")
    facts = compute.cpu_facts()
    probe = compute.cached_probe(facts, "matmul", tmp_path)
    assert probe.fp32_ms > 0
    assert facts.key("matmul") in json.loads((tmp_path / compute.CACHE_FILE).read_text())


def test_explicit_and_env_settings_on_this_machine(monkeypatch, tmp_path):
    assert compute.choose("bfloat16").torch_dtype is torch.bfloat16
    assert compute.choose(torch.float32).torch_dtype is torch.float32
    monkeypatch.setenv(compute.ENV, "float32")
    c = compute.choose("auto", "cpu", quantization="nf4", cache=tmp_path)
    assert (c.dtype, c.source) == ("float32", "env")
    assert not (tmp_path / compute.CACHE_FILE).exists()  # an override measures nothing


@pytest.mark.parametrize("workload", compute.WORKLOADS)
def test_both_dtypes_run_here(workload):
    probe = compute.measure(workload, rounds=1)
    assert probe.fp32_ms > 0 and probe.bf16_ms > 0


# ------------------------------------------------------------------------------ the demo's recipe
def _best_ms(fn, rounds: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def _train_step(dtype) -> Callable[[], None]:
    """Forward + backward through SmolLM2's MLP (576 -> 1536 -> 576) on one demo micro-batch
    (8 rows x 128 positions), the frozen base in `dtype`, as the demo's training does."""
    gen = torch.Generator().manual_seed(0)
    up = torch.randn(1536, 576, generator=gen).to(dtype)  # [out, in]
    down = torch.randn(576, 1536, generator=gen).to(dtype)  # [out, in]
    x = torch.randn(8 * 128, 576, generator=gen).to(dtype).requires_grad_()  # [T, in]

    def step() -> None:
        y = torch.nn.functional.linear(torch.nn.functional.silu(
            torch.nn.functional.linear(x, up)), down)  # [T, 576]
        y.float().square().mean().backward()
        x.grad = None
    return step


def _nf4_serve(dtype) -> Callable[[], None]:
    """SmolLM2's MLP down-projection (1536 -> 576) in nf4 on a 24-row decode batch and a
    192-row prefill chunk: a served request costs both, and the kernel's bf16/fp32 ratio
    differs between them on some CPUs."""
    lin = compute._nf4_linear(torch.randn(576, 1536, generator=torch.Generator().manual_seed(1)),
                              dtype)
    xs = [torch.randn(rows, 1536).to(dtype) for rows in (24, 192)]  # [T, in] each

    def step() -> None:
        with torch.inference_mode():
            for x in xs:
                lin(x)
    return step


def test_the_demo_recipe_never_picks_a_dtype_twice_as_slow_here():
    """The demo trains on a dequantized base and serves on nf4, each in the dtype `auto`
    picks here; both workloads are timed in both dtypes (one thread, best of five, so a
    loaded machine hurts both alike) and the picked one must not be 2x the other."""
    from loraplex.app import demo_bases

    demo = demo_bases.profile("smollm2")
    cases = [("training", str(demo.recipe.get("compute_dtype", "auto")),
              str(demo.recipe["quantization"]),
              _train_step),
             ("serving", demo.serve_compute_dtype, "nf4", _nf4_serve)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for what, setting, quantization, workload in cases:
            assert setting == "auto", f"the demo's {what} dtype is hard-coded: {setting}"
            picked = compute.choose(setting, "cpu", quantization=quantization).dtype
            ms = {name: _best_ms(workload(getattr(torch, name)))
                  for name in ("float32", "bfloat16")}
            other = "bfloat16" if picked == "float32" else "float32"
            assert ms[picked] <= 2 * ms[other], (what, picked, ms)
    finally:
        torch.set_num_threads(threads)


# torch's, oneDNN's and MKL's kernels held to AVX2, as on a CPU without AVX-512 (AMD Zen 3,
# many laptops): the ISA a library may use, whatever this CPU has
AVX2_KERNELS = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
_UNDER_AVX2 = """
import json, sys, time, torch
from loraplex import compute
sys.path.insert(0, sys.argv[1])
from test_compute import _best_ms, _train_step
torch.set_num_threads(1)
choice = compute.choose("auto", "cpu", quantization="none")
ms = {name: _best_ms(_train_step(getattr(torch, name)), rounds=2)
      for name in ("float32", "bfloat16")}
print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability(),
                  "dtype": choice.dtype, "reason": choice.reason, "ms": ms}))
"""


def test_with_the_kernels_held_to_avx2_auto_trains_in_the_faster_fp32(tmp_path):
    """The path an AVX2 CPU takes, on whatever CPU runs the suite: with every library held
    to AVX2 a bf16 matmul is emulated, `auto` picks float32 (by the CPU's report or by the
    probe), and the demo's training step runs it at no more than twice the bf16 time."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, **AVX2_KERNELS, "LORAPLEX_CACHE_DIR": str(tmp_path)}
    env.pop(compute.ENV, None)
    out = subprocess.run([sys.executable, "-c", _UNDER_AVX2, str(Path(__file__).parent)],
                         env=env, capture_output=True, text=True, timeout=300, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["capability"] == "AVX2"
    assert got["dtype"] == "float32", got["reason"]
    assert got["ms"]["float32"] <= 2 * got["ms"]["bfloat16"], got["ms"]
