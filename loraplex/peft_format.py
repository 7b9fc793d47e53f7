"""The rules of peft's LoRA format, written once for the registry, the runtime and the trainer.

    key = parse_key("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
    key.module, key.half                    # "model.layers.0.self_attn.q_proj", "A"
    targets = parse_targets(config["target_modules"], config.get("exclude_modules"))
    targets.select(linear_modules(model))   # the module paths peft would wrap
    LoraScaling.from_config(config).scale("model.layers.0.self_attn.q_proj")   # alpha / r

An adapter is stored in peft's own layout, trained elsewhere with peft and served here, so
every rule below is peft's (checked against peft 0.21 `tuners_utils.check_target_module_exists`,
`_maybe_include_all_linear_layers`, `utils.other.get_pattern_key`, `LoraLayer.update_layer`).
Where two parts of loraplex read the same config differently, an adapter validates in the
registry and then fails or, worse, computes something else in the runtime; so nothing here
is re-derived anywhere else.

Sections: tensor names; target modules (list, regex, `all-linear`, exclusions, layer
indices); rank/alpha patterns and the scale; the loading tables (quantization, dtypes).
Pure functions and frozen dataclasses; torch and transformers are imported only by the
functions that take a model or build a loading config.

Every pattern an adapter config carries is written by whoever uploaded it and is matched
against module paths taken from that upload's own tensor names, so it runs on RE2
(`google-re2`), whose matching time is linear in the input: a pattern such as `(a|a)*b`
that takes Python's backtracking `re` exponential time finishes in microseconds. Pattern
and module-path lengths are capped (`loraplex.limits`). RE2 refuses what it cannot match
in linear time (backreferences, lookaround); peft's configs do not need either, and such a
pattern is refused with InvalidArgument naming the field.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import re2

from loraplex.errors import InvalidArgument, quote
from loraplex.limits import MAX_MODULE_CHARS, MAX_PATTERN_CHARS

T = TypeVar("T")

# ------------------------------------------------------------------------------ tensor names

PEFT_PREFIX = "base_model.model."
"""What `save_pretrained` puts before every module path (the PeftModel's `base_model.model`)."""

_KEY = re.compile(r"(?:base_model\.model\.)?(?P<module>.+?)\.lora_(?P<half>[AB])"
                  r"(?:\.(?P<adapter>[^.]+))?\.weight")
# DoRA's magnitude: `<module>.lora_magnitude_vector` in a saved file (peft drops the adapter
# name and the `.weight` of its DoraLinearLayer), `.lora_magnitude_vector.<adapter>.weight`
# in a live state_dict
_MAGNITUDE_KEY = re.compile(r"(?:base_model\.model\.)?(?P<module>.+?)\.lora_magnitude_vector"
                            r"(?:\.(?P<adapter>[^.]+)\.weight)?")
MAGNITUDE = "M"
"""`LoraKey.half` of a DoRA magnitude vector `# [out]`."""


@dataclass(frozen=True)
class LoraKey:
    """One LoRA tensor name, taken apart.

    Saved files name a tensor `base_model.model.<module>.lora_A.weight` (peft strips the
    adapter name on save); a live PeftModel's `state_dict()` says `lora_A.<adapter>.weight`.
    Both are parsed so the runtime's layers take either; the registry refuses the second,
    because peft's own loader would insert the adapter name a second time and miss it.
    """

    module: str  # base-model module path, e.g. "model.layers.0.self_attn.q_proj"
    half: str  # "A" ([r, in]), "B" ([out, r]) or "M" (DoRA magnitude [out])
    adapter_name: str = ""  # "" in a saved file; "default" etc. in a live state_dict

    @property
    def normalized(self) -> str:
        """`<module>.lora_A.weight` (`<module>.lora_magnitude_vector` for DoRA's magnitude):
        the name loraplex hashes and hands to the runtime."""
        return weight_key(self.module, self.half)


def parse_key(key: str) -> LoraKey | None:
    """A LoRA A/B weight or DoRA magnitude name (with or without peft's prefix), or None for
    anything else (embedding LoRA, biases, whole weights)."""
    m = _KEY.fullmatch(key)
    if m is not None:
        return LoraKey(m["module"], m["half"], m["adapter"] or "")
    m = _MAGNITUDE_KEY.fullmatch(key)
    if m is not None:
        return LoraKey(m["module"], MAGNITUDE, m["adapter"] or "")
    return None


def weight_key(module: str, half: str, *, prefixed: bool = False) -> str:
    """The name of `module`'s A or B weight, or of its DoRA magnitude (`half` "M");
    `prefixed`: as peft's files spell it."""
    prefix = PEFT_PREFIX if prefixed else ""
    if half == MAGNITUDE:
        return f"{prefix}{module}.lora_magnitude_vector"
    return f"{prefix}{module}.lora_{half}.weight"


@dataclass(frozen=True)
class LoraPairs(Generic[T]):
    """Tensors grouped per module: what the runtime copies and the registry checks."""

    pairs: dict[str, tuple[T, T]]  # module path -> (A # [r, in], B # [out, r])
    unparsed: tuple[str, ...] = ()  # keys that are no LoRA A/B weight nor DoRA magnitude
    incomplete: tuple[tuple[str, str], ...] = ()  # (module, missing half "A"|"B")
    magnitudes: dict[str, T] = field(default_factory=dict)  # module -> DoRA m # [out]

    @property
    def dora(self) -> bool:
        """Some module carries a DoRA magnitude: B·A alone is not the adapter."""
        return bool(self.magnitudes)


def pair_tensors(tensors: Mapping[str, T]) -> LoraPairs[T]:
    """Group `tensors` (any key spelling `parse_key` reads) into A/B pairs per module, and
    DoRA magnitudes apart. A module with only one half (or a magnitude without its pair) is
    reported, never served: B·A needs both."""
    halves: dict[str, dict[str, T]] = {}
    magnitudes: dict[str, T] = {}
    unparsed: list[str] = []
    for name, t in tensors.items():
        key = parse_key(name)
        if key is None:
            unparsed.append(name)
        elif key.half == MAGNITUDE:
            magnitudes[key.module] = t
            halves.setdefault(key.module, {})
        else:
            halves.setdefault(key.module, {})[key.half] = t
    pairs = {m: (h["A"], h["B"]) for m, h in halves.items() if len(h) == 2}
    incomplete = tuple(sorted((m, half) for m, h in halves.items() if len(h) != 2
                              for half in ("A", "B") if half not in h))
    return LoraPairs(pairs, tuple(unparsed), incomplete, magnitudes)


def uses_dora(config: Mapping[str, Any]) -> bool:
    """peft's `use_dora`: every targeted module carries a learned magnitude per output
    feature over the row-normalised `W + s·B·A` (DoRA, arXiv 2402.09353)."""
    return bool(config.get("use_dora", False))


# ------------------------------------------------------------------------------ uploaded patterns

_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.max_mem = 8 << 20  # a compiled program beyond this is refused, not built


@functools.lru_cache(maxsize=1024)
def _compiled(pattern: str) -> Any:
    return re2.compile(pattern, _RE2_OPTIONS)


def compile_pattern(pattern: str, field: str) -> Any:
    """An uploaded regular expression compiled for RE2 (linear-time matching), cached;
    InvalidArgument naming `field` for one that is too long or not RE2 syntax."""
    if not isinstance(pattern, str):
        raise InvalidArgument(f"must be a string, got {quote(pattern)}", field=field)
    if len(pattern) > MAX_PATTERN_CHARS:
        raise InvalidArgument(f"pattern {quote(pattern)} is longer than "
                              f"{MAX_PATTERN_CHARS} characters", field=field)
    try:
        return _compiled(pattern)
    except re2.error as e:
        raise InvalidArgument(f"pattern {quote(pattern)} is not a regular expression this "
                              f"server matches (RE2 syntax: no backreferences or "
                              f"lookaround): {e}", field=field) from None


def _module_path(module: str) -> str:
    """`module` if it is short enough to match against an uploaded pattern."""
    if len(module) > MAX_MODULE_CHARS:
        raise InvalidArgument(f"module path {quote(module)} is longer than "
                              f"{MAX_MODULE_CHARS} characters", field="tensors")
    return module


# ------------------------------------------------------------------------------ target modules

ALL_LINEAR = "all-linear"
"""peft's shorthand (compared case-insensitively, and only as the whole string, never as a
list entry): every linear layer (`nn.Linear`, GPT-2's `Conv1D`, and bitsandbytes' layers,
which subclass `nn.Linear`) except the model's output layer, found by identity with
`get_output_embeddings()` rather than by the name `lm_head` (GPT-NeoX calls it `embed_out`)."""


def _names(value: Any, what: str) -> tuple[str, ...] | str:
    """A regex string or a tuple of non-empty names; InvalidArgument naming `what`."""
    if isinstance(value, str):
        if value.lower() != ALL_LINEAR:
            compile_pattern(value, what)
        return value
    if (isinstance(value, list | tuple | set | frozenset) and value
            and all(isinstance(t, str) and t for t in value)):
        return tuple(sorted(value))  # peft keeps a set: order carries no meaning
    raise InvalidArgument("must be a non-empty list of module names or a regex", field=what)


def _layer_indices(value: Any) -> tuple[int, ...]:
    if value is None or value == []:
        return ()
    items = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if (not isinstance(items, list | tuple) or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in items)):
        raise InvalidArgument("must be a layer index or a list of them",
                              field="layers_to_transform")
    return tuple(items)


