"""Chat messages → the base's own chat template: one rendering for training and serving.

    check_messages(messages)                  # roles and shapes, InvalidArgument naming the field
    text = render(tokenizer, messages)        # ends with the assistant's generation prompt
    ids = render_ids(tokenizer, messages)     # what the engine receives for a chat request

The trainer (`trainer.data.chat_prompt`, the chat rows' prompts) and the server (admission
of `GenerateRequest.messages`, the OpenAI chat route) both call `render`, so an adapter
trained on `{"messages": ...}` rows meets exactly the text it was trained on.

Roles are system (first turn only), user and assistant: the ones the trainer accepts. "tool"
is refused: a tool turn means something only next to the assistant's tool call and its id,
which a `{role, content}` message does not carry, and templates that do render tool turns
demand those fields, so accepting the role would render a conversation the model never saw.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from loraplex.errors import InvalidArgument, quote

ROLES = ("system", "user", "assistant")
MAX_MESSAGES = 1024  # messages in one conversation (both doors)


def check_messages(messages: Any, *, field: str = "messages") -> list[dict[str, str]]:
    """Plain `[{"role", "content"}]` dicts, or InvalidArgument naming `field[i].role` etc."""
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise InvalidArgument(f"`{field}` must be a non-empty list of messages", field=field)
    if len(messages) > MAX_MESSAGES:
        raise InvalidArgument(f"`{field}` holds {len(messages)} messages; at most "
                              f"{MAX_MESSAGES}", field=field)
    out = []
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else getattr(m, "role", None)
        content = m.get("content") if isinstance(m, dict) else getattr(m, "content", None)
        if not isinstance(role, str) or role not in ROLES:
            raise InvalidArgument(f"`{field}[{i}].role` is {quote(role)}; expected one of "
                                  f"{', '.join(ROLES)}", field=f"{field}[{i}].role")
        if role == "system" and i:
            raise InvalidArgument(f"`{field}[{i}]`: a system message may only come first",
                                  field=f"{field}[{i}].role")
        if not isinstance(content, str):
            raise InvalidArgument(f"`{field}[{i}].content` must be a string",
                                  field=f"{field}[{i}].content")
        out.append({"role": role, "content": content})
    return out


def has_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render(tokenizer: Any, messages: Sequence[dict[str, str]], *,
           generation_prompt: bool = True, field: str = "messages") -> str:
    """`messages` in the base's chat template (InvalidArgument on `field` when the base has
    none, or when the template itself refuses the conversation, e.g. roles not alternating)."""
    if not has_template(tokenizer):
        raise InvalidArgument("the base has no chat template: send `prompt` text instead of "
                              "`messages`", field=field)
    try:
        return tokenizer.apply_chat_template(list(messages), tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except Exception as e:  # jinja2's TemplateError / raise_exception in the template
        if type(e).__module__.split(".")[0] != "jinja2":
            raise
        raise InvalidArgument(f"the base's chat template refuses these messages: {e}",
                              field=field) from e


def render_ids(tokenizer: Any, messages: Sequence[dict[str, str]]) -> list[int]:
    """Token ids of the rendered conversation; the template writes any BOS itself, so the
    tokenizer adds no special tokens (the trainer tokenizes its chat prompts the same way)."""
    return list(tokenizer(render(tokenizer, messages), add_special_tokens=False)["input_ids"])
