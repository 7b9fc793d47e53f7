"""bitsandbytes details shared by trainer and runtime (loraplex/quantization.py)."""

from __future__ import annotations

import torch

from loraplex import peft_format
from loraplex.quantization import keep_cpu_4bit_in_compute_dtype, unnest_cpu_4bit_absmax


def _nf4(base):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        base, dtype=torch.float32, quantization_config=peft_format.bnb_config("nf4", torch.float32),
        device_map="cpu").eval()
    keep_cpu_4bit_in_compute_dtype(model, torch.float32)
    return model


def test_unnested_scales_give_the_same_logits_bit_for_bit(micro_base):
    """Serving dequantizes the double-quantized scales once at load: a user sees exactly the
    outputs the nested model gives (and peft on it), only sooner."""
    import bitsandbytes.nn as bnb_nn

    model = _nf4(micro_base)
    layers = [m for m in model.modules() if isinstance(m, bnb_nn.Linear4bit)]
    assert layers and all(m.weight.quant_state.nested for m in layers)
    ids = torch.randint(0, 250, (3, 9), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        before = model(input_ids=ids).logits
        assert unnest_cpu_4bit_absmax(model) == len(layers)
        after = model(input_ids=ids).logits
    assert not any(m.weight.quant_state.nested for m in layers)
    assert torch.equal(before, after)
    assert unnest_cpu_4bit_absmax(model) == 0  # idempotent
