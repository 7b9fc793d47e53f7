"""DoRA rows on the Triton path (compiled on a GPU, interpreted on CPU): the per-step plan
and the static decode plan a CUDA graph replays both rescale DoRA rows as peft does."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from loraplex.runtime.lora.layers import default_target_modules
from loraplex.runtime.lora.ops import static_decode_plan, static_decode_table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.runtime.lora.test_dora import (  # noqa: E402 - the same adapters and reference
    _load,
    _ours,
    _peft_rows,
    _peft_with_adapters,
)


@torch.no_grad()
def test_triton_plans_rescale_dora_rows_like_peft(triton_lora, kernel_device, micro_base):
    targets = default_target_modules(_load(micro_base))
    peft_model, dicts = _peft_with_adapters(_load(micro_base), targets)
    model, inj = _ours(micro_base, dicts, targets)
    model.to(kernel_device)
    for layer in inj.layers.values():  # CPU B stacks are transposed views;
        layer.lora_b = layer.lora_b.contiguous()  # the kernels read CUDA's layout
    inj.batch.kernel = "triton"
    g = torch.Generator().manual_seed(5)
    step = torch.randint(0, 256, (4, 1), generator=g)  # [B, 1]
    slots = [1, 2, 3, 0]  # DoRA, LoRA, DoRA, base
    want = _peft_rows(peft_model, step, slots)

    inj.set_batch(slots)
    assert inj.batch.plan_for(4, 4).strategy == "triton" and inj.batch.plan_for(4, 4).dora
    torch.testing.assert_close(model(step.to(kernel_device)).logits.cpu(), want,
                               rtol=0, atol=1e-4)

    rows = 8  # the static layout: padded to a bucket, the DoRA step for every row
    table = torch.tensor(static_decode_table(slots, rows, inj.slot_ranks), dtype=torch.int32)
    padded = torch.tensor(slots + [0] * (rows - len(slots)))
    inj.batch.set_plan(static_decode_plan(table.to(kernel_device), padded.to(kernel_device),
                                          rows, dora=True))
    ids = torch.cat([step, step[:1].expand(rows - len(slots), 1)])  # [rows, 1]
    got = model(ids.to(kernel_device)).logits[: len(slots)].cpu()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
