"""An adapter made with peft itself (not by us) goes in, resolves, and comes back out
openable by `PeftModel.from_pretrained`, computing exactly what it computed before."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from loraplex.registry import Identity, Registry

ADMIN = Identity.system()


def _peft_adapter(base_dir: Path, out: Path, targets: list[str], seed: int,
                  **lora: object) -> torch.Tensor:
    """Save a peft LoRA with non-zero B (peft initialises B to 0) and return its logits."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    peft_model = get_peft_model(model, LoraConfig(
        **{"r": 4, "lora_alpha": 16, "target_modules": targets} | lora))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    peft_model.save_pretrained(out)
    return _logits(peft_model.eval())


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.tensor([[257, 72, 105, 33, 10, 200]])
    with torch.no_grad():
        return model(input_ids=ids).logits


def _reopen(base_dir: Path, adapter_dir: Path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    return _logits(PeftModel.from_pretrained(model, adapter_dir).eval())


def test_peft_adapter_pushes_lists_resolves_and_reopens(registry: Registry, micro_base: Path,
                                                        tmp_path: Path) -> None:
    want = _peft_adapter(micro_base, tmp_path / "made", ["q_proj", "v_proj", "down_proj"], 0)
    registry.register_base(ADMIN, micro_base)
    v = registry.push(ADMIN, tmp_path / "made", "acme/support")  # base found by its name
    assert (v.ref, v.rank, v.alpha, v.target_modules) == (
        "acme/support:v1", 4, 16.0, ("down_proj", "q_proj", "v_proj"))
    registry.set_alias(ADMIN, v.ref, "prod", expected=None)
    assert [x.ref for x in registry.list_adapters(ADMIN)[0]] == ["acme/support:v1"]
    for ref in ("acme/support", "acme/support@latest", "acme/support@prod",
                "acme/support:v1", v.digest):
        assert registry.resolve(ADMIN, ref) == v, ref
    pulled = registry.pull(ADMIN, "acme/support@prod", tmp_path / "pulled")
    assert (pulled / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "made" / "adapter_model.safetensors").read_bytes()
    assert torch.equal(_reopen(micro_base, pulled), want)
    loaded = registry.load_adapter(v)
    a, b = loaded.pairs()["model.layers.1.mlp.down_proj"]
    assert tuple(a.shape) == (4, 160) and tuple(b.shape) == (64, 4)


def test_resaved_adapter_is_the_same_version(registry: Registry, micro_base: Path,
                                             tmp_path: Path) -> None:
    """Saving the same weights again (new peft run, new paths) changes no identity."""
    _peft_adapter(micro_base, tmp_path / "one", ["q_proj", "v_proj"], 3)
    first = registry.push(ADMIN, tmp_path / "one", "acme/support", base=micro_base)
    model = AutoModelForCausalLM.from_pretrained(micro_base)
    PeftModel.from_pretrained(model, tmp_path / "one").save_pretrained(tmp_path / "two")
    again = registry.push(ADMIN, tmp_path / "two", "acme/support", base=micro_base)
    assert (again.version, again.created) == (1, False)
    assert again.digest == first.digest


@pytest.mark.parametrize("arch,targets", [("gpt2", ["c_attn", "c_proj"]),
                                          ("qwen2", ["k_proj", "up_proj"])])
def test_other_architectures(sqlite_reg: Registry, base_factory, tmp_path: Path, arch: str,
                             targets: list[str]) -> None:
    """GPT-2's Conv1D projections (weights stored [in, out]) validate by in/out features."""
    base = base_factory("micro", arch)
    want = _peft_adapter(base, tmp_path / "made", targets, 1)
    v = sqlite_reg.push(ADMIN, tmp_path / "made", f"acme/{arch}", base=base)
    assert v.base.model_type == arch
    pulled = sqlite_reg.pull(ADMIN, v.ref, tmp_path / "pulled")
    assert torch.equal(_reopen(base, pulled), want)


def test_per_module_rank_and_alpha_patterns(sqlite_reg: Registry, micro_base: Path,
                                            tmp_path: Path) -> None:
    """peft's rank_pattern/alpha_pattern adapters validate per module and round-trip."""
    want = _peft_adapter(micro_base, tmp_path / "made", ["q_proj", "v_proj"], 2,
                         rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 32})
    v = sqlite_reg.push(ADMIN, tmp_path / "made", "acme/patterned", base=micro_base)
    assert v.rank == 4, "`rank` is the config's r; the patterns live in the config"
    a, b = sqlite_reg.load_adapter(v).pairs()["model.layers.0.self_attn.v_proj"]
    assert tuple(a.shape) == (2, 64) and tuple(b.shape) == (32, 2)
    assert sqlite_reg.load_adapter(v).config["rank_pattern"] == {"v_proj": 2}
    pulled = sqlite_reg.pull(ADMIN, v.ref, tmp_path / "pulled")
    assert torch.equal(_reopen(micro_base, pulled), want)
