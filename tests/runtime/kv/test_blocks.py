"""KV memory that follows use: while sequences of mixed lengths run, the block pools hold at
most 1.5× the KV those sequences have written, plus one block per live row (its partly
filled last block) and the shared scratch block; when they end — finished, cancelled or
past their deadline — every block goes back and the pools shrink to the scratch block."""

from __future__ import annotations

import threading
import time

import torch

from loraplex.registry import Identity
from loraplex.runtime.api.observer import EngineObserver
from loraplex.runtime.engine.engine import Engine, EngineConfig, SamplingParams
from loraplex.runtime.kv.blocks import BlockAllocator
from loraplex.runtime.serve.servicers.convert import stats_pb
from tests.runtime.world import make_world, reference_greedy

ACME = Identity("acme")


class KVWatch(EngineObserver):
    """After every step (engine thread, so a consistent reading): reserved vs used."""

    def __init__(self) -> None:
        self.engine: Engine | None = None
        self.readings: list[tuple[int, int, int, int]] = []  # reserved, used, rows, block
        self.lock = threading.Lock()

    def on_step(self, batch_size: int, running: int, waiting: int) -> None:
        kv = self.engine._core.runner.kv
        block = kv.block_size * kv.position_bytes()
        with self.lock:
            self.readings.append((kv.nbytes(), kv.used_bytes(), len(kv.blocks.tables), block))
        time.sleep(0.005)  # >= 0.8 s for k8's 160 tokens, whatever the machine's speed


def test_reserved_kv_follows_live_sequences_and_comes_back(micro_base, tmp_path):
    world = make_world(micro_base, tmp_path)
    watch = KVWatch()
    engine = Engine(EngineConfig(base_dir=micro_base, quantization="none", device="cpu",
                                 max_slots=4, max_rank=16, max_batch=8, max_seq_len=256,
                                 prefill_token_budget=64, kv_block_size=8),
                    world.registry, watch)
    watch.engine = engine
    engine.start()
    try:
        g = torch.Generator().manual_seed(3)
        streams = {}
        for i, n in enumerate((3, 40, 9, 120, 17, 70, 5, 33, 90, 12)):  # mixed lengths
            prompt = torch.randint(0, 256, (n,), generator=g).tolist()
            adapter = f"acme/{world.names[i % 3]}" if i % 4 else None
            kw = {}
            if i == 8:  # ends past its deadline while running
                kw["deadline"] = time.monotonic() + 0.3
            streams[f"k{i}"] = engine.submit(engine.admit(
                f"k{i}", ACME, adapter, prompt_ids=prompt,
                # k8 asks for more tokens than 0.3 s can produce (prompt 90 + 160 < 256;
                # each step takes >= 5 ms: KVWatch.on_step)
                sampling=SamplingParams(max_new_tokens={3: 60, 8: 160}.get(i, 6 + 3 * i)),
                **kw))
        next(iter(streams["k3"]))
        assert engine.cancel("k3")  # cancelled mid-run
        results = {rid: s.wait(120) for rid, s in streams.items()}
        # the last rows' blocks go back at the end of the step that published their
        # results (one compaction per step): give the engine that moment
        end = time.monotonic() + 10
        while (stats := engine.stats()).kv_reserved_bytes > watch.readings[0][3] \
                and time.monotonic() < end:
            time.sleep(0.01)
    finally:
        engine.shutdown()
    assert results["k3"].finish_reason == "cancelled"
    assert results["k8"].finish_reason == "deadline"
    assert len(watch.readings) > 20
    peak_used = max(u for _, u, _, _ in watch.readings)
    for reserved, used, rows, block in watch.readings:
        assert reserved <= 1.5 * used + (rows + 1) * block, (reserved, used, rows)
    # the limit is max_batch × max_seq_len, what a cache reserving every row up front holds;
    # at its peak use this holds a fraction of that
    limit = stats.kv_limit_bytes
    assert max(r for r, _, _, _ in watch.readings) < 0.5 * limit
    assert peak_used > 0
    # every block returned: nothing used, only the scratch block held
    assert stats.kv_used_bytes == 0
    assert stats.kv_reserved_bytes == watch.readings[0][3]  # one block (the scratch)


