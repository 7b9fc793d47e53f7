"""Load a base causal LM (optionally 4/8-bit) and wrap it with LoRA.

Target modules default to the leaf names of every layer peft's `all-linear` means (nn.Linear,
bitsandbytes' Linear4bit/Linear8bitLt which subclass it, and GPT-2's Conv1D; never the output
head), found by walking the model (`loraplex.peft_format`), so any Hugging Face causal LM
works without a per-model table. `--target-modules all-linear` is passed to peft as is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loraplex import compute, peft_format
from loraplex.errors import InvalidArgument
from loraplex.quantization import keep_cpu_4bit_in_compute_dtype
from loraplex.trainer.config import TrainConfig


def linear_target_modules(model: Any) -> list[str]:
    """Leaf names of every layer peft's `all-linear` means (`peft_format.linear_modules`:
    linear layers but the output head), sorted: the default `target_modules`, short enough
    to read in adapter_config.json, and the same set the runtime wraps by default."""
    names = peft_format.leaf_names(peft_format.linear_modules(model))
    if not names:
        raise InvalidArgument("the model has no linear layers to put LoRA on; "
                              "pass --target-modules", field="target_modules")
    return names


def choose_compute(cfg: TrainConfig, device: Any) -> compute.ComputeChoice:
    """The compute dtype for training `cfg` on `device` (`loraplex.compute`: an explicit
    `compute_dtype` wins, "auto" decides for this machine and this quantization)."""
    return compute.choose(cfg.compute_dtype, device, quantization=cfg.quantization)


def load_base(base: str | Path, cfg: TrainConfig, *, device: Any = None,
              choice: compute.ComputeChoice | None = None):
    """(model, tokenizer) for training; quantized per `cfg.quantization`, in `choice`'s
    dtype (default: `choose_compute`)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = Path(base)
    if not (base / "config.json").is_file():
        raise InvalidArgument(f"{base} is not a model directory (no config.json)", field="base")
    cuda = torch.cuda.is_available()
    dev = device if device is not None else ("cuda" if cuda else "cpu")
    dtype = (choice or choose_compute(cfg, dev)).torch_dtype
    qconf = peft_format.bnb_config(cfg.quantization, dtype)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if qconf is not None:
        kwargs["quantization_config"] = qconf
        # bitsandbytes quantizes on load: place the weights on this process's device now.
        kwargs["device_map"] = {"": dev}
    model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
    if cfg.quantization == "nf4" and not cuda:
        keep_cpu_4bit_in_compute_dtype(model, dtype)
    tokenizer = AutoTokenizer.from_pretrained(base)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def wrap_lora(model: Any, cfg: TrainConfig):
    """Prepare a (possibly quantized) model for k-bit training and add LoRA adapters.
    `cfg` is the resolved configuration (`recipe.choose` filled rank, alpha and dropout)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    unresolved = [k for k in ("r", "alpha", "dropout") if getattr(cfg, k) is None]
    if unresolved:
        raise ValueError(f"wrap_lora needs a resolved recipe; unset: {unresolved}")

    targets = cfg.target_modules or linear_target_modules(model)
    if cfg.quantization != "none":
        # Casts norms to fp32 and enables input grads: the QLoRA recipe's stability fixes.
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    elif cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    lcfg = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                      use_rslora=cfg.rslora, use_dora=cfg.dora, target_modules=targets,
                      bias="none",
                      task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, lcfg)
    except ValueError as e:  # peft: "Target modules {...} not found in the base model"
        raise InvalidArgument(f"target modules: {e}", field="target_modules") from e
