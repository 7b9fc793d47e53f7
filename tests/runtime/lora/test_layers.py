"""Injected batched LoRA layers: each row of a mixed batch equals peft with only its adapter."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from loraplex.errors import FailedPrecondition, InvalidArgument
from loraplex.runtime.lora.batched import BatchedLoraLayer, RankTooLarge
from loraplex.runtime.lora.layers import default_target_modules, inject_lora

# (name, r, alpha, use_rslora, target subset: None = every default target)
ADAPTERS = [
    ("ad_a", 2, 4, False, None),
    ("ad_b", 8, 16, True, None),  # rslora: scale alpha/sqrt(r)
    ("ad_c", 4, 3, False, ("q", "v", "c_attn")),  # only some projections
    ("ad_d", 1, 8, False, None),
]
ROW_SLOTS = [1, 0, 2, 3, 1, 4, 0, 3]  # slot i+1 = ADAPTERS[i]; 0 = plain base
MAX_RANK = 8


def _load(base_dir, **kw):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, **kw)
    return m.eval()


def _peft_with_adapters(model, targets: list[str]):
    """peft model with ADAPTERS (random A and B) and each adapter's state dict."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    torch.manual_seed(0)
    peft_model, dicts = None, {}
    for name, r, alpha, rslora, subset in ADAPTERS:
        tm = targets if subset is None else [t for t in targets if any(s in t for s in subset)]
        cfg = LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=tm,
                         init_lora_weights=False, lora_dropout=0.0)
        if peft_model is None:
            peft_model = get_peft_model(model, cfg, adapter_name=name)
        else:
            peft_model.add_adapter(name, cfg)
        dicts[name] = get_peft_model_state_dict(peft_model, adapter_name=name)
    return peft_model.eval(), dicts


def _peft_row_logits(peft_model, ids: torch.Tensor, row_slots: list[int]) -> torch.Tensor:
    """Row i run alone through peft with only its adapter active (or adapters disabled)."""
    rows = []
    for i, slot in enumerate(row_slots):
        if slot == 0:
            with peft_model.disable_adapter():
                rows.append(peft_model(ids[i : i + 1]).logits)
        else:
            peft_model.set_adapter(ADAPTERS[slot - 1][0])
            rows.append(peft_model(ids[i : i + 1]).logits)
    return torch.cat(rows)  # [B, S, V]


