"""Attention masks for a step's left-padded layout: the only model-specific part of a forward
that the eager runner and the padded static decode share (`step_mask`, `mask_spec`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from loraplex.runtime.kv.cache import StepLayout


@dataclass(frozen=True)
class MaskSpec:
    """How this model wants its 4D attention mask."""

    boolean: bool  # sdpa takes a boolean mask; eager an additive one
    dtype: torch.dtype  # of the additive mask
    sliding_window: int | None = None
    per_layer_type: bool = False  # {"full_attention": .., "sliding_attention": ..}


def step_mask(layout: StepLayout, spec: MaskSpec) -> torch.Tensor | dict[str, torch.Tensor]:
    """`[B, 1, Q, L]` mask: each query sees its own row's keys up to its position (and, with
    a sliding window, only the last `window` of them)."""
    full = layout.mask(boolean=spec.boolean, dtype=spec.dtype)  # [B, 1, Q, L]
    if spec.sliding_window is None:
        return full
    keys = torch.arange(layout.kv_len, device=layout.position_ids.device)  # [L]
    # key k is within the window of position p iff k > p - window (p itself always is)
    near = keys[None, None, None, :] > layout.position_ids[:, None, :, None] \
        - spec.sliding_window  # [B, 1, Q, L]
    if spec.boolean:
        sliding = full & near
    else:
        sliding = full.masked_fill(~near, torch.finfo(spec.dtype).min)
    if spec.per_layer_type:
        return {"full_attention": full, "sliding_attention": sliding}
    return sliding


def mask_spec(model: Any) -> MaskSpec:
    """Sliding-window attention: models with `layer_types` take a mask per layer type;
    older ones (Mistral, Phi-3) one mask that must already carry the window."""
    mcfg = model.config.get_text_config()
    dtype = model.get_input_embeddings().weight.dtype
    boolean = mcfg._attn_implementation == "sdpa"
    types = getattr(mcfg, "layer_types", None)
    window = getattr(mcfg, "sliding_window", None)
    if types is not None:
        return MaskSpec(boolean, dtype, int(window) if "sliding_attention" in types else None,
                        per_layer_type=True)
    if window and getattr(mcfg, "use_sliding_window", True):
        return MaskSpec(boolean, dtype, int(window))
    return MaskSpec(boolean, dtype)
