"""The padded static decode path (what `cuda_graphs` captures), checked on CPU without capture.

A decode step padded to its (batch, KV) bucket over the fixed input buffer must give the
tokens of the ordinary eager step, while rows join and leave, adapters mix, buckets change
and the KV pools grow and compact (each reallocation drops the graphs). Its logits differ
from the eager step only by floating-point summation order over the padding: with buckets
that fit the batch exactly they are bitwise equal. Capture itself needs a GPU
(tests/runtime/engine/test_engine_cuda.py, bench/gpu_check.sh); asking for it elsewhere is refused.
"""

from __future__ import annotations

import sys

import pytest
import torch

from bench.decode_graphs import load_random_adapter
from loraplex import peft_format
from loraplex.errors import InvalidArgument
from loraplex.registry import Identity
from loraplex.runtime.engine.engine import Engine, EngineConfig, SamplingParams
from loraplex.runtime.kv.cache import RowFeed
from loraplex.runtime.model.decode_graphs import Bucket, bucket_of, buckets_up_to
from loraplex.runtime.model.runner import Runner, check_cuda_graphs
from tests.runtime.engine.test_engine import _requests, _run_staggered
from tests.runtime.world import SPECS, make_world

ACME = Identity("acme")
RANKS = {1: 2, 2: 8, 3: 4}  # adapter slot -> rank (slot 0: no adapter)


def test_buckets_are_powers_of_two_up_to_the_limit():
    assert buckets_up_to(32) == (1, 2, 4, 8, 16, 32)
    assert buckets_up_to(12) == (1, 2, 4, 8, 12)
    assert buckets_up_to(1) == (1,)
    assert [bucket_of(n, (1, 2, 4, 8, 12)) for n in (1, 3, 5, 9, 12)] == [1, 4, 8, 12, 12]
    with pytest.raises(InvalidArgument):
        bucket_of(13, (1, 2, 4, 8, 12))


