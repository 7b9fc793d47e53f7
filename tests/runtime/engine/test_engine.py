"""Engine correctness: every request of a mixed, continuously batched run equals peft with
only its adapter, run alone on the same base (greedy, token for token)."""

from __future__ import annotations

import time

import pytest
import torch

from loraplex.basemodel import EOS_ID
from loraplex.registry import Identity
from loraplex.runtime.engine.engine import Engine, EngineConfig, SamplingParams
from tests.runtime.world import SPECS, make_world, reference_greedy

ACME = Identity("acme")


def _requests(names: list[str], n: int, seed: int) -> list[tuple[str, str | None, list[int]]]:
    """(request id, adapter name or None, prompt ids): every adapter, plus no-adapter rows."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        adapter = None if i % 5 == 4 else names[i % len(names)]
        prompt = torch.randint(0, 256, (4 + (7 * i) % 23,), generator=g).tolist()
        out.append((f"r{i}", adapter, prompt))
    return out


def _run_staggered(engine: Engine, reqs, max_new: int):
    """Submit the first half, let it decode a few steps, then the rest (joining mid-run)."""
    half = len(reqs) // 2
    streams = {}

    def submit(batch):
        for rid, adapter, prompt in batch:
            streams[rid] = engine.submit(engine.admit(
                rid, ACME, f"acme/{adapter}" if adapter else None, prompt_ids=prompt,
                sampling=SamplingParams(max_new_tokens=max_new)))

    submit(reqs[:half])
    first = iter(streams["r0"])
    next(first), next(first)  # r0 has two tokens: the batch is running
    submit(reqs[half:])
    return {rid: s.wait(120) for rid, s in streams.items()}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_mixed_batch_equals_peft_alone_fp32(base_factory, tmp_path, arch):
    base = base_factory("micro", arch)
    world = make_world(base, tmp_path)
    engine = Engine(EngineConfig(base_dir=base, quantization="none", device="cpu",
                                 max_slots=len(SPECS), max_rank=16, max_batch=16,
                                 prefill_token_budget=24), world.registry).start()
    try:
        reqs = _requests(world.names, 18, seed=1)
        results = _run_staggered(engine, reqs, max_new=8)
        stats = engine.stats()
    finally:
        engine.shutdown()
    differs = 0
    for rid, adapter, prompt in reqs:
        want = reference_greedy(world, adapter, prompt, 8, eos=EOS_ID)
        got = results[rid]
        assert got.token_ids == want, f"{rid} ({adapter}) differs from peft alone"
        assert got.usage.prompt_tokens == len(prompt)
        assert got.adapter is None if adapter is None else got.adapter.name == adapter
        if adapter is not None:
            differs += want != reference_greedy(world, None, prompt, 8, eos=EOS_ID)
    assert differs >= len(world.names) - 1  # the adapters really change the output
    assert stats.steps < 18 * 8 / 3  # requests shared forwards (continuous batching)
    assert stats.running == stats.kv_rows_used == 0


def test_mixed_batch_equals_peft_on_the_same_nf4_base(micro_base, tmp_path):
    from loraplex.runtime.model.loading import load_base

    ref_model = load_base(micro_base, quantization="nf4", compute_dtype="float32").model
    world = make_world(micro_base, tmp_path, model=ref_model)
    engine = Engine(EngineConfig(base_dir=micro_base, quantization="nf4",
                                 compute_dtype="float32", device="cpu", max_slots=len(SPECS),
                                 max_rank=16, max_batch=12), world.registry).start()
    try:
        reqs = _requests(world.names, 12, seed=2)
        results = _run_staggered(engine, reqs, max_new=6)
    finally:
        engine.shutdown()
    for rid, adapter, prompt in reqs:
        assert results[rid].token_ids == reference_greedy(world, adapter, prompt, 6, eos=EOS_ID)


def test_rows_run_grouped_by_adapter_and_each_stream_gets_its_own_tokens(micro_base,
                                                                          tmp_path):
    """The decode forward takes its rows grouped by adapter slot, not in KV-row order
    (runner.group_by_slot); every request still gets exactly peft's tokens alone."""
    world = make_world(micro_base, tmp_path, specs=SPECS[:3])
    engine = Engine(EngineConfig(base_dir=micro_base, quantization="none",
                                 compute_dtype="float32", device="cpu", max_slots=3,
                                 max_rank=16, max_batch=8),
                    world.registry).start()
    runner = engine._core.runner
    seen: list[tuple[list[int], list[int]]] = []  # (KV rows, slots) of each decode forward
    real_decode = runner.decode

    def decode(feeds, slots):
        seen.append(([f.row for f in feeds], list(slots)))
        return real_decode(feeds, slots)

    runner.decode = decode
    g = torch.Generator().manual_seed(5)
    # adapters interleaved over the KV rows: a1 a2 a3 a1 a2 a3 base
    reqs = [(f"o{i}", world.names[i % 3] if i < 6 else None,
             torch.randint(0, 256, (3 + i,), generator=g).tolist()) for i in range(7)]
    try:
        streams = {rid: engine.submit(engine.admit(
            rid, ACME, f"acme/{adapter}" if adapter else None, prompt_ids=prompt,
            sampling=SamplingParams(max_new_tokens=6))) for rid, adapter, prompt in reqs}
        results = {rid: s.wait(120) for rid, s in streams.items()}
    finally:
        engine.shutdown()
    assert seen and all(slots == sorted(slots) for _, slots in seen)
    assert any(rows != sorted(rows) for rows, _ in seen)  # the order really changed
    for rid, adapter, prompt in reqs:
        assert results[rid].token_ids == reference_greedy(world, adapter, prompt, 6, eos=EOS_ID)