@dataclass(frozen=True)
class TargetModules:
    """`target_modules` (with `exclude_modules`, `layers_to_transform`, `layers_pattern`) as
    peft reads them. Build it with `parse_targets`.

    - a string is a regular expression that must match the WHOLE module path
      (`re.fullmatch`), so "q_proj" alone matches nothing: write `.*\\.q_proj`;
    - a list matches a module whose path equals an entry or ends with "." + entry, so
      "q_proj" matches every layer's q_proj, and "self_attn.q_proj" works too;
    - `all-linear` is resolved against the model: every linear layer but the output one;
    - `exclude_modules` (same two forms) removes modules, before anything matches;
    - `layers_to_transform` keeps only modules of those layer indices: the first number
      after `<layers_pattern>.` (or after any `<name>.`) in the path. As in peft, it
      narrows list targets only; a regex already says which layers it means.
    """

    spec: str | tuple[str, ...]  # regex, or names matched exactly or as a dotted suffix
    exclude: str | tuple[str, ...] = ()
    layers: tuple[int, ...] = ()  # layers_to_transform; () = every layer
    layers_pattern: tuple[str, ...] = ()

    @property
    def all_linear(self) -> bool:
        return isinstance(self.spec, str) and self.spec.lower() == ALL_LINEAR

    def matches(self, module: str, linear: Collection[str] | None = None) -> bool:
        """Would peft wrap `module`? `linear`: the model's `linear_modules` (needed only to
        resolve `all-linear`; None = unknown, then any module not excluded counts)."""
        if _name_match(self.exclude, module):
            return False
        if self.all_linear:
            return linear is None or module in linear
        if isinstance(self.spec, str):
            return compile_pattern(self.spec, "target_modules").fullmatch(
                _module_path(module)) is not None
        if module in self.spec:  # named exactly: peft skips the layer-index filter
            return True
        return _name_match(self.spec, module) and self._in_layers(module)

    def select(self, linear: Iterable[str]) -> list[str]:
        """The modules among `linear` (a model's `linear_modules`) that peft would wrap."""
        names = list(linear)
        known = frozenset(names)
        return [m for m in names if self.matches(m, known)]

    def _in_layers(self, module: str) -> bool:
        if not self.layers:
            return True
        # lazy `.*?`: the first numbered segment is the layer (not an MoE expert index)
        pats = [rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\." for p in self.layers_pattern] or [
            r".*?\.[^.]*\.(?P<idx>\d+)\."]
        for pat in pats:
            m = compile_pattern(pat, "layers_pattern").match(_module_path(module))
            if m is not None:
                return int(m["idx"]) in self.layers
        return False


