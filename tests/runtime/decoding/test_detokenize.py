"""Streamed text is always valid: no half characters, no U+FFFD, chunks concatenate to the
final text, and stop strings are cut exactly even when they land inside a token."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loraplex.basemodel import build_tokenizer
from loraplex.runtime.decoding.detokenize import Detokenizer, TokenTable, held_stop_prefix

SAMPLES = [
    "plain ascii",
    "café crème brûlée",
    "emoji 😀 and a family 👩‍👩‍👧 and a flag 🇫🇷",
    "CJK 世界你好, こんにちは, 안녕하세요",
    "combining: e\u0301 a\u0308 n\u0303 and Zalgo z\u0336\u0335",
    "mixed 😀世e\u0301!",
]


@pytest.fixture(scope="module")
def tokenizers(smollm2_base):
    from transformers import AutoTokenizer

    return {"embedded": build_tokenizer(), "smollm2": AutoTokenizer.from_pretrained(smollm2_base)}


@pytest.fixture(scope="module")
def tables(tokenizers):
    return {k: TokenTable.for_tokenizer(t) for k, t in tokenizers.items()}


def _stream(table, ids, stop=(), step=1):
    d = Detokenizer(table, stop=stop)
    chunks = []
    for i in range(0, len(ids), step):
        chunks.append(d.feed(ids[i:i + step]))
        if d.stopped:
            break
    chunks.append(d.finish())
    assert "".join(chunks) == d.text
    return d, chunks


@pytest.mark.parametrize("name", ["embedded", "smollm2"])
@pytest.mark.parametrize("text", SAMPLES)
def test_chunks_are_whole_characters_and_add_up_to_the_text(tokenizers, tables, name, text):
    tok, table = tokenizers[name], tables[name]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    d, chunks = _stream(table, ids)
    assert all("\ufffd" not in c for c in chunks), chunks
    assert d.text == text == tok.decode(ids, skip_special_tokens=True)


def test_a_character_split_across_tokens_waits_for_its_last_byte(tables, tokenizers):
    tok = tokenizers["smollm2"]
    ids = tok("😀", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1  # the emoji really is split
    d = Detokenizer(tables["smollm2"])
    assert [d.feed([i]) for i in ids] == [""] * (len(ids) - 1) + ["😀"]
    # per-token decoding, what a naive stream would send, shows replacement characters
    assert any("\ufffd" in tok.decode([i]) for i in ids)


def test_special_tokens_add_no_text(tables, tokenizers):
    tok = tokenizers["smollm2"]
    ids = tok("Paris", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    d, _ = _stream(tables["smollm2"], ids)
    assert d.text == "Paris"


@pytest.mark.parametrize("name", ["embedded", "smollm2"])
@pytest.mark.parametrize("text, stop, expected", [
    ("The capital is Paris.\n\nNext question", ["\n\n"], "The capital is Paris."),
    ("The capital is Paris.", ["ris"], "The capital is Pa"),  # stop inside a token
    ("say 😀 now", ["😀"], "say "),  # stop on a character split across tokens
    ("a ## b ### c", ["###"], "a ## b "),  # a partial match is held, then released
    ("no stop here", ["zzz", "here!"], "no stop here"),  # held "here" flushed at the end
    ("x STOP y END", ["END", "STOP"], "x "),  # the earliest stop wins
])
def test_stop_strings_cut_exactly(tokenizers, tables, name, text, stop, expected):
    ids = tokenizers[name](text, add_special_tokens=False)["input_ids"]
    d, chunks = _stream(tables[name], ids, stop=stop)
    assert d.text == expected
    assert d.stopped == (expected != text)
    for s in stop:  # nothing shown ever contained (a started) stop string that later matched
        assert s not in "".join(chunks)


def test_held_text_is_the_longest_possible_stop_prefix():
    assert held_stop_prefix("a ##", ["###"]) == 2
    assert held_stop_prefix("a #", ["###", "#!"]) == 1
    assert held_stop_prefix("abc", ["x"]) == 0


# -- properties -------------------------------------------------------------------------------
TEXT = st.text(alphabet=st.sampled_from(
    list("ab .,\n") + ["é", "ß", "世", "界", "😀", "👩", "\u200d", "\u0301", "\u0308", "🇫", "🇷",
                       "한", "ā", "\u4e00"]), max_size=40)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXT, step=st.integers(1, 4), name=st.sampled_from(["embedded", "smollm2"]),
       stop=st.sampled_from([(), ("😀",), ("é.",), ("\n",), ("a b",)]))
def test_property_valid_text_streams_exactly(tokenizers, tables, text, step, name, stop):
    tok = tokenizers[name]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    d, chunks = _stream(tables[name], ids, stop=stop, step=step)
    assert all("\ufffd" not in c for c in chunks)
    cut = min([i for s in stop if (i := text.find(s)) >= 0], default=len(text))
    assert d.text == text[:cut]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=st.lists(st.integers(0, 49151), max_size=30), step=st.integers(1, 3))
def test_property_any_ids_stream_to_the_tokenizers_own_decode(tokenizers, tables, ids, step):
    """Even ids that make invalid UTF-8 (a model can emit them) end as the one-shot decode."""
    tok = tokenizers["smollm2"]
    d, _ = _stream(tables["smollm2"], ids, step=step)
    assert d.text == tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def _sentencepiece_style_tokenizer():
    """A Llama-2-style tokenizer (Metaspace "▁", byte fallback `<0xE2>` tokens, a decoder that
    fuses and strips): not byte-level, so the detokenizer takes its fallback path."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    vocab.update({"▁": 259, "a": 260, "b": 261, "▁a": 262, "é": 263})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("▁", "a")], byte_fallback=True,
                               unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                           normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


SP_TOK = _sentencepiece_style_tokenizer()
SP_TABLE = TokenTable.for_tokenizer(SP_TOK)


@settings(max_examples=80, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(["a", "b", " ", "é", "😀", "世", "\u0301"]),
                    min_size=1, max_size=20),
       step=st.integers(1, 3), stop=st.sampled_from([(), ("😀",), ("a b",)]))
def test_property_fallback_tokenizers_stream_exactly(text, step, stop):
    assert not SP_TABLE.byte_level
    ids = SP_TOK(text, add_special_tokens=False)["input_ids"]
    d, chunks = _stream(SP_TABLE, ids, stop=stop, step=step)
    assert all("\ufffd" not in c for c in chunks)
    full = SP_TOK.decode(ids, skip_special_tokens=True)
    cut = min([i for s in stop if (i := full.find(s)) >= 0], default=len(full))
    assert d.text == full[:cut]


def test_ids_past_the_tokenizer_add_no_text_as_in_its_own_decode():
    """A model's vocab may be padded past its tokenizer's (the bench base: 8,000 logits over
    259 tokens); a random-weight model samples such ids. They add nothing, as in `decode`."""
    tok = build_tokenizer()
    ids = tok("hi", add_special_tokens=False)["input_ids"]
    d, _ = _stream(TokenTable.for_tokenizer(tok), [ids[0], 5000, *ids[1:], 7999])
    assert d.text == "hi" == tok.decode([ids[0], 5000, *ids[1:], 7999])
