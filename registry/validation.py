"""Registration checks: parse leniently, then report every violation at once.

A rejected adapter raises `ValidationFailed` whose `violations` are lines of the form
`<field>: <problem>` (field = the config key, `adapter_model.safetensors`, a tensor name,
`base` or `size_bytes`), so a user fixes everything in one round trip.

What the runtime can serve decides what is accepted: LoRA (A/B pairs on the linear layers of
the base other than its output layer), with peft's per-module `rank_pattern` /
`alpha_pattern`, and DoRA (`use_dora`: a magnitude vector `[out]` beside every pair). Extra
trainable modules and bias terms are refused here rather than silently served wrong. How tensor names, `target_modules` (incl. `all-linear`) and the
patterns are read is `loraplex.peft_format`, shared with the runtime and the trainer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from loraplex import peft_format
from loraplex.errors import InvalidArgument, ValidationFailed, quote
from loraplex.fingerprint import BaseFingerprint
from loraplex.limits import MAX_MODULE_CHARS
from loraplex.peft_format import PEFT_PREFIX
from loraplex.registry import tensorfile
from loraplex.registry.content import adapter_digest
from loraplex.registry.settings import RegistrySettings
from loraplex.registry.tensorfile import FLOAT_CODES, TensorFile, TensorFileError

# config key -> why a non-empty value is refused
_UNSUPPORTED = {
    "modules_to_save": "fully trained extra modules are not supported",
    "lora_bias": "LoRA bias terms are not supported",
    "target_parameters": "LoRA on parameters (not modules) is not supported",
    "trainable_token_indices": "trainable token embeddings are not supported",
    "layer_replication": "layer replication is not supported",
    "alora_invocation_tokens": "activated LoRA (aLoRA) is not supported",
}


@dataclass(frozen=True)
class ValidAdapter:
    """What a successful validation hands to the store."""

    config: dict[str, Any]
    config_bytes: bytes  # stored as uploaded
    weights_bytes: bytes  # keys in peft's layout (renamed if the upload lacked the prefix)
    digest: str
    rank: int
    alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]
    dtype: str


class _Report:
    """Collects `field: problem` lines."""

    def __init__(self, initial: list[str] | None = None) -> None:
        self.lines: list[str] = list(initial or [])
        self.first_field = self.lines[0].split(":", 1)[0] if self.lines else None

    def add(self, field: str, problem: str) -> None:
        self.first_field = self.first_field or field
        self.lines.append(f"{field}: {problem}")

    def raise_if_any(self) -> None:
        if self.lines:
            raise ValidationFailed(self.lines, field=self.first_field)


def validate(config_bytes: bytes, weights_bytes: bytes, base: BaseFingerprint | None,
             settings: RegistrySettings, *, prior: list[str] | None = None) -> ValidAdapter:
    """Check an upload against the LoRA rules, the limits and `base` (None: the caller
    could not determine the base and put the reason in `prior`)."""
    report = _Report(prior)
    size = len(config_bytes) + len(weights_bytes)
    if size > settings.max_adapter_bytes:
        report.add("size_bytes", f"{size} bytes exceeds the cap of "
                   f"{settings.max_adapter_bytes} (LORAPLEX_MAX_ADAPTER_BYTES)")
    config = _check_config(config_bytes, settings, report)
    tf = _parse_weights(weights_bytes, settings, report)
    names: dict[str, str] = {}
    modules: set[str] = set()
    dtype = ""
    if tf is not None:
        names, modules, dtype = _check_tensors(tf, config, base, report)
    report.raise_if_any()
    if config is None or tf is None:  # unreachable: both failures add a violation
        raise ValidationFailed(["adapter: unreadable"], field="adapter")
    stored = weights_bytes
    if any(not k.startswith(PEFT_PREFIX) for k in tf.tensors):
        stored = tensorfile.rename(tf, {k: PEFT_PREFIX + v for k, v in names.items()})
    return ValidAdapter(
        config=config, config_bytes=config_bytes, weights_bytes=stored,
        digest=adapter_digest(config, tf, names), rank=int(config["r"]),
        alpha=float(config.get("lora_alpha", 8)), use_rslora=bool(config.get("use_rslora")),
        target_modules=tuple(peft_format.leaf_names(modules)), dtype=dtype)


def _check_config(raw: bytes, settings: RegistrySettings,
                  report: _Report) -> dict[str, Any] | None:
    try:
        config = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        report.add("adapter_config.json", f"not valid JSON: {e}")
        return None
    if not isinstance(config, dict):
        report.add("adapter_config.json", "must be a JSON object")
        return None
    if config.get("peft_type") != "LORA":
        report.add("peft_type", f"must be 'LORA', got {quote(config.get('peft_type'))}")
    r = config.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        report.add("r", f"`r` must be an integer > 0, got {quote(r)}")
    elif r > settings.max_rank:
        report.add("r", f"rank {r} exceeds the maximum {settings.max_rank} (LORAPLEX_MAX_RANK)")
    alpha = config.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not alpha > 0:
        report.add("lora_alpha", f"`lora_alpha` must be a number > 0, got {quote(alpha)}")
    _check_pattern(config, "rank_pattern", settings.max_rank, report)
    _check_pattern(config, "alpha_pattern", None, report)
    if not isinstance(config.get("use_rslora", False), bool):
        report.add("use_rslora", "`use_rslora` must be true or false")
    if not isinstance(config.get("use_dora", False), bool):
        report.add("use_dora", "`use_dora` must be true or false")
    try:
        peft_format.targets_of(config)
    except InvalidArgument as e:
        report.add(e.field or "target_modules", e.message)
    if config.get("bias", "none") != "none":
        report.add("bias", f"bias training is not supported, got {quote(config.get('bias'))}")
    for key, why in _UNSUPPORTED.items():
        if config.get(key):
            report.add(key, why)
    return config


def _check_pattern(config: dict[str, Any], key: str, max_rank: int | None,
                   report: _Report) -> None:
    """`rank_pattern` / `alpha_pattern`: {module regex: positive number}."""
    pattern = config.get(key) or {}
    if not isinstance(pattern, dict):
        report.add(key, "must be an object mapping module patterns to values")
        return
    for k, v in pattern.items():
        whole = max_rank is not None  # ranks are integers, alphas any positive number
        if isinstance(v, bool) or not isinstance(v, int if whole else int | float) or v <= 0:
            report.add(key, f"{quote(k)}: must be {'an integer' if whole else 'a number'} > 0, "
                       f"got {quote(v)}")
        elif max_rank is not None and v > max_rank:
            report.add(key, f"{quote(k)}: rank {v} exceeds the maximum {max_rank} "
                       "(LORAPLEX_MAX_RANK)")
        try:
            peft_format.pattern_regex(k, key)
        except InvalidArgument as e:
            report.add(key, e.message)


def _parse_weights(raw: bytes, settings: RegistrySettings,
                   report: _Report) -> TensorFile | None:
    try:
        tf = tensorfile.parse(raw, max_header_bytes=settings.max_header_bytes,
                              max_tensors=settings.max_tensors)
    except TensorFileError as e:
        report.add("adapter_model.safetensors", f"not a safetensors file: {e}")
        return None
    if not tf.tensors:
        report.add("adapter_model.safetensors", "holds no tensors")
    return tf


def _targets(config: dict[str, Any] | None) -> peft_format.TargetModules | None:
    """The config's targets, or None when the config is unreadable (already reported)."""
    try:
        return peft_format.targets_of(config) if config is not None else None
    except InvalidArgument:
        return None


