"""The engine on a GPU: nf4 base on CUDA, a mixed batch against peft alone on the same GPU.

Collected everywhere, run only where torch sees CUDA (bench/gpu_check.sh selects these with
`-m cuda`); on a machine without one they are reported as skipped, never as passed.

On a GPU, the LoRA op is the Triton kernels (strategy "triton"), a different summation
order from peft's torch matmuls: a greedy token may flip where peft's top two logits are
within a hair of each other. The fp32 test allows a flip only there (margin < 1e-3) and
asserts it is rare; bf16 stacks (the CUDA default) are held to a measured agreement rate.
"""

from __future__ import annotations

import pytest
import torch
from test_engine import _requests, _run_staggered
from test_engine_util import SPECS, make_world

from loraplex.basemodel import EOS_ID
from loraplex.runtime.engine import Engine, EngineConfig

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
NEAR_TIE = 1e-3


@torch.no_grad()
def _peft_greedy(world, adapter, prompt, n):
    """peft, only `adapter` active, alone, greedy, no cache, on the model's device; returns
    the tokens and the top-2 logit margin at each step."""
    pm = world.peft_model
    dev = next(pm.parameters()).device
    ids, out, margins = list(prompt), [], []
    for _ in range(n):
        if adapter is None:
            with pm.disable_adapter():
                logits = pm(torch.tensor([ids], device=dev)).logits[0, -1]
        else:
            pm.set_adapter(adapter)
            logits = pm(torch.tensor([ids], device=dev)).logits[0, -1]
        top = logits.float().topk(2).values
        t = int(logits.argmax())
        if t == EOS_ID:
            break
        out.append(t)
        margins.append(float(top[0] - top[1]))
        ids.append(t)
    return out, margins


def _serve(micro_base, world, stack_dtype, n_req, max_new):
    engine = Engine(EngineConfig(base_dir=micro_base, quantization="nf4",
                                 compute_dtype="float32", device="cuda",
                                 lora_stack_dtype=stack_dtype, max_slots=len(SPECS),
                                 max_rank=16, max_batch=12), world.registry).start()
    try:
        reqs = _requests(world.names, n_req, seed=2)
        return reqs, _run_staggered(engine, reqs, max_new=max_new)
    finally:
        engine.shutdown()


def _first_difference(got, want):
    for i, (g, w) in enumerate(zip(got, want, strict=False)):
        if g != w:
            return i
    return None if len(got) == len(want) else min(len(got), len(want))


@pytest.fixture(scope="module")
def gpu_world(micro_base, tmp_path_factory):
    from loraplex.runtime.base import load_base

    ref = load_base(micro_base, quantization="nf4", compute_dtype="float32",
                    device="cuda").model
    return make_world(micro_base, tmp_path_factory.mktemp("cuda-world"), model=ref)


def test_nf4_on_gpu_mixed_batch_equals_peft_alone_fp32_stacks(micro_base, gpu_world):
    reqs, results = _serve(micro_base, gpu_world, "float32", 12, 6)
    flips = 0
    for rid, adapter, prompt in reqs:
        want, margins = _peft_greedy(gpu_world, adapter, prompt, 6)
        i = _first_difference(results[rid].token_ids, want)
        if i is not None:
            assert i < len(margins) and margins[i] < NEAR_TIE, (
                f"{rid} ({adapter}) differs from peft alone at token {i}, margin "
                f"{margins[i] if i < len(margins) else 'n/a'}")
            flips += 1
    assert flips <= 1


def test_nf4_on_gpu_bf16_stacks_agree_with_fp32_peft(micro_base, gpu_world):
    reqs, results = _serve(micro_base, gpu_world, "auto", 12, 6)
    same = sum(results[rid].token_ids == _peft_greedy(gpu_world, a, p, 6)[0]
               for rid, a, p in reqs)
    print(f"\nbf16 stacks on GPU: {same}/{len(reqs)} requests equal fp32 peft alone")
    assert same >= len(reqs) - 2
