"""Packed base weights (runtime/model/packed.py): the same outputs as `F.linear` to rounding,
no dense copy kept, tied weights left alone, the choice made per machine and reported."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from bench.decode_graphs import load_random_adapter
from loraplex.errors import InvalidArgument
from loraplex.runtime.engine.engine import EngineConfig
from loraplex.runtime.kv.cache import RowFeed
from loraplex.runtime.model import packed
from loraplex.runtime.model.packed import GemmProbe, PackedLinear, SharedWeightLinear
from loraplex.runtime.model.runner import Runner

pytestmark = pytest.mark.skipif(not packed.available(), reason="torch without oneDNN")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_a_packed_layer_computes_what_f_linear_computes(dtype, bias):
    torch.manual_seed(0)
    lin = nn.Linear(96, 160, bias=bias).to(dtype)
    dense = lin.weight.detach().clone()  # [out, in]
    p = PackedLinear(lin, rows=8)
    assert torch.equal(p.weight, dense)  # the reorder is lossless: `.weight` reads it back
    assert "weight" not in dict(p.named_parameters())  # no second dense copy held
    with torch.inference_mode():
        for shape in [(1, 96), (5, 96), (33, 96), (4, 1, 96), (2, 7, 96)]:
            x = torch.randn(shape).to(dtype)
            want = F.linear(x, dense, lin.bias)
            got = p(x)
            assert got.shape == want.shape and got.dtype == dtype
            err = float((got - want).abs().max() / want.abs().max())
            assert err <= packed.tolerance(str(dtype).removeprefix("torch.")), (shape, err)
        x = torch.randn(96, 12).to(dtype).t()  # a non-contiguous input is made contiguous
        torch.testing.assert_close(p(x), F.linear(x, dense, lin.bias),
                                   **({} if dtype == torch.float32 else
                                      {"atol": 0.05, "rtol": 0.02}))


def test_with_autograd_on_it_is_a_dense_linear_whose_input_gets_gradients():
    lin = nn.Linear(16, 8, bias=False)
    p = PackedLinear(lin)
    x = torch.randn(3, 16, requires_grad=True)
    p(x).sum().backward()
    torch.testing.assert_close(x.grad, lin.weight.detach().sum(0).expand(3, 16))


def test_an_input_of_another_dtype_is_refused_as_f_linear_refuses_it():
    p = PackedLinear(nn.Linear(16, 8))
    with torch.inference_mode(), pytest.raises(RuntimeError, match="bfloat16"):
        p(torch.randn(2, 16, dtype=torch.bfloat16))


def test_a_tied_head_keeps_its_shared_weight_and_other_kinds_are_left_alone():
    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(50, 16)
            self.proj = nn.Linear(16, 16)
            self.mlp = nn.Sequential(nn.Linear(16, 32), nn.SiLU(), nn.Linear(32, 16))
            self.fp16 = nn.Linear(16, 16).half()  # fp16: not packed
            self.head = nn.Linear(16, 50, bias=False)
            self.head.weight = self.embed.weight  # tied: the embedding reads it dense

    m = Tiny()
    x = torch.randn(3, 16)
    with torch.inference_mode():
        want = m.head(m.mlp(m.proj(x)))
    assert packed.pack_linears(m) == 4
    assert isinstance(m.proj, PackedLinear) and isinstance(m.mlp[0], PackedLinear)
    assert isinstance(m.mlp[2], PackedLinear)
    assert isinstance(m.head, SharedWeightLinear) and m.head.weight is m.embed.weight
    assert type(m.fp16) is nn.Linear
    with torch.inference_mode():
        torch.testing.assert_close(m.head(m.mlp(m.proj(x))), want)
    m.embed.weight.data[0] += 1.0  # still one tensor: what the embedding sees, the head uses
    with torch.inference_mode():
        torch.testing.assert_close(m.head(x)[:, 0], x @ m.embed.weight[0])


@pytest.mark.parametrize(("kw", "kind", "says"), [
    ({"requested": "plain"}, "plain", "set explicitly"),
    ({"requested": "packed"}, "packed", "set explicitly"),
    ({"device_type": "cuda"}, "plain", "cuda device"),
    ({"why_not": "compute dtype float16"}, "plain", "compute dtype float16"),
    ({"why_not": "torch without oneDNN"}, "plain", "without oneDNN"),
    ({"probe": GemmProbe("float32", 10.0, 4.0, 1e-6)}, "packed", "2.5x faster"),
    ({"probe": GemmProbe("float32", 10.0, 9.5, 1e-6)}, "plain", "under 1.1x"),
    ({"probe": GemmProbe("float32", 10.0, 4.0, 0.3)}, "plain", "differ by 3.0e-01"),
])
def test_the_choice_from_its_inputs(kw, kind, says):
    args = {"requested": "auto", "device_type": "cpu", "dtype": "float32",
            "why_not": None, "probe": GemmProbe("float32", 1.0, 1.0, 0.0), **kw}
    choice = packed.decide(**args)
    assert choice.kind == kind and says in choice.reason, choice


def test_packed_where_it_cannot_run_is_refused_naming_the_field():
    with pytest.raises(InvalidArgument, match="cuda") as e:
        packed.decide("packed", device_type="cuda", dtype="float32", why_not=None)
    assert e.value.field == "base_gemm"
    with pytest.raises(InvalidArgument) as e:
        EngineConfig(base_dir="x", base_gemm="fast")
    assert e.value.field == "base_gemm"


def test_auto_measures_once_per_machine_and_reads_the_cache_after(tmp_path):
    cpu = torch.device("cpu")
    first = packed.choose("auto", cpu, torch.float32, cache=tmp_path)
    assert first.probe is not None and first.probe.plain_ms > 0 and first.probe.packed_ms > 0
    assert first.probe.max_error <= packed.tolerance("float32")  # a working oneDNN here
    table = json.loads((tmp_path / packed.CACHE_FILE).read_text())
    (key,) = table
    for plain_ms, packed_ms, kind in ((1.0, 100.0, "plain"), (100.0, 1.0, "packed")):
        table[key].update(plain_ms=plain_ms, packed_ms=packed_ms)
        (tmp_path / packed.CACHE_FILE).write_text(json.dumps(table))
        again = packed.choose("auto", cpu, torch.float32, cache=tmp_path)
        assert again.kind == kind and again.probe.plain_ms == plain_ms


def test_a_damaged_cache_entry_is_measured_again_not_a_failed_boot(tmp_path):
    cpu = torch.device("cpu")
    packed.choose("auto", cpu, torch.float32, cache=tmp_path)
    table = json.loads((tmp_path / packed.CACHE_FILE).read_text())
    (key,) = table
    table[key] = {"plain_ms": "fast"}  # hand-edited, or written by another version
    (tmp_path / packed.CACHE_FILE).write_text(json.dumps(table))
    again = packed.choose("auto", cpu, torch.float32, cache=tmp_path)
    assert again.probe.plain_ms > 0 and again.probe.packed_ms > 0
    assert json.loads((tmp_path / packed.CACHE_FILE).read_text())[key]["plain_ms"] > 0


def _runner(base, gemm: str) -> Runner:
    cfg = EngineConfig(base_dir=base, quantization="none", compute_dtype="float32",
                       device="cpu", max_slots=2, max_rank=8, max_batch=4, kv_block_size=4,
                       max_seq_len=64, base_gemm=gemm)
    runner = Runner.boot(cfg)
    for slot, rank in ((1, 4), (2, 8)):
        torch.manual_seed(slot)
        load_random_adapter(runner.injection, slot, rank, b_std=1.0)
    return runner


def test_a_packed_base_serves_the_logits_of_the_plain_one(micro_base):
    plain, fast = _runner(micro_base, "plain"), _runner(micro_base, "packed")
    assert plain.gemm.kind == "plain" and fast.gemm.kind == "packed"
    wrapped = [m.base_layer for m in fast.injection.layers.values()]
    assert wrapped and all(isinstance(b, PackedLinear) for b in wrapped)
    assert not any(isinstance(m, PackedLinear) for m in plain.model.modules())
    head = fast.model.get_output_embeddings()  # tied in the micro base: shared, not packed
    assert isinstance(head, SharedWeightLinear | PackedLinear)
    g = torch.Generator().manual_seed(5)
    slots = [0, 1, 2, 1]
    prompts = [torch.randint(0, 250, (3 + 2 * r,), generator=g).tolist() for r in range(4)]
    for runner in (plain, fast):  # prefill through the model's forward, then decode steps
        for row, p in enumerate(prompts):
            runner.forward([RowFeed(row, 0, p)], [slots[row]])
    tokens = [5, 6, 7, 8]
    for step in range(6):
        feeds = [RowFeed(r, len(prompts[r]) + step, [tokens[r]]) for r in range(4)]
        a, b = plain.decode(feeds, slots), fast.decode(feeds, slots)  # [B, V] each
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
        assert a.argmax(-1).tolist() == b.argmax(-1).tolist()
        tokens = a.argmax(-1).tolist()


def test_on_an_nf4_base_only_the_unquantized_head_moves_to_onednn(micro_base):
    import bitsandbytes as bnb

    cfg = EngineConfig(base_dir=micro_base, quantization="nf4", compute_dtype="float32",
                       device="cpu", max_slots=1, max_rank=8, max_batch=2, max_seq_len=32,
                       base_gemm="packed")
    runner = Runner.boot(cfg)
    bases = [m.base_layer for m in runner.injection.layers.values()]
    assert bases and all(isinstance(b, bnb.nn.Linear4bit) for b in bases)  # left as they are
    assert isinstance(runner.model.get_output_embeddings(), SharedWeightLinear | PackedLinear)
    plain = Runner.boot(cfg.replace(base_gemm="plain"))
    a = plain.forward([RowFeed(0, 0, [3, 4, 5])], [0])
    b = runner.forward([RowFeed(0, 0, [3, 4, 5])], [0])
    torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


_UNDER_AVX2 = """
import json, torch
from loraplex.errors import InvalidArgument
from loraplex.runtime.model import packed
cpu = torch.device("cpu")
out = {"fp32": packed.choose("auto", cpu, torch.float32).record(),
       "bf16": packed.choose("auto", cpu, torch.bfloat16).record()}
try:
    packed.choose("packed", cpu, torch.bfloat16)
except InvalidArgument as e:
    out["refused"] = e.field
print(json.dumps(out))
"""


def test_with_every_library_held_to_avx2_bf16_is_not_packed_and_nothing_breaks(tmp_path):
    """oneDNN packs bf16 weights only with AVX-512 or AVX-NE-CONVERT: on an AVX2 CPU a
    bf16 base (set explicitly: `auto` computes in fp32 there) keeps `F.linear`."""
    import os
    import subprocess
    import sys

    from tests.core.test_compute import AVX2_KERNELS

    env = {**os.environ, **AVX2_KERNELS, "LORAPLEX_CACHE_DIR": str(tmp_path)}
    run = subprocess.run([sys.executable, "-c", _UNDER_AVX2], env=env, capture_output=True,
                         text=True, timeout=300, check=True)
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["bf16"]["kind"] == "plain" and "cannot pack bfloat16" in got["bf16"]["reason"]
    assert got["refused"] == "base_gemm"
    assert got["fp32"]["kind"] in ("packed", "plain") and "probe" in got["fp32"]["reason"]
