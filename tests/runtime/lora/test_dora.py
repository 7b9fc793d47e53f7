"""DoRA adapters in mixed batches: each row equals peft's own DoRA model with only its adapter.

peft initialises a DoRA magnitude to the norm it divides by (a factor of exactly 1), so the
adapters here get their magnitudes scaled by a random 0.5..1.5 per feature: otherwise serving
the A/B pair alone would pass too.
"""

from __future__ import annotations

import pytest
import torch

from loraplex.errors import InvalidArgument
from loraplex.runtime.lora.batched import IncompatibleShapes
from loraplex.runtime.lora.dora import add_dora, dora_gain
from loraplex.runtime.lora.layers import default_target_modules, inject_lora
from loraplex.runtime.lora.ops import make_plan

# (name, r, alpha, use_dora, target subset: None = every default target)
ADAPTERS = [
    ("dora_a", 4, 8, True, None),
    ("lora_b", 8, 16, False, None),
    ("dora_c", 2, 3, True, ("q", "v", "c_attn", "mlp")),
]
ROW_SLOTS = [1, 0, 2, 3, 1, 3, 0, 2]  # slot i+1 = ADAPTERS[i]; 0 = plain base
MAGNITUDE = "lora_magnitude_vector"


def _load(base_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()


def _peft_with_adapters(model, targets: list[str]):
    """peft model with ADAPTERS (random A, B and magnitudes) and each one's saved tensors."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    torch.manual_seed(0)
    peft_model, dicts = None, {}
    for name, r, alpha, dora, subset in ADAPTERS:
        tm = targets if subset is None else [t for t in targets if any(s in t for s in subset)]
        cfg = LoraConfig(r=r, lora_alpha=alpha, use_dora=dora, target_modules=tm,
                         init_lora_weights=False, lora_dropout=0.0)
        if peft_model is None:
            peft_model = get_peft_model(model, cfg, adapter_name=name)
        else:
            peft_model.add_adapter(name, cfg)
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if f"{MAGNITUDE}.{name}." in n:
                    p.mul_(0.5 + torch.rand_like(p))
        dicts[name] = get_peft_model_state_dict(peft_model, adapter_name=name)
    return peft_model.eval(), dicts


def _peft_rows(peft_model, ids: torch.Tensor, row_slots: list[int]) -> torch.Tensor:
    rows = []
    for i, slot in enumerate(row_slots):
        if slot == 0:
            with peft_model.disable_adapter():
                rows.append(peft_model(ids[i : i + 1]).logits)
        else:
            peft_model.set_adapter(ADAPTERS[slot - 1][0])
            rows.append(peft_model(ids[i : i + 1]).logits)
    return torch.cat(rows)  # [B, S, V]


def _ours(base_dir, dicts, targets, max_slots: int = len(ADAPTERS)):
    model = _load(base_dir)
    inj = inject_lora(model, targets, max_slots=max_slots, max_rank=8)
    for slot, (name, r, alpha, _, _) in enumerate(ADAPTERS, start=1):
        inj.load_adapter(slot, dicts[name], r=r, alpha=alpha)
    return model, inj


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])  # qwen2: biases; gpt2: Conv1D
@torch.no_grad()
def test_mixed_dora_lora_base_rows_equal_peft_dora_alone(base_factory, arch):
    base_dir = base_factory("micro", arch)
    targets = default_target_modules(_load(base_dir))
    peft_model, dicts = _peft_with_adapters(_load(base_dir), targets)
    assert any(MAGNITUDE in k for k in dicts["dora_a"]), "peft saved no DoRA magnitudes"
    model, inj = _ours(base_dir, dicts, targets)
    assert inj.slot_dora == [False, True, False, True]

    g = torch.Generator().manual_seed(1)
    prefill = torch.randint(0, 256, (len(ROW_SLOTS), 7), generator=g)  # [B, S]
    inj.set_batch(ROW_SLOTS)
    got = model(prefill).logits
    torch.testing.assert_close(got, _peft_rows(peft_model, prefill, ROW_SLOTS),
                               rtol=1e-5, atol=1e-5)

    step = torch.randint(0, 256, (4, 1), generator=g)  # decode-shaped: every strategy
    for slots in ([1, 1, 1, 1], [3, 2, 1, 0], [0, 3, 0, 3], [1, 2, 1, 2]):
        inj.set_batch(slots)
        torch.testing.assert_close(model(step).logits, _peft_rows(peft_model, step, slots),
                                   rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_the_magnitude_changes_the_output_and_a_reused_slot_forgets_it(micro_base):
    """Serving a DoRA adapter's A/B without its magnitude gives other logits; a LoRA adapter
    written over a DoRA slot is plain LoRA again (its factor is cleared)."""
    targets = default_target_modules(_load(micro_base))
    peft_model, dicts = _peft_with_adapters(_load(micro_base), targets)
    model, inj = _ours(micro_base, dicts, targets)
    ids = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(2))
    inj.set_batch([1, 1])
    dora = model(ids).logits
    bare = {k: v for k, v in dicts["dora_a"].items() if MAGNITUDE not in k}
    inj.load_adapter(1, bare, r=4, alpha=8)
    assert inj.slot_dora[1] is False
    inj.set_batch([1, 1])
    assert (model(ids).logits - dora).abs().max() > 1e-2
    inj.load_adapter(1, dicts["dora_a"], r=4, alpha=8)
    inj.set_batch([1, 1])
    torch.testing.assert_close(model(ids).logits, dora, rtol=0, atol=0)
    inj.load_adapter(1, dicts["lora_b"], r=8, alpha=16)  # LoRA over the DoRA slot
    inj.set_batch([1, 1])
    torch.testing.assert_close(model(ids).logits, _peft_rows(peft_model, ids, [2, 2]),
                               rtol=1e-5, atol=1e-5)
    inj.clear_slot(3)
    assert inj.slot_dora == [False, False, False, False]
    assert not any(layer.lora_dora.any() for layer in inj.layers.values())


@torch.no_grad()
def test_bad_dora_adapters_are_refused_and_leave_the_slot_as_it_was(micro_base):
    targets = default_target_modules(_load(micro_base))
    _, dicts = _peft_with_adapters(_load(micro_base), targets)
    model, inj = _ours(micro_base, dicts, targets)
    before = {p: layer.lora_dora[1].clone() for p, layer in inj.layers.items()}
    good = dicts["dora_a"]
    some_mag = next(k for k in good if MAGNITUDE in k)

    missing = {k: v for k, v in good.items() if k != some_mag}
    with pytest.raises(IncompatibleShapes, match="lora_magnitude_vector for every module"):
        inj.load_adapter(1, missing, r=4, alpha=8)
    short = {**good, some_mag: good[some_mag][:-1]}
    with pytest.raises(IncompatibleShapes, match="DoRA magnitude of shape"):
        inj.load_adapter(1, short, r=4, alpha=8)
    path = some_mag.removeprefix("base_model.model.").removesuffix("." + MAGNITUDE)
    layer = inj.layers[path]
    a_key = next(k for k in good if k.endswith(f"{path}.lora_A.weight"))
    b_key = next(k for k in good if k.endswith(f"{path}.lora_B.weight"))
    # W + s·B·A with a zero row: peft divides by 0 there
    w = layer.base_layer.weight
    zero_row = {**good, a_key: torch.zeros_like(good[a_key]), b_key: torch.zeros_like(
        good[b_key])}
    w_saved = w[0].clone()
    w[0].zero_()
    try:
        with pytest.raises(InvalidArgument, match="not finite"):
            inj.load_adapter(1, zero_row, r=4, alpha=8)
    finally:
        w[0].copy_(w_saved)
    assert inj.slot_dora[1] is True
    for p, layer in inj.layers.items():
        torch.testing.assert_close(layer.lora_dora[1], before[p], rtol=0, atol=0)


def test_dora_gain_is_peft_s_weight_norm():
    """The factor is peft's `DoraLinearLayer.get_weight_norm` (norm of each output feature's
    row of W + s·B·A), magnitude over it, minus one."""
    from peft.tuners.lora.dora import DoraLinearLayer

    g = torch.Generator().manual_seed(3)
    w, a, b = (torch.randn(12, 20, generator=g), torch.randn(4, 20, generator=g),
               torch.randn(12, 4, generator=g))
    m = torch.rand(12, generator=g) + 0.5
    norm = DoraLinearLayer(fan_in_fan_out=False).get_weight_norm(w, b @ a, scaling=0.75)
    torch.testing.assert_close(dora_gain(w, a, b, 0.75, m), m / norm - 1, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("strategy", ["single", "grouped", "segments"])
def test_add_dora_is_its_semantics_loop(strategy):
    g = torch.Generator().manual_seed(4)
    slots = torch.tensor([2, 0, 1, 2, 2, 1, 0, 1])
    y = torch.randn(8, 6, generator=g)
    bias = torch.randn(6, generator=g)
    gain = torch.randn(3, 6, generator=g)
    gain[0] = 0
    gain[1] = 0  # slot 1: a LoRA adapter
    plan = make_plan(slots, strategy=strategy, slot_dora=[False, False, True])
    assert plan.dora
    want = y.clone()
    for t in range(8):
        s = int(slots[t])
        want[t] += gain[s] * (want[t] - bias)
    got = add_dora(y.clone(), bias, gain, plan)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(got[slots != 2], y[slots != 2], rtol=0, atol=0)  # untouched
    assert not make_plan(slots, slot_dora=[False, False, False]).dora
    assert not make_plan(slots).dora