def test_cuda_graphs_off_cuda_is_a_config_error_not_a_silent_fallback():
    with pytest.raises(InvalidArgument) as e:
        EngineConfig(base_dir=".", device="cpu", cuda_graphs=True)
    assert e.value.field == "cuda_graphs" and "CUDA device" in str(e.value)
    with pytest.raises(InvalidArgument) as e:  # device "auto" resolved to the CPU at boot
        check_cuda_graphs(True, torch.device("cpu"))
    assert e.value.field == "cuda_graphs"
    check_cuda_graphs(False, torch.device("cpu"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_engine_with_cuda_graphs_on_a_cpu_machine_fails_at_boot_typed(micro_base):
    engine = Engine(EngineConfig(base_dir=micro_base, quantization="none", cuda_graphs=True))
    with pytest.raises(InvalidArgument) as e:
        engine.start(timeout=120)
    assert e.value.field == "cuda_graphs" and "cpu" in str(e.value)
    assert not engine.ready


# -- the padded path against the eager one, step by step (runner level) -----------------

def _load_adapters(runner: Runner) -> None:
    """Random adapters of ranks 2, 8 and 4 in slots 1..3, the same in every runner."""
    for slot, rank in RANKS.items():
        load_random_adapter(runner.injection, slot, rank, b_std=1.0)


def _swap_stack_and_reload(runner: Runner) -> None:
    """Replace one layer's B stack by a copy (a new tensor: what a graph captured earlier
    does not read) and load another adapter into slot 2, so a stale graph would differ."""
    layer = next(iter(runner.injection.layers.values()))
    layer.lora_b = layer.lora_b.clone()
    g = torch.Generator().manual_seed(99)
    tensors = {}
    for path, lay in runner.injection.layers.items():
        tensors[peft_format.weight_key(path, "A")] = torch.randn(4, lay.in_features, generator=g)
        tensors[peft_format.weight_key(path, "B")] = torch.randn(lay.out_features, 4, generator=g)
    runner.injection.load_adapter(2, tensors, 4, 8)


def _pair(base, block_size: int = 4, device: str = "cpu",
          rank_slots=None) -> tuple[Runner, Runner]:
    """An eager runner and a `static_decode` one, fp32, the same adapters loaded
    (`rank_slots`: the slots' rank buckets, e.g. ((2, 1), (8, 2)); None: one bucket)."""
    cfg = EngineConfig(base_dir=base, quantization="none", compute_dtype="float32",
                       lora_stack_dtype="float32", device=device, max_slots=3, max_rank=8,
                       max_batch=9, kv_block_size=block_size, max_seq_len=64,
                       rank_slots=rank_slots)
    eager, static = Runner.boot(cfg), Runner.boot(cfg.replace(static_decode=True))
    for r in (eager, static):
        _load_adapters(r)
    return eager, static


def _drive(eager: Runner, static: Runner, check, steps: int = 26,
           exact_prefill: bool = True) -> set[Bucket]:
    """Rows join (prefill, eager in both), decode together, leave; `check(step, a, b)` on
    each decode step's logits. Returns the buckets the static path used. Prefill logits are
    equal bit for bit when both runners hold their LoRA stacks alike (`exact_prefill`);
    with another B layout the matmuls may sum in another order (e.g. on another thread
    count), so then they are close and pick the same token."""
    g = torch.Generator().manual_seed(0)
    prompts = {row: torch.randint(0, 250, (3 + 2 * row,), generator=g).tolist()
               for row in range(9)}
    slot = {row: row % 4 for row in range(9)}  # every adapter and the bare base
    length, last, live, used = {}, {}, [], set()

    def join(row: int) -> None:
        outs = []
        for r in (eager, static):
            r.rows.claim(row)
            outs.append(r.forward([RowFeed(row, 0, prompts[row])], [slot[row]]))
        if exact_prefill:
            assert torch.equal(outs[0], outs[1])  # prefill is eager in both
        else:
            assert outs[0].argmax(-1).tolist() == outs[1].argmax(-1).tolist()
            torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-5)
        length[row], last[row] = len(prompts[row]), int(outs[0].argmax())
        live.append(row)

    def leave(row: int) -> None:
        live.remove(row)
        for r in (eager, static):
            r.release_row(row)

    for row in range(3):
        join(row)
    for step in range(steps):
        if step == 4:
            join(3), join(4)
        if step == 8:
            for row in (5, 6, 7, 8):  # the full batch: bucket 9 (max_batch)
                join(row)
        if step == 14:
            for row in (0, 2, 5):
                leave(row)
        if step == 19:
            for row in (1, 3, 6):
                leave(row)
        feeds = [RowFeed(row, length[row], [last[row]]) for row in live]
        used.add(static.static.bucket_for(feeds))
        slots = [slot[row] for row in live]
        a, b = eager.decode(feeds, slots), static.decode(feeds, slots)  # [B, V] each
        check(step, a, b)
        for row, t in zip(live, a.argmax(-1).tolist(), strict=True):
            last[row] = t
            length[row] += 1
    return used


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_padded_decode_gives_the_eager_tokens_through_joins_leaves_and_buckets(
        base_factory, arch):
    eager, static = _pair(base_factory("micro", arch))
    diffs, dropped = [], []

    def check(step, a, b):
        assert a.argmax(-1).tolist() == b.argmax(-1).tolist(), f"step {step}"
        diffs.append(float((a - b).abs().max()))
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)  # fp32 summation order only
        if step == 16:  # no pool change between steps 16 and 17: only the stack moves
            for r in (eager, static):
                _swap_stack_and_reload(r)
            dropped.append((static.static.stats.invalidations, static.kv.generation))
        if step == 17:
            dropped.append((static.static.stats.invalidations, static.kv.generation))

    used = _drive(eager, static, check)
    stats = static.static.stats
    print(f"\n{arch}: max |logit diff| {max(diffs):.2e} over {len(diffs)} steps; "
          f"{stats}", file=sys.stderr)
    assert {b.rows for b in used} >= {4, 8, 9} and {b.blocks for b in used} >= {4, 8, 16}
    assert stats.eager_steps == 26 + 1  # every decode step (and boot's probe) took the path
    assert stats.invalidations > 0  # the pools grew and compacted: the buckets were dropped
    assert stats.captures > len(used)  # ... and prepared again
    (before, generation), after = dropped
    assert after == (before + 1, generation)  # a moved adapter stack drops them too


def test_without_padding_the_static_buffers_are_bitwise_the_eager_step(micro_base):
    """Buckets of every size and one-position KV blocks: no pad row, no pad key. What is
    left — the input buffer, the block table, the bucketed views — changes nothing."""
    eager, static = _pair(micro_base, block_size=1)
    static.static.batch_buckets = tuple(range(1, 10))
    static.static.kv_buckets = tuple(range(1, 65))

    def check(step, a, b):
        assert torch.equal(a, b), f"step {step}: {float((a - b).abs().max())}"

    _drive(eager, static, check)


# -- the engine with the static path: the contract test's batch ------------------------

def _serve(base, world, reqs, max_new, **config):
    engine = Engine(EngineConfig(base_dir=base, quantization="none", device="cpu",
                                 max_slots=len(SPECS), max_rank=16, max_batch=12,
                                 prefill_token_budget=24, **config), world.registry).start()
    try:
        results = _run_staggered(engine, reqs, max_new)
        return results, engine.stats(), engine._core.runner.static
    finally:
        engine.shutdown()


