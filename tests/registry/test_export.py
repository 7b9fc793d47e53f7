"""`loraplex export REF OUT --merged`: a plain HF model whose greedy output equals peft's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from loraplex.cli import app
from loraplex.errors import FailedPrecondition
from loraplex.registry import Identity, Registry
from loraplex.registry.export import export_merged

PROMPTS = ["the red desk", "send 347 now", "a"]


def _greedy(model, tok, n=12) -> list[list[int]]:
    out = []
    for p in PROMPTS:
        ids = tok(p, return_tensors="pt").input_ids  # [1, T]
        gen = model.generate(ids, max_new_tokens=n, do_sample=False,
                             pad_token_id=tok.pad_token_id or tok.eos_token_id)
        out.append(gen[0, ids.shape[1]:].tolist())
    return out


@pytest.fixture
def stored(tmp_path: Path, micro_base: Path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(micro_base), LoraConfig(
        r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
        init_lora_weights=False))
    for n, p in model.named_parameters():  # a strong adapter, so that it changes the output
        if "lora_B" in n:
            p.data *= 4
    model.save_pretrained(tmp_path / "adapter")
    reg = Registry.open(tmp_path / "reg")
    reg.register_base(Identity.system(), micro_base)
    v = reg.push(Identity.system(), tmp_path / "adapter", "acme/support")
    yield reg, v
    reg.close()


def test_merged_export_generates_what_peft_serves(stored, micro_base: Path, tmp_path: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reg, v = stored
    env = {"LORAPLEX_REGISTRY": str(tmp_path / "reg"), "LORAPLEX_TOKEN": None}
    res = CliRunner().invoke(app, ["export", "acme/support", str(tmp_path / "out"),
                                   "--merged", "--json"], env=env)
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["digest"] == v.digest
    out = tmp_path / "out"
    assert not (out / "adapter_config.json").exists()  # a plain model, no peft needed
    tok = AutoTokenizer.from_pretrained(micro_base)
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(micro_base),
                                     tmp_path / "adapter").eval()
    with torch.no_grad():
        want = _greedy(peft, tok)
        assert _greedy(merged, AutoTokenizer.from_pretrained(out)) == want
        with peft.disable_adapter():
            assert _greedy(peft, tok) != want  # the adapter really changes the output
    manifest = json.loads((out / "loraplex_export.json").read_text())
    assert manifest["modules_folded"] == 6 and manifest["adapter"] == v.ref


def test_export_dtype_and_refusals(stored, tmp_path: Path):
    from safetensors import safe_open

    reg, v = stored
    _, out = export_merged(reg, Identity("acme"), "acme/support", tmp_path / "bf16",
                           dtype="bfloat16")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        key = next(k for k in f.keys() if k.endswith("q_proj.weight"))
        assert f.get_tensor(key).dtype == torch.bfloat16
    with pytest.raises(FailedPrecondition, match="not empty"):
        export_merged(reg, Identity("acme"), "acme/support", tmp_path / "bf16")
