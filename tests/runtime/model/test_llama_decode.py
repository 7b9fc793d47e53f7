"""`llama_decode`: a Llama base's decode step without transformers' module wrappers gives
the model forward's logits bit for bit, with adapters of several ranks and the bare base
in one batch, step after step; other bases keep the model's own forward."""

from __future__ import annotations

import pytest
import torch

from bench.decode_graphs import load_random_adapter
from loraplex.runtime.engine.engine import EngineConfig
from loraplex.runtime.kv.cache import RowFeed
from loraplex.runtime.model import llama_decode
from loraplex.runtime.model.runner import Runner, group_by_slot

RANKS = {1: 2, 2: 8, 3: 4}  # adapter slot -> rank (slot 0: no adapter)


def _runner(base, **over) -> Runner:
    cfg = EngineConfig(base_dir=base, quantization="none", compute_dtype="float32",
                       device="cpu", max_slots=3, max_rank=8, max_batch=6, kv_block_size=4,
                       max_seq_len=64, **over)
    runner = Runner.boot(cfg)
    for slot, rank in RANKS.items():
        load_random_adapter(runner.injection, slot, rank, b_std=1.0)
    return runner


def test_a_llama_decode_step_equals_the_model_forward_bit_for_bit(micro_base):
    runner = _runner(micro_base)
    assert runner.llama_decode  # the micro base is a LlamaForCausalLM
    g = torch.Generator().manual_seed(3)
    slots = [0, 1, 2, 3, 1, 2]
    lengths = [3 + 2 * row for row in range(6)]  # rows cross KV block boundaries unevenly
    for row, n in enumerate(lengths):
        prompt = torch.randint(0, 250, (n,), generator=g).tolist()
        runner.forward([RowFeed(row, 0, prompt)], [slots[row]])
    token = [7] * 6
    for step in range(9):
        feeds, rows_slots = group_by_slot(
            [RowFeed(row, lengths[row] + step, [token[row]]) for row in range(6)], slots)
        # both write the same keys and values to the same positions, so the order of the
        # two forwards does not matter; alternate it to show neither depends on the other
        model_first = step % 2 == 1
        a = runner.forward(feeds, rows_slots) if model_first else None  # the model's forward
        b = runner.decode(feeds, rows_slots)  # llama_decode
        a = a if model_first else runner.forward(feeds, rows_slots)
        assert torch.equal(a, b), (step, (a - b).abs().max())
        for i, f in enumerate(feeds):
            token[f.row] = int(a[i].argmax())


def test_it_can_be_turned_off_and_other_bases_keep_their_own_forward(micro_base,
                                                                      base_factory):
    assert not _runner(micro_base, llama_decode=False).llama_decode
    qwen = Runner.boot(EngineConfig(base_dir=base_factory("micro", "qwen2"),
                                    quantization="none", compute_dtype="float32",
                                    device="cpu", max_slots=1, max_rank=8, max_batch=2,
                                    max_seq_len=32))
    assert not qwen.llama_decode
    assert "not a Llama" in llama_decode.unsupported(qwen.model)


@pytest.mark.parametrize(("change", "why"), [
    (lambda m: m.train(), "training mode"),
    (lambda m: setattr(m.config, "_attn_implementation", "eager"), "attention 'eager'"),
    (lambda m: setattr(m.config, "sliding_window", 16), "sliding-window"),
])
def test_what_it_does_not_run_is_named(micro_base, change, why):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(micro_base, attn_implementation="sdpa").eval()
    assert llama_decode.unsupported(model) is None
    change(model)
    assert why in llama_decode.unsupported(model)
