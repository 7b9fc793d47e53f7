"""Base-model fingerprints: an adapter serves only on the base it was trained for.

A fingerprint is computed from a Hugging Face model directory without loading weights into
a model: the config gives the architecture numbers, a meta-device instantiation gives the
in/out features of every linear projection (what adapter shapes are checked against), and
a sha256 over the canonical config plus the raw weight files pins the exact weights.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loraplex.errors import InvalidArgument

# Config keys that change between saves of the same model and must not change its identity.
_VOLATILE_CONFIG_KEYS = frozenset(
    {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash",
     "use_cache", "output_attentions", "output_hidden_states", "return_dict"}
)
_CHUNK = 1 << 20


@dataclass(frozen=True)
class BaseFingerprint:
    """Identity of a base model. Two bases are compatible iff their `digest`s are equal."""

    architecture: str
    model_type: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    digest: str  # "sha256:<hex>" over canonical config + weight files
    # module path (e.g. "model.layers.0.self_attn.q_proj") -> (in_features, out_features)
    linear_shapes: dict[str, tuple[int, int]] = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["linear_shapes"] = {k: list(v) for k, v in self.linear_shapes.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BaseFingerprint:
        shapes = {k: (int(v[0]), int(v[1])) for k, v in (d.get("linear_shapes") or {}).items()}
        return cls(
            architecture=d["architecture"],
            model_type=d["model_type"],
            num_layers=int(d["num_layers"]),
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            vocab_size=int(d["vocab_size"]),
            digest=d["digest"],
            linear_shapes=shapes,
        )

    def summary(self) -> str:
        return (f"{self.architecture} L{self.num_layers} h{self.hidden_size} "
                f"i{self.intermediate_size} v{self.vocab_size} {self.digest[:19]}")


def canonical_config(config: dict[str, Any]) -> bytes:
    """Config JSON with volatile keys dropped, keys sorted: equal models hash equal."""
    kept = {k: v for k, v in config.items() if k not in _VOLATILE_CONFIG_KEYS}
    return json.dumps(kept, sort_keys=True, separators=(",", ":")).encode()


def _weight_files(base_dir: Path) -> list[Path]:
    files = sorted(base_dir.glob("*.safetensors"))
    if not files:
        files = sorted(base_dir.glob("*.bin"))
    return files


def base_digest(base_dir: Path, config: dict[str, Any]) -> str:
    h = hashlib.sha256()
    h.update(b"loraplex-base-v1\0")
    h.update(canonical_config(config))
    for f in _weight_files(base_dir):
        h.update(b"\0" + f.name.encode() + b"\0")
        with f.open("rb") as fh:
            while chunk := fh.read(_CHUNK):
                h.update(chunk)
    return "sha256:" + h.hexdigest()


def linear_shapes_from_config(config_dir: Path) -> dict[str, tuple[int, int]]:
    """Instantiate the architecture on the meta device and list the (in, out) of every
    layer an adapter may target: `peft_format.linear_modules`, i.e. peft's `all-linear`
    (the output layer is left out, as the runtime never wraps it)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from loraplex.peft_format import linear_modules

    cfg = AutoConfig.from_pretrained(config_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return linear_modules(model)


def _cfg_int(config: dict[str, Any], *keys: str, default: int = 0) -> int:
    for k in keys:
        if config.get(k) is not None:
            return int(config[k])
    return default


def fingerprint_base(base_dir: str | Path) -> BaseFingerprint:
    """Fingerprint a Hugging Face causal-LM directory. Raises InvalidArgument if unreadable."""
    base_dir = Path(base_dir)
    cfg_path = base_dir / "config.json"
    if not cfg_path.is_file():
        raise InvalidArgument(f"{base_dir} is not a model directory (no config.json)", field="base")
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InvalidArgument(f"{cfg_path}: unreadable config: {e}", field="base") from e
    if not _weight_files(base_dir):
        raise InvalidArgument(f"{base_dir} holds no weight files", field="base")
    hidden = _cfg_int(config, "hidden_size", "n_embd", "d_model")
    return BaseFingerprint(
        architecture=(config.get("architectures") or [config.get("model_type", "?")])[0],
        model_type=str(config.get("model_type", "")),
        num_layers=_cfg_int(config, "num_hidden_layers", "n_layer", "num_layers"),
        hidden_size=hidden,
        intermediate_size=_cfg_int(config, "intermediate_size", "n_inner", "ffn_dim",
                                   default=4 * hidden),
        vocab_size=_cfg_int(config, "vocab_size"),
        digest=base_digest(base_dir, config),
        linear_shapes=linear_shapes_from_config(base_dir),
    )