def test_allocator_grows_with_headroom_and_compacts_on_release():
    a = BlockAllocator(block_size=4, max_blocks=40)
    assert a.extend(0, 10) == 3 and a.tables[0] == [1, 2, 3]  # no headroom yet
    grown = a.extend(1, 30)  # 8 more blocks: 11 + 40 // 16 = 13
    assert grown == 13 and a.allocated == 11
    assert a.extend(1, 31) is None  # same block
    shrink = a.release(0)  # its low blocks free up: row 1's high blocks move down
    assert shrink is not None and shrink.capacity == 8 + 31 // 16
    assert all(dst <= shrink.capacity < src for src, dst in shrink.moves)
    assert len(a.tables[1]) == 8 and max(a.tables[1]) <= shrink.capacity
    assert a.release(1).capacity == 0 and a.used_tokens == 0 and a.allocated == 0


def test_stable_pools_double_and_never_shrink():
    """With CUDA graphs each pool reallocation costs a re-capture of the decode graphs, so a
    stable pool grows to at least twice its size (log2 reallocations) and keeps its peak."""
    a = BlockAllocator(block_size=4, max_blocks=64, stable=True)
    grown = [g for row in range(8) for upto in range(1, 33)
             if (g := a.extend(row, upto)) is not None]
    assert grown == [1, 2, 4, 8, 16, 32, 64]
    assert all(a.release(row) is None for row in range(8))  # no compaction: same addresses
    assert a.capacity == 64 and a.allocated == 0 and a.used_tokens == 0
    assert a.extend(0, 40) is None and a.tables[0] == list(range(1, 11))


def test_prefix_cache_reuses_kv_only_for_the_same_adapter_version(micro_base, tmp_path):
    """Same prompt, same adapter version: the prompt's full blocks are reused and the answer
    is the same. Another adapter, the base, or an alias moved to another version: nothing
    reused, and each answer equals peft with that adapter alone."""
    world = make_world(micro_base, tmp_path)
    a, b, c = world.names[:3]
    world.registry.set_alias(ACME, f"acme/{a}:v1", "prod")
    engine = Engine(EngineConfig(base_dir=micro_base, quantization="none", device="cpu",
                                 max_slots=4, max_rank=16, max_batch=4, kv_block_size=8,
                                 prefix_cache_blocks=32), world.registry).start()
    prompt = torch.randint(0, 256, (43,), generator=torch.Generator().manual_seed(9)).tolist()
    n = 6

    def run(rid: str, ref: str | None) -> tuple[list[int], int]:
        before = engine.stats().prefix_hit_tokens
        res = engine.generate(engine.admit(rid, ACME, ref, prompt_ids=prompt,
                                           sampling=SamplingParams(max_new_tokens=n)), 60)
        return res.token_ids, engine.stats().prefix_hit_tokens - before

    try:
        first, hit = run("p1", "acme/" + a + "@prod")
        assert hit == 0
        again, hit = run("p2", "acme/" + a + "@prod")
        assert hit == 40 and again == first  # 5 full blocks of 8; the last 3 are computed
        other, hit = run("p3", f"acme/{b}")
        assert hit == 0 and other == reference_greedy(world, b, prompt, n)
        bare, hit = run("p4", None)
        assert hit == 0 and bare == reference_greedy(world, None, prompt, n)
        # the alias moves to a new version of `a` (c's weights): its digest is new
        world.registry.push(ACME, world.dirs[c], f"acme/{a}", base=micro_base)
        world.registry.set_alias(ACME, f"acme/{a}:v2", "prod")
        moved, hit = run("p5", "acme/" + a + "@prod")
        assert hit == 0 and moved == reference_greedy(world, c, prompt, n)
        assert first == reference_greedy(world, a, prompt, n) != moved
        stats = engine.stats()
    finally:
        engine.shutdown()
    assert stats.kv_used_bytes == 0
    assert (stats.prefix_lookups, stats.prefix_hits, stats.prefix_hit_tokens) == (5, 1, 40)
    pb = stats_pb(stats)  # the admin Stats RPC's answer
    assert (pb.prefix_hits, pb.prefix_hit_tokens, pb.kv_used_bytes) == (1, 40, 0)
    assert pb.kv_reserved_bytes == stats.kv_reserved_bytes > 0