def test_engine_static_decode_equals_eager_engine_with_prefix_cache(micro_base, tmp_path):
    """A staggered mixed batch in which every third request shares a 24-token prompt prefix
    and an adapter (prefix-cache hits give decode rows shared blocks), greedy: the static
    path's tokens are the eager engine's, request by request."""
    world = make_world(micro_base, tmp_path, specs=SPECS[:4])
    reqs = _requests(world.names, 14, seed=4)
    shared = torch.randint(0, 256, (24,), generator=torch.Generator().manual_seed(5)).tolist()
    reqs = [(rid, world.names[0], shared + p) if i % 3 == 0 else (rid, a, p)
            for i, (rid, a, p) in enumerate(reqs)]
    cfg = dict(prefix_cache_blocks=32, kv_block_size=8)
    want, _, none = _serve(micro_base, world, reqs, 8, **cfg)
    got, stats, decoder = _serve(micro_base, world, reqs, 8, static_decode=True, **cfg)
    assert none is None and decoder is not None
    for rid, adapter, _prompt in reqs:
        assert got[rid].token_ids == want[rid].token_ids, f"{rid} ({adapter})"
    assert stats.prefix_hits > 0
    assert decoder.stats.eager_steps > 8 and decoder.stats.replays == 0


def test_engine_static_decode_serves_several_tenants_adapters_and_the_base(micro_base,
                                                                           tmp_path):
    world = make_world(micro_base, tmp_path, specs=SPECS[:3])
    engine = Engine(EngineConfig(base_dir=micro_base, quantization="none", device="cpu",
                                 max_slots=3, max_rank=16, max_batch=4, static_decode=True),
                    world.registry).start()
    try:
        streams = [engine.submit(engine.admit(
            f"s{i}", ACME, f"acme/{world.names[i % 3]}" if i % 4 else None,
            prompt_ids=[3 + i, 9, 4], sampling=SamplingParams(max_new_tokens=5)))
            for i in range(6)]  # more than max_batch: rows leave and others take them
        results = [s.wait(120) for s in streams]
    finally:
        engine.shutdown()
    assert all(len(r.token_ids) == 5 for r in results)


# -- the capture bookkeeping, with a stand-in for torch.cuda's graph API ----------------

class _FakeCuda:
    """torch.cuda's graph API on CPU: a "capture" runs the body once and records it; a
    "replay" runs it again into the captured output tensor (so a replay, like a real one,
    reads the input buffer as it is at replay time). Counts what the decoder asks for."""

    def __init__(self, fail: bool = False) -> None:
        self.fail, self.pools, self.warmups, self.capturing = fail, 0, 0, None

    def install(self, monkeypatch, decoder) -> None:
        import contextlib

        fake = self

        class Graph:
            def __init__(self):
                self.body = self.out = None

            def replay(self):
                self.out.copy_(self.body())

        @contextlib.contextmanager
        def graph(g, pool=None, stream=None, capture_error_mode="global"):
            assert capture_error_mode == "thread_local" and stream is decoder._stream
            if fake.fail:
                raise RuntimeError("operation not permitted when stream is capturing")
            fake.capturing = g
            yield
            fake.capturing = None

        def handle():
            fake.pools += 1
            return fake.pools

        body = decoder._body

        def recording_body(bucket):
            out = body(bucket)
            if fake.capturing is not None:
                fake.capturing.body, fake.capturing.out = (lambda: body(bucket)), out
            else:
                fake.warmups += 1
            return out

        stream = type("S", (), {"wait_stream": lambda self, other: None})()
        monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
        monkeypatch.setattr(torch.cuda, "graph", graph)
        monkeypatch.setattr(torch.cuda, "graph_pool_handle", handle)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: stream)
        monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
        monkeypatch.setattr(decoder, "_body", recording_body)
        decoder._stream, decoder.capture = stream, True


def test_captures_replays_and_drops_follow_the_buckets_and_the_pools(micro_base,
                                                                      monkeypatch):
    eager, static = _pair(micro_base)
    static.static = static.static_decode(capture=False)  # a fresh decoder, then "capture"
    fake = _FakeCuda()
    fake.install(monkeypatch, static.static)

    def check(step, a, b):
        assert a.argmax(-1).tolist() == b.argmax(-1).tolist(), f"step {step}"
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)

    used = _drive(eager, static, check)
    stats = static.static.stats
    assert stats.replays == 26 and stats.eager_steps == 0 and stats.failures == 0
    assert stats.captures >= len(used) and fake.warmups == 2 * stats.captures
    # every drop opens a new memory pool (the allocator refuses to rejoin an unused one)
    assert stats.invalidations > 0 and fake.pools == stats.invalidations + 1


def test_a_failed_capture_is_typed_at_boot_and_falls_back_to_eager_later(micro_base,
                                                                         monkeypatch):
    from loraplex.errors import FailedPrecondition

    eager, static = _pair(micro_base)
    static.static = static.static_decode(capture=False)
    _FakeCuda(fail=True).install(monkeypatch, static.static)
    feeds, slots = [RowFeed(0, 0, [5])], [1]
    for r in (eager, static):
        r.rows.claim(0)
    with pytest.raises(FailedPrecondition) as e:  # boot's probe
        static.static.forward(feeds, slots, strict=True)
    assert e.value.field == "cuda_graphs" and "capturing the decode step failed" in str(e.value)
    got = static.static.forward(feeds, slots)  # serving: graphs off, the padded eager step
    assert static.static.capture is False and static.static.stats.failures == 2
    torch.testing.assert_close(got, eager.decode(feeds, slots), rtol=0, atol=1e-5)
