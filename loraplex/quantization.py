"""bitsandbytes details shared by the trainer and the runtime (both load 4-bit bases)."""

from __future__ import annotations

from typing import Any


def keep_cpu_4bit_in_compute_dtype(model: Any, compute_dtype: Any) -> None:
    """Keep bitsandbytes' CPU 4-bit matmuls in `compute_dtype`, and working.

    bitsandbytes 0.50 on an AVX512-BF16 CPU repacks a Linear4bit's weight at its first
    inference forward and from then on multiplies in bfloat16, whatever compute dtype was
    asked for: a float32 base then drifts from peft on the same base by bf16 roundings
    (1e-3 in logits on the micro base). The repacking also fails outright (RuntimeError in
    `_convert_weight_packed_for_cpu`) unless out % 32 == 0 and in % blocksize == 0. So the
    repacked path is used only for a bfloat16 compute dtype and shapes it supports; the
    others take the generic dequantize-then-matmul path in the requested dtype.
    """
    import bitsandbytes.nn as bnb_nn  # a declared dependency: missing is a broken install
    import torch

    for mod in model.modules():
        if isinstance(mod, bnb_nn.Linear4bit):
            qs = getattr(mod.weight, "quant_state", None)
            block = getattr(qs, "blocksize", 64) or 64
            if (compute_dtype != torch.bfloat16 or mod.out_features % 32
                    or mod.in_features % block):
                mod.support_avx512bf16_for_cpu = False


def unnest_cpu_4bit_absmax(model: Any) -> int:
    """Dequantize each CPU Linear4bit's double-quantized block scales once, at load.

    With `bnb_4bit_use_double_quant` the per-block scales are themselves stored in 8 bits,
    and bitsandbytes' generic CPU path dequantizes them again at every forward before it
    dequantizes the weight: for a one-token decode step that was about a seventh of the
    time (SmolLM2 nf4, fp32). Doing it once gives the very float32 scales each forward would
    compute (the same call, `dequantize_blockwise(absmax, state2) + offset`), so outputs
    are unchanged; the scales cost 4 bytes per 64 weights instead of ~1. Serving only: a
    model that will be saved keeps its nested state. Returns the layers changed.
    """
    import bitsandbytes.functional as bnb_f
    import bitsandbytes.nn as bnb_nn

    changed = 0
    for mod in model.modules():
        qs = getattr(getattr(mod, "weight", None), "quant_state", None)
        if (not isinstance(mod, bnb_nn.Linear4bit) or qs is None or not qs.nested
                or mod.weight.device.type != "cpu"):
            continue
        absmax = bnb_f.dequantize_blockwise(qs.absmax, qs.state2)  # float32 [blocks]
        absmax += qs.offset
        qs.absmax, qs.nested, qs.state2, qs.offset = absmax, False, None, None
        changed += 1
    return changed
