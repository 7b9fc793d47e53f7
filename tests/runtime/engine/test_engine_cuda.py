"""The engine on a GPU: nf4 base on CUDA, a mixed batch against peft alone on the same GPU.

Collected everywhere, run only where torch sees CUDA (bench/gpu_check.sh selects these with
`-m cuda`); on a machine without one they are reported as skipped, never as passed.

On a GPU, the LoRA op is the Triton kernels (strategy "triton"), a different summation
order from peft's torch matmuls: a greedy token may flip where peft's top two logits are
within a hair of each other. The fp32 test allows a flip only there (margin < 1e-3) and
asserts it is rare; bf16 stacks (the CUDA default) are held to a measured agreement rate.

With `cuda_graphs` the decode step is a replayed CUDA graph (runtime/model/decode_graphs.py): the
same contract against peft, and step by step against the same padded step run eagerly,
through joins, leaves, bucket changes, KV pool growth and an adapter stack reallocated
under the graphs (each must drop and re-capture them).
"""

from __future__ import annotations

import pytest
import torch

from loraplex.basemodel import EOS_ID
from loraplex.runtime.engine.engine import Engine, EngineConfig
from tests.runtime.engine.test_engine import _requests, _run_staggered
from tests.runtime.world import SPECS, make_world

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


def _serve(micro_base, world, stack_dtype, n_req, max_new, **config):
    engine = Engine(EngineConfig(base_dir=micro_base, quantization="nf4",
                                 compute_dtype="float32", device="cuda",
                                 lora_stack_dtype=stack_dtype, max_slots=len(SPECS),
                                 max_rank=16, max_batch=12, **config),
                    world.registry).start()
    try:
        reqs = _requests(world.names, n_req, seed=2)
        results = _run_staggered(engine, reqs, max_new=max_new)
        decoder = engine._core.runner.static
        if config.get("cuda_graphs"):
            print(f"\ndecode graphs: {decoder.stats}")
            assert decoder.stats.replays > 0 and decoder.stats.failures == 0
        return reqs, results
    finally:
        engine.shutdown()


def _first_difference(got, want):
    for i, (g, w) in enumerate(zip(got, want, strict=False)):
        if g != w:
            return i
    return None if len(got) == len(want) else min(len(got), len(want))


@pytest.fixture(scope="module")
def gpu_world(micro_base, tmp_path_factory):
    from loraplex.runtime.model.loading import load_base

    ref = load_base(micro_base, quantization="nf4", compute_dtype="float32",
                    device="cuda").model
    return make_world(micro_base, tmp_path_factory.mktemp("cuda-world"), model=ref)


@pytest.mark.parametrize("cuda_graphs", [False, True], ids=["eager", "graphs"])
def test_nf4_on_gpu_mixed_batch_equals_peft_alone_fp32_stacks(micro_base, gpu_world,
                                                              cuda_graphs):
    reqs, results = _serve(micro_base, gpu_world, "float32", 12, 6, cuda_graphs=cuda_graphs)
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


def test_graph_replays_equal_the_padded_eager_step_through_reallocations(micro_base):
    """Runner level, nf4 base, fp32 stacks: the graphs runner against the same padded step
    run eagerly (`static_decode`), every decode step. Mid-run one layer's B stack is
    replaced by a copy and slot 2 reloaded into it: a graph still reading the old tensor
    would give the old adapter's logits."""
    from loraplex.runtime.model.runner import Runner
    from tests.runtime.model.test_decode_graphs import (
        _drive,
        _load_adapters,
        _swap_stack_and_reload,
    )

    cfg = EngineConfig(base_dir=micro_base, quantization="nf4", compute_dtype="float32",
                       device="cuda", lora_stack_dtype="float32", max_slots=3, max_rank=8,
                       max_batch=9, kv_block_size=4, max_seq_len=64)
    static, graphs = Runner.boot(cfg.replace(static_decode=True)), \
        Runner.boot(cfg.replace(cuda_graphs=True))
    for r in (static, graphs):
        _load_adapters(r)
    diffs, swapped = [], {}

    def check(step, a, b):
        assert a.argmax(-1).tolist() == b.argmax(-1).tolist(), f"step {step}"
        diffs.append(float((a - b).abs().max()))
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
        if step in (11, 12):  # no pool growth between them (stable pools, this schedule)
            swapped[step] = (graphs.static.stats.invalidations, graphs.kv.generation)
        if step == 11:
            for r in (static, graphs):
                _swap_stack_and_reload(r)

    _drive(static, graphs, check)
    stats = graphs.static.stats
    print(f"\ngraphs vs padded eager: max |logit diff| {max(diffs):.2e}, bitwise equal "
          f"at {sum(d == 0 for d in diffs)}/{len(diffs)} steps; {stats}")
    assert stats.failures == 0 and stats.replays >= len(diffs)
    (before, generation) = swapped[11]
    assert before > 0  # the pools grew under captured graphs: dropped, re-captured
    assert swapped[12] == (before + 1, generation)  # the moved stack dropped them too
    assert stats.captures > stats.invalidations