def _rank_of(config: dict[str, Any] | None, module: str) -> Any:
    """`r` for `module` (its `rank_pattern` entry, else the config's); None if unknown."""
    r = config.get("r") if config else None
    pattern = config.get("rank_pattern") if config else None
    if not isinstance(pattern, dict):
        return r
    try:
        key = peft_format.pattern_key(pattern, module)
    except InvalidArgument:  # reported by _check_pattern
        return None
    return r if key is None else pattern[key]


def _check_tensors(tf: TensorFile, config: dict[str, Any] | None, base: BaseFingerprint | None,
                   report: _Report) -> tuple[dict[str, str], set[str], str]:
    names: dict[str, str] = {}
    seen: set[str] = set()  # normalized names: a set, so N tensors cost O(N)
    codes: set[str] = set()
    targets = _targets(config)
    dora = config is not None and config.get("use_dora") is True
    shapes = base.linear_shapes if base is not None else None
    for stored, info in tf.tensors.items():
        key = peft_format.parse_key(stored)
        if key is None:
            report.add(stored, "not a LoRA weight (expected '<module>.lora_A.weight' or "
                       "'<module>.lora_B.weight')")
            continue
        if key.adapter_name:
            report.add(stored, f"names the adapter {quote(key.adapter_name)} (a live model's "
                       "state_dict, not a saved adapter: save it with save_pretrained)")
            continue
        if key.normalized in seen:
            report.add(stored, "appears twice (with and without peft's prefix)")
            continue
        seen.add(key.normalized)
        names[stored] = key.normalized
        if len(key.module) > MAX_MODULE_CHARS:
            report.add(stored, f"module path is longer than {MAX_MODULE_CHARS} characters")
            continue
        if key.half == peft_format.MAGNITUDE and not dora:
            report.add(stored, "a DoRA magnitude vector, but `use_dora` is not true in "
                       "adapter_config.json")
        if targets is not None and not targets.matches(key.module, shapes):
            report.add(stored, f"module {quote(key.module)} is not among target_modules "
                       f"{quote(config.get('target_modules'))}")
        if info.code not in FLOAT_CODES:
            report.add(stored, f"dtype {info.dtype} is not a float type")
            continue
        codes.add(info.code)
        if bad := tensorfile.count_nonfinite(tf.data(info), info.code):
            report.add(stored, f"holds {bad} NaN/Inf values")
        if shapes is not None:
            _check_shape(stored, key.module, key.half, info.shape,
                         _rank_of(config, key.module), shapes, report)
    grouped = peft_format.pair_tensors({k: None for k in names.values()})
    for module, missing in grouped.incomplete:
        report.add(module, f"has no lora_{missing} weight")
    if dora and (bare := sorted(set(grouped.pairs) - set(grouped.magnitudes))):
        report.add("use_dora", f"DoRA adapter, but {len(bare)} module(s) have no magnitude "
                   f"vector (lora_magnitude_vector), e.g. {quote(bare[0])}")
    if len(codes) > 1:
        report.add("adapter_model.safetensors",
                   f"mixes dtypes {sorted(tensorfile.DTYPES[c][0] for c in codes)}")
    dtype = tensorfile.DTYPES[min(codes)][0] if codes else ""
    modules = set(grouped.pairs) | {m for m, _ in grouped.incomplete}
    return names, modules, dtype


def _check_shape(stored: str, module: str, ab: str, shape: tuple[int, ...], r: Any,
                 shapes: dict[str, tuple[int, int]], report: _Report) -> None:
    if module not in shapes:
        report.add(stored, f"module {quote(module)} is not a linear layer of the base model that "
                   "the runtime serves LoRA on (every one but the output layer)")
        return
    fan_in, fan_out = shapes[module]
    if ab == peft_format.MAGNITUDE:  # one magnitude per output feature
        if list(shape) != [fan_out]:
            report.add(stored, f"shape {list(shape)} does not match the base: expected "
                       f"[{fan_out}] (one DoRA magnitude per output feature)")
        return
    rank = r if isinstance(r, int) and not isinstance(r, bool) and r > 0 else None
    want = (rank, fan_in) if ab == "A" else (fan_out, rank)
    if len(shape) != 2 or any(w is not None and w != s for w, s in zip(want, shape, strict=True)):
        show = tuple("r" if w is None else w for w in want)
        report.add(stored, f"shape {list(shape)} does not match the base and r: "
                   f"expected {list(show)}")