def _name_match(spec: str | tuple[str, ...], module: str) -> bool:
    if isinstance(spec, str):
        return compile_pattern(spec, "exclude_modules").fullmatch(
            _module_path(module)) is not None
    return any(module == t or module.endswith("." + t) for t in spec)


def parse_targets(target_modules: Any, exclude_modules: Any = None,
                  layers_to_transform: Any = None, layers_pattern: Any = None) -> TargetModules:
    """Read the config's fields leniently (list, tuple or set; JSON or Python); refuse what
    peft would refuse or misread, with InvalidArgument naming the field."""
    spec = _names(target_modules, "target_modules")
    exclude = () if exclude_modules in (None, [], "") else _names(exclude_modules,
                                                                  "exclude_modules")
    pattern: Any = layers_pattern or ()
    if isinstance(pattern, str):
        pattern = (pattern,)
    if not isinstance(pattern, list | tuple) or not all(isinstance(p, str) for p in pattern):
        raise InvalidArgument("must be a name or a list of names", field="layers_pattern")
    for p in pattern:  # peft puts each name into a regex unescaped: it is one
        compile_pattern(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", "layers_pattern")
    return TargetModules(spec, exclude, _layer_indices(layers_to_transform), tuple(pattern))


def targets_of(config: Mapping[str, Any]) -> TargetModules:
    """`parse_targets` over an adapter_config.json dict."""
    return parse_targets(config.get("target_modules"), config.get("exclude_modules"),
                         config.get("layers_to_transform"), config.get("layers_pattern"))


def output_layer(model: Any) -> Any | None:
    """The module that produces the logits (never a LoRA target under `all-linear`)."""
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


def linear_modules(model: Any, wrappers: tuple[type, ...] = ()) -> dict[str, tuple[int, int]]:
    """Module path -> (in, out) of every layer `all-linear` means, in model order: each
    `nn.Linear` (bitsandbytes' 4/8-bit layers subclass it) and GPT-2 `Conv1D`, minus the
    output layer. A module of a class in `wrappers` (a LoRA wrapper already put in place)
    counts as the linear layer it wraps, and nothing inside it counts, so the answer is the
    same before and after wrapping (peft's rule for its own tuner layers)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    head = output_layer(model)
    out: dict[str, tuple[int, int]] = {}
    inside: list[str] = []
    for name, mod in model.named_modules():
        if any(name.startswith(w) for w in inside) or mod is head:
            continue
        if wrappers and isinstance(mod, wrappers):
            inside.append(name + ".")
            base = getattr(mod, "base_layer", None)
            if base is not None and base is not head:
                out[name] = _in_out(base, torch, Conv1D)
        elif isinstance(mod, torch.nn.Linear | Conv1D):
            out[name] = _in_out(mod, torch, Conv1D)
    return out


def _in_out(mod: Any, torch: Any, conv1d: type) -> tuple[int, int]:
    if isinstance(mod, conv1d):  # GPT-2 stores the transpose: weight [in, out]
        return int(mod.weight.shape[0]), int(mod.weight.shape[1])
    return int(mod.in_features), int(mod.out_features)


def leaf_names(modules: Iterable[str]) -> list[str]:
    """Sorted distinct last path parts: the short `target_modules` list for `modules`."""
    return sorted({m.rsplit(".", 1)[-1] for m in modules})


# ------------------------------------------------------------------------------ rank, alpha, scale


def pattern_key(patterns: Iterable[str], module: str) -> str | None:
    """peft's `get_pattern_key`: the first pattern that matches the END of the module path
    at a dot boundary (`(.*\\.)?(<pattern>)$`), so "q_proj" and "layers.0.self_attn.q_proj"
    both address one module; None when none does. Order matters: first match wins.
    InvalidArgument (field `rank_pattern`) for a key that is no RE2 pattern."""
    for key in patterns:
        if pattern_regex(key).match(_module_path(module)):
            return key
    return None


def pattern_regex(key: str, field: str = "rank_pattern") -> Any:
    """The compiled regex peft builds from a `rank_pattern` / `alpha_pattern` key."""
    if not isinstance(key, str) or len(key) > MAX_PATTERN_CHARS:
        compile_pattern(key, field)  # raises the length / type error
    return compile_pattern(rf"(.*\.)?({key})$", field)


def lora_scale(r: int, alpha: float, use_rslora: bool = False) -> float:
    """peft's `scaling`: alpha / r, or alpha / sqrt(r) for rank-stabilised LoRA (whose point
    is that the update's size does not shrink as the rank grows)."""
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise InvalidArgument(f"`r` must be an integer > 0, got {quote(r)}", field="r")
    return float(alpha) / (math.sqrt(r) if use_rslora else r)


def _pattern(value: Any, what: str) -> tuple[tuple[str, Any], ...]:
    if value is None:
        return ()
    if isinstance(value, tuple):
        return value
    if not isinstance(value, Mapping):
        raise InvalidArgument("must be an object mapping module patterns to values", field=what)
    return tuple(value.items())


@dataclass(frozen=True)
class LoraScaling:
    """r, alpha and their per-module overrides: what a layer's B·A is multiplied by.

    `rank_pattern` / `alpha_pattern` map a module pattern (see `pattern_key`) to that
    module's r / alpha; peft looks the two up independently, so a module may take its r
    from one and its alpha from the config, and the scale uses both (rsLoRA included).
    Mappings are kept as ordered pairs: first match wins, as in peft.
    """

    r: int
    alpha: float
    use_rslora: bool = False
    rank_pattern: tuple[tuple[str, int], ...] = field(default=())
    alpha_pattern: tuple[tuple[str, float], ...] = field(default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "rank_pattern", _pattern(self.rank_pattern, "rank_pattern"))
        object.__setattr__(self, "alpha_pattern", _pattern(self.alpha_pattern, "alpha_pattern"))
        lora_scale(self.r, self.alpha, self.use_rslora)  # refuses a bad r

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> LoraScaling:
        """peft's defaults for missing keys: r = 8, lora_alpha = 8, use_rslora = False."""
        return cls(config.get("r", 8), config.get("lora_alpha", 8),
                   bool(config.get("use_rslora", False)), config.get("rank_pattern") or (),
                   config.get("alpha_pattern") or ())

    def rank(self, module: str) -> int:
        return _lookup(self.rank_pattern, module, self.r)

    def alpha_of(self, module: str) -> float:
        return _lookup(self.alpha_pattern, module, self.alpha)

    def scale(self, module: str) -> float:
        return lora_scale(self.rank(module), self.alpha_of(module), self.use_rslora)


def _lookup(pairs: tuple[tuple[str, Any], ...], module: str, default: Any) -> Any:
    key = pattern_key((k for k, _ in pairs), module)
    return default if key is None else dict(pairs)[key]


# ------------------------------------------------------------------------------ loading tables

QUANTIZATIONS = ("nf4", "int8", "none")
"""How a base is loaded for training and serving; the two must agree, since an adapter
trained on an nf4 base matches peft on that same nf4 base."""

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
"""Names accepted for a compute dtype ("auto" besides, see `compute_dtype`)."""


def torch_dtype(name: str) -> Any:
    """The torch dtype for one of `COMPUTE_DTYPES`."""
    import torch

    if name not in COMPUTE_DTYPES:
        raise InvalidArgument(f"unknown compute_dtype {quote(name)}; choose one of "
                              f"{('auto', *COMPUTE_DTYPES)}", field="compute_dtype")
    return getattr(torch, name)


def compute_dtype(name: Any, device: Any = "cpu") -> Any:
    """A dtype name (or a torch dtype) for `device`. "auto" is bfloat16 on a CUDA device
    that supports it and float32 otherwise: CPU half precision is slow, and float16 needs
    loss scaling in training and overflows in some bases' activations."""
    import torch

    if isinstance(name, torch.dtype):
        return torch_dtype(str(name).removeprefix("torch."))
    if name == "auto":
        dev = torch.device(device)
        if dev.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return torch_dtype(name)


def bnb_config(quantization: str, dtype: Any) -> Any | None:
    """transformers' `BitsAndBytesConfig` for `quantization`, None for "none".

    nf4 is the QLoRA recipe: 4-bit NormalFloat, double quantization of the block scales,
    matmuls in `dtype`. int8 is LLM.int8(). Trainer and runtime load with the same config,
    so the served base is the base the adapter was trained on.
    """
    if quantization not in QUANTIZATIONS:
        raise InvalidArgument(f"unknown quantization {quote(quantization)}; choose one of "
                              f"{QUANTIZATIONS}", field="quantization")
    if quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if quantization == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    return BitsAndBytesConfig(load_in_8bit=True)
