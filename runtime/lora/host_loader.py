"""Registry → host memory: read an adapter (digest-checked) and check it fits the layers;
for a DoRA adapter, also compute its per-feature factors from the base weights (once per load).

Runs on the pool's loader threads, never on the engine thread (a cold load must not stall
decoding). Tensor names are read by the shared peft-format rules (`loraplex.peft_format`),
the same ones the registry validated them with.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from loraplex import peft_format
from loraplex.errors import FailedPrecondition, quote
from loraplex.runtime.api.limits import Limits, check_compatible
from loraplex.runtime.lora.loading import HostAdapter

if TYPE_CHECKING:
    from loraplex.registry import AdapterVersion, Registry
    from loraplex.runtime.lora.layers import LoraInjection


# the float dtypes the registry stores (`AdapterVersion.dtype`); an unknown one counts as 1 byte
_ELEMENT_BYTES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}


class HostLoader:
    """`load(version) -> HostAdapter`: raises DataCorruption, IncompatibleAdapter,
    FailedPrecondition (does not fit the layers)."""

    def __init__(self, registry: Registry | None, injection: LoraInjection, limits: Limits,
                 dtype: torch.dtype, pin_memory: bool) -> None:
        self.registry = registry
        self.injection = injection
        self.limits = limits
        self.dtype = dtype
        self.pin_memory = pin_memory
        self.hook: Callable[[AdapterVersion], None] | None = None  # tests: slow or failing loads

    def host_bytes(self, version: AdapterVersion) -> int:
        """An upper bound of the bytes `load(version)` holds, from the version's record
        alone (the pool reserves it before the load starts): every stored byte counted as
        a tensor element, converted to the serving dtype. A DoRA adapter's factors come on
        top (the pool takes them when it lands)."""
        stored = _ELEMENT_BYTES.get(version.dtype, 1)
        return -(-version.size_bytes // stored) * self.dtype.itemsize

    def __call__(self, version: AdapterVersion) -> HostAdapter:
        if self.hook is not None:
            self.hook(version)
        check_compatible(version, self.limits)
        loaded = self.registry.load_adapter(version)
        rank_pattern = loaded.config.get("rank_pattern") or None
        alpha_pattern = loaded.config.get("alpha_pattern") or None
        problems = fit_problems(loaded.tensors, self.injection)
        if problems:
            raise FailedPrecondition(f"adapter {version.ref} does not fit this engine: "
                                     + "; ".join(problems[:5]), field="adapter")
        gains = None
        if peft_format.pair_tensors(loaded.tensors).dora:  # stored dtype, before any cast
            gains = self.injection.dora_gains(
                loaded.tensors, version.rank, version.alpha, version.use_rslora,
                rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
        tensors = {k: t.to(dtype=self.dtype).contiguous() for k, t in loaded.tensors.items()}
        if self.pin_memory:
            tensors = {k: t.pin_memory() for k, t in tensors.items()}
            gains = None if gains is None else {k: g.pin_memory() for k, g in gains.items()}
        return HostAdapter(digest=version.digest, ref=version.ref, tensors=tensors,
                           rank=version.rank, alpha=version.alpha,
                           use_rslora=version.use_rslora, rank_pattern=rank_pattern,
                           alpha_pattern=alpha_pattern, dora_gains=gains)


def fit_problems(tensors: dict[str, torch.Tensor], injection: LoraInjection) -> list[str]:
    """Every tensor must be half of an A/B pair that targets an injected layer with shapes
    it can hold (a lone half is refused here, not a KeyError on the loader thread)."""
    grouped = peft_format.pair_tensors(tensors)
    problems = [f"{quote(key)} is not a LoRA A/B weight nor a DoRA magnitude"
                for key in grouped.unparsed]
    problems += [f"module {quote(module)} has no lora_{half} weight"
                 for module, half in grouped.incomplete]
    for module, (a, b) in grouped.pairs.items():
        layer = injection.layers.get(module)
        if layer is None:
            problems.append(f"{quote(module)} targets no LoRA layer of this engine")
        else:
            layer.check_shapes(a, b)
    return problems


def write_slot(injection: LoraInjection) -> Callable[[int, HostAdapter], None]:
    """The pool's host → device copy: into the layers' pre-allocated slot stacks."""

    def write(slot: int, host: HostAdapter) -> None:
        injection.load_adapter(slot, host.tensors, host.rank, host.alpha, host.use_rslora,
                               rank_pattern=host.rank_pattern, alpha_pattern=host.alpha_pattern,
                               dora_gains=host.dora_gains)

    return write