def test_rank_and_alpha_patterns_are_served_with_peft_scales(micro_base, tmp_path):
    """An adapter whose config overrides r/alpha per module (peft's rank_pattern and
    alpha_pattern) is served with each module's own scale, as peft computes it."""
    specs = [("pat", 4, 8, False, None,
              {"rank_pattern": {"q_proj": 2}, "alpha_pattern": {"down_proj": 32}}),
             ("plain", 4, 8, False, None)]
    world = make_world(micro_base, tmp_path, specs=specs)
    engine = Engine(EngineConfig(base_dir=micro_base, quantization="none", device="cpu",
                                 max_slots=2, max_rank=16, max_batch=4), world.registry).start()
    try:
        reqs = _requests(world.names, 4, seed=3)
        results = _run_staggered(engine, reqs, max_new=8)
    finally:
        engine.shutdown()
    for rid, adapter, prompt in reqs:
        assert results[rid].token_ids == reference_greedy(world, adapter, prompt, 8, eos=EOS_ID)


def test_long_prompt_prefills_in_chunks_while_others_decode(micro_base, tmp_path):
    """A prompt 5x the per-step budget is prefilled over several steps; a request already
    decoding keeps producing a token every step meanwhile, and both equal peft."""
    world = make_world(micro_base, tmp_path, specs=SPECS[:2])
    engine = Engine(EngineConfig(base_dir=micro_base, quantization="none", device="cpu",
                                 max_slots=2, max_rank=16, max_batch=4,
                                 prefill_token_budget=16), world.registry).start()
    g = torch.Generator().manual_seed(3)
    short = torch.randint(0, 256, (5,), generator=g).tolist()
    long = torch.randint(0, 256, (80,), generator=g).tolist()
    try:
        s1 = engine.submit(engine.admit("short", ACME, "acme/a1", prompt_ids=short,
                                             sampling=SamplingParams(max_new_tokens=30)))
        it = iter(s1)
        next(it)
        steps0 = engine.stats().steps
        s2 = engine.submit(engine.admit("long", ACME, "acme/a2", prompt_ids=long,
                                             sampling=SamplingParams(max_new_tokens=4)))
        r2 = s2.wait(60)
        r1 = s1.wait(60)
        steps = engine.stats().steps - steps0
    finally:
        engine.shutdown()
    assert r1.token_ids == reference_greedy(world, "a1", short, 30, eos=EOS_ID)
    assert r2.token_ids == reference_greedy(world, "a2", long, 4, eos=EOS_ID)
    assert steps >= 80 // 16  # the long prompt took several steps to prefill
    assert r2.timings.prefill_s > 0 and r2.timings.first_token_s >= r2.timings.prefill_s


def test_sync_iteration_and_async_stream_agree_with_the_result(micro_base, tmp_path):
    import asyncio

    world = make_world(micro_base, tmp_path, specs=SPECS[:1])
    engine = Engine(EngineConfig(base_dir=micro_base, quantization="none", device="cpu",
                                 max_slots=1, max_rank=16), world.registry).start()
    req = engine.admit("s", ACME, "acme/a1", prompt="Hello there",
                       sampling=SamplingParams(max_new_tokens=12))

    async def consume(rid):
        stream = engine.submit(engine.admit(rid, ACME, "acme/a1", prompt="Hello there",
                                                 sampling=SamplingParams(max_new_tokens=12)))
        chunks = [c async for c in stream]
        return chunks, await stream.result()

    try:
        stream = engine.submit(req)
        sync_chunks = list(stream)
        sync_result = stream.wait(10)
        async_chunks, async_result = asyncio.run(consume("a"))
        blocking = engine.generate(engine.admit("g", ACME, "acme/a1", prompt="Hello there",
                                                     sampling=SamplingParams(max_new_tokens=12)))
    finally:
        engine.shutdown()
    for chunks, result in ((sync_chunks, sync_result), (async_chunks, async_result)):
        assert "".join(c.text for c in chunks) == result.text
        assert [t for c in chunks for t in c.token_ids] == result.token_ids
        assert result.token_ids == blocking.token_ids
    t = sync_result.timings
    assert 0 <= t.queue_s <= t.first_token_s <= t.total_s
    assert sync_result.finish_reason in ("length", "stop")


