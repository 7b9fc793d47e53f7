"""Tenant datasets: parse and check JSONL, tokenize with labels on what the model must say.

Two row formats, as in TRL (one per file):

    {"prompt": "Ticket: refund please\\nDesk:", "completion": " BILLING"}
    {"messages": [{"role": "system", "content": "…"}, {"role": "user", "content": "…"},
                  {"role": "assistant", "content": "…"}, …]}

What you train is what you serve:

- `prompt`/`completion` rows train on the text *as written*: prompt tokens (tokenized the
  way `Generate` tokenizes a prompt), then the completion, then EOS. No template is added,
  so the same prompt sent to `Generate`, to plain peft or to the OpenAI completions route
  meets the adapter exactly as in training. Put any separator you want in the prompt.
- `messages` rows are rendered with the base's own chat template, the rendering a server
  applies to chat `messages`. Loss is on every assistant turn (its content and the
  template's end-of-turn token), nothing else; a system turn is optional. When the template
  closes a turn with no special token (the embedded base's), EOS follows the last reply so
  the model learns to stop.

The whole file is checked before any training starts: a malformed line raises
`InvalidArgument` naming the file, the line number and the reason.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraplex import chat
from loraplex.chat import ROLES  # the roles a server accepts in chat requests
from loraplex.errors import InvalidArgument, quote

IGNORE_INDEX = -100  # label value the loss skips (prompt tokens, padding)
PROMPT_COMPLETION, MESSAGES = "prompt_completion", "messages"


@dataclass(frozen=True)
class Example:
    """One row after parsing. For a `messages` row, `prompt` is the turns before the last
    assistant reply and `completion` that reply (what exact-match compares); `messages` is
    the whole conversation (what training and loss use)."""

    prompt: str | list[dict[str, str]]
    completion: str
    line: int
    messages: tuple[dict[str, str], ...] | None = None

    @property
    def format(self) -> str:
        return MESSAGES if self.messages is not None else PROMPT_COMPLETION


@dataclass(frozen=True)
class Dataset:
    path: Path
    examples: list[Example]
    digest: str  # "sha256:<hex>" of the file bytes: pins the data in the lineage

    @property
    def format(self) -> str:
        return self.examples[0].format


def _bad(path: Path, line: int, reason: str) -> InvalidArgument:
    return InvalidArgument(f"{path}:{line}: {reason}", field="data")


def _parse_messages(path: Path, line: int, msgs: Any) -> Example:
    if not isinstance(msgs, list) or not msgs:
        raise _bad(path, line, '"messages" must be a non-empty list')
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(
                m.get("content"), str):
            raise _bad(path, line, f'messages[{i}] must be {{"role": str, "content": str}}')
        if m["role"] not in ROLES:
            raise _bad(path, line, f'messages[{i}]: unknown role {quote(m["role"])} (one of '
                                   f'{", ".join(ROLES)})')
        if m["role"] == "system" and i:
            raise _bad(path, line, f"messages[{i}]: a system turn may only come first")
    roles = [m["role"] for m in msgs]
    if "assistant" not in roles:
        raise _bad(path, line, "no assistant turn: nothing to learn")
    if "user" not in roles[:roles.index("assistant")]:
        raise _bad(path, line, "the first assistant turn must follow a user turn")
    if roles[-1] != "assistant":
        raise _bad(path, line, 'the last message must have role "assistant" (turns after the '
                               "last reply teach nothing)")
    clean = tuple({"role": m["role"], "content": m["content"]} for m in msgs)
    return Example(prompt=list(clean[:-1]), completion=clean[-1]["content"], line=line,
                   messages=clean)


def parse_line(path: Path, line: int, text: str) -> Example:
    """One JSONL line -> Example, or InvalidArgument saying exactly what is wrong."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise _bad(path, line, f"not valid JSON ({e.msg} at column {e.colno})") from e
    if not isinstance(obj, dict):
        raise _bad(path, line, f"expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        return _parse_messages(path, line, obj["messages"])
    missing = [k for k in ("prompt", "completion") if k not in obj]
    if missing:
        raise _bad(path, line, f'missing field(s) {", ".join(map(repr, missing))}; expected '
                               '{"prompt", "completion"} or {"messages"}')
    for k in ("prompt", "completion"):
        if not isinstance(obj[k], str):
            raise _bad(path, line, f'"{k}" must be a string, got {type(obj[k]).__name__}')
    if not obj["completion"]:
        raise _bad(path, line, '"completion" is empty: nothing to learn')
    return Example(prompt=obj["prompt"], completion=obj["completion"], line=line)


def load_jsonl(path: str | Path) -> Dataset:
    """Read and check every line; blank lines are skipped, anything else must parse, and
    every row must use the format of the first."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise InvalidArgument(f"{path}: cannot read data file: {e.strerror}", field="data") from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise _bad(path, line, "not valid UTF-8") from e
    examples = [parse_line(path, i, t) for i, t in enumerate(text.splitlines(), start=1)
                if t.strip()]
    if not examples:
        raise InvalidArgument(f"{path}: no examples", field="data")
    for ex in examples:
        if ex.format != examples[0].format:
            raise _bad(path, ex.line, f"a {ex.format} row in a {examples[0].format} file "
                                      f"(line {examples[0].line}); use one format per file")
    return Dataset(path=path, examples=examples, digest="sha256:" + hashlib.sha256(raw).hexdigest())


# -- rendering and tokenizing ----------------------------------------------------------------
def _template(tokenizer: Any, messages: Any, *, generation_prompt: bool) -> str:
    if not chat.has_template(tokenizer):
        raise InvalidArgument('the base has no chat template: "messages" rows need one; write '
                              '{"prompt", "completion"} rows instead', field="data")
    return chat.render(tokenizer, messages, generation_prompt=generation_prompt, field="data")


def chat_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """`messages` in the base's chat template, ending with the assistant's generation prompt:
    the text a server renders for a chat request (`loraplex.chat.render`, shared with it)."""
    return _template(tokenizer, messages, generation_prompt=True)


def prompt_ids(tokenizer: Any, ex: Example) -> list[int]:
    """Token ids a server sees before the answer: a prompt as written (tokenized like
    `Generate` does), or the chat rendering of the turns before the last reply."""
    if ex.messages is None:
        return list(tokenizer(ex.prompt)["input_ids"])
    return list(tokenizer(chat_prompt(tokenizer, ex.prompt),
                          add_special_tokens=False)["input_ids"])  # = chat.render_ids


def stop_ids(tokenizer: Any, generation_config: Any = None) -> set[int]:
    """Ids that end an answer: EOS and the generation config's eos list (end-of-turn)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    v = getattr(generation_config, "eos_token_id", None)
    ids.update(v if isinstance(v, list | tuple) else [v] if v is not None else [])
    return ids


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where the model is not asked to predict
    truncated: bool


def _cut(ids: list[int], labels: list[int], max_seq_len: int) -> Encoded:
    return Encoded(ids[:max_seq_len], labels[:max_seq_len], len(ids) > max_seq_len)


def encode(tokenizer: Any, prompt_ids_: list[int], completion: str, *, max_seq_len: int,
           train_on_prompt: bool = False) -> Encoded:
    """prompt ids + completion + EOS, labels on the completion (and EOS), cut from the right."""
    c = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        c = c + [tokenizer.eos_token_id]
    ids = list(prompt_ids_) + c
    labels = list(ids) if train_on_prompt else [IGNORE_INDEX] * len(prompt_ids_) + c
    return _cut(ids, labels, max_seq_len)


def assistant_spans(tokenizer: Any, messages: tuple[dict[str, str], ...] | list
                    ) -> tuple[str, list[tuple[int, int]]]:
    """(full chat text, [start, end) character spans of each assistant turn). A turn's span
    is what the template adds after the generation prompt: the reply and its end marker."""
    text = _template(tokenizer, messages, generation_prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _template(tokenizer, messages[:i], generation_prompt=True)
        upto = _template(tokenizer, messages[:i + 1], generation_prompt=False)
        if not (upto.startswith(before) and text.startswith(upto)):
            raise InvalidArgument("the chat template does not render a conversation as a "
                                  "growing prefix; its assistant turns cannot be located",
                                  field="data")
        spans.append((len(before), len(upto)))
    return text, spans


def encode_messages(tokenizer: Any, messages: tuple[dict[str, str], ...] | list, *,
                    max_seq_len: int, stop: set[int] | None = None,
                    train_on_prompt: bool = False) -> Encoded:
    """The conversation in the chat template; labels on every assistant turn up to and
    including its first stop token (nothing the template writes after it)."""
    stop = stop_ids(tokenizer) if stop is None else stop
    text, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [IGNORE_INDEX] * len(ids)
    for a, b in spans:
        for t, (start, _) in enumerate(enc["offset_mapping"]):
            if a <= start < b:
                labels[t] = ids[t]
                if ids[t] in stop:
                    break
    last_closed = any(labels[t] in stop for t in range(len(ids)) if labels[t] != IGNORE_INDEX)
    if not last_closed and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)  # the template never ends a turn: teach stopping
        labels.append(tokenizer.eos_token_id)
    if train_on_prompt:
        labels = list(ids)
    return _cut(ids, labels, max_seq_len)


def encode_example(tokenizer: Any, ex: Example, *, max_seq_len: int,
                   train_on_prompt: bool = False, stop: set[int] | None = None) -> Encoded:
    """Training ids and labels of one row, in its own format (see the module docstring)."""
    if ex.messages is not None:
        return encode_messages(tokenizer, ex.messages, max_seq_len=max_seq_len, stop=stop,
                               train_on_prompt=train_on_prompt)
    return encode(tokenizer, prompt_ids(tokenizer, ex), ex.completion, max_seq_len=max_seq_len,
                  train_on_prompt=train_on_prompt)


def encode_dataset(tokenizer: Any, examples: list[Example], *, max_seq_len: int,
                   train_on_prompt: bool = False, stop: set[int] | None = None
                   ) -> tuple[list[dict[str, list[int]]], int]:
    """Encode every example; returns (rows, number truncated). Rows with no label left after
    truncation are kept (they still count) but contribute no loss."""
    rows, n_trunc = [], 0
    for ex in examples:
        enc = encode_example(tokenizer, ex, max_seq_len=max_seq_len,
                             train_on_prompt=train_on_prompt, stop=stop)
        n_trunc += enc.truncated
        rows.append({"input_ids": enc.input_ids, "labels": enc.labels})
    return rows, n_trunc


def pad_batch(rows: list[dict[str, list[int]]], pad_id: int) -> dict[str, Any]:
    """Right-pad a list of encoded rows into tensors (labels padded with IGNORE_INDEX)."""
    import torch

    n = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)  # [B, T]
    labels = torch.full((len(rows), n), IGNORE_INDEX, dtype=torch.long)  # [B, T]
    mask = torch.zeros((len(rows), n), dtype=torch.long)  # [B, T]
    for i, r in enumerate(rows):
        k = len(r["input_ids"])
        ids[i, :k] = torch.tensor(r["input_ids"])
        labels[i, :k] = torch.tensor(r["labels"])
        mask[i, :k] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