def test_shared_prefix_blocks_are_counted_moved_once_and_evicted_lru():
    a = BlockAllocator(block_size=4, max_blocks=40, cache_blocks=3)
    p = list(range(100, 113))  # 13 tokens: 3 full blocks, 1 token left to compute
    a.extend(0, 40)  # a long row first, so the prompt's blocks land high
    assert a.match(1, "acme", "sha256:x", p) == 0
    a.extend(1, 13)
    a.publish(1, "acme", "sha256:x", p, 13)
    assert a.match(2, "acme", "sha256:y", p) == 0  # another adapter: nothing shared
    assert a.match(3, "acme", None, p) == 0  # the base: nothing shared
    assert a.match(4, "acme", "sha256:x", p) == 12 and a.tables[4] == a.tables[1][:3]
    assert all(a.refs[b] == 2 for b in a.tables[4])
    shrink = a.release(0)  # the low blocks free up: the shared ones move once
    assert shrink is not None
    assert a.tables[4] == a.tables[1][:3] and max(a.tables[1]) <= shrink.capacity
    assert len({src for src, _ in shrink.moves}) == len(shrink.moves)
    a.release(1)
    a.release(4)  # the 3 prompt blocks stay cached, idle
    assert a.allocated == 3 and a.used_tokens == 0
    assert a.match(5, "acme", "sha256:x", p) == 12
    a.release(5)
    q = list(range(200, 213))
    a.extend(6, 13)
    a.publish(6, "acme", "sha256:x", q, 13)
    a.release(6)  # 6 idle blocks > 3: the least recently used (p's) are evicted
    assert a.match(7, "acme", "sha256:x", p) == 0 and a.match(8, "acme", "sha256:x", q) == 12


def test_idle_prefix_blocks_stay_cached_while_the_pool_can_still_grow():
    """A busy pool grows (up to rows' worth + `cache_blocks`) before it evicts a cached
    prompt; at its limit the least recently used idle blocks make way."""
    a = BlockAllocator(block_size=4, max_blocks=8, cache_blocks=4)
    p = list(range(100, 113))  # 3 full blocks + 1 token
    a.extend(0, 13)
    a.publish(0, "acme", "sha256:x", p, 13)
    a.release(0)  # 3 idle cached blocks; the pool shrinks to them
    assert (a.capacity, a.allocated) == (3, 3)
    a.extend(1, 24)  # 6 new blocks: the pool grows, the cached prompt stays
    assert a.capacity == 10 and a.match(2, "acme", "sha256:x", p) == 12
    a.release(2)
    a.extend(3, 20)  # 5 more: the pool reaches 8 + 4 and evicts the 2 oldest idle blocks
    assert a.capacity == 12 and a.match(4, "acme", "sha256:x", p) == 0


def test_a_steps_rows_grow_the_pool_once_and_its_releases_compact_once():
    """Each growth or compaction copies every KV pool: a step asks once for all its rows'
    blocks, and its finished rows compact the pool once, at the end."""
    a = BlockAllocator(block_size=4, max_blocks=200)
    need = sum(a.need(row, 40) for row in range(8))  # 8 rows x 10 blocks
    assert need == 80
    grown = a.make_room(need)
    assert grown is not None and grown >= 80
    assert all(a.extend(row, 40) is None for row in range(8))  # no second growth
    assert a.need(0, 41) == 1 and a.need(0, 40) == 0
    assert all(a.release(row, compact=False) is None for row in range(1, 8))
    shrink = a.compact()
    assert shrink is not None and shrink.capacity == 10 + 40 // 16
    assert max(a.tables[0]) <= shrink.capacity and a.compact() is None