def test_stop_string_is_cut_from_text_even_across_chunks(micro_base, tmp_path):
    world = make_world(micro_base, tmp_path, specs=SPECS[:1])
    engine = Engine(EngineConfig(base_dir=micro_base, quantization="none", device="cpu",
                                 max_slots=1, max_rank=16), world.registry).start()
    prompt = list(range(65, 75))
    try:
        full = engine.generate(engine.admit("full", ACME, None, prompt_ids=prompt,
                                                 sampling=SamplingParams(max_new_tokens=24)))
        text = full.text
        # a stop string made of 3 generated characters from the middle of the output
        i = len(text) // 2
        stop = text[i:i + 3]
        cut = text.find(stop)
        stream = engine.submit(engine.admit("cut", ACME, None, prompt_ids=prompt,
                                                 sampling=SamplingParams(max_new_tokens=24,
                                                                         stop=(stop, "\x00\x01"))))
        chunks = list(stream)
        cut_result = stream.wait(10)
    finally:
        engine.shutdown()
    assert len(stop) == 3 and cut >= 0
    assert cut_result.finish_reason == "stop"
    assert cut_result.text == text[:cut]
    assert "".join(c.text for c in chunks) == text[:cut]
    assert all(len(c.token_ids) <= 1 for c in chunks)  # one token per step: the stop spanned chunks


def test_seeded_sampling_is_reproducible_whatever_shares_the_batch(micro_base, tmp_path):
    world = make_world(micro_base, tmp_path, specs=SPECS[:2])
    engine = Engine(EngineConfig(base_dir=micro_base, quantization="none", device="cpu",
                                 max_slots=2, max_rank=16), world.registry).start()
    params = SamplingParams(max_new_tokens=16, temperature=0.9, top_k=50, top_p=0.95, seed=7)

    def req(rid, seed=7):
        return engine.admit(rid, ACME, "acme/a1", prompt="abc",
                            sampling=SamplingParams(**{**params.__dict__, "seed": seed}))

    try:
        alone = engine.generate(req("alone"))
        noise = [engine.submit(engine.admit(f"n{i}", ACME, "acme/a2", prompt="xyz" * (i + 1),
                                                 sampling=SamplingParams(max_new_tokens=16,
                                                                         temperature=1.0)))
                 for i in range(3)]
        crowded = engine.generate(req("crowded"))
        other = engine.generate(req("other", seed=8))
        for s in noise:
            s.wait(30)
    finally:
        engine.shutdown()
    assert alone.token_ids == crowded.token_ids
    assert other.token_ids != alone.token_ids


def test_start_fails_with_a_typed_error_for_a_bad_base(tmp_path):
    from loraplex.errors import InvalidArgument

    engine = Engine(EngineConfig(base_dir=tmp_path / "nope", quantization="none", device="cpu"))
    with pytest.raises(InvalidArgument):
        engine.start(timeout=60)
    assert not engine.ready


def test_engine_config_names_the_bad_field():
    from loraplex.errors import InvalidArgument

    with pytest.raises(InvalidArgument) as e:
        EngineConfig(base_dir="x", max_slots=0)
    assert e.value.field == "max_slots"
    with pytest.raises(InvalidArgument) as e:
        EngineConfig(base_dir="x", quantization="fp3")
    assert e.value.field == "quantization"
    assert EngineConfig(base_dir="x", target_modules=["q_proj"]).target_modules == ("q_proj",)


def test_generate_after_shutdown_is_unavailable(micro_base):
    from loraplex.errors import Unavailable

    engine = Engine(EngineConfig(base_dir=micro_base, quantization="none", device="cpu")).start()
    engine.shutdown()
    t0 = time.monotonic()
    with pytest.raises(Unavailable):
        engine.submit(engine.admit("x", ACME, None, prompt="hi"))
    assert time.monotonic() - t0 < 1


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
@torch.no_grad()
def test_sliding_window_models_match_their_own_forward(tmp_path, arch):
    """Past the window, the engine's mask must carry it: one mask for Mistral-style models,
    one per layer type for models with `layer_types` (Qwen2 with use_sliding_window)."""
    from transformers import AutoModelForCausalLM, MistralConfig, Qwen2Config

    from loraplex.basemodel import build_tokenizer

    common = dict(vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  sliding_window=4, bos_token_id=257, eos_token_id=258, pad_token_id=256)
    cfg = (MistralConfig(**common) if arch == "mistral" else
           Qwen2Config(**common, use_sliding_window=True, max_window_layers=1))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    model.save_pretrained(tmp_path / arch)
    build_tokenizer().save_pretrained(tmp_path / arch)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / arch).eval()
    engine = Engine(EngineConfig(base_dir=tmp_path / arch, quantization="none", device="cpu",
                                 max_slots=1, max_rank=4)).start()
    prompt = list(range(70, 82))
    try:
        got = engine.generate(engine.admit("w", ACME, None, prompt_ids=prompt,
                                                sampling=SamplingParams(max_new_tokens=8)))
    finally:
        engine.shutdown()
    ids, want = list(prompt), []
    for _ in range(8):
        t = int(model(torch.tensor([ids])).logits[0, -1].argmax())
        if t == EOS_ID:
            break
        want.append(t)
        ids.append(t)
    assert got.token_ids == want
