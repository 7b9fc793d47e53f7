"""`loraplex export REF OUT --merged`: the base with one adapter folded into its weights.

    loraplex export acme/support@prod ./acme-merged --merged --dtype bfloat16
    loraplex export acme/support@prod ./acme-adapter        # the peft files (as `pull`)

For a tenant who wants a dedicated deployment: OUT is a plain Hugging Face model directory
(config, weights, tokenizer) that any HF-compatible server loads without peft. Each target
weight becomes W + s·B·A, computed in float32 from the base's unquantized weights and then
cast to `--dtype`. The result's greedy output equals serving the adapter with peft on the
same unquantized base (tests/registry/test_export.py checks token for token).

The base directory is `--base`, or the first directory the adapter's registered base was
registered under that still exists and still has that fingerprint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from loraplex.errors import FailedPrecondition, IncompatibleAdapter, InvalidArgument, quote
from loraplex.fingerprint import BaseFingerprint, fingerprint_base
from loraplex.registry.algebra import modules_of
from loraplex.registry.records import AdapterVersion, Identity
from loraplex.registry.registry import Registry

DTYPES = ("float32", "bfloat16", "float16")
EXPORT_MANIFEST = "loraplex_export.json"


def base_dir_for(reg: Registry, fp: BaseFingerprint,
                 given: str | os.PathLike[str] | None = None) -> Path:
    """The directory holding base `fp`: `given` (checked), else a registered name that is
    an existing model directory with that fingerprint."""
    if given is not None:
        path = Path(given)
        if not (path / "config.json").is_file():
            raise InvalidArgument(f"{path} is not a model directory (no config.json)",
                                  field="base")
        have = fingerprint_base(path).digest
        if have != fp.digest:
            raise IncompatibleAdapter(f"{path} is base {have}, the adapter needs {fp.digest}",
                                      field="base")
        return path
    for names, known in reg.list_bases():
        if known.digest != fp.digest:
            continue
        for name in names:
            path = Path(name)
            if (path / "config.json").is_file() and fingerprint_base(path).digest == fp.digest:
                return path
    raise FailedPrecondition(f"no directory of base {fp.digest} is known here; pass --base",
                             field="base")


def fold_adapter(model: Any, config: dict[str, Any], tensors: dict[str, Any]) -> list[str]:
    """W += s·B·A for every module of the adapter, in place, in float32. Returns the paths.

    GPT-2's Conv1D stores its weight as [in, out]: ΔW is transposed for it."""
    import torch
    from transformers.pytorch_utils import Conv1D

    done = []
    with torch.no_grad():
        for path, m in modules_of(config, tensors).items():
            try:
                layer = model.get_submodule(path)
            except AttributeError:
                raise IncompatibleAdapter(f"{path} is not a module of the base",
                                          field="tensors") from None
            delta = m.scale * m.b.float() @ m.a.float()  # [out, in]
            if isinstance(layer, Conv1D):
                delta = delta.T  # [in, out]
            if tuple(layer.weight.shape) != tuple(delta.shape):
                raise IncompatibleAdapter(f"{path}: ΔW {list(delta.shape)} does not fit the "
                                          f"weight {list(layer.weight.shape)}", field="tensors")
            layer.weight.copy_((layer.weight.float() + delta).to(layer.weight.dtype))
            done.append(path)
    return done


def export_merged(reg: Registry, identity: Identity, ref: str, out: str | os.PathLike[str],
                  *, dtype: str = "float32", base: str | os.PathLike[str] | None = None
                  ) -> tuple[AdapterVersion, Path]:
    """Write base + adapter (folded) to `out` as a Hugging Face model directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise InvalidArgument(f"dtype must be one of {', '.join(DTYPES)}, got {quote(dtype)}",
                              field="dtype")
    v = reg.resolve(identity, ref)
    base_dir = base_dir_for(reg, v.base, base)
    dest = Path(out)
    if dest.exists() and any(dest.iterdir()):
        raise FailedPrecondition(f"{dest} exists and is not empty", field="out")
    loaded = reg.load_adapter(v)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    modules = fold_adapter(model, loaded.config, loaded.tensors)
    model.to(getattr(torch, dtype)).save_pretrained(dest, safe_serialization=True)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(dest)
    (dest / EXPORT_MANIFEST).write_text(json.dumps({
        "adapter": v.ref, "digest": v.digest, "base_digest": v.base.digest,
        "base_dir": str(base_dir), "dtype": dtype, "modules_folded": len(modules),
    }, indent=2, sort_keys=True))
    return v, dest
