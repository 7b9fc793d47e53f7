"""Content identity of an adapter: what makes two uploads "the same version".

digest = sha256 over
  1. the canonical adapter config: JSON with sorted keys, compact separators, and
     - these keys dropped because they describe where/how a file was saved, not what it
       computes: `base_model_name_or_path`, `revision`, `inference_mode`, `peft_version`,
       `auto_mapping` (the base is pinned separately, by fingerprint);
     - keys whose value is null dropped (newer peft versions add new keys as null);
     - a list-valued `target_modules` sorted (peft writes a Python set, so its order
       changes from run to run);
  2. every tensor in sorted order of its normalised name (`<module path>.lora_A.weight`,
     peft's `base_model.model.` prefix stripped): name, dtype, shape, then its raw
     little-endian bytes, each length-prefixed so no two inputs can collide by
     concatenation.

So re-saving an adapter, saving it from another peft version or another machine, or
pushing it with or without peft's key prefix gives the same digest; changing one weight,
the rank, alpha or the target modules gives another.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

from loraplex.registry.tensorfile import TensorFile

VOLATILE_CONFIG_KEYS = frozenset(
    {"base_model_name_or_path", "revision", "inference_mode", "peft_version", "auto_mapping"})
_DOMAIN = b"loraplex-adapter-v1\0"


def canonical_config(config: dict[str, Any]) -> bytes:
    kept: dict[str, Any] = {}
    for key, value in config.items():
        if key in VOLATILE_CONFIG_KEYS or value is None:
            continue
        if key == "target_modules" and isinstance(value, list):
            value = sorted(value)
        kept[key] = value
    return json.dumps(kept, sort_keys=True, separators=(",", ":")).encode()


def _framed(h: Any, data: bytes | memoryview) -> None:
    h.update(len(data).to_bytes(8, "little"))
    h.update(data)


def adapter_digest(config: dict[str, Any], tf: TensorFile,
                   names: dict[str, str]) -> str:
    """`names` maps each stored tensor name to its normalised name."""
    h = hashlib.sha256(_DOMAIN)
    _framed(h, canonical_config(config))
    order: Iterable[tuple[str, str]] = sorted((names[k], k) for k in tf.tensors)
    for norm, stored in order:
        info = tf.tensors[stored]
        _framed(h, json.dumps([norm, info.code, list(info.shape)]).encode())
        _framed(h, tf.data(info))
    return "sha256:" + h.hexdigest()


def bytes_digest(data: bytes) -> str:
    """Digest of raw blob bytes (the blob store's address)."""
    return "sha256:" + hashlib.sha256(data).hexdigest()
