"""The Triton kernels run compiled on a GPU, or under Triton's interpreter on CPU tensors.

`triton.jit` reads TRITON_INTERPRET when a kernel is *defined*, so the variable must be set
before `loraplex.runtime.lora.triton_ops` is imported; the `triton_lora` fixture sets it (no
CUDA only), imports the module afresh and puts the environment back afterwards.
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

MODULE = "loraplex.runtime.lora.triton_ops"


@pytest.fixture(scope="session")
def kernel_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def triton_lora(kernel_device):
    pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[dev]')")
    if kernel_device.type == "cuda":
        yield importlib.import_module(MODULE)
        return
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        mod = sys.modules.get(MODULE)
        mod = importlib.reload(mod) if mod is not None else importlib.import_module(MODULE)
        assert mod.INTERPRETED, "TRITON_INTERPRET=1 was not seen by triton.jit"
        yield mod
    finally:
        if before is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = before
