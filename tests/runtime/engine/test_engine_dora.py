"""DoRA adapters through the registry and the engine: greedy outputs token for token equal
to peft's own DoRA model, alone and in continuously batched mixes with LoRA and base rows."""

from __future__ import annotations

from loraplex.basemodel import EOS_ID
from loraplex.registry import Identity
from loraplex.runtime.engine.engine import Engine, EngineConfig, SamplingParams
from tests.runtime.world import make_world, reference_greedy

ACME = Identity("acme")
DORA = {"use_dora": True}
# (name, r, alpha, use_rslora, subset, extras): two DoRA adapters, one rsLoRA DoRA, two LoRA
SPECS = [
    ("d1", 4, 8, False, None, DORA),
    ("l1", 8, 16, False, None),
    ("d2", 2, 3, True, ("q_proj", "v_proj", "c_attn", "mlp"), DORA),
    ("l2", 4, 4, False, ("mlp",)),
    ("d3", 8, 8, False, None, {**DORA, "rank_pattern": {"q_proj": 2}}),
]


def _requests(names, n, seed):
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        adapter = None if i % 6 == 5 else names[i % len(names)]
        prompt = torch.randint(0, 256, (3 + (5 * i) % 17,), generator=g).tolist()
        out.append((f"r{i}", adapter, prompt))
    return out


def _serve(engine, reqs, max_new):
    """The first half, then the rest while the first decode (rows join a running batch)."""
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


def test_dora_lora_and_base_rows_in_one_batch_equal_peft_fp32(micro_base, tmp_path):
    """(Biases, which DoRA does not rescale, and GPT-2's Conv1D: tests/runtime/lora/test_dora.py.)"""
    base = micro_base
    world = make_world(base, tmp_path, specs=SPECS)
    for name in ("d1", "d2", "d3"):  # the registry took them as DoRA adapters
        assert world.registry.load_adapter(world.registry.resolve(
            ACME, f"acme/{name}")).config["use_dora"] is True
    engine = Engine(EngineConfig(base_dir=base, quantization="none", device="cpu",
                                 max_slots=len(SPECS), max_rank=16, max_batch=12,
                                 prefill_token_budget=32), world.registry).start()
    try:
        alone = engine.generate(engine.admit("solo", ACME, "acme/d1", prompt_ids=[5, 9, 1],
                                             sampling=SamplingParams(max_new_tokens=8)), 120)
        reqs = _requests(world.names, 12, seed=1)
        results = _serve(engine, reqs, max_new=8)
    finally:
        engine.shutdown()
    assert alone.token_ids == reference_greedy(world, "d1", [5, 9, 1], 8, eos=EOS_ID)
    moved = 0
    for rid, adapter, prompt in reqs:
        want = reference_greedy(world, adapter, prompt, 8, eos=EOS_ID)
        assert results[rid].token_ids == want, f"{rid} ({adapter}) differs from peft alone"
        if adapter is not None and adapter.startswith("d"):
            moved += want != reference_greedy(world, None, prompt, 8, eos=EOS_ID)
    assert moved >= 3  # the DoRA adapters really change the output


def test_dora_on_the_same_nf4_base_equals_peft(micro_base, tmp_path):
    """On an nf4 base the norm is taken over the dequantized weight, as peft takes it."""
    from loraplex.runtime.model.loading import load_base

    ref_model = load_base(micro_base, quantization="nf4", compute_dtype="float32").model
    world = make_world(micro_base, tmp_path, specs=SPECS[:3], model=ref_model)
    engine = Engine(EngineConfig(base_dir=micro_base, quantization="nf4",
                                 compute_dtype="float32", device="cpu", max_slots=3,
                                 max_rank=16, max_batch=8), world.registry).start()
    try:
        reqs = _requests(world.names, 8, seed=2)
        results = _serve(engine, reqs, max_new=6)
    finally:
        engine.shutdown()
    for rid, adapter, prompt in reqs:
        assert results[rid].token_ids == reference_greedy(world, adapter, prompt, 6,
                                                          eos=EOS_ID), f"{rid} ({adapter})"


def test_dora_on_smollm2_equals_peft_fp32(smollm2_base, tmp_path):
    """The real base (30 layers, all seven projections): DoRA, LoRA and base rows in one
    continuously batched run, greedy, token for token equal to peft's DoRA model."""
    from transformers import AutoConfig

    eos = AutoConfig.from_pretrained(smollm2_base).eos_token_id
    specs = [("d1", 8, 16, False, None, DORA), ("l1", 4, 8, False, ("q_proj", "v_proj"))]
    world = make_world(smollm2_base, tmp_path, specs=specs)
    engine = Engine(EngineConfig(base_dir=smollm2_base, quantization="none",
                                 compute_dtype="float32", device="cpu", max_slots=2,
                                 max_rank=8, max_batch=4, max_seq_len=128),
                    world.registry).start()
    reqs = [("r0", "d1", [504, 3120, 314, 1352, 30]), ("r1", "l1", [1205, 314, 2821, 28]),
            ("r2", None, [504, 3120, 314, 1352, 30])]
    try:
        results = _serve(engine, reqs, max_new=5)
    finally:
        engine.shutdown()
    wants = {}
    for rid, adapter, prompt in reqs:
        wants[rid] = reference_greedy(world, adapter, prompt, 5, eos=eos)
        assert results[rid].token_ids == wants[rid], f"{rid} ({adapter}) differs from peft"
    assert wants["r0"] != wants["r2"]  # same prompt: the DoRA adapter changes the output
