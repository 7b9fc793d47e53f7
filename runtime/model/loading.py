"""Load the serving base: any Hugging Face causal-LM directory, optionally 4-/8-bit quantized.

    base = load_base("./base", quantization="nf4", compute_dtype="float32", device="cpu")
    base.model, base.tokenizer, base.fingerprint   # fingerprint: which adapters may serve on it

Quantization goes through `peft_format.bnb_config` (the trainer's loader uses the same):
"nf4" (4-bit NormalFloat with double quantization, matmuls in `compute_dtype`) or "int8"
(LLM.int8()); "none" keeps the checkpoint's weights in `compute_dtype`. bitsandbytes >= 0.45 runs both on CPU (slowly), so
the same code path serves tests here and GPUs in production.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loraplex import peft_format
from loraplex.errors import FailedPrecondition, InvalidArgument, quote
from loraplex.fingerprint import BaseFingerprint, fingerprint_base
from loraplex.quantization import keep_cpu_4bit_in_compute_dtype, unnest_cpu_4bit_absmax


@dataclass(frozen=True)
class LoadedBase:
    model: Any  # transformers PreTrainedModel, eval mode, no grads
    tokenizer: Any  # transformers PreTrainedTokenizerBase
    fingerprint: BaseFingerprint
    config: Any  # transformers PretrainedConfig
    quantization: str  # "nf4" | "int8" | "none"
    compute_dtype: torch.dtype
    device: torch.device

    def check_compatible(self, adapter_base: BaseFingerprint) -> None:
        """Raise IncompatibleAdapter unless an adapter made for `adapter_base` fits this base."""
        from loraplex.errors import IncompatibleAdapter

        if adapter_base.digest != self.fingerprint.digest:
            raise IncompatibleAdapter(
                f"adapter was made for base {adapter_base.summary()}, this runtime serves "
                f"{self.fingerprint.summary()}", field="adapter")


def _device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InvalidArgument(f"unknown device {quote(device)}: {e}", field="device") from e
    if dev.type not in ("cpu", "cuda"):
        raise InvalidArgument(f"device must be cpu or cuda, got {quote(device)}", field="device")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FailedPrecondition("device cuda requested but no CUDA device is available",
                                 field="device")
    return dev


def load_base(base_dir: str | Path, *, quantization: str = "nf4",
              compute_dtype: str | torch.dtype = "float32",
              device: str | torch.device = "cpu") -> LoadedBase:
    """Load model + tokenizer from `base_dir` and fingerprint it. Typed errors for a bad
    directory, an unknown quantization/dtype/device."""
    dev = _device(device)
    dtype = peft_format.compute_dtype(compute_dtype, dev, quantization)
    qcfg = peft_format.bnb_config(quantization, dtype)
    base_dir = Path(base_dir)
    fingerprint = fingerprint_base(base_dir)  # InvalidArgument for a non-model directory

    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        if qcfg is None:
            model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype).to(dev)
        else:
            # device_map places the quantized weights directly (bnb layers cannot be .to()-ed)
            model = AutoModelForCausalLM.from_pretrained(
                base_dir, dtype=dtype, quantization_config=qcfg, device_map=str(dev))
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
    except (OSError, ValueError, KeyError) as e:
        raise InvalidArgument(f"cannot load a causal LM from {base_dir}: {e}",
                              field="base") from e
    model.eval()
    model.requires_grad_(False)
    if quantization == "nf4" and dev.type == "cpu":
        keep_cpu_4bit_in_compute_dtype(model, dtype)
        unnest_cpu_4bit_absmax(model)
    return LoadedBase(model=model, tokenizer=tokenizer, fingerprint=fingerprint,
                      config=model.config, quantization=quantization, compute_dtype=dtype,
                      device=dev)
