"""DoRA rows in a mixed batch: the per-output-feature factor of each DoRA adapter, computed
once when the adapter is read (`dora_gain`), and its application per row after the LoRA
delta (`add_dora`). LoRA and base rows carry a factor of 0 and pass through unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor

from loraplex.errors import InvalidArgument
from loraplex.runtime.lora.ops import LoraBatchPlan


def add_dora(y: Tensor, bias: Tensor | None, gain: Tensor, plan: LoraBatchPlan) -> Tensor:
    """Rescale the output features of DoRA rows, in place, after `add_lora`; returns `y`.

    Semantics:
        for t in range(T):
            s = plan.slots[t]
            y[t] += gain[s] * (y[t] - bias)

    y     # [T, out]  W x + bias + scale[s] B A x (the layer output after add_lora)
    bias  # [out] or None: the base layer's bias, which DoRA does not rescale
    gain  # [S, out] fp32: magnitude / ‖W + scale·B·A‖ − 1 per output feature (`dora_gain`);
          #   0 for a LoRA slot, an empty slot and slot 0, so those rows do not change
    That is peft's DoRA forward, `m/‖W + s·B·A‖ ⊙ (W x + s·B·A x) + bias`, with the norm over
    each output feature's row of the weight, taken as a constant (peft detaches it).
    """
    g = gain.index_select(0, plan.slots).to(y.dtype)  # [T, out]
    base = y if bias is None else y - bias.to(y.dtype)  # [T, out]
    return y.add_(g.mul_(base))


def dora_gain(weight: Tensor, a: Tensor, b: Tensor, scale: float, magnitude: Tensor) -> Tensor:
    """DoRA's per-output-feature factor minus one, in fp32 (`add_dora`'s `gain` row).

    Semantics:  magnitude / torch.linalg.norm(weight + scale * b @ a, dim=1) - 1

    weight    # [out, in]  the base layer's weight, dequantized (peft: `dequantize_module_weight`)
    a # [r, in], b # [out, r], magnitude # [out]
    Raises InvalidArgument if a row of `weight + scale·b@a` has norm 0 or the factor is not
    finite (peft would serve NaN or Inf there).
    """
    w = weight.float() + scale * (b.float() @ a.float())  # [out, in]
    norm = torch.linalg.norm(w, dim=1)  # [out]
    g = magnitude.float() / norm  # [out]
    if not bool(torch.isfinite(g).all()):
        raise InvalidArgument("DoRA magnitude over the norm of W + s·B·A is not finite "
                              f"for {int((~torch.isfinite(g)).sum())} output features",
                              field="lora_magnitude_vector")
    return g - 1.0
