"""The embedded default base model, built locally and deterministically.

Nothing may be downloaded at run time, so tests, the demo and the benchmarks use a small
causal LM this module writes as a complete Hugging Face directory (config, safetensors
weights, tokenizer files). The same (size, arch, seed) gives byte-identical files.

    loraplex base build ./base --size tiny --seed 0

Sizes: `micro` (unit tests, ~0.2M params), `tiny` (demo, a few M params), `bench`
(benchmarks: 8 layers, hidden 1024, intermediate 2816, 16 heads, vocab 8000, ~100M).
Architectures: `llama` (default), `qwen2`, `gpt2` — the three families the tests cover.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from loraplex.errors import InvalidArgument, quote

BYTE_VOCAB = 256
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")  # ids 256, 257, 258
PAD_ID, BOS_ID, EOS_ID = 256, 257, 258
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class BaseSize:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    max_positions: int


SIZES: dict[str, BaseSize] = {
    "micro": BaseSize(hidden=64, intermediate=160, layers=2, heads=4, kv_heads=2, vocab=259,
                      max_positions=256),
    "tiny": BaseSize(hidden=192, intermediate=512, layers=4, heads=6, kv_heads=2, vocab=259,
                     max_positions=512),
    "bench": BaseSize(hidden=1024, intermediate=2816, layers=8, heads=16, kv_heads=16,
                      vocab=8000, max_positions=1024),
}
ARCHS = ("llama", "qwen2", "gpt2")


def _hf_config(arch: str, s: BaseSize):
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    common = dict(vocab_size=s.vocab, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
                  pad_token_id=PAD_ID)
    if arch == "llama":
        return LlamaConfig(hidden_size=s.hidden, intermediate_size=s.intermediate,
                           num_hidden_layers=s.layers, num_attention_heads=s.heads,
                           num_key_value_heads=s.kv_heads, max_position_embeddings=s.max_positions,
                           tie_word_embeddings=False, **common)
    if arch == "qwen2":
        return Qwen2Config(hidden_size=s.hidden, intermediate_size=s.intermediate,
                           num_hidden_layers=s.layers, num_attention_heads=s.heads,
                           num_key_value_heads=s.kv_heads, max_position_embeddings=s.max_positions,
                           tie_word_embeddings=False, **common)
    if arch == "gpt2":
        return GPT2Config(n_embd=s.hidden, n_inner=s.intermediate, n_layer=s.layers,
                          n_head=s.heads, n_positions=s.max_positions, **common)
    raise InvalidArgument(f"unknown architecture {quote(arch)}; choose one of {ARCHS}", field="arch")


def build_tokenizer():
    """A byte-level tokenizer: every UTF-8 byte is one token, plus pad/bos/eos."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()  # 256 printable stand-ins for bytes
    byte_chars = sorted(alphabet, key=lambda c: _byte_of(c))
    vocab = {ch: i for i, ch in enumerate(byte_chars)}
    for i, tok in enumerate(SPECIAL_TOKENS):
        vocab[tok] = BYTE_VOCAB + i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token=None)
    fast.chat_template = CHAT_TEMPLATE
    return fast


@functools.cache
def byte_decoder() -> dict[str, int]:
    """GPT-2's printable stand-in character -> the byte it stands for (byte-level BPE
    vocabularies, ours and SmolLM2's, spell every byte with one of these characters)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def _byte_of(ch: str) -> int:
    """Inverse of GPT-2's bytes_to_unicode for one character."""
    return byte_decoder()[ch]


# A pre-training hook: (model, tokenizer, seed) -> None. The trainer provides the brief
# deterministic pre-training that makes the tiny base a fast learner
# (`loraplex.trainer.pretrain.default_pretrain`); callers pass it in, so this core module
# does not depend on the trainer (dependencies point from the packages to the core).
PretrainFn = Callable[[object, object, int], None]


def build_base(out_dir: str | Path, *, size: str = "tiny", arch: str = "llama", seed: int = 0,
               pretrain: PretrainFn | None = None) -> Path:
    """Write a complete HF model directory; deterministic for a given (size, arch, seed)."""
    import torch
    from transformers import AutoModelForCausalLM

    if size not in SIZES:
        raise InvalidArgument(f"unknown size {quote(size)}; choose one of {sorted(SIZES)}", field="size")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = _hf_config(arch, SIZES[size])
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    tokenizer = build_tokenizer()
    if pretrain is not None:
        pretrain(model, tokenizer, seed)
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    meta = {"builder": "loraplex.basemodel", "size": size, "arch": arch, "seed": seed,
            "pretrained": pretrain is not None}
    (out / "loraplex_base.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return out

