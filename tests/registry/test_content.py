"""Content identity (digest) and the torch-free safetensors reader it rests on."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load, save

from loraplex.registry import tensorfile
from loraplex.registry.content import adapter_digest, canonical_config
from loraplex.registry.tensorfile import TensorFileError

CFG = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]}


def _digest(cfg: dict, tensors: dict[str, torch.Tensor]) -> str:
    tf = tensorfile.parse(save(tensors))
    names = {k: k.removeprefix("base_model.model.") for k in tf.tensors}
    return adapter_digest(cfg, tf, names)


@pytest.fixture
def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"base_model.model.m.q_proj.lora_A.weight": torch.randn(2, 8, generator=g),
            "base_model.model.m.q_proj.lora_B.weight": torch.randn(8, 2, generator=g)}


def test_saving_details_do_not_change_the_digest(tensors) -> None:
    d = _digest(CFG, tensors)
    noisy = CFG | {"target_modules": ["v_proj", "q_proj"], "base_model_name_or_path": "/x",
                   "revision": "main", "inference_mode": False, "peft_version": "9.9",
                   "auto_mapping": {"base_model_class": "X"}, "new_peft_option": None}
    assert _digest(noisy, tensors) == d
    unprefixed = {k.removeprefix("base_model.model."): v for k, v in tensors.items()}
    assert _digest(CFG, unprefixed) == d
    assert _digest(CFG, dict(reversed(tensors.items()))) == d


def test_content_changes_change_the_digest(tensors) -> None:
    d = _digest(CFG, tensors)
    assert _digest(CFG | {"lora_alpha": 8}, tensors) != d
    assert _digest(CFG | {"use_rslora": True}, tensors) != d
    nudged = {k: v.clone() for k, v in tensors.items()}
    nudged["base_model.model.m.q_proj.lora_A.weight"][0, 0] += 1e-6
    assert _digest(CFG, nudged) != d
    assert _digest(CFG, {k: v.half() for k, v in tensors.items()}) != d


def test_canonical_config_is_sorted_compact_json() -> None:
    assert canonical_config({"b": 1, "a": None, "target_modules": ["z", "y"]}) == \
        b'{"b":1,"target_modules":["y","z"]}'


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16,
                                   torch.float64])
def test_nonfinite_values_are_counted_per_dtype(dtype: torch.dtype) -> None:
    t = torch.tensor([1.0, math.nan, -math.inf, math.inf, 65000.0, -0.0]).to(dtype)
    tf = tensorfile.parse(save({"t": t}))
    info = tf.tensors["t"]
    assert tensorfile.count_nonfinite(tf.data(info), info.code) == 3
    assert info.dtype == str(dtype).removeprefix("torch.")


def test_rename_keeps_the_data(tensors) -> None:
    raw = save(tensors, metadata={"format": "pt"})
    tf = tensorfile.parse(raw)
    renamed = tensorfile.rename(tf, {k: k.upper() for k in tf.tensors})
    back = load(renamed)
    assert set(back) == {k.upper() for k in tensors}
    for k, v in tensors.items():
        assert torch.equal(back[k.upper()], v)
    assert tensorfile.parse(renamed).metadata == {"format": "pt"}


@pytest.mark.parametrize(("raw", "problem"), [
    (b"\x01\x02", "shorter than"),
    ((10**9).to_bytes(8, "little") + b"{}", "out of range"),
    (len(b"[1]").to_bytes(8, "little") + b"[1]", "not a JSON object"),
    (len(b"{x").to_bytes(8, "little") + b"{x", "not JSON"),
])
def test_malformed_files_are_refused(raw: bytes, problem: str) -> None:
    with pytest.raises(TensorFileError, match=problem):
        tensorfile.parse(raw)


def test_offsets_must_match_shape_and_stay_inside_the_file() -> None:
    def build(entry: dict) -> bytes:
        header = json.dumps({"t": entry}).encode()
        return len(header).to_bytes(8, "little") + header + b"\0" * 16

    with pytest.raises(TensorFileError, match="does not match shape"):
        tensorfile.parse(build({"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}))
    with pytest.raises(TensorFileError, match="outside the file"):
        tensorfile.parse(build({"dtype": "F32", "shape": [8], "data_offsets": [0, 32]}))
    with pytest.raises(TensorFileError, match="unknown dtype"):
        tensorfile.parse(build({"dtype": "F7", "shape": [4], "data_offsets": [0, 16]}))
