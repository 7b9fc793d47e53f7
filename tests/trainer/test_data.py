import json

import pytest

from loraplex.basemodel import build_tokenizer
from loraplex.errors import InvalidArgument
from loraplex.trainer.data import (
    IGNORE_INDEX,
    MESSAGES,
    PROMPT_COMPLETION,
    Example,
    chat_prompt,
    encode_dataset,
    encode_example,
    load_jsonl,
    prompt_ids,
)

GOOD = '{"prompt": "hi", "completion": "HI"}'


@pytest.mark.parametrize("bad, reason", [
    ('{"prompt": "hi"', "not valid JSON"),
    ('["prompt", "completion"]', "expected a JSON object"),
    ('{"prompt": "hi"}', "missing field(s) 'completion'"),
    ('{"prompt": 3, "completion": "x"}', '"prompt" must be a string'),
    ('{"prompt": "hi", "completion": ""}', "nothing to learn"),
    ('{"messages": []}', "non-empty list"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant turn"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}, '
     '{"role": "user", "content": "and?"}]}', 'last message must have role "assistant"'),
    ('{"messages": [{"role": "bot", "content": "hi"}]}', "unknown role 'bot'"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}, '
     '{"role": "assistant", "content": "c"}]}', "a system turn may only come first"),
    ('{"messages": [{"role": "assistant", "content": "x"}]}', "must follow a user turn"),
    ('{"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}', "messages[0]"),
])
def test_malformed_line_names_file_line_and_reason(tmp_path, bad, reason):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join([GOOD, "", GOOD, bad, GOOD]) + "\n")
    with pytest.raises(InvalidArgument) as e:
        load_jsonl(path)
    assert f"{path}:4:" in str(e.value) and reason in str(e.value)
    assert e.value.field == "data"


