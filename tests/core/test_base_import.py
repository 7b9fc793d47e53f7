"""`loraplex base import`: the packaged SmolLM2 becomes a base that answers, bad GGUF files
get a clear typed error, and a hub id without a hub says so."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from loraplex.base_import import UnsupportedModelFile, import_base, packaged_file, resolve_source
from loraplex.errors import InvalidArgument, NotFound


def test_imported_smollm2_is_a_complete_base_that_answers(smollm2_base):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from loraplex.fingerprint import fingerprint_base

    names = {p.name for p in smollm2_base.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json",
            "loraplex_base.json"} <= names
    meta = json.loads((smollm2_base / "loraplex_base.json").read_text())
    tok = AutoTokenizer.from_pretrained(smollm2_base)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    gen = GenerationConfig.from_pretrained(smollm2_base)
    assert gen.eos_token_id == [im_end] == meta["eos_token_ids"]
    assert "<|im_start|>" in tok.chat_template
    fp = fingerprint_base(smollm2_base)
    assert (fp.architecture, fp.num_layers, fp.hidden_size, fp.vocab_size) == (
        "LlamaForCausalLM", 30, 576, 49152)
    assert fp.digest == meta["fingerprint"]["digest"]

    model = AutoModelForCausalLM.from_pretrained(smollm2_base, dtype=torch.float32)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    new = out[0, ids["input_ids"].shape[1]:].tolist()
    answer = tok.decode(new, skip_special_tokens=True)
    assert "Paris" in answer, answer
    assert new[-1] == im_end  # stopped at the end of its turn, from the generation config


def _write_gguf(path: Path, arch: str, qtype_name: str) -> Path:
    import gguf

    qtype = gguf.GGMLQuantizationType[qtype_name]
    _, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    if qtype_name == "F32":
        w.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    else:  # raw bytes: 4 rows of one block each (the writer derives the element shape)
        w.add_tensor("token_embd.weight", np.zeros((4, nbytes), dtype=np.uint8),
                     raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("arch, qtype, says", [
    ("rwkv6", "F32", "architecture 'rwkv6' cannot be converted"),
    ("llama", "Q8_1", "quantized as Q8_1, which the gguf package cannot dequantize"),
])
def test_gguf_transformers_cannot_read_gets_a_clear_error(tmp_path, arch, qtype, says):
    src = _write_gguf(tmp_path / "m.gguf", arch, qtype)
    with pytest.raises(UnsupportedModelFile, match=says) as e:
        import_base(str(src), tmp_path / "out")
    assert e.value.code == "INVALID_ARGUMENT" and e.value.field == "src"
    assert not (tmp_path / "out").exists()


def test_truncated_gguf_gets_a_clear_error(tmp_path):
    src = tmp_path / "cut.gguf"
    with packaged_file("smollm2-135m-instruct").open("rb") as f:
        src.write_bytes(f.read(64 << 10))  # cut inside the header's vocabulary
    with pytest.raises(UnsupportedModelFile, match="not a readable GGUF file, truncated"):
        import_base(str(src), tmp_path / "out")


def test_sources_are_told_apart(tmp_path):
    assert resolve_source("smollm2-135m-instruct").kind == "packaged"
    assert resolve_source("HuggingFaceTB/SmolLM2-135M-Instruct").kind == "hub"
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InvalidArgument, match="must be a .gguf file"):
        resolve_source(str(tmp_path / "notes.txt"))
    with pytest.raises(InvalidArgument, match="no config.json"):
        resolve_source(str(tmp_path))
    with pytest.raises(NotFound, match="no such file or directory"):
        resolve_source(str(tmp_path / "missing" / "dir"))


def test_cli_says_a_hub_id_needs_a_hub(tmp_path, monkeypatch):
    import huggingface_hub.constants
    from typer.testing import CliRunner

    from loraplex.cli import app

    # what HF_HUB_OFFLINE=1 sets (read once at import, so set on the constant here), and an
    # empty cache: the state of every machine without a hub
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    res = CliRunner().invoke(app, ["base", "import", "HuggingFaceTB/SmolLM2-135M-Instruct",
                                   str(tmp_path / "out")])
    assert res.exit_code == 1
    assert "error [UNAVAILABLE]" in res.stderr and "no model hub is reachable" in res.stderr
    assert not (tmp_path / "out").exists()


def test_hf_directory_imports_with_the_same_weights(micro_base, tmp_path):
    from safetensors.torch import load_file

    res = import_base(str(micro_base), tmp_path / "out")
    assert res.source.kind == "hf_dir" and res.eos_token_ids == [258]  # no end-of-turn token
    before, after = load_file(micro_base / "model.safetensors"), load_file(
        res.dest / "model.safetensors")
    assert before.keys() == after.keys()
    assert all((before[k] == after[k]).all() for k in before)
    with pytest.raises(InvalidArgument, match="exists and is not empty"):
        import_base(str(micro_base), res.dest)
