"""Which base layers a batched LoRA layer can wrap, and what it needs to know about them.

Base layers are wrapped through a first-match-wins dispatcher chain (as peft does):
bitsandbytes `Linear8bitLt`, bitsandbytes `Linear4bit`, GPT-2 `Conv1D`, `nn.Linear`. The bnb
classes come first because they subclass `nn.Linear`; bitsandbytes is only looked at when
something already imported it (a quantized model always has).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class WrapSpec:
    """What the wrapper needs to know about a base layer it can wrap."""

    kind: str  # "linear" | "conv1d" | "bnb4" | "bnb8"
    in_features: int
    out_features: int
    dtype: torch.dtype  # dtype of the LoRA stacks (the layer's compute dtype)
    device: torch.device


Dispatcher = Callable[[nn.Module], "WrapSpec | None"]


def _bnb_nn():
    """bitsandbytes.nn if bitsandbytes is already loaded, else None (never imports it)."""
    if "bitsandbytes" not in sys.modules:
        return None
    import bitsandbytes.nn as bnb_nn

    return bnb_nn


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _dispatch_bnb_8bit(module: nn.Module) -> WrapSpec | None:
    bnb_nn = _bnb_nn()
    if bnb_nn is None or not isinstance(module, bnb_nn.Linear8bitLt):
        return None
    # int8 matmuls return the input's dtype; LoRA math runs in fp32 like peft's default
    return WrapSpec("bnb8", module.in_features, module.out_features, torch.float32,
                    _device_of(module))


def _dispatch_bnb_4bit(module: nn.Module) -> WrapSpec | None:
    bnb_nn = _bnb_nn()
    if bnb_nn is None or not isinstance(module, bnb_nn.Linear4bit):
        return None
    dtype = module.compute_dtype or torch.float32
    return WrapSpec("bnb4", module.in_features, module.out_features, dtype, _device_of(module))


def _dispatch_conv1d(module: nn.Module) -> WrapSpec | None:
    from transformers.pytorch_utils import Conv1D

    if not isinstance(module, Conv1D):
        return None
    w = module.weight  # [in, out]: GPT-2 stores the transpose of nn.Linear
    return WrapSpec("conv1d", int(w.shape[0]), int(w.shape[1]), w.dtype, w.device)


def _dispatch_linear(module: nn.Module) -> WrapSpec | None:
    if not isinstance(module, nn.Linear):
        return None
    w = module.weight  # [out, in]
    return WrapSpec("linear", module.in_features, module.out_features, w.dtype, w.device)


DISPATCHERS: tuple[Dispatcher, ...] = (
    _dispatch_bnb_8bit, _dispatch_bnb_4bit, _dispatch_conv1d, _dispatch_linear,
)


def base_weight(module: nn.Module, kind: str) -> torch.Tensor:
    """The weight of a base layer `dispatch` recognised as `kind`, as `[out, in]`, dequantized
    for bitsandbytes layers by peft's own `dequantize_module_weight` (DoRA's norm is over the
    weight the adapter was trained against, so it is read the way peft reads it)."""
    if kind in ("bnb4", "bnb8"):
        from peft.utils.integrations import dequantize_module_weight

        return dequantize_module_weight(module).detach()
    w = module.weight.detach()
    return w.t() if kind == "conv1d" else w  # Conv1D stores [in, out]


def dispatch(module: nn.Module) -> WrapSpec | None:
    """The first dispatcher that recognises `module`, or None if none can wrap it."""
    for fn in DISPATCHERS:
        spec = fn(module)
        if spec is not None:
            return spec
    return None
