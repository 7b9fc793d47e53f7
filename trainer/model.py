"""Load a base causal LM (optionally 4/8-bit) and wrap it with LoRA.

Target modules default to every linear projection inside the decoder blocks, found by
walking the model (nn.Linear, bitsandbytes' Linear4bit/Linear8bitLt which subclass it, and
GPT-2's Conv1D), so any Hugging Face causal LM works without a per-model table. The output
head (lm_head) and anything outside numbered blocks (embeddings' projections) are left out.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from loraplex.errors import InvalidArgument
from loraplex.quantization import keep_cpu_4bit_in_compute_dtype
from loraplex.trainer.config import TrainConfig

_IN_BLOCK = re.compile(r"\.\d+\.")  # "model.layers.3.self_attn.q_proj", "transformer.h.0.attn.c_attn"


def resolve_dtype(name: str, *, cuda: bool):
    """"auto": bfloat16 where the GPU supports it, else float32 (CPU half precision is slow)."""
    import torch

    if name == "auto":
        if cuda and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def linear_target_modules(model: Any) -> list[str]:
    """Leaf names of every linear projection inside the decoder blocks, sorted."""
    import torch
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    names: set[str] = set()
    for full, mod in model.named_modules():
        if mod is head or not _IN_BLOCK.search(full + "."):
            continue
        if isinstance(mod, torch.nn.Linear | Conv1D):
            names.add(full.rsplit(".", 1)[-1])
    if not names:
        raise InvalidArgument("no linear projections found inside the model's blocks; "
                              "pass --target-modules", field="target_modules")
    return sorted(names)


def _quantization_config(cfg: TrainConfig, dtype: Any):
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    if cfg.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def load_base(base: str | Path, cfg: TrainConfig, *, device: Any = None):
    """(model, tokenizer) for training; quantized per `cfg.quantization`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = Path(base)
    if not (base / "config.json").is_file():
        raise InvalidArgument(f"{base} is not a model directory (no config.json)", field="base")
    cuda = torch.cuda.is_available()
    dtype = resolve_dtype(cfg.compute_dtype, cuda=cuda)
    qconf = _quantization_config(cfg, dtype)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if qconf is not None:
        kwargs["quantization_config"] = qconf
        # bitsandbytes quantizes on load: place the weights on this process's device now.
        kwargs["device_map"] = {"": device if device is not None else ("cuda" if cuda else "cpu")}
    model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
    if cfg.quantization == "nf4" and not cuda:
        keep_cpu_4bit_in_compute_dtype(model, dtype)
    tokenizer = AutoTokenizer.from_pretrained(base)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def wrap_lora(model: Any, cfg: TrainConfig):
    """Prepare a (possibly quantized) model for k-bit training and add LoRA adapters."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    targets = cfg.target_modules or linear_target_modules(model)
    if cfg.quantization != "none":
        # Casts norms to fp32 and enables input grads: the QLoRA recipe's stability fixes.
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    elif cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    lcfg = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                      use_rslora=cfg.rslora, target_modules=targets, bias="none",
                      task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, lcfg)
    except ValueError as e:  # peft: "Target modules {...} not found in the base model"
        raise InvalidArgument(f"target modules: {e}", field="target_modules") from e
