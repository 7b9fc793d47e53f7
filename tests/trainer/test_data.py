import json

import pytest

from loraplex.basemodel import build_tokenizer
from loraplex.errors import InvalidArgument
from loraplex.trainer.data import IGNORE_INDEX, encode, encode_dataset, load_jsonl, render_prompt

GOOD = '{"prompt": "hi", "completion": "HI"}'


@pytest.mark.parametrize("bad, reason", [
    ('{"prompt": "hi"', "not valid JSON"),
    ('["prompt", "completion"]', "expected a JSON object"),
    ('{"prompt": "hi"}', "missing field(s) 'completion'"),
    ('{"prompt": 3, "completion": "x"}', '"prompt" must be a string'),
    ('{"prompt": "hi", "completion": ""}', "nothing to learn"),
    ('{"messages": []}', "non-empty list"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', 'role "assistant"'),
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


def test_loss_is_on_completion_tokens_only_by_default():
    tok = build_tokenizer()
    prompt = render_prompt(tok, "abc")
    enc = encode(tok, prompt, "ABC", max_seq_len=512)
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert enc.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert enc.labels[n_prompt:] == enc.input_ids[n_prompt:]
    assert enc.input_ids[-1] == tok.eos_token_id
    full = encode(tok, prompt, "ABC", max_seq_len=512, train_on_prompt=True)
    assert full.labels == full.input_ids


def test_messages_render_with_the_chat_template_and_train_on_the_last_reply(tmp_path):
    tok = build_tokenizer()
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"messages": [
        {"role": "system", "content": "be loud"}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "HI"}]}) + "\n")
    ex = load_jsonl(path).examples[0]
    assert ex.completion == "HI"
    assert render_prompt(tok, ex.prompt) == "<|system|>\nbe loud\n<|user|>\nhi\n<|assistant|>\n"


def test_truncation_is_counted():
    tok = build_tokenizer()
    from loraplex.trainer.data import Example

    rows, n = encode_dataset(tok, [Example("x" * 100, "y", 1), Example("a", "b", 2)],
                             max_seq_len=32)
    assert n == 1 and len(rows[0]["input_ids"]) == 32
