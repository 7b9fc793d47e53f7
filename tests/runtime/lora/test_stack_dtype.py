"""Adapter stacks in bf16 against fp32 stacks on the same base: the error a user would see.

The figures in docs/gpu.md ("Adapter stacks in half precision") come from this test's printout
(`pytest -s`): max |logit| difference on a mixed batch, and at which positions the greedy
pick changes (teacher-forced on the fp32 model's own greedy continuation).
"""

from __future__ import annotations

import pytest
import torch

from loraplex.errors import InvalidArgument
from loraplex.runtime.lora.layers import default_target_modules, inject_lora, resolve_stack_dtype

ROW_SLOTS = [1, 0, 2, 3, 1, 4, 0, 3]
RANKS = [(8, 16, False), (16, 32, True), (4, 8, False), (2, 4, False)]  # r, alpha, rslora
STEPS = 8


def _model(base_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()


def _adapters(model, targets):
    """Four peft adapters with trained-sized deltas (B ~ 0.02 * randn), as state dicts."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    torch.manual_seed(0)
    peft_model, dicts = None, []
    for i, (r, alpha, rslora) in enumerate(RANKS):
        cfg = LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=targets,
                         init_lora_weights=False, lora_dropout=0.0)
        name = f"ad{i}"
        if peft_model is None:
            peft_model = get_peft_model(model, cfg, adapter_name=name)
        else:
            peft_model.add_adapter(name, cfg)
        with torch.no_grad():
            for mod in peft_model.modules():
                if hasattr(mod, "lora_B") and name in mod.lora_B:
                    mod.lora_B[name].weight.normal_(0, 0.02)
        dicts.append(get_peft_model_state_dict(peft_model, adapter_name=name))
    return dicts


@torch.no_grad()
def _model_with(base_dir, dicts, targets, stack_dtype):
    model = _model(base_dir)
    inj = inject_lora(model, targets, max_slots=len(RANKS), max_rank=16,
                      stack_dtype=stack_dtype)
    for slot, ((r, alpha, rslora), sd) in enumerate(zip(RANKS, dicts, strict=True), start=1):
        inj.load_adapter(slot, sd, r=r, alpha=alpha, use_rslora=rslora)
    inj.set_batch(ROW_SLOTS)
    return model, inj


@torch.no_grad()
def test_bf16_stacks_stay_close_to_fp32_and_differ_in_greedy_only_at_near_ties(micro_base):
    targets = default_target_modules(_model(micro_base))
    dicts = _adapters(_model(micro_base), targets)
    m32, inj32 = _model_with(micro_base, dicts, targets, "float32")
    m16, inj16 = _model_with(micro_base, dicts, targets, "bfloat16")
    layer = next(iter(inj16.layers.values()))
    assert layer.lora_a.dtype == torch.bfloat16 and layer.lora_scale.dtype == torch.float32
    assert next(iter(inj32.layers.values())).lora_a.dtype == torch.float32

    ids = torch.randint(0, 256, (len(ROW_SLOTS), 7), generator=torch.Generator().manual_seed(1))
    for _ in range(STEPS):  # the fp32 model's greedy continuation of every row
        ids = torch.cat([ids, m32(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    l32, l16 = m32(ids).logits, m16(ids).logits  # [B, 15, V], teacher-forced on the same ids
    diff = (l32 - l16).abs().max().item()
    inj32.clear_batch()
    effect = (l32 - m32(ids).logits).abs().max().item()  # what the adapters change at all
    top2 = l32.topk(2, dim=-1).values  # [B, S, 2]
    margin = top2[..., 0] - top2[..., 1]  # [B, S] how far fp32's greedy pick is ahead
    differ = l32.argmax(-1) != l16.argmax(-1)  # [B, S]
    print(f"\nbf16 vs fp32 stacks, micro llama (random weights), {len(ROW_SLOTS)} rows x "
          f"{ids.shape[1]} positions: max |logit diff| {diff:.2e} (logit std "
          f"{l32.std().item():.3f}, largest adapter effect {effect:.3f}); greedy argmax "
          f"agrees at {1 - differ.float().mean().item():.1%} of positions; fp32 top-2 margin "
          f"where they differ: {margin[differ].tolist()}")
    assert effect > 50 * diff  # the adapters matter far more than the rounding
    assert diff < 0.02
    assert differ.float().mean().item() <= 0.05
    assert bool((margin[differ] <= 2 * diff).all())  # only near-ties flip
    base_rows = [i for i, s in enumerate(ROW_SLOTS) if s == 0]
    torch.testing.assert_close(l16[base_rows], l32[base_rows], rtol=0, atol=0)


def test_stack_dtype_auto_is_bf16_on_cuda_fp32_on_cpu_and_names_bad_values():
    assert resolve_stack_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_stack_dtype(None, torch.device("cpu")) == torch.float32
    assert resolve_stack_dtype("float16", torch.device("cpu")) == torch.float16
    with pytest.raises(InvalidArgument) as e:
        resolve_stack_dtype("int8", torch.device("cpu"))
    assert e.value.field == "stack_dtype"


def test_engine_config_takes_the_stack_dtype_and_names_a_bad_one():
    from loraplex.runtime.api.types import EngineConfig

    assert EngineConfig(base_dir=".").lora_stack_dtype == "auto"
    assert EngineConfig(base_dir=".", lora_stack_dtype="bfloat16").lora_stack_dtype == "bfloat16"
    with pytest.raises(InvalidArgument) as e:
        EngineConfig(base_dir=".", lora_stack_dtype="int8")
    assert e.value.field == "lora_stack_dtype"
