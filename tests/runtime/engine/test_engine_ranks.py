"""Ranks up to `loraplex.limits.MAX_RANK` (256) through the registry and the engine: a
rank-256 peft adapter is registered and served token for token equal to peft in fp32, alone
and in one continuously batched run with rank-8/16/64 adapters, a rank-256 DoRA adapter and
base rows; rank 257 is refused at registration; an adapter above the engine's limit is
refused by the engine, typed, and the engine keeps serving."""

from __future__ import annotations

import json

import pytest

from loraplex.basemodel import EOS_ID
from loraplex.errors import FailedPrecondition, ValidationFailed
from loraplex.limits import MAX_RANK
from loraplex.registry import Identity
from loraplex.runtime.engine.engine import Engine, EngineConfig, SamplingParams
from tests.runtime.world import load_fp32, make_world, reference_greedy

ACME = Identity("acme")
# (name, r, alpha, use_rslora, subset, extras): three adapters for two rank-16 slots (one
# spills into a larger bucket), a rank-64 one, a rank-256 LoRA and a rank-256 DoRA adapter
SPECS = [
    ("r256", 256, 512, False, None),
    ("r8", 8, 16, False, None),
    ("r16", 16, 16, True, None),
    ("r64", 64, 32, False, ("q_proj", "v_proj", "mlp")),
    ("d256", 256, 128, False, None, {"use_dora": True}),
    ("r8b", 8, 8, False, ("k_proj", "o_proj")),
]
RANK_SLOTS = {16: 2, 64: 1, 256: 2}


def _requests(names, n):
    """Every adapter in turn, every fifth row on the base; prompts of varied lengths."""
    out = []
    for i in range(n):
        adapter = None if i % 5 == 4 else names[i % len(names)]
        out.append((f"r{i}", adapter, [(31 * i + 7 * j) % 250 + 3 for j in range(3 + i % 9)]))
    return out


def _serve(engine, reqs, max_new):
    """The first half, then the rest while the first decodes (rows join a running batch)."""
    streams = {}

    def submit(batch):
        for rid, adapter, prompt in batch:
            streams[rid] = engine.submit(engine.admit(
                rid, ACME, f"acme/{adapter}" if adapter else None, prompt_ids=prompt,
                sampling=SamplingParams(max_new_tokens=max_new)))

    half = len(reqs) // 2
    submit(reqs[:half])
    first = iter(streams["r0"])
    next(first), next(first)
    submit(reqs[half:])
    return {rid: s.wait(120) for rid, s in streams.items()}


def test_rank_256_alone_and_mixed_with_small_ranks_dora_and_base_equals_peft_fp32(
        micro_base, tmp_path):
    world = make_world(micro_base, tmp_path, specs=SPECS)
    assert world.registry.resolve(ACME, "acme/r256").rank == 256 == MAX_RANK
    engine = Engine(EngineConfig(base_dir=micro_base, quantization="none",
                                 compute_dtype="float32", device="cpu", rank_slots=RANK_SLOTS,
                                 max_batch=12, prefill_token_budget=32),
                    world.registry).start()
    try:
        alone = engine.generate(engine.admit("solo", ACME, "acme/r256", prompt_ids=[5, 9, 1],
                                             sampling=SamplingParams(max_new_tokens=6)), 120)
        reqs = _requests(world.names, 12)
        results = _serve(engine, reqs, max_new=6)
        slots_total = engine.stats().slots_total
    finally:
        engine.shutdown()
    assert slots_total == 5
    want_alone = reference_greedy(world, "r256", [5, 9, 1], 6, eos=EOS_ID)
    assert alone.token_ids == want_alone
    for rid, adapter, prompt in reqs:
        want = reference_greedy(world, adapter, prompt, 6, eos=EOS_ID)
        assert results[rid].token_ids == want, f"{rid} ({adapter}) differs from peft alone"
    base = reference_greedy(world, None, [5, 9, 1], 6, eos=EOS_ID)
    assert want_alone != base  # the adapters really change the output
    assert reference_greedy(world, "d256", [5, 9, 1], 6, eos=EOS_ID) not in (base, want_alone)


def _peft_dir(micro_base, out, r, **config):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(load_fp32(micro_base), LoraConfig(
        r=r, lora_alpha=r, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
        **config))
    model.save_pretrained(out)
    cfg = out / "adapter_config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()),
                               "base_model_name_or_path": str(micro_base)}))
    return out


def test_rank_257_is_refused_at_registration_naming_the_limit(micro_base, tmp_path):
    world = make_world(micro_base, tmp_path, specs=SPECS[1:2])
    with pytest.raises(ValidationFailed) as e:
        world.registry.push(ACME, _peft_dir(micro_base, tmp_path / "wide", 257), "acme/wide",
                            base=micro_base)
    assert e.value.field == "r"
    assert "r: rank 257 exceeds the maximum 256 (LORAPLEX_MAX_RANK)" in e.value.violations


def test_an_adapter_above_the_engines_limit_is_refused_and_the_engine_keeps_serving(
        micro_base, tmp_path):
    """An engine serving ranks up to 64: a rank-256 adapter is refused at admission (its
    version's rank), and one whose `r` is 8 but whose `rank_pattern` gives q_proj rank 128
    passes admission and is refused when its tensors are read, before any slot is touched."""
    world = make_world(micro_base, tmp_path, specs=SPECS[:2])
    sneaky = _peft_dir(micro_base, tmp_path / "sneaky", 8, rank_pattern={"q_proj": 128})
    assert world.registry.push(ACME, sneaky, "acme/sneaky", base=micro_base).rank == 8
    engine = Engine(EngineConfig(base_dir=micro_base, quantization="none",
                                 compute_dtype="float32", device="cpu", max_slots=2,
                                 max_rank=64, max_batch=4),
                    world.registry).start()
    try:
        with pytest.raises(FailedPrecondition) as e:
            engine.admit("wide", ACME, "acme/r256", prompt_ids=[1, 2])
        assert "max_rank 64" in str(e.value)
        with pytest.raises(FailedPrecondition) as e:
            engine.generate(engine.admit("sneaky", ACME, "acme/sneaky", prompt_ids=[1, 2],
                                         sampling=SamplingParams(max_new_tokens=2)), 60)
        assert "rank 128" in str(e.value) and "max_rank 64" in str(e.value)
        ok = engine.generate(engine.admit("ok", ACME, "acme/r8", prompt_ids=[5, 9, 1],
                                          sampling=SamplingParams(max_new_tokens=4)), 60)
    finally:
        engine.shutdown()
    assert ok.token_ids == reference_greedy(world, "r8", [5, 9, 1], 4, eos=EOS_ID)
