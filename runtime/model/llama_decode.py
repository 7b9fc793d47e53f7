"""The decode step of a Llama-architecture base as plain torch calls, without transformers'
module machinery around them.

    if llama_decode.unsupported(model) is None:
        logits = llama_decode.forward(model, kv, injection, mask, feeds, slots, device)  # [B, V]

Why: a decode step of SmolLM2-135M (30 layers) at 16 rows spends about a fifth of its time
outside the matmuls' arithmetic. The same 30-layer model with 64-wide layers, where the
matmuls cost next to nothing, still takes ~22 ms a step in `transformers`' forward (2 CPU
cores): every layer goes through kwargs-forwarding decorators, checkpointing and
kernel-hub wrappers, `nn.Module.__call__` hooks, attention-interface lookups and config
reads. This module runs the same operations, in the same order and dtypes, directly:
embedding, then per layer RMSNorm, q/k/v projections (the injected LoRA layers, so every
LoRA strategy and DoRA apply as in the model's own forward), rotary embedding, the paged
KV cache's `update`, SDPA with grouped queries packed per KV head, the output projection,
residual, RMSNorm, SiLU-gated MLP, residual; then the final norm and the LM head on the last
position. Its logits equal the model forward's bit for bit
(tests/runtime/model/test_llama_decode.py).

Used for decode forwards (one token per row) of a `LlamaForCausalLM` with default RoPE,
SDPA attention, no sliding window and eval mode (`unsupported` says why otherwise); prefill
and every other base run the model's own forward, and the static decode path
(`decode_graphs`) keeps its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.nn import functional as F  # noqa: N812

from loraplex.runtime.kv.cache import BlockKVCache, RowFeed, build_layout
from loraplex.runtime.model.masks import MaskSpec, step_mask

if TYPE_CHECKING:
    from loraplex.runtime.lora.layers import LoraInjection

ARCHITECTURES = ("LlamaForCausalLM",)


def unsupported(model: Any) -> str | None:
    """Why this module cannot run `model`'s decode step (None: it can)."""
    if type(model).__name__ not in ARCHITECTURES:
        return f"{type(model).__name__} is not a Llama-architecture causal LM"
    cfg = model.config.get_text_config()
    rope = (getattr(cfg, "rope_parameters", None) or {}).get("rope_type", "default")
    checks = [
        (rope != "default", f"RoPE type {rope!r}"),
        (cfg._attn_implementation != "sdpa", f"attention {cfg._attn_implementation!r}"),
        (bool(getattr(cfg, "sliding_window", None)), "sliding-window attention"),
        (getattr(cfg, "pretraining_tp", 1) != 1, "pretraining_tp > 1"),
        (model.training, "the model is in training mode"),
    ]
    return next((why for bad, why in checks if bad), None)


def rms_norm(norm: Any, x: Tensor) -> Tensor:
    """`LlamaRMSNorm.forward`, the same operations: fp32 variance, then the weight in the
    input's dtype."""
    dtype = x.dtype
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * x32.to(dtype)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding of `x # [B, H, 1, D]` with `cos`, `sin # [B, 1, 1, D]`."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def attention(layer: Any, i: int, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor,
              kv: BlockKVCache) -> Tensor:
    """One layer's self-attention for `x # [B, 1, hidden]` (normed): `[B, 1, hidden]`."""
    attn = layer.self_attn
    b, d = x.shape[0], attn.head_dim
    q = attn.q_proj(x).view(b, 1, -1, d).transpose(1, 2)  # [B, Hq, 1, D]
    k = attn.k_proj(x).view(b, 1, -1, d).transpose(1, 2)  # [B, Hkv, 1, D]
    v = attn.v_proj(x).view(b, 1, -1, d).transpose(1, 2)  # [B, Hkv, 1, D]
    q, k = rotate(q, cos, sin), rotate(k, cos, sin)
    keys, values = kv.update(k, v, i)  # [B, Hkv, L, D] each
    groups = attn.num_key_value_groups
    if groups > 1:  # each KV head's queries side by side: no repeat of the keys
        q = q.reshape(b, q.shape[1] // groups, groups, d)  # [B, Hkv, G, D]
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, dropout_p=0.0,
                                         scale=attn.scaling)  # [B, Hkv, G, D] | [B, H, 1, D]
    out = out.reshape(b, -1, 1, d).transpose(1, 2).contiguous()  # [B, 1, Hq, D]
    return attn.o_proj(out.reshape(b, 1, -1))  # [B, 1, hidden]


def mlp(layer: Any, x: Tensor) -> Tensor:
    m = layer.mlp
    return m.down_proj(m.act_fn(m.gate_proj(x)) * m.up_proj(x))


def forward(model: Any, kv: BlockKVCache, injection: LoraInjection, mask_spec: MaskSpec,
            feeds: Sequence[RowFeed], slots: Sequence[int], device: torch.device) -> Tensor:
    """A decode step (one token per feed); `slots # [B]` adapter slot per row → logits
    `[B, V]` fp32, as `runner.forward` returns them."""
    layout = build_layout(feeds, device)
    kv.reserve(feeds)
    kv.set_layout(layout)
    injection.set_batch(list(slots))
    body = model.model
    with torch.inference_mode():
        h = body.embed_tokens(layout.input_ids)  # [B, 1, hidden]
        cos, sin = body.rotary_emb(h, layout.position_ids)  # [B, 1, D] each
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, 1, D]
        mask = step_mask(layout, mask_spec)  # [B, 1, 1, L]
        for i, layer in enumerate(body.layers[:body.config.num_hidden_layers]):
            h = h + attention(layer, i, rms_norm(layer.input_layernorm, h), cos, sin, mask,
                              kv)
            h = h + mlp(layer, rms_norm(layer.post_attention_layernorm, h))
        logits = model.lm_head(rms_norm(body.norm, h))  # [B, 1, V]
    return logits[:, -1].float()  # [B, V]
