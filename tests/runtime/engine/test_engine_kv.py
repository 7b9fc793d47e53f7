"""The block KV cache + explicit positions + 4D mask: rows of different lengths, prefill
chunks and decode tokens in one forward give each row the logits it gets alone, also across
block boundaries and after the pool is compacted under running rows."""

from __future__ import annotations

import pytest
import torch

from loraplex.runtime.kv.cache import BlockKVCache, RowAllocator, RowFeed, build_layout


def _model(base_dir, attn):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32,
                                                attn_implementation=attn).eval()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@torch.inference_mode()
def test_mixed_rows_equal_each_row_alone(base_factory, arch, attn):
    model = _model(base_factory("micro", arch), attn)
    cache = BlockKVCache(model.config.num_hidden_layers, rows=4, max_len=64, block_size=4)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (5, 11, 3, 30)]
    rows = [2, 0, 3, 1]  # not in order: blocks interleave across rows

    def step(chunks):
        lay = build_layout(chunks)
        cache.reserve(chunks)
        cache.set_layout(lay)
        mask = lay.mask(boolean=attn == "sdpa", dtype=torch.float32)  # [B, 1, Q, L]
        out = model(input_ids=lay.input_ids, position_ids=lay.position_ids,
                    attention_mask=mask, cache=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]  # [B, V]

    # a long row takes the low blocks first, then is released: the pool compacts under the rest
    step([RowFeed(rows[3], 0, seqs[3])])
    # step 1: row 0 whole prompt + row 1 first chunk; step 2: rest of row 1 + row 2 whole
    got = {0: step([RowFeed(rows[0], 0, seqs[0]), RowFeed(rows[1], 0, seqs[1][:4])])[0]}
    lg = step([RowFeed(rows[1], 4, seqs[1][4:]), RowFeed(rows[2], 0, seqs[2])])
    got[1], got[2] = lg[0], lg[1]
    full = [list(s) for s in seqs[:3]]
    worst, moved = 0.0, False
    for k in range(6):  # then decode steps, one token per row, crossing block boundaries
        if k == 2:
            before = {r: list(cache.blocks.tables[r]) for r in rows[:3]}
            cap = cache.blocks.capacity
            cache.release(rows[3])
            moved = before != {r: cache.blocks.tables[r] for r in rows[:3]}
            assert cache.blocks.capacity < cap
        for i in range(3):
            alone = model(input_ids=torch.tensor([full[i]])).logits[0, -1]
            worst = max(worst, float((alone - got[i]).abs().max()))
            full[i].append(int(got[i].argmax()))
        lg = step([RowFeed(rows[i], len(full[i]) - 1, [full[i][-1]]) for i in range(3)])
        got = {i: lg[i] for i in range(3)}
    assert moved  # live blocks were copied down, and the rows still read their own keys
    assert worst < 1e-5
    for r in rows[:3]:
        cache.release(r)
    assert cache.blocks.capacity == 0 and cache.used_bytes() == 0


def test_layout_left_pads_and_sends_pads_to_the_scratch_block():
    feeds = [RowFeed(1, 4, [7, 8, 9]), RowFeed(0, 0, [5])]
    lay = build_layout(feeds)
    assert lay.input_ids.tolist() == [[7, 8, 9], [0, 0, 5]]
    assert lay.position_ids.tolist() == [[4, 5, 6], [0, 0, 0]]
    assert lay.valid.tolist() == [[True] * 3, [False, False, True]]
    assert lay.kv_len == 7
    cache = BlockKVCache(1, rows=2, max_len=32, block_size=4)
    cache.blocks.extend(1, 4)  # row 1 already holds positions 0..3 (block 1)
    cache.reserve(feeds)  # row 1 -> blocks 1, 2; row 0 -> block 3
    cache.set_layout(lay)
    assert cache.blocks.tables == {1: [1, 2], 0: [3]}
    assert cache._write.tolist() == [[8, 9, 10], [0, 0, 12]]  # pads write scratch block 0
    assert cache._read_blocks.tolist() == [1, 2, 3, 0]  # row 0 reads its block, then scratch
    m = lay.mask(boolean=True, dtype=torch.float32)  # [B, 1, Q, L]
    assert m.shape == (2, 1, 3, 7)
    assert m[0, 0, 0].tolist() == [True] * 5 + [False] * 2  # position 4 sees keys 0..4
    assert m[1, 0, 2].tolist() == [True] + [False] * 6  # the real token at position 0
    assert m[1, 0, 0].tolist() == [True] + [False] * 6  # pads see key 0 only (no NaN rows)
    f = lay.mask(boolean=False, dtype=torch.float32)
    assert f[0, 0, 0, 5] == torch.finfo(torch.float32).min and f[0, 0, 0, 4] == 0


def test_row_allocator_reuses_lowest_rows_first():
    rows = RowAllocator(3)
    assert [rows.take(), rows.take(), rows.take(), rows.take()] == [0, 1, 2, None]
    rows.give(1)
    rows.give(1)  # safe to repeat
    rows.give(0)
    assert rows.free == 2 and rows.take() == 0
