"""The output layer (LM head) of a CPU fp32 base, computed in vocabulary chunks.

    chunk_lm_head(model)      # Runner.boot: wraps `model.lm_head` where it pays

A decode step ends with `hidden @ Wᵀ` for the whole vocabulary (SmolLM2: 32 rows × 576 ×
49152, the largest single matmul of the step). One `F.linear` over the full width writes a
`[B, V]` output far larger than a core's L2, and CPU BLAS reaches about 48 GFLOP/s on it
against about 89 GFLOP/s on the step's other projections. Cutting the vocabulary into
chunks of `CHUNK` rows of W, each written straight into its columns of one output tensor
(`torch.mm(..., out=)` on a strided view: no copy), keeps each chunk's output in cache:
thread CPU time at 16 / 32 rows 25.8 → 19.6 ms / 39.9 → 28.7 ms (AMD EPYC, AVX-512, one
thread, bench/results/roofline.md). Each output element is still the one dot product over
the hidden size that `F.linear` computes, so the logits are bit-identical (checked by
tests/runtime/model/test_head.py). bf16 heads gain nothing (oneDNN blocks them well), and
CUDA's GEMMs do not need it, so only a CPU fp32 `nn.Linear` head is wrapped.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

CHUNK = 2048  # vocabulary rows of W per matmul: output chunk [32, 2048] fp32 = 256 KiB


class ChunkedHead(nn.Linear):
    """An `nn.Linear` over the same parameters as the layer it replaces (a tied embedding
    stays tied), whose inference forward runs in chunks of `chunk` output features. Still
    an `nn.Linear` and still the model's output layer, so `all-linear` leaves it out."""

    def __init__(self, linear: nn.Linear, chunk: int = CHUNK) -> None:
        nn.Module.__init__(self)  # no fresh weight: the wrapped layer's own parameters
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight  # [V, H]
        self.bias = linear.bias  # [V] | None
        self.chunk = chunk

    def forward(self, x: Tensor) -> Tensor:  # x # [..., H] -> [..., V]
        w, b = self.weight, self.bias
        if torch.is_grad_enabled() or x.dtype != w.dtype:
            return super().forward(x)
        x2 = x.reshape(-1, w.shape[1])  # [T, H]
        out = x2.new_empty(x2.shape[0], w.shape[0])  # [T, V]
        for lo in range(0, w.shape[0], self.chunk):
            hi = lo + self.chunk
            if b is None:
                torch.mm(x2, w[lo:hi].t(), out=out[:, lo:hi])
            else:
                torch.addmm(b[lo:hi], x2, w[lo:hi].t(), out=out[:, lo:hi])
        return out.view(*x.shape[:-1], w.shape[0])


def chunk_lm_head(model: Any, chunk: int = CHUNK) -> bool:
    """Wrap the model's output layer in a `ChunkedHead` when it is a plain fp32
    `nn.Linear` on the CPU; True if it was wrapped."""
    head = model.get_output_embeddings()
    if type(head) is not nn.Linear or head.weight.device.type != "cpu" \
            or head.weight.dtype != torch.float32:
        return False
    model.set_output_embeddings(ChunkedHead(head, chunk))
    return True
