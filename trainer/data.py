"""Tenant datasets: parse and check JSONL, render prompts, tokenize with completion-only labels.

Accepted lines (one JSON object each):

    {"prompt": "send the box", "completion": "SEND THE BOX"}
    {"messages": [{"role": "user", "content": "…"}, {"role": "assistant", "content": "…"}]}

Rendering. A prompt is wrapped as one user turn of the tokenizer's chat template (with the
generation prompt) when the tokenizer has one, else in `DEFAULT_TEMPLATE`; the completion
follows, then EOS. A `messages` example trains on its last assistant turn: every turn
before it is rendered as the prompt. `render_prompt` is the one place this happens, so
serving code that wants the trained behaviour renders prompts with it too.

The whole file is checked before any training starts: a malformed line raises
`InvalidArgument` naming the file, the line number and the reason.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraplex.errors import InvalidArgument

# Used only for tokenizers without a chat template (GPT-2's, for example).
DEFAULT_TEMPLATE = "### Prompt:\n{prompt}\n### Response:\n"
IGNORE_INDEX = -100  # label value the loss skips (prompt tokens, padding)


@dataclass(frozen=True)
class Example:
    """One training pair after parsing; `prompt` may be a list of chat messages."""

    prompt: str | list[dict[str, str]]
    completion: str
    line: int


@dataclass(frozen=True)
class Dataset:
    path: Path
    examples: list[Example]
    digest: str  # "sha256:<hex>" of the file bytes: pins the data in the lineage


def _bad(path: Path, line: int, reason: str) -> InvalidArgument:
    return InvalidArgument(f"{path}:{line}: {reason}", field="data")


def _parse_messages(path: Path, line: int, msgs: Any) -> Example:
    if not isinstance(msgs, list) or not msgs:
        raise _bad(path, line, '"messages" must be a non-empty list')
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(
                m.get("content"), str):
            raise _bad(path, line, f'messages[{i}] must be {{"role": str, "content": str}}')
    if msgs[-1]["role"] != "assistant":
        raise _bad(path, line, 'the last message must have role "assistant" (what is learned)')
    if len(msgs) < 2:
        raise _bad(path, line, '"messages" needs at least one turn before the assistant reply')
    prompt = [{"role": m["role"], "content": m["content"]} for m in msgs[:-1]]
    return Example(prompt=prompt, completion=msgs[-1]["content"], line=line)


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
    """Read and check every line; blank lines are skipped, anything else must parse."""
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
    return Dataset(path=path, examples=examples, digest="sha256:" + hashlib.sha256(raw).hexdigest())


def render_prompt(tokenizer: Any, prompt: str | list[dict[str, str]]) -> str:
    """The text the model sees before the completion (see the module docstring)."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not isinstance(prompt, str):
        prompt = "\n".join(f"{m['role']}: {m['content']}" for m in prompt)
    return DEFAULT_TEMPLATE.format(prompt=prompt)


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on prompt tokens unless train_on_prompt
    truncated: bool


def encode(tokenizer: Any, prompt_text: str, completion: str, *, max_seq_len: int,
           train_on_prompt: bool = False) -> Encoded:
    """Token ids and labels of prompt+completion+EOS, cut to max_seq_len from the right."""
    p = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    c = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        c = c + [tokenizer.eos_token_id]
    ids = p + c
    labels = (list(ids) if train_on_prompt else [IGNORE_INDEX] * len(p) + c)
    truncated = len(ids) > max_seq_len
    return Encoded(ids[:max_seq_len], labels[:max_seq_len], truncated)


def encode_dataset(tokenizer: Any, examples: list[Example], *, max_seq_len: int,
                   train_on_prompt: bool = False) -> tuple[list[dict[str, list[int]]], int]:
    """Encode every example; returns (rows, number truncated). Rows with no label left after
    truncation are kept (they still count) but contribute no loss."""
    rows, n_trunc = [], 0
    for ex in examples:
        enc = encode(tokenizer, render_prompt(tokenizer, ex.prompt), ex.completion,
                     max_seq_len=max_seq_len, train_on_prompt=train_on_prompt)
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
