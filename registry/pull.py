"""A version's content out of the registry: tensors in memory, or peft files on disk.
Every byte read is checked against the version's digest (`DataCorruption` otherwise)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from loraplex.errors import DataCorruption
from loraplex.peft_format import PEFT_PREFIX
from loraplex.registry import faults, tensorfile
from loraplex.registry.blobstore import BlobStore
from loraplex.registry.content import adapter_digest
from loraplex.registry.records import AdapterVersion, LoadedAdapter
from loraplex.registry.versions import CONFIG_FILE, WEIGHTS_FILE

MANIFEST_FILE = "loraplex_manifest.json"


def load_adapter(blobs: BlobStore, version: AdapterVersion) -> LoadedAdapter:
    """Config + torch tensors of a version. Tensor keys are base-model module paths
    (`model.layers.0.self_attn.q_proj.lora_A.weight`)."""
    from safetensors.torch import load as load_safetensors

    config_bytes = blobs.get(version.config_blob)
    weights = blobs.get(version.weights_blob)
    config = json.loads(config_bytes)
    tf = tensorfile.parse(weights)
    names = {k: k.removeprefix(PEFT_PREFIX) for k in tf.tensors}
    if adapter_digest(config, tf, names) != version.digest:
        raise DataCorruption(f"{version.ref}: stored content does not hash to "
                             f"{version.digest}", field="digest")
    tensors = {names[k]: t for k, t in load_safetensors(weights).items()}
    return LoadedAdapter(config=config, tensors=tensors, version=version)


def write_files(blobs: BlobStore, v: AdapterVersion, dest: str | os.PathLike[str]) -> Path:
    """Write the version's peft files (plus `loraplex_manifest.json`) into `dest`."""
    config_bytes = blobs.get(v.config_blob)
    weights = blobs.get(v.weights_blob)
    out = Path(dest)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / CONFIG_FILE).write_bytes(config_bytes)
        (out / WEIGHTS_FILE).write_bytes(weights)
        (out / MANIFEST_FILE).write_text(json.dumps(v.manifest(), indent=2, sort_keys=True))
    except OSError as e:
        raise faults.os_error(e, f"pulling {v.ref} into", out) from e
    return out
