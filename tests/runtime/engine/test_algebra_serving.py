"""A compressed adapter is served at its own, smaller ranks, with the logits peft gives it."""

from __future__ import annotations

import torch

from loraplex.registry import Identity, Registry
from loraplex.registry.derive import compress_version
from loraplex.runtime.lora.layers import inject_lora


def test_compressed_adapter_is_served_at_its_ranks_with_peft_logits(micro_base, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    trained = get_peft_model(AutoModelForCausalLM.from_pretrained(micro_base), LoraConfig(
        r=16, lora_alpha=32, target_modules=["q_proj", "v_proj", "up_proj"],
        init_lora_weights=False))
    trained.save_pretrained(tmp_path / "r16")
    me = Identity.system()
    with Registry.open(tmp_path / "reg") as reg:
        reg.register_base(me, micro_base)
        src = reg.push(me, tmp_path / "r16", "acme/a")
        v = compress_version(reg, me, src.ref, energy=0.7, scope="global")
        loaded = reg.load_adapter(v)
        reg.pull(me, v.ref, tmp_path / "small")
    ranks = {p: m["rank"] for p, m in v.lineage["modules"].items()}
    assert max(ranks.values()) < 16 and len(set(ranks.values())) > 1  # mixed, all smaller

    cfg = loaded.config
    model = AutoModelForCausalLM.from_pretrained(micro_base).eval()
    inj = inject_lora(model, ["q_proj", "v_proj", "up_proj"], max_slots=2, max_rank=16)
    inj.load_adapter(1, loaded.tensors, cfg["r"], cfg["lora_alpha"], cfg["use_rslora"],
                     rank_pattern=cfg["rank_pattern"], alpha_pattern=cfg["alpha_pattern"])
    assert {p: inj.layers[p].ranks[1] for p in ranks} == ranks
    assert inj.slot_ranks[1] == max(ranks.values())

    ids = torch.randint(3, 250, (2, 9), generator=torch.Generator().manual_seed(1))  # [B, T]
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(micro_base),
                                     tmp_path / "small").eval()
    with torch.no_grad():
        inj.set_batch([1, 1])
        ours = model(input_ids=ids).logits  # [B, T, V]
        want = peft(input_ids=ids).logits
        inj.set_batch([0, 0])
        base = model(input_ids=ids).logits
    assert torch.allclose(ours, want, atol=1e-5)
    assert not torch.allclose(ours, base, atol=1e-3)  # the adapter is really applied
    assert v.size_bytes < src.size_bytes / 2  # and stored smaller
