"""Registry → host memory: read an adapter (digest-checked) and check it fits the layers.

Runs on the pool's loader threads, never on the engine thread (a cold load must not stall
decoding). `peft_target` is the one place the engine reads peft tensor names; it will be
served by the shared peft-format module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from loraplex.errors import FailedPrecondition
from loraplex.runtime.admission import Limits, check_compatible
from loraplex.runtime.pool import HostAdapter

if TYPE_CHECKING:
    from loraplex.registry import AdapterVersion, Registry
    from loraplex.runtime.layers import LoraInjection


def peft_target(key: str) -> tuple[str, str] | None:
    """`base_model.model.<module>.lora_A[.default].weight` → (`<module>`, "lora_A")."""
    from loraplex.runtime.layers import parse_peft_key

    return parse_peft_key(key)


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

    def __call__(self, version: AdapterVersion) -> HostAdapter:
        if self.hook is not None:
            self.hook(version)
        check_compatible(version, self.limits)
        loaded = self.registry.load_adapter(version)
        tensors = {k: t.to(dtype=self.dtype).contiguous() for k, t in loaded.tensors.items()}
        if self.pin_memory:
            tensors = {k: t.pin_memory() for k, t in tensors.items()}
        problems = fit_problems(tensors, self.injection)
        if problems:
            raise FailedPrecondition(f"adapter {version.ref} does not fit this engine: "
                                     + "; ".join(problems[:5]), field="adapter")
        return HostAdapter(digest=version.digest, ref=version.ref, tensors=tensors,
                           rank=version.rank, alpha=version.alpha,
                           use_rslora=version.use_rslora,
                           rank_pattern=loaded.config.get("rank_pattern") or None,
                           alpha_pattern=loaded.config.get("alpha_pattern") or None)


def fit_problems(tensors: dict[str, torch.Tensor], injection: LoraInjection) -> list[str]:
    """Every tensor must target an injected layer with shapes it can hold."""
    problems = []
    for key, t in tensors.items():
        parsed = peft_target(key)
        layer = injection.layers.get(parsed[0]) if parsed else None
        if layer is None:
            problems.append(f"{key!r} targets no LoRA layer of this engine")
        elif parsed[1] == "lora_A":
            layer.check_shapes(t, tensors[key.replace("lora_A", "lora_B")])
    return problems


def write_slot(injection: LoraInjection) -> Callable[[int, HostAdapter], None]:
    """The pool's host → device copy: into the layers' pre-allocated slot stacks."""

    def write(slot: int, host: HostAdapter) -> None:
        injection.load_adapter(slot, host.tensors, host.rank, host.alpha, host.use_rslora,
                               rank_pattern=host.rank_pattern, alpha_pattern=host.alpha_pattern)

    return write