def test_non_utf8_line_is_reported(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(GOOD.encode() + b"\n" + b'{"prompt": "\xff"}\n')
    with pytest.raises(InvalidArgument, match=r"d.jsonl:2: not valid UTF-8"):
        load_jsonl(path)


# -- token / label tables -------------------------------------------------------------------
# The embedded tokenizer maps every UTF-8 byte to the id of its value (b"a" -> 97), so the
# tables below spell the expected tokens as text: (text, trained?) segments in order.
EOS = 258


def _table(segments: list[tuple[str | list[int], bool]]) -> tuple[list[int], list[int]]:
    ids, labels = [], []
    for piece, trained in segments:
        toks = list(piece.encode()) if isinstance(piece, str) else piece
        ids += toks
        labels += toks if trained else [IGNORE_INDEX] * len(toks)
    return ids, labels


def _chatml_tokenizer():
    """The embedded tokenizer plus ChatML's two special tokens: a real end-of-turn token."""
    tok = build_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
        "'<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    return tok


def test_prompt_completion_trains_on_the_text_as_written():
    tok = build_tokenizer()
    enc = encode_example(tok, Example("2+2=", "4", 1), max_seq_len=64)
    assert (enc.input_ids, enc.labels) == _table([("2+2=", False), ("4", True), ([EOS], True)])
    # what Generate would be sent: the prompt itself, no template around it
    assert prompt_ids(tok, Example("2+2=", "4", 1)) == list(b"2+2=")


def test_chat_rows_train_on_every_assistant_turn_in_the_template():
    tok = build_tokenizer()  # template closes a turn with "\n" only: EOS teaches stopping
    msgs = ({"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yo"}, {"role": "user", "content": "ok?"},
            {"role": "assistant", "content": "ok"})
    ex = Example(list(msgs[:-1]), "ok", 1, messages=msgs)
    enc = encode_example(tok, ex, max_seq_len=256)
    assert (enc.input_ids, enc.labels) == _table([
        ("<|system|>\nbe brief\n<|user|>\nhi\n<|assistant|>\n", False), ("yo\n", True),
        ("<|user|>\nok?\n<|assistant|>\n", False), ("ok\n", True), ([EOS], True)])
    # exact-match generates from the turns before the last reply, rendered as a server would
    assert prompt_ids(tok, ex) == list(
        b"<|system|>\nbe brief\n<|user|>\nhi\n<|assistant|>\nyo\n<|user|>\nok?\n<|assistant|>\n")


def test_chat_rows_stop_training_at_the_end_of_turn_token():
    tok = _chatml_tokenizer()
    start, end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert (start, end) == (259, 260)
    msgs = ({"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
            {"role": "user", "content": "ok"}, {"role": "assistant", "content": "no"})
    enc = encode_example(tok, Example(list(msgs[:-1]), "no", 1, messages=msgs),
                         max_seq_len=256, stop={EOS, end})  # the generation config's eos list
    assert (enc.input_ids, enc.labels) == _table([
        ([start], False), ("user\nhi", False), ([end], False), ("\n", False),
        ([start], False), ("assistant\n", False), ("yo", True), ([end], True), ("\n", False),
        ([start], False), ("user\nok", False), ([end], False), ("\n", False),
        ([start], False), ("assistant\n", False), ("no", True), ([end], True), ("\n", False)])


def test_chat_rows_need_a_chat_template(tmp_path):
    tok = build_tokenizer()
    tok.chat_template = None
    msgs = ({"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"})
    with pytest.raises(InvalidArgument, match="no chat template"):
        encode_example(tok, Example(list(msgs[:1]), "yo", 1, messages=msgs), max_seq_len=64)


def test_a_file_holds_one_format(tmp_path):
    path = tmp_path / "d.jsonl"
    chat = json.dumps({"messages": [{"role": "user", "content": "hi"},
                                    {"role": "assistant", "content": "HI"}]})
    path.write_text(chat + "\n")
    assert load_jsonl(path).format == MESSAGES
    path.write_text(GOOD + "\n")
    assert load_jsonl(path).format == PROMPT_COMPLETION
    path.write_text(GOOD + "\n" + chat + "\n")
    with pytest.raises(InvalidArgument, match=r"d.jsonl:2: a messages row in a prompt_completion"):
        load_jsonl(path)


def test_train_on_prompt_labels_everything():
    tok = build_tokenizer()
    full = encode_example(tok, Example("abc", "ABC", 1), max_seq_len=512, train_on_prompt=True)
    assert full.labels == full.input_ids == list(b"abcABC") + [EOS]


def test_messages_keep_the_last_reply_as_the_reference(tmp_path):
    tok = build_tokenizer()
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"messages": [
        {"role": "system", "content": "be loud"}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "HI"}]}) + "\n")
    ex = load_jsonl(path).examples[0]
    assert ex.completion == "HI"
    assert chat_prompt(tok, ex.prompt) == "<|system|>\nbe loud\n<|user|>\nhi\n<|assistant|>\n"


def test_truncation_is_counted():
    tok = build_tokenizer()
    rows, n = encode_dataset(tok, [Example("x" * 100, "y", 1), Example("a", "b", 2)],
                             max_seq_len=32)
    assert n == 1 and len(rows[0]["input_ids"]) == 32


def test_smollm2_chat_rows_train_on_replies_and_im_end(smollm2_base):
    """The real ChatML template (with its default system prompt) and the imported
    generation config's end-of-turn id: only the replies and their <|im_end|> are learned."""
    from transformers import AutoTokenizer, GenerationConfig

    from loraplex.trainer.data import stop_ids

    tok = AutoTokenizer.from_pretrained(smollm2_base)
    stop = stop_ids(tok, GenerationConfig.from_pretrained(smollm2_base))
    msgs = ({"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris."},
            {"role": "user", "content": "And of Italy? 🇮🇹"},
            {"role": "assistant", "content": "Rome. 😀"})
    enc = encode_example(tok, Example(list(msgs[:-1]), "Rome. 😀", 1, messages=msgs),
                         max_seq_len=512, stop=stop)
    trained = [t for t, lab in zip(enc.input_ids, enc.labels, strict=True) if lab != IGNORE_INDEX]
    assert tok.decode(trained) == "Paris.<|im_end|>Rome. 😀<|im_end|>"
    assert "You are a helpful AI assistant named SmolLM" in tok.decode(enc.input_ids)
    assert enc.input_ids[-1] != tok.convert_tokens_to_ids("<|im_end|>")  # the "\n" after it
