"""The chunked LM head: the same logits as the layer it replaces, bit for bit, and the same
model around it (tied weights, `all-linear` targets)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from loraplex import peft_format
from loraplex.runtime.model.head import ChunkedHead, chunk_lm_head
from loraplex.runtime.model.loading import load_base


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 7, 32])
@torch.inference_mode()
def test_chunked_head_gives_the_linear_layers_logits_exactly(rows, bias):
    torch.manual_seed(rows)
    linear = nn.Linear(576, 5000, bias=bias)  # 5000 = 2 full chunks of 2048 and a short one
    x = torch.randn(rows, 1, 576)  # [B, 1, H]: a decode step's last positions
    want = linear(x)  # [B, 1, V]
    got = ChunkedHead(linear, chunk=2048)(x)
    assert got.shape == want.shape
    assert torch.equal(got, want)


@torch.inference_mode()
def test_wrapped_base_keeps_its_logits_tied_weights_and_targets(micro_base):
    model = load_base(micro_base, quantization="none").model
    targets = peft_format.linear_modules(model)
    ids = torch.tensor([[5, 9, 2, 7, 1], [3, 3, 8, 6, 4]])
    want = model(ids).logits  # [2, 5, V]
    assert chunk_lm_head(model, chunk=100)  # the micro vocabulary in several chunks
    head = model.get_output_embeddings()
    assert isinstance(head, ChunkedHead)
    assert torch.equal(model(ids).logits, want)
    if model.config.tie_word_embeddings:
        assert head.weight is model.get_input_embeddings().weight
    assert peft_format.linear_modules(model) == targets  # the head is still not a target


def test_only_a_cpu_fp32_linear_head_is_wrapped(micro_base):
    nf4 = load_base(micro_base, quantization="nf4", compute_dtype="bfloat16").model
    assert not chunk_lm_head(nf4)  # bf16 head: oneDNN already blocks it well
    assert type(nf4.get_output_embeddings()) is nn.Linear