def _ours(base_dir, dicts, targets, **load_kw):
    model = _load(base_dir, **load_kw)
    inj = inject_lora(model, targets, max_slots=len(ADAPTERS) + 1, max_rank=MAX_RANK)
    for slot, (name, r, alpha, rslora, _) in enumerate(ADAPTERS, start=1):
        inj.load_adapter(slot, dicts[name], r=r, alpha=alpha, use_rslora=rslora)
    return model, inj


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@torch.no_grad()
def test_mixed_batch_rows_equal_peft_with_only_that_adapter(base_factory, arch):
    base_dir = base_factory("micro", arch)
    targets = default_target_modules(_load(base_dir))
    peft_model, dicts = _peft_with_adapters(_load(base_dir), targets)
    model, inj = _ours(base_dir, dicts, targets)

    g = torch.Generator().manual_seed(1)
    prefill = torch.randint(0, 256, (len(ROW_SLOTS), 7), generator=g)  # [B, S]
    inj.set_batch(ROW_SLOTS)
    got = model(prefill).logits  # [B, S, V]
    want = _peft_row_logits(peft_model, prefill, ROW_SLOTS)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    # the adapters really differ from the base and from each other
    base_rows = _peft_row_logits(peft_model, prefill, [0] * len(ROW_SLOTS))
    for i, s in enumerate(ROW_SLOTS):
        assert (s == 0) == torch.allclose(got[i], base_rows[i], atol=1e-4)

    # decode-shaped step: one token per row, different mix (every strategy gets exercised)
    step = torch.randint(0, 256, (4, 1), generator=g)
    for slots in ([2, 2, 2, 2], [4, 3, 2, 1], [0, 3, 0, 3], [1, 4, 1, 4]):
        inj.set_batch(slots)
        torch.testing.assert_close(model(step).logits, _peft_row_logits(peft_model, step, slots),
                                   rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_no_batch_set_or_all_slot_zero_is_exactly_the_base(micro_base):
    base = _load(micro_base)
    model = _load(micro_base)
    inj = inject_lora(model, None, max_slots=2, max_rank=4)
    ids = torch.randint(0, 256, (3, 5))
    want = base(ids).logits
    torch.testing.assert_close(model(ids).logits, want, rtol=0, atol=0)
    inj.set_batch([0, 0, 0])
    torch.testing.assert_close(model(ids).logits, want, rtol=0, atol=0)


def test_default_targets_are_decoder_projections_only(base_factory):
    assert default_target_modules(_load(base_factory("micro", "llama"))) == [
        "down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    gpt2 = _load(base_factory("micro", "gpt2"))
    assert default_target_modules(gpt2) == ["c_attn", "c_fc", "c_proj"]
    inj = inject_lora(gpt2, None, max_slots=1, max_rank=2)
    assert "lm_head" not in {p.rsplit(".", 1)[-1] for p in inj.layers}
    assert all(isinstance(m, BatchedLoraLayer) for m in inj.layers.values())
    assert default_target_modules(gpt2) == ["c_attn", "c_fc", "c_proj"]  # idempotent


def test_set_slot_copies_into_preallocated_stacks_and_clear_slot_zeroes(micro_base):
    model = _load(micro_base)
    inj = inject_lora(model, ["q_proj"], max_slots=3, max_rank=8)
    layer = next(iter(inj.layers.values()))
    ptr_a, ptr_b = layer.lora_a.data_ptr(), layer.lora_b.data_ptr()
    a, b = torch.randn(3, layer.in_features), torch.randn(layer.out_features, 3)
    layer.set_slot(2, a, b, 0.5)
    assert layer.lora_a.data_ptr() == ptr_a and layer.lora_b.data_ptr() == ptr_b
    torch.testing.assert_close(layer.lora_a[2, :3], a)
    assert not layer.lora_a[2, 3:].any() and not layer.lora_b[2, :, 3:].any()
    assert layer.lora_scale[2] == 0.5 and not layer.lora_a[0].any() and layer.lora_scale[0] == 0
    layer.clear_slot(2)
    assert not layer.lora_a[2].any() and not layer.lora_b[2].any() and layer.lora_scale[2] == 0
    with pytest.raises(InvalidArgument):
        layer.set_slot(0, a, b, 1.0)  # slot 0 is the base: never written
    with pytest.raises(RankTooLarge):
        layer.set_slot(1, torch.randn(9, layer.in_features), torch.randn(layer.out_features, 9), 1)


def test_load_adapter_errors_are_typed_and_leave_the_slot_untouched(micro_base):
    model = _load(micro_base)
    inj = inject_lora(model, ["q_proj", "v_proj"], max_slots=2, max_rank=4)
    q = inj.layers["model.layers.0.self_attn.q_proj"]
    good = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(2, 64),
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.ones(64, 2)}
    assert inj.load_adapter(1, good, r=2, alpha=4) == ["model.layers.0.self_attn.q_proj"]
    assert q.lora_scale[1] == 2.0 and inj.slot_ranks[1] == 2

    too_big = {k.replace("q_proj", "v_proj"): torch.ones(8, 64) if "lora_A" in k
               else torch.ones(32, 8) for k in good}
    with pytest.raises(RankTooLarge) as e:
        inj.load_adapter(1, {**good, **too_big}, r=8, alpha=8)
    assert e.value.code == "FAILED_PRECONDITION" and e.value.field == "r"
    assert q.lora_scale[1] == 2.0  # nothing copied
    with pytest.raises(FailedPrecondition):  # k_proj is not injected
        inj.load_adapter(1, {k.replace("q_proj", "k_proj"): v for k, v in good.items()}, 2, 4)
    with pytest.raises(FailedPrecondition):  # wrong in_features
        inj.load_adapter(1, {k: v[:, :10] if "lora_A" in k else v for k, v in good.items()}, 2, 4)
    with pytest.raises(FailedPrecondition):  # B missing
        inj.load_adapter(1, dict(list(good.items())[:1]), 2, 4)
    with pytest.raises(InvalidArgument):
        inj.set_batch([0, 3])  # slot 3 > max_slots
    with pytest.raises(InvalidArgument):
        inj.load_adapter(1, good, r=0, alpha=4)


@torch.no_grad()
def test_row_slots_must_match_the_batch(micro_base):
    model = _load(micro_base)
    inj = inject_lora(model, None, max_slots=2, max_rank=4)
    inj.set_batch([1, 0])
    with pytest.raises(InvalidArgument):
        model(torch.randint(0, 256, (3, 4)))


@torch.no_grad()
def test_lora_dtype_differs_from_base_dtype():
    """bf16 base layer, fp32 LoRA stacks: delta computed in fp32, added in bf16."""
    base = nn.Linear(16, 12).to(torch.bfloat16)
    model = nn.Sequential(nn.ModuleList([base]))  # a numbered child, like a decoder block
    inj = inject_lora(model, ["0.0"], max_slots=1, max_rank=2, stack_dtype=torch.float32)
    layer = inj.layers["0.0"]
    a, b = torch.randn(2, 16), torch.randn(12, 2)
    layer.set_slot(1, a, b, 0.5)
    inj.set_batch([1])
    x = torch.randn(1, 3, 16, dtype=torch.bfloat16)
    want = base(x).float() + 0.5 * (x.float() @ a.T @ b.T)
    torch.testing.assert_close(layer(x).float(), want, rtol=2e-2, atol=2e-2)


def _peft_mixed_logits(peft_model, ids: torch.Tensor, row_slots: list[int]) -> torch.Tensor:
    """peft's own mixed batch (`adapter_names=`): the same batch, the same base matmuls."""
    names = ["__base__" if s == 0 else ADAPTERS[s - 1][0] for s in row_slots]
    return peft_model(ids, adapter_names=names).logits


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
@torch.no_grad()
def test_quantized_base_rows_equal_peft_on_the_same_quantized_base(micro_base, quantization):
    """Linear4bit / Linear8bitLt wrapped: base output + LoRA delta equals peft's bnb layers.

    Both models quantize the same fp32 checkpoint with the same bitsandbytes config, so the
    packed weights are bit-identical and the base matmuls agree exactly; the LoRA deltas are
    fp32 in both and differ only in summation order (~1e-7), hence 1e-5.
    LLM.int8() picks its fp16 outlier columns over the whole batch, so an int8 base gives a
    row slightly different logits (~3e-3 here) alone than inside a batch, for peft as for
    us: the batched reference is therefore peft's own mixed batch on the same batch, and the
    run-alone reference is peft run alone.
    """
    from loraplex.runtime.model.loading import load_base

    def load():
        return load_base(micro_base, quantization=quantization).model

    ref = load()
    kind = "bnb4" if quantization == "nf4" else "bnb8"
    targets = default_target_modules(ref)
    peft_model, dicts = _peft_with_adapters(ref, targets)
    model = load()
    inj = inject_lora(model, targets, max_slots=len(ADAPTERS) + 1, max_rank=MAX_RANK)
    assert {layer.kind for layer in inj.layers.values()} == {kind}
    for slot, (name, r, alpha, rslora, _) in enumerate(ADAPTERS, start=1):
        inj.load_adapter(slot, dicts[name], r=r, alpha=alpha, use_rslora=rslora)
    ids = torch.randint(0, 256, (len(ROW_SLOTS), 5), generator=torch.Generator().manual_seed(2))

    inj.set_batch(ROW_SLOTS)
    got = model(ids).logits  # [B, S, V]
    torch.testing.assert_close(got, _peft_mixed_logits(peft_model, ids, ROW_SLOTS),
                               rtol=1e-5, atol=1e-5)
    for i in (0, 2, 3, 5):  # rows alone: slots 1, 2 (rslora), 3 (q/v only), 4
        inj.set_batch(ROW_SLOTS[i : i + 1])
        torch.testing.assert_close(model(ids[i : i + 1]).logits,
                                   _peft_row_logits(peft_model, ids[i : i + 1], ROW_SLOTS[i : i + 1]),
                                   rtol=1e-5, atol=1e-5)
    if quantization == "nf4":  # 4-bit weights, fp32 matmuls: batching changes nothing
        torch.testing.assert_close(got, _peft_row_logits(peft_model, ids, ROW_SLOTS),
                                   rtol=1e-5, atol=1e-5)
    base_rows = _peft_row_logits(peft_model, ids, [0] * len(ROW_SLOTS))
    assert not torch.allclose(got[0], base_rows[0], atol=1e-3)  # the adapter does something


@torch.no_grad()
def test_rank_and_alpha_patterns_give_peft_per_module_scales(micro_base):
    """peft's rank_pattern / alpha_pattern: a per-module r and alpha, hence scale."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    torch.manual_seed(3)
    targets = ["q_proj", "v_proj", "down_proj"]
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False,
                     rank_pattern={"q_proj": 2, r"layers\.1\.mlp\.down_proj": 6},
                     alpha_pattern={"v_proj": 20})
    peft_model = get_peft_model(_load(micro_base), cfg, adapter_name="pat").eval()
    model = _load(micro_base)
    inj = inject_lora(model, targets, max_slots=1, max_rank=8)
    inj.load_adapter(1, get_peft_model_state_dict(peft_model, adapter_name="pat"), r=4, alpha=8,
                     rank_pattern=cfg.rank_pattern, alpha_pattern=cfg.alpha_pattern)
    assert inj.layers["model.layers.0.self_attn.q_proj"].lora_scale[1] == 4.0  # 8 / 2
    assert inj.layers["model.layers.0.self_attn.v_proj"].lora_scale[1] == 5.0  # 20 / 4
    assert inj.layers["model.layers.1.mlp.down_proj"].ranks[1] == 6
    ids = torch.randint(0, 256, (2, 6))
    inj.set_batch([1, 1])
    torch.testing.assert_close(model(ids).logits, peft_model(ids).logits, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_one_plan_per_step_shared_by_every_layer(micro_base, monkeypatch):
    import loraplex.runtime.lora.batched as layer_mod

    calls = []
    real = layer_mod.make_plan
    monkeypatch.setattr(layer_mod, "make_plan", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = _load(micro_base)
    inj = inject_lora(model, None, max_slots=2, max_rank=4)
    assert len(inj.layers) == 14  # 2 blocks x 7 projections
    inj.set_batch([1, 2, 0])
    model(torch.randint(0, 256, (3, 4)))
    assert len(calls) == 1
    model(torch.randint(0, 256, (3, 4)))  # same batch, same shape: the plan is reused
    assert len(calls) == 1
    inj.set_batch([2, 2, 1])
    model(torch.randint(0, 256, (3, 1)))
    assert len(calls) == 2


def test_rank_buckets_have_stacks_of_their_own_and_refuse_ranks_above_theirs(micro_base):
    """max_rank 64 over 3 slots: slots 1-2 hold ranks up to 16, slot 3 up to 64, each bucket
    in stacks of its own rank (what a rank-64 slot costs is paid once, not three times)."""
    model = _load(micro_base)
    inj = inject_lora(model, ["q_proj"], max_slots=3, max_rank=64)
    layer = inj.layers["model.layers.0.self_attn.q_proj"]
    assert inj.layout.rank_slots == ((16, 2), (64, 1))
    assert [tuple(a.shape) for a in layer.a_stacks] == [(3, 16, 64), (1, 64, 64)]
    assert [tuple(b.shape) for b in layer.b_stacks] == [(3, 64, 16), (1, 64, 64)]
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    wide = {f"{prefix}.lora_A.weight": torch.randn(40, 64),
            f"{prefix}.lora_B.weight": torch.randn(64, 40)}
    with pytest.raises(RankTooLarge) as e:
        inj.load_adapter(1, wide, r=40, alpha=40)
    assert "ranks up to 16" in str(e.value) and e.value.field == "r"
    assert not layer.a_stacks[0].any() and inj.slot_ranks[1] == 0  # nothing copied
    inj.load_adapter(3, wide, r=40, alpha=40)
    torch.testing.assert_close(layer.a_stacks[1][0, :40], wide[f"{prefix}.lora_A.weight"])
    assert inj.slot_ranks[3] == 40 and layer.lora_scale[3] == 1.0
    inj.clear_slot(3)
    assert not layer.a_stacks[1].any() and inj.slot_ranks[3] == 0
