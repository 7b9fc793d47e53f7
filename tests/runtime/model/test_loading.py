"""load_base: any HF causal-LM dir, nf4 / int8 / none, fingerprinted, typed errors."""

from __future__ import annotations

import pytest
import torch

from loraplex.errors import IncompatibleAdapter, InvalidArgument
from loraplex.fingerprint import fingerprint_base
from loraplex.runtime.model.loading import load_base


@pytest.mark.parametrize(
    ("quantization", "layer_cls"),
    [("none", "Linear"), ("nf4", "Linear4bit"), ("int8", "Linear8bitLt")],
)
@torch.no_grad()
def test_load_base_quantizes_and_fingerprints(micro_base, quantization, layer_cls):
    base = load_base(micro_base, quantization=quantization)
    q_proj = base.model.model.layers[0].self_attn.q_proj
    assert type(q_proj).__name__ == layer_cls
    assert type(base.model.lm_head).__name__ == "Linear"  # the head stays unquantized
    assert base.fingerprint == fingerprint_base(micro_base)
    assert base.quantization == quantization and base.compute_dtype == torch.float32
    assert not base.model.training
    assert not any(p.requires_grad for p in base.model.parameters())
    ids = base.tokenizer("hello", return_tensors="pt").input_ids
    logits = base.model(ids).logits
    assert logits.shape == (1, ids.shape[1], base.config.vocab_size)
    assert torch.isfinite(logits).all()


@torch.no_grad()
def test_nf4_logits_stay_close_to_the_fp32_base(micro_base):
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    full = load_base(micro_base, quantization="none").model(ids).logits
    nf4 = load_base(micro_base, quantization="nf4").model(ids).logits
    assert not torch.equal(full, nf4)
    cos = torch.nn.functional.cosine_similarity(full.flatten(), nf4.flatten(), dim=0)
    assert cos > 0.9  # random micro weights quantize coarsely; the same model all the same


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_other_architectures_load(base_factory, arch):
    base = load_base(base_factory("micro", arch), quantization="nf4")
    assert base.fingerprint.model_type == arch


def test_bad_inputs_are_typed_errors(micro_base, tmp_path):
    with pytest.raises(InvalidArgument) as e:
        load_base(tmp_path)  # no config.json
    assert e.value.field == "base"
    with pytest.raises(InvalidArgument) as e:
        load_base(micro_base, quantization="fp3")
    assert e.value.field == "quantization"
    with pytest.raises(InvalidArgument) as e:
        load_base(micro_base, compute_dtype="float8")
    assert e.value.field == "compute_dtype"
    with pytest.raises(InvalidArgument) as e:
        load_base(micro_base, device="tpu")
    assert e.value.field == "device"


def test_check_compatible_refuses_another_base(base_factory, micro_base):
    base = load_base(micro_base, quantization="none")
    base.check_compatible(fingerprint_base(micro_base))
    with pytest.raises(IncompatibleAdapter):
        base.check_compatible(fingerprint_base(base_factory("micro", "qwen2")))
